"""TensorRT engine builder and backend.

TensorRT and pycuda exist only on NVIDIA machines, so most of this file runs against small
stand-ins registered in ``sys.modules``:

- ``fake_trt(version)``: a TensorRT module that carries only the names that version really has
  (see TRT_NAMES / OBJECT_NAMES and where each was read) and records what the builder does with
  them; touching a name the version lacks raises AttributeError, as the real binding would.
- ``fake_pycuda()`` + the fake TensorRT runtime: a *simulator* of device memory (numpy bytes
  behind integer pointers) whose engines run the stage's ONNX graph on onnxruntime, so the
  backend's shape setting, address binding, output-buffer reuse and on-device gathers can be
  checked end to end against the onnxruntime backend. Its gather launches run the kernel's own
  CUDA source, compiled for the host (``host_kernels.py``). It checks the bookkeeping and the
  kernel's indexing, not CUDA.

Tests needing the real libraries use ``pytest.importorskip`` and skip here with a reason.
"""

from __future__ import annotations

import ast
import base64
import bisect
import hashlib
import json
import os
import sys
import types
import weakref
from pathlib import Path

import numpy as np
import pytest

from conftest import leftovers
from edgeexit.errors import EdgeExitError
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

    def get_tensor_shape(self, name):
        if name in self._engine._in:
            return self._shapes[name]
        batch = next(iter(self._shapes.values()))[0]
        return tuple(batch if d < 0 else d for d in self._engine._static[name])

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
        if set(self._shapes) != set(self._engine._in) or any(not addresses.get(n) for n in
                                                                 (*self._engine._in, *self._engine._out)):
            self._engine._log_error("enqueue: not every input shape and tensor address is set")
            return False
        if SIM.fail_enqueue and SIM.fail_enqueue.pop(0):
            return False
        shapes = dict(self._shapes)
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


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_bundle(tmp_path_factory):
    """The shipped example, built once with the CLI (~15 s)."""
    from edgeexit.cli import main

    out = tmp_path_factory.mktemp("trt") / "bundle"
    assert main(["build", str(EXAMPLE), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture()
def bundle(built_bundle, tmp_path):
    """A private copy of the built bundle (tests rewrite it)."""
    import shutil

    dest = tmp_path / "bundle"
    shutil.copytree(built_bundle, dest)
    return dest


# Real CUDA modules, where a GPU machine has them, are hidden from the simulated tests: the
# builder would otherwise record the real GPU in engine.json and the backend refuse the plans
# on the simulated one.
CUDA_MODULES = ("pycuda", "pycuda.driver", "pycuda.tools", "pycuda.compiler", "cuda", "cuda.bindings",
                "cuda.bindings.driver", "cuda.bindings.runtime", "cuda.cuda", "cuda.cudart")


@pytest.fixture()
def use_trt(monkeypatch):
    """Install fake_trt(version) as `tensorrt` (and no real CUDA modules); returns the module."""
    for name in CUDA_MODULES:
        monkeypatch.setitem(sys.modules, name, None)

    def install(version_key, **kwargs):
        mod = fake_trt(version_key, **kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", mod)
        return mod
    return install


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def stage0(bundle_path: Path) -> Path:
    return bundle_path / "stages" / "stage0.onnx"


def qdq_model(path: Path) -> Path:
    """A tiny explicitly quantized graph (Q/DQ around an identity) with a dynamic batch."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="quant"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dequant")]
    graph = helper.make_graph(
        nodes, "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", TensorProto.INT8, [], [0])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def build(onnx_path, tmp_path, **kwargs):
    from edgeexit.export.tensorrt import build_engine, graph_facts

    facts = graph_facts(onnx_path)
    args = dict(batch=(1, 16, 256), input_shapes=facts.input_shapes, precision="fp32", workspace_mb=512,
                timing_cache=tmp_path / "timing.cache")
    args.update(kwargs)
    return build_engine(onnx_path, tmp_path / "stage.plan", **args)


# --- without TensorRT ------------------------------------------------------------------------------


@pytest.mark.slow
def test_no_tensorrt_fails_in_one_line_and_leaves_the_bundle_untouched(bundle, monkeypatch):
    from edgeexit.bundle import load_bundle
    from edgeexit.export.tensorrt import NOT_INSTALLED, build_engines, trt_available

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    assert not trt_available()
    before = snapshot(bundle)
    parent_before = sorted(p.name for p in bundle.parent.iterdir())
    with pytest.raises(EdgeExitError) as err:
        build_engines(bundle, DEVICE, precision="fp16", dla_core=1)
    assert str(err.value).startswith(NOT_INSTALLED.split("\u2014")[0]) and "\n" not in str(err.value)
    # the exact command to run on the device
    assert str(err.value).endswith(
        f"on the Jetson run `edgeexit engines {bundle} --device {DEVICE} --precision fp16 --dla 1`")
    assert snapshot(bundle) == before
    assert sorted(p.name for p in bundle.parent.iterdir()) == parent_before  # no staging left over
    load_bundle(bundle)  # still verifies


def test_backend_module_imports_without_tensorrt_and_refuses_cleanly(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    import edgeexit.runtime.tensorrt_backend as tb

    with pytest.raises(EdgeExitError, match="TensorRT is not installed"):
        tb.TensorRTBackend([], [])


def test_versions_parse():
    from edgeexit.export.tensorrt import engine_key, parse_version

    assert parse_version("10.3.0.26") == (10, 3, 0, 26)
    assert parse_version("8.5.2.2") == (8, 5, 2, 2)
    assert parse_version("11.0.0b1") == (11, 0, 0)
    assert engine_key("jetson-orin-nx-16gb", (10, 3, 0)) == "jetson-orin-nx-16gb-trt10.3"


def test_graph_facts(bundle, tmp_path):
    from edgeexit.export.tensorrt import graph_facts

    facts = graph_facts(stage0(bundle))
    assert facts.precision == "fp32"
    assert facts.input_shapes == {"image": (1, 8, 8)}
    assert facts.node_names[0] and len(facts.node_names) == len(facts.node_ops)
    assert graph_facts(qdq_model(tmp_path / "q.onnx")).precision == "int8"


# --- version-dependent builder branches (fake TensorRT) ---------------------------------------------


def test_trt85_explicit_batch_no_optimization_level_no_strong_typing(bundle, tmp_path, use_trt):
    trt = use_trt("8.5")
    meta = build(stage0(bundle), tmp_path, optimization_level=3)
    st = trt._state
    assert network_flag_names(trt) == {"EXPLICIT_BATCH"}
    assert not hasattr(st.config, "builder_optimization_level")  # never touched: 8.5 has none
    assert meta["optimization_level"] is None and meta["strongly_typed"] is False
    assert st.flags == [] and meta["builder_flags"] == []
    assert st.pool_limits == {trt.MemoryPoolType.WORKSPACE: 512 << 20}
    # one static profile per bucket: batch 1 gets kernels tuned for batch 1
    assert st.profiles == [{"image": ((b, 1, 8, 8),) * 3} for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
    assert (tmp_path / "stage.plan").read_bytes().startswith(b"{")
    assert (tmp_path / "timing.cache").read_bytes() == b"+timed"
    assert meta["profiles"] == {"mode": "buckets", "batches": [[b, b, b] for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)],
                                "inputs": {"image": [1, 8, 8]}}
    assert meta["tensorrt"] == "8.5.2.2" and meta["placement"] is None

    trt = use_trt("8.5")  # one range profile, tuned for opt, where a user prefers one engine that fits all
    meta = build(stage0(bundle), tmp_path, batch=(2, 16, 100), profiles="range")
    assert trt._state.profiles == [{"image": ((2, 1, 8, 8), (16, 1, 8, 8), (100, 1, 8, 8))}]
    assert meta["profiles"]["batches"] == [[2, 16, 100]]
    use_trt("8.5")
    meta = build(stage0(bundle), tmp_path, batch=(3, 16, 100))
    assert meta["profiles"]["batches"] == [[b, b, b] for b in (4, 8, 16, 32, 64, 100)]


def test_trt85_weak_typing_flags_for_fp16_and_qdq_int8(bundle, tmp_path, use_trt):
    trt = use_trt("8.5")
    build(stage0(bundle), tmp_path, precision="fp16")
    assert flag_names(trt, "BuilderFlag", trt._state.flags) == {"FP16"}
    assert network_flag_names(trt) == {"EXPLICIT_BATCH"}

    trt = use_trt("8.5")
    meta = build(qdq_model(tmp_path / "q.onnx"), tmp_path, precision="int8", batch=(1, 8, 64))
    # 8.x: Q/DQ needs INT8, and FP16 lets the layers left unquantized run fp16 rather than fp32
    assert flag_names(trt, "BuilderFlag", trt._state.flags) == {"INT8", "FP16"}
    assert meta["graph_precision"] == "int8" and meta["strongly_typed"] is False


def test_trt10_strongly_typed_for_graph_precision_and_optimization_level(bundle, tmp_path, use_trt):
    trt = use_trt("10.3")
    meta = build(qdq_model(tmp_path / "q.onnx"), tmp_path, precision="int8", optimization_level=4)
    assert network_flag_names(trt) == {"STRONGLY_TYPED"}  # no EXPLICIT_BATCH: ignored since 10.0
    assert trt._state.flags == []  # precision comes from the Q/DQ nodes, no INT8 flag
    assert trt._state.config.builder_optimization_level == 4 and meta["optimization_level"] == 4

    trt = use_trt("10.3")
    meta = build(stage0(bundle), tmp_path)  # fp32 graph at fp32: weakly typed, no flags
    assert network_flag_names(trt) == set() and trt._state.flags == [] and not meta["strongly_typed"]

    trt = use_trt("10.3")
    build(stage0(bundle), tmp_path, precision="fp16")  # fp16 from an fp32 graph: the FP16 flag
    assert network_flag_names(trt) == set() and flag_names(trt, "BuilderFlag", trt._state.flags) == {"FP16"}


def test_trt11_always_strongly_typed_and_never_touches_removed_flags(bundle, tmp_path, use_trt):
    trt = use_trt("11.0")
    assert not hasattr(trt.BuilderFlag, "FP16") and not hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    meta = build(qdq_model(tmp_path / "q.onnx"), tmp_path, precision="int8")
    assert network_flag_names(trt) == {"STRONGLY_TYPED"} and trt._state.flags == []
    assert meta["strongly_typed"] is True

    trt = use_trt("11.0")
    meta = build(stage0(bundle), tmp_path)
    assert meta["strongly_typed"] is True and trt._state.flags == []

    use_trt("11.0")
    with pytest.raises(EdgeExitError, match="strongly typed") as err:
        build(stage0(bundle), tmp_path, precision="fp16")
    assert "export.precision: fp16" in str(err.value) and "\n" not in str(err.value)


def test_int8_without_qdq_is_refused(bundle, tmp_path, use_trt):
    use_trt("10.3")
    with pytest.raises(EdgeExitError, match="explicit Q/DQ"):
        build(stage0(bundle), tmp_path, precision="int8")
    use_trt("8.5")
    with pytest.raises(EdgeExitError, match="Q/DQ"):
        build(qdq_model(tmp_path / "q.onnx"), tmp_path, precision="fp16")


def test_parser_errors_name_the_nodes(bundle, tmp_path, use_trt):
    from edgeexit.export.tensorrt import graph_facts

    trt = use_trt("10.3")
    trt._state.parser_errors = [("Unsupported operator FancyOp\nno importer", 3, "/block/fancy", "FancyOp")]
    with pytest.raises(EdgeExitError) as err:
        build(stage0(bundle), tmp_path)
    text = str(err.value)
    assert "cannot parse stage0.onnx" in text and "node '/block/fancy' (FancyOp)" in text and "\n" not in text

    trt = use_trt("8.5")  # 8.5: only a node index; the name comes from the graph itself
    trt._state.parser_errors = [("Assertion failed: axis", 1), ("graph error", -1)]
    with pytest.raises(EdgeExitError) as err:
        build(stage0(bundle), tmp_path)
    facts = graph_facts(stage0(bundle))
    assert f"node {facts.node_names[1]!r} ({facts.node_ops[1]}): Assertion failed: axis" in str(err.value)
    assert "graph: graph error" in str(err.value)
    assert not (tmp_path / "stage.plan").exists()


def test_failed_build_is_one_line_and_writes_nothing(bundle, tmp_path, use_trt):
    trt = use_trt("10.3")
    trt._state.fail_build = True
    with pytest.raises(EdgeExitError) as err:
        build(stage0(bundle), tmp_path)
    assert "out of memory" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "stage.plan").exists() and not (tmp_path / "timing.cache").exists()


def test_dla_settings(bundle, tmp_path, use_trt):
    trt = use_trt("10.3", dla_cores=2)
    build(stage0(bundle), tmp_path, precision="fp16", dla_core=1)
    cfg = trt._state.config
    assert cfg.default_device_type == trt.DeviceType.DLA and cfg.DLA_core == 1
    assert flag_names(trt, "BuilderFlag", trt._state.flags) == {"FP16", "GPU_FALLBACK"}
    use_trt("10.3", dla_cores=2)
    with pytest.raises(EdgeExitError, match="fp16 or int8"):
        build(stage0(bundle), tmp_path, precision="fp32", dla_core=0)
    use_trt("10.3", dla_cores=0)
    with pytest.raises(EdgeExitError, match="0 DLA core"):
        build(stage0(bundle), tmp_path, precision="fp16", dla_core=0)


def test_dla_builds_are_static_and_report_where_layers_landed(bundle, tmp_path, use_trt):
    trt = use_trt("8.6", dla_cores=2)
    meta = build(stage0(bundle), tmp_path, precision="fp16", dla_core=0, batch=(1, 8, 32))
    assert all(lo == hi for shapes in trt._state.profiles for lo, _, hi in shapes.values())  # DLA: static only
    assert trt._state.config.profiling_verbosity == trt.ProfilingVerbosity.DETAILED
    assert meta["placement"]["dla"] == 1 and meta["placement"]["gpu"] == 2
    assert meta["placement"]["dla_layers"][0].startswith("{ForeignNode[")
    use_trt("8.6", dla_cores=2)
    with pytest.raises(EdgeExitError, match="DLA has no dynamic shapes.*profiles: buckets"):
        build(stage0(bundle), tmp_path, precision="fp16", dla_core=0, profiles="range")


def test_a_dla_set_where_nothing_lands_on_the_dla_is_refused(bundle, use_trt):
    from edgeexit.bundle import load_bundle
    from edgeexit.export.tensorrt import build_engines

    before = snapshot(bundle)
    trt = use_trt("10.3", dla_cores=2)
    trt._state.dla_takes = False  # every layer falls back to the GPU
    with pytest.raises(EdgeExitError) as err:
        build_engines(bundle, DEVICE, precision="fp16", dla_core=0, progress=False)
    text = str(err.value)
    assert "nothing landed on DLA core 0" in text and "stage 0 (" in text and "stage 2 (" in text and "\n" not in text
    assert snapshot(bundle) == before and leftovers(bundle.parent) == []

    trt = use_trt("10.3", dla_cores=2)
    build_engines(bundle, DEVICE, precision="fp16", dla_core=0, progress=False)
    entry = load_bundle(bundle).manifest["engines"][f"{DEVICE}-trt10.3"]
    meta = json.loads((bundle / entry["metadata"]).read_text())
    assert [m["placement"]["dla"] for m in meta["stages"]] == [1, 1, 1] and entry["dla_stages"] == [0, 1, 2]


def test_engines_checks_its_choices_before_it_needs_tensorrt(bundle, monkeypatch):
    from edgeexit.export.tensorrt import build_engines

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    cases = [(dict(device_name="jetson-orn-nano-8gb"), "unknown device"),
             (dict(device_name="jetson-nano"), "TensorRT 8.2, older than 8.5; run this bundle on onnxruntime"),
             (dict(device_name="jetson-orin-nano-8gb", dla_core=0), "0 DLA core"),
             (dict(device_name=DEVICE, precision="int4"), "unknown precision"),
             (dict(device_name=DEVICE, precision="fp32", dla_core=0), "DLA of jetson-agx-orin-64gb runs fp16, int8")]
    for kwargs, message in cases:
        with pytest.raises(EdgeExitError, match=message):
            build_engines(bundle, progress=False, **kwargs)
    with pytest.raises(EdgeExitError, match="not installed here"):  # valid choices: only then TensorRT is missed
        build_engines(bundle, "jetson-orin-nano-8gb", precision="fp16", progress=False)


def test_a_foreign_timing_cache_is_replaced_not_a_crash(bundle, tmp_path, use_trt):
    trt = use_trt("10.3")
    (tmp_path / "timing.cache").write_bytes(b"foreign bytes")  # create_timing_cache returns None for it
    build(stage0(bundle), tmp_path)
    assert trt._state.cache_loaded == b"" and (tmp_path / "timing.cache").read_bytes() == b"+timed"


def test_tensorrt_older_than_85_is_refused(bundle, tmp_path, use_trt):
    trt = use_trt("8.5")
    trt.__version__ = "8.2.1.8"
    with pytest.raises(EdgeExitError, match="older than 8.5"):
        build(stage0(bundle), tmp_path)


# --- build_engines on a real bundle (fake TensorRT) -------------------------------------------------


def test_build_engines_adds_engines_and_reseals_the_bundle(bundle, use_trt, capsys):
    from edgeexit.bundle import load_bundle
    from edgeexit.export.tensorrt import build_engines

    before = snapshot(bundle)
    trt = use_trt("10.3")
    out = build_engines(bundle, DEVICE, optimization_level=3)
    key = f"{DEVICE}-trt10.3"
    assert out == bundle / "engines" / key
    loaded = load_bundle(bundle)  # every checksum, the new files included
    entry = loaded.manifest["engines"][key]
    assert entry["stages"] == [f"engines/{key}/stage{k}.plan" for k in range(3)]
    assert entry["tensorrt"] == "10.3.0.26" and entry["metadata"] == f"engines/{key}/engine.json"
    for rel in [*entry["stages"], entry["metadata"], f"engines/{key}/timing.cache"]:
        assert rel in loaded.manifest["files"] and (bundle / rel).is_file()
    meta = json.loads((bundle / entry["metadata"]).read_text())
    assert [m["stage"] for m in meta["stages"]] == [0, 1, 2] and meta["workspace_mb"] == 4096
    assert meta["stages"][1]["profiles"]["inputs"]["s0_carry0"] == [32, 8, 8]
    assert meta["stages"][1]["profiles"]["batches"][0] == [1, 1, 1] and meta["batch"]["profiles"] == "buckets"
    assert trt._state.pool_limits == {trt.MemoryPoolType.WORKSPACE: 4096 << 20}  # from the device profile
    after = snapshot(bundle)
    assert {k: v for k, v in after.items() if k in before and k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}  # nothing else changed
    assert leftovers(bundle.parent) == []  # no staging left
    err = capsys.readouterr().err
    assert "stage 3/3" in err

    use_trt("10.3")  # rebuilding replaces the set and reuses its timing cache
    build_engines(bundle, DEVICE, progress=False)
    assert sorted(load_bundle(bundle).manifest["engines"]) == [key]
    assert sys.modules["tensorrt"]._state.cache_loaded.startswith(b"+timed")


def _board(root: Path, model: str, release: str) -> Path:
    (root / "proc/device-tree").mkdir(parents=True, exist_ok=True)
    (root / "etc").mkdir(exist_ok=True)
    (root / "proc/device-tree/model").write_text(model + "\0")
    (root / "etc/nv_tegra_release").write_text(f"# R{release} (release), REVISION: 4.3, GCID: 1, BOARD: generic\n")
    return root


def test_the_engine_cache_reuses_a_plan_only_for_the_same_module_l4t_tensorrt_graph_and_settings(
        bundle, tmp_path, use_trt, monkeypatch, capsys):
    import shutil

    from edgeexit.bundle import load_bundle
    from edgeexit.export.tensorrt import build_engines

    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEEXIT_BOARD_ROOT", str(_board(tmp_path / "orin", "NVIDIA Jetson AGX Orin", "36")))
    builds = []

    def counted(version):
        trt = use_trt(version)
        real = trt.Builder

        def builder(logger):
            b = real(logger)
            original = b.build_serialized_network
            b.build_serialized_network = lambda *a: (builds.append(1), original(*a))[1]
            return b
        trt.Builder = builder
        return trt

    counted("10.3")
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    build_engines(bundle, DEVICE, cache=cache, progress=False)
    assert len(builds) == 3 and len(list(cache.iterdir())) == 3
    key = f"{DEVICE}-trt10.3"
    first = {rel: load_bundle(bundle).manifest["files"][rel] for rel in load_bundle(bundle).manifest["engines"][key]["stages"]}

    counted("10.3")  # another bundle with the same graphs: nothing is built
    build_engines(copy, DEVICE, cache=cache)
    assert len(builds) == 3
    assert "(0 built, 3 from the cache)" in capsys.readouterr().err
    reused = load_bundle(copy).manifest
    assert {rel: reused["files"][rel] for rel in reused["engines"][key]["stages"]} == first
    meta = json.loads((copy / reused["engines"][key]["metadata"]).read_text())
    assert all(m["from_cache"] for m in meta["stages"]) and [m["stage"] for m in meta["stages"]] == [0, 1, 2]

    counted("10.3")  # a different precision, optimization level or module each misses
    build_engines(copy, DEVICE, cache=cache, progress=False, optimization_level=2)
    assert len(builds) == 6
    monkeypatch.setenv("EDGEEXIT_BOARD_ROOT", str(_board(tmp_path / "nx", "NVIDIA Jetson Orin NX", "36")))
    counted("10.3")
    build_engines(copy, DEVICE, cache=cache, progress=False)
    assert len(builds) == 9
    counted("8.6")  # another TensorRT
    build_engines(copy, DEVICE, cache=cache, progress=False)
    assert len(builds) == 12

    damaged = [e for e in cache.iterdir() if (f := json.loads((e / "entry.json").read_text())["fields"])["tensorrt"]
               == "10.3.0.26" and f["module"] == "NVIDIA Jetson Orin NX" and f["optimization_level"] is None]
    assert len(damaged) == 3
    (damaged[1] / "stage.plan").write_bytes(b"garbage")  # a damaged plan is not trusted: that stage is rebuilt
    counted("10.3")
    build_engines(copy, DEVICE, cache=cache, progress=False)
    assert len(builds) == 13 and not [p for p in cache.iterdir() if p.name.startswith(".")]
    assert load_bundle(copy).manifest["engines"][key]


def test_build_engines_failure_leaves_the_bundle_as_it_was(bundle, use_trt):
    from edgeexit.bundle import load_bundle
    from edgeexit.export.tensorrt import build_engines

    before = snapshot(bundle)
    trt = use_trt("10.3")
    trt._state.fail_build = True
    with pytest.raises(EdgeExitError, match="building stage0.onnx"):
        build_engines(bundle, DEVICE, progress=False)
    assert snapshot(bundle) == before
    assert leftovers(bundle.parent) == []
    load_bundle(bundle)


def test_build_engines_checks_the_device(bundle, use_trt):
    from edgeexit.export.tensorrt import build_engines

    use_trt("10.3")
    with pytest.raises(EdgeExitError, match="has no TensorRT"):
        build_engines(bundle, "host-cpu", progress=False)
    with pytest.raises(EdgeExitError, match="DLA core"):
        build_engines(bundle, "jetson-orin-nano-8gb", dla_core=0, progress=False)
    with pytest.raises(EdgeExitError, match="unknown device"):
        build_engines(bundle, "no-such-device", progress=False)


# --- the backend on the simulator ---------------------------------------------------------------


def test_contiguous_runs_and_launch_shape():
    from edgeexit.runtime.pycuda_memory import contiguous_runs, gather_launch

    assert contiguous_runs([0, 1, 2, 5, 6, 9]) == [(0, 0, 3), (5, 3, 2), (9, 5, 1)]
    assert contiguous_runs([4, 2, 3]) == [(4, 0, 1), (2, 1, 2)]
    assert contiguous_runs([]) == []
    assert gather_launch(10, 32 * 8 * 8 * 4) == ("u32", 2048, 80)
    assert gather_launch(3, 3) == ("u8", 3, 1)
    assert gather_launch(10**6, 4096)[2] == 65535  # grid-stride loop covers the rest


@pytest.mark.parametrize("row_shape, dtype", [((32, 8, 8), np.float32), ((10,), np.float16), ((3,), np.uint8),
                                              ((5,), np.int64)])
@pytest.mark.parametrize("grid", ["launch", 1, 3])
def test_gather_kernel_source_gathers_like_numpy(row_shape, dtype, grid):
    """The kernel's own code, run on the host: dst[i] = src[rows[i]] for any rows, row size and
    grid (a grid smaller than the work exercises the grid-stride loop); nothing past n rows of
    dst is written."""
    from edgeexit.runtime.pycuda_memory import _BLOCK, gather_launch

    kernel = host_gather()
    if kernel is None:
        pytest.skip("no C++ compiler here to run the gather kernel's source on the host")
    rng = np.random.default_rng(7)
    src = rng.integers(0, 250, size=(64, *row_shape)).astype(dtype)
    for rows in (np.array([3, 0, 63, 17, 17, 40]), np.arange(10, 42), rng.permutation(64)[:37], np.array([5])):
        rows = rows.astype(np.int64)
        dst = np.full((len(rows) + 2, *row_shape), 7, dtype)  # two guard rows after the n written
        kind, units, blocks = gather_launch(len(rows), src[0].nbytes)
        kernel.launch(kind, blocks if grid == "launch" else grid, _BLOCK, dst.ctypes.data, src.ctypes.data,
                      rows.ctypes.data, len(rows), units)
        np.testing.assert_array_equal(dst[:len(rows)], src[rows])
        assert (dst[len(rows):] == 7).all()


def test_select_engines(bundle):
    from edgeexit.bundle import Bundle
    from edgeexit.runtime.tensorrt_backend import select_engines

    manifest = {"engines": {f"{DEVICE}-trt10.3": {"stages": []}, "jetson-orin-nx-16gb-trt8.5": {"stages": []}}}
    b = Bundle(bundle, manifest)
    assert select_engines(b, version=(10, 3, 0))[0] == f"{DEVICE}-trt10.3"
    assert select_engines(b, "jetson-orin-nx-16gb", version=(8, 5))[0] == "jetson-orin-nx-16gb-trt8.5"
    with pytest.raises(EdgeExitError, match="no engines for TensorRT 11.0"):
        select_engines(b, version=(11, 0))
    with pytest.raises(EdgeExitError, match="edgeexit engines"):
        select_engines(Bundle(bundle, {}), version=(10, 3))


def digits_batch(bundle_path):
    from edgeexit.bundle import load_bundle
    from edgeexit.data import normalize

    try:
        from sklearn.datasets import load_digits

        images = load_digits().images.astype(np.float32)[:, None][:300]
    except ImportError:
        images = np.random.default_rng(0).uniform(0, 16, (300, 1, 8, 8)).astype(np.float32)
    b = load_bundle(bundle_path)
    return b, normalize(images, b.input["mean"], b.input["std"])


def gpu_sim(monkeypatch, compile_ok=True, cuda_python=True):
    """Install the simulated pycuda (and cuda-python's driver, for graphs); reset the counters."""
    if compile_ok and host_gather() is None:
        pytest.skip("no C++ compiler here to run the gather kernel's source on the host")
    modules = {name: None for name in CUDA_MODULES}
    modules.update(fake_pycuda(compile_ok))
    if cuda_python:
        modules.update(fake_cuda_driver())
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    SIM.copies = SIM.launches = SIM.contexts = SIM.executions = SIM.graph_launches = SIM.own_memory_contexts = 0
    SIM.syncs = SIM.to_host_bytes = SIM.allocations = 0
    SIM.fail_enqueue = []
    SIM.capturing, SIM.capture_breaks, SIM.gpu = None, False, ("Simulated GPU", (8, 7))
    SIM.pending = SIM.last_error = SIM.context_syncs = 0
    SIM.sticky = None
    return modules


def reference_cascade(b, x):
    """The onnxruntime cascade with thresholds at the median confidence (about half leave per exit)."""
    from edgeexit.runtime.cascade import Cascade, trace
    from edgeexit.runtime.onnxruntime_backend import OnnxRuntimeBackend

    reference = OnnxRuntimeBackend(b.stage_paths, b.stage_ios)
    traced = trace(reference, b.stage_ios, x, 64)
    thresholds = [float(np.median(traced.exit_conf[:, 0])), float(np.median(traced.exit_conf[:, 1])), None]
    return thresholds, Cascade(reference, b.stage_ios, thresholds).run_batched(x, 64, collect=True)


def assert_same(got, want):
    np.testing.assert_array_equal(got.exit, want.exit)
    np.testing.assert_array_equal(got.pred, want.pred)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.conf, want.conf, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got.stage_samples, want.stage_samples)


@pytest.fixture()
def engines_bundle(bundle, use_trt):
    """The example bundle with engines built by the fake TensorRT 10.3 (the plans embed the ONNX)."""
    from edgeexit.export.tensorrt import build_engines

    use_trt("10.3")
    build_engines(bundle, DEVICE, progress=False)
    return bundle


@pytest.mark.parametrize("version_key, gather, api, graphs", [
    ("10.3", "kernel", "auto", True), ("10.3", "memcpy", "auto", False), ("8.5", "auto", "auto", True),
    ("8.5", "auto", "tensors", False), ("11.0", "kernel", "auto", True)])
def test_backend_cascade_matches_onnxruntime_on_the_simulator(bundle, use_trt, monkeypatch, version_key, gather,
                                                              api, graphs):
    from edgeexit.export.tensorrt import build_engines
    from edgeexit.runtime.cascade import Cascade
    from edgeexit.runtime.tensorrt_backend import TensorRTBackend

    use_trt(version_key)
    build_engines(bundle, DEVICE, progress=False)
    b, x = digits_batch(bundle)
    thresholds, want = reference_cascade(b, x)
    assert 0 < want.exit_shares()[0] < 1 and 0 < want.exit_shares()[1] < 1

    pycuda = gpu_sim(monkeypatch, compile_ok=gather != "memcpy")
    backend = TensorRTBackend.from_bundle(b, gather=gather, api=api, graphs=graphs)
    with backend:
        assert backend.api == ("bindings" if version_key in TRT8 and api == "auto" else "tensors")
        assert backend.gather_mode == ("memcpy" if gather == "memcpy" else "kernel")
        cascade = Cascade(backend, b.stage_ios, thresholds)
        # What may cross to the host: conf + pred of every active sample at every stage, and the
        # logits of each sample once, where it leaves. Never an activation.
        pred_bytes = 4 if version_key in TRT8 else 8  # 8.x's ONNX parser makes int64 int32
        allowed = int(want.stage_samples.sum()) * (4 + pred_bytes) + want.logits.size * 4
        for i in range(3):  # plain runs, then (with graphs) captures, then replays: the same answers
            SIM.syncs = SIM.to_host_bytes = SIM.allocations = 0
            made = SIM.contexts + len(backend.graphs.graphs) + len(backend.graphs.failed)
            assert_same(cascade.run_batched(x, 64, collect=True), want)
            chunks = -(-len(x) // 64)  # the host waits once per stage (conf+pred), once for all logits,
            # and once after binding a new context to its profile and before each capture
            made = SIM.contexts + len(backend.graphs.graphs) + len(backend.graphs.failed) - made
            assert SIM.syncs <= (len(b.stage_ios) + 1) * chunks + made
            assert not made or i < 2  # the third pass only replays: no new context, no capture
            assert SIM.to_host_bytes == allowed
            if i:
                assert SIM.allocations == 0  # every buffer was made on the first pass, once per bucket
        keys = {(k, bucket) for k, bucket in backend.graphs.runs}
        assert SIM.contexts == len(keys)  # one context per (stage, bucket), made once
        assert SIM.own_memory_contexts == 0  # all of them share one activation block
        if graphs:
            assert backend.graphs.graphs and not backend.graphs.failed and SIM.graph_launches > 0
        else:
            assert not backend.graphs.graphs and SIM.graph_launches == 0
    assert pycuda["pycuda.driver"].pushed == 0  # the context was released
    assert not backend.buffers and (not graphs or pycuda["cuda.bindings.driver"].graphs_alive == 0)
    if gather == "memcpy":
        assert SIM.copies > 0 and SIM.launches == 0
    else:
        assert SIM.launches > 0


def set_profiles(bundle_path, mode):
    """Rewrite the bundle's export.batch.profiles (and reseal), as a yaml with that key would have built it."""
    from edgeexit.bundle import Change, load_bundle, update_bundle

    b = load_bundle(bundle_path)
    export = {**b.manifest["export"], "batch": {**b.manifest["export"]["batch"], "profiles": mode}}
    update_bundle(b, lambda current: Change({}, {"export": export}))


@pytest.mark.parametrize("version_key", ["8.5", "8.6", "10.3", "11.0"])
@pytest.mark.parametrize("profiles", ["buckets", "range"])
def test_cascades_of_every_size_match_onnxruntime_plain_captured_and_replayed(bundle, use_trt, monkeypatch,
                                                                              version_key, profiles):
    """The acceptance test of the profile rules: on each version's simulator, a cascade over
    batch sizes 1, 3, 5, 17, 33, 64 and a 300-sample run_batched give onnxruntime's answers on
    the first (plain), second (captured) and third (replayed) pass. Before 10.0 every context
    needs its own profile: per-bucket profiles give each (stage, bucket) one, and a range
    profile shares one context per stage, reshaped per bucket, without graphs."""
    from edgeexit.export.tensorrt import build_engines
    from edgeexit.runtime.cascade import Cascade
    from edgeexit.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from edgeexit.runtime.tensorrt_backend import TensorRTBackend

    set_profiles(bundle, profiles)
    use_trt(version_key)
    build_engines(bundle, DEVICE, progress=False)
    b, x = digits_batch(bundle)
    thresholds, _ = reference_cascade(b, x)
    reference = Cascade(OnnxRuntimeBackend(b.stage_paths, b.stage_ios), b.stage_ios, thresholds)
    sizes = (1, 3, 5, 17, 33, 64)
    want = [reference(x[:n], collect=True) for n in sizes]
    want_all = reference.run_batched(x, 64, collect=True)
    gpu_sim(monkeypatch)
    with TensorRTBackend.from_bundle(b, warmup=1) as backend:
        cascade = Cascade(backend, b.stage_ios, thresholds)
        for _ in range(3):  # plain, then captured, then replayed
            for n, w in zip(sizes, want):
                assert_same(cascade(x[:n], collect=True), w)
            assert_same(cascade.run_batched(x, 64, collect=True), want_all)
        assert SIM.context_syncs == 0  # buffers are zeroed on the stream, never with a device-wide wait
        shared = profiles == "range" and version_key in TRT8
        if shared:  # one context per stage and profile; no graphs, and the reason is given
            assert not backend.graphs.graphs and SIM.graph_launches == 0
            assert all("TensorRT < 10" in why for why in backend.graphs.failed.values())
            assert SIM.contexts == len(b.stage_ios)
        else:
            assert backend.graphs.graphs and not backend.graphs.failed and SIM.graph_launches > 0
            assert SIM.contexts == len({key for key in backend.graphs.runs})
    assert sys.modules["pycuda.driver"].pushed == 0


def test_the_8x_simulator_enforces_one_context_per_profile(bundle, use_trt):
    """What the code before per-bucket profiles did on 8.5: a second context without
    set_optimization_profile_async has no profile and cannot run; asking for a profile a live
    context holds fails with TensorRT's message."""
    from edgeexit.export.tensorrt import build_engines

    trt = use_trt("8.5")
    build_engines(bundle, DEVICE, progress=False)
    engine = trt.Runtime(None).deserialize_cuda_engine((bundle / "engines" / f"{DEVICE}-trt8.5" / "stage0.plan").read_bytes())
    first, second = engine.create_execution_context(), engine.create_execution_context()
    assert first._profile == 0 and second._profile == -1
    assert not second.set_input_shape("image", (1, 1, 8, 8))
    assert not second.set_optimization_profile_async(0, 0)  # profile 0 is chosen by `first`
    assert second.set_optimization_profile_async(3, 0) and second.set_input_shape("image", (8, 1, 8, 8))
    assert not second.set_input_shape("image", (4, 1, 8, 8))  # outside profile 3 (batch 8)
    assert not first.set_tensor_address("no-such-tensor", 0x100)
    del first
    third = engine.create_execution_context()
    assert third._profile == 0  # profile 0 is free again once its context is gone
    trt10 = use_trt("10.3")
    build_engines(bundle, DEVICE, progress=False)
    engine = trt10.Runtime(None).deserialize_cuda_engine(
        (bundle / "engines" / f"{DEVICE}-trt10.3" / "stage0.plan").read_bytes())
    assert [engine.create_execution_context()._profile for _ in range(2)] == [0, 0]  # 10.0+: shared


def test_a_failed_capture_clears_the_cuda_error_and_the_next_plain_call_runs(engines_bundle, monkeypatch):
    from edgeexit.runtime.cascade import Cascade
    from edgeexit.runtime.tensorrt_backend import TensorRTBackend

    b, x = digits_batch(engines_bundle)
    thresholds, want = reference_cascade(b, x[:64])
    gpu_sim(monkeypatch)
    with TensorRTBackend.from_bundle(b, warmup=1) as backend:
        SIM.capture_breaks = True  # the first capture is invalidated and leaves the error set
        cascade = Cascade(backend, b.stage_ios, thresholds)
        assert_same(cascade(x[:64], collect=True), want)  # the enqueue after the failed capture ran
        assert SIM.last_error == 0 and "INVALIDATED" in backend.graphs.failed[(0, 64)]


def test_recovery_raises_the_original_error_and_a_sticky_one_says_to_reopen(engines_bundle, monkeypatch):
    from edgeexit.runtime.cascade import Cascade
    from edgeexit.runtime.tensorrt_backend import TensorRTBackend

    b, x = digits_batch(engines_bundle)
    thresholds, _ = reference_cascade(b, x[:64])
    gpu_sim(monkeypatch)
    with TensorRTBackend.from_bundle(b) as backend:
        cascade = Cascade(backend, b.stage_ios, thresholds)
        cascade(x[:64])  # contexts made and bound
        SIM.fail_enqueue = [True]
        SIM.sticky = "an illegal memory access was encountered"  # the wait in recovery raises too
        with pytest.raises(EdgeExitError, match="stage 0 failed to enqueue"):
            cascade(x[:64])
        with pytest.raises(EdgeExitError, match="error state .*illegal memory access.*open a new one"):
            cascade(x[:64])
        SIM.sticky = None


def test_an_address_the_engine_refuses_is_an_error():
    from edgeexit.runtime.tensorrt_backend import _TensorNames

    api = _TensorNames.__new__(_TensorNames)
    context = types.SimpleNamespace(set_tensor_address=lambda name, ptr: name != "bad")
    api.bind(context, {"good": 0x100}, 0)
    with pytest.raises(EdgeExitError, match="refuses an address for tensor 'bad'"):
        api.bind(context, {"good": 0x100, "bad": 0x200}, 0)


def test_padding_rows_never_reach_the_results(engines_bundle, monkeypatch):
    """Batches between buckets run padded; every answer matches running each sample alone."""
    from edgeexit.runtime.cascade import Cascade
    from edgeexit.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from edgeexit.runtime.tensorrt_backend import TensorRTBackend

    b, x = digits_batch(engines_bundle)
    gpu_sim(monkeypatch)
    thresholds = [0.99, 0.99, None]
    with TensorRTBackend.from_bundle(b) as backend:
        for n in (1, 3, 5, 17, 33):
            got = Cascade(backend, b.stage_ios, thresholds)(x[:n])
            want = Cascade(OnnxRuntimeBackend(b.stage_paths, b.stage_ios), b.stage_ios, thresholds)(x[:n])
            assert_same(got, want)
        assert {bucket for _, bucket in backend.graphs.runs} >= {1, 4, 8, 32, 64}


def test_a_capture_that_fails_runs_plainly(engines_bundle, monkeypatch):
    from edgeexit.runtime.cascade import Cascade
    from edgeexit.runtime.tensorrt_backend import TensorRTBackend

    b, x = digits_batch(engines_bundle)
    thresholds, want = reference_cascade(b, x[:64])
    gpu_sim(monkeypatch)
    with TensorRTBackend.from_bundle(b, warmup=1) as backend:
        SIM.capture_breaks = True  # the first capture is invalidated
        cascade = Cascade(backend, b.stage_ios, thresholds)
        for _ in range(3):
            assert_same(cascade.run_batched(x[:64], 64, collect=True), want)
        assert list(backend.graphs.failed) == [(0, 64)]
        assert "INVALIDATED" in backend.graphs.failed[(0, 64)]
        assert (0, 64) not in backend.graphs.graphs and (1, 32) in backend.graphs.graphs


def test_graphs_need_cuda_python_and_run_plainly_without_it(engines_bundle, monkeypatch):
    from edgeexit.runtime.cascade import Cascade
    from edgeexit.runtime.tensorrt_backend import TensorRTBackend

    b, x = digits_batch(engines_bundle)
    thresholds, want = reference_cascade(b, x[:64])
    gpu_sim(monkeypatch, cuda_python=False)
    with TensorRTBackend.from_bundle(b) as backend:
        for _ in range(3):
            assert_same(Cascade(backend, b.stage_ios, thresholds)(x[:64], collect=True), want)
        assert not backend.graphs.graphs
        assert all("cuda-python is not installed" in why for why in backend.graphs.failed.values())


def test_a_failed_call_does_not_poison_the_next(engines_bundle, monkeypatch):
    from edgeexit.runtime.cascade import Cascade
    from edgeexit.runtime.tensorrt_backend import TensorRTBackend

    b, x = digits_batch(engines_bundle)
    thresholds, want = reference_cascade(b, x[:64])
    gpu_sim(monkeypatch)
    with TensorRTBackend.from_bundle(b) as backend:
        cascade = Cascade(backend, b.stage_ios, thresholds)
        SIM.fail_enqueue = [False, True]  # stage 1 fails, after stage 0 ran and the gathers were queued
        with pytest.raises(EdgeExitError, match="stage 1 failed to enqueue at batch 32"):
            cascade(x[:64])
        assert backend.lock.acquire(blocking=False)  # the lock was released
        backend.lock.release()
        for _ in range(3):
            assert_same(cascade(x[:64], collect=True), want)
        with pytest.raises(EdgeExitError, match="max batch 256"):
            cascade(np.zeros((300, 1, 8, 8), np.float32))
        assert_same(cascade(x[:64], collect=True), want)


def test_calls_from_other_threads_push_the_context_and_are_serialised(engines_bundle, monkeypatch):
    import threading

    from edgeexit.runtime.cascade import Cascade
    from edgeexit.runtime.tensorrt_backend import TensorRTBackend

    b, x = digits_batch(engines_bundle)
    thresholds, want = reference_cascade(b, x[:64])
    pycuda = gpu_sim(monkeypatch)
    driver = pycuda["pycuda.driver"]
    with TensorRTBackend.from_bundle(b) as backend:
        cascade = Cascade(backend, b.stage_ios, thresholds)
        results, seen = [], []
        original = backend._enter

        def enter():
            original()
            seen.append(driver.pushed)

        backend._enter = enter
        threads = [threading.Thread(target=lambda: results.append(cascade(x[:64], collect=True))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 4 and seen == [1] * 4  # this call's push only, one call at a time
        for got in results:
            assert_same(got, want)
        assert driver.pushed == 0  # no thread keeps the context between calls
        closer = threading.Thread(target=backend.close)  # closing from another thread works too
        closer.start()
        closer.join()
        assert backend._ctx is None and not backend.buffers
    assert driver.pushed == 0


def test_engines_from_another_tensorrt_or_gpu_are_refused(engines_bundle, monkeypatch):
    from edgeexit.bundle import load_bundle
    from edgeexit.runtime.tensorrt_backend import TensorRTBackend

    b = load_bundle(engines_bundle)
    meta = engines_bundle / b.manifest["engines"][f"{DEVICE}-trt10.3"]["metadata"]
    record = json.loads(meta.read_text())
    gpu_sim(monkeypatch)

    sys.modules["tensorrt"].__version__ = "10.3.1.5"  # same 10.3 key, another release
    with pytest.raises(EdgeExitError, match=r"built by TensorRT 10\.3\.0\.26, this is 10\.3\.1\.5.*edgeexit engines"):
        TensorRTBackend.from_bundle(b)
    sys.modules["tensorrt"].__version__ = "10.3.0.26"

    record["gpu"] = {"name": "Orin", "compute_capability": "8.7"}
    meta.write_text(json.dumps(record))  # the check reads engine.json itself (no reload needed)
    SIM.gpu = ("NVIDIA H200", (9, 0))
    with pytest.raises(EdgeExitError, match=r"built for SM 8\.7 \(Orin\), this GPU is SM 9\.0 \(NVIDIA H200\)"):
        TensorRTBackend.from_bundle(b)
    SIM.gpu = ("Orin (nvgpu)", (8, 7))
    with pytest.raises(EdgeExitError, match="built on Orin, this GPU is Orin \\(nvgpu\\)"):
        TensorRTBackend.from_bundle(b)
    SIM.gpu = ("Orin", (8, 7))
    with TensorRTBackend.from_bundle(b) as backend:
        assert backend.gpu == {"name": "Orin", "compute_capability": "8.7"}
    assert sys.modules["pycuda.driver"].pushed == 0


def test_cli_runs_and_profiles_a_bundle_on_tensorrt(engines_bundle, monkeypatch, tmp_path, capsys):
    """`edgeexit run/profile --backend tensorrt` on the simulator: the loader, the engine check
    and the profiler's machine facts, end to end through the CLI."""
    from edgeexit.bundle import load_bundle
    from edgeexit.cli import main
    from edgeexit.profile import read_profiles

    b, x = digits_batch(engines_bundle)
    raw = x[:20] * np.asarray(b.input["std"], np.float32).reshape(1, -1, 1, 1) + \
        np.asarray(b.input["mean"], np.float32).reshape(1, -1, 1, 1)  # back to pixel units: run normalises
    np.save(tmp_path / "x.npy", raw)
    gpu_sim(monkeypatch)
    answers = {}
    for backend in ("onnxruntime", "tensorrt"):
        assert main(["run", str(engines_bundle), "--input", str(tmp_path / "x.npy"), "--backend", backend, "--json"]) == 0
        answers[backend] = json.loads(capsys.readouterr().out)
    assert answers["tensorrt"]["backend"] == "tensorrt"
    for a, t in zip(answers["onnxruntime"]["samples"], answers["tensorrt"]["samples"]):
        assert (a["class"], a["exit"]) == (t["class"], t["exit"]) and abs(a["confidence"] - t["confidence"]) < 1e-5
    assert main(["profile", str(engines_bundle), "--backend", "tensorrt", "--batch", "1,8", "--iters", "3",
                 "--warmup", "1", "--quiet"]) == 0
    entry = read_profiles(engines_bundle)["profiles"]["tensorrt@Simulated GPU"]
    assert entry["machine"]["compute_capability"] == "8.7" and set(entry["batches"]) == {"1", "8"}
    load_bundle(engines_bundle)  # resealed: every checksum holds
    assert sys.modules["pycuda.driver"].pushed == 0


def test_backend_checks_shapes_and_the_bindings_api_is_refused_on_10(engines_bundle, monkeypatch, use_trt):
    from edgeexit.bundle import load_bundle
    from edgeexit.runtime.static import Rows
    from edgeexit.runtime.tensorrt_backend import TensorRTBackend

    gpu_sim(monkeypatch)
    with TensorRTBackend.from_bundle(load_bundle(engines_bundle)) as backend:
        out = backend.run(0, {"image": np.zeros((3, 1, 8, 8))})  # a host float64 array is copied up as float32
        assert out["s0_carry0"] == Rows("s0_carry0", 4, 3)
        assert backend.download(out["s0_logits"]).shape == (3, 10)
        with pytest.raises(EdgeExitError, match="max batch 256"):
            backend.run(0, {"image": backend.upload(np.zeros((300, 1, 8, 8), np.float32))})
        with pytest.raises(EdgeExitError, match=r"input image takes \[N, 1, 8, 8\], got \[2, 1, 4, 4\]"):
            backend.run(0, {"image": backend.upload(np.zeros((2, 1, 4, 4), np.float32))})
    with pytest.raises(EdgeExitError, match="no bindings API"):
        TensorRTBackend.from_bundle(load_bundle(engines_bundle), api="bindings")


# --- the TensorRT names used by the code exist where they are used --------------------------------


def _trt_chains(tree: ast.AST) -> set[str]:
    """Every `trt.X` / `trt.X.Y` accessed in a module (longest chain, dunders below the top cut)."""
    chains = set()

    class Visitor(ast.NodeVisitor):
        def visit_Attribute(self, node):
            parts, cur = [], node
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id == "trt":
                parts.reverse()
                chains.add(".".join(p for i, p in enumerate(parts[:2]) if i == 0 or not p.startswith("__")))
                return  # do not also count the inner prefix
            self.generic_visit(node)

    Visitor().visit(tree)
    return chains


def _hasattr_guards(tree: ast.AST) -> set[str]:
    """'X.Y' for every hasattr(trt.X, "Y") and 'X' for every hasattr(trt, "X") in a module."""
    guards = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr"
                and len(node.args) == 2 and isinstance(node.args[1], ast.Constant)):
            target = node.args[0]
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "trt":
                guards.add(f"{target.attr}.{node.args[1].value}")
            elif isinstance(target, ast.Name) and target.id == "trt":
                guards.add(str(node.args[1].value))
    return guards


@pytest.mark.parametrize("source", [BUILDER_SRC, BACKEND_SRC], ids=["builder", "backend"])
def test_every_trt_name_exists_and_version_specific_ones_are_guarded(source):
    tree = ast.parse(source.read_text())
    used = _trt_chains(tree)
    assert used, "expected TensorRT names in the module"
    unknown = sorted(used - set(TRT_NAMES))
    assert not unknown, f"names not in any supported TensorRT version's list: {unknown}"
    guards = _hasattr_guards(tree)
    for name in sorted(used):
        if TRT_NAMES[name] != ALL:  # guarded itself, or its enum is guarded and has the member wherever it exists
            top = name.split(".")[0]
            ok = name in guards or (top in guards and TRT_NAMES[name] == TRT_NAMES.get(top))
            assert ok, f"trt.{name} exists only in {sorted(TRT_NAMES[name])}; guard it with hasattr"


def test_fake_modules_match_the_name_lists():
    for key in VERSIONS:
        mod = fake_trt(key)
        for name, versions in TRT_NAMES.items():
            obj = mod
            present = True
            for part in name.split("."):
                if not hasattr(obj, part):
                    present = False
                    break
                obj = getattr(obj, part)
            assert present == (key in versions), (key, name)


# --- on real hardware --------------------------------------------------------------------------------


def test_real_tensorrt_cascade_matches_onnxruntime(bundle):
    """On a machine with TensorRT + pycuda + a GPU: build real engines and compare with onnxruntime.

    The device profile is taken from EDGEEXIT_TRT_DEVICE (default jetson-agx-orin-64gb).
    """
    pytest.importorskip("tensorrt", reason="TensorRT is installed only on NVIDIA machines (JetPack)")
    pytest.importorskip("pycuda.driver", reason="pycuda is installed only on NVIDIA machines")
    from edgeexit.export.tensorrt import build_engines, gpu_info
    from edgeexit.runtime.cascade import Cascade
    from edgeexit.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from edgeexit.runtime.tensorrt_backend import TensorRTBackend

    if gpu_info() is None:
        pytest.skip("no CUDA device visible")
    device = os.environ.get("EDGEEXIT_TRT_DEVICE", DEVICE)
    build_engines(bundle, device, progress=False)
    b, x = digits_batch(bundle)
    thresholds = b.thresholds
    want = Cascade(OnnxRuntimeBackend(b.stage_paths, b.stage_ios), b.stage_ios, thresholds).run_batched(x, 64)
    with TensorRTBackend.from_bundle(b, device) as backend:
        got = Cascade(backend, b.stage_ios, thresholds).run_batched(x, 64)
    assert np.mean(got.pred == want.pred) > 0.99
    np.testing.assert_allclose(got.conf[got.exit == want.exit], want.conf[got.exit == want.exit], atol=1e-3)


@pytest.mark.parametrize("arch", ["sm_72", "sm_87", "sm_90", "sm_110"])  # Xavier, Orin, H100/H200, Thor
def test_gather_kernel_compiles_for_the_jetson_gpus(tmp_path, arch):
    """The device-side gather kernel is real CUDA: nvcc builds it for each GPU it knows, warning-free."""
    import shutil
    import subprocess

    from edgeexit.runtime.pycuda_memory import GATHER_SOURCE

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed here")
    known = subprocess.run([nvcc, "--list-gpu-arch"], check=True, capture_output=True, text=True).stdout.split()
    if arch.replace("sm_", "compute_") not in known:
        pytest.skip(f"this nvcc cannot build for {arch} (CUDA 13 dropped Volta; JetPack 5's CUDA 11.4 builds it)")
    source = tmp_path / "gather.cu"
    source.write_text('extern "C" {\n' + GATHER_SOURCE + "\n}\n")  # pycuda's SourceModule wraps it so too
    cubin = tmp_path / "gather.cubin"
    subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-Werror", "all-warnings", str(source), "-o", str(cubin)],
                   check=True, capture_output=True)
    symbols = cubin.read_bytes()
    assert b"gather_rows_u32" in symbols and b"gather_rows_u8" in symbols
