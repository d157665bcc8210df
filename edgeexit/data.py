"""Data sets for training, calibration and evaluation, split with a fixed seed.

Sources: scikit-learn's bundled digits (1797 8x8 grey images, offline), an `.npz` file
with arrays `x` (N, C, H, W) or (N, H, W) and integer labels `y` (N,), or an image folder
laid out as `root/<class name>/<image>`. Images stay in raw units here; normalisation is
`normalize()`, shared by training and every runtime backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeexit.errors import EdgeExitError, SpecError
from edgeexit.inputs import IMAGE_SUFFIXES, decode_images, resize
from edgeexit.spec import SPLITS, DataSpec, InputSpec, Spec


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # (N, C, H, W) float32, raw units
    y: np.ndarray  # (N,) int64


@dataclass(frozen=True)
class Dataset:
    train: Split
    val: Split
    calibration: Split
    test: Split
    notes: tuple[str, ...] = field(default=())  # what decoding changed (converted, resized images)


def normalize(x: np.ndarray, mean, std) -> np.ndarray:
    """(x - mean) / std per channel, as float32 in C order: the one preprocessing step of every
    path (a backend given an input laid out otherwise copies it on every call)."""
    mean = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((np.asarray(x, dtype=np.float32) - mean) / std, dtype=np.float32)


def resize_like(x: np.ndarray, shape: tuple[int, ...], enabled: bool) -> np.ndarray:
    """`x` resized to the input shape's H x W where resizing is `enabled` (the bundle or yaml
    says `data.resize: true`) and the channels match, grey images repeated to the three channels
    of an RGB input (a network made for colour, e.g. torchvision's, on grey data); otherwise `x`
    unchanged."""
    if enabled and x.ndim == 4 and x.shape[1] == 1 and shape[0] == 3:
        x = np.repeat(x, 3, axis=1)
    if enabled and x.ndim == 4 and x.shape[1] == shape[0]:
        return resize(x, shape[1:])
    return x


def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SpecError("data.source: 'digits' needs scikit-learn: pip install 'edgeexit[digits]'") from None
    bunch = load_digits()
    return bunch.images.astype(np.float32)[:, None], bunch.target.astype(np.int64)


def max_input_bytes() -> int:
    """The largest input file read whole into memory (EDGEEXIT_MAX_INPUT_BYTES, default 4 GiB);
    `edgeexit run` memory-maps .npy inputs instead, so they are not bound by it."""
    return int(os.environ.get("EDGEEXIT_MAX_INPUT_BYTES", 4 << 30))


def nonfinite_samples(x: np.ndarray) -> np.ndarray:
    """Indices of the samples of `x` (first axis) holding a NaN or an Inf."""
    if np.issubdtype(x.dtype, np.integer) or len(x) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))


def describe_samples(indices, total: int) -> str:
    """`3 of 100 samples (7, 12, 40)`: for one-line errors about particular samples."""
    shown = ", ".join(str(int(i)) for i in list(indices)[:8])
    return f"{len(indices)} of {total} samples ({shown}{', ...' if len(indices) > 8 else ''})"


def refuse_nonfinite(x: np.ndarray, what: str, offset: int = 0, total: int | None = None) -> None:
    """One line naming how many and which samples of `x` hold NaN/Inf, if any do."""
    bad = nonfinite_samples(x)
    if len(bad):
        raise EdgeExitError(f"{what}: {describe_samples(bad + offset, total or len(x))} contain NaN or Inf")


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    size = path.stat().st_size if path.is_file() else 0
    if size > max_input_bytes():
        raise SpecError(f"data.source: {path} is {size} bytes, above the {max_input_bytes()}-byte input limit "
                        "(EDGEEXIT_MAX_INPUT_BYTES)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive or "y" not in archive:
                raise SpecError(f"data.source: {path} needs arrays 'x' and 'y' (has: {', '.join(archive.files)})")
            x, y = archive["x"], archive["y"]
    except (OSError, ValueError) as exc:
        raise SpecError(f"data.source: cannot read {path}: {exc}") from None
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
        raise SpecError(f"data.source: {path} has x {x.shape} and y {y.shape}; need x (N,C,H,W) or (N,H,W) and y (N,)")
    if not np.issubdtype(y.dtype, np.integer):
        raise SpecError(f"data.source: {path} labels 'y' must be integers, got {y.dtype}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise SpecError(f"data.source: {path} images 'x' must be real numbers, got {x.dtype}")
    if len(x) == 0:
        raise SpecError(f"data.source: {path} holds no samples")
    refuse_nonfinite(x, f"data.source: {path}")
    return x.astype(np.float32), y.astype(np.int64)


def _folder(root: Path, classes: tuple[str, ...], shape: tuple[int, ...],
            resize: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    if sorted(classes) != found:
        raise SpecError(f"data.source: {root} has class folders {found}, but input.classes is {list(classes)}")
    files, labels = [], []
    for label, name in enumerate(classes):
        here = sorted(f for f in (root / name).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        files += here
        labels += [label] * len(here)
    if not files:
        raise SpecError(f"data.source: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    decoded = decode_images(files, shape[0], shape[1:], "bicubic" if resize else None, "data.source")
    return decoded.x, np.asarray(labels, dtype=np.int64), decoded.notes()


def load_dataset(spec: Spec) -> Dataset:
    """Load the spec's data, check it against `input`, and split it with `data.seed`.

    Raises a one-line SpecError when the data disagrees with `input.shape` or `input.classes`.
    """
    return load_splits(spec.data, spec.input)


def load_splits(data: DataSpec, inp: InputSpec) -> Dataset:
    """`load_dataset` from its two parts (a bundle records both, so a split can be rebuilt later)."""
    notes: list[str] = []
    if data.kind == "digits":
        x, y = _digits()
    elif data.kind == "npz":
        x, y = _npz(data.path)
    else:
        x, y, notes = _folder(data.path, inp.classes, inp.shape, data.resize)
    before = x.shape
    x = resize_like(x, inp.shape, data.resize)
    if x.shape != before:  # arrays (a folder's files were resized as they were decoded)
        notes.append(f"{len(x)} images resized {before[3]}x{before[2]} -> {x.shape[3]}x{x.shape[2]} (bilinear)"
                     + (", grey repeated to RGB" if before[1] != x.shape[1] else ""))
    if tuple(x.shape[1:]) != inp.shape:
        raise SpecError(
            f"input.shape: {list(inp.shape)} does not match the data (images are {list(x.shape[1:])})"
            + ("" if data.resize else "; set data.resize: true to resize them")
        )
    n_classes = len(inp.classes)
    if y.min() < 0 or y.max() >= n_classes:
        raise SpecError(f"input.classes: {n_classes} classes, but the labels span {int(y.min())}..{int(y.max())}")
    order = np.random.default_rng(data.seed).permutation(len(x))
    splits, start = {}, 0
    for name in SPLITS:
        count = int(round(data.splits[name] * len(x)))
        idx = order[start:start + count]
        if len(idx) == 0:
            raise SpecError(f"data.splits.{name}: the split is empty with {len(x)} samples; give it a larger fraction")
        splits[name] = Split(x[idx], y[idx])
        start += count
    return Dataset(**splits, notes=tuple(notes))


def data_record(data: DataSpec) -> dict:
    """The manifest's `data` entry: enough to rebuild the same splits where the bundle goes."""
    return {"source": "digits" if data.kind == "digits" else str(data.path), "splits": dict(data.splits),
            "seed": data.seed, "resize": data.resize}


# how a command that reads a bundle's data (trace, profile, calibrate) is given other data
DATA_HINT = "pass --data FILE.npz (calibrate: --data-val, --data-test)"


def bundle_split(manifest: dict, split: str, override: str | Path | None = None) -> Split:
    """Raw images and labels of one split of the data a bundle was built from, or of `override`
    (an .npz with `x` and `y`, taken whole) where that data is not at hand."""
    inp = manifest["input"]
    input_spec = InputSpec(inp["name"], tuple(inp["shape"][1:]), inp["dtype"], tuple(inp["mean"]),
                           tuple(inp["std"]), tuple(manifest["classes"]))
    if override is not None:
        x, y = _npz(Path(override))
        x = resize_like(x, input_spec.shape, bool((manifest.get("data") or {}).get("resize", False)))
        if tuple(x.shape[1:]) != input_spec.shape:
            raise EdgeExitError(f"--data: {override} has images {list(x.shape[1:])}; the bundle takes "
                                f"{list(input_spec.shape)}")
        return Split(x, y)
    record = manifest.get("data")
    if record is None:
        raise EdgeExitError(f"bundle: no `data` record (built by an older edgeexit); {DATA_HINT}")
    if split not in SPLITS:
        raise EdgeExitError(f"--split: {split!r} is not one of {', '.join(SPLITS)}")
    source = record["source"]
    path = None if source == "digits" else Path(source)
    if path is not None and not path.exists():
        raise EdgeExitError(f"data: {source} (the bundle's data) is not on this machine; {DATA_HINT}")
    kind = "digits" if path is None else ("npz" if path.suffix == ".npz" else "folder")
    if kind == "digits":
        try:
            import sklearn.datasets  # noqa: F401
        except ImportError:
            raise EdgeExitError("data: the bundle's data is scikit-learn's digits, which is not installed here: "
                                f"pip install 'edgeexit[digits]', or {DATA_HINT}") from None
    data = DataSpec(kind, path, {k: float(v) for k, v in record["splits"].items()}, int(record["seed"]),
                    bool(record.get("resize", False)))
    return getattr(load_splits(data, input_spec), split)
