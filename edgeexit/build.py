"""`edgeexit build`: model.yaml -> a verified bundle and a report of what early exit bought.

Steps: validate the spec, the data and the target device, get weights (load or train),
cut the model into stages and prove the cut, export and parity-check every stage,
convert stages to their precision (checked against fp32 on the test split), evaluate the
exits and the cascade with onnxruntime, time cascade vs monolithic in one run, plot the
trade-off, seal the bundle, and build TensorRT engines where TensorRT is installed.
Everything is written in a temporary directory first; the output appears only once the
whole build has succeeded.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

import edgeexit
from calibration.gating import describe_thresholds, shared_threshold_sweep
from edgeexit.atomic import staging
from edgeexit.bundle import Bundle, Change, check_output, load_bundle, update_bundle, write_bundle
from edgeexit.data import Dataset, data_record, load_dataset, normalize
from edgeexit.devices import check_target, load_device
from edgeexit.errors import SpecError
from edgeexit.export.fused import CASCADE, agreement, write_fused
from edgeexit.export.onnx import ExportedGraph, activation_bytes, count_flops, export_checked, export_stages
from edgeexit.export.precision import apply_precision, convert
from edgeexit.flops import exit_flops
from edgeexit.inputs import value_range
from edgeexit.jsonio import dumps
from edgeexit.models import build_model, load_weights
from edgeexit.plots import plot_tradeoff
from edgeexit.profile import latency_rounds
from edgeexit.runtime.cascade import NEVER, Cascade, full_depth, gate_thresholds, trace
from edgeexit.runtime.fused import FusedCascade
from edgeexit.runtime.onnxruntime_backend import OnnxRuntimeBackend
from edgeexit.spec import Spec
from edgeexit.stage_io import StageIO
from edgeexit.staging import Monolithic, carry_bytes, check_staging, make_stages, per_stage, stage_io
from edgeexit.train import seed_everything, train

PARITY_SAMPLES = 64  # real samples used for the ONNX-vs-torch parity check
# Batch-1 latency is timed with one intra-op thread for both cascade and monolithic: on
# graphs this small, handing work to a thread pool costs more than it saves.
LATENCY_THREADS = 1
LATENCY_ROUNDS = 7  # interleaved rounds of the build's latency comparison (median and spread)


def log(message: str) -> None:
    """Progress line on stderr (stdout carries the summary and --json output)."""
    print(message, file=sys.stderr, flush=True)


def default_thresholds(confidence: str, n_exits: int) -> list[float | None]:
    """0.5 for a learned confidence (EENets' rule), 0.9 otherwise; the last exit takes all."""
    return [0.5 if confidence == "learned" else 0.9] * (n_exits - 1) + [None]


@dataclass(frozen=True)
class StageCost:
    flops: int  # per sample
    activation_bytes: int  # per sample, all intermediates (upper bound)
    weight_bytes: int
    carry_in_bytes: int = 0  # per sample, what the stage receives (the image for stage 0; kept between stages)


def new_model(spec: Spec) -> torch.nn.Module:
    """The spec's model with its seeded initial weights (the seed fixes them too)."""
    seed_everything(spec.train.seed)
    model = build_model(spec.model, spec.input, spec.base_dir)
    if getattr(model, "cut_note", None):
        log(f"      {model.cut_note}")
    if spec.model.checkpoint is not None:  # the user's trained backbone; the exit heads stay as initialised
        note = load_weights(model.backbone, spec.model.checkpoint, field="model.checkpoint", by_position=True,
                            keys=spec.model.checkpoint_keys)
        if note:
            log(f"      {note}")
    return model.eval()


def check_contract(model: torch.nn.Module, spec: Spec) -> None:
    """Refuse, before any training, a model that breaks the blocks/exits contract: its stages
    chained on a dummy batch must reproduce its own forward, with the yaml's confidence kind.
    A private generator keeps the seeded training draws untouched."""
    dummy = torch.randn(2, *spec.input.shape, generator=torch.Generator().manual_seed(0))
    check_staging(model, make_stages(model, spec.gating.confidence), dummy)


def fit_or_load(model: torch.nn.Module, spec: Spec, data: Dataset, costs: list[StageCost],
                progress: bool = True) -> dict | None:
    """Load `weights` into `model`, or train it when the spec gives none; returns the training record.

    `costs` (from `check_device`) give the EENets loss each exit's cumulative FLOPs share."""
    if spec.weights is not None:
        load_weights(model, spec.weights, by_position=True, keys=spec.weights_keys)
        return None
    cum = np.cumsum([c.flops for c in costs])
    result = train(model, spec, data, costs=list(cum / cum[-1]), progress=progress)
    model.eval()
    return {"val_accuracy": result.val_accuracy, "epoch_loss": result.losses, "epoch_seconds": result.epoch_seconds,
            "config": asdict(spec.train)}


def stage_costs(model: torch.nn.Module, spec: Spec) -> list[StageCost]:
    """Per-stage compute, activation and weight size at one sample (independent of the weights' values)."""
    def measure(_k, stage, carry):
        weights = sum(p.numel() * p.element_size() for p in stage.parameters())
        return StageCost(count_flops(stage, carry), activation_bytes(stage, carry), weights, carry_bytes(carry))

    return per_stage(make_stages(model, "max_softmax"), torch.zeros(1, *spec.input.shape), measure)


def check_device(spec: Spec, model: torch.nn.Module) -> list[StageCost]:
    """Refuse, before any training or export, what the target device cannot run (one line);
    returns the per-stage costs it measured."""
    n = len(model.blocks)
    for index in spec.export.stage_precision:
        if index >= n:
            raise SpecError(f"export.stage_precision.{index}: the model has {n} stages (0..{n - 1})")
    costs = stage_costs(model, spec)
    check_target(load_device(spec.target.device),
                 precisions=sorted({spec.export.precision_of(k) for k in range(n)}),
                 use_dla=spec.target.dla_core is not None, batch_max=spec.export.batch.max,
                 bytes_per_sample=max(c.activation_bytes for c in costs),
                 weight_bytes=sum(c.weight_bytes for c in costs))
    return costs


def _toolchain() -> dict[str, str]:
    import onnxsim

    return {"edgeexit": edgeexit.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxsim": onnxsim.__version__, "onnxruntime": onnxruntime.__version__}


def _monolithic_precision(spec: Spec, path: Path, x_cal: np.ndarray) -> str:
    """The monolithic baseline in the yaml's main precision, so comparisons are like for like."""
    precision = spec.export.precision
    if precision != "fp32":
        fp32 = path.with_name("monolithic.fp32.onnx")
        path.rename(fp32)
        convert(fp32, path, precision, {spec.input.name: x_cal[:spec.export.calibration.samples]},
                spec.export.calibration.method)
    return precision


def _manifest(spec: Spec, exported: list[ExportedGraph], precisions: list[str], mono: ExportedGraph,
              mono_precision: str, thresholds, costs: list[StageCost], root: Path,
              train_x: np.ndarray, fused: dict[str, Any] | None) -> dict[str, Any]:
    def fp32_copy(path: Path) -> str | None:  # the fp32 graph of one deployed in fp16/int8
        copy = path.with_name(path.stem + ".fp32.onnx")
        return copy.relative_to(root).as_posix() if copy.exists() else None

    return {
        "name": spec.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": {"name": spec.input.name, "shape": [None, *spec.input.shape], "dtype": spec.input.dtype,
                  "mean": list(spec.input.mean), "std": list(spec.input.std), "layout": "NCHW",
                  "range": value_range(train_x),  # raw units of the training data: `run` warns far from them
                  "resize": (("bicubic" if spec.data.kind == "folder" else "bilinear") if spec.data.resize else None)},
        "classes": list(spec.input.classes),
        "stages": [
            {"index": g.io.index, "onnx": g.path.relative_to(root).as_posix(), "inputs": list(g.io.inputs),
             "outputs": {"carry": list(g.io.carry), "logits": g.io.logits, "conf": g.io.conf, "pred": g.io.pred},
             "precision": p, "onnx_fp32": fp32_copy(g.path), "flops": g.flops, "params": g.params,
             "activation_bytes": c.activation_bytes, "parity_max_abs_diff": g.parity}
            for g, p, c in zip(exported, precisions, costs)
        ],
        "gating": {"confidence": spec.gating.confidence, "thresholds": thresholds},
        "fused": fused,
        "monolithic": mono.path.relative_to(root).as_posix(),
        "monolithic_fp32": fp32_copy(mono.path),
        "monolithic_cost": {"flops": mono.flops, "params": mono.params, "parity_max_abs_diff": mono.parity,
                            "precision": mono_precision},
        "model": spec.model.to_manifest(),
        "data": data_record(spec.data),
        "weights": "weights.pt",
        "export": {"opset": spec.export.opset, "batch": asdict(spec.export.batch)},
        "target": asdict(spec.target),
        "budget": asdict(spec.budget),
        "report": "report.json",
        "toolchain": _toolchain(),
    }


def fuse_stages(root: Path, ios: list[StageIO], classes: int, x: np.ndarray, thresholds) -> dict[str, Any]:
    """`stages/cascade.onnx`, composed from the final stage graphs and run on every sample of
    `x` against the staged cascade, each input alone, at `thresholds` and at full depth."""
    path = write_fused([root / f"stages/stage{io.index}.onnx" for io in ios], ios, classes, root / CASCADE)
    staged = OnnxRuntimeBackend([root / f"stages/stage{io.index}.onnx" for io in ios], ios, LATENCY_THREADS)
    checks = {}
    for name, gates in (("thresholds", thresholds), ("full_depth", [NEVER] * (len(ios) - 1) + [None])):
        fused = FusedCascade(path, ios[0].inputs[0], gates, len(ios), LATENCY_THREADS)
        checks[name] = agreement(fused(x), Cascade(staged, ios, gates).run_batched(x, 1))
    return {"onnx": CASCADE, "agreement": checks}


def fused_verdict(record: dict[str, Any], latency: dict[str, Any], mode: str, atol: float) -> dict[str, Any]:
    """`record` with whether the runtime uses the fused graph at batch 1, and why: it must agree
    with the staged cascade on every sample (exit, class, logits within the export tolerance);
    `auto` also wants it faster than the staged loop at the thresholds, measured here."""
    differs = [f"{name}: {c['exit_differs']} exits, {c['pred_differs']} classes differ, logits by "
               f"{c['logits_max_abs_diff']:.1e}" for name, c in record["agreement"].items()
               if c["exit_differs"] or c["pred_differs"] or c["logits_max_abs_diff"] > atol]
    fused, staged = latency["fused"], latency["cascade"]
    if differs:
        use, why = False, "disagrees with the staged cascade (" + "; ".join(differs) + ")"
    elif mode == "auto" and fused >= staged:
        use, why = False, f"no faster than the staged loop here ({fused:.4f} vs {staged:.4f} ms per input)"
    else:
        use, why = True, f"agrees on every test sample; {fused:.4f} vs {staged:.4f} ms per input staged"
    return {**record, "use_at_batch_1": use, "why": why}


def evaluate(bundle_root: Path, ios: list[StageIO], mono_path: Path, mono_io: StageIO, thresholds,
             x: np.ndarray, y: np.ndarray, batch: int, flops: list[int], mono_flops: int,
             fused: Path | None = None) -> dict[str, Any]:
    """Exit accuracy, exit shares and latency of the exported graphs on onnxruntime CPU.

    Latency: mean per sample at batch 1, the cascade (at `thresholds`), at full depth, the
    monolithic graph and (given its path) the fused cascade graph both ways, timed interleaved
    in this one run.
    """
    backend = OnnxRuntimeBackend([bundle_root / f"stages/stage{io.index}.onnx" for io in ios], ios, LATENCY_THREADS)
    every = trace(backend, ios, x, batch)
    correct = every.exit_pred == y[:, None]
    exit_acc = correct.mean(axis=0)
    cascade = Cascade(backend, ios, thresholds)
    gated = cascade.run_batched(x, batch)
    shares = gated.exit_shares()
    cum_flops = np.cumsum(flops)
    mono = OnnxRuntimeBackend([mono_path], [mono_io], LATENCY_THREADS)
    mono_names = list(mono_io.outputs)
    mono_pred = np.concatenate([mono.run(0, {mono_io.inputs[0]: x[i:i + batch]})["pred"]
                                for i in range(0, len(x), batch)])
    runners = {"cascade": cascade, "full_depth": full_depth(backend, ios),
               "monolithic": lambda s: mono.sessions[0].run(mono_names, {mono_io.inputs[0]: s})}
    if fused is not None:
        never = [NEVER] * (len(ios) - 1) + [None]
        runners |= {"fused": FusedCascade(fused, ios[0].inputs[0], thresholds, len(ios), LATENCY_THREADS),
                    "fused_full_depth": FusedCascade(fused, ios[0].inputs[0], never, len(ios), LATENCY_THREADS)}
    rounds = latency_rounds(runners, x, 1, LATENCY_ROUNDS)
    grid = np.concatenate([np.linspace(0.0, 1.0, 51), [NEVER]])
    tradeoff = shared_threshold_sweep(every.exit_conf, correct, cum_flops / 1e6, grid)
    tradeoff["threshold"][-1] = None  # no early exit: the full-depth end of the curve
    return {
        "samples": int(len(y)),
        "tradeoff": {"threshold": tradeoff["threshold"], "accuracy": tradeoff["accuracy"], "mflops": tradeoff["cost"]},
        "exit_accuracy": [float(a) for a in exit_acc],
        "exit_share": [float(s) for s in shares],
        "cumulative_flops": [int(f) for f in cum_flops],
        "cascade_accuracy": float((gated.pred == y).mean()),
        "cascade_flops": float((shares * cum_flops).sum()),
        "monolithic_flops": int(mono_flops),
        "monolithic_accuracy": float(np.mean(mono_pred == y)),
        "latency_ms": _latency_record(rounds),
    }


def _latency_record(rounds: dict[str, np.ndarray]) -> dict[str, Any]:
    """The build's latency figures: medians over interleaved rounds, and the spread of the
    cascade-to-monolithic ratio within rounds (one round's figure alone can mislead)."""
    ratio = rounds["cascade"] / rounds["monolithic"]
    ratios = {f"{name}_ratio": float(np.median(rounds[name] / rounds["monolithic"]))
              for name in ("full_depth", "fused", "fused_full_depth") if name in rounds}
    return {**{name: float(np.median(r)) * 1e3 for name, r in rounds.items()},
            "ratio": float(np.median(ratio)), "ratio_range": [float(ratio.min()), float(ratio.max())],
            **ratios, "rounds": len(ratio),
            "backend": "onnxruntime-cpu", "batch": 1, "threads": LATENCY_THREADS}


def build(spec: Spec, output: Path | None = None, progress: bool = True) -> tuple[Bundle, dict[str, Any]]:
    """Run the whole pipeline for `spec`; returns the verified bundle and its report."""
    dest = (output or spec.output).resolve()
    step = log if progress else (lambda _message: None)  # --quiet: no step lines; notes still print
    # everything that can be refused without data comes first: the output, the model, the weights
    check_output(dest)
    model = new_model(spec)
    if spec.model.exits_auto is not None:  # from here on (and in the bundle) the cuts chosen, by name
        spec = replace(spec, model=replace(spec.model, exits_after=model.cuts, exits_auto=None))
    check_contract(model, spec)
    thresholds = list(spec.gating.thresholds or default_thresholds(spec.gating.confidence, len(model.blocks)))
    gate_thresholds(thresholds, len(model.blocks))  # before training: a wrong count costs no minutes
    costs = check_device(spec, model)
    if spec.weights is not None:
        note = load_weights(model, spec.weights, by_position=True, keys=spec.weights_keys)
        if note:
            log(f"      {note}")
    data = load_dataset(spec)
    step(f"[1/7] data: {spec.data.kind}, train/val/calibration/test = "
         f"{len(data.train.y)}/{len(data.val.y)}/{len(data.calibration.y)}/{len(data.test.y)}")
    for note in data.notes:  # nothing decoded differently without a word
        log(f"      data: {note}")
    trained = None if spec.weights is not None else fit_or_load(model, spec, data, costs, progress)
    step(f"[2/7] model: {spec.model.label}, {len(model.blocks)} exits, "
         + ("trained: val accuracy per exit " + ", ".join(f"{a:.1%}" for a in trained["val_accuracy"])
            if trained else f"weights {spec.weights.name}"))

    norm = lambda a: normalize(a, spec.input.mean, spec.input.std)  # noqa: E731
    x_test = norm(data.test.x)
    sample = torch.from_numpy(x_test[:PARITY_SAMPLES])
    stages = make_stages(model, spec.gating.confidence)
    staged_diff = check_staging(model, stages, sample)
    ios = stage_io(stages, sample, spec.input.name)
    step(f"[3/7] stages: staged vs monolithic logits max abs diff {staged_diff:.2e}")

    with staging(dest) as root:  # beside the output, so the seal's swap is one atomic step
        exported = export_stages(stages, ios, sample, root / "stages", spec.export.opset, spec.export.parity_atol)
        mono_io = StageIO(0, (spec.input.name,), (), "logits", "conf", "pred")
        mono = export_checked(Monolithic(model, spec.gating.confidence), (sample,), root / "monolithic.onnx",
                              mono_io, spec.export.opset, spec.export.parity_atol)
        step("[4/7] onnx: " + ", ".join(f"stage{g.io.index} {g.parity:.1e}" for g in exported)
            + f", monolithic {mono.parity:.1e} (max abs diff vs torch, opset {spec.export.opset})")
        torch.save(model.state_dict(), root / "weights.pt")
        x_cal = norm(data.calibration.x)
        precision = apply_precision(root / "stages", ios, spec, x_cal, x_test, data.test.y, log)
        mono_precision = _monolithic_precision(spec, mono.path, x_cal)
        step(f"[5/7] precision: stages {', '.join(precision.precisions)}, monolithic {mono_precision}; final exit "
            f"drop {precision.report['final_drop_pt']:.2f} pt vs fp32 (tolerance {spec.export.tolerance_pt:g})")

        fused = None if spec.export.fused == "off" else \
            fuse_stages(root, ios, len(spec.input.classes), x_test, thresholds)
        report = evaluate(root, ios, mono.path, mono_io, thresholds, x_test, data.test.y, spec.export.batch.max,
                          [g.flops for g in exported], mono.flops, fused and root / CASCADE)
        if fused is not None:
            fused = fused_verdict(fused, report["latency_ms"], spec.export.fused, spec.export.parity_atol)
            report["fused"] = fused
            step(f"      fused cascade graph ({CASCADE}): {'used' if fused['use_at_batch_1'] else 'not used'} at "
                 f"batch 1: {fused['why']}")
        report.update({"name": spec.name, "thresholds": thresholds, "confidence": spec.gating.confidence,
                       "staged_max_abs_diff": staged_diff, "parity": [g.parity for g in exported],
                       "monolithic_parity": mono.parity, "pred_agreement": [g.pred_agreement for g in exported],
                       "training": trained, "precision": precision.report,
                       "paper_cumulative_ops": exit_flops(model, spec.input.shape),
                       "monolithic_precision": mono_precision,
                       "input_bytes": costs[0].carry_in_bytes, "carried_bytes": [c.carry_in_bytes for c in costs[1:]]})
        step(f"[6/7] evaluated on {report['samples']} test samples (onnxruntime CPU)")
        (root / "report.json").write_text(dumps(report) + "\n")
        if not plot_tradeoff(report, root / "tradeoff.png"):
            log("      no tradeoff.png: matplotlib is not installed (pip install 'edgeexit[plot]')")
        write_bundle(root, _manifest(spec, exported, precision.precisions, mono, mono_precision, thresholds, costs,
                                     root, data.train.x, fused), dest)
    bundle = load_bundle(dest)
    step(f"[7/7] bundle: {dest} ({len(bundle.manifest['files'])} files, checksums verified)")
    if load_device(spec.target.device).kind == "jetson" or spec.target.backend == "tensorrt":
        bundle = _engines(bundle, spec, progress)
    elif spec.budget.latency_ms is not None:
        bundle, report["calibration"] = _calibrate(bundle, spec, progress)
        # the summary shows what the bundle now ships: the calibrated thresholds, evaluated again
        report.update(evaluate(bundle.path, ios, bundle.monolithic_path, mono_io, bundle.thresholds, x_test,
                               data.test.y, spec.export.batch.max, [g.flops for g in exported], mono.flops,
                               bundle.fused_path),
                      thresholds=bundle.thresholds, yaml_thresholds=thresholds)
        bundle = _refresh_report(bundle, report)
    report["verdicts"] = early_exit_verdicts(report, len(spec.input.classes))
    return bundle, report


def _refresh_report(bundle: Bundle, report: dict[str, Any]) -> Bundle:
    """report.json and tradeoff.png again, at the thresholds the bundle now ships (one atomic
    update), so that neither describes the yaml's thresholds after a calibration replaced them."""
    import tempfile

    files = {"report.json": (dumps(report) + "\n").encode()}
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "tradeoff.png"
        if plot_tradeoff(report, png):
            files["tradeoff.png"] = png.read_bytes()
    return update_bundle(bundle, lambda current: Change(files, {}))


def _calibrate(bundle: Bundle, spec: Spec, progress: bool) -> tuple[Bundle, dict[str, Any]]:
    """The target is this host and there is a budget: profile here, calibrate, prove it on the test split."""
    from calibration.solvers import TAILS, Budget
    from edgeexit.calibrate import calibrate
    from edgeexit.runtime.loader import open_backend

    b = spec.budget
    budget = Budget(b.latency_ms / 1e3, b.batch, TAILS[b.tail])
    backend = open_backend(bundle, "onnxruntime", threads=LATENCY_THREADS)
    # the build keeps its calibrated thresholds even on a miss (the summary says MISSED); `edgeexit calibrate`
    # refuses to write them
    bundle, record = calibrate(bundle, backend, budget, threads=LATENCY_THREADS, progress=progress, accept_miss=True)
    log(f"calibrated: thresholds {', '.join(describe_thresholds(record['thresholds']))} for "
        f"{record['budget']['metric']} <= {b.latency_ms:g} ms (calibration.json, pareto.png, profile.json)")
    return bundle, record


def _engines(bundle: Bundle, spec: Spec, progress: bool) -> Bundle:
    """TensorRT engines for the target when TensorRT is here; otherwise say so and keep the bundle."""
    from edgeexit.export.tensorrt import NOT_INSTALLED, build_engines, trt_available

    if not trt_available():
        log(NOT_INSTALLED)
        return bundle
    build_engines(bundle.path, spec.target.device, progress=progress, dla_core=spec.target.dla_core)
    return load_bundle(bundle.path)


def early_exit_verdicts(report: dict[str, Any], n_classes: int) -> list[str]:
    """One line for each way early exit fails to pay in this build, with what to do: the
    cascade no faster than the monolithic graph here, an early exit never taken, or one
    barely better than chance (less than half the final exit's gain over guessing)."""
    out, lat = [], report["latency_ms"]
    chance, final = 1.0 / n_classes, report["exit_accuracy"][-1]
    last = len(report["exit_accuracy"]) - 1
    for k, (acc, share, th) in enumerate(zip(report["exit_accuracy"], report["exit_share"], report["thresholds"])):
        if k == last:
            break
        if acc - chance < 0.5 * (final - chance):
            out.append(f"exit {k} is barely better than chance ({acc:.1%} with {n_classes} classes; the final exit "
                       f"{final:.1%}): raise its threshold so only its surest samples leave, or remove the exit")
        elif share == 0:
            shown = describe_thresholds(report["thresholds"])[k]
            out.append(f"exit {k} is never taken at threshold {shown} on the test split: its head runs for every "
                       f"sample for nothing; lower its threshold or remove the exit")
    heavy = [(k, b) for k, b in enumerate(report.get("carried_bytes", [])) if b > report["input_bytes"]]
    if heavy:
        out.append(f"stages hand on more per sample than the input image ({report['input_bytes'] / 1024:.1f} KiB): "
                   + ", ".join(f"stage {k} {b / 1024:.1f} KiB" for k, b in heavy)
                   + "; a device keeps that between stages, and a later, narrower cut carries less")
    if lat["ratio"] >= 1.0:
        out.append(f"early exit does not pay on this machine: the cascade takes {lat['ratio']:.2f}x the monolithic "
                   f"graph's time (full depth {lat['full_depth_ratio']:.2f}x: every stage is a call of its own); "
                   "deploy the monolithic graph (monolithic.onnx), lower the thresholds so more samples leave early, "
                   "or remove exits that are rarely taken")
    return out


def format_summary(bundle: Bundle, report: dict[str, Any]) -> str:
    """The table `edgeexit build` ends with: what each exit does and what early exit bought."""
    prec = report["precision"]
    mixed = set(prec["stages"]) != {"fp32"}
    calibrated = report.get("calibration") is not None
    lines = [f"{report['name']}: {len(report['exit_accuracy'])} exits, {report['samples']} test samples, "
             f"confidence {report['confidence']}, thresholds "
             + ("calibrated for the latency budget (the yaml's were "
                + ", ".join(describe_thresholds(report["yaml_thresholds"])) + ")" if calibrated else "from the yaml"),
             ""]
    head = (f"{'exit':>4}  {'precision':>9}  {'threshold':>9}  {'cum. MFLOPs':>11}  {'paper MFLOPs':>12}  "
            f"{'accuracy':>8}  {'exit share':>10}")
    lines.append(head + (f"  {'fp32 acc.':>9}  {'agreement':>9}" if mixed else ""))
    shown = describe_thresholds(report["thresholds"])
    for k, (th, fl, ops, acc, share) in enumerate(zip(shown, report["cumulative_flops"],
                                                       report["paper_cumulative_ops"], report["exit_accuracy"],
                                                       report["exit_share"])):
        row = (f"{k:>4}  {prec['stages'][k]:>9}  {th:>9}  {fl / 1e6:>11.3f}  {ops / 1e6:>12.3f}  "
               f"{acc:>8.1%}  {share:>10.1%}")
        if mixed:
            row += f"  {prec['exits'][k]['fp32_accuracy']:>9.1%}  {prec['exits'][k]['agreement']:>9.1%}"
        lines.append(row)
    lat = report["latency_ms"]
    lo, hi = lat["ratio_range"]
    lines += [
        "cum. MFLOPs: torch's counter, 2 per multiply-add; paper MFLOPs: multiply-adds as MSDNet's op_counter counts "
        "them (with ReLU/pooling); both include every earlier exit head",
        "",
        f"cascade:    accuracy {report['cascade_accuracy']:.1%}  {report['cascade_flops'] / 1e6:.3f} MFLOPs/sample "
        f"({report['cascade_flops'] / report['monolithic_flops']:.0%} of monolithic)",
        f"monolithic: accuracy {report['monolithic_accuracy']:.1%}  {report['monolithic_flops'] / 1e6:.3f} MFLOPs/sample"
        f" ({report['monolithic_precision']})",
        f"latency per sample ({lat['backend']}, batch {lat['batch']}, {lat['threads']} thread, median of {lat['rounds']} "
        f"interleaved rounds): cascade {lat['cascade']:.4f} ms, monolithic {lat['monolithic']:.4f} ms -> "
        f"{lat['ratio']:.2f}x (rounds {lo:.2f}-{hi:.2f}x); full depth {lat['full_depth_ratio']:.2f}x",
    ]
    if "fused" in lat:
        fused = report["fused"]
        lines.append(f"fused cascade graph (one call per input): {lat['fused']:.4f} ms, {lat['fused_ratio']:.2f}x "
                     f"monolithic; full depth {lat['fused_full_depth_ratio']:.2f}x; "
                     f"{'used' if fused['use_at_batch_1'] else 'not used'} at batch 1 ({fused['why']})")
    if report.get("carried_bytes"):
        lines.append("carried per sample between stages: "
                     + ", ".join(f"{b / 1024:.1f} KiB" for b in report["carried_bytes"])
                     + f" (input {report['input_bytes'] / 1024:.1f} KiB)")
    if mixed:
        int8 = "int8" in prec["stages"] or report["monolithic_precision"] == "int8"
        lines.append(f"precision: final exit {prec['final_drop_pt']:.2f} pt below fp32 (tolerance {prec['tolerance_pt']:g} pt)"
                     + (f", int8 calibrated with {prec['calibration']['method']} on {prec['calibration']['samples']} "
                        "samples" if int8 else "")
                     + "".join(f"; stage {k} fell back {f['from']} -> {f['to']}" for k, f in prec["fallbacks"].items()))
    lines += [f"note: {v}" for v in report.get("verdicts", [])]
    if calibrated:
        from edgeexit.calibrate import format_calibration

        lines += ["", "calibrated against the latency budget (written into the bundle):",
                  format_calibration(report["calibration"], curve=False)]
    lines.append(f"bundle: {bundle.path}")
    return "\n".join(lines)
