"""Per-stage precision in a build: INT8 Q/DQ bundles, mixed precision, tolerance and fallback."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest

from conftest import EXAMPLE, example_raw, write_spec
from edgeexit.build import build
from edgeexit.errors import SpecError
from edgeexit.export import precision as precision_module
from edgeexit.export.quantize import qdq_problems
from edgeexit.runtime.cascade import Cascade
from edgeexit.runtime.loader import open_backend
from edgeexit.spec import load_spec


@pytest.fixture(scope="module")
def int8_build(tmp_path_factory):
    """The shipped INT8 example (examples/digits/int8.yaml), unchanged."""
    out = tmp_path_factory.mktemp("int8") / "bundle"
    return build(load_spec(EXAMPLE.with_name("int8.yaml")), out, progress=False)


def test_int8_bundle_keeps_accuracy_and_passes_qdq_checks(int8_build):
    bundle, report = int8_build
    prec = report["precision"]
    assert prec["stages"] == ["int8", "int8", "int8"] and not prec["fallbacks"]
    assert prec["final_drop_pt"] <= 0.5  # acceptance: within 0.5 pt of fp32 at the final exit
    assert abs(prec["exits"][-1]["fp32_accuracy"] - prec["exits"][-1]["accuracy"]) * 100 <= 0.5
    for stage in bundle.manifest["stages"]:
        assert stage["precision"] == "int8"
        path = bundle.path / stage["onnx"]
        assert qdq_problems(path) == []
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        fp32 = onnx.load(str(bundle.path / stage["onnx_fp32"]))
        assert not {"QuantizeLinear"} & {n.op_type for n in fp32.graph.node}
        assert [(i.name, i.type.tensor_type.elem_type) for i in onnx.load(str(path)).graph.input] == \
               [(i.name, i.type.tensor_type.elem_type) for i in fp32.graph.input]  # float boundary
    assert bundle.manifest["monolithic_cost"]["precision"] == "int8"
    assert bundle.manifest["monolithic_fp32"] in bundle.manifest["files"]
    assert report["cascade_accuracy"] >= 0.95


def test_int8_bundle_runs_like_its_report(int8_build, digits_raw):
    from edgeexit.data import normalize

    bundle, report = int8_build
    x = normalize(digits_raw[0][:200], bundle.input["mean"], bundle.input["std"])
    result = Cascade(open_backend(bundle, "onnxruntime"), bundle.stage_ios, bundle.thresholds)(x)
    assert np.mean(result.pred == digits_raw[1][:200]) >= 0.95
    for check in bundle.manifest["fused"]["agreement"].values():  # the fused graph of the Q/DQ stages agrees too
        assert check["exit_differs"] == check["pred_differs"] == 0


@pytest.mark.slow
def test_mixed_precision_per_stage(tmp_path):
    raw = example_raw()
    raw["train"]["epochs"] = 3
    raw["export"].update(precision="fp32", stage_precision={1: "int8", 2: "fp16"})
    raw["target"]["device"] = "jetson-orin-nano-8gb"  # host-cpu refuses fp16 (no fast fp16 kernels)
    bundle, report = build(load_spec(write_spec(tmp_path, raw)), tmp_path / "b", progress=False)
    assert [s["precision"] for s in bundle.manifest["stages"]] == ["fp32", "int8", "fp16"]
    assert bundle.manifest["stages"][0]["onnx_fp32"] is None  # deployed in fp32: no second copy
    fp16 = onnx.load(str(bundle.path / bundle.manifest["stages"][2]["onnx"]))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.graph.initializer)
    assert report["precision"]["exits"][2]["agreement"] >= 0.95
    assert bundle.manifest["fused"]["agreement"]["full_depth"]["exit_differs"] == 0  # fp32, int8 and fp16 stages fused


def _ruin_calibration(monkeypatch):
    """Calibrate on images scaled x1000: the int8 ranges become useless, a real accuracy loss."""
    original = precision_module.carried_feeds
    monkeypatch.setattr(precision_module, "carried_feeds",
                        lambda paths, ios, x: original(paths, ios, x * 1000.0))


@pytest.mark.slow
def test_tolerance_names_the_stage_or_falls_back(tmp_path, monkeypatch):
    _ruin_calibration(monkeypatch)
    raw = example_raw()
    raw["train"]["epochs"] = 3
    raw["export"].update(precision="int8", tolerance_pt=0.5)
    with pytest.raises(SpecError, match=r"export.precision: stage 0 in int8 costs the final exit .* pt of test "
                                        r"accuracy \(> export.tolerance_pt 0.5\); allow export.fallback"):
        build(load_spec(write_spec(tmp_path, raw)), tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()

    fallback = copy.deepcopy(raw)
    fallback["export"]["fallback"] = "fp32"
    bundle, report = build(load_spec(write_spec(tmp_path, fallback)), tmp_path / "b", progress=False)
    prec = report["precision"]
    assert prec["fallbacks"] and all(f["from"] == "int8" and f["to"] == "fp32" for f in prec["fallbacks"].values())
    assert prec["final_drop_pt"] <= 0.5
    assert [s["precision"] for s in bundle.manifest["stages"]] == prec["stages"]
