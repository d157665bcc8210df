"""kill -9 at any point of build, profile and calibrate leaves a loadable bundle at the path:
the old one or the new one, never none; the next write cleans up what the killed one left.

Each case runs the real CLI in a subprocess with one function of the write path wrapped so
that the process SIGKILLs itself at that point (nothing is caught, no finally runs)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, leftovers
from edgeexit.bundle import load_bundle
from edgeexit.cli import main

HARNESS = r"""
import os, signal, sys
import edgeexit.bundle as bundle, edgeexit.build as build

point, argv = sys.argv[1], sys.argv[2:]

def die(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

def after(fn):
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        die()
    return wrapped

def on_call(fn, n):
    calls = [0]
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            die()
        return fn(*args, **kwargs)
    return wrapped

if point == "training":
    build.fit_or_load = die
elif point == "export":
    build.export_stages = die
elif point == "assembling":  # half the unchanged files linked into the staging folder
    bundle.link_or_copy = on_call(bundle.link_or_copy, 3)
elif point == "sealed":  # manifest written into the staging folder, not yet swapped in
    bundle.install = die
elif point == "swapped":  # new bundle in place, the old one not yet deleted
    bundle.install = after(bundle.install)
from edgeexit.cli import main
sys.exit(main(argv))
"""


def killed(tmp_path, point, argv):
    proc = subprocess.run([sys.executable, "-c", HARNESS, point, *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def digest(path):
    return json.loads((path / "manifest.json").read_text())["seal"]["digest"]


@pytest.mark.parametrize("point", ["training", "export", "sealed", "swapped"])
def test_kill_during_build(small_spec, tmp_path, point, capsys):
    folder = tmp_path / "w"
    shutil.copytree(small_spec.parent, folder)
    out = folder / "out"
    old = digest(out)
    killed(folder, point, ["build", str(folder / "model.yaml"), "--quiet"])
    now = load_bundle(out)  # loadable: the old bundle or the new one
    assert now.manifest["seal"]["digest"] == old if point != "swapped" else now.manifest["seal"]["digest"] != old
    assert main(["build", str(folder / "model.yaml"), "--quiet"]) == 0  # and the next write cleans up
    capsys.readouterr()
    load_bundle(out)
    assert leftovers(folder) == []


@pytest.mark.parametrize("point", ["assembling", "sealed", "swapped"])
def test_kill_during_profile_and_calibrate(small_spec, tmp_path, point, capsys):
    out = tmp_path / "out"
    shutil.copytree(small_spec.parent / "out", out)
    profile = ["profile", str(out), "--batch", "1", "--iters", "3", "--warmup", "0", "--quiet"]
    calibrate = ["calibrate", str(out), "--budget-ms", "1000", "--latency", "profile", "--no-measure", "--quiet"]
    for argv in (profile, calibrate):
        old = digest(out)
        killed(tmp_path, point, argv)
        now = load_bundle(out)
        assert (now.manifest["seal"]["digest"] == old) == (point != "swapped")
        assert main(argv) == 0
        capsys.readouterr()
        assert leftovers(tmp_path) == []
    final = load_bundle(out)
    assert {"profile.json", "calibration.json"} <= set(final.manifest["files"])


@pytest.mark.parametrize("point", ["fit_or_load", "export_stages", "write_bundle"])
def test_ctrl_c_during_build_leaves_the_old_bundle_and_no_staging(small_spec, tmp_path, point, capsys, monkeypatch):
    """Ctrl-C is one line and exit 130, and the `finally`s of the staging folder and the lock
    ran on its way out: the old bundle stays, nothing half-written beside it."""
    import edgeexit.build as build

    folder = tmp_path / "w"
    shutil.copytree(small_spec.parent, folder)
    out = folder / "out"
    old = digest(out)

    def interrupt(*_args, **_kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(build, point, interrupt)
        assert main(["build", str(folder / "model.yaml"), "--quiet"]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "edgeexit: interrupted"
    load_bundle(out)  # verified
    assert digest(out) == old and leftovers(folder) == []
    assert main(["build", str(folder / "model.yaml"), "--quiet"]) == 0  # the lock was released
    capsys.readouterr()
