"""The tensor names of one stage: what the runtime feeds and reads, and what a bundle records.

Kept apart from `edgeexit.staging` (which cuts torch models into stages) so that the runtime,
which only moves named arrays, never needs torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageIO:
    """Tensor names of one stage, as the runtime and the bundle manifest see them."""

    index: int
    inputs: tuple[str, ...]
    carry: tuple[str, ...]
    logits: str
    conf: str
    pred: str

    @property
    def outputs(self) -> tuple[str, ...]:
        return (*self.carry, self.logits, self.conf, self.pred)
