"""The runtime install has no torch: `pip install edgeexit` (no extras) into a fresh venv runs
run, inspect, profile, trace and calibrate on a bundle built elsewhere in the suite, and a
bundle whose weights.pt was left out."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> Path:
    """A venv holding edgeexit's wheel and what its base install resolves to, nothing else."""
    work = tmp_path_factory.mktemp("runtime")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(work / "wheel")], check=True)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    wheel = next((work / "wheel").glob("edgeexit-*.whl"))
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True)
    return venv


def _edgeexit(venv: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "edgeexit"), *args], capture_output=True, text=True, cwd=venv.parent)


@pytest.fixture(scope="module")
def deployed(small_spec, digits_raw, tmp_path_factory) -> tuple[Path, Path, Path]:
    """A copy of the small bundle without weights.pt, and two .npz splits (the device has no
    scikit-learn, so the bundle's `digits` source cannot be rebuilt there)."""
    work = tmp_path_factory.mktemp("deployed")
    bundle = work / "bundle"
    shutil.copytree(small_spec.parent / "out", bundle)
    (bundle / "weights.pt").unlink()
    x, y = digits_raw
    np.savez(work / "val.npz", x=x[:300], y=y[:300])
    np.savez(work / "test.npz", x=x[300:600], y=y[300:600])
    np.save(work / "images.npy", x[:20])
    return bundle, work / "val.npz", work / "test.npz"


def test_the_runtime_install_has_no_torch(runtime_venv):
    for module in ("torch", "onnxsim", "sklearn"):
        probe = subprocess.run([str(runtime_venv / "bin" / "python"), "-c", f"import {module}"], capture_output=True)
        assert probe.returncode != 0, f"{module} is importable in the runtime venv"


def test_runtime_commands_without_torch(runtime_venv, deployed):
    bundle, val, test = deployed
    shown = _edgeexit(runtime_venv, "inspect", str(bundle))
    assert shown.returncode == 0, shown.stderr
    assert "weights: weights.pt (left out of this bundle" in shown.stdout

    ran = _edgeexit(runtime_venv, "run", str(bundle), "--input", str(bundle.parent / "images.npy"), "--json")
    assert ran.returncode == 0, ran.stderr
    rows = json.loads(ran.stdout)["samples"]
    assert len(rows) == 20 and all(0 <= r["class"] < 10 for r in rows)
    np.save(bundle.parent / "one.npy", np.load(bundle.parent / "images.npy")[:1])  # one input: the fused graph, if used
    ran = _edgeexit(runtime_venv, "run", str(bundle), "--input", str(bundle.parent / "one.npy"), "--json")
    assert ran.returncode == 0, ran.stderr
    fused = json.loads((bundle / "manifest.json").read_text())["fused"]["use_at_batch_1"]
    assert json.loads(ran.stdout)["backend"] == ("onnxruntime (fused cascade graph)" if fused else "onnxruntime")
    one = json.loads(ran.stdout)["samples"][0]
    assert (one["class"], one["exit"]) == (rows[0]["class"], rows[0]["exit"])

    prof = _edgeexit(runtime_venv, "profile", str(bundle), "--data", str(test), "--batch", "1", "--iters", "5",
                     "--warmup", "1", "--quiet")
    assert prof.returncode == 0, prof.stderr
    assert "onnxruntime@" in prof.stdout

    traced = _edgeexit(runtime_venv, "trace", str(bundle), "--data", str(val), "--out", "val.traces.npz")
    assert traced.returncode == 0, traced.stderr

    cal = _edgeexit(runtime_venv, "calibrate", str(bundle), "--budget-ms", "5", "--latency", "profile",
                    "--data-val", str(val), "--data-test", str(test), "--no-measure", "--json")
    assert cal.returncode == 0, cal.stderr
    assert "no pareto.png: matplotlib is not installed" in cal.stderr  # the runtime install has no plots: said
    report = json.loads(cal.stdout)
    assert len(report["thresholds"]) == 3
    after = _edgeexit(runtime_venv, "inspect", str(bundle), "--json")
    assert json.loads(after.stdout)["manifest"]["gating"]["thresholds"] == report["thresholds"]


def test_build_and_torch_backend_say_what_to_install(runtime_venv, deployed):
    bundle, _, _ = deployed
    for args in (["build", str(ROOT / "examples" / "digits" / "model.yaml")],
                 ["run", str(bundle), "--input", str(bundle.parent / "images.npy"), "--backend", "torch"]):
        out = _edgeexit(runtime_venv, *args)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "edgeexit[build]" in out.stderr
