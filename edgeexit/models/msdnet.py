"""MSDNet (Huang et al., ICLR 2018), the CIFAR variant, cut at its exits.

MSDNet keeps one feature map per scale (scale 0 = full resolution, each next scale half
the side and `gr_factor` times the channels). Every layer grows each scale densely: the
new features at scale s come from a regular 3x3 conv on scale s and, for s > 0, a strided
3x3 conv on scale s - 1, and are concatenated onto the old map. Classifiers sit on the
coarsest scale only, so once the network nears its end the finest scales are useless;
"max" pruning drops them one by one in equal intervals of layers, and each drop is
followed by a transition (1x1 conv) that halves the channels (`reduction`).

In the zoo contract blocks[k] is the stem (k = 0) and the layers between exit k-1 and
exit k; its carry is the tuple of live scales, finest first, so the number of carried
tensors shrinks where finest scales are pruned. Only static Conv/BatchNorm/ReLU/Concat/
pooling/Gemm graphs are built: every stage exports at opset 17 and parses in TensorRT.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from edgeexit.models.registry import register

STEPMODES = ("even", "lin_grow")


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    """Conv (no bias, 'same' padding) -> BatchNorm -> ReLU: MSDNet's basic unit."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def dense_conv(cin: int, cout: int, stride: int, bottleneck: bool, bn_width: int) -> nn.Sequential:
    """The 3x3 conv that produces new features, behind an optional 1x1 bottleneck.

    The bottleneck narrows to min(cin, bn_width * cout) channels, as in the paper; the
    3x3 conv is strided (stride 2) when it brings a finer scale down to the next one.
    """
    layers: list[nn.Module] = []
    inner = cin
    if bottleneck:
        inner = min(cin, bn_width * cout)
        layers += conv_bn_relu(cin, inner, 1, 1)
    return nn.Sequential(*layers, *conv_bn_relu(inner, cout, 3, stride))


class ScaleUnit(nn.Module):
    """One scale of one MSDNet layer: `same` (+ `finer`) -> cat(same, new features).

    With a finer input, half the new channels come from a strided conv on the finer scale
    and half from a conv on this scale; without one (the finest live scale), all of them
    come from this scale.
    """

    def __init__(self, cin_same: int, cin_finer: int | None, new: int, bottleneck: bool,
                 bn_same: int, bn_finer: int | None):
        super().__init__()
        self.down = None
        if cin_finer is None:
            self.normal = dense_conv(cin_same, new, 1, bottleneck, bn_same)
        else:
            self.down = dense_conv(cin_finer, new // 2, 2, bottleneck, bn_finer)
            self.normal = dense_conv(cin_same, new // 2, 1, bottleneck, bn_same)

    def forward(self, same: torch.Tensor, finer: torch.Tensor | None = None) -> torch.Tensor:
        if self.down is None:
            return torch.cat([same, self.normal(same)], dim=1)
        return torch.cat([same, self.down(finer), self.normal(same)], dim=1)


class MSDLayer(nn.Module):
    """One MSDNet layer over the live scales; drops the finest one when out < in scales.

    Inputs are the `in_scales` coarsest maps, finest first. Output i is scale
    `first + i` (first = scales - out_scales); it reads its finer neighbour whenever one
    is among the inputs, so a dropped finest scale still feeds the layer that drops it.
    """

    def __init__(self, channels: int, growth: int, in_scales: int, out_scales: int, gr_factor: Sequence[int],
                 bn_factor: Sequence[int], bottleneck: bool):
        super().__init__()
        scales = len(gr_factor)
        first, self.drops = scales - out_scales, in_scales > out_scales
        units = []
        for s in range(first, scales):
            finer = s > first or self.drops
            units.append(ScaleUnit(channels * gr_factor[s], channels * gr_factor[s - 1] if finer else None,
                                   growth * gr_factor[s], bottleneck, bn_factor[s],
                                   bn_factor[s - 1] if finer else None))
        self.units = nn.ModuleList(units)

    def forward(self, *maps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        start = 1 if self.drops else 0
        out = []
        for i, unit in enumerate(self.units):
            same = maps[start + i]
            out.append(unit(same, maps[start + i - 1]) if start + i > 0 else unit(same))
        return tuple(out)


class Transition(nn.Module):
    """1x1 conv per live scale that shrinks the channels after a scale was pruned."""

    def __init__(self, cin: int, cout: int, gr_factor: Sequence[int]):
        super().__init__()
        self.convs = nn.ModuleList(conv_bn_relu(cin * g, cout * g, 1, 1) for g in gr_factor)

    def forward(self, *maps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(conv(m) for conv, m in zip(self.convs, maps))


class Stem(nn.Module):
    """CIFAR stem: a 3x3 stride-1 conv for scale 0, then a stride-2 3x3 conv per coarser scale."""

    def __init__(self, in_channels: int, channels: int, gr_factor: Sequence[int]):
        super().__init__()
        widths = [in_channels] + [channels * g for g in gr_factor]
        self.convs = nn.ModuleList(conv_bn_relu(widths[s], widths[s + 1], 3, 1 if s == 0 else 2)
                                   for s in range(len(gr_factor)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps = []
        for conv in self.convs:
            x = conv(x)
            maps.append(x)
        return tuple(maps)


class MSDBlock(nn.Module):
    """The layers between two exits (with the stem in front for the first block)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, *maps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for layer in self.layers:
            maps = layer(*maps)
        return maps


class ExitHead(nn.Module):
    """Classifier on the coarsest scale: two stride-2 3x3 convs, global average pool, linear.

    It takes the whole carry (the stage passes every live scale) and reads the last map.
    The pool is global, which on CIFAR-sized inputs equals the paper's 2x2 average pool
    and keeps the head valid for other input sizes.
    """

    def __init__(self, cin: int, width: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(conv_bn_relu(cin, width, 3, 2), conv_bn_relu(width, width, 3, 2),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.linear = nn.Linear(width, num_classes)

    def forward(self, *maps: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(maps[-1]))


def layer_steps(blocks: int, step: int, base: int, stepmode: str) -> list[int]:
    """Layers per block: `base` first, then `step` each (even) or `step * k + 1` (lin_grow)."""
    if stepmode == "even":
        return [base] + [step] * (blocks - 1)
    return [base] + [step * k + 1 for k in range(1, blocks)]


def live_scales(layer: int, total: int, scales: int) -> tuple[int, int]:
    """(in, out) scales of layer `layer` (1-based) of `total` under "max" pruning.

    The finest scale is dropped every ceil(total / scales) layers, so the last interval
    runs on the coarsest scale alone.
    """
    interval = math.ceil(total / scales)
    return scales - max(0, layer - 2) // interval, scales - (layer - 1) // interval


class MSDNet(nn.Module):
    """Multi-scale dense network with one exit per block; see the module docstring."""

    def __init__(self, in_channels: int, num_classes: int, steps: Sequence[int], channels: int, growth: int,
                 gr_factor: Sequence[int], bn_factor: Sequence[int], bottleneck: bool, reduction: float,
                 head_width: int):
        super().__init__()
        scales, total, done = len(gr_factor), sum(steps), 0
        width = channels  # channels at scale 0; scale s has width * gr_factor[s]
        blocks, exits = [], []
        for k, step in enumerate(steps):
            layers: list[nn.Module] = [Stem(in_channels, channels, gr_factor)] if k == 0 else []
            for _ in range(step):
                done += 1
                n_in, n_out = live_scales(done, total, scales)
                layers.append(MSDLayer(width, growth, n_in, n_out, gr_factor, bn_factor, bottleneck))
                width += growth
                if n_out < n_in and reduction > 0:
                    narrow = math.floor(reduction * width)
                    layers.append(Transition(width, narrow, gr_factor[scales - n_out:]))
                    width = narrow
            blocks.append(MSDBlock(layers))
            exits.append(ExitHead(width * gr_factor[-1], head_width, num_classes))
        self.blocks = nn.ModuleList(blocks)
        self.exits = nn.ModuleList(exits)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        carry, logits = (x,), []
        for block, exit_head in zip(self.blocks, self.exits):
            carry = block(*carry)
            logits.append(exit_head(*carry))
        return logits


def _factors(name: str, given: Sequence[int] | None, scales: int) -> list[int]:
    if given is None:
        return [2 ** s for s in range(scales)]
    values = list(given)
    if len(values) != scales or any(not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must list {scales} positive integers (one per scale), got {values}")
    return values


@register("msdnet")
def msdnet(in_channels: int, num_classes: int, blocks: int = 5, stepmode: str = "lin_grow", step: int = 1,
           base: int = 1, scales: int = 3, channels: int = 16, growth: int = 6, bottleneck: bool = True,
           reduction: float = 0.5, head_width: int = 128, gr_factor: Sequence[int] | None = None,
           bn_factor: Sequence[int] | None = None) -> MSDNet:
    """MSDNet for CIFAR-sized inputs; defaults are the paper's CIFAR budgeted-batch network.

    `blocks` exits; block 0 has `base` layers, later blocks `step` (stepmode even) or
    `step * k + 1` (lin_grow) layers. `channels` is the stem width at scale 0, `growth`
    the new channels per layer at scale 0; scale s multiplies both by gr_factor[s]
    (default 1, 2, 4, ...) and its bottleneck is at most bn_factor[s] (default 1, 2, 4,
    ...) times the new channels. Finest scales are pruned "max"-style, each followed by a
    transition keeping `reduction` of the channels (0: no transitions). Each exit is two
    stride-2 3x3 convs of `head_width` channels, a global average pool and a linear layer.
    """
    positive = {"blocks": blocks, "step": step, "base": base, "scales": scales, "channels": channels,
                "growth": growth, "head_width": head_width}
    for name, value in positive.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if stepmode not in STEPMODES:
        raise ValueError(f"stepmode must be one of {', '.join(STEPMODES)}, got {stepmode!r}")
    if not isinstance(bottleneck, bool):
        raise ValueError(f"bottleneck must be true or false, got {bottleneck!r}")
    if not 0 <= reduction <= 1:
        raise ValueError(f"reduction must be in [0, 1] (0 disables transitions), got {reduction!r}")
    gr = _factors("gr_factor", gr_factor, scales)
    bn = _factors("bn_factor", bn_factor, scales)
    odd = [s for s in range(1, scales) if growth * gr[s] % 2]
    if odd:
        raise ValueError(f"growth * gr_factor[s] must be even for s >= 1 (split between two convs); "
                         f"odd at scale {odd[0]}")
    return MSDNet(in_channels, num_classes, layer_steps(blocks, step, base, stepmode), channels, growth, gr, bn,
                  bottleneck, reduction, head_width)
