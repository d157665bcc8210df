"""What the staged runtime costs when nothing exits early, and what it saves when samples do.

Prints (full-depth cascade latency) / (monolithic latency) per call, both measured
interleaved in this one run on the same backend. Full depth means thresholds above 1:
every sample runs every stage and every exit head, so the ratio is the price of splitting
(extra calls, the gating loop with its conf/pred downloads, the early exit heads).

- `--backend onnxruntime` (default; CPU): batch 1, 1 thread and all threads; target <= 1.05.
  Also the fused cascade graph (`edgeexit.export.fused`: every stage and exit decision in one
  graph, one call per input) at full depth, targets <= 1.05 on digits and <= 1.02 at CIFAR
  size, next to the floor any cascade graph has: every stage and exit head in one graph with
  no decision at all (`heads only`: what the early exit heads cost by themselves); then the
  trained digits example (or `--bundle`) at its thresholds: the staged loop, the fused graph
  and the monolithic graph, interleaved.
- `--backend torch-cuda` (an NVIDIA GPU): batch 1 and 32, with and without CUDA graphs (the
  monolithic baseline replayed as a graph too); target <= 1.10 with graphs. Then the shipped
  digits example is trained here (or `--bundle` is loaded) and its cascade, gated as the
  bundle says (its thresholds, calibrated ones if `edgeexit calibrate` ran on it, or its exit
  policy), is timed against its monolithic graph: the speedup early exits buy on this GPU.

Two architectures for the overhead: the shipped digits example (tiny: per-call overhead
dominates) and the same architecture at CIFAR size (3x32x32, wider), where compute
dominates. Weights are random there: latency does not depend on them.

    python bench/cascade_overhead.py [--backend torch-cuda [--device cpu]] [--rounds 5] [--json FILE]
"""

from __future__ import annotations

import _paths  # noqa: F401 - first: keeps bench/ off the import path (bench/calibration.py)
import argparse
import json
import tempfile
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import compose

from edgeexit.export.fused import write_fused
from edgeexit.export.onnx import export_checked, export_stages
from edgeexit.models import build_model
from edgeexit.profile import call_latency
from edgeexit.runtime.cascade import NEVER, Cascade, full_depth
from edgeexit.runtime.fused import FusedCascade
from edgeexit.runtime.onnxruntime_backend import OnnxRuntimeBackend, make_session
from edgeexit.spec import load_spec
from edgeexit.stage_io import StageIO
from edgeexit.staging import Monolithic, make_stages, stage_io

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits" / "model.yaml"


def configs():
    """(label, spec) pairs: the example as shipped, and a CIFAR-sized variant of it."""
    spec = load_spec(EXAMPLE)
    cifar = replace(spec, input=replace(spec.input, shape=(3, 32, 32), mean=(0.0,) * 3, std=(1.0,) * 3),
                    model=replace(spec.model, args={"widths": [32, 64, 128], "depths": [2, 2, 2], "exit_pool": 2}))
    return [("digits example 1x8x8", spec), ("CIFAR-size 3x32x32", cifar)]


def staged(spec, samples: int):
    """A random-weight model of `spec`, its stages and their I/O names, the monolithic I/O
    names, and `samples` random inputs."""
    torch.manual_seed(0)
    model = build_model(spec.model, spec.input, spec.base_dir).eval()
    x = torch.randn(samples, *spec.input.shape)
    stages = make_stages(model, spec.gating.confidence)
    mono_io = StageIO(0, (spec.input.name,), (), "logits", "conf", "pred")
    return model, stages, stage_io(stages, x, spec.input.name), mono_io, x


def heads_only(paths: list[Path], ios: list[StageIO], out: Path) -> Path:
    """Every stage graph chained into one graph with every exit's outputs and no decision: the
    cost of the exit heads alone, without the fused graph's control flow."""
    graphs = [onnx.load(str(p)) for p in paths]
    for g in graphs:
        del g.metadata_props[:]  # onnxsim's notes differ per stage; merge_models refuses that
    merged = graphs[0]
    for k, g in enumerate(graphs[1:], start=1):
        merged = compose.merge_models(merged, compose.add_prefix(g, f"s{k}/", rename_inputs=False, rename_outputs=False),
                                      io_map=[(n, n) for n in ios[k].inputs])
    onnx.save(merged, str(out))
    return out


def onnxruntime_rows(rounds: int, samples: int) -> list[dict]:
    rows = []
    for label, spec in configs():
        model, stages, ios, mono_io, x = staged(spec, samples)
        with tempfile.TemporaryDirectory() as tmp:
            graphs = export_stages(stages, ios, x, Path(tmp) / "stages", 17, 1e-4)
            mono = export_checked(Monolithic(model, spec.gating.confidence), (x,), Path(tmp) / "mono.onnx", mono_io, 17, 1e-4)
            fused = write_fused([g.path for g in graphs], ios, len(spec.input.classes), Path(tmp) / "cascade.onnx")
            flat = heads_only([g.path for g in graphs], ios, Path(tmp) / "heads_only.onnx")
            never = [NEVER] * (len(ios) - 1) + [None]
            for threads in (1, 0):
                raw = {name: make_session(path, threads) for name, path in (("flat", flat), ("mono", mono.path))}
                t = call_latency({"cascade": full_depth(OnnxRuntimeBackend([g.path for g in graphs], ios, threads), ios),
                                  "monolithic": full_depth(OnnxRuntimeBackend([mono.path], [mono_io], threads), [mono_io]),
                                  "fused": FusedCascade(fused, spec.input.name, never, len(ios), threads),
                                  # both as bare session calls fetching every output (else onnxruntime skips the heads)
                                  **{f"{name}_raw": partial(lambda a, s: s.run(None, {spec.input.name: a}), s=session)
                                     for name, session in raw.items()}},
                                 x.numpy(), 1, rounds)
                rows.append({"model": label, "batch": 1, "mode": f"{threads or 'all'} thread(s)", **ms(t),
                             "fused_ms": t["fused"] * 1e3, "fused_ratio": t["fused"] / t["monolithic"],
                             "heads_only_ratio": t["flat_raw"] / t["mono_raw"]})
    return rows


def onnxruntime_gated(bundle_path: str | None, rounds: int) -> list[dict]:
    """The trained example at its thresholds, batch 1, 1 thread: the staged loop, the fused
    cascade graph and the monolithic graph, interleaved."""
    from edgeexit.build import build
    from edgeexit.bundle import load_bundle
    from edgeexit.runtime.loader import open_backend, open_monolithic
    from edgeexit.tracing import split_inputs

    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(bundle_path) if bundle_path else \
            build(load_spec(EXAMPLE), Path(tmp) / "digits", progress=False)[0]
        x, y = split_inputs(bundle, "test")
        k = len(bundle.stage_ios)
        staged = Cascade(open_backend(bundle, "onnxruntime", threads=1), bundle.stage_ios, bundle.thresholds)
        fused = FusedCascade(bundle.fused_path, bundle.input["name"], bundle.thresholds, k, 1)
        mono = open_monolithic(bundle, "onnxruntime", threads=1)
        t = call_latency({"staged": staged, "fused": fused, "monolithic": full_depth(mono, [bundle.monolithic_io])},
                         x, 1, rounds)
        result = fused(x)
        return [{"model": bundle.name, "batch": 1, "thresholds": bundle.thresholds,
                 "calibrated": "calibration.json" in bundle.manifest.get("files", {}),
                 "accuracy": float(np.mean(result.pred == y)), "exit_shares": [float(s) for s in result.exit_shares()],
                 **{f"{name}_ms": v * 1e3 for name, v in t.items()}}]


def torch_cuda_rows(rounds: int, samples: int, device: str = "cuda", batches=(1, 32)) -> list[dict]:
    """Full-depth cascade vs monolithic on the torch-cuda backend, with and without CUDA graphs
    (on a CPU `device`, a dry run: the static buffers without graphs)."""
    from edgeexit.runtime.torch_cuda_backend import TorchCudaBackend

    rows = []
    for label, spec in configs():
        model, stages, ios, mono_io, x = staged(spec, samples)
        for graphs in (True, False) if device.startswith("cuda") else (False,):
            for batch in batches:
                with TorchCudaBackend(stages, ios, device, max_batch=batch, graphs=graphs) as cascade, \
                        TorchCudaBackend([Monolithic(model, spec.gating.confidence)], [mono_io], device,
                                         max_batch=batch, graphs=graphs) as mono:
                    t = call_latency({"cascade": full_depth(cascade, ios), "monolithic": full_depth(mono, [mono_io])},
                                     x.numpy(), batch, rounds)
                    failed = {**cascade.graphs.failed, **mono.graphs.failed}
                rows.append({"model": label, "batch": batch, "mode": "graphs" if graphs else "eager",
                             **ms(t), **({"capture_failed": failed} if failed else {})})
    return rows


def ms(t: dict[str, float]) -> dict[str, float]:
    return {"monolithic_ms": t["monolithic"] * 1e3, "cascade_ms": t["cascade"] * 1e3,
            "ratio": t["cascade"] / t["monolithic"]}


def gated_rows(bundle_path: str | None, rounds: int, device: str = "cuda", batches=(1, 32)) -> list[dict]:
    """The trained example's cascade as the bundle gates (its thresholds, or its exit policy
    when it has one, as `edgeexit run` does) vs its monolithic graph, on torch-cuda."""
    from edgeexit.build import build
    from edgeexit.bundle import load_bundle
    from edgeexit.runtime.device_cascade import DeviceCascade
    from edgeexit.runtime.loader import bundle_policy, max_batch, open_backend, open_monolithic, torch_stages
    from edgeexit.tracing import split_inputs

    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(bundle_path) if bundle_path else \
            build(load_spec(EXAMPLE), Path(tmp) / "digits", progress=False)[0]
        x, y = split_inputs(bundle, "test")
        rows = []
        with open_backend(bundle, "torch-cuda", device) as backend, open_monolithic(bundle, "torch-cuda", device) as mono:
            policy = bundle_policy(bundle)
            gated = Cascade(backend, bundle.stage_ios, bundle.thresholds, policy)
            runners = {"cascade": gated, "monolithic": full_depth(mono, [bundle.monolithic_io])}
            if policy is None:  # decisions on the device: every stage on every row, one wait per call
                runners["device"] = DeviceCascade(torch_stages(bundle), bundle.stage_ios, bundle.thresholds, device,
                                                  max_batch(bundle), input_shape=bundle.input["shape"][1:])
            for batch in batches:
                t = call_latency(runners, x, batch, rounds)
                result = gated.run_batched(x, batch)
                if "device" in runners:
                    on_device = runners["device"].run_batched(x, batch)
                    t["device_agrees"] = float(np.mean((on_device.exit == result.exit) & (on_device.pred == result.pred)))
                rows.append({"model": bundle.name, "batch": batch, "thresholds": bundle.thresholds,
                             "policy": policy is not None,
                             "calibrated": "calibration.json" in bundle.manifest.get("files", {}),
                             "accuracy": float(np.mean(result.pred == y)),
                             "exit_shares": [float(s) for s in result.exit_shares()], **ms(t),
                             **({"device_ms": t["device"] * 1e3, "device_agrees": t["device_agrees"]}
                                if "device" in t else {})})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("onnxruntime", "torch-cuda"), default="onnxruntime")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--bundle", help="a built digits bundle to time at its thresholds (default: build the example)")
    parser.add_argument("--device", default="cuda", help="torch-cuda: cuda (default), cuda:1, or cpu for a dry "
                        "run of this script without a GPU (static buffers, no graphs; not GPU figures)")
    parser.add_argument("--json", help="also write every row to this file")
    args = parser.parse_args()
    if args.backend == "onnxruntime":
        rows, where, target = onnxruntime_rows(args.rounds, args.samples), "onnxruntime CPU", 1.05
        gated = onnxruntime_gated(args.bundle, args.rounds)
    else:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("cascade_overhead: --backend torch-cuda needs an NVIDIA GPU and a CUDA build of torch "
                             "(--device cpu: a dry run of the script)")
        where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
            "the CPU (a dry run of the GPU path: not GPU figures)"
        rows, target = torch_cuda_rows(args.rounds, args.samples, args.device), 1.10
        gated = gated_rows(args.bundle, args.rounds, args.device)
    print(f"full-depth cascade vs monolithic per call on {where}, interleaved in this run (target <= {target})")
    print(f"{'model':<22} {'batch':>5} {'mode':>12} {'monolithic ms':>14} {'cascade ms':>11} {'ratio':>6}"
          + (f" {'fused ms':>9} {'fused ratio':>11} {'heads only':>10}" if args.backend == "onnxruntime" else ""))
    for r in rows:
        print(f"{r['model']:<22} {r['batch']:>5} {r['mode']:>12} {r['monolithic_ms']:>14.4f} {r['cascade_ms']:>11.4f} "
              f"{r['ratio']:>6.3f}" + (f" {r['fused_ms']:>9.4f} {r['fused_ratio']:>11.3f} {r['heads_only_ratio']:>10.3f}"
                                   if "fused_ms" in r else "")
              + (f"  capture failed: {r['capture_failed']}" if "capture_failed" in r else ""))
    if gated and args.backend == "onnxruntime":
        print("\nfused targets: <= 1.05 (digits), <= 1.02 (CIFAR-size) at full depth, 1 thread")
        for r in gated:
            print(f"\n{r['model']} at its thresholds {r['thresholds']} ({'calibrated' if r['calibrated'] else 'from the yaml'}), "
                  f"batch 1, 1 thread, onnxruntime CPU: accuracy {r['accuracy']:.1%}, exits "
                  + " / ".join(f"{s:.0%}" for s in r["exit_shares"])
                  + f"\n  staged loop {r['staged_ms']:.4f} ms, fused graph {r['fused_ms']:.4f} ms, monolithic "
                  f"{r['monolithic_ms']:.4f} ms: fused {r['monolithic_ms'] / r['fused_ms']:.2f}x faster than monolithic, "
                  f"{r['staged_ms'] / r['fused_ms']:.2f}x faster than staged")
    elif gated:
        print(f"\ncascade as the bundle gates vs its monolithic graph (torch-cuda) on {where}")
        for r in gated:
            shares = " / ".join(f"{s:.0%}" for s in r["exit_shares"])
            gating = "the exit policy" if r["policy"] else f"thresholds {r['thresholds']}"
            print(f"{r['model']:<16} batch {r['batch']:>3}  {gating} "
                  f"({'calibrated' if r['calibrated'] else 'from the yaml'})  accuracy {r['accuracy']:.1%}  "
                  f"exits {shares}  cascade {r['cascade_ms']:.4f} ms  monolithic {r['monolithic_ms']:.4f} ms  "
                  f"speedup {1 / r['ratio']:.2f}x"
                  + (f"\n{'':<16} decisions on the device (one graph, every stage on every row, one wait): "
                     f"{r['device_ms']:.4f} ms, {r['monolithic_ms'] / r['device_ms']:.2f}x monolithic's speed, "
                     f"{r['cascade_ms'] / r['device_ms']:.2f}x the staged loop's; same exit and class on "
                     f"{r['device_agrees']:.1%} of inputs" if "device_ms" in r else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": where, "overhead": rows, "gated": gated}, indent=2, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
