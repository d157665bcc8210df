"""Anytime prediction: is every input answered within its deadline, and how accurate is it?

Builds the digits example (or takes `--bundle`), profiles it on this machine at batch 1
(onnxruntime CPU, 1 thread), then for a sweep of deadlines, from the predicted tail of a call
answered by exit 0 alone (stage 0 always runs) up to past a full-depth call's p99, runs the
test split one input per call with `deadline` set: a stage starts only when its predicted
finish fits (`calibration.latency.Deadlines`: the extrapolated 99.9th percentile of a
call to that exit less the median of one to the exit before). Each call is timed, and the
settings take turns input by input (so that machine noise hits them alike); printed per
deadline: the share of inputs answered within it (target >= 0.99), the accuracy, the share
cut off (answered from an earlier exit than the gating chose), the margin the late calls left
on the predictions at the end (`Cascade.margin`, 1 where none was late), and the exit shares. Two
gatings: pure anytime (no early exit by confidence: each input takes the deepest exit that
fits), and the bundle's thresholds under the deadline.

    python bench/anytime.py [--bundle DIR] [--points 8] [--rounds 3] [--json FILE] [--plot FILE.png]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _paths  # noqa: F401 - first: keeps bench/ off the import path
import numpy as np

from calibration.latency import Deadlines, from_profile
from edgeexit.build import build
from edgeexit.bundle import Change, load_bundle, update_bundle
from edgeexit.calibrate import latency_source
from edgeexit.profile import PROFILE, read_profiles, with_profiles
from edgeexit.runtime.cascade import NEVER, Cascade
from edgeexit.runtime.loader import open_backend
from edgeexit.spec import load_spec
from edgeexit.tracing import split_inputs

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits" / "model.yaml"
TARGET = 0.99


def sweep(bundle, points: int, rounds: int) -> list[dict]:
    backend = open_backend(bundle, "onnxruntime", threads=1)
    x, y = split_inputs(bundle, "test")
    source = latency_source(bundle, backend, "auto", 1, x, 1, iters=300)
    if source.new_profile:
        bundle = update_bundle(bundle, Change(with_profiles(bundle.path, source.new_profile), {"profile": PROFILE}))
    key = next(k for k in read_profiles(bundle.path)["profiles"] if k.startswith("onnxruntime@"))
    entry = read_profiles(bundle.path)["profiles"][key]
    calls, deadlines = from_profile(entry, key, "p99_ms").exit_seconds(), Deadlines(entry, key)
    # stage 0 always runs: from the tail of a call answered by exit 0 alone (below it `run` warns)
    sweep = np.linspace(deadlines.call(0, 1), calls[-1] * 1.3, points)
    gatings = {"anytime": [NEVER] * (len(bundle.stage_ios) - 1) + [None], "thresholds": bundle.thresholds}
    settings = [(float(d), name) for d in sweep for name in gatings]
    cascades = [Cascade(backend, bundle.stage_ios, gatings[name], deadline=d, predict=deadlines.remainder) for d, name in settings]
    seconds, pred, exits, cut = (np.zeros((len(settings), rounds * len(x)), t) for t in (float, int, int, bool))
    for call in range(rounds * len(x)):  # every setting on one input, in rotating order: noise hits them alike
        i = call % len(x)
        for j in np.roll(np.arange(len(settings)), call):
            start = time.perf_counter()
            result = cascades[j](x[i:i + 1])
            seconds[j, call] = time.perf_counter() - start
            pred[j, call], exits[j, call], cut[j, call] = result.pred[0], result.exit[0], result.cut_off[0]
    rows = []
    for j, (deadline, name) in enumerate(settings):
        rows.append({"deadline_ms": deadline * 1e3, "gating": name, "within": float(np.mean(seconds[j] <= deadline)),
                     "p99_ms": float(np.quantile(seconds[j], 0.99) * 1e3),
                     "accuracy": float(np.mean(pred[j] == np.tile(y, rounds))), "cut_off": float(np.mean(cut[j])),
                     "exit_shares": (np.bincount(exits[j], minlength=len(calls)) / len(exits[j])).tolist(),
                     "margin": cascades[j].margin})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", help="an already built bundle (default: build the digits example)")
    p.add_argument("--points", type=int, default=8, help="deadlines in the sweep")
    p.add_argument("--rounds", type=int, default=3, help="passes over the test split per deadline")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--plot", help="also draw accuracy vs deadline to this PNG")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle:
            bundle = load_bundle(args.bundle)
        else:
            print("building examples/digits ...", flush=True)
            bundle = build(load_spec(EXAMPLE), Path(tmp) / "digits", progress=False)[0]
        rows = sweep(bundle, args.points, args.rounds)
    print(f"\nanytime, onnxruntime CPU, batch 1, 1 thread: each call timed; target within deadline >= {TARGET}")
    print(f"{'deadline ms':>11} {'gating':<10} {'within':>7} {'call p99 ms':>11} {'accuracy':>8} {'cut off':>7} {'margin':>6}  exit shares")
    for r in rows:
        print(f"{r['deadline_ms']:>11.4f} {r['gating']:<10} {r['within']:>7.3f} {r['p99_ms']:>11.4f} {r['accuracy']:>8.2%} "
              f"{r['cut_off']:>7.1%} {r['margin']:>6.2f}  " + " / ".join(f"{s:.0%}" for s in r["exit_shares"]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name in ("anytime", "thresholds"):
            part = [r for r in rows if r["gating"] == name]
            ax.plot([r["deadline_ms"] for r in part], [r["accuracy"] for r in part], marker="o", label=name)
        ax.set_xlabel("deadline per input (ms)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{bundle.name}: accuracy vs deadline (onnxruntime CPU, batch 1)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"plot: {args.plot}")
    return 0 if all(r["within"] >= TARGET for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
