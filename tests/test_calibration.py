"""calibration/: the latency cost model, both threshold solvers and traces, on numbers only."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from calibration.errors import CalibrationError
from calibration.gating import exits_taken
from calibration.latency import Deadlines, LatencyModel, Mixed, WorstOf, estimate, from_profile
from calibration.solvers import (
    Budget,
    Scorer,
    best_feasible,
    geometric,
    geometric_thresholds,
    optimise,
)
from calibration.traces import Traces, load_traces, save_traces


def synthetic(n: int, seed: int) -> Traces:
    """Three exits: exit 0 is right on the easy half and knows it, exit 1 costs a stage but its
    confidence says nothing, exit 2 is right on 97%. The geometric family must send a share
    through exit 1; the full threshold space can skip it."""
    rng = np.random.default_rng(seed)
    easy = rng.random(n) < 0.5
    labels = rng.integers(0, 10, n)
    wrong = (labels + 1) % 10
    conf = np.stack([np.where(easy, rng.uniform(0.7, 1.0, n), rng.uniform(0.0, 0.8, n)),
                     rng.uniform(0.0, 1.0, n), rng.uniform(0.5, 1.0, n)], axis=1).astype(np.float32)
    pred = np.stack([np.where(easy | (rng.random(n) < 0.2), labels, wrong),
                     np.where(easy | (rng.random(n) < 0.3), labels, wrong),
                     np.where(rng.random(n) < 0.97, labels, wrong)], axis=1)
    return Traces(conf, pred, labels)


MS = 1e-3
FLAT = LatencyModel((1,), np.array([[MS, MS, MS]]), np.zeros((1, 3)), np.zeros(1), "synthetic 1 ms per stage")


def test_calibration_imports_no_torch():
    code = ("import sys, calibration.solvers, calibration.latency, calibration.traces, calibration.gating; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_batch_one_cost_is_overhead_plus_the_stages_up_to_the_exit():
    model = LatencyModel((1,), np.array([[1.0, 2.0, 4.0]]) * MS, np.zeros((1, 3)), np.array([0.5 * MS]), "t")
    np.testing.assert_allclose(model.exit_seconds() / MS, [1.5, 3.5, 7.5])
    np.testing.assert_allclose(model.batch_seconds(np.array([[2], [0]])) / MS, [7.5, 1.5])


def test_compacted_batches_are_interpolated_and_pay_a_gather_only_when_they_split():
    stage = np.array([[1.0, 1.0], [5.0, 9.0]]) * MS  # batch 1 and batch 5
    gather = np.array([[0.1, 0.0], [0.5, 0.0]]) * MS
    model = LatencyModel((1, 5), stage, gather, np.array([0.0, 0.0]), "t")
    # 4 samples: stage 0 on 4 (interpolated 4 ms); 2 go on: gather of 4 rows (0.4 ms), stage 1 on 2 (3 ms)
    assert model.batch_seconds(np.array([[0, 0, 1, 1]]))[0] == pytest.approx(7.4 * MS)
    # nobody leaves at exit 0: no gather, stage 1 on all 4 (7 ms)
    assert model.batch_seconds(np.array([[1, 1, 1, 1]]))[0] == pytest.approx(11.0 * MS)
    # everyone leaves at exit 0: stage 1 never runs
    assert model.batch_seconds(np.array([[0, 0, 0, 0]]))[0] == pytest.approx(4.0 * MS)
    # above the largest profiled batch the last slope continues: stage 0 on 7 = 5 + 2 * 1
    assert model.stage_seconds(np.array([[7, 0]]))[0, 0] == pytest.approx(7.0 * MS)


def test_profile_entries_cost_stages_from_whole_calls_that_leave_at_each_exit():
    calls = [{"mean_ms": m} for m in (0.03, 0.05, 0.09)]
    entry = {"batches": {"1": {"stages": [{"mean_ms": 1.0}] * 3, "gather_ms": [0.0, 0.0, 0.0],
                               "overhead_ms": {"mean_ms": 0.01}, "exit_calls": calls}}}
    model = from_profile(entry, "t")
    np.testing.assert_allclose(model.exit_seconds() / MS, [0.03, 0.05, 0.09])
    with pytest.raises(CalibrationError, match="malformed"):
        from_profile({"batches": {"1": {}}}, "broken")


def test_mixed_stream_terms_are_fitted_on_calls_with_real_leave_patterns():
    calls = lambda ms: [{"mean_ms": m, "p99_ms": 2 * m} for m in ms]  # noqa: E731
    rows = {b: {"stages": [{"mean_ms": 1.0}] * 3, "gather_ms": [g, g, 0.0], "overhead_ms": {"mean_ms": 0.01, "p99_ms": 0.02},
                "exit_calls": calls(ms)} for b, ms, g in (("1", (0.03, 0.05, 0.09), 0.0), ("4", (0.06, 0.12, 0.24), 0.002))}
    tables = from_profile({"batches": rows}, "t")
    assert tables.mixed is None
    truth = np.array([0.02, 0.01, -0.004, 0.03, 0.01]) * MS  # per call, stage 1 / 2 run, compaction after 0 / 1
    counts = np.array([[4, 0, 0], [4, 4, 0], [4, 4, 4], [4, 2, 0], [4, 3, 1], [4, 4, 2], [4, 1, 1], [4, 2, 2]])
    ms = (tables.table_seconds(counts) + Mixed.features(counts) @ truth) / MS
    rows["4"]["mixed_calls"] = {"counts": counts.tolist(), "ms": ms.tolist(), "calls": [5] * len(counts)}
    model = from_profile({"batches": rows}, "t")
    np.testing.assert_allclose(model.mixed[1], truth, atol=1e-12)
    np.testing.assert_allclose(model.mixed[0], 0.0)  # no mixed calls at batch 1: the tables alone
    taken = np.array([[0, 0, 1, 2]])  # 4 start, 2 reach stage 1 (compaction), 1 reaches stage 2 (compaction)
    assert model.batch_seconds(taken)[0] == pytest.approx(tables.batch_seconds(taken)[0] + truth.sum())
    # a fit never prices a call below the same-size call that leaves at exit 0
    cheap = replace(model, mixed=np.array([[0.0] * 5, [-1.0] * 5]))
    assert cheap.batch_seconds(np.array([[1, 1, 2, 2]]))[0] == pytest.approx(tables.batch_seconds(np.zeros((1, 4), int))[0])
    assert from_profile({"batches": rows}, "t", "p99_ms").mixed is None  # deadlines price stages, not streams
    assert model.to_dict()["mixed_ms"][1] == pytest.approx((truth / MS).tolist())


def test_deadlines_price_a_call_at_its_extrapolated_tail_and_a_stage_at_the_tail_less_what_is_typically_spent():
    calls = [{"p50_ms": 1.0, "p90_ms": 1.5, "p99_ms": 2.0}, {"p50_ms": 3.0, "p90_ms": 4.0, "p99_ms": 6.0}]
    entry = {"batches": {"1": {"stages": [{}] * 2, "gather_ms": [0.0, 0.0], "exit_calls": calls,
                               "overhead_ms": {"p50_ms": 0.1, "p90_ms": 0.1, "p99_ms": 0.1}}}}
    d = Deadlines(entry, "t")
    np.testing.assert_allclose(d.exit_seconds() / MS, [2 * 2.0 - 1.5, 2 * 6.0 - 4.0])  # one decade past p99
    assert d.remainder(0, 1) == pytest.approx(2.5 * MS)  # nothing spent before stage 0
    assert d.remainder(1, 1) == pytest.approx((8.0 - 1.0) * MS)  # exit 1's tail less exit 0's median
    calls[0]["p99_ms"], calls[1]["p99_ms"] = 3.5, 4.2  # exit 1's tail extrapolated below exit 0's (5.5 vs 4.4)
    np.testing.assert_allclose(Deadlines(entry, "t").exit_seconds() / MS, [5.5, 5.5])  # leaving later never costs less


def test_estimate_is_a_roofline_with_a_launch_floor():
    model = estimate([2e9, 2e9], [0, 0], [0, 0], [1e12, 1e12], 1e11, 1e-4, "t", batches=(1, 4))
    np.testing.assert_allclose(model.stage[:, 0], [1e-4 + 2e-3, 1e-4 + 8e-3])
    assert model.estimate
    with pytest.raises(CalibrationError, match="peak"):
        estimate([1], [0], [0], [0], 1e9, 0, "t")


def test_geometric_thresholds_send_shares_proportional_to_q_power_k():
    conf = np.random.default_rng(0).random((1000, 3))
    for q in (0.5, 1.0, 1.5):
        taken = exits_taken(conf, geometric_thresholds(conf, q))
        want = q ** np.arange(3) / (q ** np.arange(3)).sum()
        np.testing.assert_allclose(np.bincount(taken, minlength=3) / 1000, want, atol=0.01)


def test_optimiser_beats_the_geometric_slice_where_an_exit_is_useless_and_keeps_the_budget():
    val, test = synthetic(2000, 0), synthetic(2000, 1)
    gains = []
    for ms in (1.6, 2.0, 2.4):
        budget = Budget(ms * MS)
        sv, st = Scorer(val, FLAT, budget), Scorer(test, FLAT, budget)
        base = best_feasible(geometric(sv), budget)
        best = optimise(sv, start=base)
        assert best.feasible(budget) and best.accuracy >= base.accuracy
        assert best.bound_s <= budget.seconds and best.mean_s < budget.seconds  # the bound includes a margin
        gains.append(st.point(best.thresholds).accuracy - st.point(base.thresholds).accuracy)
    assert min(gains) > 0.03, gains  # held-out accuracy, not only the fitted one


def test_a_fleet_budget_on_the_worst_of_two_devices_holds_on_each():
    """Two devices whose stages are slow in different places (neither dominates): thresholds
    fitted on the worst-of model keep each device's own mean under the budget, while those
    fitted on either device alone miss it on the other."""
    a = LatencyModel((1,), np.array([[1.0, 3.0, 1.0]]) * MS, np.zeros((1, 3)), np.zeros(1), "a")
    b = LatencyModel((1,), np.array([[2.0, 1.0, 1.0]]) * MS, np.zeros((1, 3)), np.zeros(1), "b")
    fleet = WorstOf((a, b))
    assert fleet.source == "worst of a, b" and fleet.stages == 3
    np.testing.assert_allclose(fleet.exit_seconds(), [2 * MS, 4 * MS, 5 * MS])  # b's exit 0, a's exit 1
    val = synthetic(2000, 0)
    budget = Budget(2.5 * MS, confidence=0.5)
    fitted = {name: optimise(Scorer(val, m, budget)) for name, m in (("fleet", fleet), ("a", a), ("b", b))}
    for device in (a, b):
        assert Scorer(val, device, budget).point(fitted["fleet"].thresholds).mean_s <= budget.seconds
    missed = [Scorer(val, other, budget).point(fitted[name].thresholds).mean_s > budget.seconds
              for name, other in (("a", b), ("b", a))]
    assert any(missed)  # one device's thresholds are not enough for the fleet
    with pytest.raises(CalibrationError, match="same stages"):
        WorstOf((a, LatencyModel((1,), np.array([[MS, MS]]), np.zeros((1, 2)), np.zeros(1), "two")))


def test_optimiser_keeps_the_baseline_without_a_fitted_gain():
    traces = synthetic(500, 2)
    traces = Traces(traces.conf, np.repeat(traces.labels[:, None], 3, axis=1), traces.labels)  # every exit right
    budget = Budget(2.5 * MS)
    scorer = Scorer(traces, FLAT, budget)
    base = best_feasible(geometric(scorer), budget)
    assert optimise(scorer, start=base) == base


def test_tail_budget_bounds_the_percentile_and_mean_budget_adds_a_confidence_margin():
    val = synthetic(1000, 3)
    tail = Budget(2.0 * MS, tail=0.95)
    point = optimise(Scorer(val, FLAT, tail))
    calls = FLAT.exit_seconds()[Scorer(val, FLAT, tail).taken(point.thresholds)]
    assert np.quantile(calls, 0.95, method="higher") <= tail.seconds
    loose, tight = (optimise(Scorer(val, FLAT, Budget(1.6 * MS, confidence=c))) for c in (0.5, 0.99))
    assert tight.mean_s <= loose.mean_s and loose.bound_s == pytest.approx(loose.mean_s)


def test_batch_budget_scores_calls_of_b_samples():
    val = synthetic(400, 4)
    model = LatencyModel((1, 8), np.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]) * MS, np.zeros((2, 3)),
                         np.zeros(2), "t")
    scorer = Scorer(val, model, Budget(5 * MS, batch=8))
    taken = scorer.taken([0.9, 0.5, None])
    assert scorer.groups.shape[1] == 8
    np.testing.assert_allclose(scorer.calls(taken[:, None])[0], model.batch_seconds(taken[scorer.groups]))
    assert optimise(scorer).bound_s <= 5 * MS


def test_no_feasible_point_and_bad_budgets():
    scorer = Scorer(synthetic(100, 5), FLAT, Budget(0.5 * MS))
    assert optimise(scorer) is None and best_feasible(geometric(scorer), scorer.budget) is None
    with pytest.raises(CalibrationError, match="positive"):
        Budget(0.0)
    with pytest.raises(CalibrationError, match="tail"):
        Budget(1.0, tail=1.5)
    with pytest.raises(CalibrationError, match="2 exits"):
        Scorer(Traces(np.zeros((5, 2), np.float32), np.zeros((5, 2), np.int64), np.zeros(5, np.int64)), FLAT,
               Budget(1.0))


def test_traces_round_trip_and_refuse_other_files(tmp_path):
    traces = synthetic(50, 6)
    path = save_traces(tmp_path / "val.npz", Traces(traces.conf, traces.pred, traces.labels, {"split": "val"}))
    back = load_traces(path)
    np.testing.assert_array_equal(back.conf, traces.conf)
    np.testing.assert_array_equal(back.correct, traces.correct)
    assert back.meta == {"split": "val"} and list(tmp_path.iterdir()) == [path]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(CalibrationError, match="lacks conf"):
        load_traces(tmp_path / "other.npz")
    with pytest.raises(CalibrationError, match="NaN"):
        Traces(np.full((2, 2), np.nan, np.float32), np.zeros((2, 2), np.int64), np.zeros(2, np.int64))


def test_anytime_curve_answers_from_the_deepest_exit_that_fits_the_deadline():
    from calibration.anytime import anytime_curve, deadline_grid

    conf = np.array([[0.95, 0.5, 0.1], [0.2, 0.97, 0.3], [0.1, 0.2, 0.9]], np.float32)
    labels = np.array([0, 1, 2])
    pred = np.array([[0, 0, 0], [0, 1, 1], [1, 1, 2]])  # exit 0 right for sample 0 only, exit 2 right for all
    t = Traces(conf, pred, labels)
    cost = [1e-3, 2e-3, 3e-3]
    assert deadline_grid(cost) == [1e-3, 1.5e-3, 2e-3, 2.5e-3, 3e-3, 3.75e-3]
    rows = anytime_curve(t, cost, [0.9, 0.9, None], [0.5e-3, 1e-3, 2e-3, 3e-3])
    assert [r["deepest_exit"] for r in rows] == [0, 0, 1, 2] and [r["late"] for r in rows] == [True, False, False, False]
    assert [r["anytime_accuracy"] for r in rows] == pytest.approx([1 / 3, 1 / 3, 2 / 3, 1.0])
    # gated: sample 0 leaves at exit 0, sample 1 at exit 1, sample 2 goes to exit 2 unless cut off
    assert [r["accuracy"] for r in rows] == pytest.approx([1 / 3, 1 / 3, 2 / 3, 1.0])
    assert [r["cut_off"] for r in rows] == pytest.approx([2 / 3, 2 / 3, 1 / 3, 0.0])
