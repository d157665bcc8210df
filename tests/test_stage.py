"""`edgeexit stage BUNDLE ROOTFS`: a bundle, its wheels and a first-boot unit in an L4T rootfs.

The rootfs is a small stand-in tree (etc/nv_tegra_release, usr/lib, python3 -> python3.10 with
ensurepip, etc/systemd/system) beside a stand-in flash.sh; the edgeexit wheel is a fake one
(`edgeexit.wheel.build_wheel` monkeypatched) except in the one slow test that builds the real one.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, reseal
from edgeexit.archive import archive_contents
from edgeexit.bundle import Change, load_bundle, update_bundle
from edgeexit.cli import main
from edgeexit.errors import EdgeExitError
from edgeexit.flash import (MARKER, UNIT, check_prefix, flash_command, unit_name, wheel_requirements,
                            wheel_warnings)
from edgeexit.seal import seal_digest

RELEASE_36_4_3 = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8\n"
FAKE_REQUIRES = ("numpy>=1.23", "onnx>=1.14", "PyYAML>=6.0", 'torch>=2.1; extra == "build"')


def fake_wheel(folder: Path, requires=FAKE_REQUIRES) -> Path:
    """A small edgeexit wheel: a METADATA with Requires-Dist lines, nothing else."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "edgeexit-0.1.0-py3-none-any.whl"
    meta = "Metadata-Version: 2.1\nName: edgeexit\nVersion: 0.1.0\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("edgeexit-0.1.0.dist-info/METADATA", meta)
    return path


@pytest.fixture()
def wheel_builds(monkeypatch):
    """`build_wheel` replaced by one that writes the fake wheel; the list holds each wheel built."""
    import edgeexit.wheel

    built: list[Path] = []
    monkeypatch.setattr(edgeexit.wheel, "build_wheel", lambda dest: built.append(fake_wheel(Path(dest))) or built[-1])
    return built


def make_rootfs(base: Path, release: str = RELEASE_36_4_3, python: str = "3.10") -> Path:
    """Linux_for_Tegra/rootfs as apply_binaries.sh leaves it, as far as stage looks."""
    root = base / "Linux_for_Tegra" / "rootfs"
    for rel in ("etc/systemd/system", "usr/bin", f"usr/lib/python{python}/ensurepip"):
        (root / rel).mkdir(parents=True)
    (root / "etc/nv_tegra_release").write_text(release)
    (root / f"usr/lib/python{python}/ensurepip/__init__.py").write_text("")
    (root / f"usr/bin/python{python}").write_text("")
    (root / "usr/bin/python3").symlink_to(f"python{python}")
    (root.parent / "flash.sh").write_text("#!/bin/bash\n")
    return root


@pytest.fixture()
def rootfs(tmp_path):
    return make_rootfs(tmp_path / "bsp")


def retarget(bundle_dir: Path, device: str) -> Path:
    """The bundle with another target device, resealed (its files are unchanged)."""
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["target"] = {**manifest["target"], "device": device}
    reseal(bundle_dir, manifest)
    load_bundle(bundle_dir)
    return bundle_dir


@pytest.fixture()
def jetson_bundle(bundle_copy):
    """The example bundle retargeted at an Orin Nano 8GB (JetPack 6.2.1)."""
    return retarget(bundle_copy, "jetson-orin-nano-8gb")


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder`: a file's sha256, a link's target, or 'dir'."""
    out = {}
    for top, dirs, files in os.walk(folder):  # links are listed, never followed
        for name in dirs + files:
            path = Path(top) / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def read_unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string(path.read_text())
    return unit


def test_stage_writes_bundle_wheels_script_unit_and_enable_links(jetson_bundle, rootfs, wheel_builds, tmp_path,
                                                                 capsys):
    wheelhouse = tmp_path / "wheels"
    wheelhouse.mkdir()
    extra = ["numpy-1.26.4-cp310-cp310-manylinux_2_17_aarch64.manylinux2014_aarch64.whl",
             "onnx-1.16.0-cp310-cp310-manylinux_2_17_aarch64.manylinux2014_aarch64.whl",
             "PyYAML-6.0.1-cp310-cp310-manylinux_2_17_aarch64.manylinux2014_aarch64.whl"]
    for name in extra:
        (wheelhouse / name).write_bytes(b"wheel " + name.encode())
    assert main(["stage", str(jetson_bundle), str(rootfs), "--service", "myapp", "--wheelhouse", str(wheelhouse)]) == 0
    out, err = capsys.readouterr()

    source = load_bundle(jetson_bundle)
    staged = load_bundle(rootfs / "opt/edgeexit" / source.name)  # verifies every checksum in its new place
    manifest, files, _ = archive_contents(source, engines=False)
    assert staged.manifest == manifest and sorted(staged.present) == sorted(files)
    assert not (staged.path / "engines").exists()

    wheels = rootfs / "opt/edgeexit/wheels"
    assert sorted(p.name for p in wheels.iterdir()) == sorted([".edgeexit-wheels", wheel_builds[0].name, *extra])
    assert all((wheels / n).read_bytes() == (wheelhouse / n).read_bytes() for n in extra)

    script = rootfs / "opt/edgeexit/bin/edgeexit-firstboot"
    assert script.stat().st_mode & 0o777 == 0o755 and MARKER in script.read_text().splitlines()[:2]
    for shell in ("bash", "dash"):
        if shutil.which(shell):
            subprocess.run([shell, "-n", str(script)], check=True)
    text = script.read_text()
    stamp = f"/var/lib/edgeexit/firstboot/{source.name}.{seal_digest(staged.manifest)[:16]}.done"
    assert f"stamp={stamp}" in text and "--system-site-packages /opt/edgeexit/venv" in text
    assert (f"--no-index --find-links /opt/edgeexit/wheels /opt/edgeexit/wheels/{wheel_builds[0].name}" in text)
    assert (f"/opt/edgeexit/venv/bin/edgeexit engines /opt/edgeexit/{source.name} --device auto "
            "--cache /var/cache/edgeexit/engines --quiet") in text

    unit_path = rootfs / "etc/systemd/system" / UNIT
    unit = read_unit(unit_path)
    assert unit.sections() == ["Unit", "Service", "Install"]
    assert unit["Service"]["Type"] == "oneshot" and unit["Service"]["RemainAfterExit"] == "yes"
    exec_start = unit["Service"]["ExecStart"]
    assert (rootfs / exec_start.lstrip("/")).samefile(script)
    assert unit["Unit"]["ConditionPathExists"] == f"!{stamp}"
    assert unit["Unit"]["Before"] == "myapp.service" and unit["Install"]["RequiredBy"] == "myapp.service"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    ordering = " ".join(unit["Unit"].get(key, "") for key in ("After", "Wants", "Requires"))
    assert "network" not in ordering  # first boot works offline
    assert unit["Service"]["TimeoutStartSec"]  # a oneshot has no start timeout otherwise
    for rel in ("multi-user.target.wants", "myapp.service.requires"):
        assert os.readlink(rootfs / "etc/systemd/system" / rel / UNIT) == f"/etc/systemd/system/{UNIT}"

    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["staged"] * 4 + ["enabled"] * 2 + ["next"]
    assert (f"cd {rootfs.parent} && sudo ./tools/kernel_flash/l4t_initrd_flash.sh" in lines[-1]
            and "jetson-orin-nano-devkit-super internal" in lines[-1])
    assert "(JetPack 6.2)" in err and "JetPack 6.2.1" in err  # the rootfs (36.4.3) is not the profile's JetPack
    assert "myapp.service is not in the rootfs" in err and "no wheel for" not in err


def test_systemd_analyze_verifies_the_unit(jetson_bundle, rootfs, wheel_builds):
    analyze = shutil.which("systemd-analyze")
    units = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                  if (p / "sysinit.target").exists()), None)
    if analyze is None or units is None:
        pytest.skip("systemd-analyze or the host's systemd units are not installed (apt-get install systemd)")
    shutil.copytree(units, rootfs / "usr/lib/systemd/system", symlinks=True)  # the targets the unit refers to
    assert main(["stage", str(jetson_bundle), str(rootfs), "--service", "myapp.service"]) == 0

    def verify():
        done = subprocess.run([analyze, f"--root={rootfs}", "verify", f"/etc/systemd/system/{UNIT}"],
                              capture_output=True, text=True)
        return done.returncode, [line for line in (done.stdout + done.stderr).splitlines() if "edgeexit" in line]

    assert verify() == (0, [])
    (rootfs / "opt/edgeexit/bin/edgeexit-firstboot").unlink()  # the check has teeth: ExecStart is looked up
    code, lines = verify()
    assert code != 0 and any("edgeexit-firstboot" in line for line in lines)


def test_restaging_replaces_its_own_files_and_rebuilds(jetson_bundle, rootfs, wheel_builds, capsys):
    assert main(["stage", str(jetson_bundle), str(rootfs), "--service", "myapp"]) == 0
    units = rootfs / "etc/systemd/system"
    first = read_unit(units / UNIT)["Unit"]["ConditionPathExists"]
    stamps = rootfs / "var/lib/edgeexit/firstboot"  # as in an image taken from a board that booted once
    stamps.mkdir(parents=True)
    (stamps / first.removeprefix("!").rpartition("/")[2]).write_text("")
    (stamps / "other-bundle.0123456789abcdef.done").write_text("")
    update_bundle(load_bundle(jetson_bundle), Change(manifest={"budget": {"latency_ms": 5.0}}))
    capsys.readouterr()

    assert main(["stage", str(jetson_bundle), str(rootfs)]) == 0  # again, without --service
    out = capsys.readouterr().out
    unit = read_unit(units / UNIT)
    assert unit["Unit"]["ConditionPathExists"] != first  # a new manifest, a new stamp: built again
    assert "Before" not in unit["Unit"] and "RequiredBy" not in unit["Install"]
    assert not os.path.lexists(units / "myapp.service.requires" / UNIT) and "disabled:" in out
    assert os.path.islink(units / "multi-user.target.wants" / UNIT)
    assert sorted(p.name for p in stamps.iterdir()) == ["other-bundle.0123456789abcdef.done"]
    staged = load_bundle(rootfs / "opt/edgeexit" / load_bundle(jetson_bundle).name)
    assert staged.manifest["budget"] == {"latency_ms": 5.0}
    assert not [p.name for p in (rootfs / "opt/edgeexit").iterdir() if ".partial" in p.name]


def _foreign_unit(root: Path) -> None:
    (root / "etc/systemd/system" / UNIT).write_text("[Unit]\nDescription=someone else's\n")


def _foreign_script(root: Path) -> None:
    (root / "opt/edgeexit/bin").mkdir(parents=True)
    (root / "opt/edgeexit/bin/edgeexit-firstboot").write_text("#!/bin/sh\necho mine\n")


def _foreign_wheels(root: Path) -> None:
    (root / "opt/edgeexit/wheels").mkdir(parents=True)
    (root / "opt/edgeexit/wheels/mine.whl").write_text("mine")


def _foreign_link(root: Path) -> None:
    (root / "etc/systemd/system/multi-user.target.wants").mkdir()
    (root / "etc/systemd/system/multi-user.target.wants" / UNIT).symlink_to("/lib/systemd/system/other.service")


def _not_a_bundle_dest(root: Path) -> None:
    (root / "opt/edgeexit/digits-eenet").mkdir(parents=True)
    (root / "opt/edgeexit/digits-eenet/notes.txt").write_text("mine")


def _linked_opt(root: Path) -> None:
    (root / "opt").symlink_to("/opt")  # the device's /opt: on the host it would be the host's


def _no_release(root: Path) -> None:
    (root / "etc/nv_tegra_release").unlink()


def _no_usr_lib(root: Path) -> None:
    shutil.rmtree(root / "usr/lib")


def _no_venv(root: Path) -> None:
    shutil.rmtree(root / "usr/lib/python3.10/ensurepip")


def _python38(root: Path) -> None:
    (root / "usr/bin/python3").unlink()
    (root / "usr/bin/python3").symlink_to("/usr/bin/python3.8")  # absolute: resolved inside the rootfs
    (root / "usr/bin/python3.8").write_text("")


REFUSALS = [
    (_foreign_unit, "edgeexit-firstboot.service exists and was not written by edgeexit"),
    (_foreign_script, "edgeexit-firstboot exists and was not written by edgeexit"),
    (_foreign_wheels, "wheels exists and was not written by edgeexit"),
    (_foreign_link, "is not edgeexit's link"),
    (_not_a_bundle_dest, "is not empty and not an intact edgeexit bundle"),
    (_linked_opt, "is a symbolic link"),
    (_no_release, "does not look like an L4T root filesystem (no etc/nv_tegra_release)"),
    (_no_usr_lib, "does not look like an L4T root filesystem (no usr/lib)"),
    (_no_venv, "lacks python3.10-venv"),
    (_python38, "is Python 3.8"),
]


@pytest.mark.parametrize("spoil, message", REFUSALS, ids=[f.__name__.strip("_") for f, _ in REFUSALS])
def test_refusals_leave_the_rootfs_as_it_was(jetson_bundle, rootfs, wheel_builds, capsys, spoil, message):
    spoil(rootfs)
    before = snapshot(rootfs.parent)
    assert main(["stage", str(jetson_bundle), str(rootfs), "--service", "myapp"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("edgeexit: error: ")
    assert snapshot(rootfs.parent) == before


def test_a_damaged_bundle_or_a_bad_prefix_is_refused_before_any_write(jetson_bundle, rootfs, wheel_builds, capsys):
    before = snapshot(rootfs.parent)
    for prefix in ("opt/edgeexit", "/opt/../etc", "/opt/edge exit", "/"):
        assert main(["stage", str(jetson_bundle), str(rootfs), "--prefix", prefix]) == 2
        assert "--prefix" in capsys.readouterr().err
    stage0 = jetson_bundle / "stages/stage0.onnx"
    stage0.write_bytes(stage0.read_bytes() + b"\0")
    assert main(["stage", str(jetson_bundle), str(rootfs)]) == 2
    assert "stages/stage0.onnx fails its checksum" in capsys.readouterr().err
    assert snapshot(rootfs.parent) == before and wheel_builds == []


def test_unit_names_prefixes_and_flash_commands():
    assert unit_name("myapp") == "myapp.service" and unit_name("camera@0.service") == "camera@0.service"
    with pytest.raises(EdgeExitError, match="not a systemd unit name"):
        unit_name("my app")
    assert str(check_prefix("/opt/edgeexit")) == "/opt/edgeexit"
    assert flash_command("jetson-orin-nano-8gb", "36.3.0").endswith(" jetson-orin-nano-devkit internal")
    assert flash_command("jetson-orin-nx-16gb", "36.4.4").endswith(" jetson-orin-nano-devkit-super internal")
    assert "flash_l4t_t234_nvme.xml" in flash_command("jetson-orin-nano-4gb", "36.4.3")
    assert flash_command("jetson-agx-orin-64gb", "36.4.3") == "sudo ./flash.sh jetson-agx-orin-devkit internal"
    assert "docs/FLASHING.md" in flash_command("host-cpu", "36.4.3")


def test_wheel_warnings_name_what_the_offline_install_would_miss(tmp_path):
    ours = fake_wheel(tmp_path / "ours")
    assert wheel_requirements(ours) == ["numpy", "onnx", "pyyaml"]  # the build extra is not needed on the device
    house = [tmp_path / "numpy-1.26.4-cp310-cp310-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
             tmp_path / "PyYAML-6.0.1-cp310-cp310-manylinux_2_17_aarch64.manylinux2014_aarch64.whl"]
    lines = wheel_warnings(ours, house)
    assert len(lines) == 2 and "x86_64" in lines[0] and house[0].name in lines[0]
    assert "no wheel for onnx " in lines[1]
    assert wheel_warnings(ours, [tmp_path / "numpy-2.0.0-cp310-cp310-manylinux_2_17_aarch64.whl",
                                 tmp_path / "onnx-1.16.0-cp310-cp310-linux_aarch64.whl",
                                 tmp_path / "pyyaml-6.0.1-cp310-cp310-linux_aarch64.whl"]) == []


@pytest.mark.slow
def test_stage_with_the_real_wheel(jetson_bundle, rootfs):
    """The wheel built from this checkout lands in the rootfs and needs exactly the runtime's requirements."""
    import tomllib

    assert main(["stage", str(jetson_bundle), str(rootfs)]) == 0
    wheels = sorted((rootfs / "opt/edgeexit/wheels").glob("edgeexit-*.whl"))
    assert len(wheels) == 1
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = sorted(dep.split(">")[0].split("=")[0].split("<")[0].strip().lower() for dep in project["dependencies"])
    assert sorted(wheel_requirements(wheels[0])) == wanted
    assert wheels[0].name in (rootfs / "opt/edgeexit/bin/edgeexit-firstboot").read_text()
