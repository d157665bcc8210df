"""Device profiles for deployment targets (Jetson modules and a CPU-only host).

One YAML file per target ships in ``edgeexit.device_profiles`` (the top-level ``devices/``
folder of the source tree). Extra profiles, in the same format, can be put in the directory
named by the ``EDGEEXIT_DEVICES`` environment variable; a file there named like a shipped one
replaces it. Every file is checked against the dataclasses below when it is loaded, so a typo
in a user profile fails with the file and key at fault instead of surfacing mid-export.

``check_target`` refuses a deployment that the chosen device cannot run well (a precision
without fast hardware support, DLA where there is none, a batch that does not fit in memory)
with a one-line ``SpecError`` that says what to change.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args, get_origin, get_type_hints

import yaml

from edgeexit.errors import EdgeExitError, SpecError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

# Environment variable naming a directory of extra (or overriding) device profiles.
DEVICES_ENV = "EDGEEXIT_DEVICES"

# Precisions the pipeline can export, fastest first (the order used in suggestions).
PRECISIONS = ("int8", "fp16", "fp32")

# DLA cores only run these precisions.
DLA_PRECISIONS = ("int8", "fp16")

# Share of a Jetson's memory that one model may plan to use. The memory is shared by the GPU,
# the CPU, the OS and the camera/video pipeline, and the CUDA context plus TensorRT's own
# allocations take a few hundred MiB on top of what we count, so only half is planned for.
USABLE_MEMORY_FRACTION = 0.5

_MIB = 1 << 20
_GIB = 1 << 30

# Trailing memory-size variant of a profile name ("jetson-orin-nx-16gb" -> family "jetson-orin-nx").
_VARIANT = re.compile(r"-\d+gb$")


@dataclass(frozen=True)
class GpuSpec:
    """The integrated GPU; every field is None on a target without an NVIDIA GPU."""

    architecture: str | None
    compute_capability: str | None
    cuda_cores: int | None
    tensor_cores: int | None


@dataclass(frozen=True)
class JetPackSpec:
    """Latest JetPack the module supports, with the TensorRT and CUDA versions it ships."""

    version: str | None
    tensorrt: str | None
    cuda: str | None


@dataclass(frozen=True)
class PowerMode:
    """One nvpmodel mode: ``id`` is the value for ``nvpmodel -m``; watts None means uncapped."""

    id: int
    name: str
    watts: float | None


@dataclass(frozen=True)
class PrecisionSupport:
    """Precisions with fast hardware support on the GPU (or CPU), and those the DLA runs."""

    fast: tuple[str, ...]
    dla: tuple[str, ...]


@dataclass(frozen=True)
class PeakRates:
    """Dense peak throughput and memory bandwidth, for rough latency estimates (None: unknown)."""

    fp32_tflops: float | None
    fp16_tflops: float | None
    int8_tops: float | None
    dla_int8_tops: float | None
    memory_bandwidth_gbs: float | None


@dataclass(frozen=True)
class DeviceProfile:
    """One deployment target, field for field as in its YAML file.

    ``memory_gb`` is the memory shared by CPU and GPU (None: not checked);
    ``builder_workspace_mb`` is the default TensorRT builder workspace limit (None: no TensorRT).
    """

    name: str
    description: str
    kind: str
    gpu: GpuSpec
    dla_cores: int
    memory_gb: float | None
    jetpack: JetPackSpec
    power_modes: tuple[PowerMode, ...]
    precisions: PrecisionSupport
    builder_workspace_mb: int | None
    peak: PeakRates


def list_devices() -> list[DeviceProfile]:
    """Load every known profile (shipped, then user overrides), sorted by name.

    Used by ``edgeexit devices`` and to suggest alternatives in error messages.
    """
    return [_load(path) for _, path in sorted(_profile_paths().items())]


def load_device(name: str) -> DeviceProfile:
    """Load the profile called ``name`` (``target.device`` in model.yaml).

    Raises SpecError naming the known devices when there is no such profile.
    """
    paths = _profile_paths()
    if name not in paths:
        raise SpecError(f"target.device: unknown device {name!r} (known: {', '.join(sorted(paths))})")
    return _load(paths[name])


def _family(name: str) -> tuple[str, ...]:
    """'jetson-orin-nano-8gb' -> ('orin', 'nano'): the module family a profile describes."""
    parts = name.split("-")[1:] if name.startswith("jetson-") else []
    return tuple(parts[:-1] if parts and re.fullmatch(r"\d+gb", parts[-1]) else parts)


def _mem_gb(root: Path) -> float | None:
    """MemTotal of ``root/proc/meminfo`` in GB (what the kernel sees: a little under the module's)."""
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / 1e9
    except (OSError, ValueError, IndexError):
        pass
    return None


def detect_device(root: str | Path | None = None) -> DeviceProfile:
    """The device profile of the Jetson this runs on (``--device auto``): the module family
    from the device-tree model ("NVIDIA Jetson Orin Nano Developer Kit" -> orin-nano, the
    longest family named there), the memory size from /proc/meminfo among that family's
    profiles. Refuses in one line when the board is not a Jetson edgeexit knows."""
    from edgeexit.jetson import _read, board_root

    base = Path(root) if root is not None else board_root()
    model = _read(base / "proc/device-tree/model")
    if not model:
        raise EdgeExitError(f"--device auto: {base / 'proc/device-tree/model'} is missing, so this is not a Jetson; "
                            "pass --device NAME (edgeexit devices)")
    words = tuple(re.findall(r"[a-z0-9]+", model.lower()))

    def named(family: tuple[str, ...]) -> bool:
        return bool(family) and any(words[i:i + len(family)] == family for i in range(len(words)))

    profiles = [p for p in list_devices() if p.kind == "jetson" and named(_family(p.name))]
    if not profiles:
        raise EdgeExitError(f"--device auto: no device profile matches the module {model!r}; pass --device NAME "
                            f"or add a profile ({DEVICES_ENV})")
    longest = max(len(_family(p.name)) for p in profiles)
    profiles = [p for p in profiles if len(_family(p.name)) == longest]
    if len(profiles) == 1:
        return profiles[0]
    mem = _mem_gb(base)
    sized = [p for p in profiles if p.memory_gb is not None]
    if mem is None or not sized:
        raise EdgeExitError(f"--device auto: {model!r} may be {', '.join(p.name for p in profiles)} and the memory "
                            "size could not be read; pass --device NAME")
    return min(sized, key=lambda p: abs(p.memory_gb - mem))


def check_target(
    profile: DeviceProfile,
    *,
    precisions: list[str],
    use_dla: bool,
    batch_max: int,
    bytes_per_sample: int,
    weight_bytes: int,
) -> None:
    """Refuse an export the device cannot run well, before any time is spent building it.

    Checks that each requested precision has fast hardware support, that DLA is only asked
    of a device with DLA cores and with a precision DLA runs, and that weights, the largest
    batch of activations (``batch_max * bytes_per_sample``) and the TensorRT builder workspace
    fit in the usable share of the device's memory (see USABLE_MEMORY_FRACTION; skipped where
    ``memory_gb`` is None). Raises SpecError with one line saying what to change.
    """
    _check_precisions(profile, precisions)
    if use_dla:
        _check_dla(profile, precisions)
    if profile.memory_gb is not None:
        _check_memory(profile, batch_max, bytes_per_sample, weight_bytes)


def format_table(profiles: list[DeviceProfile]) -> str:
    """Render profiles as an aligned text table for ``edgeexit devices``."""
    header = ("name", "GPU arch", "SM", "CUDA cores", "tensor cores", "DLA", "memory",
              "JetPack", "TensorRT", "fast precisions")
    rows = [header] + [
        (
            p.name,
            _cell(p.gpu.architecture),
            _cell(p.gpu.compute_capability),
            _cell(p.gpu.cuda_cores),
            _cell(p.gpu.tensor_cores),
            str(p.dla_cores),
            "-" if p.memory_gb is None else f"{p.memory_gb:g} GB",
            _cell(p.jetpack.version),
            _cell(p.jetpack.tensorrt),
            ", ".join(p.precisions.fast),
        )
        for p in profiles
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def profile_to_dict(profile: DeviceProfile) -> dict[str, Any]:
    """Turn a profile back into plain dicts and lists (the YAML's shape) for ``--json`` output."""
    return _plain(dataclasses.asdict(profile))


# --- loading -----------------------------------------------------------------------------


def _profile_paths() -> dict[str, Traversable]:
    """Map each profile name to its file: shipped profiles, overridden by EDGEEXIT_DEVICES."""
    paths: dict[str, Traversable] = {
        f.name[: -len(".yaml")]: f
        for f in files("edgeexit.device_profiles").iterdir()
        if f.name.endswith(".yaml")
    }
    user_dir = os.environ.get(DEVICES_ENV)
    if user_dir:
        directory = Path(user_dir)
        if not directory.is_dir():
            raise EdgeExitError(f"{DEVICES_ENV}: {user_dir!r} is not a directory")
        paths.update({f.stem: f for f in directory.glob("*.yaml")})
    return paths


def _load(path: Traversable) -> DeviceProfile:
    """Read and validate one profile file; every problem names the file and the key."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise EdgeExitError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    profile = _convert(data, DeviceProfile, str(path), "")
    _check_profile(profile, str(path), path.name[: -len(".yaml")])
    return profile


def _convert(value: Any, hint: Any, source: str, where: str) -> Any:
    """Check ``value`` against the type ``hint`` and build it (mappings -> dataclasses, lists -> tuples)."""
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise EdgeExitError(f"{source}: {where or 'top level'}: expected a mapping")
        names = [f.name for f in dataclasses.fields(hint)]
        for key in value:
            if key not in names:
                raise EdgeExitError(
                    f"{source}: {_join(where, key)}: unknown key (known: {', '.join(names)})")
        for name in names:
            if name not in value:
                raise EdgeExitError(f"{source}: {_join(where, name)}: missing key")
        hints = get_type_hints(hint)
        return hint(**{n: _convert(value[n], hints[n], source, _join(where, n)) for n in names})
    if get_origin(hint) is tuple:
        if not isinstance(value, list):
            raise EdgeExitError(f"{source}: {where}: expected a list")
        item = get_args(hint)[0]
        return tuple(_convert(v, item, source, f"{where}[{i}]") for i, v in enumerate(value))
    allowed = get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    accepted = tuple(t for t in allowed if t is not type(None)) + ((int,) if float in allowed else ())
    if isinstance(value, bool) or not isinstance(value, accepted):
        expected = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise EdgeExitError(f"{source}: {where}: expected {expected}, got {type(value).__name__}")
    return value


def _check_profile(profile: DeviceProfile, source: str, stem: str) -> None:
    """Checks the types alone cannot express: name matches the file, known kinds and precisions."""
    if profile.name != stem:
        raise EdgeExitError(f"{source}: name: {profile.name!r} must match the file name {stem!r}")
    if profile.kind not in ("jetson", "host"):
        raise EdgeExitError(f"{source}: kind: expected jetson or host, got {profile.kind!r}")
    for key, listed, allowed in (("precisions.fast", profile.precisions.fast, PRECISIONS),
                                 ("precisions.dla", profile.precisions.dla, DLA_PRECISIONS)):
        for p in listed:
            if p not in allowed:
                raise EdgeExitError(f"{source}: {key}: {p!r} is not one of {', '.join(allowed)}")
    if (profile.dla_cores > 0) != bool(profile.precisions.dla):
        raise EdgeExitError(
            f"{source}: precisions.dla: must list fp16/int8 exactly when dla_cores > 0")


# --- target checks -----------------------------------------------------------------------


def _check_precisions(profile: DeviceProfile, precisions: list[str]) -> None:
    """Every requested precision must be known and fast on this device."""
    if not precisions:
        raise SpecError(f"export.precision: no precision given (use one of {', '.join(PRECISIONS)})")
    for p in precisions:
        if p not in PRECISIONS:
            raise SpecError(f"export.precision: unknown precision {p!r} (known: {', '.join(PRECISIONS)})")
        if p not in profile.precisions.fast:
            why = profile.gpu.architecture or f"onnxruntime on CPU has no fast {p}"
            instead = " or ".join(q for q in PRECISIONS if q in profile.precisions.fast)
            raise SpecError(
                f"export.precision: {p} has no fast hardware support on {profile.name} ({why}); "
                f"use {instead}")


def _check_dla(profile: DeviceProfile, precisions: list[str]) -> None:
    """DLA needs DLA cores and at least one precision that DLA runs."""
    if profile.dla_cores == 0:
        known = list_devices()
        with_dla = _name_patterns([p.name for p in known if p.dla_cores > 0], [p.name for p in known])
        raise SpecError(
            f"target.dla: {profile.name} has no DLA cores; remove target.dla or pick a device "
            f"with DLA ({', '.join(with_dla)})")
    if not any(p in profile.precisions.dla for p in precisions):
        raise SpecError(
            f"target.dla: DLA runs {' or '.join(profile.precisions.dla)} only and export.precision "
            f"asks for {', '.join(precisions)}; add fp16 or int8 to export.precision or remove target.dla")


def _check_memory(profile: DeviceProfile, batch_max: int, bytes_per_sample: int,
                  weight_bytes: int) -> None:
    """Weights + builder workspace + batch_max samples of activations must fit in usable memory."""
    usable = int(profile.memory_gb * _GIB * USABLE_MEMORY_FRACTION)
    workspace = (profile.builder_workspace_mb or 0) * _MIB
    fixed = weight_bytes + workspace
    if fixed + batch_max * bytes_per_sample <= usable:
        return
    of_memory = f"usable ~{_mib(usable)} MiB of {profile.memory_gb:g} GB shared memory"
    room = usable - fixed
    fits = room // bytes_per_sample if bytes_per_sample and room > 0 else 0
    if fits == 0:
        raise SpecError(
            f"target.device: ~{_mib(weight_bytes)} MiB of weights, the ~{_mib(workspace)} MiB builder "
            f"workspace and one sample (~{_mib(bytes_per_sample)} MiB) do not fit on {profile.name} "
            f"({of_memory}); use a lower precision, a smaller model or a device with more memory")
    raise SpecError(
        f"export.batch.max: {batch_max} needs ~{_mib(batch_max * bytes_per_sample)} MiB of "
        f"activations on {profile.name} ({of_memory}, ~{_mib(fixed)} MiB of it for weights and "
        f"builder workspace); lower export.batch.max to <= {fits}")


# --- small helpers -----------------------------------------------------------------------


def _name_patterns(names: list[str], all_names: list[str]) -> list[str]:
    """Shorten names to ``family-*`` where every memory variant of that family is in ``names``."""
    out: list[str] = []
    for name in sorted(names):
        family = _VARIANT.sub("", name)
        variants = [n for n in all_names if _VARIANT.sub("", n) == family]
        if family == name or len(variants) < 2 or not set(variants) <= set(names):
            out.append(name)
        elif f"{family}-*" not in out:
            out.append(f"{family}-*")
    return out


def _join(where: str, key: str) -> str:
    """Dotted key path, e.g. ``gpu.cuda_cores``."""
    return f"{where}.{key}" if where else key


def _cell(value: object) -> str:
    """Table cell text; None (not applicable) shows as a dash."""
    return "-" if value is None else str(value)


def _mib(n: int) -> int:
    """Bytes to whole MiB, rounded."""
    return round(n / _MIB)


def _plain(value: Any) -> Any:
    """Tuples (how profiles hold lists) back to lists, recursively, for JSON/YAML output."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
