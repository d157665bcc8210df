"""TensorRT engines for a bundle's stages: one plan per stage, built on the device that runs it.

A plan is specific to the GPU and the TensorRT version that built it, so engines live in
the bundle under ``engines/<device>-trt<major.minor>/`` (``stage{k}.plan``, ``engine.json``
with the build metadata, ``timing.cache`` to make rebuilds fast) and the manifest gains an
``engines`` entry keyed the same way. The bundle is rewritten as a whole (copy, add, reseal
with fresh checksums, one rename), so a failed or interrupted build leaves it as it was.

One code path serves TensorRT 8.5 (JetPack 5), 10.x (JetPack 6) and 11.x. The calls that
differ between them are guarded by ``hasattr`` on the binding itself, never by guessing from
the version string alone; ``docs/tensorrt-versions.md`` lists every difference and where it
was checked:

- network flags: ``EXPLICIT_BATCH`` on 8.x (deprecated and ignored in 10, removed in 11);
  ``STRONGLY_TYPED`` (10+) when the graph itself carries its precision (fp16 tensors, int8
  Q/DQ); 11 is always strongly typed.
- precision flags ``BuilderFlag.FP16/INT8`` only for weakly typed networks and only where
  the enum still has them (removed in 11). INT8 is set for explicit Q/DQ graphs on 8.x,
  where every quantized network needs it; int8 never means implicit calibration here.
- ``builder_optimization_level`` only where the config has it (8.6+; not 8.5).
- the parser's ``node_name()``/``node_operator()`` only where they exist (10+); on 8.5 the
  node index is turned into the ONNX node's name from the graph itself.

TensorRT and pycuda cannot be installed on a machine without an NVIDIA GPU, so this module
imports neither at import time; without TensorRT `build_engines` says so in one line.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from edgeexit.errors import EdgeExitError
from edgeexit.jsonio import dumps

NOT_INSTALLED = ("tensorrt: not installed here (import tensorrt failed); the bundle stays valid "
                 "\u2014 run `edgeexit engines BUNDLE` on the Jetson")

MIN_VERSION = (8, 5)  # the oldest supported: the builder needs set_memory_pool_limit (8.4+); JetPack 4 (8.2) has not
PRECISIONS = ("fp32", "fp16", "int8")
ENGINES_DIR = "engines"
TIMING_CACHE = "timing.cache"
ENGINE_JSON = "engine.json"
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


# --- availability --------------------------------------------------------------------------


def _import_trt():
    """The tensorrt module, or None where it is not installed (or its libraries do not load)."""
    try:
        import tensorrt as trt  # noqa: PLC0415 - optional, only on the device
    except (ImportError, OSError):
        return None
    return trt


def trt_available() -> bool:
    """Whether `import tensorrt` works here."""
    return _import_trt() is not None


def parse_version(text: str) -> tuple[int, ...]:
    """'10.3.0.26' -> (10, 3, 0, 26); stops at the first part that is not a number."""
    parts: list[int] = []
    for part in str(text).split("."):
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def trt_version() -> tuple[int, ...]:
    """The installed TensorRT version as integers, e.g. (10, 3, 0); EdgeExitError without it."""
    trt = _import_trt()
    if trt is None:
        raise EdgeExitError(NOT_INSTALLED)
    return parse_version(trt.__version__)


def _require_trt():
    """The tensorrt module, refusing versions older than MIN_VERSION with what to do instead."""
    trt = _import_trt()
    if trt is None:
        raise EdgeExitError(NOT_INSTALLED)
    version = parse_version(trt.__version__)
    if version[:2] < MIN_VERSION:
        raise EdgeExitError(
            f"tensorrt: version {trt.__version__} is older than {MIN_VERSION[0]}.{MIN_VERSION[1]} "
            "(JetPack 4); run this bundle on onnxruntime there, or use a JetPack 5+ device")
    return trt


def engine_key(device: str, version: Sequence[int]) -> str:
    """The folder / manifest key of one engine set: '<device>-trt<major.minor>'."""
    return f"{device}-trt{version[0]}.{version[1] if len(version) > 1 else 0}"


def say(message: str, progress: bool = True) -> None:
    """A progress line on stderr (stdout is kept for results)."""
    if progress:
        print(message, file=sys.stderr, flush=True)


# --- what the ONNX graph says ----------------------------------------------------------------


@dataclass(frozen=True)
class GraphFacts:
    """What the builder needs to know about one stage graph before TensorRT sees it."""

    precision: str  # "int8" (explicit Q/DQ), "fp16" (fp16 tensors) or "fp32"
    input_shapes: dict[str, tuple[int, ...]]  # graph input -> non-batch dims
    node_names: tuple[str, ...]  # by node index, to name the node a TensorRT 8.5 parser error points at
    node_ops: tuple[str, ...]


def graph_facts(onnx_path: str | Path) -> GraphFacts:
    """Precision, input shapes and node names of an ONNX graph (weights are not loaded)."""
    import onnx

    path = Path(onnx_path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises several kinds for a bad file
        raise EdgeExitError(f"tensorrt: cannot read {path}: {exc}") from None
    graph = model.graph
    f16 = onnx.TensorProto.FLOAT16
    ops = [n.op_type for n in graph.node]
    if _QDQ_OPS & set(ops):
        precision = "int8"
    elif (any(t.data_type == f16 for t in graph.initializer)
          or any(v.type.tensor_type.elem_type == f16
                 for v in [*graph.input, *graph.output, *graph.value_info])):
        precision = "fp16"
    else:
        precision = "fp32"
    initializers = {t.name for t in graph.initializer}
    shapes: dict[str, tuple[int, ...]] = {}
    for value in graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        rest = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims[1:])
        if any(d <= 0 for d in rest):
            raise EdgeExitError(
                f"tensorrt: input {value.name!r} of {path.name} has a dynamic dimension besides the "
                f"batch ({[d.dim_param or d.dim_value for d in dims]}); stage graphs must be static "
                "apart from the batch")
        shapes[value.name] = rest
    return GraphFacts(precision, shapes, tuple(n.name for n in graph.node), tuple(ops))


# --- one engine --------------------------------------------------------------------------------


def make_logger(trt, min_severity=None, echo: bool = True):
    """A TensorRT logger that writes to stderr (trt.Logger prints to stdout) and keeps the errors.

    `errors` holds every ERROR / INTERNAL_ERROR message, so a failed build can say why in one line.
    """
    threshold = int(trt.ILogger.WARNING if min_severity is None else min_severity)
    error_level = int(trt.ILogger.ERROR)

    class _StderrLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            level = int(severity)
            if level <= error_level:
                self.errors.append(" ".join(str(msg).split()))
            if echo and level <= threshold:
                print(f"[tensorrt] {msg}", file=sys.stderr, flush=True)

    return _StderrLogger()


def _check_batch(batch: Sequence[int]) -> tuple[int, int, int]:
    try:
        bmin, bopt, bmax = (int(b) for b in batch)
    except (TypeError, ValueError):
        raise EdgeExitError(f"tensorrt: batch must be (min, opt, max), got {batch!r}") from None
    if not 1 <= bmin <= bopt <= bmax:
        raise EdgeExitError(f"tensorrt: batch needs 1 <= min <= opt <= max, got {bmin}, {bopt}, {bmax}")
    return bmin, bopt, bmax


def _strongly_typed(trt, version: tuple[int, ...], precision: str, graph: str) -> bool:
    """Whether the network is strongly typed (precision taken from the graph, no precision flags).

    TensorRT 11 is always strongly typed. On 10.x a graph that carries its own reduced precision
    (fp16 tensors or int8 Q/DQ) is built strongly typed; fp32 graphs, and graphs built at another
    precision than they carry, stay weakly typed. 8.x has no strong typing.
    """
    if version[0] >= 11:
        return True
    return (precision == graph and precision in ("fp16", "int8")
            and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"))


def _network_flags(trt, version: tuple[int, ...], strongly_typed: bool) -> int:
    flags = 0
    if version[0] < 10 and hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        # 8.x: the ONNX parser needs an explicit-batch network (10 ignores the flag, 11 removed it).
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        # 10.x: opt in; 11.x: accepted and ignored (always strongly typed).
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return flags


def _set_precision(trt, config, version, precision: str, graph: str, strongly_typed: bool) -> list[str]:
    """Builder flags for `precision`; returns the names of the flags set."""
    label = ".".join(map(str, version[:2]))
    if graph == "int8" and precision != "int8":
        raise EdgeExitError(
            f"tensorrt: this stage graph has explicit Q/DQ (int8); build it at int8, not {precision}")
    if strongly_typed:
        if precision != graph:
            raise EdgeExitError(
                f"tensorrt {label}: networks are strongly typed, so the precision must be in the graph; "
                f"this stage graph is {graph}, not {precision} (export the bundle with "
                f"export.precision: {precision})")
        return []
    if precision == "fp32":
        return []
    if precision == "int8":
        # Only explicit Q/DQ reaches here (graph == "int8"): on 8.x every quantized network needs
        # the INT8 flag; there is no calibrator, so nothing is quantized implicitly.
        if graph != "int8":
            raise EdgeExitError(
                "tensorrt: int8 engines need explicit Q/DQ in the ONNX graph (implicit calibration is "
                "deprecated since TensorRT 10.1 and removed in 11); build the bundle with "
                "export.precision: int8")
        flags = []
        for name in ("INT8", "FP16"):  # FP16 too: the layers left unquantized run fp16, not fp32 (trtexec --best)
            if hasattr(trt.BuilderFlag, name):
                config.set_flag(getattr(trt.BuilderFlag, name))
                flags.append(name)
        return flags
    # fp16 from a graph that does not carry it: weak typing lets TensorRT pick fp16 kernels.
    if not hasattr(trt.BuilderFlag, "FP16"):
        raise EdgeExitError(
            f"tensorrt {label}: there is no FP16 builder flag (strongly typed only); export the bundle "
            "with export.precision: fp16 so the graph carries fp16")
    config.set_flag(trt.BuilderFlag.FP16)
    return ["FP16"]


def _set_dla(trt, builder, config, dla_core: int, precision: str) -> None:
    if precision == "fp32":
        raise EdgeExitError("target.dla: DLA runs fp16 or int8 only; build at fp16/int8 or leave DLA off")
    if not hasattr(trt.DeviceType, "DLA"):
        raise EdgeExitError("tensorrt: this TensorRT has no DLA device type; leave DLA off")
    available = int(builder.num_DLA_cores)
    if not 0 <= dla_core < available:
        raise EdgeExitError(
            f"target.dla: DLA core {dla_core} asked for, TensorRT sees {available} DLA core(s) here "
            "(DLA is not supported in TensorRT 11.0-11.3)")
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = int(dla_core)
    config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers DLA cannot run go to the GPU


def _parser_error_text(parser, onnx_path: Path, facts: GraphFacts | None) -> str:
    """All parser errors as one line, each naming the ONNX node it is about."""
    parts = []
    for i in range(int(parser.num_errors)):
        err = parser.get_error(i)
        desc = " ".join(str(err.desc()).split())
        index = int(err.node()) if hasattr(err, "node") else -1
        name = str(err.node_name()) if hasattr(err, "node_name") else ""
        op = str(err.node_operator()) if hasattr(err, "node_operator") else ""
        if facts is not None and 0 <= index < len(facts.node_names):
            name = name or facts.node_names[index]
            op = op or facts.node_ops[index]
        if name:
            where = f"node {name!r}" + (f" ({op})" if op else "")
        elif index >= 0:
            where = f"node #{index}" + (f" ({op})" if op else "")
        else:
            where = "graph"
        parts.append(f"{where}: {desc}")
    reasons = "; ".join(parts) if parts else "the parser gave no reason"
    return f"tensorrt: cannot parse {onnx_path.name}: {reasons}"


def _input_rows(network, input_shapes: dict[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """The non-batch dims of every network input with a dynamic dimension (a static input,
    such as the fused cascade graph's, needs no optimization profile)."""
    rows = {}
    for i in range(int(network.num_inputs)):
        tensor = network.get_input(i)
        name = tensor.name
        if name not in input_shapes and all(int(d) > 0 for d in tuple(tensor.shape)):
            continue
        if name in input_shapes:
            rows[name] = tuple(int(d) for d in input_shapes[name])
        else:
            rows[name] = tuple(int(d) for d in tuple(tensor.shape)[1:])
            if any(d <= 0 for d in rows[name]):
                raise EdgeExitError(f"tensorrt: no shape for input {name!r} (give it in input_shapes)")
    return rows


def profile_batches(batch: Sequence[int], mode: str) -> list[tuple[int, int, int]]:
    """(min, opt, max) batch of each optimization profile an engine gets.

    ``buckets``: one static profile (min = opt = max = B) per batch bucket the runtime runs at
    (powers of two up to max, those >= min), so batch 1 runs kernels tuned for batch 1 and DLA,
    which has no dynamic shapes, can run every bucket. ``range``: one profile over min..max tuned
    for opt (a smaller plan, one set of kernels for every size).
    """
    from edgeexit.runtime.static import bucket_sizes

    bmin, bopt, bmax = _check_batch(batch)
    if mode == "range":
        return [(bmin, bopt, bmax)]
    if mode != "buckets":
        raise EdgeExitError(f"export.batch.profiles: {mode!r} is not one of buckets, range")
    return [(b, b, b) for b in bucket_sizes(bmax) if b >= bmin]


def _layer_placement(trt, serialized, dla_core: int, logger) -> dict[str, Any]:
    """Where the built engine's layers run, from TensorRT's engine inspector: a DLA loadable is
    one layer of type "DLA" (a ForeignNode holding the subgraph the DLA runs); the rest are GPU."""
    runtime = trt.Runtime(logger)
    runtime.DLA_core = int(dla_core)
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        raise EdgeExitError("tensorrt: the engine just built does not deserialize (see the TensorRT messages above)")
    text = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    layers = json.loads(text).get("Layers", [])
    on_dla = [layer for layer in layers
              if (layer.get("LayerType") == "DLA" if isinstance(layer, dict) else "ForeignNode" in str(layer))]
    names = [str(layer.get("Name", "") if isinstance(layer, dict) else layer) for layer in on_dla]
    return {"dla": len(on_dla), "gpu": len(layers) - len(on_dla), "dla_layers": names}


def _write_atomic(path: Path, data) -> int:
    """Write bytes (or any buffer, e.g. IHostMemory) to `path` via a temp file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    view = memoryview(data)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(view)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return view.nbytes


def _attach_timing_cache(config, path: Path | None):
    """Load the timing cache at `path` (or start an empty one) into the builder config."""
    blob = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    # A cache TensorRT cannot read (None) or that does not match this device or TensorRT build:
    # start over rather than mix them; without one the build still runs, only slower.
    cache = config.create_timing_cache(b"") if blob else None
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    return None


def gpu_info(device: int = 0) -> dict[str, str] | None:
    """Name and compute capability of CUDA device `device`, from pycuda or cuda-python; else None."""
    try:
        import pycuda.driver as cuda  # noqa: PLC0415

        cuda.init()
        dev = cuda.Device(device)
        major, minor = dev.compute_capability()
        return {"name": str(dev.name()), "compute_capability": f"{major}.{minor}"}
    except Exception:  # noqa: BLE001 - not installed, no driver, no device
        pass
    for module in ("cuda.bindings.runtime", "cuda.cudart"):  # cuda-python >= 12.6, then older
        try:
            cudart = importlib.import_module(module)
            err, props = cudart.cudaGetDeviceProperties(device)
            if int(err) != 0:
                return None
            name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
            return {"name": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}
        except Exception:  # noqa: BLE001
            continue
    return None


def build_engine(onnx_path: str | Path, plan_path: str | Path, *, batch: Sequence[int],
                 input_shapes: dict[str, Sequence[int]], precision: str, workspace_mb: int,
                 profiles: str = "buckets", dla_core: int | None = None, timing_cache: str | Path | None = None,
                 optimization_level: int | None = None, logger=None,
                 graph_precision: str | None = None) -> dict[str, Any]:
    """Build one TensorRT plan from one stage's ONNX graph; returns the build metadata.

    `batch` is (min, opt, max); `profiles` says how optimization profiles cover it (see
    `profile_batches`: one static profile per bucket, or one range). `input_shapes` gives each
    input's non-batch dims. `precision` is the engine's precision; `graph_precision` is what the
    graph carries (detected from the ONNX when None). A DLA build needs static profiles and
    records where its layers landed (``placement``). The plan and the updated timing cache are
    written atomically. Raises EdgeExitError (one line) when the graph does not parse (naming
    the nodes), when the precision cannot be honoured on this TensorRT, or when the builder
    returns no engine.
    """
    trt = _require_trt()
    version = parse_version(trt.__version__)
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if precision not in PRECISIONS:
        raise EdgeExitError(f"tensorrt: unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
    batches = profile_batches(batch, profiles)
    if dla_core is not None and profiles != "buckets":
        raise EdgeExitError("target.dla: DLA has no dynamic shapes (min = opt = max); build with "
                            "export.batch.profiles: buckets, one static profile per batch size")
    facts = graph_facts(onnx_path)
    graph = graph_precision or facts.precision
    logger = logger if logger is not None else make_logger(trt)

    strongly_typed = _strongly_typed(trt, version, precision, graph)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, version, strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise EdgeExitError(_parser_error_text(parser, onnx_path, facts))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    flags = _set_precision(trt, config, version, precision, graph, strongly_typed)
    if dla_core is not None:
        _set_dla(trt, builder, config, int(dla_core), precision)
        flags.append("GPU_FALLBACK")
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector then names each layer's device
    applied_level = None
    if optimization_level is not None and hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = int(optimization_level)  # 8.6+; 8.5 has no such knob
        applied_level = int(optimization_level)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache = _attach_timing_cache(config, cache_path)

    rows = _input_rows(network, input_shapes)
    for lo, mid, hi in batches if rows else ():  # a static network takes no profile
        profile = builder.create_optimization_profile()
        for name, rest in rows.items():
            profile.set_shape(name, (lo, *rest), (mid, *rest), (hi, *rest))
        config.add_optimization_profile(profile)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        errors = getattr(logger, "errors", None) or []
        why = errors[-1] if errors else "see the TensorRT messages above"
        raise EdgeExitError(
            f"tensorrt: building {onnx_path.name} at {precision} failed ({why}); workspace "
            f"{workspace_mb} MiB, batch {batches[0][0]}..{batches[-1][2]} in {len(batches)} profile(s)"
            + (f", DLA core {dla_core}" if dla_core is not None else ""))
    placement = _layer_placement(trt, serialized, dla_core, logger) if dla_core is not None else None
    size = _write_atomic(plan_path, serialized)
    if cache_path is not None and cache is not None:
        _write_atomic(cache_path, config.get_timing_cache().serialize())
    return {
        "onnx": onnx_path.name,
        "plan": plan_path.name,
        "plan_bytes": size,
        "tensorrt": str(trt.__version__),
        "gpu": gpu_info(),
        "precision": precision,
        "graph_precision": graph,
        "strongly_typed": strongly_typed,
        "builder_flags": flags,
        "profiles": {"mode": profiles, "batches": [list(b) for b in batches],
                     "inputs": {name: list(rest) for name, rest in rows.items()}},
        "dla_core": dla_core,
        "placement": placement,
        "workspace_mb": int(workspace_mb),
        "optimization_level": applied_level,
        "build_seconds": round(seconds, 3),
    }


# --- every stage of a bundle ---------------------------------------------------------------


def device_command(bundle_path: str | Path, device: str, precision: str | None = None,
                   dla_core: int | None = None, optimization_level: int | None = None) -> str:
    """The `edgeexit engines` command line that builds these engines on the device itself."""
    parts = ["edgeexit", "engines", str(bundle_path), "--device", device]
    if precision is not None:
        parts += ["--precision", precision]
    if dla_core is not None:
        parts += ["--dla", str(dla_core)]
    if optimization_level is not None:
        parts += ["--opt-level", str(optimization_level)]
    return " ".join(parts)


@dataclass(frozen=True)
class EnginePlan:
    """What `build_engines` will build, checked against the device before TensorRT is needed."""

    device: Any  # the DeviceProfile
    batch: tuple[int, int, int]
    profiles: str
    precisions: tuple[str, ...]  # per stage
    facts: tuple[GraphFacts, ...]  # per stage, read once
    dla_core: int | None


def plan_engines(bundle, device_name: str, *, precision: str | None = None,
                 dla_core: int | None = None) -> EnginePlan:
    """Check device, precision, DLA and batch choices for a bundle's engines, without TensorRT.

    A misspelled device, a precision the device has no fast kernels for, a DLA core it lacks or
    a DLA build over dynamic shapes is refused here, in one line, before anything is built.
    """
    from edgeexit.devices import load_device

    device = load_device(device_name)
    if device.builder_workspace_mb is None:
        raise EdgeExitError(
            f"target.device: {device.name} has no TensorRT (builder_workspace_mb is null); "
            "give a Jetson device profile")
    shipped = parse_version(device.jetpack.tensorrt or "")
    if shipped and shipped[:2] < MIN_VERSION:
        raise EdgeExitError(
            f"target.device: {device.name}'s JetPack {device.jetpack.version} ships TensorRT {device.jetpack.tensorrt}, "
            f"older than {MIN_VERSION[0]}.{MIN_VERSION[1]}; run this bundle on onnxruntime there")
    if precision is not None and precision not in PRECISIONS:
        raise EdgeExitError(f"--precision: unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
    if dla_core is not None and not 0 <= int(dla_core) < device.dla_cores:
        raise EdgeExitError(
            f"target.dla: {device.name} has {device.dla_cores} DLA core(s); DLA core {dla_core} "
            "is not one of them" + ("" if device.dla_cores else "; leave DLA off"))
    export_batch = (bundle.manifest.get("export") or {}).get("batch") or {}
    batch = _check_batch((export_batch.get("min", 1), export_batch.get("opt", 1), export_batch.get("max", 1)))
    profiles = export_batch.get("profiles", "buckets")
    profile_batches(batch, profiles)
    if dla_core is not None and profiles != "buckets":
        raise EdgeExitError("target.dla: DLA has no dynamic shapes (min = opt = max); rebuild the bundle with "
                            "export.batch.profiles: buckets, one static profile per batch size")
    precisions, facts = [], tuple(graph_facts(bundle.path / stage["onnx"]) for stage in bundle.manifest["stages"])
    if shipped:
        from edgeexit.export.trt_ops import unsupported

        for stage in bundle.manifest["stages"]:
            missing = unsupported(bundle.path / stage["onnx"], device.jetpack.tensorrt)
            if missing:
                raise EdgeExitError(
                    f"stage {stage['index']}: TensorRT {device.jetpack.tensorrt}'s ONNX parser (JetPack "
                    f"{device.jetpack.version}) has no importer for {', '.join(sorted({op for _, op in missing}))} "
                    f"(node {missing[0][0]} of {stage['onnx']}); rebuild the bundle with this edgeexit, which writes "
                    "portable graphs, or target a newer JetPack")
    for stage, stage_facts in zip(bundle.manifest["stages"], facts):
        p = precision or stage.get("precision") or stage_facts.precision
        where = "--precision" if precision else f"stage {stage['index']}"
        if p != "fp32" and p not in device.precisions.fast:
            raise EdgeExitError(f"{where}: {device.name} has no fast {p} (fast: {', '.join(device.precisions.fast)}); "
                                "build at one of those")
        if dla_core is not None and p not in device.precisions.dla:
            raise EdgeExitError(f"{where}: the DLA of {device.name} runs {', '.join(device.precisions.dla) or 'nothing'}, "
                                f"not {p}")
        precisions.append(p)
    return EnginePlan(device, batch, profiles, tuple(precisions), facts, None if dla_core is None else int(dla_core))


def _check_placement(metas: Sequence[dict[str, Any]], dla_core: int, progress: bool) -> None:
    """Refuse a DLA set where no layer of any stage landed on the DLA; name the stages that run
    wholly on the GPU (they keep CUDA graphs)."""
    counts = [(m["stage"], m["placement"]["dla"], m["placement"]["gpu"]) for m in metas]
    if not any(dla for _, dla, _ in counts):
        where = ", ".join(f"stage {k} ({gpu} layers, all on the GPU)" for k, _, gpu in counts)
        raise EdgeExitError(
            f"target.dla: nothing landed on DLA core {dla_core}: {where}; TensorRT fell back to the GPU "
            "for every layer, so leave DLA off (a plain GPU build is faster)")
    for k, dla, gpu in counts:
        say(f"engines: stage {k}: {dla} DLA subgraph(s), {gpu} GPU layer(s)"
            + ("; runs wholly on the GPU (CUDA graphs kept)" if not dla else ""), progress)


FUSED_PLAN = "cascade.plan"


def _fused_engine(bundle, plan: EnginePlan, build: Callable[[str], dict[str, Any]],
                  progress: bool) -> tuple[dict[str, Any] | None, str | None]:
    """A plan of the bundle's fused cascade graph (batch 1, all of it static; `build(precision)`
    makes it) beside the per-stage plans, or (None, why) where this target cannot take it: DLA
    runs no conditionals, and this TensorRT's parser must know every operator (inside the If
    branches too) and the element type of every If output. The per-stage plans are what runs
    then; one line says so."""
    from edgeexit.export.trt_ops import if_output_types, unsupported

    if bundle.fused_path is None:
        return None, None
    version = _require_trt().__version__
    if plan.dla_core is not None:
        why = "DLA runs no conditionals (If)"
    else:
        problems = unsupported(bundle.fused_path, version) + if_output_types(bundle.fused_path, version)
        why = f"TensorRT {version}'s parser cannot take it ({problems[0][1]} at {problems[0][0]})" if problems else None
    if why is None:
        precisions = set(plan.precisions)
        try:
            return build("int8" if "int8" in precisions else "fp16" if "fp16" in precisions else "fp32"), None
        except EdgeExitError as exc:
            why = str(exc)
    say(f"engines: fused cascade graph not built ({why}): the per-stage plans run at batch 1 too", progress)
    return None, why


def build_engines(bundle_path: str | Path, device_name: str, *, precision: str | None = None,
                  progress: bool = True, dla_core: int | None = None,
                  optimization_level: int | None = None, cache: str | Path | None = None) -> Path:
    """Build a plan for every stage of a verified bundle into engines/<device>-trt<ver>/.

    `precision` overrides each stage's manifest precision (None: build each stage at the
    precision its graph was exported at). The workspace comes from the device profile; DLA
    is used only when `dla_core` is given and the device has that core. Device, precision,
    DLA and batch choices are checked before TensorRT is needed; without TensorRT the error
    gives the command to run on the device. The manifest gains ``engines[<device>-trt<ver>]``
    and fresh checksums; the bundle is replaced in one rename, so on any failure it is left
    byte-for-byte as it was. With `cache` (a folder, see `engine_cache`), a stage whose plan was
    built before on this module, L4T and TensorRT with the same graph and settings is copied
    from there instead of built, and every plan built is added to it. Returns the engines folder.
    """
    from edgeexit.atomic import staging
    from edgeexit.bundle import Change, load_bundle, update_bundle
    from edgeexit.export.engine_cache import EngineCache, board_identity, cache_fields

    bundle_path = Path(bundle_path)
    bundle = load_bundle(bundle_path)
    plan = plan_engines(bundle, device_name, precision=precision, dla_core=dla_core)
    device, batch = plan.device, plan.batch
    if _import_trt() is None:
        raise EdgeExitError(
            "tensorrt: not installed here (import tensorrt failed); the bundle stays valid \u2014 on the "
            f"Jetson run `{device_command(bundle_path, device.name, precision, dla_core, optimization_level)}`")
    trt = _require_trt()
    version = parse_version(trt.__version__)
    label = f"{version[0]}.{version[1] if len(version) > 1 else 0}"
    if device.jetpack.tensorrt and device.jetpack.tensorrt != label:
        say(f"engines: note: {device.name}'s JetPack ships TensorRT {device.jetpack.tensorrt}, this is "
            f"{trt.__version__}; the engines are keyed by the version that builds them", progress)
    gpu = gpu_info()
    if gpu and device.gpu.compute_capability and gpu["compute_capability"] != device.gpu.compute_capability:
        say(f"engines: note: this GPU is {gpu['name']} (SM {gpu['compute_capability']}), {device.name} is "
            f"SM {device.gpu.compute_capability}; a plan runs only on the GPU kind that built it", progress)

    key = engine_key(device.name, version)
    rel_dir = f"{ENGINES_DIR}/{key}"
    stages = bundle.manifest["stages"]
    batches = profile_batches(batch, plan.profiles)
    shown = (f"batch {batch[0]}..{batch[2]} in {len(batches)} static profile(s)" if plan.profiles == "buckets"
             else f"batch {batch[0]}..{batch[2]} (opt {batch[1]}) in one profile")

    with staging(bundle_path.resolve(), "engines") as scratch:  # plans are built here, then moved in
        out_dir = scratch / rel_dir
        out_dir.mkdir(parents=True)
        previous_cache = bundle_path / rel_dir / TIMING_CACHE
        if previous_cache.is_file():
            shutil.copy2(previous_cache, out_dir / TIMING_CACHE)
        logger = make_logger(trt, echo=progress)
        say(f"engines: {bundle.name} on {device.name} with TensorRT {trt.__version__} -> {rel_dir}/", progress)
        plans, metas = [], []
        total_start = time.perf_counter()
        store = EngineCache(cache) if cache is not None else None
        board = board_identity() if store is not None else {}
        def cached_build(onnx_rel: str, plan_rel: str, what: str, precision: str, batch_range, profiles: str,
                         dla_core: int | None, input_shapes, graph_precision: str | None) -> dict[str, Any]:
            """One plan: copied from the engine cache where it holds the same build, else built (and cached)."""
            fields = cache_fields(
                onnx_sha256=bundle.manifest["files"][onnx_rel], tensorrt=str(trt.__version__), device=device.name,
                precision=precision, batch=batch_range, profiles=profiles, workspace_mb=device.builder_workspace_mb,
                dla_core=dla_core, optimization_level=optimization_level, board=board)
            hit = store.get(fields) if store is not None else None
            if hit is not None:
                shutil.copyfile(hit[0], scratch / plan_rel)
                say(f"engines: {what} ({onnx_rel}, {precision}) from the engine cache "
                    f"({store.root / EngineCache.key(fields)})", progress)
                return {**hit[1], "from_cache": EngineCache.key(fields)}
            say(f"engines: {what} ({onnx_rel}, {precision}, {shown if batch_range == batch else 'batch 1'}) "
                "building ...", progress)
            meta = build_engine(
                bundle_path / onnx_rel, scratch / plan_rel, batch=batch_range, input_shapes=input_shapes,
                precision=precision, workspace_mb=device.builder_workspace_mb, profiles=profiles, dla_core=dla_core,
                timing_cache=out_dir / TIMING_CACHE, optimization_level=optimization_level, logger=logger,
                graph_precision=graph_precision)
            meta["from_cache"] = None
            if store is not None:
                store.put(fields, scratch / plan_rel, meta)
            say(f"engines: {what} done in {meta['build_seconds']:.1f} s ({meta['plan_bytes'] / (1 << 20):.1f} MiB)",
                progress)
            return meta

        for stage, stage_precision, facts in zip(stages, plan.precisions, plan.facts):
            k = stage["index"]
            plan_rel = f"{rel_dir}/stage{k}.plan"
            meta = cached_build(stage["onnx"], plan_rel, f"stage {k + 1}/{len(stages)}", stage_precision, batch,
                                plan.profiles, plan.dla_core, facts.input_shapes, facts.precision)
            meta["stage"] = k
            plans.append(plan_rel)
            metas.append(meta)
        if plan.dla_core is not None:
            _check_placement(metas, plan.dla_core, progress)
        fused, fused_why = _fused_engine(bundle, plan, lambda precision: cached_build(
            bundle.manifest["fused"]["onnx"], f"{rel_dir}/{FUSED_PLAN}", "fused cascade graph", precision, (1, 1, 1),
            "buckets", None, {}, None), progress)
        metadata = {
            "key": key,
            "device": device.name,
            "tensorrt": str(trt.__version__),
            "gpu": gpu,
            "batch": {"min": batch[0], "opt": batch[1], "max": batch[2], "profiles": plan.profiles},
            "workspace_mb": device.builder_workspace_mb,
            "dla_core": plan.dla_core,
            "build_seconds": round(time.perf_counter() - total_start, 3),
            "stages": metas,
            "fused": fused,
            "fused_refused": fused_why,
        }
        (out_dir / ENGINE_JSON).write_text(dumps(metadata) + "\n")
        entry = {
            "dir": rel_dir,
            "stages": plans,
            "metadata": f"{rel_dir}/{ENGINE_JSON}",
            "tensorrt": str(trt.__version__),
            "device": device.name,
            "precision": [m["precision"] for m in metas],
            "dla_core": plan.dla_core,
            "dla_stages": ([m["stage"] for m in metas if m["placement"]["dla"]]
                           if plan.dla_core is not None else []),
            "fused": None if fused is None else f"{rel_dir}/{FUSED_PLAN}",
        }
        built = {p.relative_to(scratch).as_posix(): p for p in sorted(out_dir.iterdir())}
        # a rebuild replaces the set for this device + version; other devices' sets are kept
        update_bundle(bundle, lambda current: Change(
            built, {"engines": {**(current.manifest.get("engines") or {}), key: entry}}, remove=(rel_dir,)))
    reused = sum(1 for m in metas if m.get("from_cache"))
    say(f"engines: {len(stages)} plan(s) in {bundle_path / rel_dir}"
        + (f" ({len(stages) - reused} built, {reused} from the cache)" if store is not None else ""), progress)
    return bundle_path / rel_dir
