"""Does risk-controlled calibration keep its promise? Violation rates over many random splits.

For each example bundle (built here, or `--bundles DIR/<name>`): profile it at batch 1
(onnxruntime CPU, 1 thread), trace every exit on its validation and test splits once, pool the
two, and `--splits` times (>= 200) split the pool at random into a calibration half and a test
half. On each: certify thresholds with Learn-then-Test (`calibration.risk`, consistency and
accuracy risk <= --epsilon, mean latency <= the budget, probability >= 1 - --delta), fit the
optimiser at the same budget, and score both on the test half. A split violates a guarantee
when its test half's risk exceeds epsilon, or its modelled mean latency the budget; the
guarantee is honest when the violation rate is <= delta. On `--measure` of the splits the
cascade is also run at the certified thresholds on the test half and its measured mean latency
is compared with the budget.

    python bench/guarantees.py [--models digits,msdnet] [--splits 200] [--epsilon 0.05] [--delta 0.1]
                               [--fraction 0.7] [--measure 10] [--bundles DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import _paths  # noqa: F401 - first: keeps bench/ off the import path
import numpy as np

from calibration.errors import CalibrationError
from calibration.gating import exits_taken
from calibration.risk import RISKS, certify, losses
from calibration.solvers import Budget, Scorer, best_feasible, geometric, optimise
from calibration.traces import Traces
from edgeexit.calibrate import cheapest_call, full_depth_call, latency_source, measure_calls, runtime_thresholds
from edgeexit.runtime.loader import open_backend
from edgeexit.tracing import record_traces, split_inputs


def pooled(bundle, backend) -> tuple[Traces, np.ndarray]:
    """The validation and test splits' traces in one pool, and their inputs (for measuring)."""
    xs, parts = [], []
    for split in ("val", "test"):
        x, y = split_inputs(bundle, split)
        xs.append(x)
        parts.append(record_traces(bundle, backend, x, y, split))
    return Traces(*(np.concatenate([getattr(p, a) for p in parts]) for a in ("conf", "pred", "labels"))), \
        np.concatenate(xs)


def subset(t: Traces, ids: np.ndarray) -> Traces:
    return Traces(t.conf[ids], t.pred[ids], t.labels[ids])


def run_one(bundle, args) -> dict:
    backend = open_backend(bundle, "onnxruntime", threads=1)
    x_test, _ = split_inputs(bundle, "test")
    lat = latency_source(bundle, backend, "auto", 1, x_test, 1, iters=200).model
    floor, full = cheapest_call(lat, 1), full_depth_call(lat, 1)
    budget_s = floor + args.fraction * (full - floor)
    pool, x = pooled(bundle, backend)
    cost = lat.exit_seconds()
    rng = np.random.default_rng(args.seed)
    rows = {risk: {"certified": 0, "refused": 0, "risk_violations": 0, "latency_violations": 0,
                   "test_accuracy": [], "optimise_accuracy": [], "test_risk": [], "measured": []} for risk in RISKS}
    half = len(pool) // 2
    for s in range(args.splits):
        order = rng.permutation(len(pool))
        cal, test = subset(pool, order[:half]), subset(pool, order[half:])
        budget = Budget(budget_s)
        sc, st = Scorer(cal, lat, budget), Scorer(test, lat, budget)
        best = optimise(sc, start=best_feasible(geometric(sc), budget))
        for risk in RISKS:
            row = rows[risk]
            try:
                c = certify(cal, cost, budget_s, risk, args.epsilon, args.delta)
            except CalibrationError:
                row["refused"] += 1
                continue
            row["certified"] += 1
            taken = exits_taken(test.conf, list(c.thresholds))
            test_risk = float(losses(test, taken, risk).mean())
            row["test_risk"].append(test_risk)
            row["risk_violations"] += test_risk > args.epsilon
            row["latency_violations"] += float(cost[taken].mean()) > budget_s
            row["test_accuracy"].append(float(test.correct[np.arange(len(test)), taken].mean()))
            if best is not None:
                row["optimise_accuracy"].append(st.point(best.thresholds).accuracy)
            if risk == RISKS[0] and s < args.measure:  # the cascade itself, on this split's test half
                ids = order[half:]
                calls = measure_calls(backend, bundle, x[ids], 1, {"certified": runtime_thresholds(c.thresholds)},
                                      rounds=1, warmup=10)["certified"]
                row["measured"].append(float(calls.mean()))
        if (s + 1) % 50 == 0:
            print(f"  {bundle.name}: {s + 1}/{args.splits} splits", flush=True)
    return {"name": bundle.name, "samples": len(pool), "half": half, "budget_ms": budget_s * 1e3,
            "floor_ms": floor * 1e3, "full_ms": full * 1e3, "epsilon": args.epsilon, "delta": args.delta,
            "splits": args.splits, "risks": rows}


def print_rows(results: list[dict]) -> None:
    r0 = results[0]
    print(f"\nLearn-then-Test over random splits (calibrate on one half, test on the other): epsilon {r0['epsilon']:g}, "
          f"delta {r0['delta']:g}; a guarantee is honest when its violation rate <= delta")
    print(f"{'model':<16} {'risk':<12} {'budget ms':>9} {'certified':>9} {'risk viol.':>10} {'lat. viol.':>10} "
          f"{'test risk':>9} {'LTT acc':>8} {'optimise acc':>12} {'measured/budget':>15}")
    for r in results:
        for risk, row in r["risks"].items():
            n = max(row["certified"], 1)
            meas = (f"{np.mean(row['measured']) * 1e3 / r['budget_ms']:.3f} (n={len(row['measured'])})"
                    if row["measured"] else "-")
            print(f"{r['name']:<16} {risk:<12} {r['budget_ms']:>9.4f} {row['certified']:>4}/{r['splits']:<4} "
                  f"{row['risk_violations'] / n:>10.3f} {row['latency_violations'] / n:>10.3f} "
                  f"{np.mean(row['test_risk'] or [np.nan]):>9.4f} {np.mean(row['test_accuracy'] or [np.nan]):>8.2%} "
                  f"{np.mean(row['optimise_accuracy'] or [np.nan]):>12.2%} {meas:>15}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="digits,msdnet", help="example folders")
    p.add_argument("--splits", type=int, default=200)
    p.add_argument("--epsilon", type=float, default=0.05)
    p.add_argument("--delta", type=float, default=0.1)
    p.add_argument("--fraction", type=float, default=0.7,
                   help="budget: floor + fraction x (full depth - floor) of a batch-1 call")
    p.add_argument("--measure", type=int, default=10, help="splits whose certified cascade is run and timed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bundles", help="folder holding already built bundles named like the examples")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_one(bundle, args)
                   for bundle in _paths.sibling("zoo").example_bundles(args.models.split(","), args.bundles, Path(tmp))]
    print_rows(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, allow_nan=False, default=float) + "\n")
    honest = all(row["risk_violations"] <= args.delta * max(row["certified"], 1)
                 and row["latency_violations"] <= args.delta * max(row["certified"], 1)
                 for r in results for row in r["risks"].values())
    return 0 if honest else 1


if __name__ == "__main__":
    raise SystemExit(main())
