"""Inputs checked at the door: what the training data looked like, image files decoded the way
the build decoded them, and a file that is not an image or an .npy named for what it is.

numpy only (Pillow for image files): the runtime install uses this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from edgeexit.errors import EdgeExitError, SpecError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".pnm", ".tif", ".tiff", ".webp", ".gif")
RESIZES = ("bicubic", "bilinear")  # Pillow's filter on image files; numpy on arrays (edgeexit.inputs.resize)

# (magic bytes at offset 0, what the file is); the first that matches names it
_MAGIC = (
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"PK\x03\x04", "a zip archive (an .npz?)"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"BM", "a BMP image"),
    (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"P5", "a PGM image"),
    (b"P6", "a PPM image"),
    (b"RIFF", "a RIFF file (WebP image?)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x80", "a Python pickle"),
    (b"{", "JSON text"),
)


def file_kind(path: Path) -> str:
    """What a file is, from its first bytes: 'a PNG image', 'a NumPy .npy array', ..."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "an empty file"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    return "text" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "binary data of unknown kind"


# --- the training data's units -------------------------------------------------------------

FAR = 0.5  # values beyond the training range by more than this share of its width are far outside
NARROW = 0.25  # an image whose value span is below this share of the training images' typical span
FLAGGED = 0.05  # warn when more than this share of the inputs is flagged (and at least one is)


def value_range(x: np.ndarray) -> dict[str, float]:
    """The raw training images' value range for the manifest: min, max, mean, std and the 1st
    percentile of the per-image span (max - min), which catches inputs in other units."""
    flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    span = flat.max(axis=1) - flat.min(axis=1)
    return {"min": float(flat.min()), "max": float(flat.max()), "mean": float(flat.mean()),
            "std": float(flat.std()), "span_p01": float(np.percentile(span, 1))}


@dataclass
class UnitCheck:
    """Counts, chunk by chunk, the inputs that look as if they were in other units than the
    training data (`record`: the manifest's `input.range`), and says so in one line."""

    record: dict[str, float]
    seen: int = 0
    outside: int = 0
    narrow: int = 0
    lo: float = float("inf")
    hi: float = float("-inf")
    examples: list[int] = field(default_factory=list)

    def add(self, x: np.ndarray) -> None:
        """Account for a chunk of raw images (N, C, H, W), in the order they are run."""
        flat = np.asarray(x).reshape(len(x), -1)  # no copy: the chunk may be large
        mins, maxs = flat.min(axis=1).astype(np.float64), flat.max(axis=1).astype(np.float64)
        rows = np.flatnonzero(np.isfinite(mins) & np.isfinite(maxs))  # NaN/Inf rows are refused or reported apart
        first, self.seen = self.seen, self.seen + len(x)
        if not len(rows):
            return
        mins, maxs = mins[rows], maxs[rows]
        r = self.record
        width = max(r["max"] - r["min"], 1e-12)
        far = (mins < r["min"] - FAR * width) | (maxs > r["max"] + FAR * width)
        small = (maxs - mins) < NARROW * r["span_p01"]
        flagged = rows[far | small]
        self.examples += [first + int(i) for i in flagged[:max(0, 8 - len(self.examples))]]
        self.outside += int(far.sum())
        self.narrow += int((small & ~far).sum())
        self.lo, self.hi = min(self.lo, float(mins.min())), max(self.hi, float(maxs.max()))

    def verdict(self) -> str | None:
        """One line when the inputs look like other units (None when they look like the training data)."""
        flagged = self.outside + self.narrow
        if not self.seen or not flagged or flagged <= FLAGGED * self.seen:
            return None
        r = self.record
        why = ("far outside" if self.outside >= self.narrow else "a much narrower range than")
        return (f"{flagged} of {self.seen} images (e.g. {', '.join(map(str, self.examples[:4]))}) span "
                f"{self.lo:.4g}..{self.hi:.4g}, {why} the training data's {r['min']:.4g}..{r['max']:.4g} "
                f"(mean {r['mean']:.4g}, std {r['std']:.4g}): give them in the training data's units "
                f"(the bundle normalises with its own mean and std)")


def _bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows and weights of a bilinear resize along one axis (half-pixel centres, edges
    clamped): torch's `interpolate(mode="bilinear", align_corners=False)`, without torch."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, w1


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Images (N, C, H, W) resized bilinearly to `size` (H, W): lets architectures built for
    32x32 inputs (MSDNet, RANet) train on smaller data such as the 8x8 digits. numpy only, so
    the runtime resizes exactly as the build did without torch."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    x = np.asarray(x, dtype=np.float32)
    r0, r1, wr = _bilinear_taps(x.shape[2], size[0])
    c0, c1, wc = _bilinear_taps(x.shape[3], size[1])
    rows = x[:, :, r0, :] * (1 - wr)[:, None] + x[:, :, r1, :] * wr[:, None]
    # indexing the last axis lays the result out with that axis outermost: made (N, C, H, W) in
    # memory again, or every later call on a slice of it copies its input first
    return np.ascontiguousarray(rows[:, :, :, c0] * (1 - wc) + rows[:, :, :, c1] * wc, dtype=np.float32)


# --- image files ---------------------------------------------------------------------------

def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise EdgeExitError("image files need Pillow: pip install 'edgeexit[images]'") from None
    return Image


@dataclass
class Decoded:
    """Images decoded to (N, C, H, W) float32 raw values, and what decoding changed."""

    x: np.ndarray
    files: list[Path]
    converted: dict[str, int] = field(default_factory=dict)  # "RGB -> L": count
    resized: dict[str, int] = field(default_factory=dict)  # "24x24 -> 8x8": count

    def notes(self) -> list[str]:
        """One line per kind of change, for the user to see (nothing is converted silently)."""
        n = len(self.files)
        out = [f"{c} of {n} images converted {how}" for how, c in self.converted.items()]
        out += [f"{c} of {n} images resized {how}" for how, c in self.resized.items()]
        return out


def decode_images(files: Iterable[Path], channels: int, size: tuple[int, int], how: str | None,
                  what: str) -> Decoded:
    """Image files as raw (N, C, H, W) float32 in the files' own units (0..255 for 8-bit),
    `channels` 1 (grey, Pillow mode L) or 3 (RGB), every file counted when it had to be
    converted. A size other than `size` (H, W) is resized when `how` says how (the yaml's
    data.resize): "bicubic" with Pillow (how the build decodes an image folder), "bilinear" on
    the decoded array (how it resizes .npz and digits arrays); with None it is refused in one
    line naming the file. The build and `edgeexit run` both decode through here, so a
    deployed bundle sees what training saw."""
    Image = _pillow()
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise SpecError(f"input.shape: image files give 1 (grey) or 3 (RGB) channels, not {channels}")
    height, width = size
    files = list(files)
    out = Decoded(np.empty((len(files), channels, height, width), dtype=np.float32), files)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as img:
                img.load()
                if img.mode != mode:
                    key = f"{img.mode} -> {mode}"
                    out.converted[key] = out.converted.get(key, 0) + 1
                    img = img.convert(mode)
                if img.size != (width, height):
                    if how not in RESIZES:
                        fix = "data.resize: true in the yaml" if what == "data.source" else "a bundle built with data.resize: true"
                        raise SpecError(f"{what}: {f} is {img.size[0]}x{img.size[1]} (WxH); the model takes "
                                        f"{width}x{height}: resize the images, or use {fix}")
                    key = f"{img.size[0]}x{img.size[1]} -> {width}x{height} ({how})"
                    out.resized[key] = out.resized.get(key, 0) + 1
                    if how == "bicubic":
                        img = img.resize((width, height), resample=Image.BICUBIC)
                arr = np.asarray(img, dtype=np.float32)
        except OSError as exc:
            raise EdgeExitError(f"{what}: cannot decode {f}: {exc}") from None
        arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
        out.x[i] = resize(arr[None], size)[0] if arr.shape[1:] != (height, width) else arr
    return out


def image_files(root: Path) -> list[Path]:
    """The image files under a folder (by suffix, recursively, in sorted path order)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def describe_input(path: Path) -> str:
    """What `edgeexit run --input` was given: 'npy', 'image' or 'folder', refusing in one line
    (naming what the file is) anything else."""
    if path.is_dir():
        return "folder"
    if not path.is_file():
        raise EdgeExitError(f"--input: file not found: {path}")
    kind = file_kind(path)  # its first bytes, read once
    if kind == "a NumPy .npy array":
        return "npy"
    if kind.endswith("image") or kind.startswith("a RIFF"):
        return "image"
    raise EdgeExitError(f"--input: {path} is {kind}; give an .npy array [N, C, H, W], an image file "
                        f"({', '.join(IMAGE_SUFFIXES)}) or a folder of them")
