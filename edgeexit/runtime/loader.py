"""Open a bundle on a backend: the one place that maps a backend name to its class."""

from __future__ import annotations

from edgeexit.bundle import Bundle
from edgeexit.errors import EdgeExitError
from edgeexit.runtime.backend import Backend
from edgeexit.spec import BACKENDS


def torch_stages(bundle: Bundle):
    """Rebuild the bundle's torch Stage modules from its model section and weights.pt."""
    from edgeexit.models import build_model, load_weights
    from edgeexit.spec import InputSpec, ModelSpec
    from edgeexit.staging import make_stages

    m = bundle.manifest["model"]
    inp = bundle.input
    model = build_model(
        ModelSpec(m.get("arch"), m.get("factory"), m.get("args", {})),
        InputSpec(inp["name"], tuple(inp["shape"][1:]), inp["dtype"], tuple(inp["mean"]), tuple(inp["std"]),
                  tuple(bundle.classes)),
        bundle.path,
    )
    load_weights(model, bundle.path / bundle.manifest["weights"])
    return make_stages(model.eval(), bundle.manifest["gating"]["confidence"])


def resolve_backend(bundle: Bundle, kind: str) -> str:
    """`auto` -> tensorrt where TensorRT imports and the bundle has engines, else onnxruntime."""
    if kind != "auto":
        return kind
    from edgeexit.export.tensorrt import trt_available

    return "tensorrt" if bundle.manifest.get("engines") and trt_available() else "onnxruntime"


def open_backend(bundle: Bundle, kind: str = "auto", device: str = "cpu", threads: int | None = None) -> Backend:
    """A backend running `bundle`'s stages: TensorRT engines (GPU), onnxruntime (CPU), or the
    torch reference on `device` (cpu, cuda, cuda:1)."""
    kind = resolve_backend(bundle, kind)
    if kind == "tensorrt":
        from edgeexit.runtime.tensorrt_backend import TensorRTBackend

        return TensorRTBackend.from_bundle(bundle)
    if kind == "onnxruntime":
        from edgeexit.runtime.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(bundle.stage_paths, bundle.stage_ios, threads)
    if kind == "torch":
        from edgeexit.runtime.torch_backend import TorchBackend

        return TorchBackend(torch_stages(bundle), bundle.stage_ios, device)
    raise EdgeExitError(f"backend: {kind!r} is not available here (choose from: {', '.join(BACKENDS)})")
