"""`edgeexit run --input` checked at the door: units far from the training data's are said
(refused with --strict), image files and folders decode as the build decoded, and a file
that is neither names what it is."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeexit.cli import main


def _run(capsys, *args):
    code = main(["run", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def digits_pngs(tmp_path_factory, digits_raw):
    from PIL import Image

    x, _ = digits_raw
    root = tmp_path_factory.mktemp("pngs")
    for i in range(12):  # digits are integers 0..16: an 8-bit grey PNG holds them exactly
        Image.fromarray(x[i, 0].astype(np.uint8), mode="L").save(root / f"{i:02d}.png")
    np.save(root.parent / "pngs.npy", x[:12])
    return root


def test_the_manifest_records_the_training_units(example_build):
    bundle, _ = example_build
    r = bundle.input["range"]
    assert r["min"] == 0.0 and r["max"] == 16.0 and 4 < r["mean"] < 6 and r["span_p01"] > 10
    assert bundle.input["layout"] == "NCHW" and bundle.input["resize"] is None


def test_inputs_in_other_units_warn_naming_the_range_and_strict_refuses(example_build, digits_raw, tmp_path,
                                                                        capsys):
    bundle, _ = example_build
    x, _ = digits_raw
    np.save(tmp_path / "right.npy", x[:40])
    np.save(tmp_path / "scaled.npy", x[:40] / 16)  # 0..1 instead of 0..16
    np.save(tmp_path / "bytes.npy", x[:40] * 16)  # 0..255
    code, out, err = _run(capsys, bundle.path, "--input", tmp_path / "right.npy")
    assert code == 0 and "warning" not in err
    code, out, err = _run(capsys, bundle.path, "--input", tmp_path / "scaled.npy")
    assert code == 0 and "--input: warning: 40 of 40 images" in err and "training data's 0..16" in err
    assert "narrower" in err
    code, out, err = _run(capsys, bundle.path, "--input", tmp_path / "bytes.npy")
    assert code == 0 and "far outside the training data's 0..16" in err
    code, out, err = _run(capsys, bundle.path, "--input", tmp_path / "scaled.npy", "--strict")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "refused (--strict)" in err


def test_a_png_folder_runs_and_matches_the_npy(example_build, digits_pngs, capsys):
    bundle, _ = example_build
    code, out, err = _run(capsys, bundle.path, "--input", digits_pngs.parent / "pngs.npy", "--json")
    assert code == 0
    from_npy = json.loads(out)["samples"]
    code, out, err = _run(capsys, bundle.path, "--input", digits_pngs, "--json")
    assert code == 0 and "warning" not in err
    from_png = json.loads(out)["samples"]
    assert [r["file"] for r in from_png] == [f"{i:02d}.png" for i in range(12)]
    for a, b in zip(from_npy, from_png):
        assert (a["class"], a["exit"]) == (b["class"], b["exit"])
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-6)
    code, out, err = _run(capsys, bundle.path, "--input", digits_pngs / "03.png")
    assert code == 0 and out.splitlines()[1].split()[1] == str(from_npy[3]["class"])


def test_images_the_bundle_cannot_take_are_refused_or_said(example_build, tmp_path, capsys):
    from PIL import Image

    bundle, _ = example_build
    Image.new("L", (24, 24)).save(tmp_path / "big.png")
    code, _, err = _run(capsys, bundle.path, "--input", tmp_path / "big.png")
    assert code == 2 and "is 24x24 (WxH); the model takes 8x8" in err
    Image.new("RGB", (8, 8), (0, 90, 0)).save(tmp_path / "rgb.png")
    code, _, err = _run(capsys, bundle.path, "--input", tmp_path / "rgb.png")
    assert code == 0 and "--input: 1 of 1 images converted RGB -> L" in err


@pytest.mark.parametrize("content, kind", [(b"# a readme\n", "is text"), (b"PK\x03\x04rest", "is a zip archive"),
                                           (b"\x80\x04\x95 pickled", "is a Python pickle"), (b"", "is an empty file")])
def test_a_file_that_is_no_npy_or_image_names_what_it_is(example_build, tmp_path, capsys, content, kind):
    bundle, _ = example_build
    (tmp_path / "input.npy").write_bytes(content)
    code, out, err = _run(capsys, bundle.path, "--input", tmp_path / "input.npy")
    assert code == 2 and out == "" and kind in err and len(err.strip().splitlines()) == 1
