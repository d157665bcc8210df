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
from edgeexit.runtime.onnxruntime_backend import DISABLED_OPTIMIZERS, make_session


# onnxruntime's type names of the fused graph's outputs (edgeexit.export.fused writes these)
_NUMPY = {"tensor(float)": np.float32, "tensor(int32)": np.int32, "tensor(int64)": np.int64}


class FusedCascade:
    """The fused cascade graph (a file, or its bytes already checked against the bundle's seal)
    at per-exit thresholds, one session call per input.

    A call's time cannot be split between the stages inside one graph call: `stage_seconds`
    counts each input's whole call at the exit it took. The graph writes its outputs into
    buffers bound once (onnxruntime's IOBinding), so a call makes no arrays of its own (one
    instance serves one caller at a time)."""

    name = "onnxruntime (fused cascade graph)"  # what `run` reports as its backend

    def __init__(self, graph: Path | bytes, input_name: str, thresholds: Sequence[float | None], stages: int,
                 threads: int | None = None, disabled_optimizers: Sequence[str] = DISABLED_OPTIMIZERS):
        self.session = make_session(graph, threads, disabled_optimizers=disabled_optimizers)
        self.stages, self.input_name = stages, input_name
        gates = gate_thresholds(thresholds, stages)[:-1]  # the last exit takes all: not a graph input
        self.thresholds = np.asarray(gates, dtype=np.float32)
        names = {i.name for i in self.session.get_inputs()}
        if names != {input_name, THRESHOLDS}:
            raise EdgeExitError(f"bundle: the fused cascade graph's inputs are {sorted(names)}, not "
                                f"{sorted({input_name, THRESHOLDS})}")
        self._binding = self.session.io_binding()
        self._binding.bind_cpu_input(THRESHOLDS, self.thresholds)
        outputs = {o.name: o for o in self.session.get_outputs()}
        self._outputs = []
        for name in OUTPUTS:  # one input per call: a symbolic batch dimension is 1
            out = np.empty([d if isinstance(d, int) else 1 for d in outputs[name].shape], _NUMPY[outputs[name].type])
            self._binding.bind_output(name, "cpu", 0, out.dtype, out.shape, out.ctypes.data)
            self._outputs.append(out)

    def __call__(self, x: np.ndarray, collect: bool = False) -> CascadeResult:
        """The cascade on a normalised batch `x`, one graph call per input."""
        return one_call_per_input(np.ascontiguousarray(x, np.float32), collect, self.stages, self._one)

    def _one(self, image: np.ndarray) -> list[np.ndarray]:
        """One input through the graph; its outputs land in the bound buffers (overwritten by the next call)."""
        self._binding.bind_cpu_input(self.input_name, image)
        self.session.run_with_iobinding(self._binding)
        return self._outputs

    def run_batched(self, x: np.ndarray, batch: int, collect: bool = False) -> CascadeResult:
        """As `Cascade.run_batched`: the fused graph takes one input per call whatever `batch` is."""
        return self(x, collect)


def one_call_per_input(x: np.ndarray, collect: bool, stages: int,
                       call: Callable[[np.ndarray], Sequence[np.ndarray]]) -> CascadeResult:
    """A fused cascade's results on a normalised batch `x`: `call` runs one input ([1, ...]) and
    returns its `OUTPUTS` (logits, conf, pred, exit), which may be buffers the next call
    overwrites; each call's time counts at the exit it took.

    It calls numpy as little as it can (seven times for one input; a slice is a call too):
    after a graph call numpy's code is out of the CPU's caches and each numpy function costs
    microseconds (MobileNetV3-Small at 224x224: 42 us per input when each call's outputs were
    gathered with numpy functions, 2.3% of the call)."""
    if collect:
        raise EdgeExitError("fused cascade: it returns only the exit taken; every exit's confidence needs the "
                            "staged cascade")
    n = len(x)
    if n == 0:
        raise EdgeExitError("input: empty batch")
    seconds, exits, outs = [0.0] * stages, [], []
    for i in range(n):
        one = x if n == 1 else x[i:i + 1]
        start = time.perf_counter()
        out = call(one)
        spent = time.perf_counter() - start
        k = out[3].item()
        seconds[k] += spent
        exits.append(k)
        outs.append((out[0].copy(), out[1].copy(), out[2].astype(np.int64)))
    logits, conf, pred = outs[0] if n == 1 else (np.concatenate(column) for column in zip(*outs))
    samples = [sum(k >= j for k in exits) for j in range(stages)]  # stage j ran for every input leaving at j or later
    return CascadeResult(pred, logits, conf, np.array(exits, np.int64), np.array(seconds), np.array(samples, np.int64))
