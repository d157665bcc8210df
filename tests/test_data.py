"""Data sources: digits, .npz and image folders, checked against the input section."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import example_raw, write_spec
from edgeexit.data import load_dataset
from edgeexit.errors import SpecError
from edgeexit.spec import load_spec


def _folder_spec(tmp_path, digits_raw, classes=("0", "1", "2"), per_class=12):
    from PIL import Image

    x, y = digits_raw
    root = tmp_path / "images"
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i, image in enumerate(x[y == label][:per_class]):
            Image.fromarray((image[0] * 15).astype(np.uint8), mode="L").save(root / name / f"{i}.png")
    raw = example_raw()
    raw["input"].update(classes=list(classes), mean=[0.0], std=[255.0])
    raw["data"] = {"source": "images", "splits": {"train": 0.5, "val": 0.2, "calibration": 0.1, "test": 0.2}}
    return raw


def test_image_folder_loads_with_labels_from_folder_names(tmp_path, digits_raw):
    pytest.importorskip("PIL")
    spec = load_spec(write_spec(tmp_path, _folder_spec(tmp_path, digits_raw)))
    data = load_dataset(spec)
    total = sum(len(s.y) for s in (data.train, data.val, data.calibration, data.test))
    assert total == 36 and data.train.x.shape[1:] == (1, 8, 8)
    assert set(np.concatenate([data.train.y, data.test.y]).tolist()) <= {0, 1, 2}
    assert data.train.x.max() <= 255 and data.train.x.max() > 100  # pixel units, as the files hold them


def test_image_folder_classes_must_match(tmp_path, digits_raw):
    pytest.importorskip("PIL")
    raw = _folder_spec(tmp_path, digits_raw)
    raw["input"]["classes"] = ["0", "1", "seven"]
    with pytest.raises(SpecError, match=r"has class folders \['0', '1', '2'\], but input.classes is"):
        load_dataset(load_spec(write_spec(tmp_path, raw)))


def test_npz_labels_are_checked(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((20, 1, 8, 8), np.float32), y=np.full(20, 12))
    raw = example_raw()
    raw["data"] = {"source": "d.npz"}
    with pytest.raises(SpecError, match=r"input.classes: 10 classes, but the labels span 12..12"):
        load_dataset(load_spec(write_spec(tmp_path, raw)))


def test_splits_are_disjoint_and_seeded(tmp_path):
    spec = load_spec(write_spec(tmp_path, example_raw()))
    a, b = load_dataset(spec), load_dataset(spec)
    np.testing.assert_array_equal(a.test.x, b.test.x)
    splits = [a.train, a.val, a.calibration, a.test]
    images = [x.tobytes() for s in splits for x in s.x]
    assert len(images) == len(set(images)) == 1797  # digits has no duplicate images: no sample in two splits


def test_image_folder_of_another_size_is_refused_unless_resize_and_then_said(tmp_path, digits_raw):
    pytest.importorskip("PIL")
    raw = _folder_spec(tmp_path, digits_raw)
    raw["input"]["shape"] = [1, 12, 12]  # the files are 8x8
    with pytest.raises(SpecError, match=r"is 8x8 \(WxH\); the model takes 12x12: .*data.resize: true"):
        load_dataset(load_spec(write_spec(tmp_path, raw)))
    raw["data"]["resize"] = True
    data = load_dataset(load_spec(write_spec(tmp_path, raw)))
    assert data.train.x.shape[1:] == (1, 12, 12)
    assert data.notes == ("36 of 36 images resized 8x8 -> 12x12 (bicubic)",)


def test_image_folder_colour_conversion_is_said(tmp_path, digits_raw):
    from PIL import Image

    raw = _folder_spec(tmp_path, digits_raw)
    Image.new("RGB", (8, 8), (10, 200, 30)).save(tmp_path / "images" / "0" / "rgb.png")
    data = load_dataset(load_spec(write_spec(tmp_path, raw)))
    assert "1 of 37 images converted RGB -> L" in data.notes


def test_numpy_bilinear_resize_equals_torch_interpolate():
    import torch
    import torch.nn.functional as F

    from edgeexit.inputs import resize

    rng = np.random.default_rng(0)
    for shape, size in [((3, 1, 8, 8), (32, 32)), ((2, 3, 24, 24), (8, 8)), ((2, 3, 7, 5), (11, 13))]:
        x = rng.normal(size=shape).astype(np.float32)
        ref = F.interpolate(torch.from_numpy(x), size=size, mode="bilinear", align_corners=False).numpy()
        np.testing.assert_allclose(resize(x, size), ref, atol=2e-6)


def test_resized_and_normalised_images_are_laid_out_in_c_order():
    """A backend copies an input laid out otherwise on every call (MobileNetV3-Small at 224x224:
    about 80 us of its 1.6 ms): the preprocessing hands out (N, C, H, W) in memory order."""
    from edgeexit.data import normalize
    from edgeexit.inputs import resize

    x = np.random.default_rng(0).normal(size=(4, 3, 8, 8)).astype(np.float32)
    assert resize(x, (32, 32)).flags.c_contiguous and resize(x, (32, 32))[1:2].flags.c_contiguous
    fortran = np.asfortranarray(x)
    out = normalize(fortran, [1.0, 2.0, 3.0], [2.0, 2.0, 2.0])
    assert out.flags.c_contiguous and out.dtype == np.float32
    np.testing.assert_array_equal(out, (x - np.array([1, 2, 3], np.float32)[:, None, None]) / 2)


def test_a_bundles_digits_without_scikit_learn_names_the_install_and_data(monkeypatch, tmp_path):
    """trace, profile and calibrate on a bundle built from digits, where scikit-learn is not
    installed (a device's runtime install): the message gives both ways out."""
    import sys

    from edgeexit.data import bundle_split
    from edgeexit.errors import EdgeExitError

    manifest = {"input": {"name": "image", "shape": [1, 1, 8, 8], "dtype": "float32", "mean": [4.88], "std": [6.02]},
                "classes": [str(i) for i in range(10)],
                "data": {"source": "digits", "splits": {"train": 0.6, "val": 0.15, "calibration": 0.1, "test": 0.15},
                         "seed": 0, "resize": False}}
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(EdgeExitError, match=r"^data: the bundle's data is scikit-learn's digits, which is not installed "
                                            r"here: pip install 'edgeexit\[digits\]', or pass --data FILE.npz"):
        bundle_split(manifest, "test")
    x = np.zeros((4, 8, 8), np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(4, np.int64))
    assert bundle_split(manifest, "test", tmp_path / "d.npz").x.shape == (4, 1, 8, 8)  # --data needs no scikit-learn
