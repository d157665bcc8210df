"""`edgeexit doctor`: what this machine has for running bundles on TensorRT, and what to fix.

Like ``jetson_release`` (jetson-stats) or ``trtexec --version`` plus ``nvidia-smi``, but it
also knows what edgeexit needs: JetPack's system TensorRT visible in the venv, a cuda-python
whose major version matches the CUDA driver, pycuda built against the device's CUDA, nvcc for
the gather kernel, and Python 3.10+. ``gather`` collects the facts (each None when it cannot be
read), ``advice`` turns them into one actionable line per problem and ``format_report`` prints
both. Standard library only: torch is never imported, TensorRT and CUDA only if installed.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edgeexit.jetson import _read, _run, board_root

# L4T release -> JetPack (NVIDIA's JetPack archive); anything else is "unknown to edgeexit".
JETPACK = {
    "35.1.0": "5.0.2", "35.2.1": "5.1", "35.3.1": "5.1.1", "35.4.1": "5.1.2", "35.5.0": "5.1.3",
    "35.6.0": "5.1.4", "35.6.1": "5.1.5", "36.3.0": "6.0", "36.4.0": "6.1", "36.4.3": "6.2",
    "36.4.4": "6.2.1", "38.2.0": "7.0",
}
JETPACK_CUDA_MAJOR = {"5": 11, "6": 12, "7": 13}  # CUDA 11.4, 12.2 / 12.6, 13.0
MIN_PYTHON = (3, 10)
MIN_TENSORRT = (8, 5)
_L4T = re.compile(r"^# R(\d+) \(release\), REVISION: (\d+)(?:\.(\d+))?")
_NVCC = re.compile(r"release (\d+\.\d+)")
_FAILED = (OSError, subprocess.SubprocessError, ValueError)


def _version_tuple(text: str | None) -> tuple[int, ...]:
    """'10.3.0.26' -> (10, 3, 0, 26), '13.0.1rc1' -> (13, 0, 1); () for None or no number."""
    match = re.match(r"\d+(?:\.\d+)*", str(text or ""))
    return tuple(int(part) for part in match[0].split(".")) if match else ()


def _ok(err: Any) -> bool:
    """Whether a cuda-python cudaError_t is cudaSuccess (an enum or a plain int)."""
    return getattr(err, "value", err) == 0 or getattr(err, "name", "") == "cudaSuccess"


def _try_import(import_module: Callable[[str], Any], name: str) -> Any:
    """The module, or None when it is missing or its native libraries fail to load."""
    try:
        return import_module(name)
    except Exception:  # noqa: BLE001 - ImportError, OSError (libnvinfer.so missing), whatever a binding raises
        return None


def _dist(dist_version: Callable[[str], str], *names: str) -> str | None:
    """The installed version of the first of ``names`` that pip knows, else None."""
    for name in names:
        try:
            return dist_version(name)
        except Exception:  # noqa: BLE001, S110 - PackageNotFoundError, or metadata that does not parse
            pass
    return None


def _tensorrt_source(path: str, prefix: str, base_prefix: str) -> str:
    """'system' (apt's /usr/lib/python3*/dist-packages), 'venv' (a wheel in this venv) or 'pip'."""
    real = os.path.realpath(path)
    if prefix != base_prefix and real.startswith(os.path.realpath(prefix) + os.sep):
        return "venv"
    if re.match(r"^/usr/lib/python3[^/]*/dist-packages/", real):
        return "system"
    return "pip"


def _cuda(import_module: Callable[[str], Any]) -> dict[str, Any]:
    """CUDA driver and runtime versions and GPU 0's name and compute capability via cuda-python."""
    out: dict[str, Any] = {"cuda_driver": None, "cuda_runtime": None, "gpu": None}
    rt = _try_import(import_module, "cuda.bindings.runtime") or _try_import(import_module, "cuda.cudart")
    if rt is None:
        return out
    for key, call in (("cuda_driver", "cudaDriverGetVersion"), ("cuda_runtime", "cudaRuntimeGetVersion")):
        try:
            err, value = getattr(rt, call)()  # (cudaError_t, 12060): 12060 is CUDA 12.6, 0 is no driver
            if _ok(err) and int(value) > 0:
                out[key] = f"{int(value) // 1000}.{int(value) % 1000 // 10}"
        except Exception:  # noqa: BLE001, S110 - an old binding without the call, no driver: unknown
            pass
    try:
        err, prop = rt.cudaGetDeviceProperties(0)
        if _ok(err):
            name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
            out["gpu"] = {"name": name.replace("\x00", "").strip(), "compute_capability": f"{prop.major}.{prop.minor}"}
    except Exception:  # noqa: BLE001, S110 - no device, no driver: unknown
        pass
    return out


def _nvidia_smi_gpu(run: Callable[[Sequence[str]], str]) -> dict[str, Any] | None:
    """GPU 0 from ``nvidia-smi`` where cuda-python could not tell (desktop hosts without it)."""
    try:
        line = run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"]).splitlines()[0]
    except (*_FAILED, IndexError):
        return None
    name, _, cc = (part.strip() for part in line.partition(","))
    return {"name": name, "compute_capability": cc or None} if name else None


def l4t_release(root: Path) -> str | None:
    """The full L4T release of the tree at `root` ("36.4.3", from etc/nv_tegra_release), or None."""
    release = _read(root / "etc/nv_tegra_release")
    match = _L4T.match(release) if release else None
    return f"{match[1]}.{match[2]}.{match[3] or 0}" if match else None


def gather(root: str | os.PathLike[str] | None = None, run: Callable[[Sequence[str]], str] = _run,
           env: Mapping[str, str] = os.environ, *, import_module: Callable[[str], Any] = importlib.import_module,
           dist_version: Callable[[str], str] = importlib.metadata.version, prefix: str = sys.prefix,
           base_prefix: str = sys.base_prefix) -> dict[str, Any]:
    """What this machine offers edgeexit's runtime; every value is None where it cannot be read.

    Board facts come from files under ``root`` (``etc/nv_tegra_release``, ``proc/device-tree``),
    commands (``nvcc --version``, ``nvidia-smi``) go through ``run`` (argv -> stdout, raising
    OSError or CalledProcessError), PATH comes from ``env``, modules come from ``import_module``
    and pip versions from ``dist_version``; ``prefix``/``base_prefix`` locate the venv. All of
    these are parameters so that tests can describe any Jetson or host without having one.
    """
    base = Path(root) if root is not None else board_root()
    l4t = l4t_release(base)
    module = _read(base / "proc/device-tree/model")
    try:
        raw = (base / "proc/device-tree/compatible").read_bytes().decode(errors="replace")
        compatible = [part for part in raw.split("\x00") if part.strip()] or None
    except OSError:
        compatible = None
    jetson = bool(l4t or (module and "Jetson" in module) or any("tegra" in c for c in compatible or ()))

    cfg = _read(Path(prefix) / "pyvenv.cfg")
    in_venv = prefix != base_prefix or cfg is not None
    system_site = None
    if cfg is not None:
        found = re.search(r"^\s*include-system-site-packages\s*=\s*(\w+)", cfg, re.MULTILINE)
        system_site = found[1].lower() == "true" if found else None

    trt = _try_import(import_module, "tensorrt")
    trt_path = getattr(trt, "__file__", None) if trt is not None else None

    nvcc_on_path = shutil.which("nvcc", path=env.get("PATH", ""))
    fallback = base / "usr/local/cuda/bin/nvcc"
    nvcc_path = nvcc_on_path or (str(fallback) if fallback.is_file() else None)
    nvcc = None
    if nvcc_path:
        try:
            found = _NVCC.search(run([nvcc_path, "--version"]))
            nvcc = found[1] if found else None
        except _FAILED:
            pass

    ort = _try_import(import_module, "onnxruntime")
    try:
        providers = list(ort.get_available_providers()) if ort is not None else None
    except Exception:  # noqa: BLE001 - a broken onnxruntime install: providers unknown
        providers = None

    cuda = _cuda(import_module)
    return {
        "jetson": jetson, "module": module, "compatible": compatible,
        "l4t": l4t, "jetpack": JETPACK.get(l4t) if l4t else None,
        "python": "{}.{}.{}".format(*sys.version_info[:3]),
        "in_venv": in_venv, "venv_system_site_packages": system_site,
        "tensorrt": (str(getattr(trt, "__version__", "")) or None) if trt is not None else None,
        "tensorrt_path": trt_path,
        "tensorrt_source": _tensorrt_source(trt_path, prefix, base_prefix) if trt_path else None,
        "cuda_driver": cuda["cuda_driver"], "cuda_runtime": cuda["cuda_runtime"],
        "cuda_python": _dist(dist_version, "cuda-python", "cuda-bindings"),
        "pycuda": _dist(dist_version, "pycuda"),
        "pycuda_driver": _try_import(import_module, "pycuda.driver") is not None,
        "nvcc": nvcc, "nvcc_path": nvcc_path, "nvcc_on_path": bool(nvcc_on_path),
        "onnxruntime": (getattr(ort, "__version__", None) or _dist(dist_version, "onnxruntime")) if ort else None,
        "onnxruntime_providers": providers,
        "gpu": cuda["gpu"] or _nvidia_smi_gpu(run),
    }


def advice(facts: Mapping[str, Any]) -> list[str]:
    """One line per problem found in ``gather``'s facts, each saying what to run; [] if all is well.

    The lines follow docs/JETSON.md: JetPack's system TensorRT in a --system-site-packages venv,
    cuda-python matching the driver's CUDA major, pycuda built with nvcc on PATH, Python 3.10+.
    """
    lines: list[str] = []
    jetson, gpu = bool(facts.get("jetson")), facts.get("gpu") is not None
    python = _version_tuple(facts.get("python"))
    if python and python < MIN_PYTHON:
        lines.append(f"python: {facts['python']}; edgeexit needs Python 3.10+ (JetPack 5 ships 3.8: use JetPack 6, "
                     "or on JetPack 5 a Python 3.10 venv running bundles on onnxruntime only)")
    if not jetson and not gpu:
        lines.append("this host runs bundles on onnxruntime; build engines on the Jetson")
    trt = facts.get("tensorrt")
    if trt is None and jetson:
        line = ("tensorrt: not importable; JetPack installs it system-wide (apt: python3-libnvinfer); "
                "make it visible in a venv with `python3 -m venv --system-site-packages`")
        if facts.get("in_venv") and facts.get("venv_system_site_packages") is False:
            line += " (this venv was made without it)"
        lines.append(line)
    elif trt is None and gpu:
        lines.append("tensorrt: not importable; run bundles with --backend torch-cuda or onnxruntime, "
                     "or install TensorRT for this GPU to build engines here")
    if trt is not None and jetson and facts.get("tensorrt_source") != "system":
        lines.append(f"tensorrt: {trt} comes from a pip wheel ({facts.get('tensorrt_path')}), which may shadow "
                     "JetPack's system TensorRT: `pip uninstall tensorrt` and keep the venv's --system-site-packages")
    if trt is not None and _version_tuple(trt) < MIN_TENSORRT:
        lines.append(f"tensorrt: {trt} is older than 8.5, the oldest edgeexit builds engines with; "
                     "JetPack 4: run bundles on onnxruntime")
    if jetson or trt is not None:
        lines += _stack_advice(facts)
    if facts.get("onnxruntime") is None:
        lines.append("onnxruntime: not importable; it is part of the base install: pip install onnxruntime")
    return lines


def _stack_advice(facts: Mapping[str, Any]) -> list[str]:
    """cuda-python, pycuda and nvcc lines: what the TensorRT backend needs beside TensorRT."""
    lines: list[str] = []
    major = (_version_tuple(facts.get("cuda_driver")) or (None,))[0]
    if major is None and facts.get("jetpack"):  # no driver reading: JetPack's own CUDA
        major = JETPACK_CUDA_MAJOR.get(str(facts["jetpack"]).split(".")[0])
    pin = f"pip install 'cuda-python>={major or 12},<{(major or 12) + 1}'"
    cuda_python = facts.get("cuda_python")
    if cuda_python is None:
        lines.append(f"cuda-python: not installed; CUDA graphs are off (every stage runs plainly): {pin}")
    elif major and _version_tuple(cuda_python)[:1] != (major,):
        lines.append(f"cuda-python: {cuda_python} does not match the CUDA {major} driver: {pin}")
    if facts.get("pycuda") is None and not facts.get("pycuda_driver"):
        lines.append("pycuda: not installed; the TensorRT backend needs it: "
                     "export PATH=/usr/local/cuda/bin:$PATH && pip install pycuda (it builds with nvcc)")
    elif not facts.get("pycuda_driver"):
        lines.append(f"pycuda: {facts.get('pycuda')} is installed but `import pycuda.driver` fails; rebuild it "
                     "against this CUDA: export PATH=/usr/local/cuda/bin:$PATH && "
                     "pip install --force-reinstall --no-cache-dir pycuda")
    if facts.get("nvcc_path") is None:
        lines.append("nvcc: not found; the gather kernel falls back to memcpy per run of rows and pycuda cannot "
                     "build: install CUDA's nvcc (apt: nvidia-jetpack or cuda-nvcc) and "
                     "export PATH=/usr/local/cuda/bin:$PATH")
    elif not facts.get("nvcc_on_path"):
        lines.append(f"nvcc: {facts['nvcc_path']} is not on PATH (pycuda's build and the gather kernel need it): "
                     "export PATH=/usr/local/cuda/bin:$PATH")
    return lines


def _show(key: str, value: Any, facts: Mapping[str, Any]) -> str:
    """One fact as text a user reads: never Python's None, True or a list repr."""
    if key == "jetpack" and value is None and facts.get("l4t"):
        return f"L4T {facts['l4t']} (JetPack unknown to edgeexit)"
    if key == "tensorrt" and value is not None:
        return f"{value} ({facts.get('tensorrt_source') or '?'}: {facts.get('tensorrt_path') or '-'})"
    if key == "nvcc" and facts.get("nvcc_path"):
        on_path = "" if facts.get("nvcc_on_path") else ", not on PATH"
        return f"{value or 'version unknown'} ({facts['nvcc_path']}{on_path})"
    if key == "pycuda" and (value is not None or facts.get("pycuda_driver")):
        return f"{value or 'version unknown'} (import pycuda.driver: {'ok' if facts.get('pycuda_driver') else 'fails'})"
    if key == "gpu" and value:
        return f"{value.get('name')}, compute capability {value.get('compute_capability') or '-'}"
    if value is None:
        return "-" if key in ("module", "compatible", "l4t", "jetpack", "venv_system_site_packages") else "not found"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "-"
    return str(value)


_SHOWN = ("jetson", "module", "compatible", "l4t", "jetpack", "python", "in_venv", "venv_system_site_packages",
          "tensorrt", "cuda_driver", "cuda_runtime", "cuda_python", "pycuda", "nvcc", "onnxruntime",
          "onnxruntime_providers", "gpu")


def format_report(facts: Mapping[str, Any], advice_lines: Sequence[str]) -> str:
    """The facts as aligned ``key: value`` lines, then each advice line as ``- ...`` (or 'all good').

    Keys folded into another line (tensorrt_path/source, nvcc_path/on_path, pycuda_driver) are
    not repeated; values that could not be read print as '-' or 'not found', never as None.
    """
    keys = [key for key in _SHOWN if key in facts]
    width = max((len(key) for key in keys), default=0) + 1
    lines = [f"{key + ':':<{width}} {_show(key, facts[key], facts)}" for key in keys]
    lines.append("")
    lines += [f"- {line}" for line in advice_lines] or ["all good: nothing to fix"]
    return "\n".join(lines)
