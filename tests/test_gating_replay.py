"""calibration.gating replays the runtime's gating rule on recorded traces, without torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from calibration.gating import exits_taken, operating_point
from edgeexit.data import normalize
from edgeexit.runtime.cascade import Cascade, trace
from edgeexit.runtime.loader import open_backend


@pytest.mark.parametrize("thresholds", [[0.0, 0.0, None], [0.99, 0.9, None], [0.999, 0.5, None], [2.0, 2.0, None]])
def test_replay_matches_the_runtime_cascade(example_build, digits_raw, thresholds):
    bundle, _ = example_build
    x = normalize(digits_raw[0][:400], bundle.input["mean"], bundle.input["std"])
    y = digits_raw[1][:400]
    backend = open_backend(bundle, "onnxruntime")
    every = trace(backend, bundle.stage_ios, x, 128)
    result = Cascade(backend, bundle.stage_ios, thresholds)(x)
    np.testing.assert_array_equal(exits_taken(every.exit_conf, thresholds), result.exit)
    correct = every.exit_pred == y[:, None]
    cost = np.cumsum([s["flops"] for s in bundle.manifest["stages"]])
    point = operating_point(every.exit_conf, correct, cost, thresholds)
    assert point.accuracy == pytest.approx(float(np.mean(result.pred == y)))
    np.testing.assert_allclose(point.shares, result.exit_shares())
    assert point.cost == pytest.approx(float((result.exit_shares() * cost).sum()))


def test_build_reports_the_tradeoff_curve_and_plots_it(example_build):
    bundle, report = example_build
    curve = report["tradeoff"]
    assert len(curve["threshold"]) == len(curve["accuracy"]) == len(curve["mflops"])
    assert curve["threshold"][-1] is None  # the no-early-exit end of the curve
    assert curve["mflops"][-1] == pytest.approx(report["cumulative_flops"][-1] / 1e6)
    assert curve["mflops"][0] == pytest.approx(report["cumulative_flops"][0] / 1e6)  # threshold 0: all at exit 0
    pytest.importorskip("matplotlib")
    png = bundle.path / "tradeoff.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "tradeoff.png" in bundle.manifest["files"]


def test_calibration_never_imports_torch():
    code = "import sys, calibration.gating; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
