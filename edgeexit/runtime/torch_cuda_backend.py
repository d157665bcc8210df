"""torch-CUDA backend: the torch Stage modules on static per-bucket CUDA tensors, replayed as
CUDA graphs (see `edgeexit.runtime.static` for the bucket and buffer scheme).

This is the GPU reference of the runtime design, and the way to measure it on an NVIDIA GPU
that has PyTorch but no TensorRT: activations stay on the device, exited samples are
compacted out with `index_select` into the smaller bucket's buffers, each (stage, bucket) is
captured once with `torch.cuda.graph` after a warm-up and replayed with `CUDAGraph.replay`.
Every graph shares one memory pool: they run one after another on one stream, and what
they leave behind is copied into the static buffers inside the graph, so no graph's
temporaries outlive it.

On a CPU device it runs the same buckets and buffers without graphs (how the tests check
the bookkeeping on machines without a GPU).
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from edgeexit.errors import EdgeExitError
from edgeexit.runtime.static import StaticBackend
from edgeexit.stage_io import StageIO


_CAPTURE = threading.Lock()  # torch allows one graph capture at a time per process


class TorchCudaBackend(StaticBackend):
    """Runs torch Stage modules on static per-bucket tensors of `device`; `graphs` (CUDA only)
    replays each (stage, bucket) as a CUDA graph after `warmup` plain runs."""

    name = "torch-cuda"

    def __init__(self, stages: Sequence[nn.Module], ios: Sequence[StageIO], device: str = "cuda",
                 max_batch: int = 64, graphs: bool = True, warmup: int = 2,
                 input_shape: Sequence[int] | None = None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EdgeExitError("backend torch-cuda: this torch has no CUDA device (a CPU build, or no GPU "
                                "visible); use --backend torch or onnxruntime")
        super().__init__(ios, max_batch, graphs and self.device.type == "cuda", warmup)
        self.stages = [s.to(self.device).eval() for s in stages]
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        self._pool = torch.cuda.graph_pool_handle() if self.graphs.enabled else None
        self._capture_stream = torch.cuda.Stream(self.device) if self.graphs.enabled else None
        self._device_scope: ExitStack | None = None
        self._input_shape = None if input_shape is None else tuple(int(d) for d in input_shape)

    def _input_rows(self, name: str) -> tuple[int, ...] | None:
        """The bundle's input shape (C, H, W) for the first stage's input, where given."""
        return self._input_shape if name == self.ios[0].inputs[0] else None

    def _new_buffer(self, rows: int, row_shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
        with torch.inference_mode():
            return torch.zeros((rows, *row_shape), dtype=_torch_dtype(dtype), device=self.device)

    def _row_spec(self, buffer: torch.Tensor) -> tuple[tuple[int, ...], np.dtype]:
        return tuple(buffer.shape[1:]), np.dtype(str(buffer.dtype).removeprefix("torch."))

    def _write(self, buffer: torch.Tensor, array: np.ndarray) -> None:
        source = torch.from_numpy(array)
        if self.device.type == "cuda":
            source = source.pin_memory()
        with torch.inference_mode():
            buffer[:len(array)].copy_(source, non_blocking=True)

    def _read(self, buffers: Sequence[tuple[torch.Tensor, int]]) -> list[np.ndarray]:
        """Copies (the buffers are overwritten by the next call), queued without waiting on a
        GPU (into page-locked memory), then one wait for the stream."""
        if self.device.type != "cuda":
            return [buf[:n].to("cpu", copy=True).numpy() for buf, n in buffers]
        hosts = [buf[:n].to("cpu", non_blocking=True) for buf, n in buffers]
        torch.cuda.current_stream(self.device).synchronize()
        return [h.numpy() for h in hosts]

    def _gather(self, dst: torch.Tensor, src: torch.Tensor, rows: np.ndarray) -> None:
        index = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
        if self.device.type == "cuda":
            index = index.pin_memory()  # a pinned source: the copy does not make the host wait
        index = index.to(self.device, non_blocking=True)
        with torch.inference_mode():
            torch.index_select(src, 0, index, out=dst[:len(rows)])

    def _copy_rows(self, dst: torch.Tensor, src: torch.Tensor, n: int) -> None:
        with torch.inference_mode():
            dst[:n].copy_(src[:n])

    def _execute(self, stage: int, bucket: int) -> None:
        io = self.ios[stage]
        with torch.inference_mode():
            outputs = self.stages[stage](*(self.buffers[(name, bucket)] for name in io.inputs))
            for name, value in zip(io.outputs, outputs):
                self.buffer(name, bucket, tuple(value.shape[1:]), self._row_spec(value)[1]).copy_(value)

    def _capture(self, key, fn: Callable[[], None]) -> Callable[[], None]:
        return capture_graph(fn, self.device, self._pool, self._capture_stream)

    def _enter(self) -> None:
        """Make this backend's GPU the current one for the call (cuda:1 works as cuda:0 does)."""
        if self.device.type == "cuda":
            self._device_scope = ExitStack()
            self._device_scope.enter_context(torch.cuda.device(self.device))

    def _exit(self) -> None:
        if self._device_scope is not None:
            scope, self._device_scope = self._device_scope, None
            scope.close()

    def _recover(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Drop every graph and buffer (the caching allocator keeps the memory for reuse)."""
        with self.lock:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.graphs.clear()
            self.buffers.clear()
            self._scratch.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def capture_graph(fn: Callable[[], None], device: torch.device, pool, stream: torch.cuda.Stream | None = None
                  ) -> Callable[[], None]:
    """Capture `fn` as a CUDA graph on `device` (in the memory pool `pool`, on `stream` or a new
    one; thread-local mode, one capture at a time in the process); returns its replay. A failed
    capture leaves the thread's current stream as it was (torch's context would leave it on the
    capture stream)."""
    graph = torch.cuda.CUDAGraph()
    previous = torch.cuda.current_stream(device)
    try:
        with _CAPTURE, torch.cuda.device(device), torch.cuda.graph(
                graph, pool=pool, stream=stream or torch.cuda.Stream(device), capture_error_mode="thread_local"):
            fn()
    finally:
        torch.cuda.set_stream(previous)
    return graph.replay


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype)).dtype
