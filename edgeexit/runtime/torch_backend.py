"""torch backend: the reference, on the CPU or a CUDA device; tensors stay on that device."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from edgeexit.runtime.backend import Backend
from edgeexit.stage_io import StageIO


class TorchBackend(Backend):
    """Runs the torch Stage modules themselves (eval mode, inference mode)."""

    name = "torch"

    def __init__(self, stages: Sequence[nn.Module], ios: Sequence[StageIO], device: str = "cpu"):
        self.device = torch.device(device)
        self.stages = [s.to(self.device).eval() for s in stages]
        self.ios = list(ios)
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None

    def upload(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def run(self, stage: int, feeds: dict[str, Any]) -> dict[str, Any]:
        io = self.ios[stage]
        with torch.inference_mode():
            out = self.stages[stage](*(feeds[n] for n in io.inputs))
        return dict(zip(io.outputs, out))

    def take(self, value: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        return value.index_select(0, torch.from_numpy(rows).to(self.device))

    def download(self, value: torch.Tensor) -> np.ndarray:
        return value.detach().cpu().numpy()
