"""Static per-bucket device buffers and replayable graphs: what the GPU backends share.

A GPU stage is cheapest when it runs at a fixed shape on memory that never moves: then its
launches can be captured once as a CUDA graph and replayed for a few microseconds. The
cascade, though, shrinks the batch at every exit. The GPU backends (torch-CUDA, TensorRT)
reconcile the two with *batch buckets*:

- a call of n samples runs every stage at the bucket B >= n (powers of two up to the
  engine's max batch); rows n..B-1 are padding that no one reads (a CNN in inference mode
  treats rows independently);
- every tensor name has one static buffer per bucket, ``(name, B)``, allocated the first
  time it is needed and kept until `close`. Stage k's carried outputs *are* stage k+1's
  inputs (they share names), so when nobody leaves, stage k+1 reads stage k's output
  buffer in place: no copy;
- when some samples leave, `take` gathers the kept rows into the same tensor's buffer at
  the smaller bucket, on the device; when the bucket does not shrink it gathers into a
  scratch buffer and copies back (the gather must not read what it writes);
- `(stage, bucket)` therefore always binds the same addresses, so after `warmup` plain runs
  it is captured as a graph and replayed from then on; a capture that fails leaves that key
  running plainly (the reason is kept in `graphs.failed`).

Handles are `Rows(name, bucket, n)`: the first n rows of one static buffer. The cascade
only ever downloads `conf`, `pred` and the logits of leaving samples. A subclass moves the
tensors: it allocates, writes, reads and gathers buffers, runs a stage on the buffers of
one bucket, and captures a graph.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from edgeexit.errors import EdgeExitError
from edgeexit.runtime.backend import Backend
from edgeexit.stage_io import StageIO


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes stages run at: powers of two below `max_batch`, then `max_batch`."""
    if max_batch < 1:
        raise EdgeExitError(f"export.batch.max: {max_batch} is below 1")
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return (*sizes, max_batch)


def bucket_for(n: int, sizes: Sequence[int]) -> int:
    """The smallest bucket that holds `n` rows."""
    for b in sizes:
        if n <= b:
            return b
    raise EdgeExitError(f"input: a batch of {n} is above the engines' max batch {sizes[-1]}; run in chunks of at most {sizes[-1]}")


@dataclass(frozen=True)
class Rows:
    """The first `n` rows of the static buffer of tensor `name` at bucket `bucket`."""

    name: str
    bucket: int
    n: int


class GraphCache:
    """Replays `(stage, bucket)` as a captured graph after `warmup` plain runs.

    `capture(key, fn)` records `fn` (which must not synchronise) and returns the replay
    callable, or raises when it cannot; that key then runs `fn` plainly from then on.
    """

    def __init__(self, capture: Callable[[Any, Callable[[], None]], Callable[[], None]], enabled: bool,
                 warmup: int = 2):
        self.capture, self.enabled, self.warmup = capture, enabled, warmup
        self.runs: dict[Any, int] = {}
        self.graphs: dict[Any, Callable[[], None]] = {}
        self.failed: dict[Any, str] = {}

    def __call__(self, key, fn: Callable[[], None]) -> None:
        replay = self.graphs.get(key)
        if replay is not None:
            replay()
            return
        fn()
        self.runs[key] = self.runs.get(key, 0) + 1  # plain runs per key (every key seen)
        if self.enabled and key not in self.failed and self.runs[key] >= self.warmup:
            try:
                self.graphs[key] = self.capture(key, fn)
            except Exception as exc:  # noqa: BLE001 - any capture failure: keep running plainly
                self.failed[key] = f"{type(exc).__name__}: {exc}".splitlines()[0]

    def clear(self) -> None:
        self.runs.clear()
        self.graphs.clear()


class StaticBackend(Backend):
    """A backend over static per-bucket buffers; subclasses implement the tensor moves.

    Calls are serialised by `lock` (the cascade holds it for a whole call through
    `scope()`); an exception inside a scope lets the subclass `_recover` (wait for the
    device, drop what was in flight) so that the next call starts clean.
    """

    def __init__(self, ios: Sequence[StageIO], max_batch: int, graphs: bool, warmup: int = 2):
        self.ios = list(ios)
        self.buckets = bucket_sizes(int(max_batch))
        self.buffers: dict[tuple[str, int], Any] = {}
        self._scratch: dict[tuple[str, int], Any] = {}
        self.graphs = GraphCache(self._capture, graphs, warmup)
        self.lock = threading.RLock()
        self._depth = 0  # scopes entered by the thread holding the lock
        self.broken: str | None = None  # why the device cannot recover (a sticky error), once it happened

    # --- what a subclass implements ---------------------------------------------------------

    @abstractmethod
    def _new_buffer(self, rows: int, row_shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """A fresh device buffer of `rows` rows (zeroed: padding rows must hold finite values)."""

    @abstractmethod
    def _row_spec(self, buffer: Any) -> tuple[tuple[int, ...], np.dtype]:
        """(row shape, dtype) of a buffer."""

    @abstractmethod
    def _write(self, buffer: Any, array: np.ndarray) -> None:
        """Host rows -> the first len(array) rows of `buffer` (queued on the backend's stream)."""

    @abstractmethod
    def _read(self, buffers: Sequence[tuple[Any, int]]) -> list[np.ndarray]:
        """The first `n` rows of each `(buffer, n)` as host arrays, waiting for the device once."""

    @abstractmethod
    def _gather(self, dst: Any, src: Any, rows: np.ndarray) -> None:
        """dst[i] = src[rows[i]] on the device; `dst` is never `src`."""

    def _copy_rows(self, dst: Any, src: Any, n: int) -> None:
        """dst[:n] = src[:n] on the device (a gather of 0..n-1 unless the subclass copies faster)."""
        self._gather(dst, src, np.arange(n))

    @abstractmethod
    def _execute(self, stage: int, bucket: int) -> None:
        """Run `stage` on the input buffers of `bucket`, writing its output buffers of `bucket`
        (allocating them the first time); must not synchronise (it may be captured)."""

    @abstractmethod
    def _capture(self, key: tuple[int, int], fn: Callable[[], None]) -> Callable[[], None]:
        """Capture `fn` as a graph; return its replay (raise if the device cannot)."""

    def _input_rows(self, name: str) -> tuple[int, ...] | None:
        """The row shape input `name` must have, where the backend knows it (engines do)."""
        return None

    def _input_dtype(self, name: str, array: np.ndarray) -> np.dtype:
        """The element type a host array fed as input `name` is converted to."""
        return np.dtype(np.float32) if array.dtype.kind == "f" else array.dtype

    def _recover(self) -> None:
        """After an error inside a call: wait for the device and drop in-flight state."""

    def _enter(self) -> None:
        """At the start of a call, under the lock (e.g. make a device context current)."""

    def _exit(self) -> None:
        """At the end of a call, under the lock."""

    # --- buffers ------------------------------------------------------------------------------

    def buffer(self, name: str, bucket: int, row_shape: tuple[int, ...], dtype) -> Any:
        """The static buffer of (name, bucket), allocated on first use; refuses a shape change."""
        key = (name, bucket)
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = self._new_buffer(bucket, tuple(row_shape), np.dtype(dtype))
        elif self._row_spec(buf) != (tuple(row_shape), np.dtype(dtype)):
            have = self._row_spec(buf)
            raise EdgeExitError(f"backend {self.name}: {name} is [N, {', '.join(map(str, have[0]))}] {have[1]}, "
                                f"got [N, {', '.join(map(str, row_shape))}] {np.dtype(dtype)}")
        return buf

    def _like(self, name: str, bucket: int, like: Any) -> Any:
        return self.buffer(name, bucket, *self._row_spec(like))

    # --- Backend --------------------------------------------------------------------------------

    @contextmanager
    def scope(self) -> Iterator[None]:
        """The lock, and (outermost scope of a thread only) `_enter` / `_exit` around the work,
        `_recover` after an error. Every public method runs in one, so a caller that drives
        the backend directly (the profiler) gets the same guarantees as the cascade."""
        with self.lock:
            if self.broken:
                raise EdgeExitError(f"backend {self.name}: the device is in an error state ({self.broken}) since an "
                                    "earlier call failed; close this backend and open a new one")
            outer = self._depth == 0
            self._depth += 1
            if outer:
                self._enter()
            try:
                yield
            except BaseException:
                if outer:
                    try:
                        self._recover()
                    except Exception as exc:  # noqa: BLE001 - a sticky device error: the first error is the news
                        self.broken = f"{type(exc).__name__}: {exc}".splitlines()[0]
                raise  # the original error, never the recovery's
            finally:
                self._depth -= 1
                if outer:
                    self._exit()

    def upload(self, array: np.ndarray) -> Rows:
        """Host batch -> the first stage's input buffer at its bucket."""
        with self.scope():
            return self._place(self.ios[0].inputs[0], np.asarray(array))

    def _place(self, name: str, array: np.ndarray) -> Rows:
        if array.ndim == 0 or len(array) == 0:
            raise EdgeExitError("input: empty batch")
        want = self._input_rows(name)
        if want is not None and tuple(array.shape[1:]) != tuple(want):
            raise EdgeExitError(f"backend {self.name}: input {name} takes [N, {', '.join(map(str, want))}], "
                                f"got {list(array.shape)}")
        array = np.ascontiguousarray(array, dtype=self._input_dtype(name, array))
        bucket = bucket_for(len(array), self.buckets)
        self._write(self.buffer(name, bucket, array.shape[1:], array.dtype), array)
        return Rows(name, bucket, len(array))

    def run(self, stage: int, feeds: dict[str, Any]) -> dict[str, Rows]:
        with self.scope():
            return self._run_stage(stage, feeds)

    def _run_stage(self, stage: int, feeds: dict[str, Any]) -> dict[str, Rows]:
        io = self.ios[stage]
        placed = []
        for name in io.inputs:
            if name not in feeds:
                raise EdgeExitError(f"backend {self.name}: stage {stage} needs input {name!r}")
            value = feeds[name]
            if not isinstance(value, Rows):  # a host array
                value = self._place(name, np.asarray(value))
            elif value.name != name:  # stage inputs are read in place: only the tensor of that name will do
                raise EdgeExitError(f"backend {self.name}: stage {stage} input {name!r} was fed {value.name!r}")
            placed.append(value)
        if len({(v.bucket, v.n) for v in placed}) != 1:
            raise EdgeExitError(f"backend {self.name}: stage {stage} inputs disagree on the batch size")
        bucket, n = placed[0].bucket, placed[0].n
        self.graphs((stage, bucket), lambda: self._execute(stage, bucket))
        return {name: Rows(name, bucket, n) for name in io.outputs}

    def take(self, value: Rows, rows: np.ndarray) -> Rows:
        """Rows `rows` of `value`, gathered on the device into the same tensor's buffer at the
        bucket that holds them (through a scratch buffer when that is the buffer itself)."""
        with self.scope():
            return self._take(value, rows)

    def _take(self, value: Rows, rows: np.ndarray) -> Rows:
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if len(rows) == 0:
            raise EdgeExitError(f"backend {self.name}: take of no rows")
        if rows.min() < 0 or rows.max() >= value.n:
            raise IndexError(f"take: rows outside 0..{value.n - 1}")
        src = self.buffers[(value.name, value.bucket)]
        bucket = bucket_for(len(rows), self.buckets)
        if bucket != value.bucket:
            self._gather(self._like(value.name, bucket, src), src, rows)
        else:
            key = (value.name, bucket)
            scratch = self._scratch.get(key)
            if scratch is None:
                scratch = self._scratch[key] = self._new_buffer(bucket, *self._row_spec(src))
            self._gather(scratch, src, rows)
            self._copy_rows(src, scratch, len(rows))
        return Rows(value.name, bucket, len(rows))

    def download(self, value: Rows) -> np.ndarray:
        return self.download_many([value])[0]

    def download_many(self, values: Sequence[Rows]) -> list[np.ndarray]:
        with self.scope():
            return self._read([(self.buffers[(v.name, v.bucket)], v.n) for v in values])
