"""The fleet path's local parts: the playbook's variables, the per-host table, the shipped files.

The playbook itself runs against two loopback devices in tests/test_deploy.py.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeexit.errors import EdgeExitError
from edgeexit.fleet import PLAYBOOK, fleet_options, report

ROOT = Path(__file__).resolve().parents[1]


def test_playbook_variables_arrive_as_strings_and_become_deploy_options():
    opts = fleet_options({"profile": "true", "budget_ms": "2.5", "batch": "8", "iters": 20, "engines": "no",
                          "device": "jetson-orin-nano-8gb", "path": None, "tail": ""})
    assert (opts.profile, opts.budget_ms, opts.batch, opts.iters, opts.engines) == (True, 2.5, 8, 20, False)
    assert opts.device == "jetson-orin-nano-8gb" and opts.path == "/opt/edgeexit" and opts.tail == "mean"
    for bad, message in (({"profile": "maybe"}, "edgeexit_profile: 'maybe' is not true or false"),
                         ({"budget_ms": "fast"}, "edgeexit_budget_ms: 'fast' is not a number"),
                         ({"budget_ms": "-1"}, "edgeexit_budget_ms: -1 must be above 0"),
                         ({"ssh_config": "x"}, "unknown option(s) ssh_config"),
                         ({"tail": "p50"}, "tail 'p50'")):
        with pytest.raises(EdgeExitError, match=message.replace("(", r"\(").replace(")", r"\)")):
            fleet_options(bad)


def _work(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    (work / "hosts").mkdir(parents=True)
    (work / "profiles").mkdir()
    plan = {"tensorrt": "10.3.0", "device": "jetson-orin-nano-8gb", "key": "jetson-orin-nano-8gb-trt10.3",
            "have": True, "stages": 3, "from_cache": 2}
    sent = [{"files": 8, "of": 8, "bytes": 3 << 20, "base": False}, {"files": 2, "of": 8, "bytes": 1 << 19,
                                                                     "base": True}]
    (work / "hosts" / "nano.json").write_text(json.dumps(
        {"device": "jetson-orin-nano-8gb", "installed": True, "uploaded": sent, "engine_set": plan,
         "engines_built": True, "verified": True}))
    (work / "hosts" / "agx.json").write_text(json.dumps(
        {"device": "jetson-agx-orin-64gb", "installed": False, "uploaded": [],
         "failed": {"step": "engines build", "error": "the builder ran out of memory"}}))
    (work / "profiles" / "nano.json").write_text(json.dumps(
        {"batches": {"1": {"end_to_end": {"cascade": {"mean_ms": 0.4321}}}}}))
    (work / "merged.json").write_text(json.dumps(
        {"digest": "d", "keys": {"nano": "onnxruntime@nano"}, "profiles": 1, "thresholds": [0.91234, None],
         "modelled_ms": {"nano": 0.25}}))
    return work


def test_the_table_shows_each_host_and_lists_the_failed_ones(tmp_path):
    table, failed = report(str(_work(tmp_path)), {"gone": "ssh: connect to host gone port 22: Connection refused"})
    rows = {line.split()[0]: line for line in table.splitlines()}
    assert failed == ["agx", "gone"]
    nano = rows["nano"]
    for cell in ("installed", "10 files (3.50 MiB)", "jetson-orin-nano-8gb-trt10.3 (1 built, 2 from the cache)",
                 "0.432", "0.9123, never", "0.250"):
        assert cell in nano
    assert nano.endswith("  ok")
    assert rows["agx"].endswith("FAILED at engines build: the builder ran out of memory") and "up to date" in rows["agx"]
    assert rows["gone"].endswith("FAILED at connect: ssh: connect to host gone port 22: Connection refused")
    assert "worst of 1 device profile(s)" in table


def test_the_playbook_and_role_ship_in_the_package_and_pass_ansibles_syntax_check():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["edgeexit"]
    shipped = [p.relative_to(ROOT / "edgeexit").as_posix() for p in (ROOT / "edgeexit" / "ansible").rglob("*.yml")]
    assert len(shipped) >= 5 and all(any(fnmatch.fnmatch(p, pattern) for pattern in config) for p in shipped)
    playbook = shutil.which("ansible-playbook", path=str(Path(sys.executable).parent)) or shutil.which("ansible-playbook")
    if playbook is None:
        pytest.skip("no ansible-playbook: pip install 'edgeexit[fleet]' (the dev extra has it)")
    done = subprocess.run([playbook, "--syntax-check", "-i", "localhost,", str(PLAYBOOK)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_deploy_arguments_for_one_host_or_a_fleet_are_refused_in_one_line(tmp_path, capsys):
    from edgeexit.cli import main

    inventory = tmp_path / "hosts.yml"
    inventory.write_text("all:\n  hosts:\n    nano-01:\n")
    for argv, message in (([], "deploy: name one HOST or an --inventory"),
                          (["nano-01", "--inventory", str(inventory)], "deploy: name one HOST or an --inventory"),
                          (["nano-01", "--limit", "nano*"], "--limit and --forks go with --inventory"),
                          (["--inventory", str(tmp_path / "none.yml")], "is not a file"),
                          (["--inventory", str(inventory), "-o", "Port=2222"], "set ansible_ssh_common_args"),
                          (["--inventory", str(inventory)], "bundle")):
        assert main(["deploy", str(tmp_path / "no-bundle"), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("edgeexit: error: ") and message in err[0], err
