"""Anytime prediction replayed on traces: the accuracy an input gets under a deadline (numpy only).

Every input is one call at batch 1 with a deadline. A call leaving at exit k is priced as
the runtime prices it (`latency.Deadlines.exit_seconds()[k]`, a call's tail); under deadline D the deepest exit whose call fits is
k(D) (exit 0 always runs: below its cost every answer is late). Pure anytime answers from
k(D); with thresholds, an input answers from the exit the gating chose, or from k(D) when that
one does not fit (cut off).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from calibration.gating import exits_taken
from calibration.traces import Traces


def anytime_curve(traces: Traces, exit_seconds: Sequence[float], thresholds: Sequence[float | None],
                  deadlines: Sequence[float]) -> list[dict[str, Any]]:
    """Per deadline (seconds): pure-anytime accuracy, the thresholds' accuracy under it, the
    share of inputs the deadline cut off, and whether even exit 0 is late."""
    cost = np.asarray(exit_seconds, dtype=np.float64)
    n = np.arange(len(traces))
    gated = exits_taken(traces.conf, [np.inf if t is None else t for t in thresholds[:-1]] + [None])
    rows = []
    for deadline in deadlines:
        fits = np.flatnonzero(cost <= deadline)
        deepest = int(fits[-1]) if len(fits) else 0
        taken = np.minimum(gated, deepest)
        rows.append({"deadline_ms": float(deadline) * 1e3, "deepest_exit": deepest, "late": not len(fits),
                     "anytime_accuracy": float(traces.correct[:, deepest].mean()),
                     "accuracy": float(traces.correct[n, taken].mean()),
                     "cut_off": float(np.mean(gated > deepest))})
    return rows


def deadline_grid(exit_seconds: Sequence[float]) -> list[float]:
    """Deadlines worth showing: each exit's call cost (where the answer deepens) and halfway to the next."""
    cost = np.asarray(exit_seconds, dtype=np.float64)
    mids = (cost[:-1] + cost[1:]) / 2
    return sorted({*cost.tolist(), *mids.tolist(), float(cost[-1] * 1.25)})


def format_anytime(rows: Sequence[dict[str, Any]], split: str) -> list[str]:
    """The anytime table `calibrate` and `profile` print (rows of `anytime_curve`)."""
    lines = [f"anytime (run --deadline-ms): one input per call; the deepest exit whose call fits the deadline "
             f"(a call's tail in the profile, as the runtime prices it), on {split}",
             f"{'deadline ms':>11}  {'exit':>4}  {'anytime acc':>11}  {'thresholds acc':>14}  {'cut off':>7}"]
    for row in rows:
        lines.append(f"{row['deadline_ms']:>11.4f}  {row['deepest_exit']:>4}  {row['anytime_accuracy']:>11.2%}  "
                     f"{row['accuracy']:>14.2%}  {row['cut_off']:>7.1%}"
                     + ("  (late: exit 0 does not fit)" if row["late"] else ""))
    return lines
