"""INT8 and FP16 stage graphs: TensorRT-ready Q/DQ, an unchanged stage boundary, agreement on real digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeexit.errors import EdgeExitError
from edgeexit.export.quantize import CALIBRATORS, compare_precision, convert_fp16, qdq_problems, quantize_int8
from edgeexit.runtime.onnxruntime_backend import make_session

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits" / "model.yaml"


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory):
    """The shipped example built by the CLI (fp32 stages)."""
    from edgeexit.bundle import load_bundle
    from edgeexit.cli import main

    out = tmp_path_factory.mktemp("precision") / "bundle"
    assert main(["build", str(EXAMPLE), "--out", str(out), "--quiet"]) == 0
    return load_bundle(out)


@pytest.fixture(scope="session")
def stage_feeds(digits_bundle):
    """Per split, each stage's real fp32 inputs: the normalised images, then the carry before it."""
    from edgeexit.data import load_dataset, normalize
    from edgeexit.spec import load_spec

    data = load_dataset(load_spec(EXAMPLE))
    feeds = {}
    for split in ("calibration", "test"):
        x = normalize(getattr(data, split).x, digits_bundle.input["mean"], digits_bundle.input["std"])
        current, per_stage = {digits_bundle.input["name"]: x}, []
        for path, io in zip(digits_bundle.stage_paths, digits_bundle.stage_ios):
            per_stage.append(current)
            current = dict(zip(io.carry, make_session(path).run(list(io.carry), current))) if io.carry else {}
        feeds[split] = per_stage
    return feeds


@pytest.fixture(scope="session")
def int8_stages(digits_bundle, stage_feeds, tmp_path_factory):
    """Every stage quantized (minmax), calibrated on its own real inputs."""
    out = tmp_path_factory.mktemp("int8")
    paths = []
    for k, path in enumerate(digits_bundle.stage_paths):
        # calibration arrives in uneven batches, as a data loader gives it
        cal = stage_feeds["calibration"][k]
        batches = [{n: a[i:i + 64] for n, a in cal.items()} for i in range(0, len(next(iter(cal.values()))), 64)]
        quantize_int8(path, out / f"stage{k}.onnx", batches)
        paths.append(out / f"stage{k}.onnx")
    return paths


@pytest.fixture(scope="session")
def fp16_stages(digits_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16")
    for k, path in enumerate(digits_bundle.stage_paths):
        convert_fp16(path, out / f"stage{k}.onnx")
    return [out / f"stage{k}.onnx" for k in range(len(digits_bundle.stage_paths))]


def boundary(path):
    model = onnx.load(str(path))
    return [(v.name, v.type.tensor_type.elem_type) for v in (*model.graph.input, *model.graph.output)]


def initializers(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_int8_qdq_structure_is_what_tensorrt_takes(int8_stages):
    for path in int8_stages:
        model = onnx.load(str(path))
        assert qdq_problems(path) == []
        inits = initializers(model)
        producer = {out: n for n in model.graph.node for out in n.output}
        qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert qdq, f"{path.name} has no Q/DQ"
        for node in qdq:
            zero = inits[node.input[2]]
            assert zero.dtype == np.int8 and not zero.any(), f"{node.name}: zero point {zero}"
            if node.op_type == "DequantizeLinear" and node.input[0] in inits:
                assert inits[node.input[0]].dtype != np.int32, f"{node.name} dequantizes an int32 bias"
        quantized_weights = 0
        for node in model.graph.node:
            if node.op_type in ("Conv", "Gemm") and node.input[1] in producer:
                dq = producer[node.input[1]]
                q = producer[dq.input[0]]  # a Q/DQ pair on the float weight, not a stored int8 weight
                assert (dq.op_type, q.op_type) == ("DequantizeLinear", "QuantizeLinear")
                assert inits[q.input[0]].dtype == np.float32
                assert len(node.input) < 3 or node.input[2] in inits and inits[node.input[2]].dtype == np.float32
                quantized_weights += 1
        assert quantized_weights >= 2
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)


def test_int8_keeps_the_exit_head_and_the_boundary_float(digits_bundle, int8_stages):
    for fp32, int8 in zip(digits_bundle.stage_paths, int8_stages):
        assert boundary(int8) == boundary(fp32)
        model = onnx.load(str(int8))
        producer = {out: n for n in model.graph.node for out in n.output}
        logits = model.graph.output[-3].name
        assert producer[logits].op_type == "Gemm"
        assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear"
                   for i in producer[logits].input), "the classifier reads dequantized int8"


def test_int8_stages_agree_with_fp32_on_real_carried_inputs(digits_bundle, stage_feeds, int8_stages):
    for k, (fp32, int8) in enumerate(zip(digits_bundle.stage_paths, int8_stages)):
        report = compare_precision(fp32, int8, [stage_feeds["test"][k]])
        assert report["samples"] == len(next(iter(stage_feeds["test"][0].values())))
        assert report["pred_agreement"] >= 0.95, (k, report)
        assert report["conf_max_abs_diff"] < 0.5, (k, report)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(CALIBRATORS))
def test_every_calibration_method_gives_a_valid_close_graph(method, digits_bundle, stage_feeds, int8_stages, tmp_path):
    fp32 = digits_bundle.stage_paths[1]
    out = tmp_path / "stage1.onnx"
    quantize_int8(fp32, out, [stage_feeds["calibration"][1]], method=method)
    assert qdq_problems(out) == []
    assert boundary(out) == boundary(fp32)
    assert compare_precision(fp32, out, [stage_feeds["test"][1]])["pred_agreement"] >= 0.95
    scales = lambda p: sorted(float(a) for n, a in initializers(onnx.load(str(p))).items()  # noqa: E731
                              if n.endswith("_scale") and a.ndim == 0)
    if method == "entropy":  # KL calibration clips ranges; with too few bins it would equal minmax
        assert scales(out) != scales(int8_stages[1])


def test_fp16_graph_is_typed_fp16_keeps_fp32_io_and_agrees(digits_bundle, stage_feeds, fp16_stages):
    for k, (fp32, fp16) in enumerate(zip(digits_bundle.stage_paths, fp16_stages)):
        assert boundary(fp16) == boundary(fp32)
        model = onnx.load(str(fp16))
        conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
        assert {i.data_type for i in model.graph.initializer if i.name in conv_weights} == {TensorProto.FLOAT16}
        gemm = next(n for n in model.graph.node if n.op_type == "Gemm")  # the exit's classifier stays fp32
        assert {i.data_type for i in model.graph.initializer if i.name in gemm.input} == {TensorProto.FLOAT}
        report = compare_precision(fp32, fp16, [stage_feeds["test"][k]])
        assert report["pred_agreement"] >= 0.99, (k, report)
        assert report["conf_max_abs_diff"] < 0.01, (k, report)


def test_fp16_without_kept_io_types_takes_and_carries_fp16(digits_bundle, stage_feeds, tmp_path):
    out = tmp_path / "stage1.onnx"
    convert_fp16(digits_bundle.stage_paths[1], out, keep_io_types=False)
    session = make_session(out)
    assert [i.type for i in session.get_inputs()] == ["tensor(float16)"]
    assert [o.type for o in session.get_outputs()] == ["tensor(float16)", "tensor(float)", "tensor(float)",
                                                       "tensor(int64)"]
    feeds = {n: a.astype(np.float16) for n, a in stage_feeds["test"][1].items()}
    pred = session.run([session.get_outputs()[-1].name], feeds)[0]
    want = make_session(digits_bundle.stage_paths[1]).run([session.get_outputs()[-1].name], stage_feeds["test"][1])[0]
    assert np.mean(pred == want) >= 0.99


def test_user_errors_are_one_line_and_write_nothing(digits_bundle, stage_feeds, tmp_path):
    fp32, out = digits_bundle.stage_paths[0], tmp_path / "int8.onnx"
    with pytest.raises(EdgeExitError, match="unknown calibration method 'kl'"):
        quantize_int8(fp32, out, [stage_feeds["calibration"][0]], method="kl")
    with pytest.raises(EdgeExitError, match="no calibration data"):
        quantize_int8(fp32, out, [])
    with pytest.raises(EdgeExitError, match="takes"):
        quantize_int8(fp32, out, [{"s0_carry0": np.zeros((1, 32, 8, 8), np.float32)}])
    with pytest.raises(EdgeExitError, match="does not exist"):
        convert_fp16(tmp_path / "missing.onnx", out)
    assert not any(tmp_path.iterdir())


def test_qdq_problems_names_what_tensorrt_rejects():
    """A hand-made graph with a uint8 zero point, a quantized int32 bias and an int8 weight without Q."""
    inits = [
        numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        numpy_helper.from_array(np.array(128, np.uint8), "zp_u8"),
        numpy_helper.from_array(np.array(0, np.int8), "zp"),
        numpy_helper.from_array(np.array(0, np.int32), "zp_i32"),
        numpy_helper.from_array(np.ones(4, np.int32), "bias_i32"),
        numpy_helper.from_array(np.ones(4, np.int8), "w_i8"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp_u8"], ["xq"], name="q_u8"),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp_u8"], ["xd"], name="dq_u8"),
        helper.make_node("DequantizeLinear", ["bias_i32", "s", "zp_i32"], ["b"], name="dq_bias"),
        helper.make_node("DequantizeLinear", ["w_i8", "s", "zp"], ["w"], name="dq_weight"),
        helper.make_node("Add", ["xd", "b"], ["xb"]),
        helper.make_node("Add", ["xb", "w"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], inits)
    problems = qdq_problems(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    text = "\n".join(problems)
    assert "q_u8: zero point must be an int8" in text and "dq_u8: zero point must be an int8" in text
    assert "dq_bias: dequantizes int32" in text
    assert "dq_weight: constant weight without a QuantizeLinear" in text
