"""The cascade decided on the GPU: every stage and every exit decision of a batch in one CUDA
graph, the host told the outcome once, at the end of the call.

The staged loop (`Cascade` over `TorchCudaBackend`) waits for the device after every stage:
the host reads `conf` and `pred`, decides, and uploads the rows to keep. On a GPU that is one
round trip per stage, and on small models the round trips cost more than the stages (see
docs/BENCHMARKS.md). Here, per batch bucket, the whole cascade is captured once:

- every stage runs on every row of the bucket (no compaction: the sizes would have to be known
  on the host to launch smaller kernels, which is the wait this removes);
- the exit of each row is the first k with conf_k >= thresholds[k] (the last exit takes the
  rest), computed on the device, and its logits, conf and pred are gathered there;
- the thresholds live in a device tensor the graph reads, so changing them needs no capture.

So it saves the waits and pays full depth on every row: it wins where a call is bound by
launches and synchronisation (small models, the GPU far from busy), and loses where the
skipped stages' compute would have dominated. `bench/cascade_overhead.py --backend torch-cuda`
measures both against the monolithic graph. CUDA 12.4's conditional graph nodes (skip a stage
when no row is left) are not used: PyTorch does not expose them.

On a CPU device the same code runs eagerly (how the tests check it without a GPU).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
from torch import nn

from edgeexit.errors import EdgeExitError
from edgeexit.runtime.cascade import CascadeResult, concatenate, gate_thresholds
from edgeexit.runtime.static import GraphCache, bucket_for, bucket_sizes
from edgeexit.runtime.torch_cuda_backend import capture_graph
from edgeexit.stage_io import StageIO


class DeviceCascade:
    """The torch Stage modules as one graph per batch bucket with the exit decided on `device`;
    `graphs` (CUDA only) captures each bucket after `warmup` plain runs (`GraphCache`: a
    capture that fails leaves that bucket running plainly). Same interface as
    `Cascade`. Every stage runs every row: `stage_samples` counts each row at each stage, and
    a call's time is not split between stages (it is counted at the last)."""

    name = "torch-cuda (decisions on the device)"

    def __init__(self, stages: Sequence[nn.Module], ios: Sequence[StageIO], thresholds: Sequence[float | None],
                 device: str = "cuda", max_batch: int = 64, graphs: bool = True, warmup: int = 2,
                 input_shape: Sequence[int] | None = None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EdgeExitError("backend torch-cuda: this torch has no CUDA device; use --backend torch or onnxruntime")
        self.stages = [s.to(self.device).eval() for s in stages]
        self.ios, self.sizes = list(ios), bucket_sizes(max_batch)
        self.input_shape = None if input_shape is None else tuple(int(d) for d in input_shape)
        enabled = graphs and self.device.type == "cuda"
        self._pool = torch.cuda.graph_pool_handle() if enabled else None
        self.graphs = GraphCache(lambda _bucket, fn: capture_graph(fn, self.device, self._pool), enabled, warmup)
        self._thresholds = torch.zeros(len(self.ios) - 1, device=self.device)
        self.set_thresholds(thresholds)
        self._inputs: dict[int, torch.Tensor] = {}
        self._outputs: dict[int, dict[str, torch.Tensor]] = {}

    def set_thresholds(self, thresholds: Sequence[float | None]) -> None:
        """New per-exit thresholds (the last exit's null), read by every later call, captured or not."""
        gates = gate_thresholds(thresholds, len(self.ios))[:-1]
        with torch.inference_mode():
            self._thresholds.copy_(torch.tensor(gates, dtype=torch.float32))

    def _decide(self, bucket: int) -> None:
        """Every stage on the bucket's input buffer, then each row's exit, into static outputs."""
        with torch.inference_mode():
            feeds = {self.ios[0].inputs[0]: self._inputs[bucket]}
            conf, pred, logits = [], [], []
            for stage, io in zip(self.stages, self.ios):
                named = dict(zip(io.outputs, stage(*(feeds[n] for n in io.inputs))))
                conf.append(named[io.conf].float())
                pred.append(named[io.pred].long())
                logits.append(named[io.logits])
                feeds = {n: named[n] for n in io.carry}
            conf_k, pred_k, logits_k = torch.stack(conf, 1), torch.stack(pred, 1), torch.stack(logits, 1)
            leave = torch.cat([conf_k[:, :-1] >= self._thresholds, torch.ones_like(conf_k[:, :1], dtype=torch.bool)], 1)
            exits = leave.to(torch.uint8).argmax(1)  # the first exit whose confidence reaches its threshold
            rows = torch.arange(bucket, device=self.device)
            values = {"exit": exits, "conf": conf_k[rows, exits], "pred": pred_k[rows, exits],
                      "logits": logits_k[rows, exits], "exit_conf": conf_k, "exit_pred": pred_k}
            outputs = self._outputs.get(bucket)
            if outputs is None:  # the first run of this bucket: its static outputs, kept for the graph to fill
                outputs = self._outputs[bucket] = {k: torch.empty_like(v) for k, v in values.items()}
            for key, value in values.items():
                outputs[key].copy_(value)

    def __call__(self, x: np.ndarray, collect: bool = False) -> CascadeResult:
        """The cascade on a normalised batch `x` (at most the max batch), one wait for the device."""
        n = len(x)
        if n == 0:
            raise EdgeExitError("input: empty batch")
        bucket = bucket_for(n, self.sizes)
        start = time.perf_counter()
        buffer = self._inputs.get(bucket)
        if buffer is None:
            shape = self.input_shape or tuple(x.shape[1:])
            buffer = self._inputs[bucket] = torch.zeros((bucket, *shape), device=self.device)
        with torch.inference_mode():
            buffer[:n].copy_(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), non_blocking=True)
        self.graphs(bucket, lambda: self._decide(bucket))  # plain runs, then captured once and replayed
        keys = ("exit", "conf", "pred", "logits") + (("exit_conf", "exit_pred") if collect else ())
        out = {k: self._outputs[bucket][k][:n].to("cpu", non_blocking=self.device.type == "cuda", copy=True)
               for k in keys}  # copies: the next call overwrites the static outputs
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        out = {k: v.numpy() for k, v in out.items()}
        seconds = np.zeros(len(self.ios))
        seconds[-1] = time.perf_counter() - start
        return CascadeResult(out["pred"], out["logits"], out["conf"], out["exit"], seconds,
                             np.full(len(self.ios), n, np.int64), out.get("exit_conf"), out.get("exit_pred"))

    def run_batched(self, x: np.ndarray, batch: int, collect: bool = False) -> CascadeResult:
        """The cascade over `x` in chunks of `batch`, merged in order (as `Cascade.run_batched`)."""
        return concatenate([self(x[i:i + batch], collect) for i in range(0, len(x), batch)])

    def close(self) -> None:
        """Drop the graphs and buffers."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.graphs.clear()
        self._inputs.clear()
        self._outputs.clear()
