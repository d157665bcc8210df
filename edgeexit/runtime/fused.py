"""The fused cascade graph at run time: one onnxruntime call per input, gating inside the graph.

`edgeexit.export.fused` builds `stages/cascade.onnx`; this runs it with the same interface
as `Cascade` (a `CascadeResult` per call), so `run` and the benches swap one for the other
at batch 1. What it cannot do, the staged loop does: batches (one graph call decides for one
sample), exit policies (a trained rule, not a threshold), deadlines (a graph cannot stop on
a clock between its stages) and every exit's confidence (`collect`, for traces).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edgeexit.errors import EdgeExitError
from edgeexit.export.fused import OUTPUTS, THRESHOLDS
from edgeexit.runtime.cascade import CascadeResult, gate_thresholds
from edgeexit.runtime.onnxruntime_backend import make_session


class FusedCascade:
    """The fused cascade graph (a file, or its bytes already checked against the bundle's seal)
    at per-exit thresholds, one session call per input.

    A call's time cannot be split between the stages inside one graph call: `stage_seconds`
    counts each input's whole call at the exit it took."""

    name = "onnxruntime (fused cascade graph)"  # what `run` reports as its backend

    def __init__(self, graph: Path | bytes, input_name: str, thresholds: Sequence[float | None], stages: int,
                 threads: int | None = None):
        self.session = make_session(graph, threads)
        self.stages, self.input_name = stages, input_name
        gates = gate_thresholds(thresholds, stages)[:-1]  # the last exit takes all: not a graph input
        self.thresholds = np.asarray(gates, dtype=np.float32)
        names = {i.name for i in self.session.get_inputs()}
        if names != {input_name, THRESHOLDS}:
            raise EdgeExitError(f"bundle: the fused cascade graph's inputs are {sorted(names)}, not "
                                f"{sorted({input_name, THRESHOLDS})}")

    def __call__(self, x: np.ndarray, collect: bool = False) -> CascadeResult:
        """The cascade on a normalised batch `x`, one graph call per input."""
        feeds = {THRESHOLDS: self.thresholds}
        return one_call_per_input(x, collect, self.stages,
                                  lambda one: self.session.run(OUTPUTS, {**feeds, self.input_name: one}))

    def run_batched(self, x: np.ndarray, batch: int, collect: bool = False) -> CascadeResult:
        """As `Cascade.run_batched`: the fused graph takes one input per call whatever `batch` is."""
        return self(x, collect)


def one_call_per_input(x: np.ndarray, collect: bool, stages: int,
                       call: Callable[[np.ndarray], Sequence[np.ndarray]]) -> CascadeResult:
    """A fused cascade's results on a normalised batch `x`: `call` runs one input ([1, ...]) and
    returns its `OUTPUTS` (logits, conf, pred, exit); each call's time counts at the exit it took."""
    if collect:
        raise EdgeExitError("fused cascade: it returns only the exit taken; every exit's confidence needs the "
                            "staged cascade")
    n = len(x)
    if n == 0:
        raise EdgeExitError("input: empty batch")
    logits, conf, pred, exits = [], np.zeros(n, np.float32), np.zeros(n, np.int64), np.zeros(n, np.int64)
    seconds = np.zeros(stages)
    for i in range(n):
        start = time.perf_counter()
        out = call(x[i:i + 1])
        k = int(np.ravel(out[3])[0])
        seconds[k] += time.perf_counter() - start
        logits.append(np.asarray(out[0], np.float32))
        conf[i], pred[i], exits[i] = np.ravel(out[1])[0], np.ravel(out[2])[0], k
    samples = np.array([np.count_nonzero(exits >= k) for k in range(stages)], np.int64)
    return CascadeResult(pred, np.concatenate(logits), conf, exits, seconds, samples)
