"""The CLI end to end on the shipped example: build summary, run, inspect, train."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import EXAMPLE, ROOT, example_raw, write_spec
from edgeexit.cli import main
from edgeexit.runtime.onnxruntime_backend import make_session


def test_example_reaches_the_accuracy_floor_and_exits_early(example_build):
    _, report = example_build
    assert report["exit_accuracy"][-1] >= 0.95  # final exit on the test split
    assert report["cascade_accuracy"] >= 0.95
    assert abs(sum(report["exit_share"]) - 1) < 1e-9
    assert report["exit_share"][0] > 0.5  # digits are easy: most leave at the first exit
    assert report["cascade_flops"] < report["monolithic_flops"]
    assert max(report["parity"]) <= 1e-4 and report["staged_max_abs_diff"] <= 1e-5
    assert report["latency_ms"]["cascade"] > 0 and report["latency_ms"]["monolithic"] > 0


def _by_hand(bundle, raw: np.ndarray):
    """Run the stage ONNX files with plain onnxruntime sessions, one sample at a time."""
    m = bundle.manifest
    mean, std = np.float32(m["input"]["mean"][0]), np.float32(m["input"]["std"][0])
    sessions = [make_session(bundle.path / s["onnx"]) for s in m["stages"]]
    results = []
    for image in raw:
        feeds = {"image": ((image[None] - mean) / std).astype(np.float32)}
        for k, (s, sess) in enumerate(zip(m["stages"], sessions)):
            names = s["outputs"]["carry"] + [s["outputs"]["conf"], s["outputs"]["pred"]]
            out = dict(zip(names, sess.run(names, feeds)))
            th = m["gating"]["thresholds"][k]
            if th is None or out[s["outputs"]["conf"]][0] >= th:
                results.append((int(out[s["outputs"]["pred"]][0]), k, float(out[s["outputs"]["conf"]][0])))
                break
            feeds = {n: out[n] for n in s["outputs"]["carry"]}
    return results


def test_run_agrees_with_the_stage_files_by_hand(example_build, digits_raw, tmp_path, capsys):
    bundle, _ = example_build
    raw = digits_raw[0][-40:]
    np.save(tmp_path / "images.npy", raw)
    assert main(["run", str(bundle.path), "--input", str(tmp_path / "images.npy"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["samples"]
    expected = _by_hand(bundle, raw)
    assert [(r["class"], r["exit"]) for r in rows] == [(p, k) for p, k, _ in expected]
    np.testing.assert_allclose([r["confidence"] for r in rows], [c for _, _, c in expected], atol=1e-5)
    assert all(abs(sum(r["probabilities"]) - 1) < 1e-4 for r in rows)
    # The table form and a single (C, H, W) image work too.
    np.save(tmp_path / "one.npy", raw[0])
    assert main(["run", str(bundle.path), "--input", str(tmp_path / "one.npy")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["index", "class", "exit", "confidence"]
    assert out[1].split()[:3] == ["0", str(expected[0][0]), str(expected[0][1])]


def test_run_rejects_wrong_input_shape(example_build, tmp_path, capsys):
    bundle, _ = example_build
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 8, 8), np.float32))
    assert main(["run", str(bundle.path), "--input", str(tmp_path / "bad.npy")]) == 2
    assert "has shape [2, 3, 8, 8]; the bundle takes [N, 1, 8, 8]" in capsys.readouterr().err
    (tmp_path / "empty.npy").write_bytes(b"")
    np.savez(tmp_path / "archive.npz", x=np.zeros((2, 1, 8, 8), np.float32))
    for name, says in (("empty.npy", "is an empty file"), ("archive.npz", "is a zip archive (an .npz?)")):
        assert main(["run", str(bundle.path), "--input", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("edgeexit: error: --input:") and says in err and "\n" not in err


def test_inspect_text_and_json(example_build, capsys):
    bundle, _ = example_build
    assert main(["inspect", str(bundle.path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["verified"] and info["manifest"]["name"] == "digits-eenet"
    assert main(["inspect", str(bundle.path)]) == 0
    text = capsys.readouterr().out
    assert "checksums verified" in text and "stages/stage2.onnx" in text
    assert f"fused:   stages/cascade.onnx, {'used' if bundle.manifest['fused']['use_at_batch_1'] else 'not used'}" in text


@pytest.mark.slow
def test_train_then_build_from_weights(tmp_path, capsys):
    raw = example_raw()
    raw["train"]["epochs"] = 2
    raw["weights"] = "weights/model.pt"
    spec = write_spec(tmp_path, raw)
    assert main(["train", str(spec), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("val accuracy per exit: ") and "build trains again" not in out
    state = torch.load(tmp_path / "weights" / "model.pt", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    assert main(["build", str(spec), "--quiet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["training"] is None  # weights were loaded, not trained again
    bundle_weights = torch.load(tmp_path / "build" / "digits-eenet" / "weights.pt", weights_only=True)
    assert all(torch.equal(state[k], bundle_weights[k]) for k in state)


@pytest.mark.slow
def test_training_is_deterministic(tmp_path, capsys):
    raw = example_raw()
    raw["train"]["epochs"] = 1
    spec = write_spec(tmp_path, raw)
    for name in ("a.pt", "b.pt"):
        assert main(["train", str(spec), "--quiet", "--out", str(tmp_path / name)]) == 0
        # weights the yaml does not name are not what build uses: train says how to make it
        assert f"build trains again unless the yaml names these weights: weights: {name}" in capsys.readouterr().out
    a, b = (torch.load(tmp_path / n, weights_only=True) for n in ("a.pt", "b.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_eenets_cost_aware_loss_trains(tmp_path, capsys):
    raw = example_raw()
    raw["train"].update(epochs=2, loss="eenets", cost_lambda=0.2)
    raw["gating"] = {"confidence": "learned"}
    spec = write_spec(tmp_path, raw)
    assert main(["build", str(spec), "--quiet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["thresholds"] == [0.5, 0.5, None]  # EENets' default rule for a learned confidence
    assert report["training"]["epoch_loss"][-1] < report["training"]["epoch_loss"][0]
    assert report["exit_accuracy"][-1] > 0.5


@pytest.mark.slow
def test_jetson_build_without_tensorrt_says_so_and_stays_valid(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from edgeexit.export.tensorrt import trt_available

    if trt_available():
        pytest.skip("TensorRT is installed: engines are built instead (covered in test_tensorrt.py)")
    raw = example_raw()
    raw["train"]["epochs"] = 1
    raw["target"] = {"device": "jetson-orin-nano-8gb", "backend": "auto"}
    spec = write_spec(tmp_path, raw)
    assert main(["build", str(spec), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "tensorrt: not installed here (import tensorrt failed); the bundle stays valid" in err
    bundle = tmp_path / "build" / "digits-eenet"
    assert main(["inspect", str(bundle)]) == 0
    capsys.readouterr()
    assert main(["engines", str(bundle)]) == 2
    assert capsys.readouterr().err.strip().startswith("edgeexit: error: tensorrt: not installed here")


def test_the_readme_command_table_lists_every_command_and_option():
    """The Commands table is the reference: a new flag that is not in it is a test failure."""
    import argparse

    from conftest import ROOT
    from edgeexit.cli import parser

    rows = {line.split("`")[1].split()[1]: line for line in (ROOT / "README.md").read_text().splitlines()
            if line.startswith("| `edgeexit ")}
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        assert name in rows, f"README has no row for `edgeexit {name}`"
        for action in p._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert flag in rows[name], f"README's `edgeexit {name}` row lacks {flag}"


def test_readme_yaml_reference_lists_every_key_and_choice(monkeypatch):
    """Every key the yaml parser accepts has a row in the README's reference, and every
    train.loss and gating.confidence choice is named there."""
    import re

    from edgeexit import spec as spec_module

    seen: set[str] = set()
    real = spec_module._mapping

    def recording(value, path, required, optional):
        seen.update(f"{path}.{k}" if path else k for k in {*required, *optional})
        return real(value, path, required, optional)

    monkeypatch.setattr(spec_module, "_mapping", recording)
    spec_module.load_spec(EXAMPLE)
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `")]
    names = set()
    for row in rows:
        for cell in re.findall(r"`([a-z_.]+(?:/[a-z_]+)*)`", row.split("|")[1]):
            head, _, tail = cell.rpartition(".")
            names.update(f"{head}.{t}" if head else t for t in tail.split("/"))
    sections = {k for k in seen if "." not in k}
    parents = {k for k in seen if any(other.startswith(k + ".") for other in seen)}  # export.batch: its own rows
    missing = sorted(k for k in seen - names - parents if k not in sections and not k.startswith("data.splits."))
    assert not missing, f"README's yaml reference lacks {missing}"
    loss_row = next(r for r in rows if r.startswith("| `train.loss`"))
    assert all(f"`{name}`" in loss_row for name in spec_module.LOSSES)


@pytest.mark.slow
def test_version_and_threads(tmp_path, capsys):
    import edgeexit

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"edgeexit {edgeexit.__version__}"
    before = torch.get_num_threads()
    raw = example_raw()
    raw["train"]["epochs"] = 1
    try:
        assert main(["train", str(write_spec(tmp_path, raw)), "--quiet", "--threads", "1",
                     "--out", str(tmp_path / "w.pt")]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit) as exc:
        main(["build", str(write_spec(tmp_path, raw)), "--threads", "0"])
    assert exc.value.code == 2


def test_bash_completion_knows_commands_options_and_choices(tmp_path, capsys):
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("no bash here")
    assert main(["completion", "bash"]) == 0
    (tmp_path / "c.sh").write_text(capsys.readouterr().out)

    def complete(*words):
        probe = (f"source {tmp_path / 'c.sh'}; COMP_WORDS=({' '.join(repr(w) for w in words)}); "
                 f"COMP_CWORD={len(words) - 1}; _edgeexit; echo \"${{COMPREPLY[@]}}\"")
        return subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout.split()

    assert complete("edgeexit", "ca") == ["calibrate"]
    assert "--solver" in complete("edgeexit", "calibrate", "b", "--so")
    assert complete("edgeexit", "calibrate", "b", "--solver", "") == ["optimise", "geometric", "policy"]
    assert "--strict" in complete("edgeexit", "run", "b", "--st")
    assert main(["completion", "zsh"]) == 0 and "bashcompinit" in capsys.readouterr().out


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import edgeexit.cli as cli

    def interrupted(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_devices", interrupted)  # parser() binds the command function when it is built
    assert main(["devices"]) == 130
    out = capsys.readouterr()
    assert out.err == "edgeexit: interrupted\n" and out.out == ""


@pytest.mark.parametrize("argv, hint", [
    (["run", "b", "--input", "x.npy", "--inptu", "y"], "unrecognized arguments: --inptu y (see edgeexit run --help)"),
    (["devices", "--jsn"], "unrecognized arguments: --jsn (see edgeexit devices --help)"),
    (["run", "b"], "the following arguments are required: --input (see edgeexit run --help)"),
    (["build", "m.yaml", "--threads", "0"], "argument --threads: 0 is below 1 (see edgeexit build --help)"),
    (["bogus"], "invalid choice: 'bogus'"),
])
def test_usage_errors_point_at_the_commands_own_help(argv, hint, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("edgeexit: error: ") and hint in err
    assert argv[0] != "bogus" or err.rstrip().endswith("(see edgeexit --help)")


def test_more_threads_than_cpus_is_allowed_with_a_warning(monkeypatch, capsys):
    import edgeexit.cli as cli

    monkeypatch.setattr(cli, "_cpus", lambda: 2)
    before = torch.get_num_threads()
    try:
        cli._torch_threads(2)
        assert capsys.readouterr().err == ""
        cli._torch_threads(32)
        assert torch.get_num_threads() == 32  # accepted: the user may know the machine better
    finally:
        torch.set_num_threads(before)
    assert capsys.readouterr().err == ("--threads: warning: 32 threads but this machine has 2 CPUs; more threads than "
                                       "CPUs slows training down\n")
