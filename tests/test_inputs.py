"""What comes in from outside: non-finite numbers, large inputs, and code named by a bundle."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tracemalloc

import numpy as np
import pytest
import yaml

import edgeexit.cli as cli
from conftest import TESTS, reseal
from edgeexit.cli import main
from edgeexit.errors import SpecError
from edgeexit.spec import load_spec


def test_nan_and_inf_are_refused_in_every_numeric_yaml_field(small_spec, tmp_path):
    raw = yaml.safe_load(small_spec.read_text())
    for path, value in [("input.std", ".inf"), ("input.mean", "-.inf"), ("train.lr", ".nan"),
                        ("gating.thresholds", "[.nan, 0.9, null]"), ("budget.latency_ms", ".inf"),
                        ("export.parity_atol", ".nan"), ("model.args.exit_pool", ".nan")]:
        text = yaml.safe_dump(raw, sort_keys=False)
        section, _, key = path.rpartition(".")
        doc = yaml.safe_load(text)
        node = doc
        for part in section.split("."):
            node = node.setdefault(part, {})
        node[key] = "__X__"
        (tmp_path / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False).replace("__X__", value))
        with pytest.raises(SpecError, match=r"(nan|inf) is not a finite number"):
            load_spec(tmp_path / "model.yaml")


def test_nonfinite_images_are_refused_naming_them_unless_allowed(small_spec, tmp_path, capsys):
    bundle = small_spec.parent / "out"
    x = np.ones((10, 1, 8, 8), np.float32)
    x[3, 0, 1, 1] = np.nan
    x[7, 0, 0, 0] = np.inf
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(bundle), "--input", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert "2 of 10 samples (3, 7) contain NaN or Inf" in err and err.count("\n") == 1
    assert main(["run", str(bundle), "--input", str(tmp_path / "x.npy"), "--allow-nonfinite", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["samples"]  # strict JSON: NaN became null
    assert rows[3]["confidence"] is None and rows[0]["confidence"] is not None and len(rows) == 10
    # no class for a NaN confidence: argmax over NaNs says 0, which is no answer
    assert rows[3]["class"] is None and rows[3]["label"] is None
    assert rows[0]["class"] is not None and rows[0]["label"] == str(rows[0]["class"])
    assert main(["run", str(bundle), "--input", str(tmp_path / "x.npy"), "--allow-nonfinite"]) == 0
    table = {int(line.split()[0]): line.split() for line in capsys.readouterr().out.splitlines()[1:]
             if line.split()[0].isdigit()}
    assert table[3][1] == "-" and table[3][3] == "nan" and table[0][1] == str(rows[0]["class"])


def test_run_streams_a_large_input_chunk_by_chunk(small_spec, tmp_path, capsys, monkeypatch):
    """A memory-mapped .npy normalised and run one chunk at a time: peak memory near one chunk
    (the reported case: a 2 GB array peaked at 3x its size), the same answers as in one piece."""
    bundle = small_spec.parent / "out"
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 16, size=(65536, 1, 8, 8)).astype(np.float32)  # 16 MiB
    np.save(tmp_path / "big.npy", x)
    np.save(tmp_path / "head.npy", x[:3000])
    assert main(["run", str(bundle), "--input", str(tmp_path / "head.npy"), "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)["samples"]
    monkeypatch.setattr(cli, "CHUNK_BYTES", 1 << 18)  # 1024 images a chunk
    assert main(["run", str(bundle), "--input", str(tmp_path / "head.npy"), "--json"]) == 0
    chunked = json.loads(capsys.readouterr().out)["samples"]
    assert [(r["class"], r["exit"]) for r in chunked] == [(r["class"], r["exit"]) for r in whole]
    np.testing.assert_allclose([r["confidence"] for r in chunked], [r["confidence"] for r in whole], atol=1e-6)
    monkeypatch.setattr(cli, "CHUNK_BYTES", 1 << 20)
    with open(os.devnull, "w") as sink:
        monkeypatch.setattr(sys, "stdout", sink)
        tracemalloc.start()
        try:
            assert main(["run", str(bundle), "--input", str(tmp_path / "big.npy")]) == 0
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < x.nbytes / 4, f"peak {peak / 2**20:.1f} MiB for a {x.nbytes / 2**20:.0f} MiB input"


@pytest.fixture()
def factory_bundle(tmp_path, digits_raw):
    """A bundle of the two-scale test model built through `model.factory` from the yaml's folder."""
    folder = tmp_path / "src"
    folder.mkdir()
    shutil.copy(TESTS / "twoscale_model.py", folder / "user_twoscale.py")  # not on the tests' sys.path
    x, y = digits_raw
    np.savez(folder / "digits.npz", x=x[:400, 0], y=y[:400])
    raw = {"name": "two", "model": {"factory": "user_twoscale:build", "args": {"width": 4, "depth": 2}},
           "input": {"shape": [1, 8, 8], "mean": [4.88], "std": [6.02], "classes": [str(i) for i in range(10)]},
           "data": {"source": "digits.npz"}, "train": {"epochs": 1}, "output": str(tmp_path / "bundle")}
    (folder / "model.yaml").write_text(yaml.safe_dump(raw))
    assert main(["build", str(folder / "model.yaml"), "--quiet"]) == 0
    sys.modules.pop("user_twoscale", None)
    np.save(tmp_path / "x.npy", x[:5])
    yield tmp_path / "bundle", folder, tmp_path / "x.npy"
    sys.modules.pop("user_twoscale", None)


def test_a_factory_bundle_runs_code_only_when_trusted_and_installed(factory_bundle, capsys, monkeypatch):
    bundle, src, x = factory_bundle
    capsys.readouterr()
    assert main(["run", str(bundle), "--input", str(x), "--backend", "torch"]) == 2
    assert "pass --trust-code" in capsys.readouterr().err
    assert main(["run", str(bundle), "--input", str(x), "--backend", "torch", "--trust-code"]) == 2
    err = capsys.readouterr().err  # the yaml's folder is not on sys.path, nor the current one
    assert "cannot import 'user_twoscale'" in err and "(is it installed, or on PYTHONPATH? the current folder is not searched)" in err
    assert main(["run", str(bundle), "--input", str(x)]) == 0  # onnxruntime needs no code at all
    capsys.readouterr()
    monkeypatch.syspath_prepend(str(src))  # "installed": importable where it runs
    assert main(["run", str(bundle), "--input", str(x), "--backend", "torch", "--trust-code"]) == 0
    capsys.readouterr()


def test_a_bundle_never_imports_code_it_carries(factory_bundle, capsys, monkeypatch, tmp_path):
    bundle, src, x = factory_bundle
    (bundle / "user_twoscale.py").write_text("open('PWNED', 'w').close()\n" + (src / "user_twoscale.py").read_text())
    m = json.loads((bundle / "manifest.json").read_text())
    reseal(bundle, m, files=True)  # listed and checksummed: only the import rule stands in the way
    monkeypatch.chdir(bundle)
    monkeypatch.syspath_prepend(str(bundle))  # even where the bundle is importable (python -c from inside it)
    assert main(["run", str(bundle), "--input", str(x), "--backend", "torch", "--trust-code"]) == 2
    assert "would be imported from inside the bundle" in capsys.readouterr().err
    assert not (bundle / "PWNED").exists()


def test_a_missing_factory_module_says_where_it_is_looked_for(tmp_path, monkeypatch):
    from edgeexit.models.registry import resolve_factory

    hint = "(is it installed, or on PYTHONPATH? the current folder is not searched)"
    with pytest.raises(SpecError, match=r"cannot import 'edgeexit_no_such_net'.*" + re.escape(hint)):
        resolve_factory("edgeexit_no_such_net:build", None)  # a bundle's factory: only installed modules
    with pytest.raises(SpecError) as exc:
        resolve_factory("edgeexit_no_such_net:build", tmp_path)  # a yaml's: its folder is searched
    assert "cannot import" in str(exc.value) and hint not in str(exc.value)
    (tmp_path / "edgeexit_needs_dep.py").write_text("import edgeexit_no_such_dep\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(SpecError) as exc:  # found, but a module it imports is not: no hint about paths
            resolve_factory("edgeexit_needs_dep:build", None)
    finally:
        sys.modules.pop("edgeexit_needs_dep", None)
    assert "No module named 'edgeexit_no_such_dep'" in str(exc.value) and hint not in str(exc.value)
