"""Thresholds whose guarantees hold with a stated probability: Learn-then-Test (numpy only).

The optimiser's "holds on held-out data" rests on a normal upper bound of the mean. Here the
statement is distribution-free: with probability at least 1 - delta over the draw of the
calibration samples, (a) the risk of the chosen thresholds — disagreement with the final exit
(`consistency`) or accuracy lost against it (`accuracy`: the final exit right, the cascade
wrong) — is at most epsilon, and (b) their mean call latency is within the budget.

Method (Angelopoulos, Bates et al., "Learn then Test", 2021; CALM, Schuster et al. 2022):
thresholds move along one path, a shared confidence threshold lambda for every early exit,
from 1 (never leave early: risk 0, full latency) down to 0. Risk grows and latency falls as
lambda falls, so each guarantee is tested in fixed sequence from its safe end, at level
delta/2 each (a union bound joins them), with the Hoeffding-Bentkus p-value of a mean of
[0, 1]-bounded losses. Latency is bounded by the full-depth call's cost, so it is scaled into
[0, 1] by it. The certified lambdas for risk form an upper set, those for latency a lower set;
the largest lambda in both (the most accurate) is chosen. When the sets do not meet, nothing
is certified, and `samples_needed` says how many samples would make the best candidate pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from calibration.errors import CalibrationError
from calibration.gating import exits_taken
from calibration.traces import Traces

RISKS = ("consistency", "accuracy")


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space (n up to millions without overflow)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    i = np.arange(k + 1)
    log_choose = np.concatenate([[0.0], np.cumsum(np.log((n - i[1:] + 1) / i[1:]))])  # log C(n, i), i = 0..k
    logs = log_choose + i * math.log(p) + (n - i) * math.log1p(-p)
    top = logs.max()
    return float(min(1.0, math.exp(top) * np.exp(logs - top).sum()))


def hb_pvalue(mean: float, n: int, alpha: float) -> float:
    """Hoeffding-Bentkus p-value of H0: E[loss] > alpha, for losses in [0, 1] whose sample
    mean over n draws is `mean` (small when the mean is well below alpha)."""
    if not 0 < alpha < 1:
        return 1.0 if alpha <= 0 else 0.0
    m = min(mean, alpha)
    if m <= 0:
        hoeffding = (1 - alpha) ** n  # exp(-n * h1(0, alpha))
    else:
        h1 = m * math.log(m / alpha) + (1 - m) * math.log((1 - m) / (1 - alpha)) if m < 1 else math.inf
        hoeffding = math.exp(-n * h1)
    bentkus = math.e * _binom_cdf(math.ceil(n * mean - 1e-9), n, alpha)  # n * mean is a count: no float excess
    return min(hoeffding, bentkus, 1.0)


def upper_bound(mean: float, n: int, level: float) -> float:
    """The smallest alpha that a sample mean of n [0, 1] losses certifies at `level`: the risk
    actually guaranteed (what the report states)."""
    lo, hi = mean, 1.0
    if hb_pvalue(mean, n, hi - 1e-12) > level:
        return 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if hb_pvalue(mean, n, mid) <= level else (mid, hi)
    return hi


def losses(traces: Traces, taken: np.ndarray, risk: str) -> np.ndarray:
    """(N,) per-sample loss in {0, 1} of the exits `taken`: disagreement with the final exit
    (`consistency`), or the final exit right and the exit taken wrong (`accuracy`)."""
    n = np.arange(len(traces))
    final = traces.pred[:, -1]
    if risk == "consistency":
        return (traces.pred[n, taken] != final).astype(np.float64)
    if risk == "accuracy":
        correct = traces.correct
        return (correct[:, -1] & ~correct[n, taken]).astype(np.float64)
    raise CalibrationError(f"--risk: {risk!r} is not one of {', '.join(RISKS)}")


@dataclass(frozen=True)
class Certified:
    """The outcome of Learn-then-Test on one calibration split."""

    thresholds: tuple[float | None, ...]  # the runtime's vector (the shared lambda at every early exit)
    lam: float
    risk: str
    epsilon: float
    delta: float
    risk_mean: float  # empirical, on the calibration split
    risk_bound: float  # the HB upper bound at the chosen threshold (pointwise, at delta/2): a report, not the guarantee
    latency_s: float  # the mean call latency, or with `tail` its quantile, on the calibration split
    latency_bound: float  # likewise pointwise: seconds of the mean, or the share of calls over the budget
    samples: int
    tail: float | None = None  # None: the mean is certified; 0.95: the p95 (share over the budget <= 0.05)

    def to_dict(self) -> dict:
        return {"thresholds": list(self.thresholds), "lambda": self.lam, "risk": self.risk, "epsilon": self.epsilon,
                "delta": self.delta, "samples": self.samples, "risk_mean": self.risk_mean,
                "risk_bound": self.risk_bound, "tail": self.tail, "latency_ms": self.latency_s * 1e3,
                **({"latency_bound_ms": self.latency_bound * 1e3} if self.tail is None else
                   {"over_budget_bound": self.latency_bound})}


def lambda_grid(points: int = 200) -> np.ndarray:
    """Candidate shared thresholds, fixed before any data is seen (fixed-sequence testing needs
    its order set in advance): from above 1 (never leave early; every confidence kind lies in
    [0, 1]) down to 0."""
    return np.concatenate([[np.nextafter(1.0, np.inf)], np.linspace(1.0, 0.0, points + 1)])


def certify(traces: Traces, exit_seconds: Sequence[float], budget_s: float, risk: str, epsilon: float,
            delta: float, points: int = 200, tail: float | None = None) -> Certified:
    """Learn-then-Test along the shared-threshold path at batch 1 (`exit_seconds`: the cost of a
    call leaving at each exit); raises with the samples needed when nothing can be certified.
    With `tail` (0.95: p95) the latency statement is on the quantile: the share of calls over
    the budget is certified <= 1 - tail (its losses are those calls, 0 or 1 each)."""
    if risk not in RISKS:
        raise CalibrationError(f"--risk: {risk!r} is not one of {', '.join(RISKS)}")
    if not 0 < epsilon < 1 or not 0 < delta < 1:
        raise CalibrationError(f"--epsilon {epsilon:g} and --delta {delta:g} must both lie in (0, 1)")
    cost = np.asarray(exit_seconds, dtype=np.float64)
    top = float(cost.max())  # a call never costs more than leaving at the last exit
    n, level = len(traces), delta / 2
    lams = lambda_grid(points)
    risk_ok, lat_ok, rows = -1, len(lams), []
    for i, lam in enumerate(lams):  # descending: risk grows, latency falls
        taken = exits_taken(traces.conf, [float(lam)] * (traces.exits - 1) + [None])
        r = float(losses(traces, taken, risk).mean())
        calls = cost[taken]
        lat = float(calls.mean()) if tail is None else float(np.quantile(calls, tail, method="higher"))
        over = float(calls.mean()) / top if tail is None else float(np.mean(calls > budget_s))
        rows.append((r, lat, over))
        if risk_ok == i - 1 and hb_pvalue(r, n, epsilon) <= level:
            risk_ok = i  # fixed sequence from lambda above 1: stops at the first non-rejection
    alpha = budget_s / top if tail is None else 1 - tail  # the latency statement as a mean of [0, 1] losses
    for i in range(len(lams) - 1, -1, -1):  # ascending lambda: the latency test from the cheap end
        if hb_pvalue(rows[i][2], n, alpha) > level:
            break
        lat_ok = i
    if lat_ok > risk_ok:
        raise CalibrationError(_refusal(rows, lat_ok, n, level, epsilon, risk))
    i = lat_ok  # the largest certified lambda for latency that risk also certifies: the most accurate
    r, lat, over = rows[i]
    lam = float(lams[i])
    bound = upper_bound(over, n, level)  # the mean's bound scaled back to seconds, or the share over the budget
    return Certified(tuple([lam] * (traces.exits - 1) + [None]), lam, risk, epsilon, delta, r,
                     upper_bound(r, n, level), lat, bound * top if tail is None else bound, n, tail)


def samples_needed(mean: float, alpha: float, level: float, limit: int = 10**7) -> int | None:
    """How many samples with this empirical mean would certify `alpha` at `level` (None: none
    would: the mean itself is not below alpha)."""
    if mean >= alpha:
        return None
    n = 1
    while hb_pvalue(mean, n, alpha) > level:
        n *= 2
        if n > limit:
            return None
    lo, hi = n // 2, n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if hb_pvalue(mean, mid, alpha) <= level else (mid, hi)
    return hi


def _refusal(rows, lat_ok: int, n: int, level: float, epsilon: float, risk: str) -> str:
    """One line: why no threshold is certified, and how many samples would certify the best
    candidate (the largest threshold within the latency budget: the lowest risk there)."""
    if lat_ok >= len(rows):
        return (f"risk control: no threshold certifies the latency budget with {n} calibration samples (even with "
                f"nearly every sample leaving at exit 0: {rows[-1][1] * 1e3:.4g} ms); raise the budget")
    r = rows[lat_ok][0]
    need = samples_needed(r, epsilon, level)
    more = (f"; about {need} samples at the same risk would certify it" if need is not None else
            f"; its empirical risk {r:.3g} is too close to it or above: raise --epsilon or the budget")
    return (f"risk control: no threshold certifies {risk} risk <= {epsilon:g} within the latency budget at "
            f"delta/2 = {level:g} with {n} calibration samples{more}")
