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
    """A Python number (the batch size) taken before the cut after `a` and used after it."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.a, self.b = _conv(in_channels, 8), _conv(8, 8)
        self.fc = nn.Linear(8 * 64, num_classes)

    def forward(self, x):
        n = x.size(0)
        return self.fc(self.b(self.a(x)).reshape(n, -1))


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
