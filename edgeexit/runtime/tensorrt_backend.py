"""TensorRT backend: one plan per stage, pycuda device memory, activations kept on the GPU.

What crosses the PCIe/shared-memory boundary per cascade step is what the cascade downloads:
`conf` and `pred` of the active samples and the logits of the samples that leave. Everything
else stays on the device:

- **outputs** of stage k are written into buffers owned by stage k, allocated once at the
  engine profile's max batch (`get_tensor_profile_shape`) and reused on every run. A handle
  returned by ``run(k, ...)`` stays valid until the next ``run(k, ...)``. Stage k+1 reads
  stage k's buffers directly when nobody left (input addresses are bound, not copied).
- **gathers** (``take``, the compaction of the samples that stay) write into fresh blocks from
  a pycuda ``DeviceMemoryPool``; a block goes back to the pool when its handle is dropped. No
  stage ever writes into a block it reads in the same run, and every copy, gather and
  execution is issued on one stream, so a reused block is only touched after the work that
  read it.
- **the gather itself** is one tiny CUDA kernel (compiled once with
  ``pycuda.compiler.SourceModule``) that copies whole rows: one launch whatever the pattern of
  leaving samples. Where nvcc is not available (a bare JetPack without the CUDA toolkit on
  PATH) it falls back to ``memcpy_dtod_async`` per run of consecutive rows, which costs one
  driver call per run (at worst one per kept row).

Uploads and downloads go through pinned staging buffers from a ``PageLockedMemoryPool``; a
staging buffer is held until the event recorded after its copy has completed.

The tensor-name API used here (``num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``,
``get_tensor_dtype``, ``get_tensor_profile_shape``, ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``) exists in TensorRT 8.5, 10.x and 11.x; see docs/tensorrt-versions.md.

tensorrt and pycuda are imported in the constructor, so this module imports anywhere and
`edgeexit.runtime.loader` can offer the backend; without them the constructor raises a
one-line EdgeExitError.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeexit.errors import EdgeExitError
from edgeexit.runtime.backend import Backend
from edgeexit.staging import StageIO

# TensorRT DataType member name -> numpy type (by name, not trt.nptype: 8.x's maps bool to np.bool,
# which numpy 1.24-1.26 does not have; 8.x also has no INT64, its ONNX parser casts int64 to int32).
_NUMPY = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
    "UINT8": np.uint8,
}

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


def numpy_dtype(trt_dtype) -> np.dtype:
    """The numpy dtype of a TensorRT DataType (by member name)."""
    name = getattr(trt_dtype, "name", None) or str(trt_dtype).rsplit(".", 1)[-1]
    if name not in _NUMPY:
        raise EdgeExitError(f"tensorrt: engine tensor type {name} has no numpy equivalent (use fp32/fp16/int I/O)")
    return np.dtype(_NUMPY[name])


class DeviceTensor:
    """A batch-first tensor in GPU memory: device pointer, shape, dtype.

    `owner` keeps the memory alive (a pool block or a stage's output buffer); the handle is
    what `run`, `take` and `download` pass around, and it is never copied implicitly.
    """

    __slots__ = ("ptr", "shape", "dtype", "owner")

    def __init__(self, ptr: int, shape: Sequence[int], dtype, owner: Any = None):
        self.ptr = int(ptr)
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.owner = owner

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"DeviceTensor(0x{self.ptr:x}, shape={self.shape}, dtype={self.dtype})"


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


def select_engines(bundle, device_name: str | None = None,
                   version: Sequence[int] | None = None) -> tuple[str, dict[str, Any]]:
    """The bundle's engine set for this TensorRT (and `device_name`, if given): (key, manifest entry)."""
    engines = bundle.manifest.get("engines") or {}
    if not engines:
        raise EdgeExitError(
            f"bundle: {bundle.path} has no TensorRT engines; build them on the device with "
            f"`edgeexit engines {bundle.path}`")
    if version is None:
        from edgeexit.export.tensorrt import trt_version

        version = trt_version()
    suffix = f"-trt{version[0]}.{version[1] if len(version) > 1 else 0}"
    have = ", ".join(sorted(engines))
    if device_name:
        key = f"{device_name}{suffix}"
        if key in engines:
            return key, engines[key]
        raise EdgeExitError(
            f"bundle: no engines {key!r} (have: {have}); plans run only on the device and TensorRT "
            f"version that built them; run `edgeexit engines {bundle.path}` here")
    matches = sorted(k for k in engines if k.endswith(suffix))
    if len(matches) == 1:
        return matches[0], engines[matches[0]]
    if not matches:
        raise EdgeExitError(
            f"bundle: no engines for TensorRT {suffix[4:]} (have: {have}); plans run only on the "
            f"TensorRT version that built them; run `edgeexit engines {bundle.path}` here")
    raise EdgeExitError(f"bundle: several engine sets for TensorRT {suffix[4:]} ({', '.join(matches)}); name the device")


def _imports():
    try:
        import tensorrt as trt  # noqa: PLC0415 - only on the device
    except (ImportError, OSError):
        raise EdgeExitError(
            "backend tensorrt: TensorRT is not installed here (import tensorrt failed); use the "
            "onnxruntime backend, or run on the Jetson") from None
    try:
        import pycuda.driver as cuda  # noqa: PLC0415
        import pycuda.tools as cuda_tools  # noqa: PLC0415
    except (ImportError, OSError):
        raise EdgeExitError(
            "backend tensorrt: pycuda is not installed (pip install 'edgeexit[tensorrt]' on the Jetson)") from None
    return trt, cuda, cuda_tools


@dataclass
class _Stage:
    """One deserialized plan with its context and its own output buffers."""

    engine: Any
    context: Any
    inputs: list[str]
    outputs: list[str]
    dtypes: dict[str, np.dtype]
    input_shapes: dict[str, tuple[int, ...]]  # at max batch
    min_batch: int
    max_batch: int
    out_buffers: dict[str, Any] = field(default_factory=dict)


class TensorRTBackend(Backend):
    """Runs per-stage TensorRT plans on one CUDA stream; tensors are `DeviceTensor` handles.

    Use from the thread that created it (the CUDA primary context is made current there);
    call `close()` (or use it as a context manager) to release the context.
    """

    name = "tensorrt"

    def __init__(self, plan_paths: Sequence[str | Path], ios: Sequence[StageIO], *, device: int = 0,
                 dla_core: int | None = None, gather: str = "auto", logger=None):
        if gather not in ("auto", "kernel", "memcpy"):
            raise EdgeExitError(f"backend tensorrt: gather must be auto, kernel or memcpy, not {gather!r}")
        trt, cuda, cuda_tools = _imports()
        from edgeexit.export.tensorrt import MIN_VERSION, make_logger, parse_version

        version = parse_version(trt.__version__)
        if version[:2] < MIN_VERSION:
            raise EdgeExitError(
                f"backend tensorrt: TensorRT {trt.__version__} predates the tensor-name API "
                f"(needs {MIN_VERSION[0]}.{MIN_VERSION[1]}+); use the onnxruntime backend")
        if len(plan_paths) != len(ios):
            raise EdgeExitError(f"backend tensorrt: {len(plan_paths)} plans for {len(ios)} stages")
        self.trt, self.cuda = trt, cuda
        self.ios = list(ios)
        self.stages: list[_Stage] = []
        self._inflight: list[tuple[Any, tuple]] = []
        self._ctx = None
        cuda.init()
        self.device_name = cuda.Device(device).name()  # GPU name, for profiles
        self._ctx = cuda.Device(device).retain_primary_context()  # the context TensorRT's runtime API uses
        self._ctx.push()
        try:
            self.stream = cuda.Stream()
            self._device_pool = cuda_tools.DeviceMemoryPool()
            self._host_pool = cuda_tools.PageLockedMemoryPool()
            self._logger = logger if logger is not None else make_logger(trt)
            self._runtime = trt.Runtime(self._logger)
            if dla_core is not None:
                self._runtime.DLA_core = int(dla_core)
            self.stages = [self._load(Path(p), io) for p, io in zip(plan_paths, self.ios)]
            self.gather_mode, self._kernels = self._gather_kernels(gather)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_bundle(cls, bundle, device_name: str | None = None, **kwargs) -> "TensorRTBackend":
        """The backend over the bundle's engines for this TensorRT (and device, if named)."""
        _, entry = select_engines(bundle, device_name)
        kwargs.setdefault("dla_core", entry.get("dla_core"))
        return cls([bundle.path / p for p in entry["stages"]], bundle.stage_ios, **kwargs)

    # --- setup ----------------------------------------------------------------------------

    def _load(self, path: Path, io: StageIO) -> _Stage:
        trt, cuda = self.trt, self.cuda
        if not path.is_file():
            raise EdgeExitError(f"backend tensorrt: plan {path} is missing")
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            why = (getattr(self._logger, "errors", None) or ["built by another TensorRT version or GPU?"])[-1]
            raise EdgeExitError(f"backend tensorrt: cannot load {path.name} ({why}); rebuild with `edgeexit engines`")
        context = engine.create_execution_context()
        if context is None:
            raise EdgeExitError(f"backend tensorrt: no execution context for {path.name} (out of GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(int(engine.num_io_tensors))]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        missing = [n for n in (*io.inputs, *io.outputs) if n not in names]
        if missing:
            raise EdgeExitError(f"backend tensorrt: {path.name} lacks tensors {', '.join(missing)} of stage {io.index}")
        dtypes = {n: numpy_dtype(engine.get_tensor_dtype(n)) for n in names}
        shapes, lo, hi = {}, [], []
        for name in inputs:
            pmin, _, pmax = (tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(name, 0))
            shapes[name] = pmax
            lo.append(pmin[0])
            hi.append(pmax[0])
            if not context.set_input_shape(name, pmax):
                raise EdgeExitError(f"backend tensorrt: {path.name} refuses its own max shape {pmax} for {name}")
        stage = _Stage(engine, context, inputs, outputs, dtypes, shapes, max(lo), min(hi))
        for name in outputs:  # size every output at the max batch, once
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EdgeExitError(f"backend tensorrt: output {name} of {path.name} has a data-dependent shape {shape}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtypes[name].itemsize
            stage.out_buffers[name] = cuda.mem_alloc(max(nbytes, 1))
        return stage

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

    # --- Backend ----------------------------------------------------------------------------

    def upload(self, array: np.ndarray) -> DeviceTensor:
        """Host -> device (a pool block). Floating arrays are converted to the first stage's input
        type, so an engine that takes fp16 gets fp16."""
        array = np.asarray(array)
        if self.stages and array.dtype.kind == "f":
            first = self.stages[0]
            want = first.dtypes[first.inputs[0]]
            if want.kind == "f" and want != array.dtype:
                array = array.astype(want)
        return self._upload(array)

    def _upload(self, array: np.ndarray) -> DeviceTensor:
        array = np.ascontiguousarray(array)
        if array.nbytes == 0:
            return DeviceTensor(0, array.shape, array.dtype)
        host = self._host_pool.allocate(array.shape, array.dtype)
        host[...] = array
        block = self._device_pool.allocate(array.nbytes)
        self.cuda.memcpy_htod_async(block, host, self.stream)
        self._hold_until_done(host)
        return DeviceTensor(int(block), array.shape, array.dtype, block)

    def run(self, stage: int, feeds: dict[str, Any]) -> dict[str, DeviceTensor]:
        st = self.stages[stage]
        context, batch, held = st.context, None, []
        for name in st.inputs:
            if name not in feeds:
                raise EdgeExitError(f"backend tensorrt: stage {stage} needs input {name!r}")
            value, want = feeds[name], st.dtypes[name]
            if not isinstance(value, DeviceTensor):  # a host array: copy it up in the engine's type
                value = self._upload(np.asarray(value, dtype=want))
            if value.dtype != want:
                raise EdgeExitError(f"backend tensorrt: stage {stage} input {name} is {value.dtype}, the engine takes {want}")
            if value.shape[1:] != st.input_shapes[name][1:]:
                raise EdgeExitError(
                    f"backend tensorrt: stage {stage} input {name} has shape {list(value.shape)}, the engine "
                    f"takes [N, {', '.join(map(str, st.input_shapes[name][1:]))}]")
            if batch is None:
                batch = value.shape[0]
            elif value.shape[0] != batch:
                raise EdgeExitError(f"backend tensorrt: stage {stage} inputs disagree on the batch size")
            if not st.min_batch <= batch <= st.max_batch:
                raise EdgeExitError(
                    f"backend tensorrt: stage {stage} takes batches of {st.min_batch}..{st.max_batch}, got "
                    f"{batch} (run in chunks of at most {st.max_batch})")
            if not context.set_input_shape(name, value.shape):
                raise EdgeExitError(f"backend tensorrt: stage {stage} refuses shape {list(value.shape)} for {name}")
            context.set_tensor_address(name, value.ptr)
            held.append(value)
        outputs = {}
        for name in st.outputs:
            buffer = st.out_buffers[name]
            context.set_tensor_address(name, int(buffer))
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            outputs[name] = DeviceTensor(int(buffer), shape, st.dtypes[name], buffer)
        if not context.execute_async_v3(self.stream.handle):
            raise EdgeExitError(f"backend tensorrt: stage {stage} failed to enqueue (see the TensorRT messages above)")
        return outputs

    def take(self, value: DeviceTensor, rows: np.ndarray) -> DeviceTensor:
        """Rows `rows` of `value`, gathered on the GPU into a fresh pool block."""
        rows = np.asarray(rows, dtype=np.int64).ravel()
        shape = (len(rows), *value.shape[1:])
        if len(rows) == 0 or value.row_bytes == 0:
            return DeviceTensor(0, shape, value.dtype)
        if rows.min() < 0 or rows.max() >= value.shape[0]:
            raise IndexError(f"take: rows outside 0..{value.shape[0] - 1}")
        row_bytes = value.row_bytes
        block = self._device_pool.allocate(len(rows) * row_bytes)
        if self._kernels is not None:
            kind, units, blocks = gather_launch(len(rows), row_bytes)
            host = self._host_pool.allocate(rows.shape, np.int64)
            host[...] = rows
            index = self._device_pool.allocate(rows.nbytes)
            self.cuda.memcpy_htod_async(index, host, self.stream)
            self._kernels[kind].prepared_async_call(
                (blocks, 1), (_BLOCK, 1, 1), self.stream,
                int(block), value.ptr, int(index), len(rows), units)
            self._hold_until_done(host, index)
        else:
            for src, dst, count in contiguous_runs(rows):
                self.cuda.memcpy_dtod_async(int(block) + dst * row_bytes, value.ptr + src * row_bytes,
                                            count * row_bytes, self.stream)
        return DeviceTensor(int(block), shape, value.dtype, block)

    def download(self, value: DeviceTensor) -> np.ndarray:
        """Device -> host; waits for everything queued on the stream before it."""
        if not isinstance(value, DeviceTensor):
            return np.asarray(value)
        if value.nbytes == 0:
            self.synchronize()
            return np.empty(value.shape, value.dtype)
        host = self._host_pool.allocate(value.shape, value.dtype)
        self.cuda.memcpy_dtoh_async(host, value.ptr, self.stream)
        self.synchronize()
        return np.array(host, copy=True)

    # --- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for the stream, free every buffer and release the CUDA context (idempotent)."""
        if self._ctx is None:
            return
        try:
            if getattr(self, "stream", None) is not None:
                self.stream.synchronize()
        finally:
            self._inflight = []
            for st in self.stages:
                for buffer in st.out_buffers.values():
                    buffer.free()
            self.stages = []
            for pool in (getattr(self, "_device_pool", None), getattr(self, "_host_pool", None)):
                if pool is not None:
                    pool.stop_holding()
            ctx, self._ctx = self._ctx, None
            ctx.pop()

    def __enter__(self) -> "TensorRTBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
