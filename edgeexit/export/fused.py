"""The fused cascade graph: every stage and every exit decision in one ONNX graph, for batch 1.

Stage 0 runs; `If(conf_0 >= thresholds[0])` returns exit 0's outputs, else runs stage 1 and
the next `If`, and so on; the last stage's branch returns its exit. One session call per input
instead of one per stage (and no Python between stages): onnxruntime runs only the branch
taken, and TensorRT's ONNX parser turns each `If` into an `IIfConditional` (its one-element
condition made a scalar). Before its decision a stage runs only what its confidence and
carried tensors need; what only its other outputs need (the class index) runs in the branch
leaving there.

- The thresholds are a graph input (`thresholds`, float32 [K-1]: runtime data, never
  constants), so recalibrating or switching operating points needs no new graph; +inf never
  leaves, -inf always does.
- The outputs are the exit taken's `logits` [1, C], `conf` [1], `pred` [1] and the `exit`
  index [1]; `pred` and `exit` are int32, the widest integer TensorRT 8.5 lets out of an `If`.
- The graph is checked by onnx and simplified by onnxsim (the thresholds stay an input). The
  stage graphs are composed as they are (already simplified and parity-checked), each
  stage's internal names prefixed `s<k>/`, and each stage's weights in the branch that runs it
  (onnxruntime pre-packs a subgraph's own initializers, not those it reads from outside).
- The input's batch dimension is fixed at 1: the condition is one sample's decision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper

from edgeexit.errors import EdgeExitError
from edgeexit.stage_io import StageIO

CASCADE = "stages/cascade.onnx"  # where a bundle keeps it
THRESHOLDS = "thresholds"
OUTPUTS = ("logits", "conf", "pred", "exit")


def _renamed(source: onnx.ModelProto, k: int) -> onnx.GraphProto:
    """Stage k's graph with its internal names prefixed (its inputs and outputs keep theirs,
    which the manifest names and which are unique across stages)."""
    model = onnx.ModelProto()
    model.CopyFrom(source)
    ends = {v.name for v in (*model.graph.input, *model.graph.output)}
    kept = [v for v in model.graph.value_info if v.name not in ends]  # onnx would rename those too
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    return compose.add_prefix(model, f"s{k}/", rename_inputs=False, rename_outputs=False).graph


def _exit_nodes(io: StageIO, names: Sequence[str]) -> list[onnx.NodeProto]:
    """Nodes giving exit `io.index`'s outputs under `names` (stage outputs from an enclosing scope)."""
    exit_index = numpy_helper.from_array(np.array([io.index], np.int32), f"{names[3]}_value")
    return [helper.make_node("Identity", [io.logits], [names[0]]),
            helper.make_node("Identity", [io.conf], [names[1]]),
            helper.make_node("Cast", [io.pred], [names[2]], to=TensorProto.INT32),
            helper.make_node("Constant", [], [names[3]], value=exit_index)]


def _outputs(names: Sequence[str], classes: int) -> list[onnx.ValueInfoProto]:
    types = (TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT32)
    shapes = ([1, classes], [1], [1], [1])
    return [helper.make_tensor_value_info(n, t, s) for n, t, s in zip(names, types, shapes)]


def _eager_and_lazy(graph: onnx.GraphProto, io: StageIO) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
    """Stage `io.index`'s nodes split in two: those its confidence and carried tensors need,
    which run before its decision, and those only its other exit outputs need (the class
    index, say), which only the branch leaving there runs."""
    needed, eager = {io.conf, *io.carry}, set()
    for i in reversed(range(len(graph.node))):
        if needed.intersection(graph.node[i].output):
            eager.add(i)
            needed.update(graph.node[i].input)
    return ([n for i, n in enumerate(graph.node) if i in eager],
            [n for i, n in enumerate(graph.node) if i not in eager])


def _decision(graphs: list[onnx.GraphProto], parts: list[tuple[list, list]], ios: Sequence[StageIO], k: int,
              classes: int, out: Sequence[str]) -> list[onnx.NodeProto]:
    """Nodes after stage k's eager part: leave at exit k when its confidence (one element)
    reaches thresholds[k], else run the stages after it (recursively); the last exit takes
    everything left."""
    io = ios[k]
    if k == len(ios) - 1:
        return parts[k][1] + _exit_nodes(io, out)
    leave, deeper = [f"exit{k}_{o}" for o in OUTPUTS], [f"if{k + 1}_{o}" for o in OUTPUTS]
    then_branch = helper.make_graph(parts[k][1] + _exit_nodes(io, leave), f"exit{k}", [], _outputs(leave, classes))
    rest = graphs[k + 1]
    else_branch = helper.make_graph(parts[k + 1][0] + _decision(graphs, parts, ios, k + 1, classes, deeper),
                                    f"after_exit{k}", [], _outputs(deeper, classes),
                                    initializer=list(rest.initializer), value_info=list(rest.value_info))
    return [helper.make_node("GreaterOrEqual", [io.conf, f"{THRESHOLDS}_{k}"], [f"decide{k}_leave"]),
            helper.make_node("If", [f"decide{k}_leave"], list(out), name=f"exit{k}_or_deeper",
                             then_branch=then_branch, else_branch=else_branch)]


def fuse(stages: Sequence[onnx.ModelProto], ios: Sequence[StageIO], classes: int) -> onnx.ModelProto:
    """The fused cascade graph of a bundle's stage graphs (in stage order), checked by onnx and
    simplified by onnxsim."""
    if len(stages) != len(ios) or len(ios) < 2:
        raise EdgeExitError(f"fused cascade: needs the graphs of two or more stages, got {len(stages)}")
    graphs = [_renamed(m, k) for k, m in enumerate(stages)]
    first = graphs[0]
    image = onnx.ValueInfoProto()
    image.CopyFrom(next(i for i in first.input if i.name == ios[0].inputs[0]))
    image.type.tensor_type.shape.dim[0].Clear()
    image.type.tensor_type.shape.dim[0].dim_value = 1
    thresholds = helper.make_tensor_value_info(THRESHOLDS, TensorProto.FLOAT, [len(ios) - 1])
    parts = [_eager_and_lazy(g, io) for g, io in zip(graphs, ios)]
    # one threshold per output; the sizes as an input, as opsets 13 to 21 all read them (18 on
    # refuses a Split given neither them nor `num_outputs`, which 13 to 17 do not know)
    sizes = numpy_helper.from_array(np.ones(len(ios) - 1, np.int64), f"{THRESHOLDS}_sizes")
    split = helper.make_node("Split", [THRESHOLDS, sizes.name], [f"{THRESHOLDS}_{k}" for k in range(len(ios) - 1)],
                             axis=0)
    nodes = [split] + parts[0][0] + _decision(graphs, parts, ios, 0, classes, OUTPUTS)
    graph = helper.make_graph(nodes, "edgeexit_cascade", [image, thresholds], _outputs(OUTPUTS, classes),
                              initializer=list(first.initializer) + [sizes], value_info=list(first.value_info))
    opset = max(op.version for m in stages for op in m.opset_import if op.domain in ("", "ai.onnx"))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="edgeexit", ir_version=stages[0].ir_version)
    import onnxsim  # the build extra's: the runtime reads OUTPUTS and THRESHOLDS here, and never fuses

    try:
        onnx.checker.check_model(model)
        simplified, ok = onnxsim.simplify(model)
    except Exception as exc:  # noqa: BLE001 - onnx's ValidationError, onnxsim's RuntimeError
        raise EdgeExitError(f"fused cascade: the composed graph fails its checks: {str(exc).splitlines()[0]}") from None
    if not ok or [i.name for i in simplified.graph.input] != [i.name for i in model.graph.input]:
        raise EdgeExitError("fused cascade: onnxsim could not validate the simplified graph")
    return simplified


def write_fused(stage_paths: Sequence[Path], ios: Sequence[StageIO], classes: int, out: Path) -> Path:
    """Compose the stage graph files into `out` (the caller checks it against the stages)."""
    model = fuse([onnx.load(str(p)) for p in stage_paths], ios, classes)
    onnx.save(model, str(out))
    return out


def agreement(fused, staged) -> dict[str, float | int]:
    """How the fused graph's results (`CascadeResult`) match the staged cascade's on the same
    inputs: samples with another exit or class, and the largest logit difference."""
    return {"samples": int(len(staged.exit)), "exit_differs": int(np.count_nonzero(fused.exit != staged.exit)),
            "pred_differs": int(np.count_nonzero(fused.pred != staged.pred)),
            "logits_max_abs_diff": float(np.abs(fused.logits - staged.logits).max())}
