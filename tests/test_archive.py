"""`edgeexit pack` / `unpack`: one-file bundle archives, and a hostile-archive suite.

Each hostile archive is made from a good one with tarfile itself (plus one raw truncation)
and must be refused with one line, leaving nothing at the destination and nothing beside it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from conftest import leftovers
from edgeexit.archive import MAX_ARCHIVE_BYTES, archive_contents, pack, unpack
from edgeexit.bundle import Change, load_bundle, update_bundle
from edgeexit.errors import BundleError


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def with_engines(path: Path):
    """The bundle with a (fake) engine set, as `edgeexit engines` would list it."""
    key, rel = "jetson-orin-nano-8gb-trt10.3", "engines/jetson-orin-nano-8gb-trt10.3"
    stages = [f"{rel}/stage{k}.plan" for k in range(3)]
    files = {p: b"plan %d" % k for k, p in enumerate(stages)} | {f"{rel}/engine.json": b"{}"}
    entry = {"dir": rel, "stages": stages, "metadata": f"{rel}/engine.json", "tensorrt": "10.3.0.26",
             "device": "jetson-orin-nano-8gb", "precision": ["fp32"] * 3, "dla_core": None, "dla_stages": []}
    return update_bundle(load_bundle(path), Change(files, {"engines": {key: entry}}))


def test_pack_and_unpack_round_trip_byte_for_byte(bundle_copy, tmp_path):
    first = pack(bundle_copy, tmp_path / "b.tar")
    assert first.files == len(load_bundle(bundle_copy).present) and not first.engines_left_out
    with tarfile.open(first.path) as tar:
        names = tar.getnames()
        assert names[0] == "manifest.json" and all(m.uid == 0 and m.mtime == 0 for m in tar.getmembers())
    again = pack(bundle_copy, tmp_path / "b.tar")  # replaces its own archive, to the same bytes
    assert again.path.read_bytes() == first.path.read_bytes()
    out = unpack(first.path, tmp_path / "out")
    assert out.manifest == load_bundle(bundle_copy).manifest and tree(tmp_path / "out") == tree(bundle_copy)
    unpack(first.path, tmp_path / "out")  # onto an intact bundle: replaced in one rename
    assert leftovers(tmp_path) == [] and load_bundle(tmp_path / "out")
    with gzip.open(tmp_path / "b.tar.gz", "wb") as f:  # compressed archives unpack too
        f.write(first.path.read_bytes())
    assert unpack(tmp_path / "b.tar.gz", tmp_path / "gz").manifest == out.manifest


def test_pack_never_replaces_what_is_not_an_archive(bundle_copy, tmp_path):
    mine = tmp_path / "notes.tar"
    mine.write_text("my notes")
    with pytest.raises(BundleError, match="exists and is not an edgeexit archive"):
        pack(bundle_copy, mine)
    assert mine.read_text() == "my notes" and sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "notes.tar"]


def test_engines_travel_only_when_asked(bundle_copy, tmp_path):
    bundle = with_engines(bundle_copy)
    manifest, files, left_out = archive_contents(bundle, engines=False)
    assert left_out == ("jetson-orin-nano-8gb-trt10.3",) and "engines" not in manifest
    assert not any(f.startswith("engines/") for f in [*files, *manifest["files"]])
    lean = pack(bundle_copy, tmp_path / "lean.tar")
    assert lean.engines_left_out and unpack(lean.path, tmp_path / "lean").manifest.get("engines") is None
    assert not (tmp_path / "lean" / "engines").exists()
    full = pack(bundle_copy, tmp_path / "full.tar", engines=True)
    got = unpack(full.path, tmp_path / "full")
    assert got.manifest == bundle.manifest and (tmp_path / "full" / "engines").is_dir()


def _members(archive: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(archive) as tar:
        return [(m, tar.extractfile(m).read() if m.isreg() else None) for m in tar.getmembers()]


def _write(path: Path, members) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _extra(name: str, kind=tarfile.REGTYPE, data: bytes | None = b"x", **attrs) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if data is not None and kind == tarfile.REGTYPE else 0
    for k, v in attrs.items():
        setattr(info, k, v)
    return info, data if kind == tarfile.REGTYPE else None


def _hostile(good: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """Each hostile archive and the words its refusal must contain."""
    base = _members(good)
    stage = next(i for i, (m, _) in enumerate(base) if m.name.endswith("stage0.onnx"))
    flipped = list(base)
    info, data = flipped[stage]
    flipped[stage] = (info, bytes([data[0] ^ 1]) + data[1:])
    claim = tarfile.TarInfo(base[stage][0].name)
    claim.size = 10 * (1 << 30)  # a 10 GB header with no data behind it
    big = [m for i, m in enumerate(base) if i != stage] + [(claim, None)]
    cases = {
        "absolute": (base + [_extra("/tmp/edgeexit-evil")], "not a plain relative path"),
        "dotdot": (base + [_extra("../evil")], "not a plain relative path"),
        "nested dotdot": (base + [_extra("stages/../../evil")], "not a plain relative path"),
        "symlink": (base + [_extra("stages/link", tarfile.SYMTYPE, linkname="/etc/passwd")], "symbolic link"),
        "hard link": (base + [_extra("stages/hard", tarfile.LNKTYPE, linkname="manifest.json")], "hard link"),
        "device": (base + [_extra("stages/dev", tarfile.CHRTYPE, devmajor=1, devminor=3)], "character device"),
        "fifo": (base + [_extra("stages/fifo", tarfile.FIFOTYPE)], "FIFO"),
        "unlisted": (base + [_extra("extra.txt")], "not listed in the manifest"),
        "unlisted folder": (base + [_extra("hidden", tarfile.DIRTYPE)], "folder hidden/ is not in the manifest"),
        "duplicate": (base + [base[stage]], "appears twice"),
        "checksum": (flipped, "fails its checksum"),
        "missing": ([m for i, m in enumerate(base) if i != stage], "listed in the manifest but not in the archive"),
        "no manifest": (base[1:], "has no manifest.json"),
        "10 GB claim": (big, "above the limit"),
    }
    out = {name: (_write(tmp / f"{name.replace(' ', '_')}.tar", members), words)
           for name, (members, words) in cases.items()}
    raw = good.read_bytes()
    (tmp / "truncated.tar").write_bytes(raw[: len(raw) // 2])
    out["truncated"] = (tmp / "truncated.tar", "truncated")
    (tmp / "garbage.tar").write_bytes(b"not a tar at all" * 64)
    out["garbage"] = (tmp / "garbage.tar", "not a tar archive")
    return out


def test_hostile_archives_are_refused_in_one_line_and_write_nothing(bundle_copy, tmp_path):
    good = pack(bundle_copy, tmp_path / "good.tar").path
    cases = tmp_path / "cases"
    cases.mkdir()
    land = tmp_path / "land"
    land.mkdir()
    outside = [Path("/tmp/edgeexit-evil"), tmp_path / "evil", land / "evil"]
    for name, (archive, words) in _hostile(good, cases).items():
        with pytest.raises(BundleError) as err:
            unpack(archive, land / "dest")
        text = str(err.value)
        assert words in text and "\n" not in text, (name, text)
        assert list(land.iterdir()) == [] or [p.name for p in land.iterdir()] == [".dest.lock"], name
        assert not any(p.exists() for p in outside), name
    assert MAX_ARCHIVE_BYTES < 10 * (1 << 30)


def test_a_small_size_limit_is_kept(bundle_copy, tmp_path):
    good = pack(bundle_copy, tmp_path / "good.tar").path
    with pytest.raises(BundleError, match="claims more than 1000 bytes"):
        unpack(good, tmp_path / "dest", max_bytes=1000)
    assert not (tmp_path / "dest").exists()


def test_an_interrupted_unpack_leaves_the_previous_bundle_in_place(bundle_copy, tmp_path, monkeypatch):
    import edgeexit.archive as archive

    good = pack(bundle_copy, tmp_path / "good.tar").path
    dest = tmp_path / "device" / "bundle"
    unpack(good, dest)
    before = tree(dest)
    calls = []

    def killed(src, dst, member, path):
        calls.append(member.name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is stopped mid-unpack
        return original(src, dst, member, path)

    original = archive._copy_member
    monkeypatch.setattr(archive, "_copy_member", killed)
    with pytest.raises(KeyboardInterrupt):
        unpack(good, dest)
    assert tree(dest) == before and load_bundle(dest).manifest == load_bundle(bundle_copy).manifest
    assert leftovers(dest.parent) == []
    assert json.loads((dest / "manifest.json").read_text())["name"] == load_bundle(bundle_copy).name


def test_unpack_never_replaces_a_folder_that_is_not_a_bundle(bundle_copy, tmp_path):
    good = pack(bundle_copy, tmp_path / "good.tar").path
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "photo.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(BundleError, match="not an intact edgeexit bundle"):
        unpack(good, mine)
    assert [p.name for p in mine.iterdir()] == ["photo.jpg"]


def test_the_cli_packs_and_unpacks(bundle_copy, tmp_path, capsys):
    from edgeexit.cli import main

    assert main(["pack", str(bundle_copy), "-o", str(tmp_path / "b.tar")]) == 0
    assert f"packed: {tmp_path / 'b.tar'}" in capsys.readouterr().out
    assert main(["unpack", str(tmp_path / "b.tar"), str(tmp_path / "out")]) == 0
    assert "checksums verified" in capsys.readouterr().out and load_bundle(tmp_path / "out")
    (tmp_path / "bad.tar").write_bytes(b"junk" * 100)
    assert main(["unpack", str(tmp_path / "bad.tar"), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a tar archive" in err and not (tmp_path / "out2").exists()


def test_an_update_carries_only_what_changed_and_keeps_the_device_engines(bundle_copy, tmp_path):
    device = tmp_path / "device"
    unpack(pack(bundle_copy, tmp_path / "full.tar").path, device)
    with_engines(device)  # the device built its own plans
    on_device = load_bundle(device)
    bundle = load_bundle(bundle_copy)
    gating = {**bundle.manifest["gating"], "thresholds": [0.5, 0.6, None]}
    update_bundle(bundle, Change({"calibration.json": b"{}\n"}, {"gating": gating, "calibration": "calibration.json"}))
    archive = pack(bundle_copy, tmp_path / "delta.tar", only=["calibration.json"]).path
    names = [m.name for m, _ in _members(archive)]
    assert names == ["manifest.json", "calibration.json"]

    with pytest.raises(BundleError, match="not in the archive$"):  # without a base the rest is missing
        unpack(archive, tmp_path / "alone")
    assert not (tmp_path / "alone").exists()
    updated = unpack(archive, tmp_path / "next", base=on_device, keep_engines=True)
    assert updated.manifest["gating"]["thresholds"] == [0.5, 0.6, None]
    assert sorted(updated.manifest["engines"]) == sorted(on_device.manifest["engines"])
    engine_files = [rel for rel in on_device.manifest["files"] if rel.startswith("engines/")]
    assert engine_files and all((tmp_path / "next" / rel).is_file() for rel in engine_files)
    assert load_bundle(tmp_path / "next").manifest == updated.manifest  # checksums of every file

    plain = unpack(archive, tmp_path / "plain", base=on_device)  # not asked: the engines stay behind
    assert "engines" not in plain.manifest

    other = tmp_path / "other"  # new graphs: the old plans do not fit them, so none are kept
    unpack(pack(bundle_copy, tmp_path / "o.tar").path, other)
    stage0 = other / load_bundle(other).manifest["stages"][0]["onnx"]
    changed = load_bundle(other)
    update_bundle(changed, Change({changed.manifest["stages"][0]["onnx"]: stage0.read_bytes() + b" "}))
    fresh = unpack(pack(other, tmp_path / "new.tar").path, tmp_path / "fresh", base=on_device, keep_engines=True)
    assert "engines" not in fresh.manifest

    foreign = tmp_path / "foreign.tar"  # a base whose file differs does not stand in for a missing member
    tampered = tmp_path / "tampered"
    unpack(pack(device, tmp_path / "t.tar").path, tampered)
    target = tampered / "calibration.json"
    update_bundle(load_bundle(tampered), Change({"calibration.json": b"[]\n"}))
    pack(bundle_copy, foreign, only=[])
    with pytest.raises(BundleError, match=f"nor in {tampered} with that checksum"):
        unpack(foreign, tmp_path / "x", base=load_bundle(tampered))
    assert target.is_file() and not (tmp_path / "x").exists()
