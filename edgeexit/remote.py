"""The device side of `edgeexit deploy`: ``python -m edgeexit.remote OP ...`` over SSH.

Each operation prints one JSON object on stdout, or one line on stderr and exits 2, so the
host can act on the result and name the failed step. ``receive`` reads an archive on stdin
(from `pack` on the host, usually only the files that changed) and treats it as data from
elsewhere: it is spooled to a file beside the destination under a size cap, then `unpack`
checks it member by member, fills in unchanged files from the bundle the device already has,
keeps that bundle's engines where the graphs did not change, verifies everything and puts the
result in place in one rename. The bundle a device runs is replaced only by ``switch`` (one
rename), so a deploy cut off at any point leaves it as it was.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from edgeexit.errors import EdgeExitError
from edgeexit.jsonio import dumps

_UPLOAD = re.compile(r"^\.(?P<name>.+)\.upload-(?P<pid>\d+)-[0-9a-f]{8}$")


def facts() -> dict[str, Any]:
    """What the host needs to know before it deploys: edgeexit's version and code digest here,
    `edgeexit doctor`'s facts and advice, the device profile of this board, tegrastats (free disk
    is the pre-flight's, which runs before edgeexit is there)."""
    from edgeexit import __version__
    from edgeexit.devices import detect_device
    from edgeexit.doctor import advice, gather
    from edgeexit.wheel import code_digest

    found = gather()
    try:
        device = detect_device().name
    except EdgeExitError:
        device = None
    return {"edgeexit": __version__, "code": code_digest(), "doctor": found, "advice": advice(found),
            "device": device, "tegrastats": shutil.which("tegrastats") is not None}


def state(path: Path) -> dict[str, Any]:
    """The bundle at `path` as the host compares it: the digest of its engine-free manifest (the
    one `pack` sends), its files and checksums, and its engine sets; {"exists": False} if absent."""
    from edgeexit.archive import archive_contents
    from edgeexit.bundle import load_bundle
    from edgeexit.seal import digest

    if not path.exists():
        return {"exists": False}
    bundle = load_bundle(path)
    manifest, files, _ = archive_contents(bundle, engines=False)
    return {"exists": True, "manifest": digest(manifest), "files": {rel: manifest["files"][rel] for rel in files},
            "engines": {key: {"device": e.get("device"), "tensorrt": e.get("tensorrt"), "stages": len(e["stages"])}
                        for key, e in (bundle.manifest.get("engines") or {}).items()}}


def engine_set(path: Path, device: str | None) -> dict[str, Any]:
    """The TensorRT engine set `edgeexit engines` would write for the bundle at `path` here: its
    key (for `device`, else this board's profile, else the bundle's target), and whether the
    bundle has it already (with how many of its plans came from the engine cache). Key null:
    no TensorRT here, and the bundle runs on onnxruntime."""
    import json

    from edgeexit.bundle import load_bundle
    from edgeexit.devices import detect_device
    from edgeexit.export.tensorrt import engine_key, trt_available, trt_version

    if not trt_available():
        return {"tensorrt": None, "device": None, "key": None, "have": False}
    version = trt_version()
    bundle = load_bundle(path)
    if device is None:
        try:
            device = detect_device().name
        except EdgeExitError:
            device = bundle.manifest["target"]["device"]
    key = engine_key(device, version)
    entry = (bundle.manifest.get("engines") or {}).get(key)
    out = {"tensorrt": ".".join(map(str, version)), "device": device, "key": key, "have": entry is not None}
    if entry is not None:
        meta = json.loads((bundle.path / entry["metadata"]).read_text())
        out.update(stages=len(entry["stages"]), from_cache=sum(1 for m in meta["stages"] if m.get("from_cache")))
    return out


def _clean_uploads(folder: Path, name: str) -> None:
    """Remove upload spools of `name` left by a receive that was killed: a spool is flock-ed
    while it is written, and the lock goes with its process (a zombie's included)."""
    import fcntl

    for path in folder.glob(f".{name}.upload-*"):
        match = _UPLOAD.match(path.name)
        if not (match and match["name"] == name and path.is_file() and not path.is_symlink()):
            continue
        with open(path, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # another receive is writing it
            path.unlink(missing_ok=True)


def _spool(src: BinaryIO, dest: Path, max_bytes: int) -> Path:
    """Copy `src` to a new file beside `dest` (locked while it is written), refusing more than `max_bytes`."""
    import fcntl
    import secrets

    dest.parent.mkdir(parents=True, exist_ok=True)
    _clean_uploads(dest.parent, dest.name)
    spool = dest.parent / f".{dest.name}.upload-{os.getpid()}-{secrets.token_hex(4)}"
    count = 0
    try:
        with open(spool, "xb") as out:
            fcntl.flock(out, fcntl.LOCK_EX)
            while chunk := src.read(1 << 20):
                count += len(chunk)
                if count > max_bytes:
                    raise EdgeExitError(f"receive: the upload is larger than {max_bytes} bytes; refused")
                out.write(chunk)
    except BaseException:
        spool.unlink(missing_ok=True)
        raise
    return spool


def receive(base: Path | None, dest: Path, src: BinaryIO | Path, max_bytes: int) -> dict[str, Any]:
    """Unpack the archive on `src` (a stream, spooled first, or a file already on this disk, as
    the fleet playbook sends it; the caller removes that) into `dest`, taking unchanged files and
    engines from `base`."""
    from edgeexit.archive import unpack
    from edgeexit.bundle import load_bundle

    spool = src if isinstance(src, Path) else _spool(src, dest, max_bytes)
    try:
        base_bundle = load_bundle(base) if base is not None and base.exists() else None
        bundle = unpack(spool, dest, max_bytes, base=base_bundle, keep_engines=True)
    finally:
        if spool is not src:
            spool.unlink(missing_ok=True)
    return {"bundle": str(bundle.path), "files": len(bundle.present), "engines": sorted(bundle.manifest.get("engines") or {})}


def switch(new: Path, live: Path) -> dict[str, Any]:
    """Make the verified bundle at `new` the one at `live`, in one rename; the old one is removed."""
    from edgeexit.atomic import install, locked
    from edgeexit.bundle import check_output, load_bundle

    bundle = load_bundle(new)
    with locked(live):
        check_output(live)
        install(new, live)
    if new.exists():  # the previous bundle, swapped out
        shutil.rmtree(new)
    return {"bundle": str(live), "files": len(bundle.present)}


def _stop(signum, _frame):
    raise SystemExit(128 + signum)  # a dropped connection (SIGHUP) or a kill still runs the clean-ups


def main(argv: list[str] | None = None) -> int:
    """Run one operation; its JSON on stdout, or one line on stderr and exit status 2 (as the CLI)."""
    from edgeexit.archive import MAX_ARCHIVE_BYTES

    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, _stop)
    p = argparse.ArgumentParser(prog="python -m edgeexit.remote")
    sub = p.add_subparsers(dest="op", required=True)
    sub.add_parser("facts")
    sub.add_parser("state").add_argument("path")
    r = sub.add_parser("receive")
    r.add_argument("dest")
    r.add_argument("--base")
    r.add_argument("--max-size", type=int, default=MAX_ARCHIVE_BYTES)
    r.add_argument("--archive", help="read this archive file instead of stdin")
    e = sub.add_parser("engine-set")
    e.add_argument("path")
    e.add_argument("--device")
    s = sub.add_parser("switch")
    s.add_argument("new")
    s.add_argument("live")
    args = p.parse_args(argv)
    ops = {"facts": facts, "state": lambda: state(Path(args.path)),
           "engine-set": lambda: engine_set(Path(args.path), args.device),
           "receive": lambda: receive(Path(args.base) if args.base else None, Path(args.dest),
                                      Path(args.archive) if args.archive else sys.stdin.buffer, args.max_size),
           "switch": lambda: switch(Path(args.new), Path(args.live))}
    return answer(ops[args.op])


def answer(compute: Callable[[], Any], errors: tuple[type[BaseException], ...] = (EdgeExitError, OSError)) -> int:
    """Print what `compute` returns (JSON, or a string as it is) and return 0; on one of
    `errors`, one line on stderr and 2, as the CLI does: the protocol of edgeexit's helper
    commands (here and `python -m edgeexit.fleet`)."""
    try:
        out = compute()
    except errors as exc:
        print(f"edgeexit: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(out if isinstance(out, str) else dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
