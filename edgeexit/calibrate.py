"""`edgeexit calibrate`: per-exit thresholds that meet a latency budget, proven on held-out data.

Steps: trace the bundle on its validation and test splits (every exit evaluated), get a
latency model (the bundle's `profile.json` for this backend and device, a fresh profile,
or an estimate from the target device's peak figures), fit the geometric baseline and the
optimiser on the validation split, score both on the test split, re-measure the chosen
thresholds by running the cascade on the test split, and write `calibration.json`, the
Pareto plot and the new thresholds into the bundle (one atomic update).

`--solver policy` also trains an exit policy (`calibration.policy`) on the same split,
budget and latency model, reports and measures it next to both threshold solvers and,
when it beats the optimiser's thresholds on the validation split with the budget's
confidence, writes it as the manifest's `gating.policy` (the runtime then gates on it; the
optimiser's thresholds stay for when it is removed). Any other solver removes a policy.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from calibration.anytime import anytime_curve, deadline_grid, format_anytime
from calibration.gating import describe_thresholds
from calibration.latency import SOURCES, Deadlines, LatencyModel, WorstOf, estimate, from_profile
from calibration.policy import ExitPolicy, PolicyFit, fit_policy, policy_point
from calibration.risk import certify, losses
from calibration.solvers import SOLVERS, Budget, Scorer, best_feasible, geometric, optimise, tail_seconds
from calibration.traces import Traces, load_traces
from edgeexit.bundle import Bundle, Change, update_bundle
from edgeexit.errors import EdgeExitError
from edgeexit.jsonio import dumps
from edgeexit.plots import plot_anytime, plot_pareto
from edgeexit.profile import (PROFILE, device_id, interleaved_calls, machine_facts, merged_entry, profile_bundle,
                              profile_key, read_profiles, with_profiles)
from edgeexit.runtime.backend import Backend
from edgeexit.runtime.cascade import Cascade
from edgeexit.tracing import record_traces, split_inputs

CALIBRATION = "calibration.json"
PARETO_PNG = "pareto.png"
ANYTIME_PNG = "anytime.png"
LAUNCH_S = 50e-6  # assumed per-call launch/enqueue time of an estimate (a TensorRT context on a Jetson)
DISABLED = 2.0  # a threshold above every confidence (all kinds lie in [0, 1]): the exit never retires a sample


def runtime_thresholds(thresholds: Sequence[float | None]) -> list[float | None]:
    """A solver's thresholds as the manifest and the runtime take them: the solvers mark an
    early exit they never leave at with None, the runtime allows null at the last exit only."""
    return [DISABLED if t is None else t for t in thresholds[:-1]] + [None]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def profile_batches(batch: int) -> list[int]:
    """Batch sizes to profile for a budget at `batch`: enough points to interpolate compacted batches."""
    return sorted({1, max(1, batch // 4), max(1, batch // 2), batch})


def estimated_latency(bundle: Bundle, batches: Sequence[int]) -> LatencyModel:
    """Roofline estimate for the bundle's target device from its peak figures (marked as an estimate)."""
    from edgeexit.devices import load_device

    device = load_device(bundle.manifest["target"]["device"])
    peak = device.peak
    per_precision = {"fp32": peak.fp32_tflops, "fp16": peak.fp16_tflops, "int8": peak.int8_tops}
    stages = bundle.manifest["stages"]
    ops = [per_precision.get(s["precision"]) for s in stages]
    if any(o is None for o in ops) or peak.memory_bandwidth_gbs is None:
        raise EdgeExitError(f"latency: device {device.name} has no peak figures to estimate from; profile the bundle "
                            "on the device (`edgeexit profile`) and calibrate with --latency profile")
    width = {"fp32": 4, "fp16": 2, "int8": 1}
    return estimate([s["flops"] for s in stages], [s["params"] * width[s["precision"]] for s in stages],
                    [s.get("activation_bytes", 0) for s in stages], [o * 1e12 for o in ops],
                    peak.memory_bandwidth_gbs * 1e9, LAUNCH_S,
                    f"estimate: {device.name} peak figures, {LAUNCH_S * 1e6:g} us per call", batches)


@dataclass(frozen=True)
class Risk:
    """`--risk KIND --epsilon E --delta D`: what Learn-then-Test certifies (calibration.risk)."""

    kind: str  # consistency | accuracy
    epsilon: float
    delta: float


@dataclass
class LatencySource:
    model: LatencyModel | WorstOf
    measured_here: bool  # the numbers describe this machine, so a re-measured cascade can check them
    new_profile: dict[str, Any] | None = None  # a profile taken now, to store in the bundle
    deadlines: Deadlines | None = None  # tail prices for anytime prediction (one measured entry only)


def covers(entry: dict[str, Any], batch: int) -> bool:
    """Whether a profile entry prices every call of a budget at `batch`: it has batch 1 (the
    floor) and a size at or above `batch`; the sizes between are interpolated (the cost model)."""
    sizes = {int(b) for b in entry["batches"]}
    return 1 in sizes and max(sizes) >= batch


def _measured(entry: dict[str, Any], key: str, say: Callable[[str], None], here: bool,
              new: dict[str, Any] | None = None) -> LatencySource:
    """The latency source of one measured profile entry (`here`: this machine's)."""
    return LatencySource(_model_of(entry, key, say), here, new, Deadlines(entry, f"profile.json[{key}]"))


def _model_of(entry: dict[str, Any], key: str, say: Callable[[str], None]) -> LatencyModel:
    noisy = [b for b, row in entry["batches"].items() if row.get("noisy")]
    if noisy:
        say(f"latency: profile.json[{key}] batch {', '.join(noisy)} is flagged noisy (p99/p50 of a call above the "
            "bound twice); the budget may not hold: profile again on a quiet machine")
    return from_profile(entry, f"profile.json[{key}]")


def _stored_entry(profiles: dict[str, Any], key: str, batch: int) -> dict[str, Any]:
    """profile.json entry `key`, refused in one line when it cannot price `batch`."""
    stored = profiles.get(key)
    if stored is None or not covers(stored, batch):
        raise EdgeExitError(f"--profile-key: profile.json has no entry {key!r} with batch 1 and a batch size of at "
                            f"least {batch}" + ("" if stored is None else f" (it has {', '.join(stored['batches'])})"))
    return stored


def latency_source(bundle: Bundle, backend: Backend, kind: str, batch: int, x: np.ndarray,
                   threads: int | None, iters: int, say: Callable[[str], None] = log,
                   key: str | Sequence[str] | None = None) -> LatencySource:
    """The latency model `kind` asks for: `profile` (the bundle's profile.json entry for this
    backend and device), `estimate` (the target's peak figures), or `auto`: the stored profile,
    else a profile taken now when the bundle targets this kind of machine, else the estimate.
    `key` names another machine's entry (``<backend>@<device>``, e.g. one `deploy --profile`
    brought back from a Jetson): only that entry is used, and nothing is measured here. Several
    keys (a fleet) give the worst of their models, so a budget holds on every one of them."""
    wanted = profile_batches(batch)
    if kind == "estimate":
        return LatencySource(estimated_latency(bundle, wanted), False)
    facts = machine_facts(backend, threads)
    here = profile_key(backend.name, device_id(facts))
    profiles = read_profiles(bundle.path)["profiles"]
    keys = [key] if isinstance(key, str) else list(key or [])
    if len(keys) > 1:
        return LatencySource(WorstOf(tuple(_model_of(_stored_entry(profiles, k, batch), k, say) for k in keys)), False)
    if keys:
        return _measured(_stored_entry(profiles, keys[0], batch), keys[0], say, keys[0] == here)
    stored = profiles.get(here)
    if stored is not None and covers(stored, batch):
        return _measured(stored, here, say, True)
    key = here
    if stored is not None and stored.get("machine") != facts:
        stored = None  # measured under other conditions (threads, libraries, power mode): measure every size anew
    missing = [b for b in wanted if stored is None or str(b) not in stored["batches"]]
    if kind == "profile":
        raise EdgeExitError(f"latency: profile.json has no entry {key!r} with batch 1 and a batch size of at least "
                            f"{batch}; run `edgeexit profile {bundle.path} --backend {backend.name} --batch "
                            f"{','.join(map(str, missing))}` first")
    from edgeexit.devices import load_device

    target = load_device(bundle.manifest["target"]["device"])
    if target.kind != "host" and backend.name == "onnxruntime":
        say(f"latency: the bundle targets {target.name} and this is not it: estimating from its peak figures")
        return LatencySource(estimated_latency(bundle, wanted), False)
    say(f"latency: no profile for {key}; profiling batch sizes {missing} now" if stored is None else
        f"latency: profile.json[{key}] has batch sizes {', '.join(stored['batches'])}; adding {missing} now")
    from edgeexit.runtime.loader import bundle_policy, open_monolithic, opened

    with opened(open_monolithic(bundle, backend.name, threads=threads)) as mono:
        entry = profile_bundle(backend, bundle.stage_ios, mono, bundle.monolithic_io, x, missing, bundle.thresholds,
                               iters=iters, threads=threads, policy=bundle_policy(bundle))
    return _measured(merged_entry(stored, entry), key, say, True, {key: entry})


def measure_calls(backend: Backend, bundle: Bundle, x: np.ndarray, batch: int,
                  gatings: dict[str, Sequence[float | None] | ExitPolicy], rounds: int = 5,
                  warmup: int = 20) -> dict[str, np.ndarray]:
    """(rounds, calls) seconds of every cascade call over `x` in calls of `batch`, per named
    gating (a threshold vector or an exit policy), interleaved call by call so that noise
    hits them alike."""
    cascades = {name: Cascade(backend, bundle.stage_ios, bundle.thresholds, g) if isinstance(g, ExitPolicy)
                else Cascade(backend, bundle.stage_ios, runtime_thresholds(g)) for name, g in gatings.items()}
    chunks = [x[i:i + batch] for i in range(0, len(x) - batch + 1, batch)]
    calls = interleaved_calls(cascades, chunks, rounds * len(chunks), warmup)
    return {name: seconds.reshape(rounds, len(chunks)) for name, seconds in calls.items()}


def measured_figures(calls: np.ndarray, budget: Budget) -> dict[str, float]:
    """Mean and p95 of measured calls ((rounds, calls) seconds) and their ratio to the budget.

    Each figure is taken per pass over the split and the median pass reported, so one pass
    disturbed by the machine does not decide the verdict."""
    mean = float(np.median(calls.mean(axis=1)))
    p95 = float(np.median(tail_seconds(calls, 0.95)))
    figure = mean if budget.tail is None else float(np.median(tail_seconds(calls, budget.tail)))
    return {"mean_ms": mean * 1e3, "p95_ms": p95 * 1e3, "calls": int(calls.size), "passes": int(len(calls)),
            "ratio": figure / budget.seconds}


def policy_scores(fit: PolicyFit, test: Scorer) -> dict[str, Any]:
    """An exit policy's record: its rule, whether it beat the thresholds (so is deployed), and
    its fit and test points (no thresholds: the rule decides)."""
    scored = policy_point(test, fit.policy.taken(test.traces.conf, test.traces.pred))
    drop = lambda p: {k: v for k, v in p.to_dict().items() if k != "thresholds"}  # noqa: E731
    return {"rule": fit.policy.to_dict(), "significant": fit.significant, "confidence": test.budget.confidence,
            "fit": drop(fit.point), "test": drop(scored)}


def pareto(val: Traces, test: Traces, latency: LatencyModel, template: Budget, budgets: Sequence[float],
           progress: bool, policy: bool = False) -> list[dict[str, Any]]:
    """Both threshold solvers (and with `policy` the exit policy) fitted on `val` at each
    budget and scored on `test` (cost-model latency)."""
    rows = []
    for seconds in tqdm(budgets, desc="pareto", unit="budget", disable=not progress, leave=False):
        budget = Budget(seconds, template.batch, template.tail, template.confidence)
        sv, st = Scorer(val, latency, budget), Scorer(test, latency, budget)
        base = best_feasible(geometric(sv), budget)
        best = optimise(sv, start=base)
        row: dict[str, Any] = {"budget_ms": seconds * 1e3}
        for name, point in (("geometric", base), ("optimise", best)):
            row[name] = None if point is None else {"val_accuracy": point.accuracy,
                                                    **{k: v for k, v in st.point(point.thresholds).to_dict().items()
                                                       if k in ("accuracy", "mean_ms", "p95_ms")}}
        if policy:
            fitted = fit_policy(sv, start=best)
            row["policy"] = None if fitted is None else {
                "val_accuracy": fitted.point.accuracy, "significant": fitted.significant,
                **{k: v for k, v in policy_scores(fitted, st)["test"].items()
                   if k in ("accuracy", "mean_ms", "p95_ms")}}
        rows.append(row)
    return rows


def cheapest_call(latency: LatencyModel, batch: int) -> float:
    """Seconds of a call where every sample leaves at exit 0: no budget below this can hold."""
    return float(latency.batch_seconds(np.zeros((1, batch), int))[0])


def full_depth_call(latency: LatencyModel, batch: int) -> float:
    """Seconds of a call where every sample runs every stage."""
    return float(latency.batch_seconds(np.full((1, batch), latency.stages - 1))[0])


def _cannot_hold(budget: Budget, floor: float, source: str) -> str:
    return (f"--budget-ms: {budget.seconds * 1e3:g} ms cannot hold: a call where every sample leaves at exit 0 "
            f"already costs {floor * 1e3:.4g} ms ({source})")


def calibrate(bundle: Bundle, backend: Backend, budget: Budget, solver: str = "optimise", latency: str = "auto",
              val_traces: str | Path | None = None, test_traces: str | Path | None = None,
              data: dict[str, str | None] | None = None, threads: int | None = 1, iters: int = 200,
              measure: bool = True, curve_points: int = 16, progress: bool = True,
              latency_key: str | Sequence[str] | None = None, accept_miss: bool = False,
              risk: Risk | None = None, point: str | None = None) -> tuple[Bundle, dict[str, Any]]:
    """Fit thresholds for `budget` on the validation split, prove them on the test split and
    write them into the bundle; returns the updated bundle and the calibration record.
    `latency_key` calibrates against another machine's profile.json entry, or against the worst
    of several (a fleet: the record then scores the thresholds on each; see `latency_source`).
    A budget the re-measured cascade does not hold (record["held"] False) writes nothing but a
    profile taken now, unless `accept_miss`: the bundle keeps the thresholds it had. With
    `risk`, the thresholds are certified by Learn-then-Test instead (`calibration.risk`): risk
    and mean latency within bounds with probability >= 1 - delta over the validation draw.
    `point` also keeps them as a named operating point beside the others the bundle has."""
    if solver not in SOLVERS:
        raise EdgeExitError(f"--solver: {solver!r} is not one of {', '.join(SOLVERS)}")
    if latency not in SOURCES:
        raise EdgeExitError(f"--latency: {latency!r} is not one of {', '.join(SOURCES)}")
    if risk is not None and (budget.batch != 1 or solver != "optimise"):
        raise EdgeExitError("--risk: certifies call latency at batch 1 on the shared-threshold path; drop --batch "
                            "and --solver")
    if risk is not None and not (0 < risk.epsilon < 1 and 0 < risk.delta < 1):
        raise EdgeExitError(f"--epsilon {risk.epsilon:g} and --delta {risk.delta:g} must both lie in (0, 1)")
    data = data or {}
    x_test, y_test = split_inputs(bundle, "test", data.get("test"))
    say = log if progress else (lambda _message: None)  # --quiet: errors only
    source = latency_source(bundle, backend, latency, budget.batch, x_test, threads, iters, say, latency_key)
    lat = source.model
    floor = cheapest_call(lat, budget.batch)
    if budget.seconds < floor:  # no thresholds can help: refuse before tracing anything
        raise EdgeExitError(_cannot_hold(budget, floor, lat.source))
    traces = {}
    for split, path in (("val", val_traces), ("test", test_traces)):
        if path is not None:
            traces[split] = load_traces(path)
        else:
            x, y = (x_test, y_test) if split == "test" else split_inputs(bundle, split, data.get(split))
            say(f"traces: running every exit on the {split} split ({len(y)} samples, {backend.name})")
            traces[split] = record_traces(bundle, backend, x, y, split)
    sv, st = Scorer(traces["val"], lat, budget), Scorer(traces["test"], lat, budget)
    say(f"calibrate: {budget.metric} latency <= {budget.seconds * 1e3:g} ms at batch {budget.batch} "
        f"({lat.source}); fitting on {len(traces['val'])} validation samples")
    base = best_feasible(geometric(sv), budget)
    bar = tqdm(total=1, desc="optimise", disable=not progress or solver == "geometric", leave=False)

    def tick(done, total):
        bar.total, bar.n = total, done
        bar.refresh()

    chosen = base if solver == "geometric" else optimise(sv, start=base, progress=tick)
    certified = None  # with --risk: Learn-then-Test's thresholds replace the optimiser's (kept for the price)
    if risk is not None:
        certified = certify(traces["val"], lat.exit_seconds(), budget.seconds, risk.kind, risk.epsilon, risk.delta,
                            tail=budget.tail)
        unguarded, chosen = chosen, sv.point(certified.thresholds)
    fitted = None  # with --solver policy: the trained policy, deployed when it beats `chosen` significantly
    if solver == "policy" and chosen is not None:
        bar.set_description("policy")
        fitted = fit_policy(sv, start=chosen, progress=tick)
    bar.close()
    policy = fitted.policy if fitted is not None and fitted.significant else None
    if chosen is None:
        raise EdgeExitError(_cannot_hold(budget, floor, lat.source)
                            + ("" if solver == "optimise" else "; the optimise solver may still find a point"))
    record: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "budget": {"ms": budget.seconds * 1e3, "metric": budget.metric, "batch": budget.batch,
                   "confidence": budget.confidence if budget.tail is None else None},
        "solver": solver, "backend": backend.name, "latency": lat.to_dict(),
        "splits": {"fit": {"name": "val", "samples": len(traces["val"])},
                   "report": {"name": "test", "samples": len(traces["test"])}},
        "thresholds": runtime_thresholds(chosen.thresholds),
        "fit": chosen.to_dict(), "test": st.point(chosen.thresholds).to_dict(),
        "baseline": None if base is None else {"fit": base.to_dict(), "test": st.point(base.thresholds).to_dict()},
        "floor_ms": floor * 1e3, "full_depth_ms": full_depth_call(lat, budget.batch) * 1e3,
        "policy": None if fitted is None else policy_scores(fitted, st),
        "devices": None if not isinstance(lat, WorstOf) else {  # the shipped thresholds on each device's own model
            part.source: {k: v for k, v in Scorer(traces["test"], part, budget).point(chosen.thresholds).to_dict().items()
                          if k in ("mean_ms", "p95_ms")} for part in lat.parts},
        "deployed": "thresholds" if policy is None else "policy",  # what `edgeexit run` gates on
        "risk": None if certified is None else {
            **certified.to_dict(),
            "test_risk": float(losses(traces["test"], st.taken(chosen.thresholds), risk.kind).mean()),
            # the price of the guarantee: the optimiser's thresholds at the same budget, on the same test split
            "optimise_test": None if unguarded is None else st.point(unguarded.thresholds).to_dict()},
    }
    if measure and source.measured_here:
        gatings = ({"chosen": chosen.thresholds} | ({"baseline": base.thresholds} if base is not None else {})
                   | ({"policy": fitted.policy} if fitted is not None else {}))
        say(f"measure: running the cascade on the test split at batch {budget.batch} to check the budget")
        calls = measure_calls(backend, bundle, x_test, budget.batch, gatings)
        record["measured"] = {name: measured_figures(c, budget) for name, c in calls.items()}
        record["held"] = record["measured"]["chosen" if policy is None else "policy"]["ratio"] <= 1.05
    else:
        record["measured"] = None
        record["held"] = None  # an estimate: only the device can tell
    if source.deadlines is not None:  # anytime: one input per call, under a deadline, as `run --deadline-ms` prices it
        tails = source.deadlines.exit_seconds()
        record["anytime"] = anytime_curve(traces["test"], tails, record["thresholds"], deadline_grid(tails))
    budgets = np.linspace(floor, record["full_depth_ms"] / 1e3, curve_points + 1)[1:]
    record["pareto"] = pareto(traces["val"], traces["test"], lat, budget, budgets, progress, solver == "policy")
    png = png_bytes(functools.partial(plot_pareto, record, bundle.name))
    anytime_png = (png_bytes(functools.partial(plot_anytime, record["anytime"], record["splits"]["report"]["samples"],
                                               bundle.name)) if record.get("anytime") else None)
    if png is None:
        say("calibrate: no pareto.png: matplotlib is not installed (pip install 'edgeexit[plot]')")

    missed = record["held"] is False and not accept_miss
    if missed:
        record["deployed"] = None  # nothing written: the bundle keeps its thresholds

    def change(current: Bundle) -> Change:  # computed under the bundle's lock, from its state then
        files: dict[str, bytes] = {}
        updates: dict[str, Any] = {}
        if source.new_profile:  # a measurement: kept even when the budget is missed
            files.update(with_profiles(current.path, source.new_profile))
            updates["profile"] = PROFILE
        if missed:
            return Change(files, updates)
        files[CALIBRATION] = (dumps(record) + "\n").encode()
        updates["calibration"] = CALIBRATION
        if png is not None:
            files[PARETO_PNG] = png
        if anytime_png is not None:
            files[ANYTIME_PNG] = anytime_png
        gating = {k: v for k, v in current.manifest["gating"].items() if k != "policy"}  # a stale policy goes
        gating["thresholds"] = record["thresholds"]
        if point is not None:
            gating["operating_points"] = {**(gating.get("operating_points") or {}), point: {
                "budget_ms": record["budget"]["ms"], "metric": record["budget"]["metric"],
                "batch": record["budget"]["batch"], "thresholds": record["thresholds"],
                "accuracy": record["test"]["accuracy"], "mean_ms": record["test"]["mean_ms"],
                "latency": record["latency"]["source"], "created": record["created"]}}
        if policy is not None:
            gating["policy"] = policy.to_dict()
        return Change(files, {**updates, "gating": gating})

    if missed and not source.new_profile:
        return bundle, record
    return update_bundle(bundle, change), record


def png_bytes(draw: Callable[[Path], bool]) -> bytes | None:
    """The PNG bytes one of edgeexit.plots' writers draws (`draw(path)`), or None without matplotlib."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plot.png"
        return path.read_bytes() if draw(path) else None


def format_calibration(record: dict[str, Any], curve: bool = True) -> str:
    """What `edgeexit calibrate` (and a build with a budget) prints: the outcome and the curve."""
    b, test = record["budget"], record["test"]
    shown = ", ".join(describe_thresholds(record["thresholds"]))
    r = record.get("risk")
    lines = [f"budget: {b['metric']} call latency <= {b['ms']:.4g} ms at batch {b['batch']} "
             f"({record['latency']['source']})",
             *([f"certified (Learn-then-Test, {r['samples']} validation samples): with probability >= "
                f"{1 - r['delta']:g}, {r['risk']} risk <= {r['epsilon']:g} and {b['metric']} latency <= "
                f"{b['ms']:.4g} ms (risk {r['risk_mean']:.4g} on validation, {r['test_risk']:.4g} on test; at this "
                f"threshold the bounds reach {r['risk_bound']:.4g} and "
                + (f"{r['latency_bound_ms']:.4g} ms)" if r.get("tail") is None else
                   f"{r['over_budget_bound']:.3g} of calls over the budget)")] if r else []),
             *([f"price of the guarantee: the optimiser's thresholds at this budget score "
                f"{r['optimise_test']['accuracy']:.2%} on the test split"] if r and r["optimise_test"] else []),
             # with --solver policy the thresholds are the optimise solver's (the policy starts from them)
             f"thresholds ({'risk-controlled' if r else 'optimise' if record['solver'] == 'policy' else record['solver']}):"
             f" {shown}",
             f"test split ({record['splits']['report']['samples']} samples): accuracy {test['accuracy']:.2%}, "
             f"modelled mean {test['mean_ms']:.4g} ms, p95 {test['p95_ms']:.4g} ms, exit shares "
             + " / ".join(f"{s:.1%}" for s in test["exit_shares"])]
    for source, figures in (record.get("devices") or {}).items():
        lines.append(f"  on {source}: modelled mean {figures['mean_ms']:.4g} ms, p95 {figures['p95_ms']:.4g} ms")
    m, pol, on_policy = record.get("measured"), record.get("policy"), record.get("deployed") == "policy"
    verdict = ": held (<= 1.05)" if record["held"] else ": MISSED (> 1.05)"

    def measured(c: dict[str, Any], deployed: bool) -> str:
        return (f"measured on the test split: mean {c['mean_ms']:.4g} ms, p95 {c['p95_ms']:.4g} ms over {c['calls']} "
                f"calls (median of {c['passes']} passes) -> {c['ratio']:.3f} of the budget"
                + (verdict if deployed else ""))

    if m:
        lines.append(measured(m["chosen"], not on_policy))
        if record.get("deployed") is None:
            lines.append("NOT WRITTEN: the budget did not hold on re-measurement; the bundle keeps its thresholds "
                         "(calibrate again on a quieter machine, raise --budget-ms, or --accept-miss to write them)")
    else:
        lines.append("not measured: the latency is an estimate for another device; profile on the device to check")
    base = record["baseline"]
    lines.append("geometric baseline: " + ("no feasible q" if base is None else
                 f"test accuracy {base['test']['accuracy']:.2%}, modelled mean {base['test']['mean_ms']:.4g} ms"))
    if pol:
        t = pol["test"]
        lines.append(f"exit policy (trained, lambda {pol['rule']['lambda']:.4g}): test accuracy {t['accuracy']:.2%}, "
                     f"modelled mean {t['mean_ms']:.4g} ms, p95 {t['p95_ms']:.4g} ms, exit shares "
                     + " / ".join(f"{s:.1%}" for s in t["exit_shares"]))
        if m:
            lines.append("exit policy " + measured(m["policy"], on_policy))
        lines.append("exit policy written to gating.policy: `edgeexit run` gates on it" if on_policy else
                     f"exit policy not deployed: validation accuracy {pol['fit']['accuracy']:.2%} vs the thresholds' "
                     f"{record['fit']['accuracy']:.2%} is no gain at confidence {pol['confidence']:g}")
    elif record["solver"] == "policy":
        lines.append("exit policy: no trained rule meets the budget; the thresholds gate")
    if not curve:
        return "\n".join(lines)
    names = [n for n in ("geometric", "optimise", "policy") if n in record["pareto"][0]]
    lines += ["", f"{'budget ms':>9}  " + "  ".join(f"{n + ' acc':>13}  {'ms':>7}" for n in names) + "   (test split)"]
    for row in record["pareto"]:
        cells = [f"{'-':>13}  {'-':>7}" if row[n] is None else f"{row[n]['accuracy']:>13.2%}  {row[n]['mean_ms']:>7.4f}"
                 + ("*" if not row[n].get("significant", True) else "") for n in names]
        lines.append(f"{row['budget_ms']:>9.4f}  " + "  ".join(cells))
    if "policy" in names:
        lines.append("* the trained policy, not deployed at that budget: no significant gain over the thresholds")
    if record.get("anytime"):
        lines += ["", *format_anytime(record["anytime"], "the test split")]
    return "\n".join(lines)
