"""`edgeexit container BUNDLE`: the build context, checked by parsing what it holds.

Docker itself is not needed: the Dockerfile is read with a small instruction parser, compose.yaml
with yaml.safe_load, .dockerignore with its allowlist rules, and the archive is unpacked with
edgeexit.archive. The edgeexit wheel is a fake one (`edgeexit.wheel.build_wheel` monkeypatched).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from edgeexit.archive import archive_contents, unpack
from edgeexit.bundle import load_bundle
from edgeexit.cli import main
from edgeexit.container import l4t_image, write_context
from edgeexit.devices import list_devices
from edgeexit.doctor import JETPACK
from edgeexit.errors import EdgeExitError
from edgeexit.jetson import BOARD_ROOT_ENV
import test_stage
from test_stage import retarget

ENGINE_CACHE = "/var/cache/edgeexit/engines"
wheel_builds = test_stage.wheel_builds  # the fake edgeexit wheel, as in test_stage


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction: comments dropped, `\\` continuations joined."""
    out, pending = [], ""
    for line in dockerfile.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.strip().partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
    assert not pending, "a continuation runs off the end of the Dockerfile"
    return out


def sent(context: Path, rel: str) -> bool:
    """Whether `rel` reaches the build under the context's .dockerignore (last matching rule wins)."""
    import fnmatch

    verdict = True
    parts = rel.split("/")
    for rule in (r.strip() for r in (context / ".dockerignore").read_text().splitlines()):
        if not rule or rule.startswith("#"):
            continue
        keep, pattern = rule.startswith("!"), rule.lstrip("!")
        if any(fnmatch.fnmatchcase("/".join(parts[:n]), pattern) for n in range(1, len(parts) + 1)):
            verdict = keep
    return verdict


def mount_sources(run_args: str) -> list[str]:
    return [opt.split("source=")[1].split(",")[0] for opt in shlex.split(run_args)
            if opt.startswith("--mount=") and "source=" in opt]


def test_the_base_image_follows_each_profiles_jetpack():
    checked = 0
    for profile in list_devices():
        l4t = {jp: release for release, jp in JETPACK.items()}.get(profile.jetpack.version or "")
        if profile.kind != "jetson" or l4t is None:
            with pytest.raises(EdgeExitError, match="--base"):
                l4t_image(profile.name)
            continue
        base = l4t_image(profile.name)
        tag = base.image.rpartition(":r")[2].split(".")
        release = l4t.split(".")
        assert base.image.startswith("nvcr.io/nvidia/l4t-jetpack:r") and base.l4t == l4t
        assert tag[0] == release[0]  # the L4T major release: the image's CUDA and TensorRT are that release's
        if release[0] == "36":
            assert tag[1] == release[1]  # JetPack 6 images run only within their minor release (36.3, 36.4)
        checked += 1
    assert checked >= 4  # Orin (JetPack 6) and Xavier (JetPack 5) profiles at least
    assert l4t_image("jetson-orin-nano-8gb").image == "nvcr.io/nvidia/l4t-jetpack:r36.4.0"
    assert l4t_image("jetson-xavier-nx").image == "nvcr.io/nvidia/l4t-jetpack:r35.4.1"
    with pytest.raises(EdgeExitError, match="host-cpu.*--base"):
        l4t_image("host-cpu")
    with pytest.raises(EdgeExitError, match="JetPack 4.6.6.*--base"):
        l4t_image("jetson-nano")


def test_context_for_an_orin_target(bundle_copy, tmp_path, wheel_builds, capsys):
    bundle_dir = retarget(bundle_copy, "jetson-orin-nano-8gb")
    out = tmp_path / "ctx"
    assert main(["container", str(bundle_dir), "-o", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    bundle = load_bundle(bundle_dir)
    name = bundle.name

    steps = instructions((out / "Dockerfile").read_text())
    words = [w for w, _ in steps]
    assert words[0] == "FROM" and steps[0][1] == "nvcr.io/nvidia/l4t-jetpack:r36.4.0"
    assert "ADD" not in words  # ADD would extract the tar unchecked
    runs = [args for w, args in steps if w == "RUN"]
    unpacking = [r for r in runs if "edgeexit unpack" in r]
    assert len(unpacking) == 1 and f"/tmp/{name}.tar /opt/edgeexit/{name}" in unpacking[0]
    install = next(r for r in runs if "pip install" in r)
    assert "--system-site-packages" in install and wheel_builds[0].name in install
    sources = [source for args in runs for source in mount_sources(args)]
    assert sorted(sources) == sorted(["wheels", f"{name}.tar"])
    assert all((out / source).exists() and sent(out, source) for source in sources)
    assert sent(out, f"wheels/{wheel_builds[0].name}")
    copies = [args.split()[-2] for w, args in steps if w == "COPY"]
    assert copies == ["entrypoint.sh"] and sent(out, "entrypoint.sh")
    entry = json.loads(dict(steps)["ENTRYPOINT"])
    cmd = json.loads(dict(steps)["CMD"])
    assert entry == ["/usr/local/bin/edgeexit-entrypoint"] and cmd[0] == "edgeexit" and f"/opt/edgeexit/{name}" in cmd
    assert dict(steps)["VOLUME"] == ENGINE_CACHE

    script = (out / "entrypoint.sh").read_text()
    if shutil.which("sh"):
        subprocess.run(["sh", "-n", str(out / "entrypoint.sh")], check=True)
    assert (out / "entrypoint.sh").stat().st_mode & 0o111
    assert f"edgeexit engines /opt/edgeexit/{name} --device" in script and f"--cache {ENGINE_CACHE}" in script
    assert script.rstrip().endswith('exec "$@"')

    compose = yaml.safe_load((out / "compose.yaml").read_text())
    (service,) = compose["services"].values()
    assert service["runtime"] == "nvidia" and service["build"] == "."
    volume, cache = next(v.split(":") for v in service["volumes"] if v.endswith(ENGINE_CACHE))
    assert cache == ENGINE_CACHE and volume in compose["volumes"]
    board = service["environment"][BOARD_ROOT_ENV]
    targets = {v.split(":")[1] for v in service["volumes"] if v.startswith("/")}
    assert {f"{board}/etc/nv_tegra_release", f"{board}/proc/device-tree/model"} <= targets

    assert not sent(out, "README.md") and not sent(out, ".edgeexit-container") and sent(out, f"{name}.tar")
    got = unpack(out / f"{name}.tar", tmp_path / "unpacked")
    assert got.manifest == archive_contents(bundle, engines=False)[0] and load_bundle(tmp_path / "unpacked")
    assert "docker compose up --build" in (out / "README.md").read_text()
    assert any("Dockerfile (FROM nvcr.io/nvidia/l4t-jetpack:r36.4.0)" in line for line in printed)
    assert printed[-1].startswith("next: ")


def test_jetpack5_and_host_targets_need_a_base_and_accept_one(bundle_copy, tmp_path, wheel_builds, capsys):
    retarget(bundle_copy, "jetson-xavier-nx")
    assert main(["container", str(bundle_copy), "-o", str(tmp_path / "jp5")]) == 2
    err = capsys.readouterr().err
    assert "r35.4.1" in err and "Python 3.8" in err and "--base" in err and err.count("\n") == 1
    retarget(bundle_copy, "host-cpu")
    assert main(["container", str(bundle_copy), "-o", str(tmp_path / "host")]) == 2
    assert "--base" in capsys.readouterr().err
    assert not (tmp_path / "jp5").exists() and not (tmp_path / "host").exists() and wheel_builds == []
    mine = "registry.example.com/team/l4t-py310:r36.4.0"
    write_context(bundle_copy, base=mine, out=tmp_path / "host")
    assert instructions((tmp_path / "host/Dockerfile").read_text())[0] == ("FROM", mine)
    with pytest.raises(EdgeExitError, match="--base: .* is not an image reference"):
        write_context(bundle_copy, base="ubuntu\nRUN rm -rf /", out=tmp_path / "bad")


def test_never_overwrites_a_folder_edgeexit_did_not_write(bundle_copy, tmp_path, wheel_builds):
    retarget(bundle_copy, "jetson-agx-orin-32gb")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "Dockerfile").write_text("FROM scratch\n")
    with pytest.raises(EdgeExitError, match="not a build context edgeexit wrote"):
        write_context(bundle_copy, out=mine)
    assert [p.name for p in mine.iterdir()] == ["Dockerfile"] and (mine / "Dockerfile").read_text() == "FROM scratch\n"

    ours = tmp_path / "ours"
    write_context(bundle_copy, out=ours)
    write_context(bundle_copy, out=ours)  # its own, untouched: replaced in one rename
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".") and ".partial" in p.name) == []
    compose = ours / "compose.yaml"
    compose.write_text(compose.read_text() + "# my change\n")
    with pytest.raises(EdgeExitError, match="compose.yaml was added or changed"):
        write_context(bundle_copy, out=ours)
    assert compose.read_text().endswith("# my change\n")
    (tmp_path / "file").write_text("x")
    with pytest.raises(EdgeExitError, match="is not a folder"):
        write_context(bundle_copy, out=tmp_path / "file")

