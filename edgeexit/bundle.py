"""The bundle: one directory that carries a staged model to a device, and proves it is intact.

Layout: `manifest.json` (what the runtime needs: input spec, classes, stages with tensor
names and costs, gating, toolchain, sha256 of every other file, and its own seal),
`stages/stage{k}.onnx`, `monolithic.onnx`, `weights.pt` (torch reference), `report.json`
(the build's measurements), optionally `manifest.sig` (an ed25519 signature of the seal).
Loading refuses an edited manifest (naming the field), a file that fails its checksum, a
file or folder the manifest does not list, any symbolic link and any path that leaves the
bundle. Writes are staged beside the destination and swapped in atomically under a lock
(`edgeexit.atomic`), so a crash at any point leaves the old bundle or the new one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping

from edgeexit.atomic import discard_staging, install, locked, make_staging, refuse_under_file, staging
from edgeexit.errors import BundleError
from edgeexit.jsonio import dumps, read_json
from edgeexit.seal import SEAL, check_seal, check_shape, path_fields, sealed
from edgeexit.stage_io import StageIO

FORMAT = 2  # 2: the manifest is sealed and every file in the bundle is listed
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
UNLISTED = (MANIFEST, SIGNATURE)  # the only files `files` does not (cannot) list
MAX_MANIFEST_BYTES = 16 << 20


def optional_files(manifest: Mapping[str, Any]) -> set[str]:
    """Listed files a bundle may lack: the torch weights, which only the torch reference backend
    reads (a deployed bundle may leave them out; if they come back they must match)."""
    return {manifest["weights"]} if manifest.get("weights") else set()


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tree(root: Path) -> tuple[list[str], list[str]]:
    """(files, folders) under `root` as posix relative paths; refuses links and special files."""
    files, dirs = [], []
    for top, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames) + sorted(filenames):
            full = Path(top) / name
            rel = full.relative_to(root).as_posix()
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                raise BundleError(f"bundle: {rel} is a symbolic link (a bundle holds none: it could point outside)")
            if stat.S_ISDIR(mode):
                dirs.append(rel)
            elif stat.S_ISREG(mode):
                files.append(rel)
            else:
                raise BundleError(f"bundle: {rel} is not a regular file")
    return files, dirs


def checksums(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` except the manifest and its signature, keyed by
    posix relative path (refuses links and special files)."""
    files, _ = _tree(root)
    return {rel: sha256(root / rel) for rel in files if rel not in UNLISTED}


def _inside(rel: Any, where: str) -> str:
    """`rel` when it is a plain relative path that stays inside the bundle."""
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"bundle: manifest field {where} is not a relative path")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or "\\" in rel or ".." in pure.parts or pure.as_posix() != rel or rel.startswith("./"):
        raise BundleError(f"bundle: manifest field {where} ({rel}) points outside the bundle")
    return rel


def _check_tree(root: Path, manifest: dict[str, Any]) -> None:
    """Every path named by the manifest inside; every file on disk listed, every listed file there."""
    files = manifest["files"]
    for where, rel, is_file in path_fields(manifest):
        _inside(rel, where)
        if is_file and rel not in files:
            raise BundleError(f"bundle: {rel} ({where}) has no checksum in {MANIFEST}")
        if rel in UNLISTED:
            raise BundleError(f"bundle: manifest field {where} names {rel}, which no checksum covers")
    on_disk, dirs = _tree(root)
    listed_dirs = {p.as_posix() for rel in files for p in PurePosixPath(rel).parents if p.as_posix() != "."}
    for rel in dirs:
        if rel not in listed_dirs:
            raise BundleError(f"bundle: folder {rel}/ is not in the manifest (added after the build; refused)")
    present = set(on_disk)
    for rel in on_disk:
        if rel not in files and rel not in UNLISTED:
            raise BundleError(f"bundle: {rel} is not listed in the manifest (added after the build; refused)")
    optional = optional_files(manifest)
    missing = [rel for rel in files if rel not in present and rel not in optional]  # in manifest order
    if missing:
        raise BundleError(f"bundle: {missing[0]} is missing")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def input(self) -> dict[str, Any]:
        return self.manifest["input"]

    @property
    def thresholds(self) -> list[float | None]:
        return self.manifest["gating"]["thresholds"]

    def operating_point(self, name: str | None = None, budget_ms: float | None = None) -> tuple[str, dict[str, Any]]:
        """One of the calibrated operating points (`calibrate --point NAME`): by name, or the most
        accurate one whose budget is within `budget_ms` (a device trading accuracy for battery or
        load switches without recalibrating). Refused in one line when none fits."""
        points = self.manifest["gating"].get("operating_points") or {}
        if name is not None:
            if name not in points:
                raise BundleError(f"--point: the bundle has no operating point {name!r} "
                                  f"({', '.join(points) or 'none: calibrate --point NAME writes them'})")
            return name, points[name]
        fitting = [(p.get("accuracy", 0.0), -p["budget_ms"], n) for n, p in points.items() if p["budget_ms"] <= budget_ms]
        if not fitting:
            raise BundleError(f"--budget-ms: no operating point of the bundle fits {budget_ms:g} ms ("
                              + (", ".join(f"{n}: {p['budget_ms']:g} ms" for n, p in points.items()) or
                                 "none: calibrate --point NAME writes them") + ")")
        chosen = max(fitting)[2]
        return chosen, points[chosen]

    def read(self, file: str | Path) -> bytes:
        """The bytes of a listed file (its manifest path as a string, or a Path under the bundle), checked
        against its sealed digest as they are read: what a backend loads is what was
        verified, even if the file was swapped after `load_bundle`."""
        rel = file.relative_to(self.path).as_posix() if isinstance(file, Path) else file
        digest = self.manifest["files"].get(rel)
        if digest is None:
            raise BundleError(f"bundle: {rel} is not listed in the manifest")
        try:
            data = (self.path / rel).read_bytes()
        except OSError as exc:
            raise BundleError(f"bundle: cannot read {rel}: {exc.strerror or exc}") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise BundleError(f"bundle: {rel} fails its checksum: changed since the bundle was verified; refused")
        return data

    @property
    def has_weights(self) -> bool:
        """Whether the torch weights are here (a deployed bundle may leave them out)."""
        return bool(self.manifest.get("weights")) and self.manifest["weights"] in self.present

    @property
    def present(self) -> dict[str, str]:
        """The listed files that are on disk, with their digests."""
        absent = {rel for rel in optional_files(self.manifest) if not (self.path / rel).is_file()}
        return {rel: h for rel, h in self.manifest["files"].items() if rel not in absent}

    @property
    def stage_ios(self) -> list[StageIO]:
        """Tensor names of every stage, in order."""
        return [
            StageIO(s["index"], tuple(s["inputs"]), tuple(s["outputs"]["carry"]),
                    s["outputs"]["logits"], s["outputs"]["conf"], s["outputs"]["pred"])
            for s in self.manifest["stages"]
        ]

    @property
    def stage_paths(self) -> list[Path]:
        return [self.path / s["onnx"] for s in self.manifest["stages"]]

    @property
    def fused_path(self) -> Path | None:
        """The fused cascade graph (`edgeexit.export.fused`), where the build made one."""
        fused = self.manifest.get("fused")
        return None if fused is None else self.path / fused["onnx"]

    @property
    def monolithic_path(self) -> Path:
        return self.path / self.manifest["monolithic"]

    @property
    def monolithic_io(self) -> StageIO:
        """The monolithic graph takes the image and gives the final exit's logits/conf/pred."""
        return StageIO(0, (self.input["name"],), (), "logits", "conf", "pred")


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the bundle at `path`, checked for format, seal and shape (not the files)."""
    if not path.is_dir():
        raise BundleError(f"bundle: {path} is not a folder" if path.exists() else f"bundle: {path} does not exist")
    mf = path / MANIFEST
    if mf.is_symlink() or not mf.is_file():
        raise BundleError(f"bundle: {path} has no {MANIFEST} (not an edgeexit bundle)")
    return check_manifest(read_json(mf, "bundle", MAX_MANIFEST_BYTES, BundleError), mf)


def check_manifest(manifest: Any, where: str | Path) -> dict[str, Any]:
    """`manifest` (parsed from `where`) when it is a sealed, well-formed manifest of this format."""
    if not isinstance(manifest, dict):
        raise BundleError(f"bundle: {where} holds a JSON {type(manifest).__name__}, not a manifest object")
    fmt = manifest.get("format")
    if fmt != FORMAT:
        raise BundleError(f"bundle: format {fmt} is not supported (this edgeexit reads format {FORMAT}; "
                          "rebuild the bundle)")
    check_seal(manifest)
    check_shape(manifest)
    return manifest


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read a bundle and prove it is what was sealed: the manifest unedited and well-formed,
    every path inside, no link, nothing unlisted, nothing missing, and (`verify`) every
    file's sha256. Each refusal is one line naming the file or field."""
    path = Path(path)
    manifest = read_manifest(path)
    _check_tree(path, manifest)
    bundle = Bundle(path, manifest)
    if verify:
        for rel, digest in bundle.present.items():
            try:
                actual = sha256(path / rel)
            except OSError as exc:
                raise BundleError(f"bundle: cannot read {rel}: {exc.strerror or exc}") from None
            if actual != digest:
                raise BundleError(f"bundle: {rel} fails its checksum (manifest {digest[:12]}..., file {actual[:12]}...): "
                                  "modified after the build")
    return bundle


def check_output(dest: Path) -> None:
    """Refuse, before any work, an output location edgeexit may not replace: it must be
    absent, an empty folder, or an intact edgeexit bundle (anything else may be the user's)."""
    dest = Path(os.path.abspath(dest))
    refuse_under_file(dest, "output")
    if os.path.lexists(dest):
        if not dest.is_dir():
            raise BundleError(f"output: {dest} is a file, not a bundle folder; choose another output")
        if any(dest.iterdir()) and not _is_format1_bundle(dest):
            try:
                load_bundle(dest)
            except BundleError as exc:
                reason = str(exc).removeprefix("bundle: ")
                raise BundleError(f"output: {dest} is not empty and not an intact edgeexit bundle ({reason}); "
                                  "edgeexit replaces only its own bundles: choose another output or empty it "
                                  "yourself") from None
    existing = next(p for p in (dest, *dest.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BundleError(f"output: cannot write in {existing} (permission denied)")


def _is_format1_bundle(path: Path) -> bool:
    """A bundle an older edgeexit wrote (format 1: unsealed manifest): still ours to replace
    when every file it holds is listed and matches its checksum."""
    try:
        manifest = read_json(path / MANIFEST, "bundle", MAX_MANIFEST_BYTES, BundleError)
        files = manifest["files"] if isinstance(manifest, dict) and manifest.get("format") == 1 else None
        on_disk, _ = _tree(path)
    except (BundleError, KeyError, OSError):
        return False
    return (isinstance(files, dict) and set(on_disk) - {MANIFEST} == set(files)
            and all(isinstance(h, str) and sha256(path / rel) == h for rel, h in files.items()))


def reseal(manifest: Mapping[str, Any], files: dict[str, str]) -> dict[str, Any]:
    """`manifest` with `files` as its checksums, this format, and a fresh seal."""
    body = {k: v for k, v in manifest.items() if k not in ("format", "files", SEAL)}
    return sealed({**body, "format": FORMAT, "files": files})


def _seal_into_place(partial: Path, manifest: dict[str, Any], files: dict[str, str], dest: Path) -> None:
    """Write the sealed manifest into `partial` and swap `partial` in for `dest` (lock held)."""
    (partial / MANIFEST).write_text(dumps(reseal(manifest, files)) + "\n")
    load_bundle(partial, verify=False)  # what goes in place must be loadable: refuse before the swap
    install(partial, dest)


def write_bundle(staged: Path, manifest: dict[str, Any], dest: Path) -> Path:
    """Seal the folder `staged` (checksums, then the manifest with its seal) and put it at
    `dest` in one atomic step, replacing an intact bundle there and nothing else.

    `staged` should come from `make_staging(dest)` (beside `dest`, same filesystem); it is
    consumed: afterwards it holds the previous bundle, if any, and is deleted."""
    dest = Path(os.path.abspath(dest))
    try:
        with locked(dest):
            check_output(dest)  # again: the location may have changed while the build ran
            _seal_into_place(staged, manifest, checksums(staged), dest)
    finally:
        discard_staging(staged)
    return dest


@dataclass(frozen=True)
class Change:
    """What an update does to a bundle: `files` (relative path -> bytes, or a Path to copy
    in) added or replaced, files under the `remove` paths dropped, top-level manifest
    fields replaced by `manifest`."""

    files: Mapping[str, bytes | Path] = field(default_factory=dict)
    manifest: Mapping[str, Any] = field(default_factory=dict)
    remove: tuple[str, ...] = ()


def _model_files(bundle: Bundle) -> list[str]:
    m = bundle.manifest
    names = [s["onnx"] for s in m["stages"]] + [s["onnx_fp32"] for s in m["stages"] if s.get("onnx_fp32")]
    names += [m[k] for k in ("monolithic", "monolithic_fp32", "weights") if m.get(k)]
    return names


def link_or_copy(src: Path, dst: Path) -> None:
    """`src` at `dst` as a hard link (bundle files are never rewritten in place), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def update_bundle(base: Bundle, change: Change | Callable[[Bundle], Change]) -> Bundle:
    """Apply `change` to the bundle `base` was read from, all or nothing, serialised with every
    other update of it: under the bundle's lock the bundle is read again and verified (a
    `change` callable is computed from that fresh state, so concurrent updates merge instead
    of one losing the other), refused if its model files differ from `base`'s (it changed
    while the caller worked), assembled beside it (unchanged files hard-linked and checked
    again against the digests it inherits), resealed and swapped in atomically. A signature
    does not survive: the manifest it signed is gone."""
    dest = base.path.resolve()
    with locked(dest):
        current = load_bundle(dest)
        was_signed = (dest / SIGNATURE).exists()
        moved = [rel for rel in _model_files(base)
                 if base.manifest["files"].get(rel) != current.manifest["files"].get(rel)]
        if moved:
            raise BundleError(f"bundle: {dest} changed while this command ran ({', '.join(moved[:3])}); "
                              "nothing was written: run it again")
        ch = change(current) if callable(change) else change
        for rel in [*ch.files, *ch.remove]:
            _inside(rel, "of this update")
            if rel in UNLISTED:
                raise BundleError(f"bundle: cannot write {rel} into a bundle")
        gone = lambda rel: rel in ch.files or any(rel == r or rel.startswith(r.rstrip("/") + "/")  # noqa: E731
                                                  for r in ch.remove)
        inherited = {rel: h for rel, h in current.manifest["files"].items() if not gone(rel)}
        here = {rel: h for rel, h in current.present.items() if rel in inherited}
        partial = make_staging(dest)
        try:
            for rel in here:
                link_or_copy(dest / rel, partial / rel)
            for rel, digest in here.items():  # a file rewritten in place since the check above
                if sha256(partial / rel) != digest:
                    raise BundleError(f"bundle: {rel} changed while this command ran; nothing was written")
            files = dict(inherited)
            for rel, content in ch.files.items():
                target = partial / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, Path):
                    shutil.copyfile(content, target)
                else:
                    target.write_bytes(content)
                files[rel] = sha256(target)
            _seal_into_place(partial, {**current.manifest, **ch.manifest}, files, dest)
        finally:
            discard_staging(partial)
    if was_signed:
        print(f"bundle: note: {dest.name}'s manifest changed, so its signature was dropped; sign it again "
              "(edgeexit sign)", file=sys.stderr)
    return load_bundle(dest)


def replace_signature(bundle: Bundle, signature: bytes, signed_digest: str) -> Bundle:
    """Add (or replace) `manifest.sig` of `bundle`, atomically and under its lock; refused if
    the manifest is no longer the one whose seal digest was signed."""
    dest = bundle.path.resolve()
    with locked(dest):
        current = load_bundle(dest)
        if current.manifest[SEAL]["digest"] != signed_digest:
            raise BundleError(f"bundle: {dest} changed while it was being signed; nothing was written")
        with staging(dest) as partial:
            for rel in [*current.present, MANIFEST]:
                link_or_copy(dest / rel, partial / rel)
            (partial / SIGNATURE).write_bytes(signature)
            load_bundle(partial)
            install(partial, dest)
    return load_bundle(dest)
