"""Latency (and, on a Jetson, power) of a bundle's stages, measured on the machine it runs on.

`profile_bundle` times, per batch size and after a warm-up:
- every stage as the cascade runs it (the stage call plus the exit decision:
  `CascadeResult.stage_seconds` of a full-depth cascade run on its own);
- whole calls in which every sample leaves at exit k, what the cost model is built from
  (back-to-back calls that stop early keep their stages' weights hot in cache, which
  per-stage times inside a full-depth call miss);
- calls with real leave patterns (thresholds drawn at random quantiles of each exit's
  confidence on these samples, several cascades interleaved), what the cost model's
  mixed-stream correction is fitted on;
- the cascade's own overhead around its stages and the compaction gather after each stage;
- end to end, the monolithic graph, the full-depth cascade and the cascade as the bundle
  gates (its thresholds, or its exit policy when given one), interleaved call by call so
  that machine noise hits them alike.
The result is one `profile.json` entry, keyed by backend and device.

`per_sample_latency` is the lighter timer the build summary and the benchmarks use.
"""

from __future__ import annotations

import os
import platform
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from edgeexit.jsonio import dumps, read_json
from edgeexit.runtime.backend import Backend
from edgeexit.runtime.cascade import NEVER, Cascade, full_depth
from edgeexit.stage_io import StageIO

if TYPE_CHECKING:
    from calibration.policy import ExitPolicy

Runner = Callable[[np.ndarray], Any]
PROFILE = "profile.json"


def per_sample_latency(runners: dict[str, Runner], x: np.ndarray, rounds: int = 3, warmup: int = 20) -> dict[str, float]:
    """Mean seconds per sample at batch 1 for each runner over the samples of `x` (`call_latency`)."""
    return call_latency(runners, x, 1, rounds, warmup)


def call_latency(runners: dict[str, Runner], x: np.ndarray, batch: int, rounds: int = 3,
                 warmup: int = 20) -> dict[str, float]:
    """Mean seconds per call of `batch` samples for each runner: its fastest round of
    `latency_rounds`, the usual way to read a noisy machine."""
    return {name: float(r.min()) for name, r in latency_rounds(runners, x, batch, rounds, warmup).items()}


def latency_rounds(runners: dict[str, Runner], x: np.ndarray, batch: int, rounds: int,
                   warmup: int = 20) -> dict[str, np.ndarray]:
    """(rounds,) mean seconds per call of `batch` samples for each runner over `x` in
    consecutive chunks. Each round visits every chunk once and calls every runner on it,
    interleaved (`interleaved_calls`), so runner-to-runner ratios within a round share the
    machine's state; their spread over rounds says how far one figure can be trusted."""
    chunks = [x[i:i + batch] for i in range(0, len(x) - batch + 1, batch)]
    calls = interleaved_calls(runners, chunks, rounds * len(chunks), warmup)
    return {name: seconds.reshape(rounds, len(chunks)).mean(axis=1) for name, seconds in calls.items()}


def read_profiles(bundle_path: Path) -> dict[str, Any]:
    """The bundle's `profile.json` (empty when it has none)."""
    path = bundle_path / PROFILE
    return read_json(path, "profile", 64 << 20) if path.is_file() else {"format": 1, "profiles": {}}


def stage_predictor(bundle_path: Path, backend: Backend, threads: int | None) -> Callable[[int, int], float]:
    """What starting stage k on n samples adds to a call on this machine, from the bundle's
    profile.json entry for it (`calibration.latency.Deadlines.remainder`): what an anytime
    cascade predicts before it starts a stage."""
    from calibration.latency import Deadlines
    from edgeexit.errors import EdgeExitError

    key = profile_key(backend.name, device_id(machine_facts(backend, threads)))
    entry = read_profiles(bundle_path)["profiles"].get(key)
    if entry is None:
        raise EdgeExitError(f"--deadline-ms: profile.json has no entry {key!r}; run `edgeexit profile {bundle_path} "
                            f"--backend {backend.name}` first")
    return Deadlines(entry, f"profile.json[{key}]").remainder


def with_profiles(bundle_path: Path, entries: dict[str, dict[str, Any]]) -> dict[str, bytes]:
    """`profile.json` with `entries` (key -> entry) added, as a file for `update_bundle`. An
    entry for a key already there adds its batch sizes to that entry's: sizes measured again
    are replaced, the others kept (profiling batch 8 for a calibration keeps 32)."""
    profiles = read_profiles(bundle_path)
    for key, entry in entries.items():
        profiles["profiles"][key] = merged_entry(profiles["profiles"].get(key), entry)
    return {PROFILE: (dumps(profiles) + "\n").encode()}


def merged_entry(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """`new` with the batch sizes of `old` it did not measure, when both were measured under the
    same conditions (threads, libraries, a Jetson's power mode: the machine facts); else `new`."""
    if old is None or old.get("machine") != new.get("machine"):
        return new
    return {**new, "batches": {**old.get("batches", {}), **new["batches"]}}


def stats_ms(seconds: Sequence[float]) -> dict[str, float]:
    """Mean and percentiles of a list of durations, in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"mean_ms": float(ms.mean()), "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "calls": int(len(ms))}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts(backend: Backend, threads: int | None) -> dict[str, Any]:
    """Where the numbers were taken: CPU/GPU, Jetson power mode and clocks, library versions."""
    from edgeexit.jetson import jetson_facts

    facts: dict[str, Any] = {
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "backend": backend.name, "threads": threads,
        "libraries": {p: v for p in ("onnxruntime", "torch", "tensorrt", "pycuda", "cuda-python", "numpy")
                      if (v := _version(p)) is not None},
    }
    gpu = getattr(backend, "device_name", None)
    if gpu:
        facts["gpu"] = gpu
    capability = (getattr(backend, "gpu", None) or {}).get("compute_capability")
    if capability:
        facts["compute_capability"] = capability
    jetson = jetson_facts()
    if jetson is not None:
        facts["jetson"] = jetson
    return facts


def device_id(facts: dict[str, Any]) -> str:
    """The device a profile entry belongs to: the Jetson model, else the GPU, else the CPU."""
    if "jetson" in facts:
        return facts["jetson"].get("model") or "jetson"
    return facts.get("gpu") or facts["cpu"]


def profile_key(backend: str, device: str) -> str:
    """`profile.json` key of one backend on one device."""
    return f"{backend}@{device}"


def interleaved_calls(runners: dict[str, Runner], chunks: Sequence[np.ndarray], calls: int,
                      warmup: int, block: int = 1) -> dict[str, np.ndarray]:
    """(calls,) seconds of each runner on `chunks` cycled, after `warmup` untimed rounds; the
    runners take turns (the order rotating) so that machine noise hits them alike. Call by
    call (`block` 1) each call follows another runner's, with its caches cold; with `block` > 1
    a runner makes one untimed call, then `block` timed calls in a row, each following its own,
    as a model serving alone runs (MobileNetV3-Small at 224x224 took 20% longer cold)."""
    names = list(runners)
    for i in range(warmup):
        for name in names:
            runners[name](chunks[i % len(chunks)])
    seconds = {name: np.zeros(calls) for name in names}
    for turn, first in enumerate(range(0, calls, block)):
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            if block > 1:
                runners[name](chunks[first % len(chunks)])
            for i in range(first, min(first + block, calls)):
                start = time.perf_counter()
                runners[name](chunks[i % len(chunks)])
                seconds[name][i] = time.perf_counter() - start
    return seconds


def _gather_seconds(backend: Backend, ios: Sequence[StageIO], x: np.ndarray, iters: int) -> list[float]:
    """Mean seconds to compact every stage's carry to half its rows (the cascade's gather)."""
    rows = np.arange(0, len(x), 2)
    feeds, result = {ios[0].inputs[0]: backend.upload(x)}, []
    for k, io in enumerate(ios):
        out = backend.run(k, feeds)
        backend.download(out[io.conf])
        spent = [0.0]
        if k < len(ios) - 1 and len(x) > 1:
            spent = []
            for _ in range(iters):
                start = time.perf_counter()
                [backend.take(out[name], rows) for name in io.carry]
                backend.download(backend.take(out[io.conf], rows))  # waits for the gathers on a device
                spent.append(time.perf_counter() - start)
            out = backend.run(k, feeds)  # a gather within one bucket rewrites its source: run the stage again
        result.append(float(np.mean(spent)))
        feeds = {name: out[name] for name in io.carry}
    return result


MIXED_GATINGS = 8  # cascades with random thresholds whose calls the mixed-stream correction is fitted on


def _mixed_calls(backend: Backend, ios: Sequence[StageIO], chunks: Sequence[np.ndarray], iters: int,
                 warmup: int, seed: int = 0) -> dict[str, list] | None:
    """Calls that stop at mixed depths and compact their batches, as a deployed stream makes
    them: per distinct leave pattern (samples reaching each stage), its mean seconds and how
    many timed calls had it. None for a single-stage model."""
    k_total = len(ios)
    if k_total == 1:
        return None
    full = full_depth(backend, ios)
    conf = np.concatenate([full(chunk, collect=True).exit_conf for chunk in chunks[:iters]])
    rng = np.random.default_rng(seed)
    runners = {i: Cascade(backend, ios, [float(np.quantile(conf[:, k], q)) for k, q in
                                         enumerate(rng.uniform(size=k_total - 1))] + [None])
               for i in range(MIXED_GATINGS)}
    seconds = interleaved_calls(runners, chunks, iters, warmup)  # call j on chunk j % len(chunks)
    patterns: dict[tuple[int, ...], list[float]] = {}
    for i, cascade in runners.items():
        for c, chunk in enumerate(chunks[:iters]):
            exits = cascade(chunk).exit
            patterns.setdefault(tuple(int((exits >= k).sum()) for k in range(k_total)), []).extend(
                seconds[i][c::len(chunks)])
    return {"counts": [list(c) for c in patterns], "ms": [float(np.mean(v)) * 1e3 for v in patterns.values()],
            "calls": [len(v) for v in patterns.values()]}


def profile_batch(backend: Backend, ios: Sequence[StageIO], mono: Backend | None, mono_io: StageIO,
                  x: np.ndarray, batch: int, thresholds: Sequence[float | None], iters: int,
                  warmup: int, power: Callable[[], Any] | None = None,
                  policy: ExitPolicy | None = None) -> dict[str, Any]:
    """Every figure of one batch size; `x` (normalised, real samples) is cycled in chunks of
    `batch`. The gated cascade decides by `policy` when given one (the bundle's `gating.policy`),
    else by `thresholds`."""
    k_total = len(ios)
    full = full_depth(backend, ios)
    gated = Cascade(backend, ios, thresholds, policy)
    runners: dict[str, Cascade] = {"cascade_full": full, "cascade": gated}
    if mono is not None:
        runners["monolithic"] = Cascade(mono, [mono_io], [None])
    chunks = [np.take(x, np.arange(i, i + batch) % len(x), axis=0) for i in range(0, max(len(x), batch), batch)]
    for i in range(warmup):
        full(chunks[i % len(chunks)])
    stage, overhead = np.zeros((iters, k_total)), np.zeros(iters)
    for i in range(iters):  # the stages alone, as a deployed cascade runs them (no other graph in between)
        start = time.perf_counter()
        result = full(chunks[i % len(chunks)])
        overhead[i] = time.perf_counter() - start - result.stage_seconds.sum()
        stage[i] = result.stage_seconds
    leave_at = {k: Cascade(backend, ios, [-NEVER if j == k else NEVER for j in range(k_total - 1)] + [None])
                for k in range(k_total)}  # calls in which every sample leaves at exit k, taking turns
    exit_calls = [stats_ms(s) for s in interleaved_calls(leave_at, chunks, iters, warmup).values()]
    mixed = _mixed_calls(backend, ios, chunks, iters, warmup)
    e2e = interleaved_calls(runners, chunks, iters, warmup)
    uses = np.bincount(np.arange(iters) % len(chunks), minlength=len(chunks))  # timed calls per chunk
    exits = sum(n * np.bincount(gated(chunk).exit, minlength=k_total) for n, chunk in zip(uses, chunks) if n)
    entry = {
        "stages": [stats_ms(stage[:, k]) for k in range(k_total)],
        "gather_ms": [s * 1e3 for s in _gather_seconds(backend, ios, chunks[0], max(10, iters // 10))],
        "overhead_ms": stats_ms(np.maximum(overhead, 0.0)),
        "exit_calls": exit_calls,
        "mixed_calls": mixed,
        "end_to_end": {name: stats_ms(values) for name, values in e2e.items()},
        "cascade_exit_shares": [float(s) for s in exits / exits.sum()],
    }
    if power:
        entry["power"] = _power(gated, chunks, power)
    return entry


def _power(cascade: Cascade, chunks: list[np.ndarray], sampler: Callable[[], Any], seconds: float = 3.0) -> dict:
    """Average power per rail and energy per inference of the gated cascade alone, run for
    `seconds` under a power sampler (tegrastats on a Jetson)."""
    calls = samples = 0
    with sampler() as power:
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            chunk = chunks[calls % len(chunks)]
            cascade(chunk)
            calls, samples = calls + 1, samples + len(chunk)
    return {**power.summary(elapsed, inferences=samples), "runner": "cascade", "calls": calls}


def profile_bundle(backend: Backend, ios: Sequence[StageIO], mono: Backend | None, mono_io: StageIO,
                   x: np.ndarray, batches: Sequence[int], thresholds: Sequence[float | None],
                   iters: int = 200, warmup: int = 20, threads: int | None = None,
                   power: Callable[[], Any] | None = None,
                   progress: Callable[[str], None] | None = None,
                   policy: ExitPolicy | None = None) -> dict[str, Any]:
    """One `profile.json` entry: machine facts and `profile_batch` for every batch size (the
    gated cascade on `policy` when given, as `edgeexit run` gates a bundle that has one)."""
    facts = machine_facts(backend, threads)
    entry: dict[str, Any] = {
        "backend": backend.name, "device": device_id(facts), "machine": facts,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "iters": iters, "warmup": warmup, "thresholds": list(thresholds), "samples": int(len(x)),
        "policy": None if policy is None else policy.to_dict(),
        "stage_time": "stage call + exit decision, inside a full-depth cascade",
        "batches": {},
    }
    for b in batches:
        if progress:
            progress(f"profiling batch {b}: {iters} timed calls per runner after {warmup} warm-up")
        row = profile_batch(backend, ios, mono, mono_io, x, b, thresholds, iters, warmup, power, policy)
        row["noise"] = noise(row)
        if row["noise"] > NOISE_BOUND:  # a disturbed run: measure once more and keep the quieter
            if progress:
                progress(f"profiling batch {b} again: p99/p50 of a call {row['noise']:.1f} > {NOISE_BOUND:g} "
                         "(a busy machine)")
            again = profile_batch(backend, ios, mono, mono_io, x, b, thresholds, iters, warmup, power, policy)
            again["noise"] = noise(again)
            row = min(row, again, key=lambda r: r["noise"])
        if row["noise"] > NOISE_BOUND:
            row["noisy"] = True  # stored, but flagged: `edgeexit profile` and calibrate say so
        entry["batches"][str(b)] = row
    return entry


NOISE_BOUND = 5.0  # p99/p50 of a call above which a profile row is measured again, then flagged


def noise(row: dict[str, Any]) -> float:
    """The worst p99/p50 of a profile row's whole calls (leaving at each exit): 1-3 on a quiet
    machine, far more when something else ran during the measurement."""
    calls = row.get("exit_calls") or [row["overhead_ms"]]
    return max(c["p99_ms"] / c["p50_ms"] if c["p50_ms"] > 0 else 1.0 for c in calls)


def format_profile(entry: dict[str, Any], split: str = "the profiled split") -> str:
    """The table `edgeexit profile` prints: per batch size, per stage and end to end (ms), and
    the anytime curve where batch 1 was profiled."""
    m = entry["machine"]
    lines = [f"{entry['backend']} on {entry['device']} ({m['cpu_count']} CPUs, threads {m['threads']}; "
             f"{entry['iters']} timed calls after {entry['warmup']} warm-up)"]
    if "jetson" in m:
        j = m["jetson"]
        lines.append(f"jetson: L4T {j.get('l4t')}, power mode {j.get('nvpmodel')}, jetson_clocks {j.get('jetson_clocks')}")
    for b, row in entry["batches"].items():
        lines += ["", f"batch {b}:  {'mean':>8}  {'p50':>8}  {'p90':>8}  {'p99':>8}  (ms)"]
        named = [(f"stage {k}", s) for k, s in enumerate(row["stages"])] + [("overhead", row["overhead_ms"])]
        named += list(row["end_to_end"].items())
        for name, s in named:
            lines.append(f"{name:>14}  {s['mean_ms']:>8.4f}  {s['p50_ms']:>8.4f}  {s['p90_ms']:>8.4f}  {s['p99_ms']:>8.4f}")
        lines.append(f"{'cascade exits':>14}  " + " / ".join(f"{s:.1%}" for s in row["cascade_exit_shares"])
                     + ("  (gated by the exit policy)" if entry.get("policy") else ""))
        if row.get("noisy"):
            lines.append(f"{'NOISY':>14}  p99/p50 of a call {row['noise']:.1f} > {NOISE_BOUND:g} twice: something else "
                         "ran; profile again on a quiet machine before calibrating on it")
        if "power" in row:
            p = row["power"]
            lines.append(f"{'power':>14}  {p.get('total_power_w') or float('nan'):.2f} W, "
                         f"{p.get('energy_per_inference_mj') or float('nan'):.3f} mJ per inference ({p.get('total_rail')})")
    if entry.get("anytime"):
        from calibration.anytime import format_anytime

        lines += ["", *format_anytime(entry["anytime"], split)]
    return "\n".join(lines)
