"""What INT8 and FP16 stage graphs buy on onnxruntime CPU, and what they cost in agreement.

Builds the shipped digits example (or takes `--bundle`, a bundle of that example: its
data splits are re-derived from the example's yaml), converts every stage and the
monolithic graph with `edgeexit.export.quantize` (int8 calibrated on the calibration
split, each stage on the real tensors the fp32 stages before it carry), then prints:

- accuracy: per graph, the share of test samples whose int8 / fp16 `pred` equals fp32's
  (each stage fed the fp32 carry), and test accuracy per precision; the cascade row runs
  the bundle's thresholds with every stage in that precision;
- latency: int8/fp32 and fp16/fp32 per graph, for the gated cascade, and for the fused cascade
  graph (`edgeexit.export.fused`, composed from each precision's stages) at batch 1
  (mean per sample over the test split) and at batch `--batch` (per sample), every
  precision timed interleaved in this one run (`edgeexit.profile.per_sample_latency`).
  `int8` runs with `make_session` (which disables the optimizer int8 graphs suffer from),
  `int8 dflt` with onnxruntime's default optimizers. The target for int8/fp32 is
  <= 0.6. Last, the cost of one `session.run` of a one-node graph: the floor under
  every batch-1 figure, which no precision lowers.

FP16 on an x86 CPU is no measure of a Jetson: onnxruntime's CPU provider has few fp16
kernels and casts around the rest, so fp16/fp32 here only proves the graph runs.

    python bench/precision.py [--bundle PATH] [--threads 1] [--batch 64] [--method minmax]
"""

from __future__ import annotations

import _paths  # noqa: F401 - first: keeps bench/ off the import path (bench/calibration.py)
import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgeexit.bundle import load_bundle
from edgeexit.build import build
from edgeexit.data import load_dataset, normalize
from edgeexit.export.fused import write_fused
from edgeexit.export.precision import carried_feeds
from edgeexit.export.quantize import CALIBRATORS, compare_precision, convert_fp16, quantize_int8
from edgeexit.profile import per_sample_latency
from edgeexit.runtime.cascade import Cascade
from edgeexit.runtime.fused import FusedCascade
from edgeexit.runtime.onnxruntime_backend import DISABLED_OPTIMIZERS, OnnxRuntimeBackend, make_session
from edgeexit.spec import load_spec

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits" / "model.yaml"
PRECISIONS = ("fp32", "int8", "int8 dflt", "fp16")
# optimizers each precision's sessions go without: "int8 dflt" keeps onnxruntime's own defaults
# (CSE on), what int8 costs without edgeexit's setting
DISABLED = {p: () if p == "int8 dflt" else DISABLED_OPTIMIZERS for p in PRECISIONS}


def call_overhead(shape: tuple[int, ...], threads: int, x: np.ndarray) -> float:
    """Seconds per `session.run` of a one-node (Identity) graph: the floor of any batch-1 call."""
    value = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, *shape])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "identity", [value],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, *shape])])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "identity.onnx"
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
        onnx.save(model, str(path))
        session = make_session(path, threads)
        return per_sample_latency({"identity": lambda s: session.run(["y"], {"x": s})}, x)["identity"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", help="a digits-example bundle (default: build one in a temporary directory)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per session (the build's latency uses 1)")
    ap.add_argument("--batch", type=int, default=64, help="the larger batch to time")
    ap.add_argument("--method", default="minmax", choices=list(CALIBRATORS), help="int8 calibration")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="edgeexit-precision-") as tmp:
        tmp = Path(tmp)
        spec = load_spec(EXAMPLE)
        bundle = load_bundle(args.bundle) if args.bundle else build(spec, tmp / "bundle", progress=False)[0]
        data = load_dataset(spec)
        norm = lambda a: normalize(a, bundle.input["mean"], bundle.input["std"])  # noqa: E731
        x_cal, x_test, y_test = norm(data.calibration.x), norm(data.test.x), data.test.y

        ios, stage_paths = bundle.stage_ios, bundle.stage_paths
        graphs = [(f"stage{io.index}", path, io) for path, io in zip(stage_paths, ios)]
        graphs.append(("monolithic", bundle.monolithic_path, bundle.monolithic_io))
        cal = carried_feeds(stage_paths, ios, x_cal) + [{bundle.input["name"]: x_cal}]
        test = carried_feeds(stage_paths, ios, x_test) + [{bundle.input["name"]: x_test}]

        files = {name: {"fp32": path} for name, path, _ in graphs}
        for (name, path, _), feeds in zip(graphs, cal):
            files[name]["int8"] = files[name]["int8 dflt"] = tmp / "int8" / f"{name}.onnx"
            files[name]["fp16"] = tmp / "fp16" / f"{name}.onnx"
            quantize_int8(path, files[name]["int8"], [feeds], method=args.method)
            convert_fp16(path, files[name]["fp16"])
        sessions = {name: {p: make_session(files[name][p], args.threads, disabled_optimizers=DISABLED[p])
                           for p in PRECISIONS}
                    for name, _, _ in graphs}

        cascades, fused = {}, {}
        for p in PRECISIONS:
            backend = OnnxRuntimeBackend(stage_paths, ios, args.threads)
            backend.sessions = [sessions[f"stage{io.index}"][p] for io in ios]
            cascades[p] = Cascade(backend, ios, bundle.thresholds)
            graph = write_fused([files[f"stage{io.index}"][p] for io in ios], ios, len(bundle.classes),
                                tmp / f"cascade.{p.replace(' ', '_')}.onnx")
            fused[p] = FusedCascade(graph, bundle.input["name"], bundle.thresholds, len(ios), args.threads, DISABLED[p])

        print(f"{bundle.name}: int8 ({args.method} calibration on {len(x_cal)} samples) and fp16 vs fp32, "
              f"{len(y_test)} test samples, onnxruntime {ort.__version__} CPU, {args.threads} thread(s)\n")
        print(f"{'graph':<11} {'agree int8':>10} {'agree fp16':>10}   {'acc fp32':>8} {'acc int8':>8} {'acc fp16':>8}")
        for (name, path, io), feeds in zip(graphs, test):
            agree = {p: compare_precision(path, files[name][p], [feeds])["pred_agreement"] for p in ("int8", "fp16")}
            acc = {p: float(np.mean(sessions[name][p].run([io.pred], feeds)[0] == y_test)) for p in PRECISIONS}
            print(f"{name:<11} {agree['int8']:>10.1%} {agree['fp16']:>10.1%}   "
                  f"{acc['fp32']:>8.1%} {acc['int8']:>8.1%} {acc['fp16']:>8.1%}")
        preds = {p: cascades[p].run_batched(x_test, args.batch).pred for p in PRECISIONS}
        agree = {p: np.mean(preds[p] == preds["fp32"]) for p in ("int8", "fp16")}
        acc = {p: np.mean(preds[p] == y_test) for p in PRECISIONS}
        print(f"{'cascade':<11} {agree['int8']:>10.1%} {agree['fp16']:>10.1%}   "
              f"{acc['fp32']:>8.1%} {acc['int8']:>8.1%} {acc['fp16']:>8.1%}")

        full = len(x_test) // args.batch * args.batch
        batches = np.arange(full // args.batch).repeat(8).reshape(-1, 1)  # each full batch 8 times per round
        print(f"\nlatency ratio vs fp32 (per sample; batch 1 over {len(x_test)} samples, batch {args.batch} over "
              f"{full} samples x 8; best of {args.rounds} interleaved rounds)")
        print(f"{'graph':<11} {'fp32 b1 us':>10} {'int8':>6} {'int8 dflt':>9} {'fp16':>6}   "
              f"{f'fp32 b{args.batch} us':>11} {'int8':>6} {'int8 dflt':>9} {'fp16':>6}")
        rows = [(name, io, test_feeds) for (name, _, io), test_feeds in zip(graphs, test)]
        rows.insert(len(ios), ("cascade", None, {ios[0].inputs[0]: x_test}))
        for name, io, feeds in rows:
            (key, values), = feeds.items()
            if io is None:
                run = {p: cascades[p] for p in PRECISIONS}
            else:
                run = {p: (lambda s, sess=sessions[name][p], io=io, key=key: sess.run(list(io.outputs), {key: s}))
                       for p in PRECISIONS}
            one = per_sample_latency(run, values, rounds=args.rounds)
            big = per_sample_latency({p: (lambda i, r=r: r(values[int(i[0, 0]) * args.batch:][:args.batch]))
                                      for p, r in run.items()}, batches, rounds=args.rounds, warmup=4)
            print(f"{name:<11} {one['fp32'] * 1e6:>10.1f} {one['int8'] / one['fp32']:>6.2f} "
                  f"{one['int8 dflt'] / one['fp32']:>9.2f} {one['fp16'] / one['fp32']:>6.2f}   "
                  f"{big['fp32'] / args.batch * 1e6:>11.2f} {big['int8'] / big['fp32']:>6.2f} "
                  f"{big['int8 dflt'] / big['fp32']:>9.2f} {big['fp16'] / big['fp32']:>6.2f}")
        one = per_sample_latency(fused, x_test, rounds=args.rounds)
        print(f"{'fused b1':<11} {one['fp32'] * 1e6:>10.1f} {one['int8'] / one['fp32']:>6.2f} "
              f"{one['int8 dflt'] / one['fp32']:>9.2f} {one['fp16'] / one['fp32']:>6.2f}   (the fused cascade graph of "
              "each precision's stages, one call per input; batch 1 only)")
        floor = call_overhead(tuple(bundle.input["shape"][1:]), args.threads, x_test)
        print(f"\nonnxruntime per-call floor (a one-node graph, batch 1): {floor * 1e6:.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
