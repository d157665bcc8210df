"""Per-exit thresholds that maximise accuracy under a latency budget, fitted on one split.

Two solvers share one scorer (accuracy and cost-model latency of any threshold vector on
recorded traces) and one feasibility rule (`Budget`):

* `geometric`: the MSDNet/RANet budgeted-batch baseline. For q in 0.05..1.95 the share of
  samples leaving at exit k is proportional to q^k; walking the exits, thresholds are set
  so those shares leave. A one-parameter slice of the threshold space; here costed with
  measured latency instead of FLOPs.
* `optimise`: the whole (K-1)-dimensional space over per-exit quantile grids. A Lagrangian
  sweep (coordinate ascent on accuracy - lambda * latency, lambda bisected) finds good
  regions; a constrained coordinate ascent started from the best feasible point found,
  the geometric optimum included, polishes it. It therefore never fits worse than the
  baseline on the split it is fitted on.

The budget applies to the latency of one cascade call on `batch` samples: its mean (with
an upper confidence bound, so that it holds on unseen samples of the same distribution)
or a tail percentile.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable, Iterator, Sequence

import numpy as np

from calibration.errors import CalibrationError
from calibration.gating import exits_taken
from calibration.latency import LatencyModel
from calibration.traces import Traces

NEVER = float("inf")
TAILS = {"mean": None, "p95": 0.95, "p99": 0.99}  # budget figures by name (model.yaml, CLI)
SOLVERS = ("optimise", "geometric", "policy")  # policy: calibration.policy, next to the optimiser


@dataclass(frozen=True)
class Budget:
    """What must hold: call latency (mean, or the `tail` quantile) <= `seconds` at `batch`."""

    seconds: float
    batch: int = 1
    tail: float | None = None  # None: the mean; 0.95: the 95th percentile of call latency
    confidence: float = 0.95  # mean only: the one-sided confidence that the mean holds on new samples

    def __post_init__(self):
        if not self.seconds > 0:
            raise CalibrationError(f"budget: {self.seconds * 1e3:g} ms is not a positive latency")
        if self.batch < 1:
            raise CalibrationError(f"budget: batch {self.batch} must be >= 1")
        if self.tail is not None and not 0.5 <= self.tail < 1:
            raise CalibrationError(f"budget: tail {self.tail} must be a quantile in [0.5, 1)")
        if not 0.5 <= self.confidence < 1:
            raise CalibrationError(f"budget: confidence {self.confidence} must be in [0.5, 1)")

    @property
    def metric(self) -> str:
        return "mean" if self.tail is None else f"p{self.tail * 100:g}"


def tail_seconds(calls: np.ndarray, q: float) -> np.ndarray:
    """The q-quantile of call latencies (last axis), an observed value (never interpolated)."""
    return np.quantile(calls, q, axis=-1, method="higher")


@dataclass(frozen=True)
class Point:
    """One threshold vector scored on one split."""

    thresholds: tuple[float | None, ...]
    accuracy: float
    mean_s: float  # mean call latency under the cost model
    p95_s: float
    bound_s: float  # the budgeted figure: upper confidence bound of the mean, or the tail quantile
    shares: tuple[float, ...]  # share of samples per exit

    def feasible(self, budget: Budget) -> bool:
        return self.bound_s <= budget.seconds * (1 + 1e-12)

    def to_dict(self) -> dict:
        """JSON-ready form (milliseconds)."""
        return {"thresholds": list(self.thresholds),
                "accuracy": self.accuracy, "mean_ms": self.mean_s * 1e3, "p95_ms": self.p95_s * 1e3,
                "bound_ms": self.bound_s * 1e3, "exit_shares": list(self.shares)}


class Scorer:
    """Accuracy and cost-model latency of threshold vectors on one split of traces.

    At batch 1 every sample is one call. At batch B the samples are dealt into calls of B
    by `draws` seeded shuffles (incomplete calls dropped), so the nonlinear cost of
    compacted, partially filled batches is averaged over realistic mixtures.
    """

    def __init__(self, traces: Traces, latency: LatencyModel, budget: Budget, draws: int = 16, seed: int = 0):
        if latency.stages != traces.exits:
            raise CalibrationError(f"latency model has {latency.stages} stages, the traces {traces.exits} exits")
        n, b = len(traces), budget.batch
        if n < b:
            raise CalibrationError(f"budget: batch {b} is larger than the {n} traced samples")
        self.traces, self.latency, self.budget = traces, latency, budget
        self.correct = traces.correct
        rng = np.random.default_rng(seed)
        orders = [np.arange(n)] if b == 1 else [rng.permutation(n) for _ in range(draws)]
        self.groups = np.concatenate([o[:n // b * b].reshape(-1, b) for o in orders])  # (M, B) sample ids
        self.exit_s = latency.exit_seconds() if b == 1 else None
        self.z = NormalDist().inv_cdf(budget.confidence)
        self.scale = 1.0 / np.sqrt(n / b)  # standard error per distinct call's worth of samples

    def calls(self, taken: np.ndarray) -> np.ndarray:
        """(G, M) call latencies for G exit assignments ((N, G) exit per sample)."""
        if self.exit_s is not None:
            return self.exit_s[taken.T]
        return np.stack([self.latency.batch_seconds(taken[self.groups, j]) for j in range(taken.shape[1])])

    def bounds(self, calls: np.ndarray) -> np.ndarray:
        """(G,) the budgeted figure of each row of call latencies."""
        if self.budget.tail is not None:
            return tail_seconds(calls, self.budget.tail)
        return calls.mean(axis=1) + self.z * calls.std(axis=1) * self.scale

    def accuracy(self, taken: np.ndarray) -> np.ndarray:
        """(G,) accuracy of each column of exits."""
        return self.correct[np.arange(len(taken))[:, None], taken].mean(axis=0)

    def taken(self, thresholds: Sequence[float | None]) -> np.ndarray:
        """(N,) exit per sample, the runtime's rule (None before the last exit: never leave there)."""
        return exits_taken(self.traces.conf, [NEVER if t is None else t for t in thresholds[:-1]] + [None])

    def point(self, thresholds: Sequence[float | None]) -> Point:
        """Score one threshold vector."""
        taken = self.taken(thresholds)[:, None]
        calls = self.calls(taken)
        shares = np.bincount(taken[:, 0], minlength=self.traces.exits) / len(taken)
        th = tuple(None if t is None or t == NEVER else float(t) for t in thresholds[:-1]) + (None,)
        return Point(th, float(self.accuracy(taken)[0]), float(calls.mean()), float(tail_seconds(calls[0], 0.95)),
                     float(self.bounds(calls)[0]), tuple(float(s) for s in shares))


def _better(a: Point, b: Point | None) -> bool:
    """Higher accuracy wins; at equal accuracy the point that spends more of the budget.

    Fitted accuracy ties are common on small splits (a few samples apart); going deeper
    is the better bet on unseen samples, since later exits are more accurate, and the
    budget is there to be spent."""
    return b is None or a.accuracy > b.accuracy + 1e-12 or (abs(a.accuracy - b.accuracy) <= 1e-12
                                                              and a.bound_s > b.bound_s)


def geometric_thresholds(conf: np.ndarray, q: float) -> list[float | None]:
    """MSDNet's rule: thresholds under which a share proportional to q^k leaves at exit k."""
    n, k_total = conf.shape
    shares = q ** np.arange(k_total, dtype=np.float64)
    shares /= shares.sum()
    remaining = np.ones(n, bool)
    thresholds: list[float | None] = []
    for k in range(k_total - 1):
        count = int(np.floor(n * shares[k]))
        pool = conf[remaining, k]
        if count == 0 or len(pool) == 0:
            thresholds.append(NEVER)
            continue
        t = float(np.sort(pool)[::-1][min(count, len(pool)) - 1])
        thresholds.append(t)
        remaining &= conf[:, k] < t
    return thresholds + [None]


def geometric(scorer: Scorer, qs: Sequence[float] = tuple(np.linspace(0.05, 1.95, 191))) -> list[Point]:
    """The baseline's whole curve: one scored point per q."""
    return [scorer.point(geometric_thresholds(scorer.traces.conf, q)) for q in qs]


def best_feasible(points: Sequence[Point], budget: Budget) -> Point | None:
    """The most accurate point within the budget (see `_better` for ties), or None."""
    best = None
    for p in points:
        if p.feasible(budget) and _better(p, best):
            best = p
    return best


class _Search:
    """Coordinate moves over per-exit candidate thresholds, scored for a whole grid at once."""

    def __init__(self, scorer: Scorer, grid: int, extra: Sequence[Sequence[float | None]]):
        self.scorer = scorer
        conf = scorer.traces.conf
        self.k_total = conf.shape[1]
        self.cands = []
        for k in range(self.k_total - 1):
            values = np.quantile(conf[:, k], np.linspace(0.0, 1.0, grid), method="higher")
            more = [t for th in extra for t in th[k:k + 1] if t is not None]
            self.cands.append(np.unique(np.concatenate([values, more, [NEVER]])))
        self.ge = [conf[:, k][:, None] >= c[None, :] for k, c in enumerate(self.cands)]  # (N, G_k) leaves at k

    def moves(self, th: list[float]) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """For each exit k, yield (k, accuracies, mean call latencies, bounds) of every candidate at k."""
        scorer, conf = self.scorer, self.scorer.traces.conf
        fixed = conf >= np.array(th + [-NEVER])[None, :]  # (N, K) leaves under the current thresholds
        for k in range(self.k_total - 1):
            before = fixed[:, :k].any(axis=1)
            first_before = np.argmax(fixed[:, :k], axis=1) if k else np.zeros(len(conf), int)
            first_after = k + 1 + np.argmax(fixed[:, k + 1:], axis=1)
            taken = np.where(before[:, None], first_before[:, None],
                             np.where(self.ge[k], k, first_after[:, None]))  # (N, G_k)
            calls = scorer.calls(taken)
            yield k, scorer.accuracy(taken), calls.mean(axis=1), scorer.bounds(calls)


def _ascend(search: _Search, th: list[float], pick: Callable[[np.ndarray, np.ndarray, np.ndarray], int],
            sweeps: int = 20) -> list[float]:
    """Coordinate ascent: at each exit move to the candidate `pick` chooses, until nothing moves."""
    for _ in range(sweeps):
        moved = False
        for k, acc, mean, bound in search.moves(th):
            j = pick(acc, mean, bound)
            if j >= 0 and search.cands[k][j] != th[k]:
                th[k] = float(search.cands[k][j])
                moved = True
                break  # the other exits' scores changed: recompute from the new point
        if not moved:
            return th
    return th


def optimise(scorer: Scorer, start: Point | None = None, grid: int = 64, steps: int = 24,
             progress: Callable[[int, int], None] | None = None) -> Point | None:
    """The most accurate feasible thresholds over the full space, or None if none is feasible.

    `start` (e.g. the geometric optimum) seeds the final constrained ascent, so the result
    is never worse on this split than `start`; it is returned unchanged unless the fit
    finds strictly higher accuracy, since a different point with equal fitted accuracy is
    a coin flip on unseen samples."""
    budget = scorer.budget
    search = _Search(scorer, grid, [start.thresholds] if start else [])
    full = scorer.point([NEVER] * (search.k_total - 1) + [None])
    norm = max(full.mean_s, 1e-12)
    found: list[Point] = [full] + ([start] if start else [])
    lo, hi = 0.0, 4.0
    for step in range(steps):
        lam = (lo + hi) / 2

        def lagrangian(acc, mean, _bound, lam=lam):
            return int(np.argmax(acc - lam * mean / norm))

        th = _ascend(search, [NEVER] * (search.k_total - 1), lagrangian)
        point = scorer.point(th + [None])
        found.append(point)
        lo, hi = (lam, hi) if not point.feasible(budget) else (lo, lam)
        if progress:
            progress(step + 1, steps + 1)
    best = best_feasible(found, budget)
    if best is None:
        return None
    current = [NEVER if t is None else t for t in best.thresholds[:-1]]

    def constrained(acc, _mean, bound):
        ok = bound <= budget.seconds * (1 + 1e-12)
        if not ok.any():
            return -1
        top = np.max(acc[ok])
        tied = ok & (acc >= top - 1e-12)
        return int(np.flatnonzero(tied)[np.argmax(bound[tied])])

    polished = scorer.point(_ascend(search, current, constrained) + [None])
    if progress:
        progress(steps + 1, steps + 1)
    if polished.feasible(budget) and _better(polished, best):
        best = polished
    if start is not None and start.feasible(budget) and best.accuracy <= start.accuracy + 1e-12:
        return start  # no fitted gain over the baseline: do not trade it for a tie that may not generalise
    return best
