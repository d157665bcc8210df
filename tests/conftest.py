"""Shared fixtures: the shipped digits example built once, and small specs for edge cases."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits" / "model.yaml"
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def example_build(tmp_path_factory):
    """The README's main job: `edgeexit build` on the shipped example, unchanged."""
    from edgeexit.build import build
    from edgeexit.spec import load_spec

    out = tmp_path_factory.mktemp("example") / "bundle"
    bundle, report = build(load_spec(EXAMPLE), out, progress=False)
    return bundle, report


@pytest.fixture()
def bundle_copy(example_build, tmp_path):
    """A private copy of the example bundle (tests that update or tamper with it)."""
    dest = tmp_path / "bundle"
    shutil.copytree(example_build[0].path, dest)
    return dest


@pytest.fixture(scope="session")
def digits_raw():
    """Raw digits images (N, 1, 8, 8) in pixel units and labels, straight from scikit-learn."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32)[:, None], d.target.astype(np.int64)


def example_raw() -> dict:
    """The shipped example yaml as a dict, to derive variants from."""
    return yaml.safe_load(EXAMPLE.read_text())


def write_spec(folder: Path, raw: dict) -> Path:
    """Write a yaml variant into `folder` (relative paths then resolve there)."""
    path = folder / "model.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture()
def twoscale_spec(tmp_path, digits_raw):
    """A spec using the two-scale test model via a user factory and an .npz data source."""
    shutil.copy(TESTS / "twoscale_model.py", tmp_path / "twoscale_model.py")
    x, y = digits_raw
    np.savez(tmp_path / "digits.npz", x=x[:, 0], y=y)  # (N, H, W): the loader adds the channel axis
    raw = example_raw()
    raw.update(name="twoscale", model={"factory": "twoscale_model:build", "args": {"width": 6, "depth": 3}},
               data={"source": "digits.npz", "seed": 1}, train={"epochs": 3, "seed": 0}, output="out/twoscale")
    yield write_spec(tmp_path, raw)
    sys.modules.pop("twoscale_model", None)


def reseal(bundle_dir: Path, manifest: dict, files: bool = False) -> None:
    """Write `manifest` into a bundle with a valid seal (and, with `files`, fresh checksums of
    what is on disk): what a forger who knows the format does. The checks that do not rest on
    the seal (paths, links, unlisted files, types) must still refuse what it hides."""
    from edgeexit.bundle import checksums
    from edgeexit.seal import sealed

    if files:
        manifest = {**manifest, "files": checksums(bundle_dir)}
    (bundle_dir / "manifest.json").write_text(json.dumps(sealed(manifest), indent=2))


def leftovers(folder: Path) -> list[str]:
    """Hidden staging folders beside a bundle (the lock file is meant to stay)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


@pytest.fixture(scope="session")
def small_spec(tmp_path_factory):
    """A tiny variant of the example (1 epoch, width 8), built once into `out` beside its yaml:
    for tests that build, kill and attack bundles many times."""
    from edgeexit.cli import main

    folder = tmp_path_factory.mktemp("small")
    raw = example_raw()
    raw.update(model={"arch": "eenet_resnet", "args": {"widths": [8, 8, 8], "depths": [1, 1, 1], "exit_pool": 2}},
               train={**raw["train"], "epochs": 1}, output="out")
    spec = write_spec(folder, raw)
    assert main(["build", str(spec), "--quiet"]) == 0
    return spec


# Tests that build, train or install are `slow`: `pytest -m "not slow"` runs the rest in about a
# minute. A test is slow when it uses one of these fixtures or lives in one of these modules;
# others that build by themselves carry @pytest.mark.slow.
SLOW_FIXTURES = {"example_build", "small_spec", "bundle_copy", "engines_bundle", "twoscale_spec", "runtime_venv",
                 "int8_build", "int8_stages"}
SLOW_MODULES = {"test_zoo", "test_crash_safety", "test_hostile", "test_runtime_install"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.module.__name__.rpartition(".")[2] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
