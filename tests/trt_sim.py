"""A TensorRT simulator: ``fake_trt(version)``, ``fake_pycuda()`` and ``fake_cuda_driver()``.

Stand-ins for the TensorRT Python bindings of one version (only the names that version really
has; touching another raises AttributeError, as the binding would) and for pycuda and
cuda-python over a simulator of device memory, whose engines run the stage's ONNX graph on
onnxruntime. Used by tests/test_tensorrt.py in process, and as the `tensorrt` module of the
loopback devices in tests/test_deploy.py (``trt_site/``), so it needs neither pytest nor conftest.
"""

from __future__ import annotations

import base64
import bisect
import json
import types
import weakref
from pathlib import Path

import numpy as np

from host_kernels import host_gather

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits" / "model.yaml"
BUILDER_SRC = ROOT / "edgeexit" / "export" / "tensorrt.py"
BACKEND_SRC = ROOT / "edgeexit" / "runtime" / "tensorrt_backend.py"
DEVICE = "jetson-agx-orin-64gb"

VERSIONS = {"8.5": "8.5.2.2", "8.6": "8.6.2.3", "10.3": "10.3.0.26", "11.0": "11.0.0.114"}
TRT8 = frozenset({"8.5", "8.6"})

# --- which `trt.X` / `trt.X.Y` names each TensorRT version has --------------------------------
# Read from:
#   8.5  NVIDIA/TensorRT python/src/infer/pyCore.cpp at the 8.5 release (BuilderFlag without a
#        STRONGLY_TYPED network flag, PreviewFeature *_0805, ENABLE_TACTIC_HEURISTIC, no
#        builder_optimization_level) and python/src/parsers/pyOnnx.cpp of 8.x (ParserError:
#        code/desc/file/line/func/node only).
#   10.x NVIDIA/TensorRT python/src/infer/pyCore.cpp of 10.1x (NetworkDefinitionCreationFlag
#        EXPLICIT_BATCH [deprecated, ignored] + STRONGLY_TYPED, BuilderFlag FP16/INT8/GPU_FALLBACK,
#        MemoryPoolType.WORKSPACE, builder_optimization_level) and pyOnnx.cpp of 10.x
#        (ParserError node_name/node_operator).
#   11.x docs.nvidia.com/deeplearning/tensorrt/11.0.0 Python API (NetworkDefinitionCreationFlag:
#        STRONGLY_TYPED [deprecated, ignored], PREFER_AOT/JIT_PYTHON_PLUGINS; no EXPLICIT_BATCH)
#        and the 10.x->11.x Python migration reference (removed: BuilderFlag.FP16/INT8/BF16/FP8/
#        INT4/FP4/OBEY_/PREFER_PRECISION_CONSTRAINTS/DIRECT_IO, int8_calibrator, quantization
#        flags, platform_has_fast_fp16/int8). GPU_FALLBACK, DeviceType.DLA and WORKSPACE in 11:
#        C++ 11.4.1 IBuilderConfig member list (getDLACore, getDefaultDeviceType,
#        getMemoryPoolLimit) and the 11.3 "Strongly Typed Networks for DLA" page (lists the flags
#        not valid for DLA: FP16, INT8, OBEY/PREFER_PRECISION_CONSTRAINTS; GPU_FALLBACK stays) -
#        not read from 11.x binding source.
#   8.6  as 8.5 for every name used here, plus IBuilderConfig.builder_optimization_level (new in
#        8.6); JetPack 6.0 ships 8.6.2 with Python 3.10.
#   all  optimization profiles: ICudaEngine.num_optimization_profiles, IExecutionContext.
#        set_optimization_profile_async(profile_index, stream_handle) -> bool (8.x and 10.x
#        pyCore.cpp); the engine inspector (8.2+): ICudaEngine.create_engine_inspector(),
#        IEngineInspector.get_engine_information(LayerInformationFormat.JSON), IBuilderConfig.
#        profiling_verbosity = ProfilingVerbosity.DETAILED.
ALL = frozenset(VERSIONS)
TRT_NAMES: dict[str, frozenset] = {
    "__version__": ALL,
    "ILogger": ALL,
    "ILogger.WARNING": ALL,
    "ILogger.ERROR": ALL,
    "Builder": ALL,
    "OnnxParser": ALL,
    "Runtime": ALL,
    "NetworkDefinitionCreationFlag": ALL,
    "NetworkDefinitionCreationFlag.EXPLICIT_BATCH": frozenset({"8.5", "8.6", "10.3"}),
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED": frozenset({"10.3", "11.0"}),
    "BuilderFlag": ALL,
    "BuilderFlag.FP16": frozenset({"8.5", "8.6", "10.3"}),
    "BuilderFlag.INT8": frozenset({"8.5", "8.6", "10.3"}),
    "BuilderFlag.GPU_FALLBACK": ALL,
    "MemoryPoolType": ALL,
    "MemoryPoolType.WORKSPACE": ALL,
    "DeviceType": ALL,
    "DeviceType.GPU": ALL,
    "DeviceType.DLA": ALL,
    "TensorIOMode": ALL,
    "TensorIOMode.INPUT": ALL,
    "TensorIOMode.OUTPUT": ALL,
    "ProfilingVerbosity": ALL,
    "ProfilingVerbosity.DETAILED": ALL,
    "LayerInformationFormat": ALL,
    "LayerInformationFormat.JSON": ALL,
    # 10.1x pyCore.cpp: py::enum_<ExecutionContextAllocationStrategy> STATIC / ON_PROFILE_CHANGE /
    # USER_MANAGED (new in 10.0; not in 8.5's pyCore.cpp). 11.x: not read from binding source.
    "ExecutionContextAllocationStrategy": frozenset({"10.3", "11.0"}),
    "ExecutionContextAllocationStrategy.USER_MANAGED": frozenset({"10.3", "11.0"}),
}

# Methods/properties on TensorRT objects that edgeexit uses, per version (same sources).
OBJECT_NAMES = {
    "Builder": {v: {"create_network", "create_builder_config", "create_optimization_profile",
                    "build_serialized_network", "num_DLA_cores"} for v in VERSIONS},
    "Network": {v: {"num_inputs", "get_input"} for v in VERSIONS},
    "Parser": {v: {"parse_from_file", "num_errors", "get_error"} for v in VERSIONS},
    "ParserError": {"8.5": {"code", "desc", "file", "line", "func", "node"},
                    "8.6": {"code", "desc", "file", "line", "func", "node"},
                    "10.3": {"code", "desc", "file", "line", "func", "node", "node_name", "node_operator"},
                    "11.0": {"code", "desc", "file", "line", "func", "node", "node_name", "node_operator"}},
    "Config": {"8.5": {"set_memory_pool_limit", "set_flag", "default_device_type", "DLA_core",
                       "create_timing_cache", "set_timing_cache", "get_timing_cache",
                       "add_optimization_profile", "profiling_verbosity"},
               "8.6": {"set_memory_pool_limit", "set_flag", "default_device_type", "DLA_core",
                       "create_timing_cache", "set_timing_cache", "get_timing_cache",
                       "add_optimization_profile", "profiling_verbosity", "builder_optimization_level"},
               "10.3": {"set_memory_pool_limit", "set_flag", "default_device_type", "DLA_core",
                        "create_timing_cache", "set_timing_cache", "get_timing_cache",
                        "add_optimization_profile", "builder_optimization_level", "profiling_verbosity"},
               "11.0": {"set_memory_pool_limit", "set_flag", "default_device_type", "DLA_core",
                        "create_timing_cache", "set_timing_cache", "get_timing_cache",
                        "add_optimization_profile", "builder_optimization_level", "profiling_verbosity"}},
    "Profile": {v: {"set_shape"} for v in VERSIONS},
    "Cache": {v: {"serialize"} for v in VERSIONS},
    "Runtime": {v: {"deserialize_cuda_engine", "DLA_core"} for v in VERSIONS},
    "Inspector": {v: {"get_engine_information"} for v in VERSIONS},
    # The bindings API (8.x; removed in 10.0, per a 10.1x pyCore.cpp that has none of it) beside
    # the tensor-name API (8.5+): 8.5 pyCore.cpp, ICudaEngine num_bindings / get_binding_name /
    # binding_is_input / get_binding_dtype / get_profile_shape(profile_index, binding);
    # IExecutionContext set_binding_shape(binding, shape) -> bool / get_binding_shape(binding) /
    # execute_async_v2(bindings, stream_handle) -> bool.
    # Activation memory shared by contexts: 8.5 device_memory_size,
    # create_execution_context_without_device_memory(), context.device_memory (write-only);
    # 10.1x the same, deprecated, plus device_memory_size_v2, create_execution_context(strategy)
    # and context.set_device_memory(memory, size); 11.x assumed to keep only the 10.x successors.
    "Engine": {v: {"num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_dtype",
                   "get_tensor_profile_shape", "create_execution_context", "num_optimization_profiles",
                   "create_engine_inspector"}
               | ({"num_bindings", "get_binding_name", "binding_is_input", "get_binding_dtype",
                   "get_profile_shape"} if v in TRT8 else set())
               | {"8.5": {"device_memory_size", "create_execution_context_without_device_memory"},
                  "8.6": {"device_memory_size", "create_execution_context_without_device_memory"},
                  "10.3": {"device_memory_size", "device_memory_size_v2", "create_execution_context_without_device_memory"},
                  "11.0": {"device_memory_size_v2"}}[v] for v in VERSIONS},
    "Context": {v: {"set_input_shape", "get_tensor_shape", "set_tensor_address", "execute_async_v3",
                    "set_optimization_profile_async"}
               | ({"set_binding_shape", "get_binding_shape", "execute_async_v2"} if v in TRT8 else set())
               | {"8.5": {"device_memory"}, "8.6": {"device_memory"}, "10.3": {"device_memory", "set_device_memory"},
                  "11.0": {"set_device_memory"}}[v] for v in VERSIONS},
}


class _Strict:
    """Public attributes limited to `_allowed` (the names the emulated version has)."""

    _allowed: frozenset = frozenset()

    def __getattribute__(self, name):
        if not name.startswith("_") and name not in type(self)._allowed:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r} in this TensorRT")
        return object.__getattribute__(self, name)

    def __setattr__(self, name, value):
        if not name.startswith("_") and name not in type(self)._allowed:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r} in this TensorRT")
        object.__setattr__(self, name, value)


def _strict(base, kind, version):
    return type(f"{kind}_{version}", (base,), {"_allowed": frozenset(OBJECT_NAMES[kind][version])})


# --- the fake TensorRT builder -----------------------------------------------------------------


class _Tensor:
    def __init__(self, name, shape):
        self.name, self.shape = name, shape


class _Network(_Strict):
    def __init__(self, flags):
        self._flags, self._inputs = flags, []

    @property
    def num_inputs(self):
        return len(self._inputs)

    def get_input(self, i):
        return self._inputs[i]


class _ParserError(_Strict):
    def __init__(self, desc, node, node_name="", node_operator=""):
        self._desc, self._node, self._name, self._op = desc, node, node_name, node_operator

    def code(self):
        return 8

    def desc(self):
        return self._desc

    def file(self):
        return "ModelImporter.cpp"

    def line(self):
        return 1

    def func(self):
        return "parseGraph"

    def node(self):
        return self._node

    def node_name(self):
        return self._name

    def node_operator(self):
        return self._op


class _Parser(_Strict):
    def __init__(self, state, network, logger):
        self._state, self._network, self._errors = state, network, []

    def parse_from_file(self, path):
        import onnx

        self._state.parsed = path
        if self._state.parser_errors:
            self._errors = [self._state.ParserError(*e) for e in self._state.parser_errors]
            return False
        model = onnx.load(path, load_external_data=False)
        self._state.onnx_bytes = Path(path).read_bytes()
        for value in model.graph.input:
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
            self._network._inputs.append(_Tensor(value.name, tuple(dims)))
        return True

    @property
    def num_errors(self):
        return len(self._errors)

    def get_error(self, i):
        return self._errors[i]


class _Profile(_Strict):
    def __init__(self, state):
        self._state, self._shapes = state, {}

    def set_shape(self, name, lo, opt, hi):
        assert all(a <= o <= b for a, o, b in zip(lo, opt, hi)), (name, lo, opt, hi)
        self._shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class _Cache(_Strict):
    def __init__(self, blob):
        self._blob = bytes(blob)

    def serialize(self):
        return self._blob + b"+timed"


class _Config(_Strict):
    def __init__(self, state):
        self._state = state
        self._cache = None
        # Properties exist (with TensorRT's defaults) wherever the version has them.
        for name, default in (("default_device_type", 0), ("DLA_core", -1), ("builder_optimization_level", 3),
                              ("profiling_verbosity", "LAYER_NAMES_ONLY")):
            if name in type(self)._allowed:
                object.__setattr__(self, name, default)

    def set_memory_pool_limit(self, pool, size):
        self._state.pool_limits[pool] = size

    def set_flag(self, flag):
        self._state.flags.append(flag)

    def create_timing_cache(self, blob):
        self._state.cache_loaded = bytes(blob)
        if bytes(blob).startswith(b"foreign"):
            return None  # a cache TensorRT cannot read
        return self._state.Cache(blob)

    def set_timing_cache(self, cache, ignore_mismatch):
        self._cache = cache
        return True

    def get_timing_cache(self):
        return self._cache

    def add_optimization_profile(self, profile):
        self._state.profiles.append(dict(profile._shapes))
        return len(self._state.profiles) - 1


class _Builder(_Strict):
    def __init__(self, state, logger):
        self._state, self._logger = state, logger
        self._state.logger = logger

    @property
    def num_DLA_cores(self):
        return self._state.dla_cores

    def create_network(self, flags=0):
        self._state.network_flags = flags
        return self._state.Network(flags)

    def create_builder_config(self):
        self._state.profiles = []  # this build's profiles (the state outlives one build)
        self._state.config = self._state.Config(self._state)
        return self._state.config

    def create_optimization_profile(self):
        return self._state.Profile(self._state)

    def build_serialized_network(self, network, config):
        if self._state.fail_build:
            self._logger.log(self._state.module.ILogger.ERROR, "Error Code 2: out of memory\n(allocation failed)")
            return None
        # A fake plan the fake runtime below can execute: the ONNX itself, the profiles, and where
        # the layers landed. DLA has no dynamic shapes: with GPU_FALLBACK a DLA build over a
        # dynamic profile silently runs every layer on the GPU, as TensorRT does.
        import onnx

        state = self._state
        nodes = [(n.name, n.op_type) for n in onnx.load_from_string(state.onnx_bytes).graph.node]
        dla = config.default_device_type == state.module.DeviceType.DLA
        static = all(lo == hi for shapes in state.profiles for lo, _, hi in shapes.values())
        layers = [{"Name": name, "LayerType": "CaskConvolution" if op == "Conv" else op} for name, op in nodes]
        if dla and static and state.dla_takes:
            layers = ([{"Name": "{ForeignNode[%s...%s]}" % (nodes[0][0], nodes[-3][0]), "LayerType": "DLA"}]
                      + [{"Name": name, "LayerType": op} for name, op in nodes[-2:]])
        if config.profiling_verbosity != state.module.ProfilingVerbosity.DETAILED:
            layers = [layer["Name"] for layer in layers]
        plan = {"onnx": base64.b64encode(state.onnx_bytes).decode(), "profiles": state.profiles,
                "int64_as_int32": state.version_key in TRT8, "layers": layers}
        return json.dumps(plan).encode()


def fake_trt(version_key: str, *, dla_cores: int = 0):
    """A tensorrt module for one version; `module._state` records what the builder did."""
    names = {n for n, vs in TRT_NAMES.items() if version_key in vs}
    mod = types.ModuleType("tensorrt")
    state = types.SimpleNamespace(
        version_key=version_key, module=mod, dla_cores=dla_cores, parser_errors=[], fail_build=False,
        flags=[], pool_limits={}, profiles=[], dla_takes=True, network_flags=None, config=None,
        cache_loaded=None, parsed=None, onnx_bytes=b"", logger=None,
        Network=_strict(_Network, "Network", version_key),
        ParserError=_strict(_ParserError, "ParserError", version_key),
        Config=_strict(_Config, "Config", version_key),
        Profile=_strict(_Profile, "Profile", version_key),
        Cache=_strict(_Cache, "Cache", version_key))
    mod._state = state
    mod.__version__ = VERSIONS[version_key]

    class ILogger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = 0, 1, 2, 3, 4

        def __init__(self):
            pass

    mod.ILogger = ILogger

    def enum(name):
        members = {n.split(".", 1)[1]: i for i, n in enumerate(sorted(names)) if n.startswith(name + ".")}
        return type(name, (), members)

    for name in ("NetworkDefinitionCreationFlag", "BuilderFlag", "MemoryPoolType", "DeviceType", "TensorIOMode",
                 "ExecutionContextAllocationStrategy", "ProfilingVerbosity", "LayerInformationFormat"):
        if name in names:
            setattr(mod, name, enum(name))
    builder_cls = _strict(_Builder, "Builder", version_key)
    parser_cls = _strict(_Parser, "Parser", version_key)
    mod.Builder = lambda logger: builder_cls(state, logger)
    mod.OnnxParser = lambda network, logger: parser_cls(state, network, logger)
    mod.Runtime = lambda logger: _strict(_Runtime, "Runtime", version_key)(mod, logger)
    return mod


def flag_names(mod, enum_name, value_set):
    enum = getattr(mod, enum_name)
    return {n for n in dir(enum) if not n.startswith("_") and getattr(enum, n) in value_set}


def network_flag_names(mod):
    bits = mod._state.network_flags
    enum = mod.NetworkDefinitionCreationFlag
    return {n for n in dir(enum) if not n.startswith("_") and bits & (1 << getattr(enum, n))}


# --- the fake runtime (a simulator: engines run the ONNX on onnxruntime) ----------------------


class _DataType:
    def __init__(self, name):
        self.name = name


_ORT_TO_TRT = {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(int64)": "INT64",
               "tensor(int32)": "INT32", "tensor(int8)": "INT8", "tensor(bool)": "BOOL"}


class _Engine(_Strict):
    """A deserialized fake plan: the stage's ONNX on onnxruntime, with the plan's profiles.

    It enforces the rules code can break: a context's shapes must lie inside the profile it
    selected; before 10.0 only the first context gets profile 0 implicitly and a profile serves
    one live context at a time (``set_optimization_profile_async`` to another one that is in
    use fails, "Profile p has been chosen by another IExecutionContext"), and a context without
    a profile cannot enqueue; from 10.0 every context starts on profile 0 and may share it. On
    the 8.x bindings API, profile p's bindings are ``p * per_profile + i``.
    """

    def __init__(self, mod, plan):
        import onnxruntime as ort

        self._mod = mod
        self._session = ort.InferenceSession(base64.b64decode(plan["onnx"]), providers=["CPUExecutionProvider"])
        self._profiles = [{k: [tuple(s) for s in v] for k, v in p.items()} for p in plan["profiles"]]
        self._layers = plan["layers"]
        self._in = [i.name for i in self._session.get_inputs()]
        self._out = [o.name for o in self._session.get_outputs()]
        self._types, self._static = {}, {}
        for v in [*self._session.get_inputs(), *self._session.get_outputs()]:
            t = _ORT_TO_TRT[v.type]
            self._types[v.name] = "INT32" if (t == "INT64" and plan["int64_as_int32"]) else t
            self._static[v.name] = tuple(d if isinstance(d, int) else -1 for d in v.shape)
        self._live = weakref.WeakSet()  # contexts alive now (a context dies when the backend drops it)
        if not self._profiles:  # a static network: TensorRT's implicit profile 0 ("always at least 1")
            self._profiles = [{n: [self._static[n]] * 3 for n in self._in}]

    @property
    def _trt8(self):
        return self._mod._state.version_key in TRT8

    def _log_error(self, msg):
        logger = self._mod._state.logger
        if logger is not None:
            logger.log(self._mod.ILogger.ERROR, msg)

    @property
    def num_optimization_profiles(self):
        return len(self._profiles)

    @property
    def num_io_tensors(self):
        return len(self._in) + len(self._out)

    def get_tensor_name(self, i):
        return (self._in + self._out)[i]

    def get_tensor_mode(self, name):
        return self._mod.TensorIOMode.INPUT if name in self._in else self._mod.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return _DataType(self._types[name])

    def get_tensor_profile_shape(self, name, profile_index):
        return self._profiles[profile_index][name]

    def _context(self, own_memory):
        context = _strict(_Context, "Context", self._mod._state.version_key)(self, own_memory=own_memory)
        taken = {c._profile for c in self._live}
        context._profile = 0 if (not self._trt8 or 0 not in taken) else -1
        self._live.add(context)
        return context

    def create_execution_context(self, strategy=None):
        if strategy is not None:
            assert strategy == self._mod.ExecutionContextAllocationStrategy.USER_MANAGED
        return self._context(own_memory=strategy is None)

    def create_execution_context_without_device_memory(self):
        return self._context(own_memory=False)

    def create_engine_inspector(self):
        return _strict(_Inspector, "Inspector", self._mod._state.version_key)(self)

    def _need(self):
        return 4096 + 1024 * len(self._in)  # what the engine's activations need (any size will do here)

    @property
    def device_memory_size(self):
        return self._need()

    @property
    def device_memory_size_v2(self):
        return self._need()

    # the 8.x bindings API: (inputs + outputs) once per profile; profile p's copy of binding i is
    # p * per_profile + i, named "<name> [profile p]" for p > 0
    def _binding(self, i):
        per = self.num_io_tensors
        assert 0 <= i < per * len(self._profiles), f"binding {i} out of range"
        p, j = divmod(i, per)
        return p, self.get_tensor_name(j)

    @property
    def num_bindings(self):
        return self.num_io_tensors * len(self._profiles)

    def get_binding_name(self, i):
        p, name = self._binding(i)
        return name if p == 0 else f"{name} [profile {p}]"

    def binding_is_input(self, i):
        return self._binding(i)[1] in self._in

    def get_binding_dtype(self, i):
        return self.get_tensor_dtype(self._binding(i)[1])

    def get_profile_shape(self, profile_index, binding):
        p, name = self._binding(binding)
        assert p in (0, profile_index), "the binding belongs to another profile"  # both are documented
        return self.get_tensor_profile_shape(name, profile_index)


class _Inspector(_Strict):
    def __init__(self, engine):
        self._engine = engine

    def get_engine_information(self, fmt):
        assert fmt == self._engine._mod.LayerInformationFormat.JSON
        return json.dumps({"Layers": self._engine._layers, "Bindings": self._engine._in + self._engine._out})


class _Context(_Strict):
    def __init__(self, engine, own_memory=True):
        self._engine, self._shapes, self._addr = engine, {}, {}
        self._profile = 0
        self._memory = None if not own_memory else "own"
        SIM.contexts += 1
        SIM.own_memory_contexts += own_memory

    @property
    def device_memory(self):  # write-only in TensorRT
        raise AttributeError("device_memory is write-only")

    @device_memory.setter
    def device_memory(self, ptr):
        SIM.view(int(ptr), self._engine._need())  # inside an allocation
        self._memory = int(ptr)

    def set_device_memory(self, ptr, size):
        assert size >= self._engine._need()
        SIM.view(int(ptr), size)
        self._memory = int(ptr)

    def set_optimization_profile_async(self, profile_index, stream_handle):
        engine = self._engine
        if not 0 <= profile_index < len(engine._profiles):
            engine._log_error(f"Profile index {profile_index} is out of range")
            return False
        if engine._trt8 and any(c is not self and c._profile == profile_index for c in engine._live):
            engine._log_error(f"Profile {profile_index} has been chosen by another IExecutionContext. Use another "
                              "profileIndex or destroy the IExecutionContext that uses this profile.")
            return False
        SIM.pending += 1
        self._profile, self._shapes = profile_index, {}  # switching profiles drops the shapes set
        return True

    def set_input_shape(self, name, shape):
        if self._profile < 0:
            self._engine._log_error("setInputShape: no optimization profile selected (mOptimizationProfile >= 0)")
            return False
        lo, _, hi = self._engine._profiles[self._profile][name]
        shape = tuple(shape)
        ok = len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))
        if ok:
            self._shapes[name] = shape
        return ok

    def _input_shape(self, name):
        """The shape set for an input, or its static shape (which needs no setting), or None."""
        static = self._engine._static[name]
        return self._shapes.get(name, static if all(d >= 0 for d in static) else None)

    def get_tensor_shape(self, name):
        if name in self._engine._in:
            return self._input_shape(name)
        static = self._engine._static[name]
        if all(d >= 0 for d in static):
            return static
        batch = next(iter(self._shapes.values()))[0]
        return tuple(batch if d < 0 else d for d in static)

    def set_tensor_address(self, name, ptr):
        if name not in self._engine._in and name not in self._engine._out:
            return False
        self._addr[name] = int(ptr)
        return True

    def execute_async_v3(self, stream_handle):
        return self._enqueue(stream_handle, dict(self._addr))

    def _own_binding(self, binding):
        p, name = self._engine._binding(binding)
        return name if p == self._profile else None

    def set_binding_shape(self, binding, shape):
        name = self._own_binding(binding)
        if name is None:
            self._engine._log_error(f"binding {binding} does not belong to the context's profile {self._profile}")
            return False
        return self.set_input_shape(name, shape)

    def get_binding_shape(self, binding):
        name = self._own_binding(binding)
        assert name is not None, f"binding {binding} does not belong to the context's profile {self._profile}"
        return self.get_tensor_shape(name)

    def execute_async_v2(self, bindings, stream_handle):
        engine = self._engine
        assert len(bindings) == engine.num_bindings, "execute_async_v2 takes a pointer per binding of every profile"
        per = engine.num_io_tensors
        block = bindings[self._profile * per:(self._profile + 1) * per] if self._profile >= 0 else []
        return self._enqueue(stream_handle, {engine.get_tensor_name(i): int(p) for i, p in enumerate(block)})

    def _enqueue(self, stream_handle, addresses):
        """Run now, or, while the stream is being captured, record the run with the addresses
        and shapes of this moment (what a CUDA graph freezes)."""
        assert self._memory is not None, "enqueue on a context without activation memory"
        if self._profile < 0:
            self._engine._log_error("Parameter check failed, condition: mOptimizationProfile >= 0")
            return False
        if SIM.last_error:  # a CUDA error left set (e.g. by a failed capture) fails the next enqueue
            self._engine._log_error(f"CUDA error {SIM.last_error} before enqueue")
            return False
        if any(self._input_shape(n) is None for n in self._engine._in) or any(
                not addresses.get(n) for n in (*self._engine._in, *self._engine._out)):
            self._engine._log_error("enqueue: not every input shape and tensor address is set")
            return False
        if SIM.fail_enqueue and SIM.fail_enqueue.pop(0):
            return False
        shapes = {n: self._input_shape(n) for n in self._engine._in}
        work = lambda: self._compute(addresses, shapes)  # noqa: E731
        if SIM.capturing is not None:
            SIM.capturing.append(work)
        else:
            work()
            SIM.pending += 1
        SIM.executions += 1
        return True

    def _compute(self, addresses, shapes):
        feeds = {}
        for name in self._engine._in:
            dtype = np.dtype(_NUMPY[self._engine._types[name]])
            feeds[name] = SIM.read(addresses[name], shapes[name], dtype).copy()
        outs = self._engine._session.run(self._engine._out, feeds)
        for name, value in zip(self._engine._out, outs):
            dtype = np.dtype(_NUMPY[self._engine._types[name]])
            SIM.write(addresses[name], np.ascontiguousarray(value.astype(dtype)))


_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32, "INT8": np.int8,
          "BOOL": np.bool_}


class _Runtime(_Strict):
    def __init__(self, mod, logger):
        self._mod = mod

    def deserialize_cuda_engine(self, blob):
        return _strict(_Engine, "Engine", self._mod._state.version_key)(self._mod, json.loads(bytes(blob)))


class _Memory:
    """Device memory: integer pointers into numpy byte arrays; freed blocks are reused."""

    def __init__(self):
        self.blocks: dict[int, np.ndarray] = {}
        self.bases: list[int] = []  # sorted: addresses only grow
        self.free: dict[int, list[int]] = {}
        self.next = 1 << 20
        self.copies = 0
        self.launches = 0
        self.contexts = 0
        self.own_memory_contexts = 0
        self.syncs = 0
        self.to_host_bytes = 0
        self.allocations = 0
        self.executions = 0
        self.fail_enqueue: list[bool] = []  # the next enqueues fail where True (return False)
        self.capturing: list | None = None  # work recorded by the stream capture in progress
        self.graph_launches = 0
        self.gpu = ("Simulated GPU", (8, 7))
        self.capture_breaks = False  # the next capture is invalidated (an op a graph cannot hold)
        self.pending = 0  # work queued on the stream since it was last waited for
        self.last_error = 0  # the CUDA runtime's last error (cudaGetLastError clears it)
        self.sticky = None  # a sticky device error: every later wait raises it
        self.context_syncs = 0  # device-wide waits (pycuda.driver.Context.synchronize)

    def alloc(self, size):
        size = max(int(size), 1)
        if self.free.get(size):
            return self.free[size].pop()
        base = self.next
        self.next += (size + 255) // 256 * 256 + 256  # 256-byte aligned, with a gap
        self.blocks[base] = np.full(size, 0xAB, np.uint8)  # garbage, as cudaMalloc gives
        self.bases.append(base)
        return base

    def release(self, base):
        self.free.setdefault(self.blocks[base].size, []).append(base)

    def view(self, ptr, nbytes):
        bases = self.bases
        i = bisect.bisect_right(bases, ptr) - 1  # blocks are laid out in increasing address order
        if i >= 0:
            base = bases[i]
            mem = self.blocks[base]
            if ptr + nbytes <= base + mem.size:
                return mem[ptr - base: ptr - base + nbytes]
        raise AssertionError(f"simulated device: 0x{ptr:x}+{nbytes} is outside every allocation")

    def read(self, ptr, shape, dtype):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self.view(ptr, n).view(dtype).reshape(shape)

    def write(self, ptr, array):
        self.view(ptr, array.nbytes)[:] = np.frombuffer(array.tobytes(), np.uint8)


SIM = _Memory()


class _Block:
    def __init__(self, size, pooled):
        self.ptr = SIM.alloc(size)
        if pooled:
            weakref.finalize(self, SIM.release, self.ptr)

    def __int__(self):
        return self.ptr

    def free(self):
        pass


def fake_pycuda(compile_ok: bool):
    """pycuda.driver / tools / compiler over the simulated memory (synchronous stream)."""
    driver = types.ModuleType("pycuda.driver")
    driver.init = lambda: None

    class _PrimaryContext:
        def push(self):
            driver.pushed += 1

        def pop(self):
            assert driver.pushed > 0, "cannot pop non-current context"
            driver.pushed -= 1

    class Device:
        def __init__(self, i):
            self.i = i

        def name(self):  # pycuda.driver.Device.name()
            return SIM.gpu[0]

        def compute_capability(self):  # a (major, minor) tuple of ints
            return SIM.gpu[1]

        def retain_primary_context(self):
            return _PrimaryContext()

    class Stream:
        handle = 0x5EED

        def __init__(self, flags=0):  # pycuda.driver.Stream(flags=0)
            self.flags = flags

        def synchronize(self):
            SIM.syncs += 1
            if SIM.sticky:
                raise RuntimeError(f"cuStreamSynchronize failed: {SIM.sticky}")
            SIM.pending = 0

    class Event:
        def record(self, stream=None):
            pass

        def query(self):
            return True

    class Context:
        @staticmethod
        def pop():  # pycuda.driver.Context.pop() is static: it pops the current context
            assert driver.pushed > 0, "cannot pop non-current context"
            driver.pushed -= 1

        @staticmethod
        def synchronize():
            assert driver.pushed > 0, "no current context"
            SIM.context_syncs += 1
            SIM.pending = 0

    def outside_capture():
        assert SIM.capturing is None, "a copy was queued while the stream was being captured"
        assert driver.pushed > 0, "a CUDA call with no current context"

    def to_host(host, src, stream=None):
        outside_capture()
        SIM.pending += 1
        SIM.to_host_bytes += host.nbytes
        host[...] = SIM.read(int(src), host.shape, host.dtype)

    def to_device(dst, host, stream=None):
        outside_capture()
        SIM.pending += 1
        SIM.write(int(dst), np.ascontiguousarray(host))

    def dtod(dst, src, size, stream=None):
        outside_capture()
        SIM.pending += 1
        SIM.copies += 1
        SIM.view(int(dst), size)[:] = SIM.view(int(src), size)

    def memset_async(dst, value, count, stream=None):
        outside_capture()
        assert stream is not None, "a memset on the legacy stream, which ours does not wait for"
        SIM.pending += 1
        SIM.view(int(dst), count)[:] = value

    driver.pushed = 0
    driver.Device, driver.Stream, driver.Event, driver.Context = Device, Stream, Event, Context
    def mem_alloc(size):
        assert driver.pushed > 0, "a CUDA call with no current context"
        SIM.allocations += 1
        return _Block(size, pooled=False)

    driver.mem_alloc = mem_alloc
    driver.memcpy_htod_async, driver.memcpy_dtoh_async, driver.memcpy_dtod_async = to_device, to_host, dtod
    driver.memset_d8_async = memset_async  # pycuda.driver.memset_d8_async(dest, data, count, stream=None)

    tools = types.ModuleType("pycuda.tools")

    class DeviceMemoryPool:
        def allocate(self, size):
            return _Block(size, pooled=True)

        def stop_holding(self):
            pass

    class PageLockedMemoryPool:
        def allocate(self, shape, dtype, order="C"):
            return np.empty(shape, dtype, order=order)

        def stop_holding(self):
            pass

    tools.DeviceMemoryPool, tools.PageLockedMemoryPool = DeviceMemoryPool, PageLockedMemoryPool

    compiler = types.ModuleType("pycuda.compiler")

    class _Kernel:
        def __init__(self, kind):
            self.kind, self.unit = kind, {"u32": 4, "u8": 1}[kind]

        def prepare(self, arg_types):
            assert arg_types == "PPPqq"
            return self

        def prepared_async_call(self, grid, block, stream, dst, src, rows, n_rows, row_units):
            # The kernel's own source runs on the host (tests/host_kernels.py) over the simulated
            # memory, once the launch is checked to stay inside its buffers.
            outside_capture()
            SIM.launches += 1
            SIM.pending += 1
            assert isinstance(grid, tuple) and isinstance(block, tuple) and stream is not None
            idx = SIM.read(rows, (n_rows,), np.int64)
            row_bytes = row_units * self.unit
            assert idx.min() >= 0, "a negative row index"
            dst_view = SIM.view(dst, n_rows * row_bytes)
            src_view = SIM.view(src, (int(idx.max()) + 1) * row_bytes)
            rows_view = SIM.view(rows, n_rows * 8)
            host_gather().launch(self.kind, grid[0], block[0], dst_view.ctypes.data, src_view.ctypes.data,
                                 rows_view.ctypes.data, n_rows, row_units)

    class SourceModule:
        def __init__(self, source, nvcc="nvcc", **kwargs):
            if not compile_ok:
                raise OSError("nvcc was not found (is it on the PATH?)")
            assert "gather_rows_u32" in source and "gather_rows_u8" in source

        def get_function(self, name):
            return _Kernel(name.removeprefix("gather_rows_"))

    compiler.SourceModule = SourceModule
    package = types.ModuleType("pycuda")
    package.driver, package.tools, package.compiler = driver, tools, compiler
    return {"pycuda": package, "pycuda.driver": driver, "pycuda.tools": tools, "pycuda.compiler": compiler}


def fake_cuda_driver():
    """cuda-python's driver graph calls over the simulator: capture records the enqueued work."""
    drv = types.ModuleType("cuda.bindings.driver")

    class CUresult(int):
        @property
        def name(self):
            return {0: "CUDA_SUCCESS", 901: "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
                    401: "CUDA_ERROR_ILLEGAL_STATE"}[int(self)]

    ok, invalidated, illegal = CUresult(0), CUresult(901), CUresult(401)
    drv.CUstream = int
    drv.CUstreamCaptureMode = types.SimpleNamespace(CU_STREAM_CAPTURE_MODE_THREAD_LOCAL=1)
    drv.graphs_alive = 0

    def begin(stream, mode):
        assert SIM.capturing is None and mode == 1
        if SIM.pending:  # stricter than CUDA, as trtexec: warm-up work must be finished before capture begins
            return (illegal,)
        SIM.capturing = []
        return (ok,)

    def end(stream):
        work, SIM.capturing = SIM.capturing, None
        if SIM.capture_breaks:
            SIM.capture_breaks = False
            SIM.last_error = 901  # left set: the next enqueue fails unless someone clears it
            return (invalidated, None)
        drv.graphs_alive += 1
        return (ok, _Graph(work))

    def instantiate(graph, flags):
        return (ok, graph)

    def launch(instance, stream):
        assert SIM.capturing is None
        SIM.graph_launches += 1
        for work in instance.work:
            work()
        return (ok,)

    def destroy(graph):
        drv.graphs_alive -= 1
        return (ok,)

    drv.cuStreamBeginCapture, drv.cuStreamEndCapture = begin, end
    drv.cuGraphInstantiate, drv.cuGraphLaunch = instantiate, launch
    drv.cuGraphExecDestroy, drv.cuGraphDestroy = (lambda instance: (ok,)), destroy
    runtime = types.ModuleType("cuda.bindings.runtime")

    def get_last_error():  # cudaGetLastError(): returns the last error and resets it
        err, SIM.last_error = SIM.last_error, 0
        return (CUresult(err),)

    runtime.cudaGetLastError = get_last_error
    bindings = types.ModuleType("cuda.bindings")
    bindings.driver, bindings.runtime = drv, runtime
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings
    return {"cuda": cuda, "cuda.bindings": bindings, "cuda.bindings.driver": drv, "cuda.bindings.runtime": runtime}


class _Graph:
    def __init__(self, work):
        self.work = work

    def __int__(self):
        return id(self)
