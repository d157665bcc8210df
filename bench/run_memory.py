"""Peak memory of `edgeexit run` on large inputs: what it adds does not grow with the input.

`run` memory-maps the `.npy`, normalises and runs it one chunk (about 16 MiB of images) at a
time and hands back the pages it has run, so the memory a large input adds over a tiny one
should be a few chunks whatever the input's size (before, it read the file whole and
normalised a copy: about 3x the input). Prints, measured in this one run: peak RSS (VmHWM,
Linux) of `run` on a tiny input (interpreter, torch, onnxruntime) and on two large inputs,
what each adds, and added(large) / added(small): near 1.0 when memory is bounded (<= 1.25
passes), near the ratio of the sizes when it is not.

    python bench/run_memory.py [--bundle DIR] [--mib 64,256]
"""

from __future__ import annotations

import _paths  # noqa: F401 - first: keeps bench/ off the import path (bench/calibration.py)
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child would
# report this script's own peak (it just wrote the large file)
SNIPPET = ("import sys; from edgeexit.cli import main; rc = main(sys.argv[1:]); "
           "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0], file=sys.stderr); "
           "sys.exit(rc)")


def peak_rss_kib(bundle: Path, images: Path) -> int:
    """Peak RSS (KiB) of one `edgeexit run` in a fresh process, its output thrown away."""
    proc = subprocess.run([sys.executable, "-c", SNIPPET, "run", str(bundle), "--input", str(images)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True)
    return int(proc.stderr.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default=str(ROOT / "examples/digits/build/digits-eenet"),
                   help="a built bundle (default: the shipped example's; `edgeexit build examples/digits/model.yaml`)")
    p.add_argument("--mib", default="64,256", help="sizes of the two large inputs in MiB (default 64,256)")
    args = p.parse_args()
    from edgeexit.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    shape = tuple(bundle.input["shape"][1:])
    sizes = [int(m) for m in args.mib.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tiny = Path(tmp) / "tiny.npy"
        np.save(tiny, np.ones((4, *shape), np.float32))
        base = peak_rss_kib(bundle.path, tiny)
        print(f"peak RSS on a 4-image input: {base / 1024:.0f} MiB")
        added = []
        for mib in sizes:
            large = Path(tmp) / f"large-{mib}.npy"
            n = write_images(large, shape, mib)
            peak = peak_rss_kib(bundle.path, large)
            added.append(peak - base)
            print(f"input {mib} MiB ({n} images {list(shape)}): peak RSS {peak / 1024:.0f} MiB, "
                  f"added {added[-1] / 1024:.0f} MiB")
            large.unlink()
    print(f"added at {sizes[-1]} MiB / added at {sizes[0]} MiB: {added[-1] / max(added[0], 1):.2f} "
          f"(bounded: near 1.0, <= 1.25 passes; unbounded: near {sizes[-1] / sizes[0]:.0f})")


def write_images(path: Path, shape: tuple[int, ...], mib: int) -> int:
    """An .npy of random images in digits units, `mib` MiB, written in pieces; returns the count."""
    n = mib * (1 << 20) // (int(np.prod(shape)) * 4)
    big = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, *shape))
    rng = np.random.default_rng(0)
    for start in range(0, n, 1 << 16):
        big[start:start + (1 << 16)] = rng.uniform(0, 16, size=big[start:start + (1 << 16)].shape)
    big.flush()
    return n


if __name__ == "__main__":
    main()
