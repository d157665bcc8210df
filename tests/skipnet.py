"""Backbones for the automatic cut (edgeexit.backbone): plain nn.Modules with no exits.

`skipnet`: a skip connection spans the cut after `block_b` (the output of `block_a` is added
after it), so that cut carries two tensors. `multiscale`: blocks pass lists of tensors, one per
scale, as MSDNet's reference code does, and the classifier reads the coarsest.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class SkipNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = _conv(in_channels, width)
        self.block_a = _conv(width, width)
        self.block_b = _conv(width, width)
        self.block_c = _conv(width, 2 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        a = self.block_a(self.stem(x))
        b = self.block_b(a)
        c = self.block_c(b + a)  # `a` is live across the cut after block_b
        return self.fc(torch.flatten(self.pool(c), 1))


def skipnet(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> SkipNet:
    return SkipNet(in_channels, num_classes, width)


class ScaleBlock(nn.Module):
    """One MSDNet-style block: a list of feature maps in (fine to coarse), a list out; with `mix`,
    as MSDNet's layers, each coarser scale also reads the finer one (a strided convolution)."""

    def __init__(self, widths: list[int], mix: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(_conv(w, w) for w in widths)
        self.down = nn.ModuleList(_conv(a, b, 2) for a, b in zip(widths, widths[1:])) if mix else None

    def forward(self, xs):
        out = [layer(x) for layer, x in zip(self.layers, xs)]
        if self.down is None:
            return out
        return out[:1] + [o + down(fine) for o, down, fine in zip(out[1:], self.down, out)]


class MultiScale(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8, mix: bool = True):
        super().__init__()
        self.fine, self.coarse = _conv(in_channels, width), _conv(in_channels, 2 * width, 2)
        self.block1 = ScaleBlock([width, 2 * width], mix)
        self.block2 = ScaleBlock([width, 2 * width], mix)
        self.block3 = ScaleBlock([width, 2 * width], mix)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        xs = self.block1([self.fine(x), self.coarse(x)])
        xs = self.block2(xs)
        xs = self.block3(xs)
        return self.fc(xs[-1].mean(dim=(2, 3)))


def multiscale(in_channels: int = 1, num_classes: int = 10, width: int = 8, mix: bool = True) -> MultiScale:
    return MultiScale(in_channels, num_classes, width, mix)


class Twice(nn.Module):
    """`conv` runs twice: no single cut after it."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.stem, self.conv = _conv(in_channels, 8), _conv(8, 8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.conv(self.conv(self.stem(x))).mean(dim=(2, 3)))


class SizeAcross(nn.Module):
    """Python numbers taken before the cut after `a` and used after it: the batch size (any
    carried tensor gives it again) and, with `width`, the input's width (nothing carried does)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: bool = False):
        super().__init__()
        self.a, self.b = _conv(in_channels, 8), _conv(8, 8)
        self.fc = nn.Linear(8 * 64, num_classes)
        self.width = width

    def forward(self, x):
        n, w = x.size(0), x.size(3)
        y = self.b(self.a(x)).reshape(n, -1)
        return self.fc(y * w if self.width else y)


class Across(nn.Module):
    """Values before the cut after `a` used after it: a function of parameters only (a gate),
    recomputed where needed, and, with `batch_mean`, a mean over the batch, which has no batch
    axis to split."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, batch_mean: bool = False):
        super().__init__()
        self.a, self.b = _conv(in_channels, 8), _conv(8, 8)
        self.gamma = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.fc = nn.Linear(8, num_classes)
        self.batch_mean = batch_mean

    def forward(self, x):
        gate = self.gamma.sigmoid()
        centre = x.mean(dim=(0, 2, 3), keepdim=True) if self.batch_mean else gate
        a = self.a(x)
        return self.fc((self.b(a) * gate - centre).mean(dim=(2, 3)))


class SideBranch(nn.Module):
    """`side` computes something nothing reads on: no exit can hang there."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.a, self.side, self.b = _conv(in_channels, 8), _conv(8, 8), _conv(8, 8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        a = self.a(x)
        self.side(a)
        return self.fc(self.b(a).mean(dim=(2, 3)))


class Classifier(nn.Module):
    """MSDNet's ClassifierModule, in its style: reads the coarsest scale of the list it is given."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.m = _conv(width, width, 2)
        self.linear = nn.Linear(width, num_classes)

    def forward(self, xs):
        res = self.m(xs[-1]).mean(dim=(2, 3))
        return self.linear(res.view(res.size(0), -1))


class OwnExits(nn.Module):
    """The official MSDNet's way of passing: `self.blocks[i]` take and return lists of scales,
    `self.classifier[i]` read the coarsest, and forward returns the list of every classifier's
    logits (the network has its exits already). The last block drops the fine scale, as
    MSDNet's later blocks drop their finer scales."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.first = nn.ModuleList([_conv(in_channels, width), _conv(in_channels, 2 * width, 2)])
        self.blocks = nn.ModuleList([ScaleBlock([width, 2 * width]) for _ in range(2)] + [Coarsest(width)])
        self.classifier = nn.ModuleList(Classifier(2 * width, num_classes) for _ in range(3))

    def forward(self, x):
        x = [layer(x) for layer in self.first]
        res = []
        for i in range(len(self.blocks)):
            x = self.blocks[i](x)
            res.append(self.classifier[i](x))
        return res


class Coarsest(nn.Module):
    """A block that keeps only the coarsest scale (mixing the fine one in on the way)."""

    def __init__(self, width: int):
        super().__init__()
        self.down, self.conv = _conv(width, 2 * width, 2), _conv(2 * width, 2 * width)

    def forward(self, xs):
        return [self.conv(xs[1] + self.down(xs[0]))]


def own_exits(in_channels: int = 1, num_classes: int = 10, width: int = 8) -> OwnExits:
    return OwnExits(in_channels, num_classes, width)


class ShapeBranch(nn.Module):
    """Python control flow on the input's size in forward itself: fx cannot trace it (a Proxy in
    an `if`), torch.export resolves it for the input shape; a skip connection spans `b`."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.a, self.b, self.c = _conv(in_channels, 8), _conv(8, 8), _conv(8, 16, 2)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        if x.shape[-1] > 16:  # large inputs are pooled first
            x = nn.functional.avg_pool2d(x, 2)
        a = self.a(x)
        c = self.c(self.b(a) + a)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(c, 1), 1))


class ValueBranch(nn.Module):
    """Control flow on the data itself in forward: neither fx nor torch.export can capture it."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.a, self.b = _conv(in_channels, 8), _conv(8, 8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        a = self.a(x)
        if a.mean() > 0:
            a = -a
        return self.fc(self.b(a).mean(dim=(2, 3)))


class BatchBranch(nn.Module):
    """forward branches on the batch size (a batch-statistics path for real batches only):
    torch.export captures the branch for batches of 2 and more, which the cascade cannot use."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.a, self.b = _conv(in_channels, 8), _conv(8, 8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        if x.shape[0] > 1:
            x = x - x.mean(dim=0, keepdim=True)
        return self.fc(self.b(self.a(x)).mean(dim=(2, 3)))
