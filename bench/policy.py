"""A learned exit policy vs threshold calibration, under the same measured latency budget.

On a bundle (default: the digits example trained for only --epochs epochs, built here, so
that its exits still differ in accuracy; or --bundle DIR): profile it once on this machine
(onnxruntime CPU, 1 thread), trace its validation and test splits, then for a sweep of
budgets between "everyone leaves at exit 0" and "everyone runs every stage": fit the
geometric baseline, the threshold optimiser and the exit policy on the validation split
(same `Scorer`, `Budget` and latency model), and print their test accuracy and modelled
mean latency, plus the policy's mean latency *measured by running the cascade with it* on
the test split, over the budget. `signif.`: whether the policy's validation gain over the
optimiser is significant at the budget's confidence, i.e. whether `edgeexit calibrate
--solver policy` would deploy it (else it keeps the thresholds: `deployed - opt` is 0).

    python bench/policy.py [--bundle DIR] [--epochs 3] [--batch 1] [--budgets 6]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import _paths  # noqa: F401 - first: keeps bench/ (and bench/calibration.py's name) off the import path
import numpy as np
import yaml

from calibration.latency import from_profile
from calibration.policy import fit_policy, policy_point
from calibration.solvers import Budget, Scorer, best_feasible, geometric, optimise
from edgeexit.build import build
from edgeexit.bundle import load_bundle
from edgeexit.calibrate import cheapest_call, full_depth_call, measure_calls, measured_figures, profile_batches
from edgeexit.profile import profile_bundle
from edgeexit.runtime.loader import open_backend, open_monolithic
from edgeexit.spec import load_spec
from edgeexit.tracing import record_traces, split_inputs

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits" / "model.yaml"


def short_example(folder: Path, epochs: int):
    """The digits example as a spec trained for `epochs` epochs (a yaml variant in `folder`)."""
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["train"]["epochs"] = epochs
    raw["output"] = "bundle"
    path = folder / "model.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_spec(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", help="an existing bundle (default: build the digits example in a temp dir)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs of the default bundle")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--budgets", type=int, default=6, help="budgets in the sweep")
    p.add_argument("--iters", type=int, default=300, help="profiler calls per batch size")
    p.add_argument("--rounds", type=int, default=15, help="measured passes over the test split per budget")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = (load_bundle(args.bundle) if args.bundle else
                  build(short_example(Path(tmp), args.epochs), Path(tmp) / "bundle", progress=False)[0])
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
        agree = test.pred[:, 1:] == test.pred[:, :-1]
        print(f"{bundle.name}: {entry['device']}, onnxruntime 1 thread, batch {args.batch}, mean latency; "
              f"fit on {len(val)} val samples, reported on {len(test)} test samples")
        print(f"exit accuracy (test): {', '.join(f'{a:.1%}' for a in test.correct.mean(axis=0))}; exit k right when "
              f"it agrees / disagrees with exit k-1: "
              + ", ".join(f"{test.correct[a, k + 1].mean():.1%} / {test.correct[~a, k + 1].mean():.1%}"
                          for k, a in enumerate(agree.T)))
        print(f"modelled call: all at exit 0 {lo * 1e3:.4f} ms, full depth {hi * 1e3:.4f} ms\n")
        print(f"{'budget ms':>9} | {'geometric':>9} {'model ms':>8} | {'optimise':>8} {'model ms':>8} | "
              f"{'policy':>7} {'model ms':>8} {'meas. ms':>8} {'ratio':>5} {'lambda':>8} {'signif.':>7} | "
              f"pol - opt | deployed - opt")
        gains, deployed, ratios = [], [], []
        for seconds in lo + np.linspace(0.0, 1.0, args.budgets + 1)[1:] * (hi - lo):
            budget = Budget(float(seconds), args.batch)
            sv, st = Scorer(val, latency, budget), Scorer(test, latency, budget)
            base = best_feasible(geometric(sv), budget)
            best = optimise(sv, start=base)
            fit = fit_policy(sv, start=best)
            if best is None or fit is None:
                print(f"{seconds * 1e3:>9.4f} | infeasible")
                continue
            m = measured_figures(measure_calls(backend, bundle, x_test, args.batch, {"policy": fit.policy},
                                               rounds=args.rounds)["policy"], budget)
            g = None if base is None else st.point(base.thresholds)
            o, pol = st.point(best.thresholds), policy_point(st, fit.policy.taken(test.conf, test.pred))
            gains.append(pol.accuracy - o.accuracy)
            deployed.append(gains[-1] if fit.significant else 0.0)
            ratios.append(m["ratio"])
            geo = f"{'-':>9} {'-':>8}" if g is None else f"{g.accuracy:>9.2%} {g.mean_s * 1e3:>8.4f}"
            print(f"{seconds * 1e3:>9.4f} | {geo} | {o.accuracy:>8.2%} {o.mean_s * 1e3:>8.4f} | {pol.accuracy:>7.2%} "
                  f"{pol.mean_s * 1e3:>8.4f} {m['mean_ms']:>8.4f} {m['ratio']:>5.3f} {fit.policy.lam:>8.3g} "
                  f"{'yes' if fit.significant else 'no':>7} | {100 * gains[-1]:+6.2f} pt | "
                  f"{100 * deployed[-1]:+6.2f} pt")
        print(f"\ntrained policy - optimiser, test accuracy: mean {100 * np.mean(gains):+.2f} pt, min "
              f"{100 * min(gains):+.2f}, max {100 * max(gains):+.2f} ({sum(g > 0 for g in gains)} better, "
              f"{sum(g < 0 for g in gains)} worse of {len(gains)}); deployed (policy where its validation gain is "
              f"significant, else the thresholds) - optimiser: mean {100 * np.mean(deployed):+.2f} pt; policy "
              f"measured/budget: max {max(ratios):.3f}, mean {np.mean(ratios):.3f} (target <= 1.05)")
        return 0 if max(ratios) <= 1.05 else 1


if __name__ == "__main__":
    sys.exit(main())
