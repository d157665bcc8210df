"""Every zoo example, exactly as shipped: `edgeexit build` trains it on digits, proves the
stage cut and the ONNX export, and the bundle runs on onnxruntime like the torch reference."""

from __future__ import annotations

import numpy as np
import pytest

from edgeexit.build import build
from edgeexit.runtime.cascade import Cascade
from edgeexit.runtime.loader import open_backend
from edgeexit.spec import load_spec
from edgeexit.tracing import split_inputs
from conftest import ROOT

ZOO = ["eenet", "msdnet", "ranet", "emgnet"]


@pytest.fixture(scope="session", params=ZOO)
def zoo_build(request, tmp_path_factory):
    spec = load_spec(ROOT / "examples" / request.param / "model.yaml")
    bundle, report = build(spec, tmp_path_factory.mktemp(request.param) / "bundle", progress=False)
    return request.param, bundle, report


def test_final_exit_reaches_95_percent(zoo_build):
    name, _, report = zoo_build
    assert report["exit_accuracy"][-1] >= 0.95, f"{name}: final exit {report['exit_accuracy'][-1]:.1%}"


def test_stage_cut_and_export_are_exact(zoo_build):
    _, bundle, report = zoo_build
    assert report["staged_max_abs_diff"] <= 1e-5
    assert max(report["parity"]) <= 1e-4 and report["monolithic_parity"] <= 1e-4
    assert len(bundle.manifest["stages"]) == len(report["exit_accuracy"]) >= 2


def test_paper_flops_grow_exit_by_exit(zoo_build):
    _, _, report = zoo_build
    ops = report["paper_cumulative_ops"]
    assert all(a < b for a, b in zip(ops, ops[1:]))


def test_bundle_runs_on_onnxruntime_like_the_torch_reference(zoo_build):
    _, bundle, report = zoo_build
    x, y = split_inputs(bundle, "test")
    thresholds = bundle.manifest["gating"]["thresholds"]
    ort = Cascade(open_backend(bundle, "onnxruntime"), bundle.stage_ios, thresholds).run_batched(x, 64)
    ref = Cascade(open_backend(bundle, "torch"), bundle.stage_ios, thresholds).run_batched(x, 64)
    assert np.mean(ort.exit == ref.exit) >= 0.99 and np.mean(ort.pred == ref.pred) >= 0.99
    assert float(np.mean(ort.pred == y)) == pytest.approx(report["cascade_accuracy"])


def test_the_fused_graph_agrees_with_the_stages_and_parses_on_tensorrt(zoo_build):
    from edgeexit.export.trt_ops import if_output_types, unsupported
    from edgeexit.runtime.fused import FusedCascade

    name, bundle, report = zoo_build
    for check in bundle.manifest["fused"]["agreement"].values():  # the build's check, at thresholds and full depth
        assert check["samples"] == report["samples"] and check["exit_differs"] == check["pred_differs"] == 0, name
    x, _ = split_inputs(bundle, "test")  # and again here, from the bundle's files
    thresholds = bundle.manifest["gating"]["thresholds"]
    staged = Cascade(open_backend(bundle, "onnxruntime"), bundle.stage_ios, thresholds).run_batched(x, 1)
    fused = FusedCascade(bundle.fused_path, bundle.input["name"], thresholds, len(bundle.stage_ios))(x)
    assert (fused.exit == staged.exit).all() and (fused.pred == staged.pred).all(), name
    for version in ("8.5.2.2", "10.3.0.26"):
        assert unsupported(bundle.fused_path, version) == [] and if_output_types(bundle.fused_path, version) == [], name
