"""onnxruntime backend (CPU by default): tensors are host numpy arrays."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from edgeexit.errors import EdgeExitError
from edgeexit.runtime.backend import Backend
from edgeexit.stage_io import StageIO


# onnxruntime CPU fuses DQ->Conv->Q into an integer convolution only when the Q feeding it
# has one consumer. INT8 stage graphs carry a dedicated Q/DQ pair per consumer (what
# TensorRT wants too), but common subexpression elimination merges the pairs back and
# leaves shared residual inputs in float (int8 then runs 1.5-2.6x slower than fp32; see
# bench/precision.py). Disabling it does not change fp32 graphs' speed.
DISABLED_OPTIMIZERS = ("CommonSubexpressionElimination",)


def make_session(path: Path | bytes, threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",),
                 disabled_optimizers: Sequence[str] = DISABLED_OPTIMIZERS) -> ort.InferenceSession:
    """An InferenceSession with full graph optimisation (less `disabled_optimizers`, see above);
    `threads` caps intra-op threads."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no memory patterns (one planned block per run for every intermediate): tensors allocated
    # one by one from onnxruntime's arena reuse memory still in cache. Against patterns, at 1
    # thread: MobileNetV3-Small at 224x224 2-3% faster monolithic and 4.5% faster as the fused
    # cascade graph (whose `If` branches plan their own); ResNet-18's monolithic graph at batch 1
    # (its fused graph 1% faster) and the digits and CIFAR-size ones at batch 1, 8 and 32 within +-0.6%
    options.enable_mem_pattern = False
    options.log_severity_level = 3  # errors only: the per-node "not assigned" chatter is noise here
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), sess_options=options, providers=list(providers),
                                disabled_optimizers=list(disabled_optimizers))


def _checked_session(path: Path | bytes, io: StageIO, threads: int | None) -> ort.InferenceSession:
    """A session of one stage graph, refused in one line where onnxruntime cannot load it or its
    tensor names are not the ones the manifest gives."""
    name = f"stage {io.index}" if isinstance(path, bytes) else path.name
    try:
        session = make_session(path, threads)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's Fail / InvalidProtobuf / InvalidGraph
        raise EdgeExitError(f"bundle: onnxruntime cannot load {name}: {str(exc).splitlines()[0][:300]}") from None
    inputs = {i.name for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    missing = [n for n in io.inputs if n not in inputs] + [n for n in io.outputs if n not in outputs]
    if missing or len(inputs) != len(io.inputs):
        raise EdgeExitError(f"bundle: {name} does not have the tensors its manifest entry names "
                            f"({', '.join(missing) or 'extra inputs'})")
    return session


class OnnxRuntimeBackend(Backend):
    """One InferenceSession per stage graph (a file, or its bytes already checked against the bundle's seal)."""

    name = "onnxruntime"

    def __init__(self, paths: Sequence[Path | bytes], ios: Sequence[StageIO], threads: int | None = None):
        self.sessions = [_checked_session(p, io, threads) for p, io in zip(paths, ios)]
        self.names = [list(io.outputs) for io in ios]

    def upload(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array)

    def run(self, stage: int, feeds: dict[str, Any]) -> dict[str, Any]:
        names = self.names[stage]
        return dict(zip(names, self.sessions[stage].run(names, feeds)))

    def take(self, value: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return value[rows]

    def download(self, value: np.ndarray) -> np.ndarray:
        return value
