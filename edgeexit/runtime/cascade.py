"""The gating loop, written once for every backend.

Stage k runs on the samples still active; the loop reads only `conf` and `pred`, retires
samples with conf >= threshold_k, asks the backend to gather the carried tensors of the
rest (so they can stay on a device) and goes on; the last stage takes everything left.
The leavers' logits are gathered on the backend as they leave and fetched together at the
end of the call (a device backend waits once for all of them). Results come back in input
order with the exit each sample took and per-stage timings.

With an exit policy (`calibration.policy.ExitPolicy`, a trained rule) the decision at exit
k is the policy's instead of the threshold's; it also sees the previous exit's conf and
pred, which the loop keeps for the active samples (host arrays, compacted with them).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from edgeexit.errors import EdgeExitError
from edgeexit.runtime.backend import Backend
from edgeexit.stage_io import StageIO

if TYPE_CHECKING:
    from calibration.policy import ExitPolicy

NEVER = float("inf")  # a threshold no confidence reaches: the stage never retires a sample
# Anytime calls correct their predictions by what they see: a call that started a stage after
# stage 0 and still finished late widens every later prediction by LATE_WIDEN; each call in time
# narrows it back by ON_TIME_NARROW (never below the profile's). Where the profile's tail is
# shorter than the machine's now, late calls then settle near ON_TIME_NARROW / ln(LATE_WIDEN),
# about 0.5%, below the 1% a deadline is aimed at.
LATE_WIDEN, ON_TIME_NARROW = 1.1, 1 / 2000


@dataclass
class CascadeResult:
    """Per-sample outcome (input order) and per-stage cost of one cascade run."""

    pred: np.ndarray  # (N,) int64 class index
    logits: np.ndarray  # (N, C) logits of the exit taken
    conf: np.ndarray  # (N,) confidence at the exit taken
    exit: np.ndarray  # (N,) index of the exit taken
    stage_seconds: np.ndarray  # (K,) wall time spent in each stage (run + decision + gather)
    stage_samples: np.ndarray  # (K,) samples each stage processed
    exit_conf: np.ndarray | None = None  # (N, K) every reached exit's confidence (NaN where not reached)
    exit_pred: np.ndarray | None = None  # (N, K) every reached exit's prediction (-1 where not reached)
    cut_off: np.ndarray | None = None  # (N,) with a deadline: answered from an earlier exit than gating chose

    @property
    def probs(self) -> np.ndarray:
        """(N, C) class probabilities at the exit taken (softmax, computed on demand)."""
        return softmax(self.logits)

    def exit_shares(self) -> np.ndarray:
        """Share of samples leaving at each exit."""
        return np.bincount(self.exit, minlength=len(self.stage_samples)) / max(1, len(self.exit))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, stable for large logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def gate_thresholds(thresholds: Sequence[float | None], n_stages: int) -> list[float]:
    """Validate per-exit thresholds; the last exit's (None or 0) becomes 'take all'. The one
    place a threshold list meets its model's exit count (the yaml's, --thresholds, a bundle's),
    so the count is checked before what only a list of the right length can get wrong."""
    if len(thresholds) != n_stages:
        raise EdgeExitError(f"gating.thresholds: {len(thresholds)} values for {n_stages} exits; give one per exit, "
                            "the last null")
    if any(t is None for t in thresholds[:-1]):
        raise EdgeExitError("gating.thresholds: only the last threshold may be null")
    if thresholds[-1] not in (None, 0.0):
        raise EdgeExitError("gating.thresholds: the last exit takes every remaining sample; set its threshold to null "
                            "(or 0)")
    return [float(t) for t in thresholds[:-1]] + [-NEVER]


class _Results:
    """Per-sample results written at input positions as samples leave, exit by exit; the
    leavers' logits stay on the backend until the end of the call (`logits`)."""

    def __init__(self, n: int):
        self.pred = np.full(n, -1, np.int64)
        self.conf = np.zeros(n, np.float32)
        self.exit = np.full(n, -1, np.int64)
        self.pending: list[tuple[np.ndarray, Any]] = []  # (input positions, logits on the backend)

    def put(self, where: np.ndarray, logits: Any, conf: np.ndarray, pred: np.ndarray, k: int) -> None:
        self.conf[where], self.pred[where], self.exit[where] = conf, pred, k
        self.pending.append((where, logits))

    def logits(self, backend: Backend) -> np.ndarray:
        """Every leaver's logits in input order, fetched together (one wait on a device)."""
        parts = backend.download_many([handle for _, handle in self.pending])
        out = np.zeros((len(self.pred), parts[0].shape[1]), parts[0].dtype)
        for (where, _), part in zip(self.pending, parts):
            out[where] = part
        return out


class Cascade:
    """Gated execution of a staged model on any `Backend`: per-exit confidence thresholds,
    or an exit policy that then decides instead of the thresholds.

    With a `deadline` (seconds per call; anytime prediction), a stage is started only when its
    predicted finish fits: `predict(k, n)` gives stage k's seconds on n samples (from the
    profile), times `margin`, which late calls widen and calls in time narrow (see
    LATE_WIDEN). The samples still active then answer from the last exit they completed and
    are marked `cut_off`. Stage 0 always runs: every input gets an answer."""

    def __init__(self, backend: Backend, ios: Sequence[StageIO], thresholds: Sequence[float | None],
                 policy: ExitPolicy | None = None, deadline: float | None = None,
                 predict: Callable[[int, int], float] | None = None):
        self.backend, self.ios = backend, list(ios)
        self.thresholds = gate_thresholds(thresholds, len(self.ios))
        if policy is not None and policy.exits != len(self.ios):
            raise EdgeExitError(f"gating.policy: trained for {policy.exits} exits, the bundle has {len(self.ios)}")
        if deadline is not None and not deadline > 0:
            raise EdgeExitError(f"--deadline-ms: {deadline * 1e3:g} ms is not a positive deadline")
        if deadline is not None and predict is None:
            raise EdgeExitError("--deadline-ms: needs the stages' profiled costs (edgeexit profile BUNDLE first)")
        self.policy, self.deadline = policy, deadline
        self.predict = None if predict is None else functools.lru_cache(maxsize=None)(predict)  # per call: cheap
        self.margin = 1.0

    @property
    def name(self) -> str:
        """What runs the stages (the backend's name), for reports."""
        return self.backend.name

    def __call__(self, x: np.ndarray, collect: bool = False) -> CascadeResult:
        """Run the cascade on a normalised batch `x`; `collect` also keeps every exit's conf/pred."""
        began = time.perf_counter()
        with self.backend.scope():
            result = self._run(x, collect)
        if self.deadline is not None:
            if time.perf_counter() - began <= self.deadline:
                self.margin = max(1.0, self.margin * (1 - ON_TIME_NARROW))
            elif result.stage_samples[1:].any():  # late after starting a stage it was predicted to finish
                self.margin *= LATE_WIDEN
        return result

    def _run(self, x: np.ndarray, collect: bool) -> CascadeResult:
        n, k_total, be = len(x), len(self.ios), self.backend
        if n == 0:
            raise EdgeExitError("input: empty batch")
        seconds, samples = np.zeros(k_total), np.zeros(k_total, np.int64)
        exit_conf = np.full((n, k_total), np.nan, np.float32) if collect else None
        exit_pred = np.full((n, k_total), -1, np.int64) if collect else None
        results: _Results | None = None  # allocated when the first samples leave before the rest
        policy, last = self.policy, k_total - 1
        prev_c = prev_p = None  # the previous exit's conf and pred of the active samples (policy only)

        active = np.arange(n)
        began, held, cut_off = time.perf_counter(), None, None  # held: the active samples' last exit (deadline)
        feeds = {self.ios[0].inputs[0]: be.upload(x)}
        for k, io in enumerate(self.ios):
            start = time.perf_counter()
            if held is not None and start - began + self.margin * self.predict(k, len(active)) > self.deadline:
                cut_off = np.zeros(n, bool)  # stage k cannot finish in time: answer from exit k-1
                cut_off[active] = True
                k -= 1
                if results is None:
                    return self._answered(k, *held, start, seconds, samples, exit_conf, exit_pred, cut_off)
                results.put(active, *held, k)
                break
            out = be.run(k, feeds)
            c, p = be.download_many([out[io.conf], out[io.pred]])
            samples[k] = len(active)
            if collect:
                exit_conf[active, k], exit_pred[active, k] = c, p
            if k == last:
                leave = None
            elif policy is None:
                leave = c >= self.thresholds[k]
            else:
                leave = policy.leave(k, c, p, prev_c, prev_p)
            if leave is None or np.count_nonzero(leave) == len(active):  # everyone left: done
                if results is None:
                    return self._answered(k, out[io.logits], c, p, start, seconds, samples, exit_conf, exit_pred,
                                          None if self.deadline is None else np.zeros(n, bool))
                results.put(active, out[io.logits], c, p, k)
                break
            if leave.any():  # some leave: record them, gather the rest on the backend
                rows, keep = np.flatnonzero(leave), np.flatnonzero(~leave)
                results = results or _Results(n)
                results.put(active[rows], be.take(out[io.logits], rows), c[rows], p[rows], k)
                feeds = {name: be.take(out[name], keep) for name in io.carry}
                active = active[keep]
                if self.deadline is not None:
                    held = (be.take(out[io.logits], keep), c[keep], p[keep])
                if policy is not None:
                    c, p = c[keep], p[keep]  # the next exit's prev_c, prev_p: those that go on
            else:
                feeds = {name: out[name] for name in io.carry}
                if self.deadline is not None:
                    held = (out[io.logits], c, p)
            prev_c, prev_p = c, p
            seconds[k] = time.perf_counter() - start
        logits = results.logits(be)  # the leavers' logits, fetched once: counted in the last stage's time
        seconds[k] += time.perf_counter() - start
        if self.deadline is not None and cut_off is None:
            cut_off = np.zeros(n, bool)
        return CascadeResult(results.pred, logits, results.conf, results.exit, seconds, samples,
                             exit_conf, exit_pred, cut_off)

    def _answered(self, k: int, logits: Any, conf: np.ndarray, pred: np.ndarray, start: float, seconds: np.ndarray,
                  samples: np.ndarray, exit_conf: np.ndarray | None, exit_pred: np.ndarray | None,
                  cut_off: np.ndarray | None) -> CascadeResult:
        """The result when exit k answers every sample and none left before (so in input order):
        its arrays are the result, without a merge; what it takes counts in stage k's time."""
        logits = self.backend.download(logits)
        seconds[k] += time.perf_counter() - start
        return CascadeResult(pred.astype(np.int64, copy=False), logits, conf, np.full(len(conf), k), seconds, samples,
                             exit_conf, exit_pred, cut_off)

    def run_batched(self, x: np.ndarray, batch: int, collect: bool = False) -> CascadeResult:
        """The cascade over `x` in chunks of `batch` (the engines' batch limit), merged in order."""
        return concatenate([self(x[i:i + batch], collect) for i in range(0, len(x), batch)])


def concatenate(parts: Sequence[CascadeResult]) -> CascadeResult:
    """The results of consecutive chunks as one, in order (per-stage costs summed)."""
    if len(parts) == 1:
        return parts[0]
    cat = lambda field: None if getattr(parts[0], field) is None else \
        np.concatenate([getattr(p, field) for p in parts])  # noqa: E731
    return CascadeResult(cat("pred"), cat("logits"), cat("conf"), cat("exit"),
                         np.sum([p.stage_seconds for p in parts], axis=0), np.sum([p.stage_samples for p in parts], axis=0),
                         cat("exit_conf"), cat("exit_pred"), cat("cut_off"))


def full_depth(backend: Backend, ios: Sequence[StageIO]) -> Cascade:
    """The cascade with no early exit: every sample runs every stage and every exit head."""
    return Cascade(backend, ios, [NEVER] * (len(ios) - 1) + [None])


def trace(backend: Backend, ios: Sequence[StageIO], x: np.ndarray, batch: int) -> CascadeResult:
    """Every exit's confidence and prediction for every sample: the cascade with no early exit."""
    return full_depth(backend, ios).run_batched(x, batch, collect=True)
