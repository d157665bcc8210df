"""Device memory on one pycuda stream: static buffers, page-locked transfers, row gathers.

Everything is queued on one non-default stream of the current context:

- buffers come from ``mem_alloc`` (zeroed once, so padding rows hold finite values) and live
  until `free`;
- host -> device and device -> host copies go through page-locked staging buffers from a
  ``PageLockedMemoryPool``; a staging buffer is held until the event recorded after its
  copy has completed, and a read waits for the stream;
- a row gather (``dst[i] = src[rows[i]]``, the cascade's compaction) is one tiny CUDA kernel
  compiled once with ``pycuda.compiler.SourceModule``: one launch whatever the pattern of
  leaving samples. Where nvcc is not available (a bare JetPack without the CUDA toolkit on
  PATH) it falls back to ``memcpy_dtod_async`` per run of consecutive rows (at worst one
  driver call per kept row).

The TensorRT backend moves its tensors with this; the GPU tests check it against torch.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeexit.errors import EdgeExitError

_BLOCK = 256
_MAX_GRID = 65535

GATHER_SOURCE = r"""
// dst[i, :] = src[rows[i], :] for i < n_rows; rows are whole rows of `row_units` units.
#define GATHER_ROWS(NAME, T)                                                                   \
__global__ void NAME(T *dst, const T *src, const long long *rows, long long n_rows,            \
                     long long row_units)                                                      \
{                                                                                              \
    const long long total = n_rows * row_units;                                                \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;           \
         i += (long long)blockDim.x * gridDim.x) {                                             \
        const long long r = i / row_units;                                                     \
        dst[i] = src[rows[r] * row_units + (i - r * row_units)];                               \
    }                                                                                          \
}
GATHER_ROWS(gather_rows_u32, unsigned int)
GATHER_ROWS(gather_rows_u8, unsigned char)
"""


def contiguous_runs(rows: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first source row, first destination row, row count) per run of consecutive source rows."""
    rows = np.asarray(rows, dtype=np.int64).ravel()
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [rows.size]))
    return [(int(rows[s]), int(s), int(e - s)) for s, e in zip(starts, ends)]


def gather_launch(n_rows: int, row_bytes: int) -> tuple[str, int, int]:
    """Kernel choice for a row gather: ('u32' | 'u8', units per row, grid blocks)."""
    if row_bytes % 4 == 0:
        kind, units = "u32", row_bytes // 4
    else:
        kind, units = "u8", row_bytes
    total = n_rows * units
    return kind, units, max(1, min((total + _BLOCK - 1) // _BLOCK, _MAX_GRID))


class DeviceBuffer:
    """A static device buffer: `rows` rows of `row_shape` `dtype`, freed by the backend's close."""

    __slots__ = ("alloc", "rows", "row_shape", "dtype")

    def __init__(self, alloc, rows: int, row_shape: tuple[int, ...], dtype: np.dtype):
        self.alloc, self.rows, self.row_shape, self.dtype = alloc, rows, tuple(row_shape), np.dtype(dtype)

    @property
    def ptr(self) -> int:
        return int(self.alloc)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"DeviceBuffer(0x{self.ptr:x}, [{self.rows}, {', '.join(map(str, self.row_shape))}] {self.dtype})"


class PycudaMemory:
    """Buffers, copies and gathers on one pycuda stream (`gather`: kernel, memcpy or auto)."""

    def __init__(self, gather: str = "auto"):
        if gather not in ("auto", "kernel", "memcpy"):
            raise EdgeExitError(f"backend tensorrt: gather must be auto, kernel or memcpy, not {gather!r}")
        import pycuda.driver as cuda  # noqa: PLC0415 - only on an NVIDIA machine
        import pycuda.tools as cuda_tools  # noqa: PLC0415

        self.cuda = cuda
        self._inflight: list[tuple[Any, tuple]] = []
        self.stream = cuda.Stream(flags=1)  # CU_STREAM_NON_BLOCKING: no implicit sync with the legacy stream
        self._host_pool = cuda_tools.PageLockedMemoryPool()
        self._device_pool = cuda_tools.DeviceMemoryPool()
        self.gather_mode, self._kernels = self._gather_kernels(gather)

    def _gather_kernels(self, mode: str):
        if mode == "memcpy":
            return "memcpy", None
        try:
            from pycuda.compiler import SourceModule  # noqa: PLC0415 - needs nvcc at first use

            nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else "nvcc")
            module = SourceModule(GATHER_SOURCE, nvcc=nvcc)
            kernels = {kind: module.get_function(f"gather_rows_{kind}").prepare("PPPqq") for kind in ("u32", "u8")}
            return "kernel", kernels
        except Exception as exc:  # noqa: BLE001 - nvcc missing or failing: fall back to copies
            if mode == "kernel":
                raise EdgeExitError(f"backend tensorrt: cannot compile the gather kernel ({exc}); use gather='memcpy'") from None
            return "memcpy", None

    # --- stream bookkeeping ----------------------------------------------------------------

    def _hold_until_done(self, *objects) -> None:
        """Keep host staging buffers alive until the work queued so far on the stream has run."""
        self._inflight = [(ev, objs) for ev, objs in self._inflight if not ev.query()]
        event = self.cuda.Event()
        event.record(self.stream)
        self._inflight.append((event, objects))

    def synchronize(self) -> None:
        self.stream.synchronize()
        self._inflight.clear()

    def recover(self) -> None:
        """After an error: drop what was in flight and wait for the stream."""
        self._inflight = []
        self.stream.synchronize()

    def new_buffer(self, rows: int, row_shape: tuple[int, ...], dtype: np.dtype) -> DeviceBuffer:
        buf = DeviceBuffer(None, rows, row_shape, dtype)
        nbytes = max(rows * buf.row_bytes, 1)
        buf.alloc = self.cuda.mem_alloc(nbytes)
        # once per buffer, queued on our stream (no device-wide wait mid-call): padding rows hold zeros
        memset = getattr(self.cuda, "memset_d8_async", None)
        if memset is not None:
            memset(buf.ptr, 0, nbytes, self.stream)
        else:  # an old pycuda: the memset runs on the legacy stream, which ours does not wait for
            self.cuda.memset_d8(buf.ptr, 0, nbytes)
            self.cuda.Context.synchronize()
        return buf

    def write(self, buffer: DeviceBuffer, array: np.ndarray) -> None:
        """Host rows -> the first len(array) rows of `buffer`, through a page-locked buffer."""
        host = self._host_pool.allocate(array.shape, array.dtype)
        host[...] = array
        self.cuda.memcpy_htod_async(buffer.ptr, host, self.stream)
        self._hold_until_done(host)

    def read(self, buffers: Sequence[tuple[DeviceBuffer, int]]) -> list[np.ndarray]:
        """The first `n` rows of each `(buffer, n)` on the host: every copy is queued through
        page-locked memory, then the stream is waited for once."""
        hosts = []
        for buffer, n in buffers:
            host = self._host_pool.allocate((n, *buffer.row_shape), buffer.dtype)
            if host.nbytes:
                self.cuda.memcpy_dtoh_async(host, buffer.ptr, self.stream)
            hosts.append(host)
        self.synchronize()
        return [np.array(host, copy=True) for host in hosts]

    def gather(self, dst: DeviceBuffer, src: DeviceBuffer, rows: np.ndarray) -> None:
        """dst[i] = src[rows[i]] on the device (`dst` is not `src`)."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        row_bytes = src.row_bytes
        if row_bytes == 0 or len(rows) == 0:
            return
        if self._kernels is not None:
            kind, units, blocks = gather_launch(len(rows), row_bytes)
            host = self._host_pool.allocate(rows.shape, np.int64)
            host[...] = rows
            index = self._device_pool.allocate(rows.nbytes)
            self.cuda.memcpy_htod_async(index, host, self.stream)
            self._kernels[kind].prepared_async_call(
                (blocks, 1), (_BLOCK, 1, 1), self.stream, dst.ptr, src.ptr, int(index), len(rows), units)
            self._hold_until_done(host, index)
        else:
            for first, at, count in contiguous_runs(rows):
                self.cuda.memcpy_dtod_async(dst.ptr + at * row_bytes, src.ptr + first * row_bytes,
                                            count * row_bytes, self.stream)

    def copy_rows(self, dst: DeviceBuffer, src: DeviceBuffer, n: int) -> None:
        """dst[:n] = src[:n]: one device-to-device copy."""
        if n * src.row_bytes:
            self.cuda.memcpy_dtod_async(dst.ptr, src.ptr, n * src.row_bytes, self.stream)

    def free(self, buffers) -> None:
        """Free `buffers` (after the stream has drained)."""
        self.stream.synchronize()
        for buf in buffers:
            buf.alloc.free()

    def close(self) -> None:
        """Wait for the stream and stop holding pooled memory."""
        try:
            self.stream.synchronize()
        finally:
            self._inflight = []
            self._device_pool.stop_holding()
            self._host_pool.stop_holding()
