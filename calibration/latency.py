"""What a cascade call costs, as a function of how many samples reach each stage.

The cost model (used by every solver and by the reports):

* A cascade call on a batch of B samples costs `overhead(B)` (upload, result assembly:
  everything outside the stages) plus, for every stage k that at least one sample reaches,
  `stage_k(n_k)` where n_k is the number of samples still active at k, plus a compaction
  `gather_k(n_k)` after stage k when some samples leave there and some go on.
* At batch 1 this is the familiar rule: a sample leaving at exit k costs the overhead plus
  the sum of the stage latencies up to k.
* A partially filled batch (n_k below B after compaction) is costed by linear
  interpolation between the batch sizes that were profiled; below the smallest profiled
  size it costs what that size costs (a call never gets cheaper than its floor); above
  the largest, the last segment's per-sample slope is extended.
* Those tables come from uniform calls (every sample leaving at one exit, back to back),
  which keep a stage's weights hot in cache and compact nothing. A deployed stream mixes
  calls that stop at different depths and split their batches (leaver logits taken, results
  merged, stages run on odd sizes): the profile also times such calls, with real leave
  patterns, and a least-squares correction on them (`Mixed`) is added to every call: a
  constant, one term per stage reached beyond the first, one per compaction.

Numbers come from `profile.json` (measured on the device by `edgeexit profile`) or, when
no device is at hand, from a device profile's peak figures (`estimate`, marked as such).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from calibration.errors import CalibrationError

# Where a model comes from: `profile` (measured, profile.json), `estimate` (peak figures), or
# `auto` (a stored profile, else one taken now on a matching machine, else the estimate).
SOURCES = ("auto", "profile", "estimate")


def _interp(n: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Seconds of a call on n samples from seconds measured at batch sizes xs (0 for n == 0)."""
    n = np.asarray(n, dtype=np.float64)
    out = np.interp(n, xs, ys)
    if len(xs) > 1:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    else:
        slope = ys[0] / xs[0]
    above = n > xs[-1]
    out[above] = ys[-1] + max(slope, 0.0) * (n[above] - xs[-1])
    out[n <= 0] = 0.0
    return out


@dataclass(frozen=True)
class LatencyModel:
    """Seconds per stage call, compaction and cascade overhead at profiled batch sizes."""

    batches: tuple[int, ...]  # profiled batch sizes, ascending
    stage: np.ndarray  # (len(batches), K) seconds of stage k's call (run + decision)
    gather: np.ndarray  # (len(batches), K) seconds to compact the carry after stage k (last column 0)
    overhead: np.ndarray  # (len(batches),) seconds of a cascade call outside its stages
    source: str  # where the numbers come from, for reports
    estimate: bool = False  # True: derived from peak figures, not measured
    mixed: np.ndarray | None = None  # (len(batches), 2K-1) seconds of the mixed-stream correction (`Mixed`)

    def __post_init__(self):
        b, k = len(self.batches), self.stage.shape[-1]
        if self.stage.shape != (b, k) or self.gather.shape != (b, k) or self.overhead.shape != (b,):
            raise CalibrationError(f"latency model: shapes stage {self.stage.shape}, gather {self.gather.shape}, "
                                   f"overhead {self.overhead.shape} do not match {b} batch sizes")
        if list(self.batches) != sorted(set(self.batches)) or self.batches[0] < 1:
            raise CalibrationError(f"latency model: batch sizes {list(self.batches)} must be ascending and >= 1")
        if (self.stage < 0).any() or (self.gather < 0).any() or (self.overhead < 0).any():
            raise CalibrationError("latency model: negative seconds")
        if self.mixed is not None and self.mixed.shape != (b, 2 * k - 1):
            raise CalibrationError(f"latency model: mixed-stream terms {self.mixed.shape} do not match {b} batch sizes "
                                   f"and {k} stages")

    @property
    def stages(self) -> int:
        return self.stage.shape[1]

    def stage_seconds(self, counts: np.ndarray) -> np.ndarray:
        """(..., K) seconds of each stage given how many samples it runs on (0: not run)."""
        xs = np.asarray(self.batches, dtype=np.float64)
        return np.stack([_interp(counts[..., k], xs, self.stage[:, k]) for k in range(self.stages)], axis=-1)

    def stage_call(self, k: int, n: int) -> float:
        """Seconds of stage k's call on n samples."""
        return float(_interp(np.array([n]), np.asarray(self.batches, dtype=np.float64), self.stage[:, k])[0])

    def uniform_call(self, k: int, n: int) -> float:
        """Seconds of a call of n samples that all leave at exit k (from the tables)."""
        return float(self.table_seconds(np.array([[n] * (k + 1) + [0] * (self.stages - k - 1)]))[0])

    def batch_seconds(self, taken: np.ndarray) -> np.ndarray:
        """(M,) seconds of M cascade calls, given the exit each sample of each call takes ((M, B) ints)."""
        taken = np.asarray(taken)
        if taken.ndim == 1:
            taken = taken[:, None]
        counts = np.stack([(taken >= k).sum(axis=1) for k in range(self.stages)], axis=1)  # (M, K) reaching k
        return self.count_seconds(counts)

    def count_seconds(self, counts: np.ndarray) -> np.ndarray:
        """(M,) seconds of M cascade calls, given how many samples reach each stage ((M, K) ints)."""
        total = self.table_seconds(counts)
        if self.mixed is None:
            return total
        xs, size = np.asarray(self.batches, dtype=np.float64), counts[:, :1]
        terms = np.stack([np.interp(size[:, 0], xs, column) for column in self.mixed.T], axis=1)  # at the call's size
        floor = self.table_seconds(np.concatenate([size, np.zeros_like(counts[:, 1:])], axis=1))
        return np.maximum(total + (Mixed.features(counts) * terms).sum(axis=1), floor)

    def table_seconds(self, counts: np.ndarray) -> np.ndarray:
        """(M,) seconds of M calls from the uniform-call tables alone (no mixed-stream correction)."""
        xs = np.asarray(self.batches, dtype=np.float64)
        total = self.stage_seconds(counts).sum(axis=1) + _interp(counts[:, 0], xs, self.overhead)
        for k in range(self.stages - 1):
            split = (counts[:, k + 1] > 0) & (counts[:, k + 1] < counts[:, k])
            total += np.where(split, _interp(counts[:, k], xs, self.gather[:, k]), 0.0)
        return total

    def exit_seconds(self) -> np.ndarray:
        """(K,) seconds of a batch-1 call that leaves at each exit (overhead + stages up to it)."""
        return self.batch_seconds(np.arange(self.stages)[:, None])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (milliseconds), for calibration.json."""
        return {"source": self.source, "estimate": self.estimate, "batches": list(self.batches),
                "stage_ms": (self.stage * 1e3).round(6).tolist(), "gather_ms": (self.gather * 1e3).round(6).tolist(),
                "overhead_ms": (self.overhead * 1e3).round(6).tolist(),
                "mixed_ms": None if self.mixed is None else (self.mixed * 1e3).round(6).tolist()}


class Mixed:
    """The mixed-stream correction: what calls with real leave patterns cost beyond the
    uniform-call tables, fitted by least squares per profiled batch size on the profile's
    `mixed_calls` (distinct leave patterns, the mean seconds of each and how often it ran)."""

    @staticmethod
    def features(counts: np.ndarray) -> np.ndarray:
        """(M, 2K-1) per call: 1, whether each stage beyond the first runs, whether each stage
        but the last compacts (some samples leave there, some go on)."""
        reached = counts[:, 1:] > 0
        split = reached & (counts[:, 1:] < counts[:, :-1])
        return np.column_stack([np.ones(len(counts)), reached, split]).astype(np.float64)

    @classmethod
    def fit(cls, tables: LatencyModel, rows: Sequence[dict[str, Any] | None]) -> np.ndarray:
        """(len(batches), 2K-1) seconds of each term, per batch size (zeros where the profile
        has no mixed calls; terms no pattern exercises stay 0)."""
        width = 2 * tables.stages - 1
        out = np.zeros((len(tables.batches), width))
        for i, row in enumerate(rows):
            if not row:
                continue
            counts = np.asarray(row["counts"], dtype=np.int64)
            x = cls.features(counts)
            used = x.any(axis=0)
            weight = np.sqrt(np.asarray(row["calls"], dtype=np.float64))[:, None]
            residual = np.asarray(row["ms"], dtype=np.float64) / 1e3 - tables.table_seconds(counts)
            out[i, used] = np.linalg.lstsq(x[:, used] * weight, residual * weight[:, 0], rcond=None)[0]
        return out


def from_profile(entry: dict[str, Any], source: str, figure: str = "mean_ms") -> LatencyModel:
    """The latency model of one `profile.json` entry (one backend on one device), from its mean
    figures (or `figure`: "p99_ms" prices each call at its 99th percentile, for deadlines).

    Stage k costs the difference between whole calls that leave at exit k and at exit k-1
    (measured back to back, as a stream of such calls runs), stage 0 what a call leaving at
    exit 0 costs beyond the overhead; entries without those calls fall back to per-stage
    times measured inside full-depth calls. On mean figures, the mixed-stream correction
    (`Mixed`) is fitted on the entry's `mixed_calls` where it has them."""
    try:
        sizes = sorted(entry["batches"], key=int)
        rows = [entry["batches"][b] for b in sizes]
        overhead = np.array([r["overhead_ms"][figure] for r in rows], dtype=np.float64) / 1e3
        if all("exit_calls" in r for r in rows):
            calls = np.array([[c[figure] for c in r["exit_calls"]] for r in rows], dtype=np.float64) / 1e3
            calls = np.maximum.accumulate(calls, axis=1)  # leaving later never costs less
            overhead = np.minimum(overhead, calls[:, 0])
            stage = np.diff(calls, axis=1, prepend=overhead[:, None])
        else:
            stage = np.array([[s[figure] for s in r["stages"]] for r in rows], dtype=np.float64) / 1e3
        gather = np.array([r["gather_ms"] for r in rows], dtype=np.float64) / 1e3
        tables = LatencyModel(tuple(int(b) for b in sizes), stage, gather, np.maximum(overhead, 0.0), source)
        if figure != "mean_ms" or not any(r.get("mixed_calls") for r in rows):
            return tables
        return replace(tables, mixed=Mixed.fit(tables, [r.get("mixed_calls") for r in rows]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CalibrationError(f"profile: entry {source!r} is malformed ({exc!r})") from None


class Deadlines:
    """Calls priced for anytime prediction (`Cascade(deadline=...)`), from one profile entry: a
    call's tail, not its mean. The 99.9th percentile of a call is extrapolated from the
    profile's 90th and 99th as an exponential tail does (one more decade, one more p99 - p90),
    so that a deadline aimed at 99% of calls keeps room for the tail's drift and its sampling
    error."""

    def __init__(self, entry: dict[str, Any], source: str):
        self.p50, self.p90, self.p99 = (from_profile(entry, source, f) for f in ("p50_ms", "p90_ms", "p99_ms"))

    def call(self, k: int, n: int) -> float:
        """Seconds within which a call of n samples leaving at exit k finishes, but for 1 in 1000
        (never less than one leaving earlier)."""
        return max(2 * self.p99.uniform_call(j, n) - self.p90.uniform_call(j, n) for j in range(k + 1))

    def remainder(self, k: int, n: int) -> float:
        """What starting stage k on n samples adds to a call, as the cascade predicts it before
        deciding: the tail of a call leaving at exit k less the median of one leaving at exit
        k-1 (what is typically spent by then), so it errs late, which a deadline wants."""
        return self.call(k, n) - (self.p50.uniform_call(k - 1, n) if k else 0.0)

    def exit_seconds(self) -> np.ndarray:
        """(K,) the tail of a batch-1 call leaving at each exit: the deadline it needs."""
        return np.array([self.call(k, 1) for k in range(self.p50.stages)])


def estimate(flops: Sequence[float], weight_bytes: Sequence[float], activation_bytes: Sequence[float],
             peak_ops: Sequence[float], bandwidth: float, launch_s: float, source: str,
             batches: Sequence[int] = (1, 8, 32)) -> LatencyModel:
    """A roofline estimate when the device is not at hand: each stage call costs a fixed
    launch time plus the larger of its compute time at `peak_ops` (ops/s, per stage, for its
    precision) and its memory time (weights once, activations per sample) at `bandwidth`
    (bytes/s). Peak figures are never reached by small layers, so this is a lower bound."""
    flops, wb, ab, peak = (np.asarray(v, dtype=np.float64) for v in (flops, weight_bytes, activation_bytes, peak_ops))
    if (peak <= 0).any() or bandwidth <= 0:
        raise CalibrationError("latency estimate: the device profile has no peak figures for this precision")
    b = np.asarray(batches, dtype=np.float64)[:, None]
    stage = launch_s + np.maximum(b * flops / peak, (wb + b * ab) / bandwidth)
    gather = np.full_like(stage, launch_s)
    gather[:, -1] = 0.0
    return LatencyModel(tuple(int(x) for x in batches), stage, gather, np.full(len(batches), launch_s), source,
                        estimate=True)


@dataclass(frozen=True)
class WorstOf:
    """Latency on several devices at once (a fleet): every call costs what it costs on the
    slowest of them, so thresholds that hold a budget under this model hold it on each device
    (the mean of per-call maxima bounds every device's own mean)."""

    parts: tuple[LatencyModel, ...]

    def __post_init__(self):
        if not self.parts or len({p.stages for p in self.parts}) != 1:
            raise CalibrationError("latency model: a fleet needs one or more models with the same stages")

    @property
    def stages(self) -> int:
        return self.parts[0].stages

    @property
    def source(self) -> str:
        return "worst of " + ", ".join(p.source for p in self.parts)

    @property
    def estimate(self) -> bool:
        return any(p.estimate for p in self.parts)

    def batch_seconds(self, taken: np.ndarray) -> np.ndarray:
        """(M,) seconds of M cascade calls on the slowest device for each call."""
        return np.max([p.batch_seconds(taken) for p in self.parts], axis=0)

    def exit_seconds(self) -> np.ndarray:
        """(K,) seconds of a batch-1 call that leaves at each exit, on the slowest device."""
        return self.batch_seconds(np.arange(self.stages)[:, None])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the source and every device's model."""
        return {"source": self.source, "estimate": self.estimate, "worst_of": [p.to_dict() for p in self.parts]}
