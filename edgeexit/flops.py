"""Operation counts the way the early-exit papers report them (MSDNet's op_counter).

Why a second counter next to `edgeexit.export.onnx.count_flops`: that one is torch's
FlopCounter, which counts 2 FLOPs per multiply-add and only the graph it is given (one
stage). The MSDNet/RANet papers count 1 op per multiply-add, add elementwise ReLU and
pooling work, and report per exit the CUMULATIVE cost of reaching it: every block up to
it and the heads of every exit up to it, since an input that leaves at exit k was
evaluated (and rejected) by exits 0..k-1 on its way. These figures are comparable with
the papers' budget plots; `count_flops` stays the engine-level figure of one stage.

Counted per leaf module, from the shapes of the tensors it actually sees (so grouped
convs and convs applied to a channel subset are counted as run): convolutions
(in * out * kernel * out_spatial / groups multiply-adds), linear layers (in * out
multiply-adds + out bias adds), ReLU (one op per element), average and max pooling (kernel
elements per output, as op_counter counts both; adaptive average: one per input element). Like op_counter, everything else
counts zero: batch norm (folded into the conv when deployed), concatenation, dropout and
functional ops written inside a module's forward rather than as leaf modules. A module
with a `count_ops(input, output)` method (a conv written with functional calls) counts
itself, and its children are then not counted again.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from edgeexit.staging import as_tuple


def _leaf_ops(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """Ops of one leaf module's call over the whole batch (0 for types the seed ignores)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        per_output = inp.shape[1] // module.groups * math.prod(module.kernel_size)
        return out.numel() * per_output
    if isinstance(module, nn.Linear):
        rows, fin, fout = out.numel() // out.shape[-1], inp.shape[-1], out.shape[-1]
        return rows * (fin * fout + (fout if module.bias is not None else 0))
    if isinstance(module, nn.ReLU):
        return inp.numel()
    if isinstance(module, (nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd)):
        kernel = module.kernel_size
        return out.numel() * math.prod(kernel if isinstance(kernel, tuple) else (kernel,) * (out.dim() - 2))
    if isinstance(module, nn.modules.pooling._AdaptiveAvgPoolNd):
        return inp.numel()
    return 0


def _run_counted(module: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[object, int]:
    """(module(*inputs) in eval mode, ops over the whole batch); the mode is restored."""
    total = 0

    def hook(leaf, args, output):
        nonlocal total
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            total += _leaf_ops(leaf, args[0], output)

    def own(unit, args, output):  # a module that counts itself (e.g. EMGNet's MultiScaleConv)
        nonlocal total
        total += unit.count_ops(args[0], output)

    custom = [m for m in module.modules() if callable(getattr(m, "count_ops", None))]
    inside = {id(c) for m in custom for c in m.modules()}
    handles = [m.register_forward_hook(own) for m in custom]
    handles += [m.register_forward_hook(hook) for m in module.modules()
                if not list(m.children()) and id(m) not in inside]
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            output = module(*inputs)
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    return output, total


def count_ops(module: nn.Module, *inputs: torch.Tensor) -> int:
    """Ops of one forward pass of `module` per sample (inputs carry a batch dimension)."""
    _, total = _run_counted(module, inputs)
    return total // max(1, inputs[0].shape[0])


def exit_flops(model: nn.Module, input_shape: Sequence[int]) -> list[int]:
    """Cumulative ops to reach each exit of a multi-exit model, per sample.

    Entry k is blocks 0..k plus exit heads 0..k, as the MSDNet paper reports it.
    `input_shape` is one sample's (C, H, W), without the batch dimension.
    """
    carry: tuple[torch.Tensor, ...] = (torch.zeros(1, *input_shape),)
    cumulative, total = [], 0
    for block, exit_head in zip(model.blocks, model.exits):
        out, block_ops = _run_counted(block, carry)
        carry = as_tuple(out)
        _, head_ops = _run_counted(exit_head, carry)
        total += block_ops + head_ops
        cumulative.append(total)
    return cumulative
