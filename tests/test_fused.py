"""The fused cascade graph (stages/cascade.onnx): one graph, one call per input, the exit
decided inside it; it must agree with the staged cascade sample by sample, take its
thresholds at run time, and stay inside TensorRT's ONNX support, If branches included."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import example_raw, reseal
from edgeexit.cli import main
from edgeexit.errors import EdgeExitError, SpecError
from edgeexit.export.fused import CASCADE, OUTPUTS, THRESHOLDS, fuse
from edgeexit.export.trt_ops import if_output_types, unsupported
from edgeexit.runtime.cascade import NEVER, Cascade
from edgeexit.runtime.fused import FusedCascade
from edgeexit.runtime.loader import open_backend
from edgeexit.spec import parse_spec
from edgeexit.tracing import split_inputs


def staged_and_fused(bundle, thresholds):
    x, _ = split_inputs(bundle, "test")
    staged = Cascade(open_backend(bundle, "onnxruntime", threads=1), bundle.stage_ios, thresholds).run_batched(x, 1)
    fused = FusedCascade(bundle.fused_path, bundle.input["name"], thresholds, len(bundle.stage_ios), 1)(x)
    return staged, fused


def test_the_build_composes_checks_and_records_the_fused_graph(example_build):
    bundle, report = example_build
    record = bundle.manifest["fused"]
    assert record["onnx"] == CASCADE and CASCADE in bundle.manifest["files"]
    for check in record["agreement"].values():  # every test sample, at the thresholds and at full depth
        assert check["samples"] == report["samples"] and check["exit_differs"] == check["pred_differs"] == 0
    assert isinstance(record["use_at_batch_1"], bool) and record["why"]
    assert {"fused", "fused_full_depth", "fused_ratio"} <= set(report["latency_ms"])
    model = onnx.load(str(bundle.fused_path))
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert inputs == {"image": [1, 1, 8, 8], THRESHOLDS: [2]}  # one sample; the thresholds are data, not constants
    assert [o.name for o in model.graph.output] == list(OUTPUTS)
    top = [n.op_type for n in model.graph.node]
    assert top.count("If") == 1  # nested: exit 0, else stage 1 and the next If
    assert "ArgMax" not in top  # exit 0's class index: computed only by the branch leaving there
    leave = next(n for n in model.graph.node if n.op_type == "If").attribute
    assert "ArgMax" in [n.op_type for a in leave if a.name == "then_branch" for n in a.g.node]


@pytest.mark.parametrize("thresholds", [[0.95, 0.9, None], [0.5, 0.99, None], [NEVER, NEVER, None],
                                        [-NEVER, 0.5, None]])
def test_fused_and_staged_cascades_agree_on_every_test_sample(example_build, thresholds):
    staged, fused = staged_and_fused(example_build[0], thresholds)
    np.testing.assert_array_equal(fused.exit, staged.exit)
    np.testing.assert_array_equal(fused.pred, staged.pred)
    np.testing.assert_allclose(fused.logits, staged.logits, atol=1e-5)
    np.testing.assert_allclose(fused.conf, staged.conf, atol=1e-6)
    assert fused.stage_samples.tolist() == staged.stage_samples.tolist()


def test_thresholds_are_runtime_inputs(example_build):
    bundle = example_build[0]
    x, _ = split_inputs(bundle, "test")
    run = lambda t: FusedCascade(bundle.fused_path, "image", t, 3)(x[:20]).exit  # noqa: E731
    assert (run([-NEVER, -NEVER, None]) == 0).all() and (run([NEVER, NEVER, None]) == 2).all()
    assert (run([NEVER, -NEVER, None]) == 1).all()
    with pytest.raises(EdgeExitError, match="every exit's confidence"):
        FusedCascade(bundle.fused_path, "image", [0.9, 0.9, None], 3)(x[:2], collect=True)
    with pytest.raises(EdgeExitError, match="3 exits|2 values"):
        FusedCascade(bundle.fused_path, "image", [0.9, None], 3)


def test_one_input_at_a_time_is_the_batch_and_default_optimizers_run_it_alike(example_build):
    """A batch of one (the path `run` takes for one input) gives the rows of a whole batch's
    result; a session with onnxruntime's default optimizers (bench/precision.py's) answers alike."""
    bundle = example_build[0]
    x = split_inputs(bundle, "test")[0][:12]
    whole = FusedCascade(bundle.fused_path, "image", [0.9, 0.8, None], 3)(x)
    default = FusedCascade(bundle.fused_path, "image", [0.9, 0.8, None], 3, disabled_optimizers=())
    for i in range(len(x)):
        one = default(x[i:i + 1])
        assert one.pred.dtype == one.exit.dtype == np.int64 and one.logits.shape == (1, whole.logits.shape[1])
        assert (one.exit[0], one.pred[0]) == (whole.exit[i], whole.pred[i])
        np.testing.assert_allclose(one.logits[0], whole.logits[i], atol=1e-6)
        assert one.stage_samples.tolist() == [1 if k <= whole.exit[i] else 0 for k in range(3)]
    assert whole.stage_samples[0] == 12 and whole.stage_seconds.sum() > 0


def test_the_fused_graph_is_inside_tensorrt_support_if_branches_included(example_build):
    path = example_build[0].fused_path
    for version in ("8.5.2.2", "8.6.2.3", "10.3.0.26"):
        assert unsupported(path, version) == [] and if_output_types(path, version) == []


def test_if_outputs_tensorrt_85_cannot_carry_are_named():
    then = helper.make_graph([helper.make_node("Constant", [], ["a"], value=helper.make_tensor("v", TensorProto.INT64,
                                                                                                [1], [1]))],
                             "then", [], [helper.make_tensor_value_info("a", TensorProto.INT64, [1])])
    other = helper.make_graph([helper.make_node("Constant", [], ["b"], value=helper.make_tensor("w", TensorProto.INT64,
                                                                                                 [1], [2]))],
                              "else", [], [helper.make_tensor_value_info("b", TensorProto.INT64, [1])])
    node = helper.make_node("If", ["c"], ["y"], name="pick", then_branch=then, else_branch=other)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [1])])
    model = helper.make_model(graph)
    assert sorted(if_output_types(model, "8.5.2.2")) == [("pick/else_branch", "output b is INT64"),
                                                         ("pick/then_branch", "output a is INT64")]
    assert if_output_types(model, "10.3.0.26") == []
    with pytest.raises(EdgeExitError, match="two or more stages"):
        fuse([model], [], 10)


def test_run_uses_the_fused_graph_for_one_input_where_the_bundle_says_and_says_when_it_cannot(
        bundle_copy, digits_raw, tmp_path, capsys):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["fused"]["use_at_batch_1"] = True
    reseal(bundle_copy, manifest)
    np.save(tmp_path / "one.npy", digits_raw[0][-1:])
    np.save(tmp_path / "many.npy", digits_raw[0][-5:])
    run = ["run", str(bundle_copy), "--json"]
    assert main(run + ["--input", str(tmp_path / "one.npy")]) == 0
    out, err = capsys.readouterr()
    fused = json.loads(out)
    assert fused["backend"] == FusedCascade.name and "not used" not in err
    assert main(run + ["--input", str(tmp_path / "one.npy"), "--backend", "torch"]) == 0  # the reference: staged
    out, err = capsys.readouterr()
    staged = json.loads(out)
    assert "fused cascade graph not used (the torch backend runs the stage graphs)" in err
    assert staged["samples"][0]["exit"] == fused["samples"][0]["exit"]
    assert staged["samples"][0]["class"] == fused["samples"][0]["class"]
    assert main(run + ["--input", str(tmp_path / "many.npy")]) == 0  # a batch: the staged loop, nothing to say
    out, err = capsys.readouterr()
    assert json.loads(out)["backend"] == "onnxruntime" and "fused" not in err
    manifest["fused"].update(use_at_batch_1=False, why="no faster than the staged loop here")
    reseal(bundle_copy, manifest)
    assert main(run + ["--input", str(tmp_path / "one.npy")]) == 0
    assert "its build found it no faster than the staged loop here" in capsys.readouterr().err


def test_export_fused_is_auto_on_or_off(tmp_path):
    def fused(value=None):
        raw = example_raw()
        if value is not None:
            raw["export"] = {**raw.get("export", {}), "fused": value}
        return parse_spec(raw, tmp_path, source=tmp_path / "model.yaml").export.fused

    assert (fused(), fused(False), fused(True), fused("on")) == ("auto", "off", "on", "on")
    with pytest.raises(SpecError, match="export.fused"):
        fused("sometimes")


@pytest.mark.parametrize("opset", [13, 17, 18, 20])
def test_the_fused_graph_is_valid_at_every_opset_the_spec_allows(opset, tmp_path):
    """`export.opset` takes 13 to 21 (torch exports up to 20); from 18 on a Split needs its
    sizes (or `num_outputs`, which 13 to 17 do not know): the fused graph passes onnx's full
    check and agrees with its stages, stage graphs exported at that opset."""
    import torch

    from edgeexit.export.fused import write_fused
    from edgeexit.export.onnx import export_stages
    from edgeexit.models import build_model
    from edgeexit.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from edgeexit.staging import make_stages, stage_io

    spec = parse_spec(example_raw(), tmp_path)
    torch.manual_seed(0)
    model = build_model(spec.model, spec.input, spec.base_dir).eval()
    x = torch.randn(4, *spec.input.shape)
    stages = make_stages(model, spec.gating.confidence)
    ios = stage_io(stages, x, spec.input.name)
    graphs = export_stages(stages, ios, x, tmp_path / "stages", opset, 1e-4)
    path = write_fused([g.path for g in graphs], ios, len(spec.input.classes), tmp_path / "cascade.onnx")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    backend = OnnxRuntimeBackend([g.path for g in graphs], ios, 1)
    thresholds = [0.3, 0.5, None]
    staged = Cascade(backend, ios, thresholds).run_batched(x.numpy(), 1)
    fused = FusedCascade(path, spec.input.name, thresholds, len(ios), 1)(x.numpy())
    assert fused.exit.tolist() == staged.exit.tolist() and fused.pred.tolist() == staged.pred.tolist()
