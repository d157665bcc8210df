"""Thresholds against a latency budget: the optimiser vs the MSDNet/RANet geometric baseline.

On the digits example (built here unless --bundle is given): profile the bundle on this
machine (onnxruntime CPU, 1 thread), trace its validation and test splits, then for a
sweep of budgets between "everyone leaves at exit 0" and "everyone runs every stage":
fit both solvers on the validation split, and report on the test split their accuracy
and their mean latency *measured by running the cascade* at the chosen thresholds (both
solvers' cascades interleaved call by call, in this one run). Prints, per budget, the
measured/budget ratio (target <= 1.05) and whether the optimiser's test accuracy is at
least the baseline's.

    python bench/calibration.py [--bundle DIR] [--batch 1] [--budgets 10] [--tail mean|p95]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import _paths  # noqa: F401 - first: keeps bench/ (and this file's name) off the import path
import numpy as np

from calibration.latency import from_profile
from calibration.solvers import Budget, Scorer, best_feasible, geometric, optimise
from edgeexit.build import build
from edgeexit.bundle import load_bundle
from edgeexit.calibrate import cheapest_call, full_depth_call, measure_calls, measured_figures, profile_batches
from edgeexit.profile import profile_bundle
from edgeexit.runtime.loader import open_backend, open_monolithic
from edgeexit.spec import load_spec
from edgeexit.tracing import record_traces, split_inputs

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits" / "model.yaml"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", help="an existing bundle (default: build the digits example in a temp dir)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--budgets", type=int, default=10, help="budgets in the sweep")
    p.add_argument("--tail", default="mean", choices=("mean", "p95"))
    p.add_argument("--iters", type=int, default=300, help="profiler calls per batch size")
    p.add_argument("--rounds", type=int, default=15, help="measured passes over the test split per budget")
    p.add_argument("--confidence", type=float, default=Budget(1.0).confidence,
                   help="one-sided confidence of the mean budget (default: the CLI's)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(args.bundle) if args.bundle else build(load_spec(EXAMPLE), Path(tmp) / "b", progress=False)[0]
        backend = open_backend(bundle, "onnxruntime", threads=1)
        x_val, y_val = split_inputs(bundle, "val")
        x_test, y_test = split_inputs(bundle, "test")
        entry = profile_bundle(backend, bundle.stage_ios, open_monolithic(bundle, "onnxruntime", threads=1),
                               bundle.monolithic_io, x_test, profile_batches(args.batch), bundle.thresholds,
                               iters=args.iters, threads=1)
        latency = from_profile(entry, "this run's profile")
        val = record_traces(bundle, backend, x_val, y_val, "val")
        test = record_traces(bundle, backend, x_test, y_test, "test")
        lo, hi = cheapest_call(latency, args.batch), full_depth_call(latency, args.batch)
        tail = None if args.tail == "mean" else 0.95
        print(f"{bundle.name}: {entry['device']}, onnxruntime 1 thread, batch {args.batch}, {args.tail} latency; "
              f"fit on {len(val)} val samples, reported on {len(test)} test samples")
        print(f"exit accuracy (test): {', '.join(f'{a:.1%}' for a in test.correct.mean(axis=0))}; modelled call: "
              f"all at exit 0 {lo * 1e3:.4f} ms, full depth {hi * 1e3:.4f} ms\n")
        print(f"{'budget ms':>9} | {'geometric acc':>13} {'model ms':>8} {'meas. ms':>8} {'ratio':>5} | "
              f"{'optimise acc':>12} {'model ms':>8} {'meas. ms':>8} {'ratio':>5} | opt >= geo")
        fractions = np.linspace(0.0, 1.0, args.budgets + 1)[1:] ** 1.5  # denser where accuracy still moves
        ratios, wins, compared = [], 0, 0
        for seconds in lo + fractions * (hi - lo):
            budget = Budget(float(seconds), args.batch, tail, args.confidence)
            sv, st = Scorer(val, latency, budget), Scorer(test, latency, budget)
            base = best_feasible(geometric(sv), budget)
            best = optimise(sv, start=base)
            chosen = {name: pt.thresholds for name, pt in (("geometric", base), ("optimise", best)) if pt is not None}
            calls = measure_calls(backend, bundle, x_test, args.batch, chosen, rounds=args.rounds)
            cells, acc = [], {}
            for name, width in (("geometric", 13), ("optimise", 12)):
                if name not in chosen:
                    cells.append(f"{'infeasible':>{width}} {'-':>8} {'-':>8} {'-':>5}")
                    continue
                m = measured_figures(calls[name], budget)
                acc[name] = st.point(chosen[name]).accuracy
                model = st.point(chosen[name])
                cells.append(f"{acc[name]:>{width}.2%} {(model.mean_s if tail is None else model.p95_s) * 1e3:>8.4f} "
                             f"{m['mean_ms'] if tail is None else m['p95_ms']:>8.4f} {m['ratio']:>5.3f}")
                if name == "optimise":
                    ratios.append(m["ratio"])
            verdict = "-"
            if len(acc) == 2:
                compared += 1
                wins += acc["optimise"] >= acc["geometric"]
                verdict = "yes" if acc["optimise"] >= acc["geometric"] else "NO"
            print(f"{seconds * 1e3:>9.4f} | {cells[0]} | {cells[1]} | {verdict}")
        print(f"\noptimiser test accuracy >= geometric at {wins}/{compared} budgets where both are feasible; "
              f"measured/budget of the optimiser's thresholds: max {max(ratios):.3f}, "
              f"mean {np.mean(ratios):.3f} (target <= 1.05)")
        return 0 if wins == compared and max(ratios) <= 1.05 else 1


if __name__ == "__main__":
    sys.exit(main())
