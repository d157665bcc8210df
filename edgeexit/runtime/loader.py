"""Open a bundle on a backend (the one place that maps a backend name to its class) and read its exit policy."""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from calibration.policy import ExitPolicy
from edgeexit.bundle import Bundle
from edgeexit.errors import EdgeExitError
from edgeexit.runtime.backend import Backend
from edgeexit.runtime.cascade import Cascade
from edgeexit.spec import BACKBONE_LIBRARIES, BACKENDS


TRUST_CODE_HINT = ("the torch backend would import and run model.factory {factory!r}, Python code named by the "
                   "bundle: pass --trust-code if you trust it (its module must be installed here; a bundle's "
                   "own files are never imported), or use --backend onnxruntime")


def torch_model(bundle: Bundle, trust_code: bool = False):
    """Rebuild the bundle's torch model (eval mode) from its model section and weights.pt.

    A zoo architecture is built from edgeexit's own code; a `factory` is the bundle naming
    Python code to run, so it is imported only when `trust_code` says the user trusts it,
    only from an installed module, never from the bundle."""
    from edgeexit.models import build_model, load_weights
    from edgeexit.spec import InputSpec, ModelSpec

    m = bundle.manifest.get("model")
    if not isinstance(m, dict) or sum(m.get(k) is not None for k in ("arch", "factory", "backbone")) != 1:
        raise EdgeExitError("bundle: manifest field model names none (or several) of a zoo arch, a factory and a "
                            "backbone; the torch backend cannot rebuild it")
    backbone = str(m.get("backbone") or "")
    code = m.get("factory") or (backbone if backbone and backbone.split(":")[0] not in BACKBONE_LIBRARIES else None)
    if code is not None and not trust_code:  # torchvision's and timm's models are libraries, not the bundle's code
        raise EdgeExitError(TRUST_CODE_HINT.format(factory=code))
    if m.get("arch") is not None:
        from edgeexit.models import ARCHITECTURES

        if m["arch"] not in ARCHITECTURES:
            raise EdgeExitError(f"bundle: model.arch {m['arch']!r} is not in this edgeexit's zoo")
    if not isinstance(m.get("args", {}), dict) or not bundle.manifest.get("weights"):
        raise EdgeExitError("bundle: the torch backend needs model.args (an object) and weights in the manifest")
    if not bundle.has_weights:
        raise EdgeExitError(f"bundle: {bundle.manifest['weights']} is not in this bundle (a deployed bundle may leave "
                            "it out); the torch backend needs it: use --backend onnxruntime or tensorrt")
    inp = bundle.input
    model = build_model(
        ModelSpec(m.get("arch"), m.get("factory"), m.get("args", {}), m.get("backbone"),
                  tuple(m.get("exits_after") or ()), dict(m.get("exit_head") or {})),
        InputSpec(inp["name"], tuple(inp["shape"][1:]), inp["dtype"], tuple(inp["mean"]), tuple(inp["std"]),
                  tuple(bundle.classes)),
        None, refuse_under=bundle.path,
    )
    load_weights(model, bundle.path / bundle.manifest["weights"], bundle.read(bundle.manifest["weights"]))
    return model.eval()


def torch_stages(bundle: Bundle, trust_code: bool = False):
    """The bundle's torch Stage modules (the reference the exported graphs were checked against)."""
    from edgeexit.staging import make_stages

    return make_stages(torch_model(bundle, trust_code), bundle.manifest["gating"]["confidence"])


_TORCH_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_device(kind: str, device: str | None) -> str | None:
    """`device` when the backend `kind` can use it here; one line naming the problem when not
    (a typo, a CUDA device on a CPU build of torch, --device for a backend that has none, a
    torch backend where torch is not installed)."""
    if kind in ("torch", "torch-cuda"):
        try:
            import torch  # noqa: F401
        except ImportError:
            raise EdgeExitError(f"--backend {kind}: torch is not installed here (the runtime install runs "
                                "onnxruntime and tensorrt); for the torch reference: pip install 'edgeexit[build]'") from None
    if device is None:
        return None
    if not _TORCH_DEVICE.match(device):
        raise EdgeExitError(f"--device: {device!r} is not a torch device (cpu, cuda or cuda:N)")
    if kind not in ("torch", "torch-cuda"):
        if device != "cpu":
            raise EdgeExitError(f"--device {device}: only --backend torch and torch-cuda take a device "
                                f"(this is {kind})")
        return device
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            build = " (a CPU build)" if torch.version.cuda is None else ""
            raise EdgeExitError(f"--device {device}: this torch {torch.__version__}{build} sees no CUDA GPU; "
                                "use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise EdgeExitError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def bundle_policy(bundle: Bundle) -> ExitPolicy | None:
    """The exit policy in the manifest's `gating.policy` (written by `edgeexit calibrate
    --solver policy`), or None: the bundle gates on its thresholds."""
    data = bundle.manifest["gating"].get("policy")
    return None if data is None else ExitPolicy.from_dict(data)


def resolve_backend(bundle: Bundle, kind: str) -> str:
    """`auto` -> tensorrt where TensorRT imports and the bundle has engines, else onnxruntime."""
    if kind != "auto":
        return kind
    from edgeexit.export.tensorrt import trt_available

    return "tensorrt" if bundle.manifest.get("engines") and trt_available() else "onnxruntime"


def max_batch(bundle: Bundle) -> int:
    """The largest batch the bundle was exported for (export.batch.max)."""
    return int(((bundle.manifest.get("export") or {}).get("batch") or {}).get("max", 64))


def open_backend(bundle: Bundle, kind: str = "auto", device: str | None = None, threads: int | None = None,
                 trust_code: bool = False) -> Backend:
    """A backend running `bundle`'s stages: TensorRT engines (GPU), onnxruntime (CPU), the
    torch reference on `device` (cpu by default, cuda, cuda:1), or torch-cuda (static buffers
    per batch bucket and CUDA graphs on `device`: cuda by default; cpu runs the same buffers
    without graphs, a dry run of the GPU path). `trust_code`: see `torch_model`."""
    kind = resolve_backend(bundle, kind)
    device = check_device(kind, device)
    if kind == "tensorrt":
        from edgeexit.runtime.tensorrt_backend import TensorRTBackend

        return TensorRTBackend.from_bundle(bundle)
    if kind == "onnxruntime":
        from edgeexit.runtime.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend([bundle.read(p) for p in bundle.stage_paths], bundle.stage_ios, threads)
    if kind == "torch":
        from edgeexit.runtime.torch_backend import TorchBackend

        return TorchBackend(torch_stages(bundle, trust_code), bundle.stage_ios, device or "cpu")
    if kind == "torch-cuda":
        return _torch_cuda(bundle, torch_stages(bundle, trust_code), bundle.stage_ios, device)
    raise EdgeExitError(f"backend: {kind!r} is not available here (choose from: {', '.join(BACKENDS)})")


def opened(backend: Backend | None) -> AbstractContextManager:
    """`backend` as a context manager that closes it (nothing to close for None)."""
    return nullcontext() if backend is None else backend


def open_monolithic(bundle: Bundle, kind: str = "auto", device: str | None = None,
                    threads: int | None = None, trust_code: bool = False) -> Backend | None:
    """The monolithic baseline as a one-stage backend on the same kind of backend, or None
    where the bundle has no such graph for it (TensorRT engines are built per stage only)."""
    kind = resolve_backend(bundle, kind)
    device = check_device(kind, device)
    if kind == "onnxruntime":
        from edgeexit.runtime.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend([bundle.read(bundle.monolithic_path)], [bundle.monolithic_io], threads)
    if kind in ("torch", "torch-cuda"):
        from edgeexit.staging import Monolithic

        model = Monolithic(torch_model(bundle, trust_code), bundle.manifest["gating"]["confidence"])
        if kind == "torch-cuda":
            return _torch_cuda(bundle, [model], [bundle.monolithic_io], device)
        from edgeexit.runtime.torch_backend import TorchBackend

        return TorchBackend([model], [bundle.monolithic_io], device or "cpu")
    return None


def _torch_cuda(bundle: Bundle, modules, ios, device: str | None) -> Backend:
    """The torch-cuda backend over `modules` at the bundle's max batch and input shape."""
    from edgeexit.runtime.torch_cuda_backend import TorchCudaBackend

    return TorchCudaBackend(modules, ios, device or "cuda", max_batch(bundle), input_shape=bundle.input["shape"][1:])


def open_cascade(bundle: Bundle, backend: Backend, thresholds, policy: ExitPolicy | None = None,
                 deadline: float | None = None, predict=None, batch: int = 1) -> tuple[Any, str | None]:
    """The gated cascade `run` uses for calls of `batch` inputs: at batch 1, gated by thresholds
    with no deadline, the bundle's fused cascade graph (on onnxruntime where its build found that
    it agrees with the stages and pays; on TensorRT its fused plan wherever `edgeexit engines`
    built one and the graph agrees: one enqueue and one wait instead of one per stage); else the
    staged loop on `backend`. With one line saying why not, when the bundle has a fused graph."""
    staged = Cascade(backend, bundle.stage_ios, thresholds, policy, deadline, predict)
    fused = bundle.manifest.get("fused")
    if fused is None or batch != 1:
        return staged, None
    plan = None
    if deadline is not None:
        why = "--deadline-ms: a graph cannot stop between its stages on a clock"
    elif policy is not None:
        why = "the bundle gates on an exit policy, not on thresholds"
    elif backend.name == "tensorrt":
        from edgeexit.runtime.tensorrt_backend import select_engines

        plan = select_engines(bundle)[1].get("fused")
        agrees = all(not c["exit_differs"] and not c["pred_differs"] for c in fused["agreement"].values())
        why = (None if agrees and plan else "its build found it " + fused["why"] if not agrees
               else "`edgeexit engines` built no fused plan for this engine set")
    elif backend.name == "onnxruntime":
        why = None if fused["use_at_batch_1"] else "its build found it " + fused["why"]
    else:
        why = f"the {backend.name} backend runs the stage graphs"
    if why:
        return staged, f"fused cascade graph not used ({why}): the staged loop runs"
    k = len(bundle.stage_ios)
    if plan:
        from edgeexit.runtime.tensorrt_backend import FusedTensorRT

        return FusedTensorRT(bundle.path / plan, bundle.input["name"], thresholds, k, read=bundle.read), None
    from edgeexit.runtime.fused import FusedCascade

    return FusedCascade(bundle.read(bundle.fused_path), bundle.input["name"], thresholds, k), None
