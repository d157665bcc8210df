"""Exits on torchvision backbones at 224x224: does the cut cost anything, and what do exits save?

Builds the backbone examples (examples/resnet18: ResNet-18 cut after layer1..layer3;
examples/mobilenetv3: MobileNetV3-Small cut after features.3 and features.8) at 224x224 instead
of their 32x32 (digits resized; fewer epochs than the examples, as 224x224 costs 49x the
compute: `--epochs`), then, per backbone, as bench/zoo.py does: profile on onnxruntime CPU at
batch 1 (1 thread), calibrate thresholds for a mean budget of `--fraction` x the full-depth
call, and time, interleaved call by call in one run over the test split, the monolithic graph,
the full-depth cascade (every stage and exit head runs: the price of the cut, target <= 1.05)
and the cascade at the calibrated thresholds, each as the staged loop and as the fused cascade
graph (one call per input, what `run` uses for one input; the verdict is the fused graph's).
All of it with fresh sessions `--instances` times, made in a rotated order each time: where
onnxruntime happens to put a session's memory moved MobileNetV3-Small's monolithic call by up
to 5% from one instance to the next, and sessions made late in a process ran faster than
identical ones made early, so one instance's ratio is one draw; the verdict is the median
across instances (the default 5 puts each of the 5 kinds of session in each place once).
The runners are timed by turns twice: call by call (each call after another runner's, its
caches cold) and in blocks of calls in a row (warm, as a model serving alone runs and as
trtexec times an engine); the verdict is the warm one. Beside them, every stage and exit
head in one graph with no decision (bench/cascade_overhead.py's `heads only`): what the exit
heads cost by themselves, so that fused / heads only is what the cut costs.

    python bench/backbones.py [--models resnet18,mobilenetv3] [--size 224] [--fraction 0.6]
                              [--rounds 2] [--instances 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import _paths  # noqa: F401 - first: keeps bench/ off the import path
import numpy as np

from edgeexit.build import build
from edgeexit.spec import load_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# epochs and batch at 224x224 (the examples' own: 8 and 40 at batch 64, at 32x32): MobileNetV3's
# batch norms keep statistics with momentum 0.01, so it needs steps more than epochs
TRAINING = {"resnet18": {"epochs": 5, "batch_size": 32}, "mobilenetv3": {"epochs": 8, "batch_size": 16}}
TARGET = 1.05  # full-depth cascade / monolithic


def at_size(name: str, size: int, epochs: int | None):
    spec = load_spec(EXAMPLES / name / "model.yaml")
    training = dict(TRAINING.get(name, {}), **({"epochs": epochs} if epochs else {}))
    return replace(spec, input=replace(spec.input, shape=(3, size, size)), train=replace(spec.train, **training))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,mobilenetv3", help="example folders with a model.backbone")
    p.add_argument("--size", type=int, default=224, help="input height and width")
    p.add_argument("--epochs", type=int, help="training epochs (default: 5 for resnet18, 8 for mobilenetv3)")
    p.add_argument("--fraction", type=float, default=0.6, help="budget as a share of the full-depth call")
    p.add_argument("--rounds", type=int, default=2, help="timed passes over the test split per instance")
    p.add_argument("--instances", type=int, default=5, help="fresh sessions timed (medians across them)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    zoo = _paths.sibling("zoo")  # its per-bundle measurement: profile, calibrate, interleaved timing
    overhead = _paths.sibling("cascade_overhead")  # its heads-only graph: the exits' cost without a cut
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            spec = at_size(name, args.size, args.epochs)
            print(f"building examples/{name} at {args.size}x{args.size} ({spec.train.epochs} epochs) ...", flush=True)
            start = time.perf_counter()
            bundle = build(spec, Path(tmp) / name)[0]
            built = time.perf_counter() - start
            print(f"timing {name} ...", flush=True)
            heads = overhead.heads_only(bundle.stage_paths, bundle.stage_ios, Path(tmp) / f"{name}_heads_only.onnx")
            rows.append({**zoo.bench_one(bundle, args.fraction, args.rounds, args.instances, heads), "build_s": built,
                         "cuts": bundle.manifest["model"]["exits_after"], "size": args.size})
    zoo.print_rows(rows, args.fraction)
    print(f"\n{args.size}x{args.size}, batch 1, onnxruntime CPU, 1 thread: the cut's price (target fused full/mono <= "
          f"{TARGET}, judged warm: {zoo.WARM_BLOCK} calls in a row per runner and turn) and the saving at the calibrated "
          f"budget; ratios are medians across {args.instances} session instances (the warm fused full depth's least and "
          "most in brackets); 'by turns': call by call, each call after another runner's")
    print(f"{'backbone':<20} {'cuts':<28} {'build s':>7} {'mono ms':>8} {'full/mono':>9} {'calib/mono':>10} "
          f"{'fused full [range]':>23} {'by turns':>8} {'heads only':>10} {'fused calib':>11} verdict (fused, warm)")
    verdicts = []
    for r in rows:
        fused, least, most = zoo.over_mono(r, "fused_full_depth", warm=True)
        verdicts.append(fused <= TARGET)
        mono = float(np.median([p["monolithic"] for p in r["warm_instances_ms"]]))
        print(f"{r['name']:<20} {','.join(r['cuts']):<28} {r['build_s']:>7.0f} {mono:>8.3f} "
              f"{zoo.over_mono(r, 'full_depth', warm=True)[0]:>9.3f} {zoo.over_mono(r, 'calibrated', warm=True)[0]:>10.3f} "
              f"{fused:>9.3f} [{least:.3f}-{most:.3f}] {zoo.over_mono(r, 'fused_full_depth')[0]:>8.3f} "
              f"{zoo.over_mono(r, 'heads_only', warm=True)[0]:>10.3f} "
              f"{zoo.over_mono(r, 'fused_calibrated', warm=True)[0]:>11.3f} {'ok' if verdicts[-1] else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, allow_nan=False) + "\n")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
