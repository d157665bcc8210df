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

    python bench/backbones.py [--models resnet18,mobilenetv3] [--size 224] [--fraction 0.6]
                              [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import _paths  # noqa: F401 - first: keeps bench/ off the import path

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
    p.add_argument("--rounds", type=int, default=3, help="timed passes over the test split")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    zoo = _paths.sibling("zoo")  # its per-bundle measurement: profile, calibrate, interleaved timing
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            spec = at_size(name, args.size, args.epochs)
            print(f"building examples/{name} at {args.size}x{args.size} ({spec.train.epochs} epochs) ...", flush=True)
            start = time.perf_counter()
            bundle = build(spec, Path(tmp) / name)[0]
            built = time.perf_counter() - start
            print(f"timing {name} ...", flush=True)
            rows.append({**zoo.bench_one(bundle, args.fraction, args.rounds), "build_s": built,
                         "cuts": bundle.manifest["model"]["exits_after"], "size": args.size})
    zoo.print_rows(rows, args.fraction)
    print(f"\n{args.size}x{args.size}, batch 1, onnxruntime CPU, 1 thread: the cut's price (target full/mono <= "
          f"{TARGET}) and the saving at the calibrated budget")
    print(f"{'backbone':<20} {'cuts':<28} {'build s':>7} {'mono ms':>8} {'full/mono':>9} {'calib/mono':>10} "
          f"{'fused full':>10} {'fused calib':>11} verdict (fused)")
    for r in rows:
        ms = r["ms"]
        full = ms["full_depth"] / ms["monolithic"]
        fused = ms.get("fused_full_depth", float("nan")) / ms["monolithic"]
        print(f"{r['name']:<20} {','.join(r['cuts']):<28} {r['build_s']:>7.0f} {ms['monolithic']:>8.3f} {full:>9.3f} "
              f"{ms['calibrated'] / ms['monolithic']:>10.3f} {fused:>10.3f} "
              f"{ms.get('fused_calibrated', float('nan')) / ms['monolithic']:>11.3f} "
              f"{'ok' if fused <= TARGET else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, allow_nan=False) + "\n")
    return 0 if all(r["ms"].get("fused_full_depth", float("inf")) / r["ms"]["monolithic"] <= TARGET for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
