"""The bundle: one directory that carries a staged model to a device, and proves it is intact.

Layout: `manifest.json` (what the runtime needs: input spec, classes, stages with tensor
names and costs, gating, toolchain, sha256 of every other file), `stages/stage{k}.onnx`,
`monolithic.onnx`, `weights.pt` (torch reference), `report.json` (the build's measurements).
A bundle is written into a temporary directory and renamed into place, so a failed build
leaves nothing half-written; loading verifies every checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeexit.errors import BundleError
from edgeexit.staging import StageIO

FORMAT = 1
MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checksums(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` except the manifest, keyed by posix relative path."""
    return {
        p.relative_to(root).as_posix(): sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
    }


def write_bundle(staging: Path, manifest: dict[str, Any], dest: Path) -> Path:
    """Seal `staging` (checksums + manifest) and move it to `dest` in one rename.

    An existing bundle at `dest` is replaced; anything else there is refused rather than
    deleted. The parent of `dest` is the only thing created before the final rename.
    """
    if dest.exists() and not (dest / MANIFEST).is_file() and any(dest.iterdir()):
        raise BundleError(f"output: {dest} exists and is not an edgeexit bundle; remove it or choose another output")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        shutil.copytree(staging, partial, dirs_exist_ok=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return _seal_into_place(partial, manifest, dest)


def _seal_into_place(partial: Path, manifest: dict[str, Any], dest: Path) -> Path:
    """Write the manifest (with checksums) into `partial` and swap it in for `dest`."""
    old = None
    try:
        manifest = {**manifest, "format": FORMAT, "files": checksums(partial)}
        (partial / MANIFEST).unlink(missing_ok=True)  # may be a hard link to the live bundle's manifest
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(partial, dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if old is not None and not dest.exists():
            os.replace(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


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
    def monolithic_path(self) -> Path:
        return self.path / self.manifest["monolithic"]

    @property
    def monolithic_io(self) -> StageIO:
        """The monolithic graph takes the image and gives the final exit's logits/conf/pred."""
        return StageIO(0, (self.input["name"],), (), "logits", "conf", "pred")


REQUIRED = ("format", "name", "input", "classes", "stages", "gating", "monolithic", "files")


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read a bundle's manifest and (by default) verify every file's sha256.

    Refuses a missing or tampered file with a message that names it.
    """
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise BundleError(f"bundle: {path} has no {MANIFEST} (not an edgeexit bundle)")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"bundle: {mf} is not valid JSON: {exc}") from None
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise BundleError(f"bundle: {mf} lacks {', '.join(missing)}")
    if manifest["format"] != FORMAT:
        raise BundleError(f"bundle: format {manifest['format']} is not supported (this edgeexit reads format {FORMAT})")
    files = manifest["files"]
    referenced = [s["onnx"] for s in manifest["stages"]] + [manifest["monolithic"]]
    for rel in [*files, *referenced]:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise BundleError(f"bundle: {rel} points outside the bundle")
    for rel in referenced:
        if rel not in files:
            raise BundleError(f"bundle: {rel} has no checksum in {MANIFEST}")
    if verify:
        for rel, digest in files.items():
            f = path / rel
            if not f.is_file():
                raise BundleError(f"bundle: {rel} is missing")
            actual = sha256(f)
            if actual != digest:
                raise BundleError(f"bundle: {rel} fails its checksum (manifest {digest[:12]}..., file {actual[:12]}...): modified after the build")
    return Bundle(path, manifest)


def update_bundle(bundle: Bundle, files: dict[str, bytes], manifest_updates: dict[str, Any]) -> Bundle:
    """Add or replace `files` (relative path -> content) and manifest fields of a verified
    bundle, all or nothing: the new bundle is assembled beside the old one (unchanged files
    hard-linked), resealed with fresh checksums and swapped in with one rename."""
    for rel in files:
        if Path(rel).is_absolute() or ".." in Path(rel).parts or rel == MANIFEST:
            raise BundleError(f"bundle: cannot write {rel} into a bundle")
    dest = bundle.path.resolve()
    partial = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        shutil.copytree(dest, partial, dirs_exist_ok=True, copy_function=_link_or_copy)
        for rel, content in files.items():
            target = partial / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)  # never write through a hard link into the live bundle
            target.write_bytes(content)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    manifest = {k: v for k, v in bundle.manifest.items() if k not in ("files", "format")}
    _seal_into_place(partial, {**manifest, **manifest_updates}, dest)
    return load_bundle(dest)
