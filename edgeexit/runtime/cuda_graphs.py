"""CUDA graph capture on a raw stream through cuda-python's driver API.

pycuda has no graph API (no release has `Stream.begin_capture`), so the TensorRT backend
captures its stream with the CUDA driver calls themselves: ``cuStreamBeginCapture`` (thread-
local mode: other threads' CUDA calls are neither caught nor refused), ``cuStreamEndCapture``,
``cuGraphInstantiate`` and ``cuGraphLaunch``. cuda-python >= 12 is ``cuda.bindings.driver``;
older releases are ``cuda.cuda``. Without cuda-python, `capture` raises and the caller runs
plainly.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from edgeexit.errors import EdgeExitError


def driver():
    """cuda-python's driver module (new layout first), or EdgeExitError saying what to install."""
    for name in ("cuda.bindings.driver", "cuda.cuda"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise EdgeExitError("cuda graphs: cuda-python is not installed (pip install cuda-python); running without graphs")


def _check(drv, result, what: str) -> Any:
    """The value of a driver call's (CUresult, value...) tuple; EdgeExitError naming the call if it failed."""
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        name = getattr(err, "name", str(int(err)))
        raise EdgeExitError(f"cuda graphs: {what} failed ({name})")
    return result[1] if isinstance(result, tuple) and len(result) > 1 else None


class StreamGraph:
    """One captured and instantiated graph, replayed on the stream it was captured on."""

    def __init__(self, drv, graph, instance, stream):
        self._drv, self._graph, self._instance, self._stream = drv, graph, instance, stream

    def launch(self) -> None:
        _check(self._drv, self._drv.cuGraphLaunch(self._instance, self._stream), "cuGraphLaunch")

    def destroy(self) -> None:
        """Free the graph and its executable form (an in-flight launch finishes first)."""
        if self._instance is not None:
            self._drv.cuGraphExecDestroy(self._instance)
            self._drv.cuGraphDestroy(self._graph)
            self._instance = self._graph = None


def clear_last_error() -> None:
    """Reset the runtime's last CUDA error (``cudaGetLastError``), as trtexec does after a failed
    capture: left set, it would make the next plain enqueue fail too."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):  # cuda-python >= 12.6, then older
        try:
            importlib.import_module(name).cudaGetLastError()
            return
        except Exception:  # noqa: BLE001, S112 - not installed (or no runtime): nothing to clear through it
            continue


def capture(stream_handle: int, fn: Callable[[], None]) -> StreamGraph:
    """Record what `fn` queues on the stream `stream_handle` (it must not synchronise) as a graph;
    the caller waits for the stream first. On any failure the partial graph is dropped and the
    CUDA error cleared, so the stream can go on running plainly."""
    drv = driver()
    stream = drv.CUstream(int(stream_handle))
    mode = drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
    _check(drv, drv.cuStreamBeginCapture(stream, mode), "cuStreamBeginCapture")
    try:
        try:
            fn()
        except BaseException:
            ended = drv.cuStreamEndCapture(stream)  # leave the stream out of capture mode, drop the partial graph
            if isinstance(ended, tuple) and len(ended) > 1 and int(ended[0]) == 0 and ended[1] is not None and int(ended[1]):
                drv.cuGraphDestroy(ended[1])
            raise
        graph = _check(drv, drv.cuStreamEndCapture(stream), "cuStreamEndCapture")
        if graph is None or not int(graph):
            raise EdgeExitError("cuda graphs: the capture was invalidated (an operation not allowed in a graph)")
        instantiate = getattr(drv, "cuGraphInstantiateWithFlags", None) or drv.cuGraphInstantiate  # 11.x, then 12+
        try:
            instance = _check(drv, instantiate(graph, 0), "cuGraphInstantiate")
        except BaseException:
            drv.cuGraphDestroy(graph)
            raise
    except BaseException:
        clear_last_error()
        raise
    return StreamGraph(drv, graph, instance, stream)
