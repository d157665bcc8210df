"""`edgeexit deploy` against loopback devices: real OpenSSH sshd on 127.0.0.1 (tests/loopback.py).

The device runs edgeexit from a venv that deploy installs from a wheel built here, the engine
step runs against the TensorRT simulator, profiling runs onnxruntime. Killing an upload, a
failing step and a refused pre-flight each leave the device's bundle as it was.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loopback import sshd_missing, start_device

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sshd_missing() is not None, reason=str(sshd_missing()))]


@pytest.fixture(scope="module")
def devices(tmp_path_factory):
    """Two loopback Jetsons in one ssh_config: an Orin Nano (dev-a) and an AGX Orin (dev-b) whose
    pip reaches no index (its runtime needs --wheelhouse)."""
    root = tmp_path_factory.mktemp("fleet")
    config = root / "ssh_config"
    config.write_text("")
    started = {}
    try:
        for name, board in (("dev-a", "orin-nano"), ("dev-b", "agx-orin")):
            started[name] = start_device(root / name, name, board, config, offline=name == "dev-b")
        yield started
    finally:
        for device in started.values():
            device.stop()


@pytest.fixture(scope="module")
def local(example_build, tmp_path_factory):
    """The example bundle, copied once for this module's deploys (they update it)."""
    dest = tmp_path_factory.mktemp("local") / "bundle"
    shutil.copytree(example_build[0].path, dest)
    return dest


def _deploy(local, device, *extra, capsys=None) -> str:
    from edgeexit.cli import main

    argv = ["deploy", str(local), device.name, "--path", str(device.home), "--ssh-config", str(device.config),
            "--backend", "onnxruntime", "--iters", "20", *extra]
    assert main(argv) == 0
    return capsys.readouterr().out if capsys is not None else ""


def _live(local, device):
    from edgeexit.bundle import load_bundle

    return load_bundle(device.home / load_bundle(local).name)


def _deployed(local, device):
    """The device's bundle, deploying first when this test runs alone."""
    if not (device.home / "digits-eenet").exists():
        _deploy(local, device)
    return _live(local, device)


def test_deploy_profiles_calibrates_on_the_device_and_a_second_deploy_uploads_nothing(local, devices, capsys):
    from calibration.latency import from_profile
    from edgeexit.bundle import load_bundle
    from edgeexit.calibrate import cheapest_call, full_depth_call
    from edgeexit.deploy import manifest_digest
    from edgeexit.export.engine_cache import ENTRY

    dev = devices["dev-a"]
    out = _deploy(local, dev, "--profile", capsys=capsys)
    assert "runtime installed" in out and "engines: jetson-orin-nano-8gb-trt10.3" in out
    live = _live(local, dev)  # verified: every checksum, the engines included
    assert "jetson-orin-nano-8gb-trt10.3" in live.manifest["engines"]
    cache = [p for p in (dev.home / "engine-cache").iterdir() if (p / ENTRY).is_file()]
    assert len(cache) == 4  # three stage plans and the fused cascade plan
    key = "onnxruntime@NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"
    entry = json.loads((local / "profile.json").read_text())["profiles"][key]
    assert set(entry["batches"]) == {"1", "8", "32"} and entry["machine"]["jetson"]["l4t"] == "36.4.3"
    assert not list(dev.home.glob("*.profile-data.npz"))  # the test split sent for profiling is gone again

    lat = from_profile(entry, key)
    budget_ms = round((cheapest_call(lat, 1) + full_depth_call(lat, 1)) / 2 * 1e3, 6)
    out = _deploy(local, dev, "--profile", "--budget-ms", str(budget_ms), capsys=capsys)
    assert "runtime up to date" in out
    mine, theirs = load_bundle(local), _live(local, dev)
    record = json.loads((local / "calibration.json").read_text())
    assert record["latency"]["source"] == f"profile.json[{key}]"
    assert record["budget"]["ms"] == pytest.approx(budget_ms, rel=1e-6)
    assert record["fit"]["mean_ms"] <= budget_ms * 1.0001  # fitted on the device profile (test: held out)
    assert theirs.manifest["gating"]["thresholds"] == mine.manifest["gating"]["thresholds"] == record["thresholds"]
    assert (dev.home / "digits-eenet" / "calibration.json").read_bytes() == (local / "calibration.json").read_bytes()
    assert manifest_digest(theirs) == manifest_digest(mine)  # the same bundle on both ends
    assert "jetson-orin-nano-8gb-trt10.3" in theirs.manifest["engines"]  # the device's plans survived the push

    manifest = dev.home / "digits-eenet" / "manifest.json"
    before = manifest.stat().st_ino
    out = _deploy(local, dev, capsys=capsys)
    assert "0 file(s) uploaded" in out and "runtime up to date" in out and "(kept)" in out
    assert manifest.stat().st_ino == before  # nothing was switched


def _receive(dev, live_name):
    """An ssh process running `remote receive` of a bundle into the device's next-version slot."""
    cmd = (f"{dev.home}/venv/bin/python -m edgeexit.remote receive {dev.home}/.{live_name}.next "
           f"--base {dev.home}/{live_name}")
    return subprocess.Popen(["ssh", "-F", str(dev.config), dev.name, cmd], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _receivers(dev) -> list[int]:
    done = subprocess.run(["pgrep", "-f", f"edgeexit.remote receive {dev.home}"], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()]


def _wait(condition, seconds=20):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_killing_an_upload_leaves_the_device_bundle_intact(local, devices, tmp_path):
    from edgeexit.archive import pack

    dev = devices["dev-a"]
    before = _deployed(local, dev).manifest
    data = pack(local, tmp_path / "b.tar").path.read_bytes()

    cut = _receive(dev, "digits-eenet")  # the connection dies mid-upload
    cut.stdin.write(data[: len(data) // 2])
    cut.stdin.flush()
    _wait(lambda: any((dev.home).glob("*.upload-*")))
    cut.kill()
    _wait(lambda: not _receivers(dev))
    assert _live(local, dev).manifest == before
    assert not (dev.home / ".digits-eenet.next").exists()
    assert not list(dev.home.glob("*.upload-*"))  # the device cleaned its spool (SIGHUP)

    killed = _receive(dev, "digits-eenet")  # the receiving process itself is killed
    killed.stdin.write(data[: len(data) // 3])
    killed.stdin.flush()
    _wait(lambda: any((dev.home).glob("*.upload-*")) and _receivers(dev))
    for pid in _receivers(dev):
        subprocess.run(["kill", "-KILL", str(pid)])
    killed.kill()
    _wait(lambda: not _receivers(dev))
    assert _live(local, dev).manifest == before
    assert len(list(dev.home.glob("*.upload-*"))) == 1  # SIGKILL: nothing could clean up

    whole = _receive(dev, "digits-eenet")  # the next upload clears the dead one's spool
    out, err = whole.communicate(data, timeout=120)
    assert whole.returncode == 0, err.decode()
    assert not list(dev.home.glob("*.upload-*"))
    assert json.loads(out)["bundle"].endswith(".digits-eenet.next")
    assert _live(local, dev).manifest == before  # receiving never touches the running bundle


def test_killing_a_receive_mid_unpack_leaves_the_device_bundle_intact(local, devices, tmp_path):
    """The receiving process is stopped while it unpacks (its staging folder exists beside DIR)
    and then killed: the running bundle stays whole, and the next upload clears the leftover."""
    import os
    import threading

    from edgeexit.archive import pack
    from edgeexit.bundle import Change, load_bundle, update_bundle

    dev = devices["dev-a"]
    before = _deployed(local, dev).manifest
    shutil.rmtree(dev.home / ".digits-eenet.next", ignore_errors=True)  # a version an earlier test received
    big = tmp_path / "big"
    shutil.copytree(local, big)
    update_bundle(load_bundle(big), Change({"extra/payload.bin": os.urandom(96 << 20)}, {}))  # a long unpack
    data = pack(big, tmp_path / "big.tar").path.read_bytes()

    proc = _receive(dev, "digits-eenet")
    threading.Thread(target=lambda: (proc.stdin.write(data), proc.stdin.close()), daemon=True).start()
    partial = lambda: list(dev.home.glob("..digits-eenet.next.partial-*"))  # noqa: E731
    deadline = time.monotonic() + 60
    while not partial():
        assert time.monotonic() < deadline and proc.poll() is None, "the unpack phase was never seen"
        time.sleep(0.002)
    receivers = _receivers(dev)
    for pid in receivers:
        subprocess.run(["kill", "-STOP", str(pid)])
    assert receivers and partial()  # frozen mid-unpack
    for pid in receivers:
        subprocess.run(["kill", "-KILL", str(pid)])
    proc.kill()
    _wait(lambda: not _receivers(dev))
    assert _live(local, dev).manifest == before  # loads and verifies every checksum
    assert not (dev.home / ".digits-eenet.next").exists() and partial()  # SIGKILL: the staging folder is left

    whole = _receive(dev, "digits-eenet")  # the next upload removes the dead one's staging folder
    out, err = whole.communicate(pack(local, tmp_path / "b.tar").path.read_bytes(), timeout=120)
    assert whole.returncode == 0, err.decode()
    assert not partial() and _live(local, dev).manifest == before
    shutil.rmtree(dev.home / ".digits-eenet.next")


def test_a_failing_step_names_host_and_step_and_keeps_the_previous_bundle(local, devices, tmp_path, capsys):
    from edgeexit.bundle import Change, load_bundle, update_bundle
    from edgeexit.cli import main

    dev = devices["dev-a"]
    before = _deployed(local, dev).manifest
    changed = tmp_path / "changed"
    shutil.copytree(local, changed)
    bundle = load_bundle(changed)
    update_bundle(bundle, Change({}, {"gating": {**bundle.manifest["gating"], "thresholds": [0.5, 0.5, None]}}))
    argv = ["deploy", str(changed), dev.name, "--path", str(dev.home), "--ssh-config", str(dev.config),
            "--device", "jetson-nano"]  # JetPack 4: its TensorRT is too old for engines
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "edgeexit: error: deploy: dev-a: engines failed" in err and "older than 8.5" in err
    assert "upload: " in err and ".digits-eenet.next" in err  # the new version was made beside the old one
    live = _live(local, dev)
    assert live.manifest == before and live.manifest["gating"]["thresholds"] != [0.5, 0.5, None]

    main([*argv[:-2], "--no-engines"])  # the same bundle without the engine step goes in
    assert _live(local, dev).manifest["gating"]["thresholds"] == [0.5, 0.5, None]
    assert not (dev.home / ".digits-eenet.next").exists()
    _deploy(local, dev)  # and back


def test_preflight_and_connection_failures_are_one_line_naming_the_host(local, devices, tmp_path, capsys):
    from edgeexit.cli import main

    dev = devices["dev-b"]
    old = tmp_path / "python3.8"  # an interpreter too old for edgeexit, as JetPack 5 ships: the real probe runs
    old.write_text(f"#!{sys.executable}\nimport sys\nsys.version_info = (3, 8, 10, 'final', 0)\n"
                   "code, sys.argv = sys.argv[2], ['-c', *sys.argv[3:]]\nexec(code, {'__name__': '__main__'})\n")
    old.chmod(0o755)
    base = ["deploy", str(local), dev.name, "--ssh-config", str(dev.config)]
    assert main([*base, "--path", str(dev.home), "--python", str(old)]) == 2
    err = capsys.readouterr().err
    assert "deploy: dev-b: pre-flight: " in err and "is Python 3.8.10; edgeexit needs 3.10+ (--python names" in err
    assert not dev.home.exists()  # nothing was written there

    controls = set(Path("/tmp").glob("ee-ssh-*"))
    assert main([*base, "--path", "relative/path"]) == 2
    assert "--path: 'relative/path' must be an absolute path" in capsys.readouterr().err
    assert set(Path("/tmp").glob("ee-ssh-*")) <= controls  # the ssh control folder went with the refusal
    assert main([*base, "--path", "/proc/edgeexit"]) == 2
    assert "deploy: dev-b: pre-flight: cannot write /proc/edgeexit: " in capsys.readouterr().err

    (tmp_path / "cfg").write_text(dev.config.read_text() + "Host dev-gone\n  HostName 127.0.0.1\n  Port 9\n")
    assert main(["deploy", str(local), "dev-gone", "--ssh-config", str(tmp_path / "cfg")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("edgeexit: error: deploy: dev-gone: pre-flight: ssh failed (")


def _inventory(path, devices, extra=None, **host_vars) -> Path:
    """An Ansible inventory of the loopback devices: ssh reads their ssh_config, each has its own
    DIR (the edgeexit_path host variable), modules run on this Python; `host_vars` add to a host's."""
    import yaml

    hosts = {name: {"ansible_ssh_common_args": f"-F {d.config}", "edgeexit_path": str(d.home),
                    "ansible_python_interpreter": sys.executable, **host_vars.get(name.replace("-", "_"), {})}
             for name, d in devices.items()}
    path.write_text(yaml.safe_dump({"all": {"children": {"jetsons": {"hosts": {**hosts, **(extra or {})}}}}}))
    return path


def _rows(out: str) -> dict[str, str]:
    """The fleet table's rows by host."""
    lines = out.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("host "))
    return {line.split()[0]: line for line in lines[start + 1:]
            if line and not line.startswith(("thresholds calibrated ", "merge and calibration "))}


def test_the_fleet_playbook_collects_a_profile_per_device_and_calibrates_for_both(local, devices, tmp_path, capsys):
    pytest.importorskip("ansible_runner", reason="pip install 'edgeexit[fleet]' (the dev extra has it)")
    from calibration.latency import from_profile
    from edgeexit.bundle import load_bundle
    from edgeexit.calibrate import cheapest_call, full_depth_call
    from edgeexit.cli import main
    from edgeexit.deploy import manifest_digest

    fleet = tmp_path / "fleet" / "digits-eenet"
    shutil.copytree(local, fleet)
    inventory = _inventory(tmp_path / "hosts.yml", devices)
    argv = ["deploy", str(fleet), "--inventory", str(inventory), "--backend", "onnxruntime", "--iters", "20"]
    wheelhouse = _wheelhouse(tmp_path)  # dev-b is offline
    assert main([*argv, "--profile", "--wheelhouse", str(wheelhouse)]) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    keys = {"dev-a": "onnxruntime@NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super",
            "dev-b": "onnxruntime@NVIDIA Jetson AGX Orin Developer Kit"}
    profiles = json.loads((fleet / "profile.json").read_text())["profiles"]
    assert set(keys.values()) <= set(profiles)  # one entry per device, each from its own board
    assert profiles[keys["dev-b"]]["machine"]["jetson"]["model"] == "NVIDIA Jetson AGX Orin Developer Kit"
    rows = _rows(out)
    assert set(rows) == {"dev-a", "dev-b"} and all(r.endswith("  ok") for r in rows.values()), out
    assert "jetson-agx-orin-64gb-trt10.3 (3 built, 0 from the cache)" in rows["dev-b"]
    assert "dev-b: runtime: pip install: changed" in err and "  installed  " in rows["dev-b"]  # offline, from the wheels
    for name, device in devices.items():
        assert f"{name}: pre-flight: ok" in err and f"{name}: profile: ok" in err and f"{name}: switch: changed" in err
        assert _digest(fleet, device) == manifest_digest(load_bundle(fleet))[0]  # verified, and equal, on both ends
        left = {p.name for p in device.home.glob(".digits-eenet.*")} - {".digits-eenet.lock"}
        assert not left  # no next version, sent archive, spool or test split

    worst = [from_profile(profiles[k], k) for k in keys.values()]
    budget_ms = round((max(cheapest_call(m, 1) for m in worst) + max(full_depth_call(m, 1) for m in worst)) / 2e-3, 6)
    assert main([*argv, "--budget-ms", str(budget_ms)]) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    record = json.loads((fleet / "calibration.json").read_text())
    sources = [f"profile.json[{k}]" for k in keys.values()]
    assert record["latency"]["source"] == "worst of " + ", ".join(sources)
    assert set(record["devices"]) == set(sources)
    assert all(d["mean_ms"] <= record["test"]["mean_ms"] + 1e-9 for d in record["devices"].values())
    assert record["fit"]["mean_ms"] <= budget_ms * 1.0001  # the worst-of fit holds the budget on every device
    mine = load_bundle(fleet)
    shown = ", ".join("never" if t is None else f"{t:.4g}" for t in record["thresholds"])
    for name, device in devices.items():
        assert _live(fleet, device).manifest["gating"]["thresholds"] == record["thresholds"]
        assert _digest(fleet, device) == manifest_digest(mine)[0]
        assert shown in _rows(out)[name] and "(kept)" in _rows(out)[name]
    assert "pip install" not in err  # the runtime was up to date

    gone = {"dev-gone": {"ansible_host": "127.0.0.1", "ansible_port": 9, "ansible_python_interpreter": sys.executable}}
    inventory = _inventory(tmp_path / "hosts.yml", devices, gone, dev_a={"edgeexit_engines": False})
    assert main(argv) == 2
    out, err = capsys.readouterr()
    rows = _rows(out)
    assert "0 files (0.00 MiB)" in rows["dev-a"] and rows["dev-a"].endswith("  ok") and rows["dev-b"].endswith("  ok")
    assert "(kept)" not in rows["dev-a"] and "(kept)" in rows["dev-b"]  # dev-a's own edgeexit_engines: false
    assert "FAILED at connect: " in rows["dev-gone"] and "port 9" in rows["dev-gone"]
    assert "edgeexit: error: deploy: 1 host(s) failed: dev-gone" in err

    before = _live(fleet, devices["dev-b"]).manifest  # a budget no device can hold: nothing is switched
    assert main([*argv, "--limit", "dev-b", "--budget-ms", "0.0001"]) == 2
    out, err = capsys.readouterr()
    assert set(_rows(out)) == {"dev-b"} and _rows(out)["dev-b"].endswith("not switched: merge failed")
    assert "no device was switched: --budget-ms: 0.0001 ms cannot hold" in out
    assert _live(fleet, devices["dev-b"]).manifest == before


def _wheelhouse(tmp_path) -> Path:
    """edgeexit's requirements as wheels for this machine's Python, as `pip download` gives them."""
    from edgeexit.wheel import build_wheel

    house = tmp_path / "wheelhouse"
    wheel = build_wheel(tmp_path)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "-d", str(house), str(wheel)], check=True)
    (house / wheel.name).unlink()
    return house


def _digest(bundle, device) -> str:
    from edgeexit.deploy import manifest_digest

    return manifest_digest(_live(bundle, device))[0]
