"""Latency measurement shared by the build summary and the benchmarks.

Runners are timed interleaved, sample by sample, in one process, so machine noise and
frequency drift hit every runner alike; a ratio of two runners from one call is the
number to trust, not either absolute time.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

Runner = Callable[[np.ndarray], Any]


def per_sample_latency(runners: dict[str, Runner], x: np.ndarray, rounds: int = 3, warmup: int = 20) -> dict[str, float]:
    """Mean seconds per sample at batch 1 for each runner over the samples of `x`.

    Each round visits every sample once and calls every runner on it (the runner order
    rotates per round); the reported figure is each runner's fastest round, the usual
    way to read a noisy machine.
    """
    names = list(runners)
    for i in range(warmup):
        for name in names:
            runners[name](x[i % len(x):i % len(x) + 1])
    best = {name: float("inf") for name in names}
    for r in range(rounds):
        spent = dict.fromkeys(names, 0.0)
        order = names[r % len(names):] + names[:r % len(names)]
        for i in range(len(x)):
            sample = x[i:i + 1]
            for name in order:
                start = time.perf_counter()
                runners[name](sample)
                spent[name] += time.perf_counter() - start
        for name in names:
            best[name] = min(best[name], spent[name] / len(x))
    return best
