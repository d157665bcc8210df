"""Profiling and calibrating a real bundle: `edgeexit trace | profile | calibrate`, and a build
that calibrates by itself. Every latency here comes from running the bundle's backend."""

from __future__ import annotations

import functools
import importlib.util
import json

import numpy as np
import pytest

from calibration.latency import Deadlines, from_profile
from calibration.policy import FEATURES, ExitPolicy
from calibration.traces import load_traces
from conftest import example_raw, leftovers, write_spec
from edgeexit.bundle import Change, load_bundle, update_bundle
from edgeexit.calibrate import latency_source
from edgeexit.cli import main
from edgeexit.errors import BundleError
from edgeexit.jetson import TegrastatsSampler
from edgeexit.profile import MIXED_GATINGS, format_profile, interleaved_calls, profile_bundle
from edgeexit.runtime.loader import open_backend, open_monolithic
from edgeexit.tracing import split_inputs
from test_jetson import fake_tegrastats, recorded


@pytest.mark.parametrize("block", [1, 3])
def test_runners_take_turns_call_by_call_or_in_blocks_each_after_an_untimed_call(block):
    """Call by call the runners alternate; in blocks each runs one untimed call, then `block`
    timed calls in a row on consecutive inputs; every call is timed once and the order rotates."""
    seen = []
    runners = {name: functools.partial(lambda chunk, name: seen.append((name, int(chunk[0]))), name=name)
               for name in "abc"}
    seconds = interleaved_calls(runners, [np.array([i]) for i in range(4)], calls=7, warmup=1, block=block)
    assert all(len(s) == 7 and (s > 0).all() for s in seconds.values())
    timed = seen[3:]  # after the warm-up round
    if block == 1:
        assert timed[:6] == [("a", 0), ("b", 0), ("c", 0), ("b", 1), ("c", 1), ("a", 1)]
    else:  # turns over calls 0-2 (order a b c), 3-5 (b c a) and 6 (c a b); inputs cycled
        assert timed[:8] == [("a", 0), ("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 0), ("b", 1), ("b", 2)]
        assert timed[12:14] == [("b", 3), ("b", 3)] and timed[15] == ("b", 1)
        assert [n for n, _ in timed[12:]] == ["b"] * 4 + ["c"] * 4 + ["a"] * 4 + ["c"] * 2 + ["a"] * 2 + ["b"] * 2
    assert len(timed) == 7 * 3 + (0 if block == 1 else 3 * 3)


def test_profile_entry_from_real_runs(example_build):
    bundle = example_build[0]
    backend = open_backend(bundle, "onnxruntime", threads=1)
    x, _ = split_inputs(bundle, "test")
    entry = profile_bundle(backend, bundle.stage_ios, open_monolithic(bundle, "onnxruntime", threads=1),
                           bundle.monolithic_io, x, [1, 4], bundle.thresholds, iters=20, warmup=2, threads=1)
    assert entry["backend"] == "onnxruntime" and entry["machine"]["threads"] == 1
    assert entry["machine"]["libraries"]["onnxruntime"] and entry["device"] == entry["machine"]["cpu"]
    for b, row in entry["batches"].items():
        assert len(row["stages"]) == len(row["exit_calls"]) == len(row["gather_ms"]) == 3
        for s in [*row["stages"], *row["exit_calls"], *row["end_to_end"].values()]:
            assert 0 < s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] and s["calls"] == 20
        assert set(row["end_to_end"]) == {"cascade", "cascade_full", "monolithic"}
        assert sum(row["cascade_exit_shares"]) == pytest.approx(1.0)
        assert row["gather_ms"][-1] == 0 and (row["gather_ms"][0] > 0) == (b == "4")
        mixed = row["mixed_calls"]  # every timed call of the random-threshold cascades, by leave pattern
        counts = np.array(mixed["counts"])
        assert (counts[:, 0] == int(b)).all() and (np.diff(counts, axis=1) <= 0).all()
        assert sum(mixed["calls"]) == MIXED_GATINGS * 20  # 20 timed calls of each random-threshold cascade
        assert len(set(map(tuple, counts))) == len(counts) and min(mixed["ms"]) > 0
    model = from_profile(entry, "test")
    assert model.batches == (1, 4) and (np.diff(model.exit_seconds()) >= 0).all()


def test_profile_records_power_from_tegrastats(example_build, tmp_path):
    bundle = example_build[0]
    backend = open_backend(bundle, "onnxruntime", threads=1)
    x, _ = split_inputs(bundle, "test")
    sampler = functools.partial(TegrastatsSampler, command=fake_tegrastats(tmp_path, recorded("jetpack4_nano.txt")))
    entry = profile_bundle(backend, bundle.stage_ios, None, bundle.monolithic_io, x[:16], [1], bundle.thresholds,
                           iters=5, warmup=1, power=sampler)
    power = entry["batches"]["1"]["power"]
    assert power["total_rail"] == "POM_5V_IN" and power["samples"] >= 1 and power["calls"] > 0
    assert power["energy_per_inference_mj"] > 0 and "monolithic" not in entry["batches"]["1"]["end_to_end"]



def test_profile_times_the_cascade_on_the_bundle_policy(bundle_copy):
    """A bundle gated by `gating.policy` is profiled as it runs: the gated cascade on the policy."""
    bundle = load_bundle(bundle_copy)
    never = ExitPolicy(np.zeros((2, len(FEATURES))), np.full(2, -1.0))  # nobody leaves early
    bundle = update_bundle(bundle, Change(manifest={"gating": {**bundle.manifest["gating"], "policy": never.to_dict()}}))
    backend = open_backend(bundle, "onnxruntime", threads=1)
    x = split_inputs(bundle, "test")[0][:16]
    on_thresholds = profile_bundle(backend, bundle.stage_ios, None, bundle.monolithic_io, x, [1], bundle.thresholds,
                                   iters=16, warmup=1)
    assert on_thresholds["policy"] is None and on_thresholds["batches"]["1"]["cascade_exit_shares"][0] > 0
    source = latency_source(bundle, backend, "auto", 1, x, 1, iters=16)  # no profile yet: taken now, as calibrate does
    (entry,) = source.new_profile.values()
    assert entry["policy"] == never.to_dict() and entry["batches"]["1"]["cascade_exit_shares"] == [0.0, 0.0, 1.0]
    assert "gated by the exit policy" in format_profile(entry)


def test_cli_profile_then_calibrate_writes_into_the_bundle(bundle_copy, capsys, tmp_path):
    assert main(["profile", str(bundle_copy), "--batch", "1,2", "--iters", "30", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "stage 2" in out and "monolithic" in out
    bundle = load_bundle(bundle_copy)  # checksums still hold after the update
    profiles = json.loads((bundle_copy / "profile.json").read_text())["profiles"]
    assert "profile.json" in bundle.manifest["files"] and len(profiles) == 1
    curve = next(iter(profiles.values()))["anytime"]  # batch 1 profiled: accuracy vs deadline, on the call tails
    assert "anytime (run --deadline-ms)" in out and f"{curve[-1]['deadline_ms']:>11.4f}" in out
    assert [r["deepest_exit"] for r in curve] == sorted(r["deepest_exit"] for r in curve) and curve[-1]["cut_off"] == 0
    tails = Deadlines(next(iter(profiles.values())), "p").exit_seconds() * 1e3
    assert curve[0]["deadline_ms"] == pytest.approx(tails[0]) and not curve[0]["late"]
    if importlib.util.find_spec("matplotlib"):
        assert "anytime.png" in bundle.manifest["files"] and (bundle_copy / "anytime.png").read_bytes()[:4] == b"\x89PNG"
    model = from_profile(next(iter(profiles.values())), "p")
    # halfway between a call leaving at exit 0 and a full-depth call (exit 0 and exit 1 can be
    # within noise of each other on a busy machine), rounded as it is passed on the command line
    # (the bound is checked against the budget calibrate was given, not a value 1e-9 ms below it)
    budget_ms = round(float(model.exit_seconds()[[0, -1]].mean() * 1e3), 6)

    assert main(["trace", str(bundle_copy), "--split", "val", "--out", str(tmp_path / "val.npz")]) == 0
    capsys.readouterr()
    val = load_traces(tmp_path / "val.npz")
    assert val.conf.shape == (270, 3) and val.meta["split"] == "val"

    assert main(["calibrate", str(bundle_copy), "--budget-ms", repr(budget_ms), "--latency", "profile",
                 "--val-traces", str(tmp_path / "val.npz"), "--quiet", "--json", "--accept-miss"]) == 0
    record = json.loads(capsys.readouterr().out)
    bundle = load_bundle(bundle_copy)
    assert bundle.thresholds == record["thresholds"] and bundle.manifest["calibration"] == "calibration.json"
    assert json.loads((bundle_copy / "calibration.json").read_text())["thresholds"] == record["thresholds"]
    assert record["fit"]["bound_ms"] <= budget_ms and record["splits"]["fit"]["samples"] == 270
    measured = record["measured"]["chosen"]
    assert measured["calls"] == 5 * 269 and measured["ratio"] == pytest.approx(measured["mean_ms"] / record["budget"]["ms"])
    assert record["held"] == (measured["ratio"] <= 1.05)
    assert record["baseline"] is None or record["test"]["accuracy"] >= 0
    assert len(record["pareto"]) == 16 and record["latency"]["estimate"] is False
    anytime = record["anytime"]  # batch 1: the accuracy an input gets under a deadline, per deadline
    assert [r["deepest_exit"] for r in anytime] == sorted(r["deepest_exit"] for r in anytime)
    assert anytime[-1]["cut_off"] == 0 and anytime[-1]["accuracy"] == pytest.approx(record["test"]["accuracy"])
    pytest.importorskip("matplotlib")
    assert (bundle_copy / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert (bundle_copy / "anytime.png").read_bytes()[:4] == b"\x89PNG"


def test_a_missed_budget_is_a_failure_and_writes_no_thresholds(bundle_copy, capsys, tmp_path):
    """A profile 50x faster than this machine (as if taken on another device, stored under this
    machine's key): the model says the budget holds, the re-measured cascade misses it by far.
    calibrate exits 3 and the bundle keeps its thresholds; --accept-miss writes them."""
    assert main(["profile", str(bundle_copy), "--batch", "1", "--iters", "20", "--quiet"]) == 0
    capsys.readouterr()
    profiles = json.loads((bundle_copy / "profile.json").read_text())
    key, entry = next(iter(profiles["profiles"].items()))

    def faster(value):
        if isinstance(value, dict):
            return {k: (v / 50 if k.endswith("_ms") and isinstance(v, float) else faster(v)) for k, v in value.items()}
        if isinstance(value, list):
            return [v / 50 if isinstance(v, float) else faster(v) for v in value]
        return value

    fake = dict(entry, batches=faster(entry["batches"]))
    from edgeexit.profile import PROFILE

    update_bundle(load_bundle(bundle_copy), lambda b: Change(
        {PROFILE: (json.dumps({**profiles, "profiles": {key: fake}}) + "\n").encode()}, {"profile": PROFILE}))
    model = from_profile(fake, "fake")
    budget_ms = repr(round(float(model.exit_seconds()[-1] * 1e3), 6))  # full depth, on the fake profile
    before = load_bundle(bundle_copy).thresholds
    args = ["calibrate", str(bundle_copy), "--budget-ms", budget_ms, "--latency", "profile", "--json", "--quiet"]
    assert main(args) == 3
    record = json.loads(capsys.readouterr().out)
    assert record["held"] is False and record["measured"]["chosen"]["ratio"] > 5 and record["deployed"] is None
    bundle = load_bundle(bundle_copy)
    assert bundle.thresholds == before and "calibration" not in bundle.manifest
    assert main(args + ["--accept-miss"]) == 0
    accepted = json.loads(capsys.readouterr().out)
    bundle = load_bundle(bundle_copy)
    assert accepted["held"] is False and accepted["deployed"] == "thresholds"
    assert bundle.manifest["calibration"] == "calibration.json" and bundle.thresholds == accepted["thresholds"]


def test_calibrate_with_risk_control_certifies_and_reports_the_price(bundle_copy, capsys):
    """--risk consistency: Learn-then-Test's shared threshold, its certified bounds, the test
    split's risk, and the optimiser's accuracy at the same budget beside it."""
    assert main(["profile", str(bundle_copy), "--batch", "1", "--iters", "20", "--quiet"]) == 0
    capsys.readouterr()
    profiles = json.loads((bundle_copy / "profile.json").read_text())["profiles"]
    budget_ms = repr(round(float(from_profile(next(iter(profiles.values())), "p").exit_seconds()[-1] * 1e3), 6))
    args = ["calibrate", str(bundle_copy), "--budget-ms", budget_ms, "--latency", "profile", "--risk", "consistency",
            "--epsilon", "0.1", "--delta", "0.2", "--accept-miss", "--quiet"]
    assert main(args + ["--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    r = record["risk"]
    assert r["risk"] == "consistency" and r["samples"] == 270 and r["risk_bound"] <= 0.1
    assert r["latency_bound_ms"] <= float(budget_ms) and len(set(record["thresholds"][:-1])) == 1
    assert r["risk_mean"] <= r["risk_bound"] and 0 <= r["test_risk"] <= 1 and r["optimise_test"]["accuracy"] > 0
    assert load_bundle(bundle_copy).thresholds == record["thresholds"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "certified (Learn-then-Test, 270 validation samples): with probability >= 0.8, consistency risk <=" in out
    assert "price of the guarantee: the optimiser's thresholds at this budget score" in out
    assert main(args + ["--batch", "8"]) == 2
    assert "--risk: certifies call latency at batch 1" in capsys.readouterr().err
    assert main(args + ["--tail", "p95", "--json"]) == 0  # the p95: the share of calls over the budget is certified
    r = json.loads(capsys.readouterr().out)["risk"]
    assert r["tail"] == 0.95 and r["over_budget_bound"] <= 0.05 and r["latency_ms"] <= float(budget_ms)


def test_run_with_a_deadline_needs_a_profile_and_marks_inputs_cut_off(bundle_copy, digits_raw, tmp_path, capsys):
    """`run --deadline-ms`: refused in one line without a profile of this machine; with one, a
    deadline below exit 1's predicted cost answers every input from exit 0, marking cut off
    those the thresholds would have sent deeper; a generous one changes nothing."""
    raw = digits_raw[0][-30:]
    np.save(tmp_path / "images.npy", raw)
    run = ["run", str(bundle_copy), "--input", str(tmp_path / "images.npy"), "--json", "--thresholds", "0.999,0.999,"]
    assert main(run + ["--deadline-ms", "1000"]) == 2
    assert "--deadline-ms: profile.json has no entry 'onnxruntime@" in capsys.readouterr().err
    assert main(["profile", str(bundle_copy), "--batch", "1", "--iters", "20", "--quiet"]) == 0
    capsys.readouterr()
    assert main(run) == 0
    plain = json.loads(capsys.readouterr().out)["samples"]
    assert main(run + ["--deadline-ms", "100000"]) == 0
    roomy = json.loads(capsys.readouterr().out)["samples"]
    assert [r["exit"] for r in roomy] == [r["exit"] for r in plain] and not any(r["cut_off"] for r in roomy)
    assert main(run + ["--deadline-ms", "0.000001"]) == 0
    out, err = capsys.readouterr()
    tight = json.loads(out)["samples"]
    assert "a call answered by exit 0 alone takes up to" in err  # below stage 0's tail: said, still answered
    assert all(r["exit"] == 0 for r in tight) and [r["cut_off"] for r in tight] == [r["exit"] > 0 for r in plain]
    assert any(r["cut_off"] for r in tight)
    assert main(run[:-3] + ["--thresholds", "0.999,0.999,", "--deadline-ms", "0.000001"]) == 0
    assert "cut off (answered from the last exit that could finish in time)" in capsys.readouterr().out


def test_operating_points_are_kept_by_name_and_run_switches_between_them(bundle_copy, digits_raw, tmp_path, capsys):
    """Two calibrations with --point keep two threshold vectors in the manifest (sealed); run
    gates on one by name, or on the most accurate whose budget fits --budget-ms."""
    assert main(["profile", str(bundle_copy), "--batch", "1", "--iters", "20", "--quiet"]) == 0
    capsys.readouterr()
    model = from_profile(next(iter(json.loads((bundle_copy / "profile.json").read_text())["profiles"].values())), "p")
    cheap, full = (round(float(v * 1e3), 6) for v in model.exit_seconds()[[0, -1]])
    for name, budget in (("battery", cheap * 1.3), ("quality", full * 1.5)):
        assert main(["calibrate", str(bundle_copy), "--budget-ms", repr(budget), "--latency", "profile", "--point", name,
                     "--no-measure", "--quiet"]) == 0
    capsys.readouterr()
    points = load_bundle(bundle_copy).manifest["gating"]["operating_points"]
    assert set(points) == {"battery", "quality"} and points["battery"]["budget_ms"] < points["quality"]["budget_ms"]
    assert points["battery"]["accuracy"] <= points["quality"]["accuracy"]
    np.save(tmp_path / "images.npy", digits_raw[0][-20:])
    run = ["run", str(bundle_copy), "--input", str(tmp_path / "images.npy"), "--json"]
    exits = {}
    for how in (["--point", "battery"], ["--point", "quality"], ["--budget-ms", repr(full * 2)]):
        assert main(run + how) == 0
        captured = capsys.readouterr()
        exits[how[1]] = [r["exit"] for r in json.loads(captured.out)["samples"]]
        assert "operating point" in captured.err
    assert exits[repr(full * 2)] == exits["quality"]  # the most accurate that fits a roomy budget
    assert sum(exits["battery"]) <= sum(exits["quality"])
    assert main(run + ["--point", "turbo"]) == 2
    assert "--point: the bundle has no operating point 'turbo' (battery, quality)" in capsys.readouterr().err
    assert main(run + ["--budget-ms", "0.000001"]) == 2
    assert "--budget-ms: no operating point of the bundle fits" in capsys.readouterr().err


def test_calibration_profiles_only_the_batch_sizes_missing_and_interpolates_between(bundle_copy, capsys):
    """Profiled at 1 and 8, a budget at batch 4 is priced by interpolation (nothing measured);
    one at batch 16 profiles 4 and 16 and adds them: 1 and 8 are kept."""
    assert main(["profile", str(bundle_copy), "--batch", "1,8", "--iters", "20", "--quiet"]) == 0
    capsys.readouterr()
    bundle = load_bundle(bundle_copy)
    backend = open_backend(bundle, "onnxruntime", threads=1)
    x, _ = split_inputs(bundle, "test")
    said = []
    source = latency_source(bundle, backend, "auto", 4, x, 1, 20, said.append)
    assert source.new_profile is None and source.model.batches == (1, 8) and said == []
    source = latency_source(bundle, backend, "auto", 16, x, 1, 20, said.append)
    assert source.model.batches == (1, 4, 8, 16) and list(next(iter(source.new_profile.values()))["batches"]) == ["4", "16"]
    assert "has batch sizes 1, 8; adding [4, 16] now" in said[0]
    from edgeexit.profile import with_profiles

    merged = json.loads(with_profiles(bundle.path, source.new_profile)["profile.json"])["profiles"]
    assert sorted(next(iter(merged.values()))["batches"], key=int) == ["1", "4", "8", "16"]
    with pytest.raises(Exception, match="no entry .* with batch 1 and a batch size of at least 32"):
        latency_source(bundle, backend, "profile", 32, x, 1, 20, said.append)


def test_a_noisy_profile_row_is_measured_again_then_flagged(monkeypatch):
    import edgeexit.profile as prof

    rows = iter([{"exit_calls": [{"p50_ms": 1.0, "p99_ms": 9.0}]}, {"exit_calls": [{"p50_ms": 1.0, "p99_ms": 7.0}]},
                 {"exit_calls": [{"p50_ms": 1.0, "p99_ms": 2.0}]}, {"exit_calls": [{"p50_ms": 1.0, "p99_ms": 8.0}]}])
    calls = []
    monkeypatch.setattr(prof, "profile_batch", lambda *a, **k: calls.append(a[5]) or next(rows))
    monkeypatch.setattr(prof, "machine_facts", lambda *a: {"cpu": "c", "threads": 1})
    monkeypatch.setattr(prof, "device_id", lambda facts: "c")
    said = []
    entry = prof.profile_bundle(type("B", (), {"name": "onnxruntime"})(), [], None, None, np.zeros((4, 1)), [1, 8],
                                [None], iters=2, progress=said.append)
    assert calls == [1, 1, 8]  # batch 1 measured twice (9x, then 7x: still noisy), batch 8 once (2x: quiet)
    assert entry["batches"]["1"]["noisy"] and entry["batches"]["1"]["noise"] == 7.0
    assert "noisy" not in entry["batches"]["8"] and entry["batches"]["8"]["noise"] == 2.0
    assert any("profiling batch 1 again: p99/p50 of a call 9.0 > 5" in line for line in said)


def test_calibrate_refuses_an_impossible_budget_and_leaves_the_bundle(bundle_copy, capsys):
    before = (bundle_copy / "manifest.json").read_text()
    assert main(["calibrate", str(bundle_copy), "--budget-ms", "0.000001", "--quiet", "--no-measure"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgeexit: error: --budget-ms: 1e-06 ms cannot hold")  # --quiet
    assert main(["calibrate", str(bundle_copy), "--budget-ms", "0.000001", "--no-measure"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("edgeexit: error: --budget-ms: 1e-06 ms cannot hold")
    assert not any(line.startswith("traces:") for line in err)  # refused before tracing any split
    assert (bundle_copy / "manifest.json").read_text() == before and not (bundle_copy / "calibration.json").exists()


def test_estimate_for_a_device_without_peak_figures_says_what_to_do(bundle_copy, capsys):
    assert main(["calibrate", str(bundle_copy), "--budget-ms", "1", "--latency", "estimate", "--quiet"]) == 2
    assert "no peak figures" in capsys.readouterr().err


def test_estimate_for_a_jetson_target(example_build):
    from edgeexit.bundle import Bundle
    from edgeexit.calibrate import estimated_latency

    bundle = example_build[0]
    jetson = Bundle(bundle.path, {**bundle.manifest, "target": {**bundle.manifest["target"],
                                                               "device": "jetson-orin-nano-8gb"}})
    model = estimated_latency(jetson, [1, 8])
    assert model.estimate and "estimate" in model.source
    assert (model.stage[1] > model.stage[0]).all() and (np.diff(model.exit_seconds()) > 0).all()


def test_update_bundle_is_atomic_and_never_writes_through(bundle_copy):
    bundle = load_bundle(bundle_copy)
    weights = (bundle_copy / "weights.pt").read_bytes()
    with pytest.raises(BundleError, match="points outside the bundle"):
        update_bundle(bundle, Change({"../escape.json": b"{}"}))
    with pytest.raises(BundleError, match="cannot write manifest.json"):
        update_bundle(bundle, Change({"manifest.json": b"{}"}))
    updated = update_bundle(bundle, Change({"notes/extra.json": b"{}"}, {"note": 1}))
    assert updated.manifest["note"] == 1 and "notes/extra.json" in updated.manifest["files"]
    assert (bundle_copy / "weights.pt").read_bytes() == weights
    assert leftovers(bundle_copy.parent) == []  # no partial or old dirs left


@pytest.mark.slow
def test_build_with_a_budget_on_the_host_calibrates_itself(tmp_path, capsys):
    raw = example_raw()
    raw.update(train={**raw["train"], "epochs": 4}, budget={"latency_ms": 1.0}, output="out")
    assert main(["build", str(write_spec(tmp_path, raw)), "--quiet"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "calibrated against the latency budget" in out and "measured on the test split" in out
    bundle = load_bundle(tmp_path / "out")
    record = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert bundle.thresholds == record["thresholds"] and "profile.json" in bundle.manifest["files"]
    # the table shows the thresholds the bundle ships, as people read them, and says where they came from
    from calibration.gating import describe_thresholds

    shown = describe_thresholds(bundle.thresholds)
    assert "thresholds calibrated for the latency budget (the yaml's were 0.95, 0.9, all)" in out
    table = [line.split() for line in out.splitlines() if line[:4].strip().isdigit()][:3]
    assert [row[2] for row in table] == shown
    assert "None" not in captured.err and "calibrated: thresholds " + ", ".join(shown) in captured.err
    assert not any(len(t) > 6 for t in shown)  # 0.7722, never, all: no raw 17-digit floats
    # report.json (and tradeoff.png, made from it) describe the thresholds shipped, not the yaml's
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["thresholds"] == bundle.thresholds and report["yaml_thresholds"] == [0.95, 0.9, None]
    assert "report.json" in bundle.manifest["files"]


def test_profile_rows_merge_only_when_measured_under_the_same_conditions():
    from edgeexit.profile import merged_entry

    facts = {"cpu": "c", "threads": 1, "libraries": {"onnxruntime": "1"}}
    old = {"machine": facts, "batches": {"1": "a", "8": "b"}}
    new = {"machine": dict(facts), "batches": {"8": "c", "32": "d"}}
    assert merged_entry(old, new)["batches"] == {"1": "a", "8": "c", "32": "d"}
    other = {"machine": {**facts, "threads": 2}, "batches": {"32": "d"}}
    assert merged_entry(old, other)["batches"] == {"32": "d"}  # other threads: the old rows would mislead
    assert merged_entry(None, new) is new
