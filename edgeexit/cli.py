"""The `edgeexit` command: build | train | run | trace | profile | calibrate | inspect | sign | keygen | engines | pack | unpack | doctor | devices.

User errors (bad yaml, missing files, tampered bundles) print one line on stderr and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import tokenize
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from calibration.latency import SOURCES
from calibration.risk import RISKS
from calibration.solvers import SOLVERS, TAILS, Budget
from edgeexit.archive import MAX_ARCHIVE_BYTES
from edgeexit.errors import EdgeExitError
from edgeexit.jsonio import dumps
from edgeexit.spec import BACKENDS, PRECISIONS

MISSED = 3  # exit status of `calibrate` when the re-measured cascade misses its budget


def _cmd_build(args) -> int:
    from edgeexit.build import build, format_summary
    from edgeexit.spec import load_spec

    spec = load_spec(args.spec)
    _torch_threads(args.threads)
    bundle, report = build(spec, Path(args.out) if args.out else None, progress=not args.quiet)
    print(dumps(report) if args.json else format_summary(bundle, report))
    return 0


def _cmd_train(args) -> int:
    import torch

    from edgeexit.build import check_contract, check_device, fit_or_load, log, new_model
    from edgeexit.data import load_dataset
    from edgeexit.spec import load_spec

    spec = load_spec(args.spec, require_weights=False)
    _torch_threads(args.threads)
    out = Path(args.out) if args.out else (spec.weights or spec.output.parent / f"{spec.name}.pt")
    _check_file_out(out, "--out" if args.out else "weights")  # before training, not after
    data = load_dataset(spec)
    model = new_model(spec)
    check_contract(model, spec)
    trained = fit_or_load(model, dataclasses.replace(spec, weights=None), data, check_device(spec, model),
                          progress=not args.quiet)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        torch.save(model.state_dict(), partial)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    log(f"weights: {out}")
    print("val accuracy per exit: " + ", ".join(f"{a:.1%}" for a in trained["val_accuracy"]))
    if spec.weights is None or out.resolve() != spec.weights.resolve():
        print(f"build trains again unless the yaml names these weights: weights: {os.path.relpath(out, spec.base_dir)}")
    return 0


def _torch_threads(threads: int | None) -> None:
    """Cap torch's intra-op threads for training and export (--threads): on a shared or loaded
    CPU, torch's default of one thread per core spins and can be many times slower."""
    if threads is not None:
        import torch

        _warn_threads(threads, "training")
        torch.set_num_threads(threads)


def _cpus() -> int:
    """CPUs this process may run on (its affinity where the OS has one, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _warn_threads(threads: int, what: str) -> None:
    """--threads above the CPU count is allowed (the user may know better) but said out loud:
    threads that outnumber cores spin and wait for each other."""
    cpus = _cpus()
    if threads > cpus:
        print(f"--threads: warning: {threads} threads but this machine has {cpus} CPU{'s' if cpus != 1 else ''}; "
              f"more threads than CPUs slows {what} down", file=sys.stderr)


def _check_file_out(out: Path, what: str) -> None:
    """Refuse a file output that is a folder or lies under a file, before any work."""
    from edgeexit.atomic import refuse_under_file

    if out.is_dir():
        raise EdgeExitError(f"{what}: {out} is a folder; give the file to write, e.g. {out / 'weights.pt'}")
    refuse_under_file(out, what)


BUILD_MODULES = ("torch", "onnxsim")  # the `build` extra: training and export, never the runtime
CHUNK_BYTES = 16 << 20  # raw images normalised and run per chunk: peak memory stays near a few of these


class _Loaded:
    """Images already in memory (decoded image files): nothing to hand back."""

    def release(self, start: int, stop: int) -> None:
        pass


def _open_images(path: str, bundle):
    """The raw images `--input` names as [N, C, H, W], the file each came from (None for an
    .npy) and the mapping to release pages already run. An .npy is memory-mapped (never read
    whole); image files and folders are decoded as the build decoded its data."""
    from edgeexit.inputs import decode_images, describe_input, image_files
    from edgeexit.npy import MappedNpy

    src = Path(path)
    kind = describe_input(src)
    shape = tuple(bundle.input["shape"][1:])
    if kind != "npy":
        files = image_files(src) if kind == "folder" else [src]
        if not files:
            raise EdgeExitError(f"--input: no image files under {path}")
        from edgeexit.data import max_input_bytes

        if len(files) * int(np.prod(shape)) * 4 > max_input_bytes():
            raise EdgeExitError(f"--input: {len(files)} images are above the {max_input_bytes()}-byte input limit "
                                "(EDGEEXIT_MAX_INPUT_BYTES); run them in parts or as one .npy")
        decoded = decode_images(files, shape[0], shape[1:], _resize_of(bundle), "--input")
        for note in decoded.notes():
            print(f"--input: {note}", file=sys.stderr)
        return decoded.x, [f.relative_to(src).as_posix() if kind == "folder" else f.name for f in files], _Loaded()
    try:
        mapped = MappedNpy(src)
    except (OSError, ValueError, EOFError, SyntaxError, tokenize.TokenError) as exc:  # empty, truncated, bad header
        raise EdgeExitError(f"--input: cannot read {path}: {str(exc) or 'the file is empty'}") from None
    x = mapped.array
    if x.dtype.kind not in "iuf":  # not bool, complex, timedelta, datetime, strings or records
        raise EdgeExitError(f"--input: {path} holds {x.dtype}, not real numbers")
    if x.ndim == len(shape) and x.shape[0] == shape[0]:  # one image
        x = x[None]
    resize = _resize_of(bundle) is not None
    fits = x.ndim == len(shape) + 1 and x.shape[1] == shape[0] and (resize or tuple(x.shape[2:]) == shape[1:])
    if not fits:
        raise EdgeExitError(f"--input: {path} has shape {list(x.shape)}; the bundle takes [N, {', '.join(map(str, shape))}]")
    if len(x) == 0:
        raise EdgeExitError(f"--input: {path} holds no images (shape {list(x.shape)})")
    return x, None, mapped


def _resize_of(bundle) -> str | None:
    """How the bundle's build resized images of another size: its `input.resize`, or (bundles
    that predate it) bilinear where `data.resize` was on."""
    inp = bundle.input
    if "resize" in inp:
        return inp["resize"]
    return "bilinear" if (bundle.manifest.get("data") or {}).get("resize") else None


def _chunks(x: np.ndarray, batch: int):
    """(start, rows) over `x`, whole batches of about CHUNK_BYTES each."""
    per_sample = max(1, x[0].size * 4)
    rows = max(1, CHUNK_BYTES // per_sample)
    rows = max(batch, rows - rows % batch) if rows >= batch else rows
    for start in range(0, len(x), rows):
        yield start, x[start:start + rows]


def _check_inputs(x: np.ndarray, mapped, args, bundle, batch: int) -> None:
    """One pass over the inputs before any result: NaN/Inf refused (unless --allow-nonfinite),
    and a warning (refusal with --strict) when they look like other units than the training
    data's, which the manifest records."""
    from edgeexit.data import describe_samples, nonfinite_samples
    from edgeexit.inputs import UnitCheck

    record = bundle.input.get("range")
    units = UnitCheck(record) if record else None
    bad = []
    for start, chunk in _chunks(x, batch):
        with np.errstate(over="ignore"):  # what the runtime sees: float32 (1e300 in float64 becomes inf)
            chunk = np.asarray(chunk, dtype=np.float32)
        if not args.allow_nonfinite:
            bad.append(nonfinite_samples(chunk) + start)
        if units is not None:
            units.add(chunk)
        mapped.release(start, start + len(chunk))
    bad = np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)
    if len(bad):
        raise EdgeExitError(f"--input: {args.input}: {describe_samples(bad, len(x))} contain NaN or Inf; refused "
                            "(--allow-nonfinite runs them anyway)")
    verdict = units.verdict() if units is not None else None
    if verdict and args.strict:
        raise EdgeExitError(f"--input: {verdict}; refused (--strict)")
    if verdict:
        print(f"--input: warning: {verdict}", file=sys.stderr)


def _gating(args, bundle):
    """(thresholds, exit policy) a command gates on: --thresholds when given (no policy), an
    operating point's (--point NAME, or --budget-ms: the most accurate that fits; no policy),
    else the bundle's thresholds and its exit policy, if it has one."""
    from edgeexit.runtime.loader import bundle_policy

    given = _parse_thresholds(args.thresholds)
    if given:
        return given, None
    if getattr(args, "point", None) is not None or getattr(args, "budget_ms", None) is not None:
        name, point = bundle.operating_point(args.point, args.budget_ms)
        print(f"operating point {name}: budget {point['budget_ms']:g} ms, thresholds {point['thresholds']}",
              file=sys.stderr)
        return point["thresholds"], None
    return bundle.thresholds, bundle_policy(bundle)


def _parse_thresholds(text: str | None):
    if text is None:
        return None
    try:
        values = [None if t.strip().lower() in ("null", "none", "") else float(t) for t in text.split(",")]
    except ValueError:
        values = [float("nan")]
    if any(v is not None and not (np.isfinite(v) and v >= 0) for v in values):
        raise EdgeExitError(f"--thresholds: {text!r} is not a comma-separated list of finite numbers >= 0 "
                            "(last may be null)")
    return values


UPDATES = ("profile", "calibrate", "engines", "sign")  # commands that write into the bundle


def _open_bundle(args, trusted: bool = True):
    """The verified bundle a command names; with --trust (or EDGEEXIT_TRUST, a device's trust
    store) only one signed by a trusted key (`trusted=False`: `sign`, which is how a bundle
    gets signed). A command that updates the bundle is refused before any work where it
    could not write the result."""
    from edgeexit.atomic import check_writable_beside
    from edgeexit.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    if args.command in UPDATES:
        check_writable_beside(bundle.path.resolve())
    if not trusted:
        return bundle
    trust = getattr(args, "trust", None)
    if trust is None:
        trust = os.environ.get("EDGEEXIT_TRUST")
        if trust is not None and not trust.strip():
            raise EdgeExitError("EDGEEXIT_TRUST is set but empty: set it to a public key or a trust folder, or unset it")
    elif not trust.strip():
        raise EdgeExitError("--trust: empty; give a public key file or a trust folder")
    if trust:
        from edgeexit.signing import verify_signature

        args.signed_by = verify_signature(bundle, Path(trust))
    return bundle


def _cmd_run(args) -> int:
    from edgeexit.data import normalize, resize_like
    from edgeexit.jsonio import finite_or_none
    from edgeexit.profile import stage_predictor
    from edgeexit.runtime.loader import max_batch, open_backend, open_cascade

    bundle = _open_bundle(args)
    x, names, mapped = _open_images(args.input, bundle)
    deadline = None if args.deadline_ms is None else args.deadline_ms / 1e3
    # a deadline is per input, and one input is one call (the fused cascade graph's, where the bundle uses one)
    batch = 1 if deadline is not None or len(x) == 1 else max_batch(bundle)
    thresholds, policy = _gating(args, bundle)
    shape, resize = tuple(bundle.input["shape"][1:]), _resize_of(bundle) is not None
    classes = bundle.classes
    counts = np.zeros(len(bundle.stage_ios), dtype=np.int64)
    cut = 0
    with open_backend(bundle, args.backend, args.device, trust_code=args.trust_code) as backend, ExitStack() as held:
        predict = None if deadline is None else stage_predictor(bundle.path, backend, None)
        if predict is not None and predict(0, 1) > deadline:  # nothing left before stage 0: its whole call
            print(f"warning: --deadline-ms {args.deadline_ms:g}: a call answered by exit 0 alone takes up to "
                  f"{predict(0, 1) * 1e3:.4g} ms on this machine (its profile's tail), and stage 0 always runs: some "
                  "answers will be late", file=sys.stderr)
        cascade, note = open_cascade(bundle, backend, thresholds, policy, deadline, predict, batch)
        if hasattr(cascade, "close"):  # a fused TensorRT plan holds device memory of its own
            held.callback(cascade.close)
        if note:
            print(note, file=sys.stderr)
        _check_inputs(x, mapped, args, bundle, batch)  # after every refusal of the bundle, before any result
        for start, raw in _chunks(x, batch):
            with np.errstate(over="ignore"):  # refused before, unless --allow-nonfinite
                chunk = normalize(resize_like(np.asarray(raw, dtype=np.float32), shape, resize),
                                  bundle.input["mean"], bundle.input["std"])
            result = cascade.run_batched(chunk, batch)
            if result.probs.shape[1] != len(classes):  # before any row is printed
                raise EdgeExitError(f"bundle: the model gives {result.probs.shape[1]} classes but the manifest names "
                                    f"{len(classes)}")
            if start == 0 and args.json:
                head = dumps({"bundle": str(bundle.path), "backend": cascade.name, "thresholds": thresholds,
                              "policy": None if policy is None else policy.to_dict()})
                print(head[:-2] + ',\n  "samples": [')
            elif start == 0:
                print(f"backend: {cascade.name}", file=sys.stderr)
                print(f"{'index':>5}  {'class':>8}  {'exit':>4}  {'confidence':>10}" + ("  file" if names else ""))
            mapped.release(start, start + len(chunk))
            counts += np.bincount(result.exit, minlength=len(counts))
            cut += 0 if result.cut_off is None else int(result.cut_off.sum())
            for i in range(len(chunk)):
                # NaN/Inf outputs (--allow-nonfinite) have no class: argmax of NaNs is an artefact
                k, pred = start + i, int(result.pred[i]) if np.isfinite(result.conf[i]) else None
                late = result.cut_off is not None and bool(result.cut_off[i])
                if args.json:
                    row = {"index": k, **({"file": names[k]} if names else {}), "class": pred,
                           "label": None if pred is None else classes[pred],
                           "exit": int(result.exit[i]), "confidence": finite_or_none(result.conf[i]),
                           **({"cut_off": late} if deadline is not None else {}),
                           "probabilities": [finite_or_none(p) for p in result.probs[i]]}
                    print(("    " if k == 0 else ",\n    ") + dumps(row, indent=None), end="")
                else:
                    label = "-" if pred is None else classes[pred]
                    print(f"{k:>5}  {label:>8}  {int(result.exit[i]):>4}  {float(result.conf[i]):>10.4f}"
                          + ("  cut off" if late else "") + (f"  {names[k]}" if names else ""))
    if args.json:
        print("\n  ]\n}")
        return 0
    shares = counts / counts.sum()
    print("exit shares: " + ", ".join(f"exit {k} {s:.0%}" for k, s in enumerate(shares))
          + ("; gated by the bundle's exit policy (gating.policy)" if policy is not None else ""))
    if deadline is not None:
        print(f"deadline {args.deadline_ms:g} ms per input: {cut} of {int(counts.sum())} cut off (answered from the "
              "last exit that could finish in time)")
    return 0


def _batch_list(text: str, largest: int) -> list[int]:
    try:
        sizes = sorted({int(b) for b in text.split(",")})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1:
        raise EdgeExitError(f"--batch: {text!r} is not a comma-separated list of batch sizes >= 1")
    if sizes[-1] > largest:
        raise EdgeExitError(f"--batch: {sizes[-1]} is above the bundle's export.batch.max ({largest})")
    return sizes


def _cmd_trace(args) -> int:
    from calibration.traces import save_traces
    from edgeexit.runtime.loader import open_backend
    from edgeexit.tracing import record_traces, split_inputs

    bundle = _open_bundle(args)
    x, y = split_inputs(bundle, args.split, args.data)
    with open_backend(bundle, args.backend, args.device, trust_code=args.trust_code) as backend:
        traces = record_traces(bundle, backend, x, y, args.split)
    out = save_traces(args.out or f"{bundle.name}.{args.split}.traces.npz", traces)
    acc = traces.correct.mean(axis=0)
    print(f"traces: {out} ({len(traces)} samples x {traces.exits} exits; exit accuracy "
          + ", ".join(f"{a:.1%}" for a in acc) + ")")
    return 0


def _cmd_profile(args) -> int:
    from edgeexit.bundle import Change, update_bundle
    from edgeexit.jetson import TegrastatsSampler, jetson_facts
    from calibration.anytime import anytime_curve, deadline_grid
    from calibration.latency import Deadlines
    from edgeexit.calibrate import ANYTIME_PNG, png_bytes
    from edgeexit.plots import plot_anytime
    from edgeexit.profile import PROFILE, format_profile, profile_bundle, profile_key, with_profiles
    from edgeexit.runtime.loader import max_batch, open_backend, open_monolithic, opened
    from edgeexit.tracing import record_traces, split_inputs

    bundle = _open_bundle(args)
    batches = _batch_list(args.batch, max_batch(bundle))
    x, y = split_inputs(bundle, args.split, args.data)
    thresholds, policy = _gating(args, bundle)
    power = TegrastatsSampler if jetson_facts() is not None and not args.no_power else None
    with open_backend(bundle, args.backend, args.device, args.threads, args.trust_code) as backend, \
            opened(open_monolithic(bundle, backend.name, args.device, args.threads, args.trust_code)) as mono:
        entry = profile_bundle(backend, bundle.stage_ios, mono, bundle.monolithic_io, x, batches, thresholds,
                               iters=args.iters, warmup=args.warmup, threads=args.threads, power=power, policy=policy,
                               progress=None if args.quiet else lambda m: print(m, file=sys.stderr, flush=True))
        key = profile_key(entry["backend"], entry["device"])
        if 1 in batches:  # anytime prediction is one input per call: its curve needs batch 1
            tails = Deadlines(entry, key).exit_seconds()
            traces = record_traces(bundle, backend, x, y, args.split)
            entry["anytime"] = anytime_curve(traces, tails, thresholds, deadline_grid(tails))
    plot = entry.get("anytime") and png_bytes(functools.partial(plot_anytime, entry["anytime"], len(y), bundle.name))
    if not args.no_save:  # merged into the profiles as they are when the lock is held, not as they were at the start
        update_bundle(bundle, lambda current: Change(with_profiles(current.path, {key: entry})
                                                     | ({ANYTIME_PNG: plot} if plot else {}), {"profile": PROFILE}))
    saved = "not saved (--no-save)" if args.no_save else f"saved: {bundle.path / PROFILE} [{key}]"
    if plot and not args.no_save:
        saved += f", {bundle.path / ANYTIME_PNG}"
    print(dumps(entry) if args.json else format_profile(entry, args.split) + f"\n{saved}")
    return 0


def _cmd_calibrate(args) -> int:
    from edgeexit.calibrate import Risk, calibrate, format_calibration
    from edgeexit.runtime.loader import max_batch, open_backend

    bundle = _open_bundle(args)
    if args.batch > max_batch(bundle):
        raise EdgeExitError(f"--batch: {args.batch} is above the bundle's export.batch.max ({max_batch(bundle)})")
    if not 0 < args.confidence < 1:
        raise EdgeExitError(f"--confidence: {args.confidence:g} must be between 0 and 1")
    budget = Budget(args.budget_ms / 1e3, args.batch, TAILS[args.tail], args.confidence)
    with open_backend(bundle, args.backend, args.device, args.threads, args.trust_code) as backend:
        bundle, record = calibrate(bundle, backend, budget, args.solver, args.latency, args.val_traces,
                                   args.test_traces, {"val": args.data_val, "test": args.data_test}, args.threads,
                                   args.iters, measure=not args.no_measure, progress=not args.quiet,
                                   latency_key=args.profile_key, accept_miss=args.accept_miss,
                                   risk=None if args.risk is None else Risk(args.risk, args.epsilon, args.delta),
                                   point=args.point)
    print(dumps(record) if args.json else format_calibration(record) + f"\nbundle: {bundle.path}")
    return MISSED if record["deployed"] is None else 0


def _text(value) -> str:
    """A manifest value as a person reads it: null for None, lists without quotes."""
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _signature_line(args, bundle) -> str:
    from edgeexit.signing import signature_record

    if getattr(args, "signed_by", None):
        return f"signature: ed25519 key {args.signed_by}, verified against the trusted keys"
    record = signature_record(bundle)
    if record is None:
        return "signature: none (edgeexit sign BUNDLE --key KEY)"
    return f"signature: ed25519 key {record['key']}, not checked (give --trust PUBKEY)"


def _cmd_inspect(args) -> int:
    bundle = _open_bundle(args)
    m = bundle.manifest
    if args.json:
        print(dumps({"path": str(bundle.path), "verified": True, "signed_by": getattr(args, "signed_by", None),
                     "manifest": m}))
        return 0
    inp = m["input"]
    print(f"{m['name']}  (format {m['format']}, built {m.get('created', '?')}, manifest seal and checksums "
          f"verified: {len(bundle.present)} files)")
    print(_signature_line(args, bundle))
    print(f"input:   {inp['name']} {_text(inp['shape'])} {inp['dtype']}  mean {_text(inp['mean'])} std {_text(inp['std'])}")
    print(f"classes: {len(m['classes'])} ({', '.join(m['classes'][:10])}{', ...' if len(m['classes']) > 10 else ''})")
    print(f"gating:  {m['gating']['confidence']}, thresholds {_text(m['gating']['thresholds'])}")
    print(f"{'stage':>5}  {'file':<20} {'precision':>9}  {'MFLOPs':>8}  {'params':>8}  inputs -> carry")
    for s in m["stages"]:
        flops = s.get("flops")
        print(f"{s['index']:>5}  {s['onnx']:<20} {_text(s.get('precision')):>9}  "
              f"{(f'{flops / 1e6:.3f}' if isinstance(flops, (int, float)) else '?'):>8}  {_text(s.get('params')):>8}  "
              f"{', '.join(s['inputs'])} -> {', '.join(s['outputs']['carry']) or '(none)'}")
    mono = m.get("monolithic_cost") if isinstance(m.get("monolithic_cost"), dict) else {}
    flops = mono.get("flops")
    print(f"monolithic: {m['monolithic']}" + (f"  {flops / 1e6:.3f} MFLOPs" if isinstance(flops, (int, float)) else ""))
    fused = m.get("fused")
    if isinstance(fused, dict):
        print(f"fused:   {fused['onnx']}, {'used' if fused['use_at_batch_1'] else 'not used'} for one input on "
              f"onnxruntime ({_text(fused.get('why'))})")
    if m.get("weights"):
        print(f"weights: {m['weights']}" + ("" if bundle.has_weights else " (left out of this bundle: the torch "
                                              "backend is unavailable; onnxruntime and tensorrt do not need it)"))
    for key, entry in (m.get("engines") or {}).items():
        print(f"engines: {key} ({len(entry['stages'])} plans{' + the fused plan' if entry.get('fused') else ''}, "
              f"TensorRT {_text(entry.get('tensorrt', '?'))}, precision {_text(entry.get('precision'))}, "
              f"DLA {_text(entry.get('dla_core'))})")
    if not m.get("engines"):
        print("engines: none (build them on the device with `edgeexit engines BUNDLE`)")
    tc = m.get("toolchain") if isinstance(m.get("toolchain"), dict) else {}
    print("toolchain: " + ", ".join(f"{k} {_text(v)}" for k, v in tc.items()))
    return 0


def _cmd_sign(args) -> int:
    from edgeexit.signing import sign_bundle

    bundle, key = sign_bundle(_open_bundle(args, trusted=False), Path(args.key))
    print(f"signed: {bundle.path} with ed25519 key {key} ({bundle.path / 'manifest.sig'})")
    return 0


def _cmd_keygen(args) -> int:
    from edgeexit.signing import write_keypair

    public, key = write_keypair(Path(args.path))
    print(f"keys: {args.path} (private, keep it off the devices) and {public} (public, key {key}: put it in the "
          "devices' trust store)")
    return 0


def _cmd_engines(args) -> int:
    from edgeexit.export.tensorrt import build_engines

    bundle = _open_bundle(args)
    device = args.device or bundle.manifest["target"]["device"]
    if device == "auto":
        from edgeexit.devices import detect_device

        device = detect_device().name
    dla = args.dla if args.dla is not None else bundle.manifest["target"].get("dla_core")
    out = build_engines(bundle.path, device, precision=args.precision, progress=not args.quiet, dla_core=dla,
                        optimization_level=args.opt_level, cache=args.cache)
    print(f"engines: {out}")
    return 0


def _cmd_pack(args) -> int:
    from edgeexit.archive import describe, pack

    print(describe(pack(args.bundle, args.out, engines=args.engines)))
    return 0


def _cmd_unpack(args) -> int:
    from edgeexit.archive import unpack

    bundle = unpack(args.archive, args.dir, max_bytes=args.max_size)
    print(f"unpacked: {bundle.path} ({len(bundle.present)} files, checksums verified)")
    return 0


def _cmd_stage(args) -> int:
    from edgeexit.flash import stage

    stage(args.bundle, args.rootfs, prefix=args.prefix, service=args.service, wheelhouse=args.wheelhouse,
          wheel=args.wheel)
    return 0


def _cmd_container(args) -> int:
    from edgeexit.container import write_context

    write_context(args.bundle, base=args.base, out=args.out, wheel=args.wheel)
    return 0


def _cmd_doctor(args) -> int:
    from edgeexit.doctor import advice, format_report, gather

    facts = gather()
    lines = advice(facts)
    print(dumps({"facts": facts, "advice": lines}) if args.json else format_report(facts, lines))
    return 1 if lines and args.strict else 0


def _cmd_deploy(args) -> int:
    from edgeexit.deploy import Options, deploy, summary

    opts = Options(path=args.path, profile=args.profile, budget_ms=args.budget_ms, tail=args.tail, batch=args.batch,
                   backend=args.backend, iters=args.iters, device=args.device, wheel=args.wheel,
                   wheelhouse=args.wheelhouse, python=args.python, engines=not args.no_engines, ssh_config=args.ssh_config,
                   ssh_options=tuple(args.ssh_option), quiet=args.quiet)
    if (args.host is None) == (args.inventory is None):
        raise EdgeExitError("deploy: name one HOST or an --inventory")
    if args.inventory is None and (args.limit or args.forks):
        raise EdgeExitError("deploy: --limit and --forks go with --inventory")
    if args.inventory is not None:
        from edgeexit.fleet import deploy_fleet

        print(deploy_fleet(args.bundle, args.inventory, opts, args.limit, args.forks))
        return 0
    print(summary(deploy(args.bundle, args.host, opts)))
    return 0


def _cmd_devices(args) -> int:
    from edgeexit.devices import format_table, list_devices, profile_to_dict

    profiles = list_devices()
    print(dumps([profile_to_dict(p) for p in profiles]) if args.json else format_table(profiles))
    return 0


TORCH_DEVICE_HELP = ("torch device: --backend torch on cpu (default), cuda, cuda:1; torch-cuda on cuda (default), "
                     "cuda:1, or cpu (its static buffers without CUDA graphs: a dry run of the GPU path)")


TRUST_CODE_HELP = ("let --backend torch/torch-cuda import the installed module a factory bundle names "
                   "(model.factory is Python code: off by default)")
TRUST_HELP = ("refuse the bundle unless it is signed by this ed25519 public key, or by one of the *.pub/*.pem "
              "keys in this folder (default: $EDGEEXIT_TRUST when set)")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, like every other edgeexit error (usage is in --help)."""

    commands: argparse._SubParsersAction | None = None  # set on the top-level parser

    def error(self, message: str):
        self.exit(2, f"edgeexit: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but options a command does not know are reported against that
        command (`see edgeexit run --help`): argparse leaves them to the top-level parser."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self.commands.choices.get(getattr(parsed, "command", None)) if self.commands else None
            (command or self).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def _count(lo: int):
    """argparse type: an integer >= lo."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value} is below {lo}")
        return value
    return parse


def _positive_ms(text: str) -> float:
    """argparse type: a finite number of milliseconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number above 0")
    return value


def _backend_args(p: argparse.ArgumentParser) -> None:
    """--backend, --device, --threads and --trust-code, shared by the commands that time a bundle."""
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", help=TORCH_DEVICE_HELP)
    p.add_argument("--threads", type=_count(1), default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--trust-code", action="store_true", help=TRUST_CODE_HELP)


def parser() -> argparse.ArgumentParser:
    """The argument parser (kept separate so the README's command reference can be checked)."""
    p = _Parser(prog="edgeexit", description="Deploy early-exit CNNs: staged export and a gated runtime.")
    from edgeexit import __version__

    p.add_argument("--version", action="version", version=f"edgeexit {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p.commands = sub

    b = sub.add_parser("build", help="train/load, split, export, evaluate and bundle a model.yaml")
    b.add_argument("spec", help="model.yaml")
    b.add_argument("--out", help="bundle directory (default: the yaml's `output`)")
    b.add_argument("--json", action="store_true", help="print the build report as JSON instead of the table")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("--threads", type=_count(1), help="torch threads for training and export (default: torch's, one per core)")
    b.set_defaults(fn=_cmd_build)

    t = sub.add_parser("train", help="train the model.yaml's model and save its weights (a plain state_dict)")
    t.add_argument("spec", help="model.yaml")
    t.add_argument("--out", help="weights file (default: the yaml's `weights`, else next to the output)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--threads", type=_count(1), help="torch threads for training (default: torch's, one per core)")
    t.set_defaults(fn=_cmd_train)

    r = sub.add_parser("run", help="classify images with a bundle's cascade")
    r.add_argument("bundle")
    r.add_argument("--input", required=True,
                   help=".npy of raw images ([N, C, H, W] or one [C, H, W]), an image file, or a folder of them")
    r.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto: TensorRT engines where TensorRT is installed and built, else onnxruntime")
    r.add_argument("--device", help=TORCH_DEVICE_HELP)
    r.add_argument("--thresholds", help="gate on these thresholds instead of the bundle's exit policy or "
                                        "thresholds, e.g. 0.9,0.8,null")
    pick = r.add_mutually_exclusive_group()
    pick.add_argument("--point", help="gate on the bundle's operating point NAME (calibrate --point NAME)")
    pick.add_argument("--budget-ms", type=float, help="gate on the most accurate operating point whose budget fits")
    r.add_argument("--deadline-ms", type=float,
                   help="anytime: each input gets the deepest exit that finishes within this many ms (one call per "
                        "input; no stage is started that the bundle's profile predicts cannot finish in time)")
    r.add_argument("--trust", help=TRUST_HELP)
    r.add_argument("--trust-code", action="store_true", help=TRUST_CODE_HELP)
    r.add_argument("--allow-nonfinite", action="store_true",
                   help="run images holding NaN/Inf (refused by default) and report their raw outputs")
    r.add_argument("--strict", action="store_true",
                   help="refuse inputs that look like other units than the training data (default: warn)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=_cmd_run)

    i = sub.add_parser("inspect", help="verify a bundle and show what it holds")
    i.add_argument("bundle")
    i.add_argument("--trust", help=TRUST_HELP)
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=_cmd_inspect)

    sg = sub.add_parser("sign", help="sign a bundle with an ed25519 private key (manifest.sig)")
    sg.add_argument("bundle")
    sg.add_argument("--key", required=True, help="ed25519 private key, PEM or OpenSSH (edgeexit keygen writes one)")
    sg.set_defaults(fn=_cmd_sign)

    kg = sub.add_parser("keygen", help="write a new ed25519 key pair for signing bundles: PATH and PATH.pub")
    kg.add_argument("path")
    kg.set_defaults(fn=_cmd_keygen)

    e = sub.add_parser("engines", help="build TensorRT engines for a bundle's stages (run on the target device)")
    e.add_argument("bundle")
    e.add_argument("--device", help="device profile (default: the bundle's target.device); auto: the profile of "
                                    "the Jetson module this runs on")
    e.add_argument("--precision", choices=PRECISIONS, help="override every stage's precision")
    e.add_argument("--dla", type=int, help="DLA core to build for (GPU fallback on)")
    e.add_argument("--opt-level", type=int, help="TensorRT builder optimization level (8.6+)")
    e.add_argument("--cache", help="engine cache folder: reuse plans built before on this module, L4T and TensorRT "
                                   "for the same graph and settings, and add new ones (e.g. /var/cache/edgeexit/engines)")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(fn=_cmd_engines)

    tr = sub.add_parser("trace", help="record every exit's confidence and prediction on a data split (.npz)")
    tr.add_argument("bundle")
    tr.add_argument("--split", default="val", help="split of the bundle's data: train, val, calibration or test")
    tr.add_argument("--data", help=".npz with x and y to trace instead of the bundle's data")
    tr.add_argument("--backend", default="auto", choices=BACKENDS)
    tr.add_argument("--device", help=TORCH_DEVICE_HELP)
    tr.add_argument("--trust-code", action="store_true", help=TRUST_CODE_HELP)
    tr.add_argument("--out", help="output .npz (default: <bundle name>.<split>.traces.npz)")
    tr.set_defaults(fn=_cmd_trace)

    pr = sub.add_parser("profile", help="per-stage and end-to-end latency on this machine (and power on a Jetson)")
    pr.add_argument("bundle")
    _backend_args(pr)
    pr.add_argument("--batch", default="1,8,32", help="batch sizes, comma-separated (default 1,8,32)")
    pr.add_argument("--iters", type=_count(1), default=200, help="timed calls per runner and batch size")
    pr.add_argument("--warmup", type=_count(0), default=20, help="untimed calls first")
    pr.add_argument("--thresholds", help="thresholds for the gated cascade (default: the bundle's)")
    pr.add_argument("--split", default="test", help="real samples to run (a split of the bundle's data)")
    pr.add_argument("--data", help=".npz with x (and y) to run instead of the bundle's data")
    pr.add_argument("--no-power", action="store_true", help="on a Jetson, skip tegrastats power sampling")
    pr.add_argument("--no-save", action="store_true", help="print the profile only; the bundle is left as it is "
                                                           "(deploy profiles a device's bundle this way)")
    pr.add_argument("--json", action="store_true")
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(fn=_cmd_profile)

    c = sub.add_parser("calibrate", help="thresholds that maximise accuracy under a latency budget")
    c.add_argument("bundle")
    c.add_argument("--budget-ms", type=_positive_ms, required=True, help="latency budget of one cascade call, ms")
    c.add_argument("--tail", default="mean", choices=tuple(TAILS),
                   help="what must stay under the budget: the mean call latency (default) or a percentile")
    c.add_argument("--batch", type=_count(1), default=1, help="samples per cascade call (default 1)")
    c.add_argument("--solver", default=SOLVERS[0], choices=SOLVERS)
    c.add_argument("--confidence", type=float, default=Budget.confidence,
                   help=f"mean budget: one-sided confidence that it holds on unseen samples (default {Budget.confidence})")
    c.add_argument("--latency", default="auto", choices=SOURCES,
                   help="profile: the bundle's profile.json; estimate: the target's peak figures; "
                        "auto: profile.json, else profile now on a matching machine, else estimate")
    c.add_argument("--profile-key", action="append", help="calibrate on this profile.json entry, BACKEND@DEVICE "
                   "(another machine's, e.g. a Jetson's from `edgeexit deploy --profile`; `inspect` lists them); "
                   "repeated: on the worst of them, so the budget holds on every device named")
    _backend_args(c)
    c.add_argument("--iters", type=_count(1), default=200, help="timed calls per batch size when profiling now")
    c.add_argument("--val-traces", help="validation traces (.npz from `edgeexit trace`) instead of tracing now")
    c.add_argument("--test-traces", help="test traces instead of tracing now")
    c.add_argument("--data-val", help=".npz (x, y) to fit on instead of the bundle's val split")
    c.add_argument("--data-test", help=".npz (x, y) to report on instead of the bundle's test split")
    c.add_argument("--no-measure", action="store_true", help="skip re-running the cascade to check the budget")
    c.add_argument("--risk", choices=RISKS, help="certify the thresholds by Learn-then-Test: this risk (disagreement "
                   "with the final exit, or accuracy lost against it) <= --epsilon and the mean latency within the "
                   "budget, with probability >= 1 - --delta (batch 1, mean)")
    c.add_argument("--point", help="also keep these thresholds as the bundle's operating point NAME (run --point "
                                   "NAME or run --budget-ms picks among them)")
    c.add_argument("--epsilon", type=float, default=0.05, help="--risk: the risk bound (default 0.05)")
    c.add_argument("--delta", type=float, default=0.1, help="--risk: the failure probability (default 0.1)")
    c.add_argument("--accept-miss", action="store_true",
                   help=f"write the thresholds even when the re-measured cascade misses the budget (else nothing is "
                        f"written and the exit status is {MISSED})")
    c.add_argument("--json", action="store_true")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(fn=_cmd_calibrate)

    pk = sub.add_parser("pack", help="write a bundle as one tar for the device (engines only with --engines)")
    pk.add_argument("bundle")
    pk.add_argument("-o", "--out", help="archive path (default: NAME.tar here)")
    pk.add_argument("--engines", action="store_true", help="carry the TensorRT engines too")
    pk.set_defaults(fn=_cmd_pack)

    up = sub.add_parser("unpack", help="unpack and verify a bundle archive into DIR (trusting nothing in it)")
    up.add_argument("archive")
    up.add_argument("dir")
    up.add_argument("--max-size", type=_count(1), default=MAX_ARCHIVE_BYTES,
                    help=f"refuse archives claiming more bytes than this (default {MAX_ARCHIVE_BYTES})")
    up.set_defaults(fn=_cmd_unpack)

    st = sub.add_parser("stage", help="install a bundle into an L4T root filesystem before flashing, with a systemd "
                                      "unit that builds its engines at first boot")
    st.add_argument("bundle")
    st.add_argument("rootfs", help="the L4T root filesystem, e.g. Linux_for_Tegra/rootfs")
    st.add_argument("--prefix", default="/opt/edgeexit", help="folder on the device (default /opt/edgeexit)")
    st.add_argument("--service", help="your own systemd unit: it starts only after the engines are built")
    st.add_argument("--wheelhouse", help="folder of aarch64 wheels for the offline install at first boot (numpy, "
                                         "onnx, onnxruntime, pyyaml, tqdm)")
    st.add_argument("--wheel", help="edgeexit wheel to install there (default: built from this checkout)")
    st.set_defaults(fn=_cmd_stage)

    ct = sub.add_parser("container", help="write a docker build context: the bundle on the L4T image of its "
                                          "target's JetPack, engines built into a cache volume at start")
    ct.add_argument("bundle")
    ct.add_argument("--base", help="base image instead of the l4t-jetpack image matching the target's JetPack")
    ct.add_argument("-o", "--out", help="build context folder (default: NAME-container here)")
    ct.add_argument("--wheel", help="edgeexit wheel to install in the image (default: built from this checkout)")
    ct.set_defaults(fn=_cmd_container)

    dr = sub.add_parser("doctor", help="what this machine has for running bundles (L4T, JetPack, TensorRT, CUDA, "
                                       "pycuda, cuda-python, nvcc) and what to install or fix")
    dr.add_argument("--json", action="store_true")
    dr.add_argument("--strict", action="store_true", help="exit 1 when there is anything to fix")
    dr.set_defaults(fn=_cmd_doctor)

    dp = sub.add_parser("deploy", help="put a bundle on a Jetson over SSH: install the runtime, upload what changed, "
                                       "build engines there, profile and calibrate on its latency")
    dp.add_argument("bundle")
    dp.add_argument("host", nargs="?", help="the device as ssh names it (~/.ssh/config aliases, user@host, ProxyJump "
                                            "apply); or --inventory for many")
    dp.add_argument("--inventory", help="Ansible inventory: deploy to every host in it in parallel through the "
                                        "shipped playbook (needs edgeexit[fleet]); one profile per device")
    dp.add_argument("--limit", help="with --inventory: an Ansible host pattern")
    dp.add_argument("--forks", type=_count(1), help="with --inventory: hosts at a time (Ansible's default 5)")
    dp.add_argument("--path", default="/opt/edgeexit", help="folder on the device (default /opt/edgeexit)")
    dp.add_argument("--profile", action="store_true", help="profile there and merge it into the local profile.json")
    dp.add_argument("--budget-ms", type=_positive_ms, help="calibrate here on the device's profile and push the "
                                                            "thresholds back (implies --profile)")
    dp.add_argument("--tail", default="mean", choices=tuple(TAILS), help="what must stay under the budget")
    dp.add_argument("--batch", type=_count(1), default=1, help="samples per cascade call for the budget (default 1)")
    dp.add_argument("--backend", default="auto", choices=BACKENDS, help="backend to profile with there")
    dp.add_argument("--iters", type=_count(1), default=200, help="timed calls per batch size when profiling")
    dp.add_argument("--device", help="device profile for the engines (default: the board's own, else the bundle's)")
    dp.add_argument("--wheel", help="edgeexit wheel to install there (default: built from this checkout)")
    dp.add_argument("--wheelhouse", help="folder of wheels of edgeexit's requirements for the device (its Python "
                                         "and aarch64): the runtime is installed offline from them")
    dp.add_argument("--python", default="python3", help="interpreter on the device that makes the venv")
    dp.add_argument("--no-engines", action="store_true", help="do not build TensorRT engines there")
    dp.add_argument("--ssh-config", help="ssh_config file (ssh -F)")
    dp.add_argument("-o", "--ssh-option", action="append", default=[], help="ssh -o option, e.g. Port=2222 (repeatable)")
    dp.add_argument("--quiet", action="store_true")
    dp.set_defaults(fn=_cmd_deploy)

    d = sub.add_parser("devices", help="list the target device profiles")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=_cmd_devices)

    sc = sub.add_parser("completion", help="print a shell completion script: eval \"$(edgeexit completion bash)\"")
    sc.add_argument("shell", choices=("bash", "zsh"))
    sc.set_defaults(fn=_cmd_completion)
    return p


def _cmd_completion(args) -> int:
    from edgeexit.completion import script

    print(script(args.shell, parser()), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except EdgeExitError as exc:
        message = str(exc).split("Exception raised from")[0]  # torch's C++ frames are not for users
        print(f"edgeexit: error: {' '.join(message.split())}", file=sys.stderr)  # one line, always
        return 2
    except ModuleNotFoundError as exc:
        if exc.name not in BUILD_MODULES:
            raise
        print(f"edgeexit: error: {args.command} needs {exc.name}, which the runtime install leaves out: "
              "pip install 'edgeexit[build]'", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout piped into a reader that stopped early (`| head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:  # Ctrl-C: staging folders and locks are already undone by their `finally`s
        print("edgeexit: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it
