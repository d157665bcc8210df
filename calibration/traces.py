"""Traces: every exit's confidence and prediction for every sample of a split.

A trace is recorded once by running the bundle with no early exit (every exit evaluated);
from then on any threshold vector can be scored on it without a model. Saved as `.npz`
with arrays `conf` (N, K), `pred` (N, K), `labels` (N,) and a JSON `meta` string.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.errors import CalibrationError


@dataclass(frozen=True)
class Traces:
    """Per-sample, per-exit confidence and prediction, with the true labels."""

    conf: np.ndarray  # (N, K) float32
    pred: np.ndarray  # (N, K) int64
    labels: np.ndarray  # (N,) int64
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        conf, pred, labels = self.conf, self.pred, self.labels
        if conf.ndim != 2 or pred.shape != conf.shape or labels.shape != conf.shape[:1]:
            raise CalibrationError(f"traces: conf {conf.shape}, pred {pred.shape} and labels {labels.shape} "
                                   "do not fit (need (N, K), (N, K), (N,))")
        if len(labels) == 0 or conf.shape[1] < 2:
            raise CalibrationError(f"traces: need at least 1 sample and 2 exits, got {conf.shape}")
        if np.isnan(conf).any():
            raise CalibrationError("traces: conf has NaN entries (was every exit evaluated?)")

    @property
    def correct(self) -> np.ndarray:
        """(N, K) bool: exit k's prediction is right for sample n."""
        return self.pred == self.labels[:, None]

    @property
    def exits(self) -> int:
        return self.conf.shape[1]

    def __len__(self) -> int:
        return len(self.labels)


def save_traces(path: str | Path, traces: Traces) -> Path:
    """Write `traces` to `path` (.npz) in one rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial.npz", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the traces from other users
    try:
        np.savez_compressed(tmp, conf=traces.conf.astype(np.float32), pred=traces.pred.astype(np.int64),
                            labels=traces.labels.astype(np.int64), meta=np.array(json.dumps(traces.meta, allow_nan=False)))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_traces(path: str | Path) -> Traces:
    """Read a `.npz` written by `save_traces`; a wrong or damaged file gets a one-line error."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = {"conf", "pred", "labels"} - set(archive.files)
            if missing:
                raise CalibrationError(f"traces: {path} lacks {', '.join(sorted(missing))} (not an edgeexit trace)")
            meta = json.loads(str(archive["meta"])) if "meta" in archive.files else {}
            return Traces(archive["conf"].astype(np.float32), archive["pred"].astype(np.int64),
                          archive["labels"].astype(np.int64), meta)
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"traces: cannot read {path}: {exc}") from None
