"""Which ONNX operators TensorRT's ONNX parser takes, by TensorRT release: checked on the
exported stage graphs (every node, and the nodes inside `If`/`Loop`/`Scan` bodies) before a
bundle ships to a Jetson, so a graph JetPack 5's TensorRT 8.5 cannot parse is known on the
workstation, not at the first boot of a device.

The sets are the operators marked supported ("Y") in onnx-tensorrt's docs/operators.md at its
release/8.5-GA and 10.1-GA tags (reference data, copied as names only). Types and per-operator
restrictions listed there (e.g. Resize modes) are not checked here; TensorRT's own parser, on
the device, is the final word.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

_TRT85 = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool",
    "BatchNormalization", "Cast", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "ConvTranspose", "Cos", "Cosh", "CumSum", "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "Einsum",
    "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "GRU", "Gather", "GatherElements",
    "GatherND", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual",
    "GridSample", "HardSigmoid", "Identity", "If", "ImageScaler", "InstanceNormalization", "IsNaN", "LRN",
    "LSTM", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LpNormalization", "LpPool",
    "MatMul", "Max", "MaxPool", "Mean", "MeanVarianceNormalization", "Min", "Mul", "Neg", "NonMaxSuppression",
    "NonZero", "Not", "Or", "PRelu", "Pad", "ParametricSoftplus", "Pow", "QuantizeLinear", "RNN",
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1",
    "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd",
    "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RoiAlign", "Round",
    "ScaledTanh", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid",
    "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt",
    "Squeeze", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu",
    "Unsqueeze", "Upsample", "Where", "Xor",
})

_ADDED_IN_10 = frozenset({
    "CastLike", "DeformConv", "Gelu", "GroupNormalization", "HardSwish", "Hardmax", "IsInf", "LayerNormalization",
    "Mish", "Mod", "OneHot",
})
SUPPORTED = {"8.5": _TRT85, "10": _TRT85 | _ADDED_IN_10}  # 8.6 parses as 8.5 does, 10.x as 10.1


def _release(version: str) -> str:
    """The table that applies to a TensorRT version: 8.5 / 8.6 -> "8.5", 10.x and later -> "10"."""
    major = int(str(version).split(".")[0])
    if major < 8:
        raise ValueError(f"TensorRT {version}: older than 8.5, which edgeexit does not target")
    return "8.5" if major == 8 else "10"


def _subgraphs(node) -> Iterator[tuple[str, object]]:
    """(attribute name, graph) of a node's subgraphs: If's branches, Loop's and Scan's bodies."""
    for attr in node.attribute:
        for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            yield attr.name, graph


def _nodes(graph, where: str = "") -> Iterator[tuple[str, str]]:
    for node in graph.node:
        name = f"{where}{node.name or node.op_type}"
        yield name, node.op_type
        for attr, sub in _subgraphs(node):
            yield from _nodes(sub, f"{name}/{attr}/")


def unsupported(model_or_path, version: str) -> list[tuple[str, str]]:
    """(node, operator) of every node TensorRT `version`'s ONNX parser has no importer for,
    subgraphs included; [] when the graph parses as far as operators go."""
    import onnx

    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else \
        onnx.load(str(Path(model_or_path)), load_external_data=False)
    known = SUPPORTED[_release(version)]
    return [(name, op) for name, op in _nodes(model.graph) if op not in known]


# Element types an If may hand out of its branches (onnx-tensorrt's operators.md, If): FP32,
# FP16, INT32 and BOOL on 8.5; INT64 and BF16 too from 10.x.
_IF_TYPES = {"8.5": frozenset({"FLOAT", "FLOAT16", "INT32", "BOOL"})}
_IF_TYPES["10"] = _IF_TYPES["8.5"] | {"INT64", "BFLOAT16"}


def if_output_types(model_or_path, version: str) -> list[tuple[str, str]]:
    """(node, "output NAME is TYPE") for every `If` branch output of a type TensorRT `version`
    cannot carry out of a conditional, nested Ifs included; [] when all can."""
    import onnx

    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else \
        onnx.load(str(Path(model_or_path)), load_external_data=False)
    allowed, out = _IF_TYPES[_release(version)], []

    def visit(graph, where: str) -> None:
        for node in graph.node:
            name = f"{where}{node.name or node.op_type}"
            for attr, sub in _subgraphs(node):
                if node.op_type == "If":
                    for value in sub.output:
                        kind = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)
                        if kind not in allowed:
                            out.append((f"{name}/{attr}", f"output {value.name} is {kind}"))
                visit(sub, f"{name}/{attr}/")

    visit(model.graph, "")
    return out


def decompose_hardswish(model) -> int:
    """Rewrite every HardSwish node (MobileNetV3's activation; TensorRT 8.5's parser has no
    importer for it) as x * HardSigmoid(x, alpha=1/6, beta=0.5), ONNX's own definition of
    HardSwish, so one stage graph parses on TensorRT 8.5 and 10.x alike. Returns the count."""
    from onnx import NodeProto, helper

    def rewrite(graph) -> int:
        count, nodes = 0, []
        for node in graph.node:
            count += sum(rewrite(sub) for _attr, sub in _subgraphs(node))
            if node.op_type != "HardSwish":
                kept = NodeProto()
                kept.CopyFrom(node)
                nodes.append(kept)
                continue
            gate = f"{node.output[0]}_hardsigmoid"
            nodes += [helper.make_node("HardSigmoid", [node.input[0]], [gate], name=f"{node.name}_hardsigmoid",
                                       alpha=1.0 / 6.0, beta=0.5),
                      helper.make_node("Mul", [node.input[0], gate], list(node.output), name=f"{node.name}_mul")]
            count += 1
        del graph.node[:]
        graph.node.extend(nodes)
        return count

    return rewrite(model.graph)
