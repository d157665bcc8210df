"""Per-stage ONNX export: dynamic batch, onnxsim-simplified, checker-clean, parity-checked.

The TorchScript exporter (`dynamo=False`) at opset 17 is used because that is what
TensorRT 8.5 on JetPack 5 parses; the graphs are small and static apart from the batch.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxsim
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edgeexit.errors import EdgeExitError
from edgeexit.export.trt_ops import decompose_hardswish
from edgeexit.stage_io import StageIO
from edgeexit.staging import per_stage


PARITY_RTOL = 1e-5  # float32 reassociation (fused Conv+BN, other summation order) is ~1e-6 relative


@dataclass(frozen=True)
class ExportedGraph:
    """One exported graph with what the manifest records about it."""

    path: Path
    io: StageIO
    flops: int  # per sample, multiply-add = 2 FLOPs
    params: int
    parity: float  # max abs diff vs torch over the float outputs, on real inputs
    pred_agreement: float  # share of samples whose ONNX `pred` equals torch's


def count_flops(module: nn.Module, args: tuple[torch.Tensor, ...]) -> int:
    """FLOPs of one forward pass per sample (torch's own counter; batch divided out)."""
    # no_grad, not inference_mode: torch 2.1's FlopCounterMode counts nothing under inference_mode.
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args)
    return int(counter.get_total_flops() // max(1, args[0].shape[0]))


def activation_bytes(module: nn.Module, args: tuple[torch.Tensor, ...]) -> int:
    """Bytes of every intermediate tensor of one forward pass, per sample (an upper bound:
    an engine reuses memory). Used to check that a batch range fits a device's memory."""
    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    handles = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            module(*args)
    finally:
        for h in handles:
            h.remove()
    return total // max(1, args[0].shape[0])


def _export_kwargs() -> dict:
    # torch >= 2.5 defaults towards the dynamo exporter; ask for the TorchScript one by name.
    return {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}


def export_graph(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path,
                 input_names: tuple[str, ...], output_names: tuple[str, ...], opset: int) -> None:
    """Export `module` to `path` with a dynamic batch axis on every tensor, then simplify and check."""
    axes = {name: {0: "batch"} for name in (*input_names, *output_names)}
    try:
        with torch.inference_mode():
            torch.onnx.export(module, args, str(path), input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes=axes, opset_version=opset, do_constant_folding=True, **_export_kwargs())
    except Exception as exc:  # noqa: BLE001 - whatever the exporter raises, in one line naming the graph
        raise EdgeExitError(f"export: {path.stem}: torch.onnx.export failed{_culprit(exc, output_names)}") from None
    exported = onnx.load(str(path))
    got_in, got_out = [v.name for v in exported.graph.input], [v.name for v in exported.graph.output]
    for name in input_names:
        if name not in got_in:
            raise EdgeExitError(f"export: {path.stem}: input tensor {name} is not read by the graph (the exporter drops "
                                "unused inputs); the stage before must not carry it")
    if got_out != list(output_names):
        raise EdgeExitError(f"export: {path.stem}: outputs {got_out} are not {list(output_names)}")
    try:
        model, ok = onnxsim.simplify(exported)
    except Exception as exc:  # noqa: BLE001
        raise EdgeExitError(f"export: {path.stem}: onnxsim failed: {_one_line(exc)}") from None
    if not ok:
        raise EdgeExitError(f"export: {path.stem}: onnxsim could not validate the simplified {path.name}")
    decompose_hardswish(model)  # TensorRT 8.5 (JetPack 5) cannot parse HardSwish; parity below checks the maths
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _culprit(exc: BaseException, output_names: tuple[str, ...]) -> str:
    """What the exporter refused, said in edgeexit's terms where it can be: an operator with no
    ONNX symbolic, or outputs that are not one distinct tensor each (None, a number, a twin)."""
    text = str(exc)
    op = re.search(r"operator '?([\w:.]+)'? to ONNX opset version (\d+)", text)
    if op:
        return f": operator {op[1]} has no ONNX form at opset {op[2]} (export.opset, or replace the layer)"
    count = re.search(r"number of output names provided \((\d+)\) exceeded number of outputs \((\d+)\)", text)
    if count:
        return (f": it returns {count[2]} distinct tensors for {count[1]} output names ({', '.join(output_names)}); "
                "a carried value is None, not a tensor, or the same tensor twice")
    return f": {_one_line(exc)}"


def parity(path: Path, module: nn.Module, args: tuple[torch.Tensor, ...], input_names: tuple[str, ...],
           output_names: tuple[str, ...], atol: float, rtol: float) -> tuple[float, float, bool]:
    """(max abs diff of float outputs, share of equal `pred`, the first output beyond
    atol + rtol*|torch| or None).

    The relative term matters for badly scaled models (logits in the hundreds), where
    float32 rounding alone exceeds any fixed absolute tolerance.
    """
    from edgeexit.runtime.onnxruntime_backend import make_session

    with torch.inference_mode():
        expected = [t.numpy() for t in module(*args)]
    got = make_session(path).run(list(output_names), {n: a.numpy() for n, a in zip(input_names, args)})
    worst, agree, off = 0.0, 1.0, None
    for name, want, have in zip(output_names, expected, got):
        if np.issubdtype(want.dtype, np.integer):
            agree = float(np.mean(want == have))
        else:
            worst = max(worst, float(np.abs(want.astype(np.float64) - have).max()))
            if off is None and not np.allclose(have, want, rtol=rtol, atol=atol):
                off = name
    return worst, agree, off


def export_checked(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, io: StageIO,
                   opset: int, atol: float, rtol: float = PARITY_RTOL) -> ExportedGraph:
    """Export one graph and prove it: parity with torch on the given real inputs."""
    export_graph(module, args, path, io.inputs, io.outputs, opset)
    try:
        diff, agree, off = parity(path, module, args, io.inputs, io.outputs, atol, rtol)
    except Exception as exc:  # noqa: BLE001 - onnxruntime refusing the graph, in one line
        raise EdgeExitError(f"export: {path.stem}: onnxruntime cannot run {path.name}: {_one_line(exc)}") from None
    if off is not None:
        raise EdgeExitError(f"export: {path.stem}: tensor {off} differs from torch by up to {diff:.3g} "
                            f"(beyond export.parity_atol {atol:g} + {rtol:g} x |value|)")
    one = tuple(a[:1] for a in args)
    params = sum(p.numel() for p in module.parameters())
    return ExportedGraph(path, io, count_flops(module, one), params, diff, agree)


def export_stages(stages: list[nn.Module], ios: list[StageIO], x: torch.Tensor, out_dir: Path,
                  opset: int, atol: float, rtol: float = PARITY_RTOL) -> list[ExportedGraph]:
    """Export every stage to `out_dir/stage{k}.onnx`, each checked on the real carry of `x`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return per_stage(stages, x, lambda k, stage, carry: export_checked(
        stage, carry, out_dir / f"stage{k}.onnx", ios[k], opset, atol, rtol))
