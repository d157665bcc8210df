"""The model zoo on this machine: accuracy, calibrated latency and cascade vs monolithic, per model.

For every example in examples/ (EENets ResNet on digits, EENets with the cost-aware loss,
MSDNet, RANet, EMGNet) built here, or bundles already built (--bundles DIR/<name>):
profile the bundle (onnxruntime CPU, batch 1, 1 thread), calibrate thresholds for a mean
latency budget of `--fraction` x the full-depth cascade call (never below 1.05 x the
cheapest call), then, in one interleaved run over the test split, time the cascade at the
calibrated thresholds, the full-depth cascade and the monolithic graph, with fresh sessions
`--instances` times (medians across them), call by call and again in blocks of calls in a
row (the warm figures bench/backbones.py judges by). Prints per model:
final-exit test accuracy, the budget, the calibrated cascade's test accuracy and measured
mean latency (and its ratio to the budget), the monolithic latency and the ratios, then per
exit the test accuracy and cumulative paper MFLOPs. `--plot` draws the latter (a line per
model); `--from-json` prints (and plots) the rows an earlier `--json` stored, building nothing.

    python bench/zoo.py [--models digits,eenet,msdnet,ranet,emgnet] [--fraction 0.6] [--bundles DIR]
                        [--rounds 5] [--instances 3] [--json FILE] [--plot FILE.png]
    python bench/zoo.py --from-json FILE [--plot FILE.png]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import _paths  # noqa: F401 - first: keeps bench/ off the import path
import numpy as np

from calibration.solvers import Budget
from edgeexit.build import build
from edgeexit.bundle import Change, load_bundle, update_bundle
from edgeexit.calibrate import calibrate, cheapest_call, full_depth_call, latency_source
from edgeexit.plots import plot_exit_curves
from edgeexit.profile import PROFILE, interleaved_calls, with_profiles
from edgeexit.runtime.cascade import NEVER, Cascade, full_depth
from edgeexit.runtime.fused import FusedCascade
from edgeexit.runtime.loader import open_backend, open_monolithic
from edgeexit.runtime.onnxruntime_backend import make_session
from edgeexit.spec import load_spec
from edgeexit.tracing import split_inputs

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
THREADS = 1
WARM_BLOCK = 10  # calls in a row per runner and turn, timing what a model serving alone sees


def timed_runners(bundle, thresholds, heads_only: Path | None = None, turn: int = 0) -> dict:
    """Fresh sessions of what is timed: the staged cascade at `thresholds` and at full depth,
    the monolithic graph, the fused cascade graph (where the bundle has one) at both, and a
    `heads_only` graph where given (bench/cascade_overhead.py's: every stage and exit head, no
    decision: what the exits cost without any cut).

    The sessions are made in an order rotated `turn` places (give each instance its number):
    sessions of one graph made one after another in one process ran apart by the order they
    were made in (MobileNetV3-Small at 224x224, four sessions of one fused graph: 1.071, 1.068,
    1.060 and 1.052 x monolithic, medians of 4 instances made in one order; 1.060 to 1.067
    rotated), so a fixed order favours whatever comes late."""
    k, name = len(bundle.stage_ios), bundle.input["name"]

    def staged():
        backend = open_backend(bundle, "onnxruntime", threads=THREADS)
        return {"calibrated": Cascade(backend, bundle.stage_ios, thresholds),
                "full_depth": full_depth(backend, bundle.stage_ios)}

    def monolithic():
        mono, io = open_monolithic(bundle, "onnxruntime", threads=THREADS), bundle.monolithic_io
        return {"monolithic": lambda s: mono.run(0, {io.inputs[0]: s})}

    def fused(runner, gates):  # the fused cascade graph, one call per input
        return lambda: {runner: FusedCascade(bundle.fused_path, name, gates, k, THREADS)}

    def heads():  # every output fetched, or onnxruntime would not run the heads
        session = make_session(heads_only, THREADS)
        return {"heads_only": lambda s: session.run(None, {name: s})}

    makers = [staged, monolithic]
    if bundle.fused_path is not None:
        makers += [fused("fused_full_depth", [NEVER] * (k - 1) + [None]), fused("fused_calibrated", thresholds)]
    if heads_only is not None:
        makers.append(heads)
    turn %= len(makers)
    runners = {}  # interleaved_calls rotates whose turn comes first: the order here does not matter
    for make in makers[turn:] + makers[:turn]:
        runners.update(make())
    return runners


def bench_one(bundle, fraction: float, rounds: int, instances: int = 1, heads_only: Path | None = None) -> dict:
    """Calibrate `bundle` for a budget at `fraction` of its full-depth call and time it against
    monolithic: `rounds` interleaved passes over the test split, with fresh sessions `instances`
    times, made in another order each time (where onnxruntime puts a session's memory moves
    its call by a few percent; the medians across instances count)."""
    backend = open_backend(bundle, "onnxruntime", threads=THREADS)
    x, y = split_inputs(bundle, "test")
    source = latency_source(bundle, backend, "auto", 1, x, THREADS, iters=200)
    if source.new_profile:
        bundle = update_bundle(bundle, Change(with_profiles(bundle.path, source.new_profile), {"profile": PROFILE}))
    lat = source.model
    budget = Budget(max(fraction * full_depth_call(lat, 1), 1.05 * cheapest_call(lat, 1)))
    bundle, record = calibrate(bundle, backend, budget, measure=False, curve_points=2, progress=False)
    del backend
    chunks = [x[i:i + 1] for i in range(len(x))]
    per_instance, warm = [], []
    for turn in range(instances):
        runners = timed_runners(bundle, record["thresholds"], heads_only, turn)
        for block, into in ((1, per_instance), (WARM_BLOCK, warm)):
            calls = interleaved_calls(runners, chunks, rounds * len(chunks), warmup=50, block=block)
            into.append({name: float(np.median(s.reshape(rounds, -1).mean(axis=1))) * 1e3 for name, s in calls.items()})
    report = json.loads((bundle.path / "report.json").read_text())
    return {"name": bundle.name, "exits": len(bundle.stage_ios), "final_exit_accuracy": report["exit_accuracy"][-1],
            "exit_accuracy": report["exit_accuracy"], "paper_mflops": [o / 1e6 for o in report["paper_cumulative_ops"]],
            "params": sum(s["params"] for s in bundle.manifest["stages"]),
            "fraction": fraction, "budget_ms": budget.seconds * 1e3, "calibrated_accuracy": record["test"]["accuracy"],
            "calibrated_shares": record["test"]["exit_shares"],
            "ms": {name: float(np.median([p[name] for p in per_instance])) for name in per_instance[0]},
            "instances_ms": per_instance, "warm_instances_ms": warm}


def over_mono(row: dict, name: str, warm: bool = False) -> tuple[float, float, float]:
    """Runner `name`'s time over the monolithic graph's, called by turns (`warm`: in blocks):
    the median, least and most across the row's session instances (rows stored before
    instances were: its medians' ratio)."""
    timed = row.get("warm_instances_ms", []) if warm else row.get("instances_ms", [row["ms"]])
    ratios = [p[name] / p["monolithic"] for p in timed if name in p]
    return (float(np.median(ratios)), min(ratios), max(ratios)) if ratios else (float("nan"),) * 3


def example_bundles(names, bundles: str | None, tmp: Path):
    """The examples' bundles, one at a time: already built under `bundles`, else built into `tmp`."""
    for name in names:
        if bundles:
            yield load_bundle(Path(bundles) / name)
        else:
            print(f"building examples/{name} ...", flush=True)
            yield build(load_spec(EXAMPLES / name / "model.yaml"), tmp / name, progress=False)[0]


def print_rows(rows: list[dict], fraction: float) -> None:
    """The two tables: calibrated budget vs monolithic, and accuracy / MFLOPs per exit."""
    fraction = rows[0].get("fraction", fraction)  # rows stored before it was recorded: the command line's
    print(f"\nonnxruntime CPU, batch 1, {THREADS} thread; budget = {fraction:g} x full-depth cascade call; "
          "latencies are medians of per-pass means, the runners interleaved call by call in this run, and "
          "the medians of those across fresh session instances")
    print(f"{'model':<16} {'exits':>5} {'final acc':>9} {'budget ms':>9} {'calib acc':>9} {'calib ms':>8} "
          f"{'/budget':>7} {'mono ms':>8} {'calib/mono':>10} {'full/mono':>9}")
    for r in rows:
        ms = r["ms"]
        print(f"{r['name']:<16} {r['exits']:>5} {r['final_exit_accuracy']:>9.1%} {r['budget_ms']:>9.4f} "
              f"{r['calibrated_accuracy']:>9.1%} {ms['calibrated']:>8.4f} {ms['calibrated'] / r['budget_ms']:>7.3f} "
              f"{ms['monolithic']:>8.4f} {over_mono(r, 'calibrated')[0]:>10.3f} {over_mono(r, 'full_depth')[0]:>9.3f}")
    print("\nper exit: test accuracy / cumulative MFLOPs as the papers count them (multiply-adds incl. earlier heads)")
    for r in rows:
        cells = "  ".join(f"{a:.1%} / {f:.2f}" for a, f in zip(r["exit_accuracy"], r["paper_mflops"]))
        print(f"{r['name']:<16} {r['params'] / 1e3:>7.0f}k params  {cells}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="digits,eenet,msdnet,ranet,emgnet", help="example folders")
    p.add_argument("--fraction", type=float, default=0.6, help="budget as a share of the full-depth call")
    p.add_argument("--rounds", type=int, default=5, help="timed passes over the test split")
    p.add_argument("--instances", type=int, default=3, help="fresh sessions timed, each for --rounds passes")
    p.add_argument("--bundles", help="folder holding already built bundles named like the examples")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--plot", help="also draw test accuracy vs cumulative paper MFLOPs per exit to this PNG")
    p.add_argument("--from-json", help="print (and --plot) the rows a --json run stored; builds and times nothing")
    args = p.parse_args()
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [bench_one(bundle, args.fraction, args.rounds, args.instances)
                    for bundle in example_bundles(args.models.split(","), args.bundles, Path(tmp))]
    print_rows(rows, args.fraction)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, allow_nan=False) + "\n")
    if args.plot:
        curves = {r["name"]: (r["paper_mflops"], r["exit_accuracy"]) for r in rows}
        if not plot_exit_curves(curves, Path(args.plot), "model zoo on digits: every exit on the test split"):
            print("--plot: matplotlib is not installed (pip install 'edgeexit[plot]')")
            return 1
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
