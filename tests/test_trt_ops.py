"""TensorRT's ONNX operator support (edgeexit.export.trt_ops), checked on exported graphs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgeexit.export.trt_ops import SUPPORTED, decompose_hardswish, unsupported


def _graph(nodes, name="g"):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    return helper.make_graph(nodes, name, [x], [y])


def _model(nodes):
    return helper.make_model(_graph(nodes), opset_imports=[helper.make_opsetid("", 17)])


def test_hardswish_is_missing_from_8_5_and_decomposed_exactly():
    model = _model([helper.make_node("HardSwish", ["x"], ["y"], name="act")])
    x = np.linspace(-6, 6, 6, dtype=np.float32).reshape(2, 3)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert unsupported(model, "8.5.2") == [("act", "HardSwish")] and unsupported(model, "8.6.1") == [("act", "HardSwish")]
    assert unsupported(model, "10.3.0") == []
    assert decompose_hardswish(model) == 1 and unsupported(model, "8.5.2") == []
    onnx.checker.check_model(model, full_check=True)
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(after, before)


def test_nodes_inside_if_branches_are_checked():
    then = helper.make_graph([helper.make_node("Mish", ["x"], ["t"], name="mish")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 3])])
    other = helper.make_graph([helper.make_node("Relu", ["x"], ["e"], name="relu")], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3])])
    cond = helper.make_node("Constant", [], ["c"], value=helper.make_tensor("v", TensorProto.BOOL, [], [True]))
    model = _model([cond, helper.make_node("If", ["c"], ["y"], name="gate", then_branch=then, else_branch=other)])
    assert unsupported(model, "8.5") == [("gate/then_branch/mish", "Mish")]
    assert unsupported(model, "10.1") == []


def test_the_tables_and_versions():
    assert {"Conv", "If", "QuantizeLinear", "HardSigmoid"} <= SUPPORTED["8.5"] < SUPPORTED["10"]
    assert "HardSwish" not in SUPPORTED["8.5"] and "LayerNormalization" in SUPPORTED["10"]
    with pytest.raises(ValueError, match="older than 8.5"):
        unsupported(_model([]), "7.1")
