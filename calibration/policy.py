"""A learned exit policy: a trained rule that decides exit vs continue, fitted against latency.

Thresholds look at one number, the exit's own confidence. A confident early head can be
confidently wrong, and some of that shows in what the runtime already has on the host
after stage k without any graph change: the previous exit's confidence and whether its
prediction agrees with this one (EPNet frames exiting as a decision learned on such
features). The policy here is per exit k < K-1 a logistic rule

    q_k = sigmoid(w_k . phi_k + b_k),   phi_k = FEATURES of exit k,

deployed hard: a sample leaves at exit k when q_k >= 0.5 (z_k >= 0). `ExitPolicy.leave`
is the one implementation of that rule; the replay on traces (`ExitPolicy.taken`) and the
runtime cascade both call it, so they take the same exits on the same numbers.

Training (EPNet's MDP, reward = correctness - lambda * cost): with soft q the expected
reward of a sample is V_0, where V_{K-1} = r_{K-1}, V_k = q_k r_k + (1 - q_k) V_{k+1} and
r_k = correct_k - lambda * c_k, c_k the latency per sample of leaving at exit k (see
`exit_costs`). Its gradient is closed form (`expected_reward`), fitted by Adam on
standardised features from zero weights (no randomness, so no seed). lambda is bisected so
that the HARD rule meets the budget on the fit split under the threshold solvers' own
`Scorer` and `Budget` (same upper confidence bound), keeping the most accurate feasible
policy. It has more parameters than thresholds, so it is deployed only when it beats the
threshold optimiser on the fit split with the budget's confidence (`significant_gain`).
numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from calibration.errors import CalibrationError
from calibration.solvers import Point, Scorer, best_feasible, tail_seconds

# What the rule sees at exit k, all on the host after stage k: the exit's confidence, the
# previous exit's confidence (0 at exit 0), and 1 when the two exits predict the same class
# (0 at exit 0). A running maximum of confidence was left out: with three or four exits it
# is nearly always conf or prev_conf, and it would need one more carried array.
FEATURES = ("conf", "prev_conf", "agree")


def features(conf, pred, prev_conf, prev_pred) -> list:
    """The FEATURES at one exit from its conf and pred and the previous exit's (None at exit 0).

    Written once for both kinds of numbers the rule runs on: float64 arrays of n samples
    (float64 arrays out) and one sample's Python numbers (Python floats out)."""
    if prev_conf is None:
        return [conf, 0.0 * conf, 0.0 * conf]
    return [conf, prev_conf, 1.0 * (pred == prev_pred)]


def _scalar(a: np.ndarray) -> float:
    return a.item()


def _float64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


@dataclass(frozen=True, eq=False)
class ExitPolicy:
    """Per early exit k, leave when bias[k] + weights[k] . FEATURES >= 0 (raw feature units)."""

    weights: np.ndarray  # (K-1, len(FEATURES)) float64
    bias: np.ndarray  # (K-1,) float64
    lam: float | None = None  # the latency price `fit_policy` trained it at (None: not trained there)
    rows: list[tuple[float, list[float]]] = field(init=False, repr=False, compare=False)  # per exit, as floats

    def __post_init__(self):
        w, b = self.weights, self.bias
        if w.ndim != 2 or w.shape != (len(b), len(FEATURES)) or len(b) < 1:
            raise CalibrationError(f"policy: weights {list(w.shape)} and bias {list(b.shape)} do not fit "
                                   f"(need [K-1, {len(FEATURES)}] and [K-1], K >= 2)")
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise CalibrationError("policy: weights and bias must be finite numbers")
        # Python floats: numpy scalar arithmetic would cost several microseconds per decision at batch 1
        object.__setattr__(self, "rows", [(float(bk), [float(x) for x in wk]) for bk, wk in zip(b, w)])

    @property
    def exits(self) -> int:
        return len(self.bias) + 1

    def leave(self, k: int, conf: np.ndarray, pred: np.ndarray, prev_conf: np.ndarray | None = None,
              prev_pred: np.ndarray | None = None) -> np.ndarray:
        """(n,) bool: which of n samples at early exit k leave there (prev_*: exit k-1's, None at k = 0).

        Summed feature by feature in a fixed order in IEEE doubles, so equal inputs give
        bit-equal decisions whatever the batch. One sample (the runtime at batch 1) is summed
        in Python floats, which round exactly as float64 arrays do but cost ~1 us in all
        where numpy costs ~1 us per term; beyond conf, a zero weight (exit 0's prev_conf and
        agree, a rule on conf alone) adds nothing and is skipped."""
        one = len(conf) == 1
        cast = _scalar if one else _float64
        prev = (None, None) if prev_conf is None else (cast(prev_conf), cast(prev_pred))
        phi = features(cast(conf), cast(pred), *prev)
        bias, weights = self.rows[k]
        z = bias + weights[0] * phi[0]
        for w, f in zip(weights[1:], phi[1:]):
            if w:
                z = z + w * f
        return np.array([z >= 0.0]) if one else z >= 0.0

    def taken(self, conf: np.ndarray, pred: np.ndarray) -> np.ndarray:
        """(N,) exit per sample on traces ((N, K) conf and pred): the first exit whose rule says
        leave, else the last. The runtime's decision, replayed on every exit at once."""
        if conf.shape[1] != self.exits:
            raise CalibrationError(f"policy: trained for {self.exits} exits, the traces have {conf.shape[1]}")
        leaves = np.ones(conf.shape, bool)
        for k in range(self.exits - 1):
            prev = (None, None) if k == 0 else (conf[:, k - 1], pred[:, k - 1])
            leaves[:, k] = self.leave(k, conf[:, k], pred[:, k], *prev)
        return np.argmax(leaves, axis=1)  # the last column is all True

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (the bundle manifest's `gating.policy`): one row of weights per early exit."""
        return {"kind": "logistic", "features": list(FEATURES), "weights": self.weights.tolist(),
                "bias": self.bias.tolist(), "lambda": self.lam}

    @classmethod
    def from_dict(cls, data: Any) -> "ExitPolicy":
        """Read `to_dict`'s form back; anything else gets a one-line CalibrationError."""
        if not isinstance(data, dict) or data.get("kind") != "logistic":
            raise CalibrationError("policy: not an exit policy (need a mapping with kind: logistic)")
        if data.get("features") != list(FEATURES):
            raise CalibrationError(f"policy: features {data.get('features')} are not {list(FEATURES)} "
                                   "(written by another edgeexit version?)")
        try:
            weights = np.array(data["weights"], dtype=np.float64)
            bias = np.array(data["bias"], dtype=np.float64)
            lam = None if data.get("lambda") is None else float(data["lambda"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"policy: malformed weights or bias ({exc!r})") from None
        return cls(weights, bias, lam)


def exit_costs(scorer: Scorer) -> np.ndarray:
    """(K,) training cost of leaving at each exit, as a share of the full-depth cost.

    At batch 1 this is the measured call that leaves at exit k (`exit_seconds`). At batch B
    it is the per-sample share of a call where all B samples leave at exit k: the cost model
    at full batches, linear in how many samples go how deep. Compaction and partly filled
    batches make the true cost of a mixture nonlinear; the bisection on lambda judges every
    candidate with the exact batch cost (`Scorer`), so this only has to rank exits."""
    k_total, b = scorer.traces.exits, scorer.budget.batch
    seconds = scorer.latency.batch_seconds(np.repeat(np.arange(k_total)[:, None], b, axis=1)) / b
    return seconds / max(seconds[-1], 1e-12)


def expected_reward(params: np.ndarray, phi: np.ndarray, reward: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean expected reward of soft policies and its gradient in closed form.

    params (K-1, F+1): weights then bias per early exit; phi (K-1, N, F): features per exit
    and sample; reward (K, N): r_k per sample (exit-major, so each exit's rows are one
    contiguous matrix product). With z_k = w_k . phi_k + b_k and q_k = sigmoid(z_k),
    V_{K-1} = r_{K-1}, V_k = q_k r_k + (1 - q_k) V_{k+1}, and
    dV_0/dz_k = S_k q_k (1 - q_k) (r_k - V_{k+1}), S_k = prod_{j<k} (1 - q_j)."""
    k_early, n, _ = phi.shape
    z = np.matmul(phi, params[:, :-1, None])[..., 0] + params[:, -1:]  # (K-1, N)
    q = 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic function, without overflow
    value = np.empty((k_early + 1, n))
    value[-1] = reward[-1]
    for k in range(k_early - 1, -1, -1):
        value[k] = q[k] * reward[k] + (1 - q[k]) * value[k + 1]
    survive = np.cumprod(np.concatenate([np.ones((1, n)), 1 - q[:-1]]), axis=0)  # S_k
    dz = survive * q * (1 - q) * (reward[:-1] - value[1:])  # (K-1, N)
    grad = np.concatenate([np.matmul(dz[:, None, :], phi)[:, 0], dz.sum(axis=1, keepdims=True)], axis=1) / n
    return float(value[0].mean()), grad


def _train(phi: np.ndarray, reward: np.ndarray, iters: int, lr: float) -> np.ndarray:
    """Adam ascent on `expected_reward` from zero parameters (every q = 0.5)."""
    params = np.zeros((phi.shape[0], phi.shape[2] + 1))
    m, v = np.zeros_like(params), np.zeros_like(params)
    beta1, beta2 = 0.9, 0.999
    for t in range(1, iters + 1):
        _, g = expected_reward(params, phi, reward)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        params += lr * (m / (1 - beta1 ** t)) / (np.sqrt(v / (1 - beta2 ** t)) + 1e-8)
    return params


def policy_point(scorer: Scorer, taken: np.ndarray) -> Point:
    """Score one exit assignment ((N,) exit per sample) as the threshold solvers score theirs
    (no thresholds: the rule is the policy)."""
    calls = scorer.calls(taken[:, None])
    shares = np.bincount(taken, minlength=scorer.traces.exits) / len(taken)
    return Point((), float(scorer.accuracy(taken[:, None])[0]), float(calls.mean()),
                 float(tail_seconds(calls[0], 0.95)), float(scorer.bounds(calls)[0]), tuple(float(s) for s in shares))


def significant_gain(scorer: Scorer, taken: np.ndarray, baseline: np.ndarray) -> bool:
    """Whether exits `taken` are more accurate than exits `baseline` ((N,) each) on the scorer's
    split with the budget's confidence: the paired per-sample difference in correctness,
    less z standard errors, is above 0. A policy has more parameters than thresholds; on a
    few hundred samples a gain of a sample or two is noise and does not hold on the test split."""
    rows = np.arange(len(taken))
    diff = scorer.correct[rows, taken].astype(np.float64) - scorer.correct[rows, baseline]
    return bool(diff.mean() - scorer.z * diff.std() / np.sqrt(len(diff)) > 0)


@dataclass(frozen=True)
class PolicyFit:
    """A trained exit policy, scored on the split it was fitted on."""

    policy: ExitPolicy
    point: Point
    significant: bool  # more accurate than the `start` thresholds with the budget's confidence (no start: True)


def fit_policy(scorer: Scorer, start: Point | None = None, steps: int = 16, iters: int = 150, lr: float = 0.05,
               progress: Callable[[int, int], None] | None = None) -> PolicyFit | None:
    """The most accurate feasible trained exit policy on the scorer's split, or None when no
    price gives a feasible rule (below a call where every sample leaves at exit 0).

    lambda is bisected on [0, hi], hi a price at which leaving at exit 0 beats any later exit
    for every sample (so the cheapest rule is reached first); each lambda trains a policy
    and its hard rule is scored. `significant` compares it with `start` (the threshold
    optimiser's point) by `significant_gain`: deploy the policy only then."""
    traces, budget = scorer.traces, scorer.budget
    conf, pred, k_total = traces.conf, traces.pred, traces.exits
    if not policy_point(scorer, np.zeros(len(traces), int)).feasible(budget):
        return None  # every sample at exit 0 is the cheapest any rule can do
    c64 = conf.astype(np.float64)
    raw = np.stack([np.stack(features(c64[:, k], pred[:, k], *((None, None) if k == 0 else
                                                                (c64[:, k - 1], pred[:, k - 1]))), axis=1)
                    for k in range(k_total - 1)])  # (K-1, N, F)
    mean, std = raw.mean(axis=1), raw.std(axis=1)  # (K-1, F)
    std[std < 1e-12] = 1.0  # a constant feature (exit 0's prev_conf, agree) gets no gradient: its weight stays 0
    phi = (raw - mean[:, None]) / std[:, None]
    cost = exit_costs(scorer)[:, None]
    correct = traces.correct.T.astype(np.float64)  # (K, N)
    lo, hi = 0.0, 2.0 / max(float(cost[1, 0] - cost[0, 0]), 1e-3)
    found: list[tuple[Point, ExitPolicy]] = []
    for step in range(steps):
        lam = hi if step == 0 else (lo + hi) / 2
        params = _train(phi, correct - lam * cost, iters, lr)
        w = params[:, :-1] / std  # fold the standardisation into raw-unit weights
        policy = ExitPolicy(w, params[:, -1] - (w * mean).sum(axis=1), lam)
        point = policy_point(scorer, policy.taken(conf, pred))
        found.append((point, policy))
        if progress:
            progress(step + 1, steps)
        if not point.feasible(budget):
            if step == 0:
                break  # the dearest price did not reach a feasible rule: none will
            lo = lam
        else:
            hi = lam
    best = best_feasible([p for p, _ in found], budget)
    if best is None:
        return None
    policy = next(pol for p, pol in found if p is best)
    beats = (start is None or not start.feasible(budget)
             or significant_gain(scorer, policy.taken(conf, pred), scorer.taken(start.thresholds)))
    return PolicyFit(policy, best, beats)
