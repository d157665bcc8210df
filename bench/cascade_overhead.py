"""What the staged runtime costs when nothing exits early.

Prints (full-depth cascade latency) / (monolithic latency) at batch 1 on onnxruntime CPU,
both measured interleaved in this one run. Full depth means thresholds above 1: every
sample runs every stage and every exit head, so the ratio is the price of splitting
(extra session calls, the gating loop, the early exit heads) — target <= 1.05.

Two models: the shipped digits example (tiny: per-call overhead dominates) and the same
architecture at CIFAR size (3x32x32, wider), where compute dominates. Weights are random:
latency does not depend on them.

    python bench/cascade_overhead.py [--rounds 5]
"""

from __future__ import annotations

import _paths  # noqa: F401 - first: keeps bench/ off the import path (bench/calibration.py)
import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from edgeexit.export.onnx import export_checked, export_stages
from edgeexit.models import build_model
from edgeexit.profile import per_sample_latency
from edgeexit.runtime.cascade import NEVER, Cascade
from edgeexit.runtime.onnxruntime_backend import OnnxRuntimeBackend
from edgeexit.spec import load_spec
from edgeexit.staging import Monolithic, StageIO, make_stages, stage_io

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits" / "model.yaml"


def configs():
    """(label, spec) pairs: the example as shipped, and a CIFAR-sized variant of it."""
    spec = load_spec(EXAMPLE)
    cifar = replace(spec, input=replace(spec.input, shape=(3, 32, 32), mean=(0.0,) * 3, std=(1.0,) * 3),
                    model=replace(spec.model, args={"widths": [32, 64, 128], "depths": [2, 2, 2], "exit_pool": 2}))
    return [("digits example 1x8x8", spec), ("CIFAR-size 3x32x32", cifar)]


def measure(spec, threads: int, rounds: int, samples: int) -> dict[str, float]:
    """Per-sample latency (s) of the full-depth cascade and the monolithic graph."""
    torch.manual_seed(0)
    model = build_model(spec.model, spec.input, spec.base_dir).eval()
    x = torch.randn(samples, *spec.input.shape)
    stages = make_stages(model, spec.gating.confidence)
    ios = stage_io(stages, x, spec.input.name)
    with tempfile.TemporaryDirectory() as tmp:
        graphs = export_stages(stages, ios, x, Path(tmp) / "stages", 17, 1e-4)
        mono_io = StageIO(0, (spec.input.name,), (), "logits", "conf", "pred")
        mono = export_checked(Monolithic(model, spec.gating.confidence), (x,), Path(tmp) / "mono.onnx", mono_io, 17, 1e-4)
        cascade = Cascade(OnnxRuntimeBackend([g.path for g in graphs], ios, threads), ios, [NEVER] * (len(ios) - 1) + [None])
        session = OnnxRuntimeBackend([mono.path], [mono_io], threads).sessions[0]
        names = list(mono_io.outputs)
        return per_sample_latency(
            {"cascade": cascade, "monolithic": lambda s: session.run(names, {spec.input.name: s})},
            x.numpy(), rounds=rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    print(f"{'model':<22} {'threads':>7} {'monolithic ms':>14} {'cascade ms':>11} {'ratio':>6}")
    for label, spec in configs():
        for threads in (1, 0):
            t = measure(spec, threads, args.rounds, args.samples)
            print(f"{label:<22} {threads or 'all':>7} {t['monolithic'] * 1e3:>14.4f} {t['cascade'] * 1e3:>11.4f} "
                  f"{t['cascade'] / t['monolithic']:>6.3f}")
    print("ratio = full-depth cascade / monolithic, batch 1, onnxruntime CPU, same run (target <= 1.05)")


if __name__ == "__main__":
    main()
