"""TensorRT backend: one plan per stage, pycuda device memory, activations kept on the GPU.

Per cascade call (see `edgeexit.runtime.static` for the bucket and buffer scheme, shared
with the torch-CUDA backend):

1. the input batch (n samples) is copied through a page-locked staging buffer into the
   static input buffer of bucket B >= n (powers of two up to the engines' max batch);
2. stage k runs on one execution context per (stage, bucket), whose input shapes and tensor
   addresses are set once, when the context is made: inputs are the static buffers of
   stage k's inputs at B, outputs the static buffers of its outputs at B. Its carried
   outputs are stage k+1's inputs (same names), so nothing is copied between stages;
3. after `warmup` plain runs the execution of (stage, bucket) is captured on the stream as a
   CUDA graph (cuda-python's driver API, `edgeexit.runtime.cuda_graphs`: pycuda has no graph
   API) and replayed with one launch from then on; a capture that fails leaves that key
   running plainly;
4. only ``conf`` and ``pred`` of the n live rows come back to the host (page-locked), the
   cascade decides, and the logits of the samples that leave are gathered on the GPU and
   copied back together at the end of the call;
5. the rows that stay are gathered on the GPU into the carried tensors' buffers at the
   bucket that holds them: one tiny CUDA kernel (``pycuda.compiler.SourceModule``, compiled
   once) per tensor, whatever the pattern; without nvcc, ``memcpy_dtod_async`` per run of
   consecutive rows. The cascade keeps the index map, so results return in input order.

Execution API, chosen by version (`api="auto"`): TensorRT 10.x/11.x use the tensor-name API
(``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``); TensorRT 8.x uses the
bindings API (``set_binding_shape``, ``execute_async_v2`` with a bindings list), which JetPack
5's 8.5 runs most widely (its ``execute_async_v3`` is new in 8.5 and reported buggy on some
8.x builds); ``api="tensors"`` forces the tensor-name API on 8.5. See
docs/tensorrt-versions.md.

Engines are refused, with one line saying to rebuild them here, when the bundle's engine
set was built by another TensorRT version, on another GPU or compute capability.

One CUDA context (the device's primary context) and one non-default stream per backend.
Calls are serialised by a lock held for a whole cascade call (`scope`); a thread other than
the creating one pushes the context for the call. An error inside a call synchronises the
stream and drops what was in flight, so the next call starts clean. `close()` frees every
device buffer and releases the context.

tensorrt and pycuda are imported in the constructor, so this module imports anywhere and
`edgeexit.runtime.loader` can offer the backend; without them the constructor raises a
one-line EdgeExitError.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgeexit.errors import EdgeExitError
from edgeexit.runtime.pycuda_memory import DeviceBuffer, PycudaMemory
from edgeexit.runtime.static import StaticBackend
from edgeexit.stage_io import StageIO

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


def numpy_dtype(trt_dtype) -> np.dtype:
    """The numpy dtype of a TensorRT DataType (by member name)."""
    name = getattr(trt_dtype, "name", None) or str(trt_dtype).rsplit(".", 1)[-1]
    if name not in _NUMPY:
        raise EdgeExitError(f"tensorrt: engine tensor type {name} has no numpy equivalent (use fp32/fp16/int I/O)")
    return np.dtype(_NUMPY[name])


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


def check_engines(key: str, entry: dict[str, Any], built_gpu: dict[str, str] | None, version: str,
                  gpu: dict[str, str] | None, bundle_path: Path) -> None:
    """Refuse an engine set built by another TensorRT release or on another GPU: a plan runs
    only where it was built. `built_gpu` is engine.json's `gpu`, `gpu` this device's."""
    from edgeexit.export.tensorrt import parse_version

    rebuild = f"rebuild them here with `edgeexit engines {bundle_path}`"
    built = entry.get("tensorrt")
    if built and parse_version(built)[:3] != parse_version(version)[:3]:
        raise EdgeExitError(f"bundle: engines {key!r} were built by TensorRT {built}, this is {version}; {rebuild}")
    if built_gpu and gpu:
        if built_gpu.get("compute_capability") != gpu.get("compute_capability"):
            raise EdgeExitError(
                f"bundle: engines {key!r} were built for SM {built_gpu.get('compute_capability')} "
                f"({built_gpu.get('name')}), this GPU is SM {gpu.get('compute_capability')} ({gpu.get('name')}); {rebuild}")
        if built_gpu.get("name") != gpu.get("name"):
            raise EdgeExitError(
                f"bundle: engines {key!r} were built on {built_gpu.get('name')}, this GPU is {gpu.get('name')} "
                f"(same SM {gpu.get('compute_capability')}, but tactics are chosen per GPU); {rebuild}")


def _imports():
    try:
        import tensorrt as trt  # noqa: PLC0415 - only on the device
    except (ImportError, OSError):
        raise EdgeExitError(
            "backend tensorrt: TensorRT is not installed here (import tensorrt failed); use the "
            "onnxruntime backend, or run on the Jetson") from None
    try:
        import pycuda.driver as cuda  # noqa: PLC0415
        import pycuda.tools  # noqa: F401, PLC0415
    except (ImportError, OSError):
        raise EdgeExitError(
            "backend tensorrt: pycuda is not installed (pip install 'edgeexit[tensorrt]' on the Jetson)") from None
    return trt, cuda


# --- the two execution APIs --------------------------------------------------------------------


class _TensorNames:
    """The tensor-name API: TensorRT 8.5+ (the only one in 10.x and 11.x). Names are the same in
    every optimization profile; the context's selected profile decides which shapes apply."""

    kind = "tensors"

    def __init__(self, trt, engine):
        self.engine = engine
        self.names = [engine.get_tensor_name(i) for i in range(int(engine.num_io_tensors))]
        self.inputs = [n for n in self.names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.num_profiles = int(engine.num_optimization_profiles)

    def dtype(self, name):
        return self.engine.get_tensor_dtype(name)

    def profile(self, name, p: int) -> list[tuple[int, ...]]:
        return [tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(name, p)]

    def set_shape(self, context, name, shape, p: int) -> bool:
        return bool(context.set_input_shape(name, tuple(shape)))

    def shape(self, context, name, p: int) -> tuple[int, ...]:
        return tuple(int(d) for d in context.get_tensor_shape(name))

    def bind(self, context, addresses: dict[str, int], p: int) -> None:
        for name, ptr in addresses.items():
            if not context.set_tensor_address(name, ptr):
                raise EdgeExitError(f"backend tensorrt: the engine refuses an address for tensor {name!r}")

    def execute(self, context, bound, stream_handle: int) -> bool:
        return bool(context.execute_async_v3(stream_handle))


class _Bindings:
    """The bindings API of TensorRT 8.x: binding indices, a pointer list, execute_async_v2.

    With several optimization profiles an 8.x engine has one block of bindings per profile
    (``num_bindings`` = per-profile count x profiles; profile p's copy of binding i is
    ``p * per_profile + i``, named "<name> [profile p]"), and a context on profile p reads
    only that block of the pointer list.
    """

    kind = "bindings"

    def __init__(self, trt, engine):
        self.engine = engine
        self.num_profiles = int(engine.num_optimization_profiles)
        self.per_profile = int(engine.num_bindings) // self.num_profiles
        self.names = [engine.get_binding_name(i) for i in range(self.per_profile)]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.inputs = [n for i, n in enumerate(self.names) if engine.binding_is_input(i)]

    def _at(self, name, p: int) -> int:
        return p * self.per_profile + self.index[name]

    def dtype(self, name):
        return self.engine.get_binding_dtype(self.index[name])

    def profile(self, name, p: int) -> list[tuple[int, ...]]:
        return [tuple(int(d) for d in s) for s in self.engine.get_profile_shape(p, self._at(name, p))]

    def set_shape(self, context, name, shape, p: int) -> bool:
        return bool(context.set_binding_shape(self._at(name, p), tuple(shape)))

    def shape(self, context, name, p: int) -> tuple[int, ...]:
        return tuple(int(d) for d in context.get_binding_shape(self._at(name, p)))

    def bind(self, context, addresses: dict[str, int], p: int) -> list[int]:
        bound = [0] * (self.per_profile * self.num_profiles)
        for name, ptr in addresses.items():
            bound[self._at(name, p)] = ptr
        return bound

    def execute(self, context, bound, stream_handle: int) -> bool:
        return bool(context.execute_async_v2(bound, stream_handle))


def choose_api(trt, version: Sequence[int], api: str) -> type:
    """The execution API for this TensorRT: bindings on 8.x unless `api` asks for tensors."""
    if api not in ("auto", "tensors", "bindings"):
        raise EdgeExitError(f"backend tensorrt: api must be auto, tensors or bindings, not {api!r}")
    if api == "auto":
        api = "bindings" if version[0] < 10 else "tensors"
    if api == "bindings" and version[0] >= 10:
        raise EdgeExitError(f"backend tensorrt: TensorRT {'.'.join(map(str, version))} has no bindings API (removed in 10.0)")
    return _Bindings if api == "bindings" else _TensorNames


# --- device memory -------------------------------------------------------------------------------


@dataclass
class _Stage:
    """One deserialized plan: its I/O, its optimization profiles and one execution context per
    bucket (on TensorRT < 10, where a profile serves one live context, buckets that share a
    range profile share its context, reshaped when the bucket changes)."""

    engine: Any
    api: Any
    inputs: list[str]
    outputs: list[str]
    dtypes: dict[str, np.dtype]
    row_shapes: dict[str, tuple[int, ...]]  # inputs: non-batch dims
    profiles: list[tuple[int, int]]  # per optimization profile: (min, max) batch
    contexts: dict[int, tuple[Any, Any]] = field(default_factory=dict)  # bucket -> (context, bound addresses)
    by_profile: dict[int, Any] = field(default_factory=dict)  # profile -> the live context selecting it

    def profile_for(self, bucket: int) -> int | None:
        """The profile that runs `bucket`: a static one of that batch first, else a range holding it."""
        static = [p for p, (lo, hi) in enumerate(self.profiles) if lo == hi == bucket]
        ranges = [p for p, (lo, hi) in enumerate(self.profiles) if lo <= bucket <= hi]
        return (static or ranges or [None])[0]

    def batches(self) -> set[int]:
        """Every batch size some profile covers."""
        return {b for lo, hi in self.profiles for b in range(lo, hi + 1)}


def engine_buckets(stages: Sequence[_Stage]) -> tuple[int, ...]:
    """The buckets every stage can run: each static profile's batch, and the powers of two
    (then the max) that every stage's profiles cover."""
    from edgeexit.runtime.static import bucket_sizes

    top = min(max(hi for _, hi in st.profiles) for st in stages)
    candidates = {lo for st in stages for lo, hi in st.profiles if lo == hi} | set(bucket_sizes(top))
    common = set.intersection(*(st.batches() for st in stages))
    buckets = tuple(sorted(b for b in candidates if b in common and b <= top))
    if not buckets:
        raise EdgeExitError("backend tensorrt: the stages' engines share no batch size; rebuild them with `edgeexit engines`")
    return buckets


class TensorRTBackend(StaticBackend):
    """Runs per-stage TensorRT plans on one CUDA stream over static per-bucket buffers.

    `graphs` replays each (stage, bucket) as a CUDA graph after `warmup` plain runs; `api`
    picks the execution API (auto: by version); `gather` the compaction (kernel, memcpy or
    auto). Use it as a context manager, or call `close()`.
    """

    name = "tensorrt"

    def __init__(self, plan_paths: Sequence[str | Path], ios: Sequence[StageIO], *, device: int = 0,
                 dla_core: int | None = None, dla_stages: Sequence[int] | None = None, gather: str = "auto",
                 api: str = "auto", graphs: bool = True, warmup: int = 2, logger=None,
                 check: Callable[[dict | None, str], None] | None = None,
                 read: Callable[[Path], bytes] = Path.read_bytes):
        trt, cuda = _imports()
        self._read_plan = read  # from a bundle: its checked read, so the plan loaded is the plan verified
        from edgeexit.export.tensorrt import MIN_VERSION, gpu_info, make_logger, parse_version

        version = parse_version(trt.__version__)
        if version[:2] < MIN_VERSION:
            raise EdgeExitError(
                f"backend tensorrt: TensorRT {trt.__version__} is older than {MIN_VERSION[0]}.{MIN_VERSION[1]}; "
                "use the onnxruntime backend")
        if len(plan_paths) != len(ios):
            raise EdgeExitError(f"backend tensorrt: {len(plan_paths)} plans for {len(ios)} stages")
        api_class = choose_api(trt, version, api)
        self.trt, self.cuda = trt, cuda
        # Before 10.0 an optimization profile serves one live context at a time (only the first
        # context gets profile 0 implicitly); from 10.0 contexts may share one.
        self._exclusive_profiles = version[0] < 10
        self._ctx = None
        self._graphs: list[Any] = []
        self.stages: list[_Stage] = []
        self.memory = None
        self._activations = None
        cuda.init()
        self.gpu = gpu_info(device)  # name and compute capability, for profiles and the engine check
        self.device_name = cuda.Device(device).name()
        if check is not None:
            check(self.gpu, str(trt.__version__))
        self._ctx = cuda.Device(device).retain_primary_context()  # the context TensorRT's runtime API uses
        self._ctx.push()  # current while setting up; afterwards only inside a scope, on whichever thread
        try:
            self.memory = PycudaMemory(gather)
            self.gather_mode = self.memory.gather_mode
            self._logger = logger if logger is not None else make_logger(trt)
            self._runtime = trt.Runtime(self._logger)
            if dla_core is not None:
                self._runtime.DLA_core = int(dla_core)
            self.stages = [self._load(Path(p), io, api_class) for p, io in zip(plan_paths, ios)]
            self.api = api_class.kind
            self._activations = self._shared_activation_memory()
            buckets = engine_buckets(self.stages)
            super().__init__(ios, buckets[-1], graphs, warmup)
            self.buckets = buckets
            for k in range(len(self.stages)):
                why = self._plain_reason(k, dla_core, dla_stages)
                if why:  # this stage never gets a graph: say so where failed captures are reported
                    self.graphs.failed.update({(k, b): why for b in buckets})
        except BaseException:
            cuda.Context.pop()
            self.close()
            raise
        cuda.Context.pop()

    @classmethod
    def from_bundle(cls, bundle, device_name: str | None = None, **kwargs) -> "TensorRTBackend":
        """The backend over the bundle's engines for this TensorRT (and device, if named);
        refuses engines built by another TensorRT release or on another GPU."""
        from edgeexit.export.tensorrt import trt_version

        key, entry = select_engines(bundle, device_name)
        meta_path = bundle.path / entry["metadata"] if entry.get("metadata") else None
        built_gpu = json.loads(meta_path.read_text()).get("gpu") if meta_path and meta_path.is_file() else None
        kwargs.setdefault("dla_core", entry.get("dla_core"))
        kwargs.setdefault("dla_stages", entry.get("dla_stages"))  # stages with layers on the DLA (older sets: all)
        kwargs.setdefault("check", lambda gpu, version: check_engines(key, entry, built_gpu, version, gpu, bundle.path))
        trt_version()  # TensorRT present (one line otherwise) before anything else
        kwargs.setdefault("read", bundle.read)  # the plan bytes deserialised are the ones checked against the seal
        return cls([bundle.path / p for p in entry["stages"]], bundle.stage_ios, **kwargs)

    # --- setup ----------------------------------------------------------------------------

    def _load(self, path: Path, io: StageIO, api_class) -> _Stage:
        if not path.is_file():
            raise EdgeExitError(f"backend tensorrt: plan {path} is missing")
        engine = self._runtime.deserialize_cuda_engine(self._read_plan(path))
        if engine is None:
            why = (getattr(self._logger, "errors", None) or ["built by another TensorRT version or GPU?"])[-1]
            raise EdgeExitError(f"backend tensorrt: cannot load {path.name} ({why}); rebuild with `edgeexit engines`")
        api = api_class(self.trt, engine)
        missing = [n for n in (*io.inputs, *io.outputs) if n not in api.names]
        if missing:
            raise EdgeExitError(f"backend tensorrt: {path.name} lacks tensors {', '.join(missing)} of stage {io.index}")
        dtypes = {n: numpy_dtype(api.dtype(n)) for n in api.names}
        rows, profiles = {}, []
        for p in range(api.num_profiles):
            lo, hi = [], []
            for name in api.inputs:
                pmin, _, pmax = api.profile(name, p)
                rows.setdefault(name, pmax[1:])
                lo.append(pmin[0])
                hi.append(pmax[0])
            profiles.append((max(lo), min(hi)))
        outputs = [n for n in api.names if n not in api.inputs]
        return _Stage(engine, api, list(api.inputs), outputs, dtypes, rows, profiles)

    def _plain_reason(self, k: int, dla_core: int | None, dla_stages: Sequence[int] | None) -> str | None:
        """Why stage k always runs without CUDA graphs, or None when it may be captured."""
        if dla_core is not None and (dla_stages is None or k in dla_stages):
            return "DLA stage: DLA work cannot be captured in a CUDA graph"
        st = self.stages[k]
        shared = {st.profile_for(b) for b in self.buckets}
        if self._exclusive_profiles and len(shared) < len(self.buckets):
            return ("TensorRT < 10 lets a profile serve one context, so buckets sharing a range profile "
                    "reshape one context and run without graphs (export.batch.profiles: buckets keeps them)")
        return None

    def _shared_activation_memory(self):
        """One device block for every context's activations (they run one at a time on one
        stream), instead of one per (stage, bucket) context; None where this TensorRT cannot
        create contexts without their own memory."""
        trt = self.trt
        if not (hasattr(trt, "ExecutionContextAllocationStrategy")
                or all(hasattr(st.engine, "create_execution_context_without_device_memory") for st in self.stages)):
            return None
        size = max(int(st.engine.device_memory_size_v2 if hasattr(st.engine, "device_memory_size_v2")
                       else st.engine.device_memory_size) for st in self.stages)
        return self.memory.new_buffer(1, (max(size, 1),), np.dtype(np.uint8)), size

    def _new_context(self, engine):
        """An execution context bound to the shared activation memory (or with its own)."""
        trt = self.trt
        if self._activations is None:
            return engine.create_execution_context()
        if hasattr(trt, "ExecutionContextAllocationStrategy"):  # 10.0+
            context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        else:  # 8.x
            context = engine.create_execution_context_without_device_memory()
        if context is None:
            return None
        block, size = self._activations
        if hasattr(context, "set_device_memory"):  # 10.1+
            context.set_device_memory(block.ptr, size)
        else:
            context.device_memory = block.ptr
        return context

    def _context(self, stage: int, bucket: int) -> tuple[Any, Any]:
        """The execution context of (stage, bucket), on the profile that runs that bucket: made,
        bound to its profile (`set_optimization_profile_async`, then the stream is waited for),
        and given its shapes and addresses once, here."""
        st = self.stages[stage]
        made = st.contexts.get(bucket)
        if made is not None:
            return made
        p = st.profile_for(bucket)
        context = st.by_profile.get(p) if self._exclusive_profiles else None
        if context is not None:  # TensorRT < 10: this profile's one context, reshaped for this bucket
            for b in [b for b, (c, _) in st.contexts.items() if c is context]:
                del st.contexts[b]
        else:
            context = self._new_context(st.engine)
            if context is None:
                raise EdgeExitError(f"backend tensorrt: no execution context for stage {stage} (out of GPU memory?)")
            if not context.set_optimization_profile_async(p, self.memory.stream.handle):
                raise EdgeExitError(f"backend tensorrt: stage {stage} cannot select optimization profile {p} for "
                                    f"batch {bucket} (see the TensorRT messages above)")
            self.memory.synchronize()
            st.by_profile[p] = context
        addresses = {}
        for name in st.inputs:
            if not st.api.set_shape(context, name, (bucket, *st.row_shapes[name]), p):
                raise EdgeExitError(f"backend tensorrt: stage {stage} refuses batch {bucket} for {name} "
                                    f"(optimization profile {p} covers {st.profiles[p][0]}..{st.profiles[p][1]})")
            addresses[name] = self.buffer(name, bucket, st.row_shapes[name], st.dtypes[name]).ptr
        for name in st.outputs:
            shape = st.api.shape(context, name, p)
            if any(d < 0 for d in shape):
                raise EdgeExitError(f"backend tensorrt: output {name} of stage {stage} has a data-dependent shape {shape}")
            addresses[name] = self.buffer(name, bucket, shape[1:], st.dtypes[name]).ptr
        made = st.contexts[bucket] = (context, st.api.bind(context, addresses, p))
        return made

    def _recover(self) -> None:
        self.memory.recover()

    def _enter(self) -> None:
        """Make the CUDA context current on this thread for the call (pushed, then popped in
        `_exit`: no thread keeps it, so any thread may call, and a thread may end, freely)."""
        self._ctx.push()

    def _exit(self) -> None:
        self.cuda.Context.pop()

    # --- StaticBackend primitives (tensor moves: PycudaMemory) -------------------------------

    def _engine_input(self, name: str) -> _Stage | None:
        return next((st for st in self.stages if name in st.inputs), None)

    def _input_rows(self, name: str) -> tuple[int, ...] | None:
        st = self._engine_input(name)
        return None if st is None else st.row_shapes[name]

    def _input_dtype(self, name: str, array: np.ndarray) -> np.dtype:
        """A float batch is converted to the engine's input type (fp16 engines take fp16)."""
        st = self._engine_input(name)
        want = None if st is None else st.dtypes[name]
        return want if want is not None and array.dtype.kind == want.kind == "f" else array.dtype

    def _new_buffer(self, rows: int, row_shape: tuple[int, ...], dtype: np.dtype) -> DeviceBuffer:
        return self.memory.new_buffer(rows, row_shape, dtype)

    def _row_spec(self, buffer: DeviceBuffer) -> tuple[tuple[int, ...], np.dtype]:
        return buffer.row_shape, buffer.dtype

    def _write(self, buffer: DeviceBuffer, array: np.ndarray) -> None:
        self.memory.write(buffer, array)

    def _read(self, buffers: Sequence[tuple[DeviceBuffer, int]]) -> list[np.ndarray]:
        return self.memory.read(buffers)

    def _gather(self, dst: DeviceBuffer, src: DeviceBuffer, rows: np.ndarray) -> None:
        self.memory.gather(dst, src, rows)

    def _copy_rows(self, dst: DeviceBuffer, src: DeviceBuffer, n: int) -> None:
        self.memory.copy_rows(dst, src, n)

    def _execute(self, stage: int, bucket: int) -> None:
        context, bound = self._context(stage, bucket)
        if not self.stages[stage].api.execute(context, bound, self.memory.stream.handle):
            raise EdgeExitError(f"backend tensorrt: stage {stage} failed to enqueue at batch {bucket} "
                                "(see the TensorRT messages above)")

    def _capture(self, key, fn: Callable[[], None]) -> Callable[[], None]:
        """Record `fn`'s execution on the stream as a CUDA graph (cuda-python's driver API);
        returns the replay. TensorRT refuses to enqueue what it cannot run under capture."""
        from edgeexit.runtime.cuda_graphs import capture

        self.memory.synchronize()  # as trtexec: nothing of the warm-up may still be pending when capture begins
        graph = capture(self.memory.stream.handle, fn)
        self._graphs.append(graph)
        return graph.launch

    # --- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for the stream, free every graph, buffer and context, release the CUDA context (idempotent)."""
        if self._ctx is None:
            return
        with getattr(self, "lock", None) or nullcontext():  # not under a call running on another thread
            # (no lock yet: the constructor failed before it, and nobody else can hold the backend)
            self._ctx.push()
            try:
                self._release()
            finally:
                self.cuda.Context.pop()
                self._ctx = None  # drops this backend's hold on the primary context

    def _release(self) -> None:
        try:
            for graph in self._graphs:
                graph.destroy()
            self._graphs = []
            if getattr(self, "graphs", None) is not None:
                self.graphs.clear()
            for st in self.stages:  # contexts go before the memory they use
                st.contexts.clear()
                st.by_profile.clear()
            if self.memory is not None:
                blocks = [*getattr(self, "buffers", {}).values(), *getattr(self, "_scratch", {}).values()]
                self.memory.free(blocks + ([self._activations[0]] if self._activations else []))
                self.memory.close()
        finally:
            getattr(self, "buffers", {}).clear()
            getattr(self, "_scratch", {}).clear()
            self._activations = None
            self.stages = []


class FusedTensorRT:
    """The fused cascade plan (`edgeexit.export.fused`, built by `edgeexit engines` beside the
    per-stage plans) at per-exit thresholds: one enqueue and one read-back per input, the exit
    decided inside the engine (`IIfConditional`). Every tensor is static (batch 1), so its
    buffers are bound once and the thresholds uploaded once. Same interface as `Cascade`;
    `stage_seconds` counts each input's whole call at the exit it took."""

    name = "tensorrt (fused cascade plan)"  # what `run` reports as its backend

    def __init__(self, plan_path: str | Path, input_name: str, thresholds: Sequence[float | None], stages: int, *,
                 device: int = 0, api: str = "auto", logger=None, read: Callable[[Path], bytes] = Path.read_bytes):
        from edgeexit.export.fused import OUTPUTS, THRESHOLDS
        from edgeexit.export.tensorrt import MIN_VERSION, make_logger, parse_version
        from edgeexit.runtime.cascade import gate_thresholds

        trt, cuda = _imports()
        version = parse_version(trt.__version__)
        if version[:2] < MIN_VERSION:
            raise EdgeExitError(f"backend tensorrt: TensorRT {trt.__version__} is older than "
                                f"{MIN_VERSION[0]}.{MIN_VERSION[1]}; use the onnxruntime backend")
        self.cuda, self.stages, self.input_name, self.outputs = cuda, stages, input_name, OUTPUTS
        self.buffers: dict[str, DeviceBuffer] = {}
        self.memory = None
        cuda.init()
        self._ctx = cuda.Device(device).retain_primary_context()
        self._ctx.push()
        try:
            self.memory = PycudaMemory("memcpy")  # nothing to gather: no kernel to compile
            self._logger = logger if logger is not None else make_logger(trt)
            engine = trt.Runtime(self._logger).deserialize_cuda_engine(read(Path(plan_path)))
            if engine is None:
                raise EdgeExitError(f"backend tensorrt: cannot load {Path(plan_path).name}; rebuild with `edgeexit engines`")
            self._api = choose_api(trt, version, api)(trt, engine)
            missing = [n for n in (input_name, THRESHOLDS, *OUTPUTS) if n not in self._api.names]
            if missing:
                raise EdgeExitError(f"backend tensorrt: {Path(plan_path).name} lacks tensors {', '.join(missing)}")
            self._context = engine.create_execution_context()
            for name in self._api.names:
                shape = self._api.shape(self._context, name, 0)
                self.buffers[name] = self.memory.new_buffer(shape[0], shape[1:], numpy_dtype(self._api.dtype(name)))
            self._bound = self._api.bind(self._context, {n: b.ptr for n, b in self.buffers.items()}, 0)
            gates = np.asarray(gate_thresholds(thresholds, stages)[:-1], np.float32)
            self.memory.write(self.buffers[THRESHOLDS], gates.astype(self.buffers[THRESHOLDS].dtype))
        except BaseException:
            cuda.Context.pop()
            self.close()
            raise
        cuda.Context.pop()

    def __call__(self, x: np.ndarray, collect: bool = False):
        """The cascade on a normalised batch `x`, one engine call per input."""
        from edgeexit.runtime.fused import one_call_per_input

        self._ctx.push()
        try:
            return one_call_per_input(x, collect, self.stages, self._one)
        finally:
            self.cuda.Context.pop()

    def _one(self, image: np.ndarray) -> list[np.ndarray]:
        """One input through the plan: upload, enqueue, read back its outputs (one wait)."""
        buffer = self.buffers[self.input_name]
        self.memory.write(buffer, image.astype(buffer.dtype, copy=False))
        if not self._api.execute(self._context, self._bound, self.memory.stream.handle):
            raise EdgeExitError("backend tensorrt: the fused cascade plan failed to enqueue "
                                "(see the TensorRT messages above)")
        return self.memory.read([(self.buffers[name], 1) for name in self.outputs])

    def run_batched(self, x: np.ndarray, batch: int, collect: bool = False):
        """As `Cascade.run_batched`: the fused plan takes one input per call whatever `batch` is."""
        return self(x, collect)

    def close(self) -> None:
        """Free the buffers and release the CUDA context (idempotent)."""
        if self._ctx is None:
            return
        self._ctx.push()
        try:
            self._context = None
            if self.memory is not None:
                self.memory.free(list(self.buffers.values()))
                self.memory.close()
                self.memory = None
            self.buffers.clear()
        finally:
            self.cuda.Context.pop()
            self._ctx = None

    def __enter__(self) -> "FusedTensorRT":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
