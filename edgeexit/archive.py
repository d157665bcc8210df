"""One-file bundle archives: `edgeexit pack BUNDLE` and `edgeexit unpack ARCHIVE DIR`.

A bundle travels to a device (or a root filesystem, or a container build) as one plain tar:
``manifest.json`` first, then ``manifest.sig`` when the bundle is signed, then every listed
file, with fixed owner, mode and time so the same bundle packs to the same bytes. TensorRT
engines stay out unless asked for (``--engines``): a plan runs only on the device and
TensorRT that built it, so the archive's manifest is resealed without them, which a
signature no longer covers (pack says so).

An archive is data from elsewhere, so unpacking trusts nothing in it. Before a byte is
written it refuses: absolute paths, ``..``, backslashes and other names that are not plain
relative paths; links (symbolic or hard), devices, FIFOs and sparse members; duplicate
members; members the manifest does not list; listed files that are missing; and archives
whose sizes add up to more than the limit. The manifest must be sealed and well formed.
Then each file is streamed into a staging folder beside the destination (never through
`TarFile.extract`), counted against its header and checked against its checksum; the whole
bundle is verified and put in place in one rename, replacing only an empty folder or an
intact edgeexit bundle. On Python 3.12+ tarfile's own ``data`` filter checks each member
as well. Any refusal is one line, and nothing is left outside the staging folder.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from collections.abc import Collection
from typing import Any, BinaryIO

from edgeexit.atomic import install, locked, staging
from edgeexit.bundle import (MANIFEST, MAX_MANIFEST_BYTES, SIGNATURE, Bundle, BundleError, check_manifest,
                             check_output, link_or_copy, load_bundle, optional_files, reseal)
from edgeexit.jsonio import dumps, parse_json

MAX_ARCHIVE_BYTES = 4 << 30  # what unpack accepts unless told otherwise (--max-size)
_CHUNK = 1 << 20
_DAMAGED = (tarfile.TarError, EOFError, zlib.error, OSError)


@dataclass(frozen=True)
class Packed:
    """What `pack` wrote: the archive, how many files and bytes, and what it left out."""

    path: Path
    files: int
    bytes: int
    engines_left_out: tuple[str, ...]  # engine set keys not carried
    signature_dropped: bool  # the bundle was signed, but the archive's manifest differs from what was signed


def archive_contents(bundle: Bundle, engines: bool) -> tuple[dict[str, Any], list[str], tuple[str, ...]]:
    """The manifest an archive of `bundle` carries, the listed files it holds, and the engine
    sets left out (all of them unless `engines`; the manifest is then resealed without them)."""
    manifest = bundle.manifest
    sets = manifest.get("engines") or {}
    if engines or not sets:
        return manifest, list(bundle.present), ()
    dirs = tuple(f"{entry['dir']}/" for entry in sets.values())
    files = {rel: h for rel, h in manifest["files"].items() if not rel.startswith(dirs)}
    body = {k: v for k, v in manifest.items() if k != "engines"}
    present = [rel for rel in bundle.present if rel in files]
    return reseal(body, files), present, tuple(sorted(sets))


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def is_archive(path: Path) -> bool:
    """Whether `path` is a tar whose first member is an edgeexit manifest (so pack may replace it)."""
    try:
        with tarfile.open(path, "r:*") as tar:
            first = tar.next()
            return first is not None and first.name == MANIFEST
    except _DAMAGED:
        return False


def pack(bundle_path: str | Path, out: str | Path | None = None, engines: bool = False,
         only: Collection[str] | None = None) -> Packed:
    """Write the verified bundle at `bundle_path` as one tar (default ``NAME.tar`` here).

    With `only`, the archive holds the manifest and just those of its files: an update for a
    device that has the rest (`unpack` with `base`). The archive appears in one rename; an
    existing file at `out` is replaced only when it is itself an edgeexit archive."""
    bundle = load_bundle(bundle_path)
    out = Path(out) if out is not None else Path(f"{bundle.name}.tar")
    if os.path.lexists(out) and (out.is_symlink() or not out.is_file() or not is_archive(out)):
        raise BundleError(f"pack: {out} exists and is not an edgeexit archive; choose another name (-o)")
    manifest, files, left_out = archive_contents(bundle, engines)
    if only is not None:
        files = [rel for rel in files if rel in set(only)]
    sig = bundle.path / SIGNATURE
    keep_sig = sig.is_file() and not left_out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    total = 0
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            head = (dumps(manifest) + "\n").encode()
            tar.addfile(_info(MANIFEST, len(head)), _BytesReader(head))
            members = ([(SIGNATURE, sig)] if keep_sig else []) + [(rel, bundle.path / rel) for rel in sorted(files)]
            for rel, path in members:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    tar.addfile(_info(rel, size), f)
                    total += size
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Packed(out, len(files), total + len(head), left_out, sig.is_file() and not keep_sig)


class _BytesReader:
    """A minimal file object over bytes for TarFile.addfile."""

    def __init__(self, data: bytes):
        self._data, self._at = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._at + n
        chunk, self._at = self._data[self._at:end], min(end, len(self._data))
        return chunk


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _member_name(member: tarfile.TarInfo) -> str:
    """The member's name when it is a plain relative path inside the bundle; refused otherwise."""
    name = member.name
    pure = PurePosixPath(name)
    if (not name or "\x00" in name or "\\" in name or pure.is_absolute() or ".." in pure.parts
            or pure.as_posix() != name or name.startswith("./") or len(name) > 1024):
        raise BundleError(f"archive: member {name!r} is not a plain relative path inside the bundle; refused")
    return name


def _kind(member: tarfile.TarInfo) -> str:
    for test, kind in ((member.issym, "a symbolic link"), (member.islnk, "a hard link"),
                       (member.ischr, "a character device"), (member.isblk, "a block device"),
                       (member.isfifo, "a FIFO"), (member.issparse, "a sparse file")):
        if test():
            return kind
    return "a file" if member.isreg() else "a folder" if member.isdir() else f"of tar type {member.type!r}"


def _check_members(tar: tarfile.TarFile, archive: Path, dest: Path, max_bytes: int) -> dict[str, tarfile.TarInfo]:
    """Every member of the archive by name: plain files and folders with plain names, no
    duplicates, sizes within `max_bytes`. Nothing has been written yet."""
    by_name: dict[str, tarfile.TarInfo] = {}
    total = 0
    while True:  # one header at a time: a size claim is refused before tarfile seeks past it
        try:
            member = tar.next()
        except _DAMAGED as exc:
            raise BundleError(f"archive: {archive} is truncated or damaged ({_one_line(exc)})") from None
        if member is None:
            break
        name = _member_name(member)
        kind = _kind(member)
        if kind not in ("a file", "a folder"):
            raise BundleError(f"archive: member {name} is {kind}; a bundle holds only plain files, refused")
        if name in by_name:
            raise BundleError(f"archive: member {name} appears twice; refused")
        by_name[name] = member
        total += member.size if member.isreg() else 0
        if total > max_bytes:
            raise BundleError(f"archive: {archive} claims more than {max_bytes} bytes (member {name}: "
                              f"{member.size} bytes), above the limit; refused (--max-size to allow more)")
        if hasattr(tarfile, "data_filter"):  # Python 3.12+: tarfile's own rules for untrusted archives, too
            try:
                tarfile.data_filter(member, str(dest))
            except tarfile.FilterError as exc:
                raise BundleError(f"archive: member {name} refused by tarfile's data filter ({exc})") from None
    return by_name


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, archive: Path, limit: int) -> bytes:
    if member.size > limit:
        raise BundleError(f"archive: {member.name} is {member.size} bytes, above the {limit}-byte limit")
    try:
        data = tar.extractfile(member).read()
    except _DAMAGED as exc:
        raise BundleError(f"archive: {archive} is truncated or damaged ({_one_line(exc)})") from None
    if len(data) != member.size:
        raise BundleError(f"archive: {archive} is truncated ({member.name} holds {len(data)} of {member.size} bytes)")
    return data


def _copy_member(src: BinaryIO, dst: BinaryIO, member: tarfile.TarInfo, archive: Path) -> str:
    """Stream one member into `dst`, counting against its header; returns its sha256."""
    h, count = hashlib.sha256(), 0
    try:
        while chunk := src.read(_CHUNK):
            count += len(chunk)
            if count > member.size:
                raise BundleError(f"archive: {member.name} holds more than its header's {member.size} bytes")
            h.update(chunk)
            dst.write(chunk)
    except _DAMAGED as exc:
        raise BundleError(f"archive: {archive} is truncated or damaged ({_one_line(exc)})") from None
    if count != member.size:
        raise BundleError(f"archive: {archive} is truncated ({member.name} holds {count} of {member.size} bytes)")
    return h.hexdigest()


def unpack(archive: str | Path, dest: str | Path, max_bytes: int = MAX_ARCHIVE_BYTES,
           base: Bundle | None = None, keep_engines: bool = False) -> Bundle:
    """Unpack an edgeexit archive into the folder `dest` (absent, empty, or an intact bundle it
    replaces) and return the verified bundle; see the module text for what is refused.

    With `base` (a verified bundle, e.g. the one the device runs now), a listed file the
    archive leaves out is taken from `base` when `base` holds it with the same checksum, so an
    update carries only what changed. With `keep_engines`, the engine sets `base` has and the
    archive's manifest lacks are kept when they were built from the same stage graphs (the
    device's own plans survive an update of thresholds); the manifest is then resealed, and a
    signature, which covered the archive's manifest, is not kept."""
    archive, dest = Path(archive), Path(os.path.abspath(dest))
    check_output(dest)
    try:
        tar = tarfile.open(archive, "r:*")
    except FileNotFoundError:
        raise BundleError(f"archive: {archive} does not exist") from None
    except _DAMAGED:
        raise BundleError(f"archive: {archive} is not a tar archive (plain, gzip, bzip2 or xz)") from None
    with tar:
        members = _check_members(tar, archive, dest, max_bytes)
        if MANIFEST not in members or not members[MANIFEST].isreg():
            raise BundleError(f"archive: {archive} has no {MANIFEST} (not an edgeexit archive)")
        head = _read_member(tar, members[MANIFEST], archive, MAX_MANIFEST_BYTES)
        manifest = check_manifest(parse_json(head, f"archive: {MANIFEST}", BundleError), f"{archive}:{MANIFEST}")
        files = manifest["files"]
        folders = {p.as_posix() for rel in files for p in PurePosixPath(rel).parents if p.as_posix() != "."}
        for name, member in members.items():
            if member.isdir() and name not in folders:
                raise BundleError(f"archive: folder {name}/ is not in the manifest; refused")
            if member.isreg() and name not in files and name not in (MANIFEST, SIGNATURE):
                raise BundleError(f"archive: member {name} is not listed in the manifest; refused")
        inherited = {rel for rel in files if rel not in members and base is not None
                     and base.manifest["files"].get(rel) == files[rel] and rel in base.present}
        missing = [rel for rel in files if rel not in members and rel not in inherited
                   and rel not in optional_files(manifest)]
        if missing:
            raise BundleError(f"archive: {missing[0]} is listed in the manifest but not in the archive"
                              + (f" nor in {base.path} with that checksum" if base is not None else ""))
        kept = _engines_to_keep(base, manifest) if keep_engines and base is not None else {}
        with staging(dest) as part:
            if kept:
                kept_files = {rel: h for rel, h in base.manifest["files"].items()
                              if rel.startswith(tuple(f"{e['dir']}/" for e in kept.values()))}
                inherited |= set(kept_files)
                head = (dumps(reseal({**manifest, "engines": {**(manifest.get("engines") or {}), **kept}},
                                     {**files, **kept_files})) + "\n").encode()
                members.pop(SIGNATURE, None)
            (part / MANIFEST).write_bytes(head)
            for rel in sorted(inherited):  # checked again with the whole tree below
                link_or_copy(base.path / rel, part / rel)
            for name, member in members.items():
                if not member.isreg() or name == MANIFEST:
                    continue
                target = part / name
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                with open(target, "xb") as out:
                    digest = _copy_member(src, out, member, archive)
                if name != SIGNATURE and digest != files[name]:
                    raise BundleError(f"archive: {name} fails its checksum (manifest {files[name][:12]}..., "
                                      f"archive {digest[:12]}...); refused")
            bundle = load_bundle(part)  # the whole tree, as any bundle is checked
            with locked(dest):
                check_output(dest)  # again: it may have changed while we unpacked
                install(part, dest)
    return Bundle(dest, bundle.manifest)


def _engines_to_keep(base: Bundle, manifest: dict[str, Any]) -> dict[str, Any]:
    """`base`'s engine sets that `manifest` lacks and whose plans came from the same stage graphs
    and batch settings, so they run the new bundle exactly as they ran the old one."""
    old, new = base.manifest, manifest
    same = (len(old["stages"]) == len(new["stages"])
            and all(old["files"].get(a["onnx"]) == new["files"].get(b["onnx"]) for a, b in zip(old["stages"], new["stages"]))
            and (old.get("export") or {}).get("batch") == (new.get("export") or {}).get("batch"))
    have = new.get("engines") or {}
    return {key: entry for key, entry in (old.get("engines") or {}).items() if same and key not in have}


def describe(packed: Packed) -> str:
    """What `edgeexit pack` prints."""
    line = f"packed: {packed.path} ({packed.files} files, {packed.bytes / (1 << 20):.1f} MiB)"
    if packed.engines_left_out:
        line += f"; engines left out ({', '.join(packed.engines_left_out)}: pack --engines to carry them)"
    if packed.signature_dropped:
        line += "; manifest.sig left out (the archive's manifest omits the engines, which the signature covers)"
    return line

