"""Confidence gating replayed on recorded numbers: which exit each sample would take.

Everything here works on per-sample, per-exit arrays (confidence and correctness, as a
no-exit trace of the cascade records them) and per-exit costs, so a threshold choice can
be evaluated for thousands of candidates without running a model. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def exits_taken(conf: np.ndarray, thresholds) -> np.ndarray:
    """(N,) exit index per sample: the first exit k with conf[:, k] >= thresholds[k]; the
    last exit takes the rest (its threshold is ignored). Same rule as the runtime cascade."""
    conf = np.asarray(conf)
    k_total = conf.shape[1]
    if len(thresholds) != k_total or any(t is None for t in thresholds[:-1]):
        raise ValueError(f"need {k_total} thresholds, only the last may be None; got {list(thresholds)}")
    th = np.array([*thresholds[:-1], -np.inf], dtype=np.float64)
    leaves = conf >= th[None, :]
    return np.argmax(leaves, axis=1)  # the last column is all True, so argmax finds the first exit taken


@dataclass(frozen=True)
class OperatingPoint:
    accuracy: float
    cost: float  # mean cumulative cost per sample (FLOPs or seconds, whatever `cum_cost` is in)
    shares: np.ndarray  # share of samples per exit


def operating_point(conf: np.ndarray, correct: np.ndarray, cum_cost, thresholds) -> OperatingPoint:
    """Accuracy, mean cost and exit shares of one threshold vector on recorded traces."""
    taken = exits_taken(conf, thresholds)
    rows = np.arange(len(taken))
    shares = np.bincount(taken, minlength=conf.shape[1]) / len(taken)
    return OperatingPoint(float(np.mean(correct[rows, taken])), float(np.asarray(cum_cost)[taken].mean()), shares)


def shared_threshold_sweep(conf: np.ndarray, correct: np.ndarray, cum_cost, grid) -> dict[str, list[float]]:
    """The accuracy/cost curve of one threshold shared by every early exit, over `grid`."""
    points = [operating_point(conf, correct, cum_cost, [t] * (conf.shape[1] - 1) + [None]) for t in grid]
    return {"threshold": [float(t) for t in grid], "accuracy": [p.accuracy for p in points],
            "cost": [p.cost for p in points]}


def describe_thresholds(thresholds) -> list[str]:
    """Each threshold as people read it: `0.7722`, `never` (above 1: the exit is off), and
    `all` for the last exit (it takes every sample left)."""
    last = len(thresholds) - 1
    return ["all" if t is None or k == last else "never" if t > 1 else f"{t:.4g}" for k, t in enumerate(thresholds)]
