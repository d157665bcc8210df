"""Bundles: manifest contents, checksums on load, atomic writes."""

from __future__ import annotations

import json
import shutil

import pytest

from edgeexit.bundle import FORMAT, load_bundle, write_bundle
from edgeexit.errors import BundleError


@pytest.fixture()
def bundle_copy(example_build, tmp_path):
    bundle, _ = example_build
    dest = tmp_path / "copy"
    shutil.copytree(bundle.path, dest)
    return dest


def test_manifest_has_the_contracted_fields(example_build):
    bundle, _ = example_build
    m = bundle.manifest
    assert m["format"] == FORMAT and m["name"] == "digits-eenet"
    assert m["input"] == {"name": "image", "shape": [None, 1, 8, 8], "dtype": "float32", "mean": [4.88], "std": [6.02]}
    assert m["classes"] == [str(i) for i in range(10)]
    assert [s["index"] for s in m["stages"]] == [0, 1, 2]
    for k, s in enumerate(m["stages"]):
        assert (bundle.path / s["onnx"]).is_file() and s["onnx"] in m["files"]
        assert set(s["outputs"]) == {"carry", "logits", "conf", "pred"}
        assert s["precision"] == "fp32" and s["flops"] > 0 and s["params"] > 0
        assert s["inputs"] == (["image"] if k == 0 else m["stages"][k - 1]["outputs"]["carry"])
    assert m["stages"][-1]["outputs"]["carry"] == []
    assert m["gating"] == {"confidence": "max_softmax", "thresholds": [0.95, 0.9, None]}
    assert m["monolithic"] in m["files"]
    assert set(m["files"]) == {p.relative_to(bundle.path).as_posix() for p in bundle.path.rglob("*")
                               if p.is_file() and p.name != "manifest.json"}
    assert {"torch", "onnx", "onnxruntime", "onnxsim"} <= set(m["toolchain"])


def test_tampered_file_is_refused_by_name(bundle_copy):
    stage = bundle_copy / "stages" / "stage1.onnx"
    data = bytearray(stage.read_bytes())
    data[-1] ^= 0xFF
    stage.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"stages/stage1.onnx fails its checksum"):
        load_bundle(bundle_copy)
    load_bundle(bundle_copy, verify=False)  # still readable when asked not to verify


def test_missing_file_and_bad_manifest_are_refused(bundle_copy):
    (bundle_copy / "weights.pt").unlink()
    with pytest.raises(BundleError, match="weights.pt is missing"):
        load_bundle(bundle_copy)
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["format"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format 99 is not supported"):
        load_bundle(bundle_copy)
    manifest["format"] = FORMAT
    manifest["monolithic"] = "../../etc/passwd"
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="points outside the bundle"):
        load_bundle(bundle_copy)
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(bundle_copy / "stages")


def test_write_bundle_replaces_a_bundle_but_not_other_folders(tmp_path):
    staging = tmp_path / "staging"
    (staging / "stages").mkdir(parents=True)
    (staging / "stages" / "a.onnx").write_bytes(b"one")
    manifest = {"name": "t", "input": {}, "classes": [], "stages": [], "gating": {}, "monolithic": "stages/a.onnx"}
    dest = tmp_path / "out" / "bundle"
    write_bundle(staging, manifest, dest)
    assert load_bundle(dest).manifest["files"]["stages/a.onnx"]
    (staging / "stages" / "a.onnx").write_bytes(b"two")
    write_bundle(staging, manifest, dest)  # replaces the old bundle in one rename
    assert (dest / "stages" / "a.onnx").read_bytes() == b"two"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["bundle"]  # no partial/old leftovers
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="is not an edgeexit bundle"):
        write_bundle(staging, manifest, other)
    assert (other / "notes.txt").read_text() == "keep me"
