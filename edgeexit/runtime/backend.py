"""The backend interface: the only thing that differs between onnxruntime, torch and TensorRT.

A backend runs the stages of one model on named tensors and owns where those tensors
live (host arrays, torch CUDA tensors, TensorRT device buffers). The cascade never looks
inside a tensor except through `download`, which it calls only on the few bytes it needs
(`conf`, `pred`, and the logits of samples that leave), so activations can stay on a
device between stages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Sequence

import numpy as np


class Backend(ABC):
    """Runs stage k on named tensors; moves tensors between host and wherever it keeps them."""

    name: str = "backend"

    def scope(self) -> AbstractContextManager:
        """Held by the cascade for one whole call: a device backend serialises callers here
        and cleans up after an error, so that a failed call does not poison the next."""
        return nullcontext()

    @abstractmethod
    def upload(self, array: np.ndarray) -> Any:
        """Host array -> the backend's tensor (a no-op for host backends)."""

    @abstractmethod
    def run(self, stage: int, feeds: dict[str, Any]) -> dict[str, Any]:
        """Run stage `stage` on its named inputs; returns every output by name."""

    @abstractmethod
    def take(self, value: Any, rows: np.ndarray) -> Any:
        """Rows `rows` of a batch-first tensor, on the backend (the compaction gather); the
        result stays valid until the cascade call ends (it downloads leavers' logits last)."""

    @abstractmethod
    def download(self, value: Any) -> np.ndarray:
        """The backend's tensor -> host array (waits for the work that produces it)."""

    def close(self) -> None:
        """Free what the backend holds on its device (a no-op for host backends); idempotent."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def download_many(self, values: Sequence[Any]) -> list[np.ndarray]:
        """Several tensors to the host at once: a device backend waits for the device once
        for all of them (the cascade's `conf` and `pred` of every step)."""
        return [self.download(v) for v in values]
