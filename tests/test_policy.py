"""calibration.policy: a trained exit policy, its closed-form training, its replay on traces
and the runtime cascade taking the same exits, and `edgeexit calibrate --solver policy`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from calibration.errors import CalibrationError
from calibration.latency import LatencyModel
from calibration.policy import FEATURES, ExitPolicy, expected_reward, fit_policy, policy_point
from calibration.solvers import Budget, Scorer, best_feasible, geometric, optimise
from calibration.traces import Traces
from edgeexit.bundle import Change, load_bundle, update_bundle
from edgeexit.cli import main
from edgeexit.errors import EdgeExitError
from edgeexit.runtime.cascade import Cascade, trace
from edgeexit.runtime.loader import open_backend
from edgeexit.tracing import split_inputs

MS = 1e-3
FLAT = LatencyModel((1,), np.array([[MS, MS, MS]]), np.zeros((1, 3)), np.zeros(1), "synthetic 1 ms per stage")


def agreeing(n: int, seed: int) -> Traces:
    """Three exits right on 60%, 75% and 97% of samples, wrong guesses spread over the 9 other
    classes, and every confidence uniform noise: no threshold on conf separates right from
    wrong. Two wrong exits rarely agree, so exit 1 agreeing with exit 0 means right (~98%)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)

    def guess(p_right):
        return np.where(rng.random(n) < p_right, labels, (labels + rng.integers(1, 10, n)) % 10)

    pred = np.stack([guess(0.6), guess(0.75), guess(0.97)], axis=1)
    return Traces(rng.uniform(0.3, 1.0, (n, 3)).astype(np.float32), pred, labels)


def test_policy_imports_no_torch():
    code = "import sys, calibration.policy; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_closed_form_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    phi, reward = rng.normal(size=(3, 50, len(FEATURES))), rng.normal(size=(4, 50))
    params = rng.normal(size=(3, len(FEATURES) + 1))
    value, grad = expected_reward(params, phi, reward)
    numeric = np.zeros_like(params)
    for i in np.ndindex(params.shape):
        step = np.zeros_like(params)
        step[i] = 1e-6
        up, down = expected_reward(params + step, phi, reward)[0], expected_reward(params - step, phi, reward)[0]
        numeric[i] = (up - down) / 2e-6
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)
    # q -> 1 everywhere: every sample leaves at exit 0 and the value is r_0
    assert expected_reward(np.c_[np.zeros((3, len(FEATURES))), np.full(3, 50.0)], phi, reward)[0] == \
        pytest.approx(reward[0].mean())


def test_policy_beats_thresholds_where_agreement_is_informative():
    both = agreeing(4000, 0)
    half = lambda s: Traces(both.conf[s], both.pred[s], both.labels[s])  # noqa: E731
    fit_half, held_out = half(slice(0, 2000)), half(slice(2000, None))
    gains = []
    for ms in (2.0, 2.4):
        budget = Budget(ms * MS)
        sv, st = Scorer(fit_half, FLAT, budget), Scorer(held_out, FLAT, budget)
        best = optimise(sv, start=best_feasible(geometric(sv), budget))
        fit = fit_policy(sv, start=best)
        assert fit.significant and fit.point.feasible(budget) and fit.point.accuracy > best.accuracy
        test = policy_point(st, fit.policy.taken(held_out.conf, held_out.pred))
        assert test.mean_s <= budget.seconds * 1.02  # the budget holds on the held-out half too
        gains.append(test.accuracy - st.point(best.thresholds).accuracy)
        assert fit.policy.weights[1, FEATURES.index("agree")] > 0  # it learned to trust agreement
    assert min(gains) > 0.05, gains


def test_no_significant_gain_without_information_and_no_policy_under_the_floor():
    traces = agreeing(500, 1)
    traces = Traces(traces.conf, np.repeat(traces.pred[:, 2:], 3, axis=1), traces.labels)  # every exit says the same
    scorer = Scorer(traces, FLAT, Budget(1.5 * MS))
    fit = fit_policy(scorer, start=optimise(scorer))
    assert fit.point.feasible(scorer.budget) and not fit.significant  # nothing to gain over thresholds
    assert fit_policy(scorer).significant  # without thresholds to beat
    assert fit_policy(Scorer(traces, FLAT, Budget(0.5 * MS))) is None  # below a call leaving at exit 0


def test_one_sample_decides_bit_for_bit_as_a_batch():
    """The batch-1 path sums Python floats, a batch sums float64 arrays: the same decisions."""
    rng = np.random.default_rng(5)
    conf, pred = rng.random((2000, 3)).astype(np.float32), rng.integers(0, 3, (2000, 3))
    weights = rng.normal(size=(2, len(FEATURES)))
    rule = ExitPolicy(weights, -np.array([weights[0, 0] / 2, weights[1] @ [0.5, 0.5, 1 / 3]]))  # about half leave
    for k in (0, 1):
        prev = lambda rows: (None, None) if k == 0 else (conf[rows, k - 1], pred[rows, k - 1])  # noqa: E731
        whole = rule.leave(k, conf[:, k], pred[:, k], *prev(slice(None)))
        single = [rule.leave(k, conf[i:i + 1, k], pred[i:i + 1, k], *prev(slice(i, i + 1)))[0] for i in range(2000)]
        assert 0 < whole.mean() < 1
        np.testing.assert_array_equal(whole, single)


def test_to_dict_round_trip_and_refusals():
    rng = np.random.default_rng(2)
    rule = ExitPolicy(rng.normal(size=(2, len(FEATURES))), rng.normal(size=2), 0.25)
    back = ExitPolicy.from_dict(json.loads(json.dumps(rule.to_dict())))
    np.testing.assert_array_equal(back.weights, rule.weights)
    np.testing.assert_array_equal(back.bias, rule.bias)
    assert back.lam == rule.lam and back.exits == 3
    traces = agreeing(200, 3)
    np.testing.assert_array_equal(back.taken(traces.conf, traces.pred), rule.taken(traces.conf, traces.pred))
    with pytest.raises(CalibrationError, match="features"):
        ExitPolicy.from_dict({**rule.to_dict(), "features": ["conf"]})
    with pytest.raises(CalibrationError, match="do not fit"):
        ExitPolicy.from_dict({**rule.to_dict(), "bias": [0.0]})
    with pytest.raises(CalibrationError, match="not an exit policy"):
        ExitPolicy.from_dict([1, 2])
    with pytest.raises(CalibrationError, match="3 exits, the traces have 2"):
        rule.taken(traces.conf[:, :2], traces.pred[:, :2])


def test_replay_and_runtime_cascade_take_the_same_exits(example_build, digits_raw):
    from edgeexit.data import normalize

    bundle, _ = example_build
    x = normalize(digits_raw[0][:400], bundle.input["mean"], bundle.input["std"])
    backend = open_backend(bundle, "onnxruntime")
    every = trace(backend, bundle.stage_ios, x, 128)
    conf, pred = every.exit_conf, every.exit_pred
    agree = pred[:, 1] == pred[:, 0]  # a rule on every feature, cut at its median: about half leave at each
    rule = ExitPolicy(np.array([[1.0, 0.0, 0.0], [1.0, 0.5, 0.2]]),
                      -np.array([np.median(conf[:, 0]), np.median(conf[:, 1] + 0.5 * conf[:, 0] + 0.2 * agree)]))
    expected = rule.taken(conf, pred)
    assert set(expected.tolist()) == {0, 1, 2}
    cascade = Cascade(backend, bundle.stage_ios, bundle.thresholds, rule)
    for result in (cascade(x), cascade.run_batched(x, 7), cascade.run_batched(x[:40], 1)):
        n = len(result.exit)
        np.testing.assert_array_equal(result.exit, expected[:n])  # whole batch, compacted chunks, one by one
        np.testing.assert_array_equal(result.pred, pred[np.arange(n), expected[:n]])
    # weight on conf alone, bias -t: the policy gates exactly as thresholds t do
    th = [float(np.median(conf[:, 0])), float(np.median(conf[:, 1])), None]
    as_rule = ExitPolicy(np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), -np.array(th[:2]))
    np.testing.assert_array_equal(Cascade(backend, bundle.stage_ios, bundle.thresholds, as_rule)(x).exit,
                                  Cascade(backend, bundle.stage_ios, th)(x).exit)
    with pytest.raises(EdgeExitError, match="trained for 2 exits"):
        Cascade(backend, bundle.stage_ios, bundle.thresholds, ExitPolicy(np.zeros((1, 3)), np.zeros(1)))


def test_an_exit_a_solver_never_leaves_at_reaches_the_runtime_disabled(example_build):
    from edgeexit.calibrate import DISABLED, runtime_thresholds

    bundle, _ = example_build
    th = runtime_thresholds((None, 0.5, None))  # a solver's Point marks "never leave at exit 0" with None
    assert th == [DISABLED, 0.5, None]
    result = Cascade(open_backend(bundle, "onnxruntime"), bundle.stage_ios, th)(split_inputs(bundle, "test")[0])
    assert result.stage_samples[0] == result.stage_samples[1] and not (result.exit == 0).any()


def test_run_gates_on_the_manifest_policy(bundle_copy, digits_raw, tmp_path, capsys):
    bundle = load_bundle(bundle_copy)
    never = ExitPolicy(np.zeros((2, len(FEATURES))), np.full(2, -1.0))  # nobody leaves early
    update_bundle(bundle, Change(manifest={"gating": {**bundle.manifest["gating"], "policy": never.to_dict()}}))
    np.save(tmp_path / "images.npy", digits_raw[0][:20])
    assert main(["run", str(bundle_copy), "--input", str(tmp_path / "images.npy"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy"] == never.to_dict() and {r["exit"] for r in out["samples"]} == {2}
    # thresholds on the command line gate instead of the policy
    assert main(["run", str(bundle_copy), "--input", str(tmp_path / "images.npy"), "--thresholds", "0,0,null",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy"] is None and {r["exit"] for r in out["samples"]} == {0}


def test_cli_calibrate_policy_writes_it_and_other_solvers_remove_it(bundle_copy, tmp_path, capsys):
    """Fitted on synthetic validation traces where agreement pays (so the policy is deployed),
    reported and measured on the bundle's real test split."""
    from calibration.latency import from_profile
    from calibration.traces import save_traces

    assert main(["profile", str(bundle_copy), "--batch", "1", "--iters", "30", "--quiet"]) == 0
    capsys.readouterr()
    profiles = json.loads((bundle_copy / "profile.json").read_text())["profiles"]
    budget_ms = float(from_profile(next(iter(profiles.values())), "p").exit_seconds()[1] * 1e3)
    save_traces(tmp_path / "val.npz", agreeing(2000, 4))
    assert main(["calibrate", str(bundle_copy), "--budget-ms", f"{budget_ms:.6f}", "--solver", "policy",
                 "--latency", "profile", "--val-traces", str(tmp_path / "val.npz"), "--quiet", "--json",
                 "--accept-miss"]) == 0  # written whatever this busy machine measures
    record = json.loads(capsys.readouterr().out)
    bundle = load_bundle(bundle_copy)
    pol = record["policy"]
    from edgeexit.calibrate import format_calibration

    assert "thresholds (optimise): " in format_calibration(record)  # the policy starts from optimise's thresholds
    assert pol["significant"] and record["deployed"] == "policy" and pol["fit"]["accuracy"] > record["fit"]["accuracy"]
    assert bundle.manifest["gating"]["policy"] == pol["rule"] and bundle.thresholds == record["thresholds"]
    assert pol["fit"]["bound_ms"] <= budget_ms and all("policy" in row for row in record["pareto"])
    assert set(record["measured"]) >= {"chosen", "policy"}
    assert record["held"] == (record["measured"]["policy"]["ratio"] <= 1.05)
    x, _ = split_inputs(bundle, "test")
    runtime = Cascade(open_backend(bundle, "onnxruntime"), bundle.stage_ios, bundle.thresholds,
                      ExitPolicy.from_dict(pol["rule"])).run_batched(x, 64)
    np.testing.assert_allclose(runtime.exit_shares(), pol["test"]["exit_shares"])  # the report is the runtime's
    assert main(["calibrate", str(bundle_copy), "--budget-ms", f"{budget_ms:.6f}", "--latency", "profile",
                 "--quiet", "--no-measure"]) == 0
    capsys.readouterr()
    assert "policy" not in load_bundle(bundle_copy).manifest["gating"]  # a stale policy never outlives a recalibration
    assert main(["calibrate", str(bundle_copy), "--budget-ms", "0.000001", "--solver", "policy", "--quiet",
                 "--no-measure"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("edgeexit: error: --budget-ms: 1e-06 ms cannot hold")
