"""Traces of a bundle on a data split: every exit's confidence and prediction, per sample.

The bridge between a bundle (models, backends) and the calibration package (numbers only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calibration.traces import Traces
from edgeexit.bundle import Bundle
from edgeexit.data import Split, bundle_split, normalize
from edgeexit.runtime.backend import Backend
from edgeexit.runtime.cascade import trace


def split_inputs(bundle: Bundle, split: str, data: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Normalised images and labels of a split of the bundle's data (or of the `data` .npz)."""
    s: Split = bundle_split(bundle.manifest, split, data)
    return normalize(s.x, bundle.input["mean"], bundle.input["std"]), s.y


def record_traces(bundle: Bundle, backend: Backend, x: np.ndarray, y: np.ndarray, split: str) -> Traces:
    """Run every exit on every sample of (x, y) and keep conf, pred and the labels."""
    every = trace(backend, bundle.stage_ios, x, bundle.manifest["export"]["batch"]["max"])
    meta = {"bundle": bundle.name, "split": split, "backend": backend.name, "samples": int(len(y)),
            "thresholds_at_record": bundle.thresholds}
    return Traces(every.exit_conf.astype(np.float32), every.exit_pred.astype(np.int64), y.astype(np.int64), meta)
