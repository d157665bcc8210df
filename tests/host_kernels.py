"""The runtime's CUDA gather kernel, compiled from its own source for the host CPU.

Tests have no GPU, but they can still run the kernel's code: CUDA's built-in index variables
(``blockIdx``, ``blockDim``, ``threadIdx``, ``gridDim``) become plain globals that a host loop
sets block by block, thread by thread, and ``__global__`` becomes nothing. For a kernel with no
shared memory, barriers or atomics, such as the grid-stride row gather, running the threads one
after another computes exactly what the GPU computes, so this checks the kernel's index
arithmetic and its grid-stride loop (not CUDA itself, nor speed).
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from edgeexit.runtime.pycuda_memory import GATHER_SOURCE

KINDS = {"u32": ctypes.c_uint32, "u8": ctypes.c_uint8}

_PRELUDE = r"""
struct edgeexit_uint3 { unsigned int x, y, z; };
static edgeexit_uint3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
"""

# One host launcher per kernel: every (block, thread) of a 1-D grid, in turn.
_LAUNCHER = r"""
#define LAUNCH(KIND, T)                                                                         \
extern "C" void launch_##KIND(unsigned int grid, unsigned int block, T *dst, const T *src,      \
                              const long long *rows, long long n_rows, long long row_units)     \
{                                                                                               \
    gridDim.x = grid; gridDim.y = gridDim.z = 1;                                                \
    blockDim.x = block; blockDim.y = blockDim.z = 1;                                            \
    for (unsigned int b = 0; b < grid; ++b)                                                     \
        for (unsigned int t = 0; t < block; ++t) {                                              \
            blockIdx.x = b; threadIdx.x = t;                                                    \
            gather_rows_##KIND(dst, src, rows, n_rows, row_units);                              \
        }                                                                                       \
}
LAUNCH(u32, unsigned int)
LAUNCH(u8, unsigned char)
"""


class HostGather:
    """`launch(kind, grid, block, dst, src, rows, n_rows, row_units)` on host addresses."""

    def __init__(self, library: Path):
        self._lib = ctypes.CDLL(str(library))
        self._fns = {}
        for kind, unit in KINDS.items():
            fn = getattr(self._lib, f"launch_{kind}")
            fn.restype = None
            fn.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(unit), ctypes.POINTER(unit),
                           ctypes.POINTER(ctypes.c_longlong), ctypes.c_longlong, ctypes.c_longlong]
            self._fns[kind] = fn

    def launch(self, kind: str, grid: int, block: int, dst: int, src: int, rows: int,
               n_rows: int, row_units: int) -> None:
        """Run kernel `gather_rows_<kind>` over a grid of `grid` x `block` threads."""
        unit = ctypes.POINTER(KINDS[kind])
        self._fns[kind](grid, block, ctypes.cast(dst, unit), ctypes.cast(src, unit),
                        ctypes.cast(rows, ctypes.POINTER(ctypes.c_longlong)), n_rows, row_units)


@functools.lru_cache(maxsize=1)
def host_gather() -> HostGather | None:
    """The gather kernel built for the host (once per test session); None without a C++ compiler."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        return None
    folder = Path(tempfile.mkdtemp(prefix="edgeexit-kernel-"))
    source = folder / "gather_host.cpp"
    # pycuda's SourceModule wraps the source in extern "C" { } as well.
    source.write_text(_PRELUDE + 'extern "C" {\n' + GATHER_SOURCE + "\n}\n" + _LAUNCHER)
    library = folder / "gather_host.so"
    subprocess.run([compiler, "-O1", "-Wall", "-Werror", "-shared", "-fPIC", "-x", "c++", str(source),
                    "-o", str(library)], check=True, capture_output=True, text=True)
    return HostGather(library)
