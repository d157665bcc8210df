"""Risk-controlled calibration (calibration.risk): the Hoeffding-Bentkus p-value, Learn-then-Test
along the shared-threshold path, and whether its guarantee holds over many calibration draws."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibration.errors import CalibrationError
from calibration.gating import exits_taken
from calibration.risk import certify, hb_pvalue, losses, samples_needed, upper_bound
from calibration.traces import Traces

COST = [1e-3, 2e-3, 3e-3]  # seconds of a call leaving at each exit


def population(n: int, seed: int) -> Traces:
    """Synthetic traces where a confident early exit tends to agree with the final one."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    conf = rng.random((n, 3)).astype(np.float32)
    right = rng.random((n, 3)) < 0.55 + 0.44 * conf
    right[:, -1] = rng.random(n) < 0.95
    pred = np.where(right, labels[:, None], (labels[:, None] + 1 + rng.integers(0, 9, (n, 3))) % 10)
    return Traces(conf, pred, labels)


def test_the_hb_pvalue_is_small_only_when_the_mean_is_well_below_alpha():
    assert hb_pvalue(0.0, 300, 0.02) < 0.01 and hb_pvalue(0.05, 300, 0.05) == 1.0
    assert hb_pvalue(0.01, 300, 0.05) < hb_pvalue(0.01, 100, 0.05) < hb_pvalue(0.03, 100, 0.05)
    # the binomial half: with no losses at all, Bentkus's bound is e * (1 - alpha)^n, Hoeffding's (1 - alpha)^n
    assert hb_pvalue(0.0, 50, 0.1) == pytest.approx(min((0.9 ** 50), math.e * 0.9 ** 50))
    bound = upper_bound(0.01, 300, 0.05)
    assert 0.01 < bound < 0.05 and hb_pvalue(0.01, 300, bound) <= 0.05 < hb_pvalue(0.01, 300, bound * 0.95)
    need = samples_needed(0.01, 0.02, 0.05)
    assert hb_pvalue(0.01, need, 0.02) <= 0.05 < hb_pvalue(0.01, need - 1, 0.02)


def test_losses_count_disagreement_or_accuracy_lost_against_the_final_exit():
    t = Traces(np.zeros((3, 2), np.float32), np.array([[1, 1], [2, 1], [0, 2]]), np.array([1, 1, 0]))
    taken = np.array([0, 0, 0])
    assert losses(t, taken, "consistency").tolist() == [0, 1, 1]
    assert losses(t, taken, "accuracy").tolist() == [0, 1, 0]  # sample 2: the final exit was wrong anyway
    with pytest.raises(CalibrationError, match="--risk: 'loss' is not one of consistency, accuracy"):
        losses(t, taken, "loss")


@pytest.mark.parametrize("risk", ["consistency", "accuracy"])
def test_the_guarantee_holds_over_many_calibration_draws(risk):
    """Both statements, on a large population standing for the truth: over 200 draws of 500
    calibration samples, the chosen thresholds' population risk exceeds epsilon, or their
    population mean latency the budget, in at most delta of the draws (plus sampling slack)."""
    truth = population(200_000, 0)
    epsilon, delta, budget = 0.1, 0.2, 2.4e-3
    rng = np.random.default_rng(1)
    violations, certified = 0, 0
    for _ in range(200):
        ids = rng.choice(len(truth), 500, replace=False)
        draw = Traces(truth.conf[ids], truth.pred[ids], truth.labels[ids])
        try:
            c = certify(draw, COST, budget, risk, epsilon, delta)
        except CalibrationError:
            continue
        certified += 1
        taken = exits_taken(truth.conf, list(c.thresholds))
        true_risk = losses(truth, taken, risk).mean()
        true_latency = np.asarray(COST)[taken].mean()
        violations += true_risk > epsilon or true_latency > budget
        assert c.risk_bound <= epsilon and c.latency_bound <= budget
    assert certified >= 150  # the guarantee is not bought by refusing
    assert violations / certified <= delta


def test_nothing_certifiable_is_refused_in_one_line_with_the_samples_needed():
    small = population(60, 3)
    with pytest.raises(CalibrationError) as err:
        certify(small, COST, 2.9e-3, "consistency", 0.02, 0.1)
    text = str(err.value)
    assert "no threshold certifies consistency risk <= 0.02 within the latency budget" in text and "\n" not in text
    assert "with 60 calibration samples" in text and ("samples at the same risk would certify it" in text
                                                       or "raise --epsilon" in text)
    with pytest.raises(CalibrationError, match="no threshold certifies the latency budget .* raise the budget"):
        certify(population(500, 4), COST, 0.5e-3, "consistency", 0.5, 0.1)


def test_a_p95_budget_is_certified_on_the_share_of_calls_over_it():
    """With tail 0.95 the latency statement is on the quantile: over 200 draws, the chosen
    thresholds' population share of calls over the budget exceeds 5% in at most delta of them."""
    truth = population(200_000, 0)
    epsilon, delta, budget = 0.35, 0.2, 2.5e-3  # p95 within 2.5 ms: almost nobody may reach exit 2
    rng = np.random.default_rng(2)
    violations = certified = 0
    for _ in range(200):
        ids = rng.choice(len(truth), 500, replace=False)
        try:
            c = certify(Traces(truth.conf[ids], truth.pred[ids], truth.labels[ids]), COST, budget, "consistency",
                        epsilon, delta, tail=0.95)
        except CalibrationError:
            continue
        certified += 1
        taken = exits_taken(truth.conf, list(c.thresholds))
        over = float(np.mean(np.asarray(COST)[taken] > budget))
        violations += over > 0.05 or losses(truth, taken, "consistency").mean() > epsilon
        assert c.tail == 0.95 and c.latency_bound <= 0.05 and c.to_dict()["over_budget_bound"] == c.latency_bound
    assert certified >= 150 and violations / certified <= delta
