"""The `edgeexit` command: build | train | run | trace | profile | calibrate | inspect | engines | devices.

User errors (bad yaml, missing files, tampered bundles) print one line on stderr and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np

from calibration.latency import SOURCES
from calibration.solvers import SOLVERS, TAILS, Budget
from edgeexit.errors import EdgeExitError
from edgeexit.spec import BACKENDS, PRECISIONS


def _cmd_build(args) -> int:
    from edgeexit.build import build, format_summary
    from edgeexit.spec import load_spec

    bundle, report = build(load_spec(args.spec), Path(args.out) if args.out else None, progress=not args.quiet)
    print(json.dumps(report, indent=2) if args.json else format_summary(bundle, report))
    return 0


def _cmd_train(args) -> int:
    import torch

    from edgeexit.build import check_device, fit_or_load, log, new_model
    from edgeexit.data import load_dataset
    from edgeexit.spec import load_spec

    spec = load_spec(args.spec, require_weights=False)
    out = Path(args.out) if args.out else (spec.weights or spec.output.parent / f"{spec.name}.pt")
    data = load_dataset(spec)
    model = new_model(spec)
    trained = fit_or_load(model, dataclasses.replace(spec, weights=None), data, check_device(spec, model),
                          progress=not args.quiet)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    torch.save(model.state_dict(), partial)
    os.replace(partial, out)
    log(f"weights: {out}")
    print("val accuracy per exit: " + ", ".join(f"{a:.1%}" for a in trained["val_accuracy"]))
    return 0


def _load_images(path: str, bundle) -> np.ndarray:
    from edgeexit.data import normalize, resize_like

    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty file
        raise EdgeExitError(f"--input: cannot read {path}: {exc or 'the file is empty'}") from None
    if not isinstance(x, np.ndarray):
        raise EdgeExitError(f"--input: {path} is an .npz archive; give one .npy array [N, C, H, W]")
    if not np.issubdtype(x.dtype, np.number):
        raise EdgeExitError(f"--input: {path} holds {x.dtype}, not numbers")
    shape = tuple(bundle.input["shape"][1:])
    if x.ndim == len(shape) and x.shape[0] == shape[0]:  # one image
        x = x[None]
    x = resize_like(x, shape, bool((bundle.manifest.get("data") or {}).get("resize", False)))
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise EdgeExitError(f"--input: {path} has shape {list(x.shape)}; the bundle takes [N, {', '.join(map(str, shape))}]")
    return normalize(x, bundle.input["mean"], bundle.input["std"])


def _gating(args, bundle):
    """(thresholds, exit policy) a command gates on: --thresholds when given (no policy), else
    the bundle's thresholds and its exit policy, if it has one."""
    from edgeexit.runtime.loader import bundle_policy

    given = _parse_thresholds(args.thresholds)
    return (given, None) if given else (bundle.thresholds, bundle_policy(bundle))


def _parse_thresholds(text: str | None):
    if text is None:
        return None
    try:
        return [None if t.strip().lower() in ("null", "none", "") else float(t) for t in text.split(",")]
    except ValueError:
        raise EdgeExitError(f"--thresholds: {text!r} is not a comma-separated list of numbers (last may be null)") from None


def _cmd_run(args) -> int:
    from edgeexit.bundle import load_bundle
    from edgeexit.runtime.cascade import Cascade
    from edgeexit.runtime.loader import open_backend

    bundle = load_bundle(args.bundle)
    x = _load_images(args.input, bundle)
    thresholds, policy = _gating(args, bundle)
    with open_backend(bundle, args.backend, args.device) as backend:
        cascade = Cascade(backend, bundle.stage_ios, thresholds, policy)
        result = cascade.run_batched(x, bundle.manifest["export"]["batch"]["max"])
    classes, probs = bundle.classes, result.probs
    rows = [{"index": i, "class": int(result.pred[i]), "label": classes[result.pred[i]], "exit": int(result.exit[i]),
             "confidence": float(result.conf[i]), "probabilities": [float(p) for p in probs[i]]}
            for i in range(len(x))]
    if args.json:
        print(json.dumps({"bundle": str(bundle.path), "backend": cascade.backend.name, "thresholds": thresholds,
                          "policy": None if policy is None else policy.to_dict(), "samples": rows}, indent=2))
        return 0
    print(f"{'index':>5}  {'class':>8}  {'exit':>4}  {'confidence':>10}")
    for r in rows:
        print(f"{r['index']:>5}  {r['label']:>8}  {r['exit']:>4}  {r['confidence']:>10.4f}")
    shares = result.exit_shares()
    print("exit shares: " + ", ".join(f"exit {k} {s:.0%}" for k, s in enumerate(shares))
          + ("; gated by the bundle's exit policy (gating.policy)" if policy is not None else ""))
    return 0


def _batch_list(text: str) -> list[int]:
    try:
        sizes = sorted({int(b) for b in text.split(",")})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1:
        raise EdgeExitError(f"--batch: {text!r} is not a comma-separated list of batch sizes >= 1")
    return sizes


def _cmd_trace(args) -> int:
    from calibration.traces import save_traces
    from edgeexit.bundle import load_bundle
    from edgeexit.runtime.loader import open_backend
    from edgeexit.tracing import record_traces, split_inputs

    bundle = load_bundle(args.bundle)
    x, y = split_inputs(bundle, args.split, args.data)
    with open_backend(bundle, args.backend, args.device) as backend:
        traces = record_traces(bundle, backend, x, y, args.split)
    out = save_traces(args.out or f"{bundle.name}.{args.split}.traces.npz", traces)
    acc = traces.correct.mean(axis=0)
    print(f"traces: {out} ({len(traces)} samples x {traces.exits} exits; exit accuracy "
          + ", ".join(f"{a:.1%}" for a in acc) + ")")
    return 0


def _cmd_profile(args) -> int:
    from edgeexit.bundle import load_bundle, update_bundle
    from edgeexit.jetson import TegrastatsSampler, jetson_facts
    from edgeexit.profile import PROFILE, format_profile, profile_bundle, profile_key, with_profiles
    from edgeexit.runtime.loader import open_backend, open_monolithic, opened
    from edgeexit.tracing import split_inputs

    bundle = load_bundle(args.bundle)
    batches = _batch_list(args.batch)
    x, _ = split_inputs(bundle, args.split, args.data)
    thresholds, policy = _gating(args, bundle)
    power = TegrastatsSampler if jetson_facts() is not None and not args.no_power else None
    with open_backend(bundle, args.backend, args.device, args.threads) as backend, \
            opened(open_monolithic(bundle, backend.name, args.device, args.threads)) as mono:
        entry = profile_bundle(backend, bundle.stage_ios, mono, bundle.monolithic_io, x, batches, thresholds,
                               iters=args.iters, warmup=args.warmup, threads=args.threads, power=power, policy=policy,
                               progress=None if args.quiet else lambda m: print(m, file=sys.stderr, flush=True))
    key = profile_key(entry["backend"], entry["device"])
    update_bundle(bundle, with_profiles(bundle.path, {key: entry}), {"profile": PROFILE})
    print(json.dumps(entry, indent=2) if args.json else format_profile(entry) + f"\nsaved: {bundle.path / PROFILE} [{key}]")
    return 0


def _cmd_calibrate(args) -> int:
    from edgeexit.bundle import load_bundle
    from edgeexit.calibrate import calibrate, format_calibration
    from edgeexit.runtime.loader import open_backend

    bundle = load_bundle(args.bundle)
    budget = Budget(args.budget_ms / 1e3, args.batch, TAILS[args.tail], args.confidence)
    with open_backend(bundle, args.backend, args.device, args.threads) as backend:
        bundle, record = calibrate(bundle, backend, budget, args.solver, args.latency, args.val_traces,
                                   args.test_traces, {"val": args.data_val, "test": args.data_test}, args.threads,
                                   args.iters, measure=not args.no_measure, progress=not args.quiet)
    print(json.dumps(record, indent=2) if args.json else format_calibration(record) + f"\nbundle: {bundle.path}")
    return 0


def _cmd_inspect(args) -> int:
    from edgeexit.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    if args.json:
        print(json.dumps({"path": str(bundle.path), "verified": True, "manifest": m}, indent=2))
        return 0
    inp = m["input"]
    print(f"{m['name']}  (format {m['format']}, built {m.get('created', '?')}, checksums verified: {len(m['files'])} files)")
    print(f"input:   {inp['name']} {inp['shape']} {inp['dtype']}  mean {inp['mean']} std {inp['std']}")
    print(f"classes: {len(m['classes'])} ({', '.join(m['classes'][:10])}{', ...' if len(m['classes']) > 10 else ''})")
    print(f"gating:  {m['gating']['confidence']}, thresholds {m['gating']['thresholds']}")
    print(f"{'stage':>5}  {'file':<20} {'precision':>9}  {'MFLOPs':>8}  {'params':>8}  inputs -> carry")
    for s in m["stages"]:
        print(f"{s['index']:>5}  {s['onnx']:<20} {s['precision']:>9}  {s['flops'] / 1e6:>8.3f}  {s['params']:>8}  "
              f"{', '.join(s['inputs'])} -> {', '.join(s['outputs']['carry']) or '(none)'}")
    mono = m.get("monolithic_cost", {})
    print(f"monolithic: {m['monolithic']}" + (f"  {mono['flops'] / 1e6:.3f} MFLOPs" if mono else ""))
    for key, entry in m.get("engines", {}).items():
        print(f"engines: {key} ({len(entry['stages'])} plans, TensorRT {entry.get('tensorrt', '?')}, "
              f"precision {entry.get('precision')}, DLA {entry.get('dla_core')})")
    if not m.get("engines"):
        print("engines: none (build them on the device with `edgeexit engines BUNDLE`)")
    tc = m.get("toolchain", {})
    print("toolchain: " + ", ".join(f"{k} {v}" for k, v in tc.items()))
    return 0


def _cmd_engines(args) -> int:
    from edgeexit.bundle import load_bundle
    from edgeexit.export.tensorrt import build_engines

    bundle = load_bundle(args.bundle)
    device = args.device or bundle.manifest["target"]["device"]
    dla = args.dla if args.dla is not None else bundle.manifest["target"].get("dla_core")
    out = build_engines(bundle.path, device, precision=args.precision, progress=not args.quiet, dla_core=dla,
                        optimization_level=args.opt_level)
    print(f"engines: {out}")
    return 0


def _cmd_devices(args) -> int:
    from edgeexit.devices import format_table, list_devices, profile_to_dict

    profiles = list_devices()
    print(json.dumps([profile_to_dict(p) for p in profiles], indent=2) if args.json else format_table(profiles))
    return 0


TORCH_DEVICE_HELP = ("torch device: --backend torch on cpu (default), cuda, cuda:1; torch-cuda on cuda (default), "
                     "cuda:1, or cpu (its static buffers without CUDA graphs: a dry run of the GPU path)")


def _backend_args(p: argparse.ArgumentParser) -> None:
    """--backend, --device and --threads, shared by the commands that time a bundle."""
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", help=TORCH_DEVICE_HELP)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")


def parser() -> argparse.ArgumentParser:
    """The argument parser (kept separate so the README's command reference can be checked)."""
    p = argparse.ArgumentParser(prog="edgeexit", description="Deploy early-exit CNNs: staged export and a gated runtime.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="train/load, split, export, evaluate and bundle a model.yaml")
    b.add_argument("spec", help="model.yaml")
    b.add_argument("--out", help="bundle directory (default: the yaml's `output`)")
    b.add_argument("--json", action="store_true", help="print the build report as JSON instead of the table")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(fn=_cmd_build)

    t = sub.add_parser("train", help="train the model.yaml's model and save its weights (a plain state_dict)")
    t.add_argument("spec", help="model.yaml")
    t.add_argument("--out", help="weights file (default: the yaml's `weights`, else next to the output)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(fn=_cmd_train)

    r = sub.add_parser("run", help="classify images with a bundle's cascade")
    r.add_argument("bundle")
    r.add_argument("--input", required=True, help=".npy of raw images, [N, C, H, W] or one [C, H, W]")
    r.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto: TensorRT engines where TensorRT is installed and built, else onnxruntime")
    r.add_argument("--device", help=TORCH_DEVICE_HELP)
    r.add_argument("--thresholds", help="gate on these thresholds instead of the bundle's exit policy or "
                                        "thresholds, e.g. 0.9,0.8,null")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=_cmd_run)

    i = sub.add_parser("inspect", help="verify a bundle and show what it holds")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=_cmd_inspect)

    e = sub.add_parser("engines", help="build TensorRT engines for a bundle's stages (run on the target device)")
    e.add_argument("bundle")
    e.add_argument("--device", help="device profile (default: the bundle's target.device)")
    e.add_argument("--precision", choices=PRECISIONS, help="override every stage's precision")
    e.add_argument("--dla", type=int, help="DLA core to build for (GPU fallback on)")
    e.add_argument("--opt-level", type=int, help="TensorRT builder optimization level (8.6+)")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(fn=_cmd_engines)

    tr = sub.add_parser("trace", help="record every exit's confidence and prediction on a data split (.npz)")
    tr.add_argument("bundle")
    tr.add_argument("--split", default="val", help="split of the bundle's data: train, val, calibration or test")
    tr.add_argument("--data", help=".npz with x and y to trace instead of the bundle's data")
    tr.add_argument("--backend", default="auto", choices=BACKENDS)
    tr.add_argument("--device", help=TORCH_DEVICE_HELP)
    tr.add_argument("--out", help="output .npz (default: <bundle name>.<split>.traces.npz)")
    tr.set_defaults(fn=_cmd_trace)

    pr = sub.add_parser("profile", help="per-stage and end-to-end latency on this machine (and power on a Jetson)")
    pr.add_argument("bundle")
    _backend_args(pr)
    pr.add_argument("--batch", default="1,8,32", help="batch sizes, comma-separated (default 1,8,32)")
    pr.add_argument("--iters", type=int, default=200, help="timed calls per runner and batch size")
    pr.add_argument("--warmup", type=int, default=20, help="untimed calls first")
    pr.add_argument("--thresholds", help="thresholds for the gated cascade (default: the bundle's)")
    pr.add_argument("--split", default="test", help="real samples to run (a split of the bundle's data)")
    pr.add_argument("--data", help=".npz with x (and y) to run instead of the bundle's data")
    pr.add_argument("--no-power", action="store_true", help="on a Jetson, skip tegrastats power sampling")
    pr.add_argument("--json", action="store_true")
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(fn=_cmd_profile)

    c = sub.add_parser("calibrate", help="thresholds that maximise accuracy under a latency budget")
    c.add_argument("bundle")
    c.add_argument("--budget-ms", type=float, required=True, help="latency budget of one cascade call, ms")
    c.add_argument("--tail", default="mean", choices=tuple(TAILS),
                   help="what must stay under the budget: the mean call latency (default) or a percentile")
    c.add_argument("--batch", type=int, default=1, help="samples per cascade call (default 1)")
    c.add_argument("--solver", default=SOLVERS[0], choices=SOLVERS)
    c.add_argument("--confidence", type=float, default=Budget.confidence,
                   help=f"mean budget: one-sided confidence that it holds on unseen samples (default {Budget.confidence})")
    c.add_argument("--latency", default="auto", choices=SOURCES,
                   help="profile: the bundle's profile.json; estimate: the target's peak figures; "
                        "auto: profile.json, else profile now on a matching machine, else estimate")
    _backend_args(c)
    c.add_argument("--iters", type=int, default=200, help="timed calls per batch size when profiling now")
    c.add_argument("--val-traces", help="validation traces (.npz from `edgeexit trace`) instead of tracing now")
    c.add_argument("--test-traces", help="test traces instead of tracing now")
    c.add_argument("--data-val", help=".npz (x, y) to fit on instead of the bundle's val split")
    c.add_argument("--data-test", help=".npz (x, y) to report on instead of the bundle's test split")
    c.add_argument("--no-measure", action="store_true", help="skip re-running the cascade to check the budget")
    c.add_argument("--json", action="store_true")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(fn=_cmd_calibrate)

    d = sub.add_parser("devices", help="list the target device profiles")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=_cmd_devices)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except EdgeExitError as exc:
        print(f"edgeexit: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout piped into a reader that stopped early (`| head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
