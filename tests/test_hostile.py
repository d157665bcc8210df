"""A corpus of hostile inputs through the CLI: every one gets exit status 2, one line on
stderr, no traceback, and leaves the working folder exactly as it was.

The corpus is generated here (each case builds its files in a fresh folder holding a copy of a
small real bundle, `b/`, and a copy of its yaml); the ids say what each attack is."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import ROOT, reseal
from edgeexit.cli import main


def _yaml(folder, **changes):
    raw = yaml.safe_load((folder / "model.yaml").read_text())
    raw.update(changes)
    (folder / "model.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(folder / "model.yaml")


def _text_yaml(folder, text):
    (folder / "model.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(folder / "model.yaml")


def _npy(folder, array, name="x.npy"):
    np.save(folder / name, array)
    return str(folder / name)


def _manifest(folder):
    import json

    return json.loads((folder / "b" / "manifest.json").read_text())


def _forged(folder, edit, files=False):
    m = _manifest(folder)
    edit(m)
    reseal(folder / "b", m, files=files)
    return str(folder / "b")


def _corrupt_stage(folder):
    (folder / "b" / "stages" / "stage0.onnx").write_bytes(b"\x08\x07garbage, not a protobuf")
    return _forged(folder, lambda m: None, files=True)


def _factory_module(folder, body, name="usermodel"):
    (folder / f"{name}.py").write_text(body)
    return _yaml(folder, model={"factory": f"{name}:build"})


def _bomb(levels=9):
    lines = ["name: bomb", "model:", "  arch: eenet_resnet", "  args:", "    a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for k in range(1, levels):
        lines.append(f"    a{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * 10) + "]")
    return "\n".join(lines + ["input: {shape: [1, 8, 8], classes: ['0', '1']}", "data: {source: digits}"]) + "\n"


B = "b"
X = lambda f: _npy(f, np.random.default_rng(0).integers(0, 17, (4, 1, 8, 8)).astype(np.float32))  # noqa: E731
CASES = {
    # model.yaml
    "yaml-not-utf8": lambda f: ["build", _text_yaml(f, b"name: caf\xe9\nmodel: {arch: eenet_resnet}\n")],
    "yaml-50MB": lambda f: ["build", _text_yaml(f, "#" * (2 << 20) + "\nname: x\n")],
    "yaml-alias-bomb-in-model-args": lambda f: ["build", _text_yaml(f, _bomb())],
    "yaml-recursive-alias": lambda f: ["build", _text_yaml(f, "name: r\nmodel: &m {arch: eenet_resnet, args: {me: *m}}\n")],
    "yaml-std-inf": lambda f: ["build", _yaml(f, input={"shape": [1, 8, 8], "std": float("inf"),
                                                         "classes": [str(i) for i in range(10)]})],
    "yaml-threshold-nan": lambda f: ["build", _yaml(f, gating={"thresholds": [float("nan"), 0.9, None]})],
    "yaml-lr-nan": lambda f: ["build", _yaml(f, train={"lr": float("nan")})],
    "yaml-nan-in-model-args": lambda f: ["build", _yaml(f, model={"arch": "eenet_resnet",
                                                                  "args": {"exit_pool": float("nan")}})],
    "yaml-a-number": lambda f: ["build", _text_yaml(f, "42\n")],
    "weights-empty-file": lambda f: ((f / "w.pt").write_bytes(b""), ["build", _yaml(f, weights="w.pt", output="o")])[1],
    "weights-not-a-state-dict": lambda f: ((f / "w.pt").write_bytes(b"PK\x03\x04junk"),
                                           ["build", _yaml(f, weights="w.pt", output="o")])[1],
    "diverging-training": lambda f: ["build", _yaml(f, train={"epochs": 1, "lr": 1e12}, output="o")],
    # lr 10 is in range: the confidences went NaN, and binary_cross_entropy raised on them
    "diverging-training-nan-confidences": lambda f: ["build", _yaml(f, model={"arch": "eenet_resnet", "args": {
        "widths": [32, 64, 128], "depths": [1, 2, 2], "exit_pool": 2}}, train={"epochs": 3, "lr": 10}, output="o")],
    "train-diverging-nan-confidences": lambda f: ["train", _yaml(f, model={"arch": "eenet_resnet", "args": {
        "widths": [32, 64, 128], "depths": [1, 2, 2], "exit_pool": 2}}, train={"epochs": 3, "lr": 10}),
        "--out", str(f / "w.pt")],
    "yaml-thresholds-fewer-than-exits": lambda f: ["build", _yaml(f, gating={"thresholds": [0.95, 0.9]}, output="o")],
    "yaml-is-a-folder": lambda f: ["build", "."],
    "factory-raises": lambda f: ["build", _factory_module(f, "def build(**kw):\n    raise RuntimeError('boom')\n")],
    "factory-sys-exit-0": lambda f: ["build", _factory_module(f, "import sys\ndef build(**kw):\n    sys.exit(0)\n")],
    "factory-module-sys-exit-at-import": lambda f: ["build", _factory_module(f, "import sys\nsys.exit(0)\n")],
    "factory-module-raises-at-import": lambda f: ["build", _factory_module(f, "1 / 0\n")],
    "factory-returns-not-a-module": lambda f: ["build", _factory_module(f, "def build(**kw):\n    return 3\n")],
    # outputs
    "output-is-a-file": lambda f: ((f / "afile").write_text("mine"), ["build", _yaml(f, output="afile")])[1],
    "output-under-a-file": lambda f: ((f / "afile").write_text("mine"), ["build", _yaml(f, output="afile/b")])[1],
    "output-folder-with-foreign-manifest": lambda f: ((f / "web").mkdir(), (f / "web" / "manifest.json").write_text(
        '{"name": "my app", "icons": []}'), (f / "web" / "index.html").write_text("<html>"),
        ["build", _yaml(f, output="web")])[3],
    "output-bundle-with-extra-file": lambda f: ((f / B / "notes.txt").write_text("mine"),
                                                ["build", _yaml(f, output=B)])[1],
    "train-out-is-a-dir": lambda f: ["train", str(f / "model.yaml"), "--out", str(f / B)],
    "train-out-under-a-file": lambda f: ((f / "afile").write_text("x"),
                                         ["train", str(f / "model.yaml"), "--out", str(f / "afile" / "w.pt")])[1],
    # inputs to run
    "input-empty-array": lambda f: ["run", B, "--input", _npy(f, np.zeros((0, 1, 8, 8), np.float32))],
    "input-nan-and-inf": lambda f: ["run", B, "--input", _npy(f, np.where(
        np.arange(6)[:, None, None, None] % 2 == 1, np.nan, 1.0) * np.ones((6, 1, 8, 8), np.float32))],
    "input-empty-file": lambda f: ((f / "e.npy").write_bytes(b""), ["run", B, "--input", str(f / "e.npy")])[1],
    "input-pickled-objects": lambda f: ["run", B, "--input", _npy(f, np.array([{"a": 1}, None], dtype=object))],
    "input-strings": lambda f: ["run", B, "--input", _npy(f, np.array(["a", "b"]))],
    "input-npz": lambda f: (np.savez(f / "x.npz", x=np.zeros((2, 1, 8, 8))), ["run", B, "--input", str(f / "x.npz")])[1],
    "input-wrong-shape": lambda f: ["run", B, "--input", _npy(f, np.zeros((2, 3, 8, 8), np.float32))],
    "input-missing": lambda f: ["run", B, "--input", str(f / "nope.npy")],
    "data-npz-with-nan": lambda f: (np.savez(f / "d.npz", x=np.full((3, 1, 8, 8), np.nan), y=np.zeros(3, int)),
                                    ["trace", B, "--data", str(f / "d.npz"), "--out", str(f / "t.npz")])[1],
    # options
    "device-cuda-on-a-cpu-build": lambda f: ["run", B, "--input", X(f), "--backend", "torch", "--device", "cuda"],
    "device-bogus": lambda f: ["run", B, "--input", X(f), "--backend", "torch", "--device", "bogus"],
    "device-for-onnxruntime": lambda f: ["run", B, "--input", X(f), "--backend", "onnxruntime", "--device", "cuda:0"],
    "profile-iters-0": lambda f: ["profile", B, "--iters", "0"],
    "profile-iters-negative": lambda f: ["profile", B, "--iters", "-5"],
    "profile-warmup-negative": lambda f: ["profile", B, "--warmup", "-1"],
    "profile-batch-above-max": lambda f: ["profile", B, "--batch", "1,100000"],
    "profile-threads-0": lambda f: ["profile", B, "--threads", "0"],
    "calibrate-batch-1e9": lambda f: ["calibrate", B, "--budget-ms", "1", "--batch", "1e9"],
    "calibrate-batch-1000000000": lambda f: ["calibrate", B, "--budget-ms", "1", "--batch", "1000000000"],
    "calibrate-budget-nan": lambda f: ["calibrate", B, "--budget-ms", "nan"],
    "calibrate-budget-negative": lambda f: ["calibrate", B, "--budget-ms", "-1"],
    "thresholds-nan": lambda f: ["run", B, "--input", X(f), "--thresholds", "nan,0.5,null"],
    "unknown-option": lambda f: ["run", B, "--inptu", "x.npy"],
    # bundles
    "bundle-corrupt-onnx-resealed": lambda f: ["run", _corrupt_stage(f), "--input", X(f)],
    "bundle-manifest-a-number": lambda f: ((f / B / "manifest.json").write_text("42"), ["inspect", B])[1],
    "bundle-manifest-wrong-types": lambda f: ["inspect", _forged(f, lambda m: m.update(stages={"0": "x"}))],
    "bundle-manifest-thresholds-strings": lambda f: ["run", _forged(
        f, lambda m: m["gating"].update(thresholds=["0.5", "0.5", None])), "--input", X(f)],
    "bundle-edited-thresholds": lambda f: ((f / B / "manifest.json").write_text(
        (f / B / "manifest.json").read_text().replace('"thresholds": [', '"thresholds": [0.01, 0.01, null], "x": [', 1)),
        ["run", B, "--input", X(f)])[1],
    "bundle-std-zero-resealed": lambda f: ["run", _forged(f, lambda m: m["input"].update(std=[0.0])), "--input", X(f)],
    "bundle-weights-outside": lambda f: ["run", _forged(f, lambda m: m.update(weights="../w.pt")), "--input", X(f),
                                         "--backend", "torch"],
    "bundle-factory-os-system": lambda f: ["run", _forged(f, lambda m: m.update(model={
        "factory": "os:system", "args": {"command": f"touch {f / 'pwned'}"}})), "--input", X(f), "--backend", "torch"],
    "bundle-dropped-py-and-factory": lambda f: ((f / B / "evil.py").write_text(
        f"open({str(f / 'pwned')!r}, 'w')\ndef build(**kw):\n    pass\n"),
        ["run", _forged(f, lambda m: m.update(model={"factory": "evil:build", "args": {}}), files=True),
         "--input", X(f), "--backend", "torch", "--trust-code"])[1],
    "bundle-unsigned-with-trust": lambda f: ["inspect", B, "--trust", str(f / "model.yaml")],
    # found by the second hostile review
    "trust-empty-string": lambda f: ["run", B, "--input", X(f), "--trust", ""],
    "bundle-factory-os-system-with-trust-code": lambda f: ["run", _forged(f, lambda m: m.update(model={
        "factory": "os:system", "args": {"command": f"touch {f / 'pwned'}"}})), "--input", X(f), "--backend", "torch",
        "--trust-code"],
    "bundle-factory-reexported-os-system": lambda f: ((f / "reexport.py").write_text("from os import system\n"),
        ["run", _forged(f, lambda m: m.update(model={"factory": "reexport:system", "args": {
            "command": f"touch {f / 'pwned'}"}})), "--input", X(f), "--backend", "torch", "--trust-code"])[1],
    "bundle-name-is-a-path": lambda f: ["trace", _forged(f, lambda m: m.update(name=str(f / "elsewhere" / "x")))],
    "bundle-no-export": lambda f: ["trace", _forged(f, lambda m: m.pop("export"))],
    "bundle-no-target": lambda f: ["engines", _forged(f, lambda m: m.pop("target"))],
    "bundle-splits-a-string": lambda f: ["trace", _forged(f, lambda m: m["data"]["splits"].update(val="x"))],
    "bundle-fewer-classes": lambda f: ["run", _forged(f, lambda m: m.update(classes=["a", "b"])), "--input", X(f)],
    "input-garbage-npy-header": lambda f: ((f / "g.npy").write_bytes(
        b"\x93NUMPY\x01\x00\x10\x00{'descr':__impor\n"), ["run", B, "--input", str(f / "g.npy")])[1],
    "input-negative-dimension": lambda f: ((f / "n.npy").write_bytes(
        b"\x93NUMPY\x01\x00v\x00" + b"{'descr': '<f4', 'fortran_order': False, 'shape': (-1, 1, 8, 8), }".ljust(117)
        + b"\n" + b"\0" * 1024), ["run", B, "--input", str(f / "n.npy")])[1],
    "input-timedelta": lambda f: ["run", B, "--input", _npy(f, np.zeros((2, 1, 8, 8), "m8[s]"))],
    "input-float64-beyond-float32": lambda f: ["run", B, "--input", _npy(f, np.full((2, 1, 8, 8), 1e300))],
    "thresholds-negative": lambda f: ["run", B, "--input", X(f), "--thresholds=-5,-5,null"],
    "yaml-int-of-5001-digits": lambda f: ["build", _text_yaml(f, (f / "model.yaml").read_text().replace(
        "epochs: 1", "epochs: 1" + "0" * 5000))],
    "yaml-seed-2-to-the-70": lambda f: ["build", _yaml(f, train={"seed": 2**70})],
    "yaml-lr-1e308": lambda f: ["build", _yaml(f, train={"lr": 1e308})],
    "yaml-class-name-a-boolean": lambda f: ["build", _yaml(f, input={"shape": [1, 8, 8], "classes": [
        True, *[str(i) for i in range(1, 10)]]})],
}


def snapshot(folder):
    """Every path under `folder` with its size and content digest (what 'nothing written' means)."""
    import hashlib

    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if "__pycache__" in rel:
            continue
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else "dir"
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input_gets_one_line_and_changes_nothing(case, small_spec, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "w"
    folder.mkdir()
    shutil.copy(small_spec, folder / "model.yaml")
    shutil.copytree(small_spec.parent / "out", folder / B)
    _yaml(folder, output=str(folder / "out-new"))
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", [str(folder), *sys.path])  # the user's folder importable, as with `python -c`
    argv = CASES[case](folder)
    if argv[0] in ("build", "train"):
        argv.append("--quiet")  # no step lines: the error must be the only line
    before = snapshot(folder)
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors exit from inside parse_args
        rc = exc.code
    finally:
        for name in ("usermodel", "evil"):
            sys.modules.pop(name, None)
    out = capsys.readouterr()
    assert rc == 2, (out.out[-500:], out.err[-500:])
    lines = out.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeexit: error: "), out.err
    assert "Traceback" not in out.err and out.out == ""
    assert snapshot(folder) == before, "the command wrote or removed something"
    assert not (folder / "pwned").exists()


def test_the_console_script_exits_2_when_a_factory_calls_sys_exit(tmp_path):
    """The reported case: a factory calling sys.exit(0) gave exit 0 and no bundle."""
    (tmp_path / "quitter.py").write_text("import sys\ndef build(**kw):\n    sys.exit(0)\n")
    raw = {"name": "q", "model": {"factory": "quitter:build"}, "input": {"shape": [1, 8, 8], "classes": ["a", "b"]},
           "data": {"source": "digits"}}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "edgeexit", "build", "model.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "sys.exit(0)" in proc.stderr
    assert not (tmp_path / "build").exists()
