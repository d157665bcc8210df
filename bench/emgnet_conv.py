"""What EMGNet's deployed split saves over computing both kernel sizes densely.

For one representative layer (a MultiScaleConv, 64 -> 64 channels on a 16x16 map) and for
whole EMGNet stages (stages 0 and 1 of a CIFAR-size model: 3x32x32 input, widths 32/64/128,
two blocks per stage, exit included), with `--share` of every layer's channels gated to 5x5
(seeded at random), three exports of the same function are compared:

- `both`: the EMGNet reference formulation: a 3x3 and a 5x5 conv over every channel, the
  gate selecting one response per channel (what a per-sample gate forces you to run);
- `masked5`: the training form as exported: one 5x5 conv over every channel, the ring
  of the 3x3-gated channels zero (no gather, but every channel pays for 25 taps);
- `split`: the deployed form (`MultiScaleConv.deployed`): one 3x3 conv over the 3x3 group,
  one 5x5 conv over the 5x5 group, concat and a constant channel gather (folded away
  between the two convs of a block).

Printed: conv multiply-adds per sample (torch's counter), onnxruntime CPU latency per call
at batch 1 and `--batch` (median, all three interleaved call by call in this one run) as
ratios to `split`, and the op counts of the exported graphs with the Conv weight shapes of
`split`, which show one conv per channel group. Weights are random: latency does not
depend on them; every export is parity-checked against `split`.

    python bench/emgnet_conv.py [--share 0.5] [--batch 32] [--calls 200] [--batch-calls 30] [--threads 1]
"""

from __future__ import annotations

import _paths  # noqa: F401 - first: keeps bench/ off the import path (bench/calibration.py)
import argparse
import copy
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edgeexit.export.onnx import export_graph
from edgeexit.models.emgnet import MultiScaleConv, emgnet
from edgeexit.profile import interleaved_calls
from edgeexit.runtime.onnxruntime_backend import make_session
from edgeexit.staging import make_stages, stage_io


class DenseForm(nn.Module):
    """A MultiScaleConv computed over every channel at once: same `grouped`/`deployed`
    interface (so EMGBlock's eval path runs it), the output always in channel order."""

    def __init__(self, conv: MultiScaleConv):
        super().__init__()
        self.conv = conv

    def dense(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def grouped(self, x: torch.Tensor, in_order=None) -> tuple[torch.Tensor, list[int]]:
        w, b = self.conv.folded()
        if in_order is not None:
            w = w[:, list(in_order)]
        return self.dense(x, w, b), list(range(b.shape[0]))

    def deployed(self, x: torch.Tensor, in_order=None) -> torch.Tensor:
        return self.grouped(x, in_order)[0]

    forward = deployed


class BothBranches(DenseForm):
    """EMGNet's reference formulation: a 3x3 and a 5x5 response for every channel, gate-selected."""

    def dense(self, x, w, b):
        y3 = F.conv2d(x, w[:, :, 1:4, 1:4], b, self.conv.stride, 1)
        y5 = F.conv2d(x, w, b, self.conv.stride, 2)
        return torch.where(self.conv.five().view(1, -1, 1, 1), y5, y3)


class Masked5(DenseForm):
    """The training form in eval: one 5x5 conv over every channel, ring zero on 3x3 channels."""

    def dense(self, x, w, b):
        keep = 1 - self.conv.ring * (~self.conv.five()).to(w.dtype).view(-1, 1, 1, 1)
        return F.conv2d(x, w * keep, b, self.conv.stride, 2)


def swapped(module: nn.Module, wrapper: type[nn.Module]) -> nn.Module:
    """A copy of `module` with every MultiScaleConv inside it wrapped by `wrapper`."""
    if isinstance(module, MultiScaleConv):
        return wrapper(copy.deepcopy(module))
    out = copy.deepcopy(module)
    for name, child in module.named_children():
        setattr(out, name, swapped(child, wrapper))
    return out


def randomize(module: nn.Module, share: float, seed: int = 0) -> None:
    """Gate `share` of every MultiScaleConv's channels to 5x5 (seeded) and give batch norm
    non-trivial statistics, so that the parity checks mean something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, MultiScaleConv):
                n = m.gate.numel()
                order = torch.randperm(n, generator=gen)
                m.gate.fill_(-1.0)[order[:round(share * n)]] = 1.0
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)


def conv_macs(module: nn.Module, x: torch.Tensor) -> int:
    """Convolution multiply-adds of one forward pass per sample."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(x[:1])
    counts = counter.get_flop_counts()["Global"]
    return sum(v for op, v in counts.items() if "convolution" in str(op)) // 2


def op_counts(path: Path) -> tuple[Counter, list[str]]:
    """Op types of an ONNX graph, and each Conv's kernel as `out x in x kh x kw`."""
    model = onnx.load(str(path))
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    convs = ["x".join(map(str, weights[n.input[1]])) for n in model.graph.node if n.op_type == "Conv"]
    return Counter(n.op_type for n in model.graph.node), convs


def subjects(share: float) -> list[tuple[str, nn.Module, torch.Tensor, tuple[str, ...], tuple[str, ...]]]:
    """(label, module in eval mode, sample input, input names, output names) per subject."""
    torch.manual_seed(0)
    layer = MultiScaleConv(64, 64).eval()
    randomize(layer, share)
    model = emgnet(3, 10, widths=(32, 64, 128), depths=(2, 2, 2)).eval()
    randomize(model, share)
    stages = make_stages(model, "max_softmax")
    image = torch.randn(64, 3, 32, 32)
    ios = stage_io(stages, image, "image")
    with torch.inference_mode():
        carry = stages[0](image)[0]
    return [("layer 64->64 @16x16", layer, torch.randn(64, 64, 16, 16), ("x",), ("y",)),
            ("stage 0 (32 ch @32x32)", stages[0], image, ios[0].inputs, ios[0].outputs),
            ("stage 1 (64 ch @16x16)", stages[1], carry, ios[1].inputs, ios[1].outputs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--share", type=float, default=0.5, help="share of channels gated to 5x5")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calls", type=int, default=200, help="timed calls per form at batch 1")
    parser.add_argument("--batch-calls", type=int, default=30, help="timed calls per form at --batch")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    variants = {"both": BothBranches, "masked5": Masked5, "split": None}
    with tempfile.TemporaryDirectory() as tmp:
        for label, module, x, inputs, outputs in subjects(args.share):
            forms = {name: module if wrap is None else swapped(module, wrap).eval() for name, wrap in variants.items()}
            print(f"\n{label}: {args.share:.0%} of channels gated to 5x5")
            sessions, counts = {}, {}
            with torch.inference_mode():
                want = module(x)
            for name, form in forms.items():
                path = Path(tmp) / f"{'_'.join(label.split()[:2])}_{name}.onnx"
                export_graph(form, (x[:1],), path, inputs, outputs, 17)
                sessions[name] = make_session(path, args.threads)
                got = sessions[name].run([outputs[0]], {inputs[0]: x.numpy()})[0]
                first = want[0] if isinstance(want, tuple) else want
                assert np.allclose(got, first.numpy(), atol=1e-4), f"{name} export differs from torch"
                counts[name] = op_counts(path)
            macs = {name: conv_macs(form, x) for name, form in forms.items()}
            timings = {}
            for batch in (1, args.batch):
                chunks = [x[i:i + batch].numpy() for i in range(0, len(x) - batch + 1, batch)]
                runners = {name: (lambda s, sess=sess: sess.run(None, {inputs[0]: s})) for name, sess in sessions.items()}
                calls = interleaved_calls(runners, chunks, args.calls if batch == 1 else args.batch_calls, warmup=5)
                timings[batch] = {name: float(np.median(sec)) for name, sec in calls.items()}
            print(f"{'form':<8} {'conv MMACs':>10} {'MACs/split':>10} "
                  + " ".join(f"{f'b{b} ms':>8} {f'b{b}/split':>9}" for b in timings) + "  ops")
            for name in forms:
                row = f"{name:<8} {macs[name] / 1e6:>10.3f} {macs[name] / macs['split']:>10.2f} "
                row += " ".join(f"{timings[b][name] * 1e3:>8.3f} {timings[b][name] / timings[b]['split']:>9.2f}"
                                for b in timings)
                print(row + "  " + ", ".join(f"{op} {n}" for op, n in sorted(counts[name][0].items())))
            print("split Conv weights (out x in x kh x kw): " + ", ".join(counts["split"][1]))
    print(f"\nratios: form / split, onnxruntime CPU ({args.threads} thread), median per call, "
          "interleaved in this one run")


if __name__ == "__main__":
    main()
