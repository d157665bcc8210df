"""Bundles: manifest contents, the seal, checksums and tree checks on load, safe writes."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from conftest import leftovers, reseal
from edgeexit.bundle import FORMAT, Change, check_output, load_bundle, update_bundle, write_bundle
from edgeexit.atomic import make_staging
from edgeexit.cli import main
from edgeexit.errors import BundleError


def manifest_of(path):
    return json.loads((path / "manifest.json").read_text())


def test_manifest_has_the_contracted_fields(example_build):
    bundle, _ = example_build
    m = bundle.manifest
    assert m["format"] == FORMAT and m["name"] == "digits-eenet"
    assert {k: m["input"][k] for k in ("name", "shape", "dtype", "mean", "std", "layout", "resize")} == {
        "name": "image", "shape": [None, 1, 8, 8], "dtype": "float32", "mean": [4.88], "std": [6.02], "layout": "NCHW",
        "resize": None}
    assert set(m["input"]["range"]) == {"min", "max", "mean", "std", "span_p01"}
    assert m["classes"] == [str(i) for i in range(10)]
    assert [s["index"] for s in m["stages"]] == [0, 1, 2]
    for k, s in enumerate(m["stages"]):
        assert (bundle.path / s["onnx"]).is_file() and s["onnx"] in m["files"]
        assert set(s["outputs"]) == {"carry", "logits", "conf", "pred"}
        assert s["precision"] == "fp32" and s["flops"] > 0 and s["params"] > 0
        assert s["inputs"] == (["image"] if k == 0 else m["stages"][k - 1]["outputs"]["carry"])
    assert m["stages"][-1]["outputs"]["carry"] == []
    assert m["gating"] == {"confidence": "max_softmax", "thresholds": [0.95, 0.9, None]}
    assert m["monolithic"] in m["files"] and m["weights"] in m["files"]
    assert set(m["files"]) == {p.relative_to(bundle.path).as_posix() for p in bundle.path.rglob("*")
                               if p.is_file() and p.name != "manifest.json"}
    assert {"torch", "onnx", "onnxruntime", "onnxsim"} <= set(m["toolchain"])
    assert m["seal"]["algorithm"] == "sha256-canonical-json" and len(m["seal"]["digest"]) == 64


def test_bundle_folders_get_normal_permissions(example_build):
    """Not mkdtemp's 0700: a service user on the device must be able to read the bundle."""
    bundle, _ = example_build
    umask = os.umask(0)
    os.umask(umask)
    for folder in (bundle.path, bundle.path / "stages"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask


def test_tampered_file_is_refused_by_name(bundle_copy):
    stage = bundle_copy / "stages" / "stage1.onnx"
    data = bytearray(stage.read_bytes())
    data[-1] ^= 0xFF
    stage.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"stages/stage1.onnx fails its checksum"):
        load_bundle(bundle_copy)
    load_bundle(bundle_copy, verify=False)  # still readable when asked not to verify the files' digests


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["gating"].update(thresholds=[0.1, 0.1, None]), "gating.thresholds"),
    (lambda m: m["classes"].reverse(), "classes"),
    (lambda m: m["input"].update(std=[1.0]), "input.std"),
    (lambda m: m.update(name="other"), "name"),
    (lambda m: m["stages"][1].update(precision="int8"), "stages[1].precision"),
    (lambda m: m["model"].update(factory="os:system", args={"command": "touch /tmp/pwned"}), "model"),
])
def test_an_edited_manifest_field_is_refused_naming_it(bundle_copy, edit, field, tmp_path, capsys):
    m = manifest_of(bundle_copy)
    edit(m)
    (bundle_copy / "manifest.json").write_text(json.dumps(m, indent=2))
    with pytest.raises(BundleError, match=rf"edited after it was sealed: field {__import__('re').escape(field)}"):
        load_bundle(bundle_copy)
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8), np.float32))
    for argv in (["inspect", str(bundle_copy)], ["run", str(bundle_copy), "--input", str(tmp_path / "x.npy")],
                 ["run", str(bundle_copy), "--input", str(tmp_path / "x.npy"), "--backend", "torch", "--trust-code"]):
        assert main(argv) == 2
        out = capsys.readouterr()
        assert out.out == "" and out.err.count("\n") == 1 and field in out.err


def test_an_added_file_or_folder_is_refused(bundle_copy, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8), np.float32))
    for extra in ("evil.py", "stages/extra.onnx", "sub/"):
        target = bundle_copy / extra
        target.mkdir() if extra.endswith("/") else target.write_text("import os\n")
        with pytest.raises(BundleError, match="not in the manifest|not listed in the manifest"):
            load_bundle(bundle_copy)
        for argv in (["inspect", str(bundle_copy)], ["run", str(bundle_copy), "--input", str(tmp_path / "x.npy")]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and extra.rstrip("/") in err
        shutil.rmtree(target) if extra.endswith("/") else target.unlink()
    load_bundle(bundle_copy)


def test_a_symlink_out_of_the_bundle_is_refused_even_with_a_valid_checksum(bundle_copy, tmp_path, capsys):
    outside = tmp_path / "outside.pt"
    shutil.move(bundle_copy / "weights.pt", outside)
    (bundle_copy / "weights.pt").symlink_to(outside)  # same bytes, same sha256: only the link gives it away
    with pytest.raises(BundleError, match="weights.pt is a symbolic link"):
        load_bundle(bundle_copy)
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8), np.float32))
    for argv in (["inspect", str(bundle_copy)], ["run", str(bundle_copy), "--input", str(tmp_path / "x.npy")]):
        assert main(argv) == 2
        assert "symbolic link" in capsys.readouterr().err
    (bundle_copy / "weights.pt").unlink()
    shutil.move(outside, bundle_copy / "weights.pt")
    (tmp_path / "elsewhere").mkdir()
    (bundle_copy / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(BundleError, match="linked is a symbolic link"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("weights", ["../stolen.pt", "/etc/passwd", "stages/../../x.pt", "./weights.pt"])
def test_a_weights_path_outside_is_refused_even_when_resealed(bundle_copy, weights, tmp_path, capsys):
    m = manifest_of(bundle_copy)
    m["weights"] = weights
    reseal(bundle_copy, m)
    with pytest.raises(BundleError, match=r"weights .* points outside the bundle"):
        load_bundle(bundle_copy)
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8), np.float32))
    for argv in (["inspect", str(bundle_copy)],
                 ["run", str(bundle_copy), "--input", str(tmp_path / "x.npy"), "--backend", "torch"]):
        assert main(argv) == 2
        assert "points outside the bundle" in capsys.readouterr().err


def test_missing_file_unsealed_and_malformed_manifests_are_refused(bundle_copy):
    good = manifest_of(bundle_copy)
    (bundle_copy / "report.json").unlink()
    with pytest.raises(BundleError, match="report.json is missing"):
        load_bundle(bundle_copy)
    shutil.copy(bundle_copy / "weights.pt", bundle_copy / "report.json")
    with pytest.raises(BundleError, match="report.json fails its checksum"):
        load_bundle(bundle_copy)
    cases = [
        (dict(good, format=1), "format 1 is not supported"),
        ({k: v for k, v in good.items() if k != "seal"}, "no valid seal"),
    ]
    for manifest, message in cases:
        (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match=message):
            load_bundle(bundle_copy)
    for text, message in [("42", "holds a JSON int"), ("[1, 2]", "holds a JSON list"), ("{", "not valid JSON"),
                          ('{"format": NaN}', "not valid JSON"), (b"\xff\xfe", "not UTF-8")]:
        (bundle_copy / "manifest.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(BundleError, match=message):
            load_bundle(bundle_copy)
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(bundle_copy / "stages")
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(bundle_copy / "nope")


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(stages="x"), "stages: expected a list"),
    (lambda m: m["stages"][0].update(onnx=3), r"stages\[0\].onnx: expected a string"),
    (lambda m: m["input"].update(std=[0]), r"input.std\[0\]: 0 must be > 0"),
    (lambda m: m["input"].update(shape=[None, 1, 8]), "input.shape"),
    (lambda m: m["gating"].update(thresholds=[0.5, None]), "gating.thresholds: 2 values for 3 stages"),
    (lambda m: m["gating"].update(thresholds=["high", 0.5, None]), r"gating.thresholds\[0\]: expected a finite"),
    (lambda m: m.update(classes=["a", "a"] + m["classes"][2:]), "class names repeat"),
    (lambda m: m["files"].update({"weights.pt": "not-a-digest"}), "files.weights.pt: expected a sha256"),
    (lambda m: m.update(monolithic="manifest.sig"), "no checksum"),
    (lambda m: m.pop("gating"), "gating is missing"),
])
def test_wrongly_typed_fields_are_refused_in_one_line(bundle_copy, edit, message):
    m = manifest_of(bundle_copy)
    edit(m)
    reseal(bundle_copy, m)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)


def _staged(dest, content=b"one"):
    staging = make_staging(dest)
    (staging / "stages").mkdir()
    (staging / "stages" / "a.onnx").write_bytes(content)
    return staging


MINI = {"name": "t", "input": {"name": "x", "shape": [None, 1, 2, 2], "dtype": "float32", "mean": [0], "std": [1]},
        "classes": ["a", "b"], "gating": {"confidence": "max_softmax", "thresholds": [None]},
        "stages": [{"index": 0, "onnx": "stages/a.onnx", "inputs": ["x"],
                    "outputs": {"carry": [], "logits": "l", "conf": "c", "pred": "p"}}],
        "monolithic": "stages/a.onnx", "export": {"batch": {"min": 1, "opt": 1, "max": 4}},
        "target": {"device": "host-cpu", "dla_core": None}}


def test_write_bundle_replaces_a_bundle_atomically_and_nothing_else(tmp_path):
    dest = tmp_path / "out" / "bundle"
    write_bundle(_staged(dest), MINI, dest)
    first = os.stat(dest).st_ino
    write_bundle(_staged(dest, b"two"), MINI, dest)  # swapped in with one renameat2(RENAME_EXCHANGE)
    assert (dest / "stages" / "a.onnx").read_bytes() == b"two" and os.stat(dest).st_ino != first
    assert leftovers(dest.parent) == []  # the old bundle went with the staging folder
    empty = tmp_path / "empty"
    empty.mkdir()
    write_bundle(_staged(empty), MINI, empty)  # an empty folder is a fine output
    load_bundle(empty)


@pytest.mark.parametrize("make, message", [
    (lambda d: (d.mkdir(), (d / "manifest.json").write_text('{"name": "my web app"}')), "not an intact edgeexit"),
    (lambda d: (d.mkdir(), (d / "notes.txt").write_text("keep me")), "not an intact edgeexit"),
    (lambda d: d.write_text("a file"), "is a file"),
])
def test_an_output_that_is_not_a_bundle_is_refused_and_kept(tmp_path, make, message):
    """The reported data loss: a folder with someone else's manifest.json was replaced whole."""
    dest = tmp_path / "precious"
    make(dest)
    before = {p.relative_to(tmp_path).as_posix(): p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    with pytest.raises(BundleError, match=message):
        check_output(dest)
    staging = make_staging(tmp_path / "ok")
    with pytest.raises(BundleError, match=message):
        write_bundle(staging, MINI, dest)
    after = {p.relative_to(tmp_path).as_posix(): p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    assert {k: v for k, v in after.items() if not k.startswith(".")} == before
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BundleError, match="lies under"):
        check_output(tmp_path / "afile" / "bundle")


def test_the_next_write_cleans_leftovers_of_interrupted_writes(tmp_path):
    dest = tmp_path / "bundle"
    write_bundle(_staged(dest), MINI, dest)
    dead = 2 ** 22 + 12345  # above pid_max's default: no such process
    for name in (f".bundle.partial-{dead}-0a1b2c3d", f".bundle.engines-{dead}-ffff0000"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights.pt").write_bytes(b"x" * 10)
    live = tmp_path / f".bundle.partial-{os.getppid()}-00000000"  # a running process's: left alone
    live.mkdir()
    # names edgeexit never writes are the user's, whatever they look like
    mine = [tmp_path / n for n in (".bundle.partial-notes", f".bundle.old-{dead}", ".bundle.old-20240101",
                                   f".bundle.sign-{dead}", f".bundle.partial-{dead}")]
    for folder in mine:
        folder.mkdir()
        (folder / "notes.txt").write_text("backup")
    other = tmp_path / f".other.partial-{dead}-00000000"  # another bundle's: left to its own writes
    other.mkdir()
    write_bundle(_staged(dest), MINI, dest)
    assert leftovers(tmp_path) == sorted([live.name, other.name, *(m.name for m in mine)])


def test_a_killed_writer_not_yet_reaped_leaves_a_leftover_the_next_write_cleans(tmp_path):
    """A zombie (killed, its parent not waiting yet: an orphan where PID 1 reaps late) writes
    nothing more, so its staging folder is a leftover although its PID still exists."""
    import subprocess
    import time

    dest = tmp_path / "bundle"
    write_bundle(_staged(dest), MINI, dest)
    child = subprocess.Popen(["sleep", "60"])
    zombie = tmp_path / f".bundle.partial-{child.pid}-0a1b2c3d"
    zombie.mkdir()
    child.kill()  # not waited for: a zombie until the wait below
    stat = Path(f"/proc/{child.pid}/stat")
    deadline = time.monotonic() + 10
    while stat.read_bytes().rpartition(b")")[2].split()[0] != b"Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        write_bundle(_staged(dest), MINI, dest)
        assert leftovers(tmp_path) == []
    finally:
        child.wait()


def test_a_staging_folder_in_use_elsewhere_is_not_a_leftover(tmp_path):
    """A write from another PID namespace (its PID means nothing here) holds the folder's flock."""
    import fcntl

    dest = tmp_path / "bundle"
    foreign = tmp_path / f".bundle.partial-{2 ** 22 + 7}-0a0b0c0d"  # a PID dead *here*
    foreign.mkdir()
    fd = os.open(foreign, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        write_bundle(_staged(dest), MINI, dest)
        assert foreign.is_dir()
    finally:
        os.close(fd)
    write_bundle(_staged(dest), MINI, dest)  # released: now it is a leftover
    assert not foreign.exists()


def test_the_lock_file_is_never_followed_through_a_link(tmp_path):
    dest = tmp_path / "bundle"
    write_bundle(_staged(dest), MINI, dest)
    target = tmp_path / "elsewhere"
    (tmp_path / ".bundle.lock").unlink()
    (tmp_path / ".bundle.lock").symlink_to(target)
    with pytest.raises(BundleError, match="cannot take the lock .*symbolic link"):
        write_bundle(_staged(dest), MINI, dest)
    assert not target.exists()


def test_updates_merge_instead_of_losing_one(bundle_copy):
    """A `profile` that started before a `calibrate` and finished after it used to revert the
    calibrated thresholds: updates are computed under the lock from the bundle as it is then."""
    started = load_bundle(bundle_copy)  # profile starts
    calibrated = [0.5, 0.6, None]
    update_bundle(load_bundle(bundle_copy), lambda cur: Change(
        {"calibration.json": b"{}\n"}, {"gating": {**cur.manifest["gating"], "thresholds": calibrated},
                                        "calibration": "calibration.json"}))
    update_bundle(started, lambda cur: Change({"profile.json": b'{"profiles": {}}\n'}, {"profile": "profile.json"}))
    final = load_bundle(bundle_copy)
    assert final.thresholds == calibrated and {"profile.json", "calibration.json"} <= set(final.manifest["files"])


def test_a_reseal_refuses_a_bundle_changed_underneath_or_holding_unlisted_files(bundle_copy):
    base = load_bundle(bundle_copy)
    (bundle_copy / "dropped.py").write_text("print('hi')")
    with pytest.raises(BundleError, match="dropped.py is not listed"):
        update_bundle(base, Change({"profile.json": b"{}"}))
    assert "dropped.py" in os.listdir(bundle_copy)  # refused, and nothing removed
    (bundle_copy / "dropped.py").unlink()
    stage = bundle_copy / "stages" / "stage0.onnx"
    stage.write_bytes(stage.read_bytes() + b"\0")  # rebuilt by something else meanwhile, and resealed
    reseal(bundle_copy, manifest_of(bundle_copy), files=True)
    with pytest.raises(BundleError, match="changed while this command ran"):
        update_bundle(base, Change({"profile.json": b"{}"}))
    assert "profile.json" not in manifest_of(bundle_copy)["files"]


def test_a_bundle_of_the_previous_format_may_be_replaced_when_intact(tmp_path):
    """Format 1 (unsealed manifest) bundles from an older edgeexit are still recognised as ours."""
    import hashlib

    old = tmp_path / "old"
    (old / "stages").mkdir(parents=True)
    (old / "stages" / "a.onnx").write_bytes(b"x")
    files = {"stages/a.onnx": hashlib.sha256(b"x").hexdigest()}
    (old / "manifest.json").write_text(json.dumps({"format": 1, "name": "t", "files": files}))
    check_output(old)
    (old / "extra.txt").write_text("mine")
    with pytest.raises(BundleError, match="not an intact edgeexit bundle"):
        check_output(old)
