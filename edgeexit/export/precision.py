"""Per-stage precision for a build: convert, measure against fp32, fall back or refuse.

Every stage is exported in fp32 first. A stage asked for int8 is quantized with explicit
Q/DQ calibrated on the yaml's calibration split (each stage on the real tensors the fp32
stages before it carry); fp16 becomes a strongly typed fp16 graph. Carried tensors stay
float32 at every stage boundary, so stages of different precisions chain. The deployed
graph replaces `stages/stage{k}.onnx`; the fp32 one is kept as `stages/stage{k}.fp32.onnx`.

The accuracy report compares, per exit, fp32 with the deployed precisions on the test
split. When the final exit loses more than `export.tolerance_pt` points, the first stage
whose conversion crosses the line is named; it falls back to `export.fallback` if the
yaml allows one, otherwise the build stops with that stage in the message.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edgeexit.errors import SpecError
from edgeexit.export.quantize import convert_fp16, quantize_int8
from edgeexit.runtime.cascade import CascadeResult, trace
from edgeexit.runtime.onnxruntime_backend import OnnxRuntimeBackend, make_session
from edgeexit.stage_io import StageIO


def carried_feeds(paths: Sequence[Path], ios: Sequence[StageIO], x: np.ndarray) -> list[dict[str, np.ndarray]]:
    """The fp32 inputs of every stage for images `x`: the image, then each stage's carry."""
    feeds, current = [], {ios[0].inputs[0]: x}
    for path, io in zip(paths, ios):
        feeds.append(current)
        carry = make_session(path).run(list(io.carry), current) if io.carry else []
        current = dict(zip(io.carry, carry))
    return feeds


def convert(fp32: Path, out: Path, precision: str, feeds: dict[str, np.ndarray], method: str) -> None:
    """Write `fp32` in `precision` to `out` (int8 calibrated on `feeds`)."""
    if precision == "int8":
        quantize_int8(fp32, out, [feeds], method=method)
    elif precision == "fp16":
        convert_fp16(fp32, out)
    else:
        shutil.copyfile(fp32, out)


@dataclass
class PrecisionResult:
    precisions: list[str]  # per stage, after any fallback
    report: dict  # per-exit fp32 vs deployed accuracy and agreement, fallbacks, calibration


def _final_drop_pt(fp32: CascadeResult, other: CascadeResult, y: np.ndarray) -> float:
    return 100.0 * (np.mean(fp32.exit_pred[:, -1] == y) - np.mean(other.exit_pred[:, -1] == y))


def apply_precision(stage_dir: Path, ios: list[StageIO], spec, x_cal: np.ndarray, x_test: np.ndarray,
                    y_test: np.ndarray, log: Callable[[str], None]) -> PrecisionResult:
    """Convert the exported fp32 stages in `stage_dir` to the spec's precisions, checked on the test split."""
    n, exp = len(ios), spec.export
    wanted = [exp.precision_of(k) for k in range(n)]
    deployed = [stage_dir / f"stage{k}.onnx" for k in range(n)]
    fp32 = [stage_dir / f"stage{k}.fp32.onnx" if p != "fp32" else deployed[k] for k, p in enumerate(wanted)]
    for k, p in enumerate(wanted):
        if p != "fp32":
            deployed[k].rename(fp32[k])
    cal = carried_feeds(fp32, ios, x_cal[:exp.calibration.samples])
    batch = exp.batch.max
    reference = trace(OnnxRuntimeBackend(fp32, ios), ios, x_test, batch)

    def converted(precisions: list[str], upto: int) -> CascadeResult:
        paths = [deployed[k] if k <= upto and precisions[k] != "fp32" else fp32[k] for k in range(n)]
        return reference if paths == fp32 else trace(OnnxRuntimeBackend(paths, ios), ios, x_test, batch)

    precisions, fallbacks = list(wanted), {}
    for k, p in enumerate(precisions):
        if p != "fp32":
            convert(fp32[k], deployed[k], p, cal[k], exp.calibration.method)
    while True:
        result = converted(precisions, n - 1)
        if _final_drop_pt(reference, result, y_test) <= exp.tolerance_pt:
            break
        drops = ((k, _final_drop_pt(reference, converted(precisions, k), y_test))
                 for k in range(n) if precisions[k] != "fp32")
        culprit, drop = next((k, d) for k, d in drops if d > exp.tolerance_pt)
        if exp.fallback is None or culprit in fallbacks or exp.fallback == precisions[culprit]:
            raise SpecError(
                f"export.precision: stage {culprit} in {precisions[culprit]} costs the final exit {drop:.2f} pt "
                f"of test accuracy (> export.tolerance_pt {exp.tolerance_pt:g}); allow export.fallback "
                f"(fp16 or fp32) or set export.stage_precision.{culprit}")
        log(f"      stage {culprit}: {precisions[culprit]} costs {drop:.2f} pt, falling back to {exp.fallback}")
        fallbacks[culprit] = {"from": precisions[culprit], "to": exp.fallback, "drop_pt": drop}
        precisions[culprit] = exp.fallback
        convert(fp32[culprit], deployed[culprit], exp.fallback, cal[culprit], exp.calibration.method)
    for k, p in enumerate(precisions):
        if p == "fp32" and fp32[k] != deployed[k]:
            fp32[k].unlink()  # fell back to fp32: the deployed file is the fp32 graph itself
    exits = [{"fp32_accuracy": float(np.mean(reference.exit_pred[:, k] == y_test)),
              "accuracy": float(np.mean(result.exit_pred[:, k] == y_test)),
              "agreement": float(np.mean(reference.exit_pred[:, k] == result.exit_pred[:, k]))}
             for k in range(n)]
    report = {"stages": precisions, "exits": exits, "final_drop_pt": _final_drop_pt(reference, result, y_test),
              "tolerance_pt": exp.tolerance_pt, "fallbacks": fallbacks,
              "calibration": {"method": exp.calibration.method, "samples": int(min(len(x_cal), exp.calibration.samples))}}
    return PrecisionResult(precisions, report)
