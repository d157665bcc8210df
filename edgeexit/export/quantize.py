"""Per-stage precision: INT8 (explicit Q/DQ) and FP16 versions of an exported fp32 stage graph.

Both conversions keep the stage boundary exactly as the fp32 graph has it: the carried
tensors, `logits` and `conf` stay float32 and `pred` int64, so a cascade can mix stages
of different precisions and the runtime never changes. TensorRT 10/11 builds engines
in the precision the graph states (explicit quantization, strongly typed networks), so
the graph is where precision is decided; onnxruntime CPU runs the same files for checks.

The exit maths stay float32 in both: the layer that produces the logits and everything
computed from them (softmax, confidence, argmax). The gating compares `conf` against
thresholds such as 0.95; rounding logits to 8 bits, or probabilities to fp16's 2^-11
steps near 1, would move samples across a threshold for no speed (the head is tiny).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      create_calibrator, quant_pre_process, quantize_static)

from edgeexit.errors import EdgeExitError

# Calibration method -> onnxruntime calibrator and its settings.
CALIBRATORS = {
    "minmax": (CalibrationMethod.MinMax, {}),
    "entropy": (CalibrationMethod.Entropy, {"num_bins": 2048, "num_quantized_bins": 128}),
    "percentile": (CalibrationMethod.Percentile, {"num_bins": 2048, "percentile": 99.999}),
}

# Weighted ops carry the int8 speed; Add is the residual join, whose inputs TensorRT
# wants quantized so it can fuse the add into the preceding convolution.
INT8_OP_TYPES = ("Conv", "Gemm", "MatMul", "Add")


def _load(path: str | Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise EdgeExitError(f"precision: {path} does not exist")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise EdgeExitError(f"precision: {path} is not an ONNX model: {exc}") from None


def _boundary(model: onnx.ModelProto) -> list[tuple[str, int]]:
    """(name, element type) of every graph input and output, in order."""
    return [(v.name, v.type.tensor_type.elem_type) for v in (*model.graph.input, *model.graph.output)]


def _exit_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The node producing the logits (third output from the end) and all its descendants."""
    if len(model.graph.output) < 3:
        raise EdgeExitError(f"precision: {model.graph.name} is not a stage graph "
                            "(its last outputs must be logits, conf, pred)")
    logits = model.graph.output[-3].name
    frontier, nodes = {logits}, []
    for node in model.graph.node:  # topological order: one pass reaches every descendant
        if logits in node.output or frontier.intersection(node.input):
            nodes.append(node)
            frontier.update(node.output)
    return nodes


def _image_convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Convs reading a graph input of at most 4 channels: the image (grey or RGB)."""
    image = {v.name for v in model.graph.input
             if len(v.type.tensor_type.shape.dim) > 1 and 0 < v.type.tensor_type.shape.dim[1].dim_value <= 4}
    return [n for n in model.graph.node if n.op_type == "Conv" and n.input[0] in image]


class _Samples(CalibrationDataReader):
    """onnxruntime's calibration interface over arrays, one sample per batch.

    One sample because onnxruntime's histogram calibrators (entropy, percentile) stack
    the batches' outputs and fail on a shorter last batch.
    """

    def __init__(self, arrays: dict[str, np.ndarray]):
        count = len(next(iter(arrays.values())))
        self.rest = ({name: a[i:i + 1] for name, a in arrays.items()} for i in range(count))

    def get_next(self):
        return next(self.rest, None)


def _publish(model: onnx.ModelProto, fp32: onnx.ModelProto, out_path: str | Path, what: str,
             same_boundary: bool = True) -> None:
    """Check the converted graph (and that its boundary is the fp32 one's), then write it in one rename."""
    onnx.checker.check_model(model, full_check=True)
    if same_boundary and _boundary(model) != _boundary(fp32):
        raise EdgeExitError(f"{what}: the converted graph's inputs/outputs {_boundary(model)} differ from "
                            f"the fp32 graph's {_boundary(fp32)}; stages could no longer be mixed")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.partial")
    onnx.save(model, str(partial))
    os.replace(partial, out_path)


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calibration: Iterable[dict[str, np.ndarray]],
                  method: str = "minmax", per_channel: bool = True) -> None:
    """Write an INT8 version of a stage graph with explicit, symmetric Q/DQ (TensorRT 8.5 to 11).

    `calibration` yields feed dicts for this graph (stage k gets the real tensors the
    fp32 stages before it carry). onnxruntime's quantizer does the work:
    `quant_pre_process` (shape inference only: its optimiser brings in onnxruntime's
    own opset domains), then `quantize_static` in QDQ format with int8 activations
    and weights, both symmetric (TensorRT accepts only zero-point 0), per-channel
    weights (`per_channel`), biases left float (TensorRT wants no int32 bias DequantizeLinear), Q/DQ
    pairs on the float weights (TensorRT 8.x) and a dedicated pair for every consumer
    (onnxruntime's documented setting for TensorRT).

    What is quantized: Conv, Gemm, MatMul (their inputs, weights and outputs) and Add
    (the residual join). Conv outputs carry Q/DQ too: onnxruntime CPU fuses a Conv into
    an integer kernel only as DQ->Conv->Q, and TensorRT accepts the pattern. Pooling,
    Relu and reshapes are left to TensorRT, which moves Q/DQ across them itself. Kept
    float: the exit head (the logits producer and the confidence maths after it, see
    the module docstring) and a Conv reading the image (at most 4 input channels): its
    reduction is a few taps deep, so int8 kernels gain nothing there (measured on
    onnxruntime CPU: the digits stage 0 is faster with it float) and first layers are
    the most sensitive to rounding.

    `method` calibrates the activation ranges: minmax, entropy (KL divergence, 2048 bins
    into 128, like TensorRT's entropy calibrator) or percentile (99.999%). onnxruntime's
    calibrator computes them (`create_calibrator`); they reach `quantize_static` as
    tensor overrides because `quantize_static` cannot pass bin counts to its own
    calibrator, and its fixed 128 bins make entropy identical to minmax.
    """
    if method not in CALIBRATORS:
        raise EdgeExitError(f"quantize: unknown calibration method {method!r}; use one of {', '.join(CALIBRATORS)}")
    fp32 = _load(fp32_path)
    feeds = list(calibration)
    wanted = {v.name for v in fp32.graph.input}
    if not feeds:
        raise EdgeExitError(f"quantize: no calibration data for {Path(fp32_path).name}")
    if any(set(f) != wanted for f in feeds):
        raise EdgeExitError(f"quantize: calibration feeds name {sorted(set(feeds[0]))}, but "
                            f"{Path(fp32_path).name} takes {sorted(wanted)}")
    arrays = {name: np.concatenate([np.asarray(f[name], np.float32) for f in feeds]) for name in wanted}

    with tempfile.TemporaryDirectory(prefix="edgeexit-int8-") as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_optimization=True)
        model = onnx.load(str(pre))
        for i, node in enumerate(model.graph.node):  # nodes_to_exclude works by name
            node.name = node.name or f"{node.op_type}_{i}"
        onnx.save(model, str(pre))
        kind, options = CALIBRATORS[method]
        calibrator = create_calibrator(pre, list(INT8_OP_TYPES), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=kind, extra_options={"symmetric": True, **options})
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress
            calibrator.collect_data(_Samples(arrays))
            ranges = calibrator.compute_data()
        overrides = {name: [{"rmin": np.float32(data.range_value[0]), "rmax": np.float32(data.range_value[1])}]
                     for name, data in ranges.items()}
        # quantize_static calibrates again before it reads the overrides; every range it
        # would compute is overridden, so one sample is enough.
        quantize_static(
            str(pre), str(out), _Samples({name: a[:1] for name, a in arrays.items()}), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(INT8_OP_TYPES), per_channel=per_channel, activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8, nodes_to_exclude=[n.name for n in _exit_nodes(model) + _image_convs(model)],
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                           "AddQDQPairToWeight": True, "DedicatedQDQPair": True, "TensorQuantOverrides": overrides},
        )
        quantized = onnx.load(str(out))
    problems = qdq_problems(quantized)
    if problems:
        raise EdgeExitError(f"quantize: {Path(fp32_path).name} quantized to a graph TensorRT rejects: {problems[0]}")
    if not any(n.op_type == "QuantizeLinear" for n in quantized.graph.node):
        raise EdgeExitError(f"quantize: {Path(fp32_path).name} has no {'/'.join(INT8_OP_TYPES)} "
                            "outside its exit head to quantize")
    _publish(quantized, fp32, out_path, "quantize")


def convert_fp16(fp32_path: str | Path, out_path: str | Path, keep_io_types: bool = True) -> None:
    """Write a strongly typed FP16 version of a stage graph (TensorRT 11 takes precision from it).

    Weights and activations become float16 with explicit Casts; `keep_io_types` keeps
    the stage boundary float32 so fp16 and other stages mix (without it the image and
    carried tensors are float16). The exit head (logits producer and confidence maths)
    stays float32, see the module docstring: the graph is cut where the head reads the
    body (onnx.utils.Extractor), only the body is converted, and the two are joined again
    (onnx.compose). The converter is onnxruntime's `transformers.float16`, the maintained
    copy of onnxconverter-common's (which mistypes graphs whose outputs also feed other
    nodes, as every stage's carry does); its block list is not used because it casts a
    blocked node's output back to float16 and names two Casts alike when blocked nodes
    share an input. Its Casts are appended out of order, so the body is sorted again.
    The result loads and runs on onnxruntime CPU.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    fp32 = _load(fp32_path)
    head = _exit_nodes(fp32)
    inside = {out for node in head for out in node.output} | {i.name for i in fp32.graph.initializer}
    cut = list(dict.fromkeys(i for node in head for i in node.input if i and i not in inside))
    outputs = [o.name for o in fp32.graph.output]
    extractor = onnx.utils.Extractor(fp32)
    body = extractor.extract_model([i.name for i in fp32.graph.input], list(dict.fromkeys(outputs[:-3] + cut)))
    body = OnnxModel(convert_float_to_float16(body, keep_io_types=True if keep_io_types else cut))
    body.topological_sort()
    exit_head = extractor.extract_model(cut, outputs[-3:])
    kept = [v for v in exit_head.graph.value_info if v.name not in cut]  # the body describes the cut tensors
    del exit_head.graph.value_info[:]
    exit_head.graph.value_info.extend(kept)
    joined = onnx.compose.merge_models(body.model, exit_head, io_map=[(name, name) for name in cut], outputs=outputs)
    _publish(joined, fp32, out_path, "fp16", same_boundary=keep_io_types)


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of initializer `name`, or None when the tensor is computed."""
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


def qdq_problems(path: str | Path | onnx.ModelProto) -> list[str]:
    """What in a Q/DQ graph TensorRT would reject or mis-handle; an empty list means none found.

    Checks: every QuantizeLinear/DequantizeLinear has an int8 zero-point initializer
    equal to 0 (scalar or per-channel; TensorRT supports symmetric int8 only) and a
    positive scale initializer; no DequantizeLinear reads int32 (a quantized bias); every
    DequantizeLinear of a constant weight reads it through a QuantizeLinear (TensorRT
    8.x wants Q/DQ pairs on float weights); no op outside the default ONNX domain.
    """
    model = path if isinstance(path, onnx.ModelProto) else _load(path)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    producer = {out: node for node in model.graph.node for out in node.output}
    problems = []
    for node in model.graph.node:
        label = f"{node.op_type} {node.name or node.output[0]}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{label}: domain {node.domain!r} is not standard ONNX")
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = _initializer(model, node.input[1])
        if scale is None or not np.all(scale > 0):
            problems.append(f"{label}: scale must be a positive initializer")
        zero = _initializer(model, node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero is None or zero.dtype != np.int8:
            problems.append(f"{label}: zero point must be an int8 initializer (got "
                            f"{'none' if zero is None else zero.dtype}); TensorRT quantizes to int8 only")
        elif np.any(zero != 0):
            problems.append(f"{label}: zero point must be 0 (symmetric); TensorRT rejects {zero.ravel()[:4]}")
        if node.op_type == "DequantizeLinear":
            if types.get(node.input[0]) == TensorProto.INT32:
                problems.append(f"{label}: dequantizes int32 (a quantized bias); keep biases float for TensorRT")
            elif node.input[0] not in producer and _initializer(model, node.input[0]) is not None:
                problems.append(f"{label}: constant weight without a QuantizeLinear before it "
                                "(TensorRT 8.x wants a Q/DQ pair)")
    return problems


def compare_precision(fp32_path: str | Path, other_path: str | Path,
                      feeds_list: Iterable[dict[str, np.ndarray]]) -> dict:
    """How far another precision's graph is from the fp32 one on the same feeds.

    Returns samples, max abs difference of logits and of conf, and the share of equal
    `pred` (outputs are located by the stage contract: logits, conf, pred come last).
    """
    from edgeexit.runtime.onnxruntime_backend import make_session

    ref, other = make_session(Path(fp32_path)), make_session(Path(other_path))
    names = [o.name for o in ref.get_outputs()][-3:]
    logits_diff = conf_diff = 0.0
    same = samples = 0
    for feeds in feeds_list:
        (l32, c32, p32), (lo, co, po) = ref.run(names, feeds), other.run(names, feeds)
        logits_diff = max(logits_diff, float(np.abs(l32 - lo).max()))
        conf_diff = max(conf_diff, float(np.abs(c32 - co).max()))
        same += int(np.sum(p32 == po))
        samples += len(p32)
    if not samples:
        raise EdgeExitError("compare: no feeds to compare on")
    return {"samples": samples, "logits_max_abs_diff": logits_diff, "conf_max_abs_diff": conf_diff,
            "pred_agreement": same / samples}
