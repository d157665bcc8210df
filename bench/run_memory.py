"""Peak memory of `edgeexit run` on a large input, as a ratio of the input's size.

`run` memory-maps the `.npy` and normalises and runs it one chunk (about 64 MiB) at a time,
so the memory it adds over a run on a tiny input should stay near one chunk whatever the
input's size (before it read the file whole and normalised a copy: about 3x the input).
Prints, measured in this one run: peak RSS of `run` on a tiny input (the interpreter,
torch, onnxruntime), on the large input, and (large - tiny) / input size; target <= 0.25 at
the default 1 GiB.

    python bench/run_memory.py [--bundle DIR] [--mib 1024]
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
SNIPPET = ("import resource, sys; from edgeexit.cli import main; rc = main(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")


def peak_rss_kib(bundle: Path, images: Path) -> int:
    """Peak RSS (KiB) of one `edgeexit run` in a fresh process, its output thrown away."""
    proc = subprocess.run([sys.executable, "-c", SNIPPET, "run", str(bundle), "--input", str(images)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True)
    return int(proc.stderr.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default=str(ROOT / "examples/digits/build/digits-eenet"),
                   help="a built bundle (default: the shipped example's; `edgeexit build examples/digits/model.yaml`)")
    p.add_argument("--mib", type=int, default=1024, help="size of the large input in MiB (default 1024)")
    args = p.parse_args()
    from edgeexit.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    shape = tuple(bundle.input["shape"][1:])
    per_sample = int(np.prod(shape)) * 4
    with tempfile.TemporaryDirectory() as tmp:
        tiny, large = Path(tmp) / "tiny.npy", Path(tmp) / "large.npy"
        np.save(tiny, np.ones((4, *shape), np.float32))
        n = args.mib * (1 << 20) // per_sample
        big = np.lib.format.open_memmap(large, mode="w+", dtype=np.float32, shape=(n, *shape))
        rng = np.random.default_rng(0)
        for start in range(0, n, 1 << 16):  # written in pieces: this script stays small too
            big[start:start + (1 << 16)] = rng.uniform(0, 16, size=big[start:start + (1 << 16)].shape)
        big.flush()
        del big
        size_kib = large.stat().st_size / 1024
        base = peak_rss_kib(bundle.path, tiny)
        peak = peak_rss_kib(bundle.path, large)
    print(f"input: {n} images {list(shape)}, {size_kib / 1024:.0f} MiB")
    print(f"peak RSS: tiny input {base / 1024:.0f} MiB, large input {peak / 1024:.0f} MiB")
    print(f"added by the large input / its size: {(peak - base) / size_kib:.3f} (target <= 0.25)")


if __name__ == "__main__":
    main()
