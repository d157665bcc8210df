"""RANet (Yang et al., CVPR 2020, "Resolution Adaptive Networks for Efficient Inference"), small.

`scales` dense sub-networks see the input at increasing resolution (8², 16², 32² for a
32x32 input and 3 scales). The coarsest runs first and ends in `exits_per_scale` exits, so
easy inputs never touch the fine grids. Sub-network s has `exits_per_scale * (s + 1)`
dense blocks: the first `exits_per_scale * s` are fusion blocks, block b reading block b of
the coarser sub-network s - 1 (1x1 conv compress, bilinear upsample to its own grid,
concatenated to its own dense features); the last `exits_per_scale` are plain dense blocks,
each followed by an exit. A sub-network halves its resolution at the last fusion block
of every earlier sub-network's run (strided dense layer, then a 1x1 transition that keeps
`reduction` of the channels), so every exit reads the coarsest grid, as in the reference
(yangle15/RANet-pytorch). Coarser sub-networks are wider: `channels` and `growth` are
multiplied by 2 per scale below the finest (the reference's grFactor 4-2-1).

Simplifications against the reference, to stay small and TensorRT-friendly: a sub-network
fuses the coarser one once per block (the reference's `conv_last` path) instead of in every
dense layer as well; the identity path of a strided dense layer is 2x2 average pooling
(what bilinear x0.5 with align_corners=False computes); exits pool globally.

Base features are computed lazily, one sub-network at a time: sub-network s starts from
the image average-pooled to its own resolution plus one 3x3 conv, where the reference
derives all scales up front by a strided-conv chain from the full-resolution conv. So the
first exits cost only low-resolution work (no 32x32 conv before exit 0), and what the
stages carry towards later sub-networks is the image itself (one small tensor) rather than
a full-resolution feature map. Stage k is exit k of sub-network s = k // exits_per_scale:

- while a finer sub-network is still to come, a stage carries `(image, f_0, ..., f_b)`:
  the image for the next sub-network's stem and the dense output of every block of this
  sub-network so far (exactly what the next one fuses, block by block); the exit reads
  `f_b`, the output of the plain block it follows (plain blocks have no transition);
- the finest sub-network carries only its running features (the last stage carries none).

For 3 scales and 2 exits per scale that is [2, 3, 4, 5, 1, 0] carried tensors. The input
side must be divisible by 2^(scales - 1). Only Conv, BatchNorm, ReLU, AveragePool,
GlobalAveragePool, Concat, Resize (bilinear, align_corners=False, scale 2) and Gemm:
TorchScript-exportable at opset 17 and parsed by TensorRT 8.5.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgeexit.models.registry import register

BOTTLENECK = 4  # a dense layer's 1x1 conv widens to at most 4 x growth (DenseNet-BC, the reference's bnFactor)


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Conv (no bias), BatchNorm, ReLU: the unit every RANet layer is made of."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DenseLayer(nn.Module):
    """A bottleneck dense layer: concatenates `growth` new channels to its input.

    With `down` the new channels come from a stride-2 conv and the input is 2x2
    average-pooled to match, so the layer also halves the resolution.
    """

    def __init__(self, cin: int, growth: int, down: bool):
        super().__init__()
        inner = min(cin, BOTTLENECK * growth)
        self.conv = nn.Sequential(conv_bn_relu(cin, inner, 1), conv_bn_relu(inner, growth, 3, 2 if down else 1))
        self.skip = nn.AvgPool2d(2) if down else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.skip(x), self.conv(x)], dim=1)


class DenseBlock(nn.Sequential):
    """`layers` dense layers of `growth` channels each; the last one halves the resolution if `down`."""

    def __init__(self, cin: int, growth: int, layers: int, down: bool = False):
        super().__init__(*(DenseLayer(cin + i * growth, growth, down and i == layers - 1) for i in range(layers)))
        self.out_channels = cin + layers * growth


class FusionBlock(nn.Module):
    """A dense block that fuses the coarser sub-network's block of the same index.

    The coarse features are compressed by a 1x1 conv to `compress` x this block's dense
    width, bilinearly upsampled by `upsample` (1 or 2) to this block's grid and
    concatenated; a down block then applies a 1x1 transition to `reduction` x the channels.
    Returns the block output and its dense output (before fusion: what a finer
    sub-network reads from this block).
    """

    def __init__(self, cin: int, coarse_channels: int, growth: int, layers: int, down: bool, upsample: int,
                 compress: float, reduction: float):
        super().__init__()
        self.dense = DenseBlock(cin, growth, layers, down)
        width = self.dense.out_channels
        fused = max(1, math.floor(width * compress))
        self.compress = conv_bn_relu(coarse_channels, fused, 1)
        self.upsample = upsample
        self.out_channels = max(1, math.floor((width + fused) * reduction)) if down else width + fused
        self.transition = conv_bn_relu(width + fused, self.out_channels, 1) if down else nn.Identity()

    def forward(self, x: torch.Tensor, coarse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dense = self.dense(x)
        low = self.compress(coarse)
        if self.upsample > 1:
            low = F.interpolate(low, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        return self.transition(torch.cat([dense, low], dim=1)), dense


class Stem(nn.Module):
    """A sub-network's base features: the image average-pooled by `pool`, then a 3x3 conv."""

    def __init__(self, in_channels: int, channels: int, pool: int):
        super().__init__()
        self.pool = nn.AvgPool2d(pool) if pool > 1 else nn.Identity()
        self.conv = conv_bn_relu(in_channels, channels, 3)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(image))


class RANetStage(nn.Module):
    """blocks[k]: the part of one sub-network between exit k - 1 and exit k, on the carry.

    The first stage of a sub-network holds its `stem` and its `fusions`, and reads
    `(image, *coarse)`: the coarser sub-network's block outputs. Every stage ends with a
    `plain` dense block. See the module docstring for what is carried.
    """

    def __init__(self, stem: Stem | None, fusions: list[FusionBlock], plain: DenseBlock, carries_image: bool):
        super().__init__()
        self.stem, self.fusions, self.plain = stem, nn.ModuleList(fusions), plain
        self.carries_image = carries_image

    def forward(self, *carry: torch.Tensor):
        if self.stem is not None:
            image, x, feats = carry[0], self.stem(carry[0]), []
            for fusion, coarse in zip(self.fusions, carry[1:]):
                x, dense = fusion(x, coarse)
                feats.append(dense)
        elif self.carries_image:
            image, feats, x = carry[0], list(carry[1:]), carry[-1]
        else:
            x = carry[0]
        x = self.plain(x)
        return (image, *feats, x) if self.carries_image else x


class Classifier(nn.Module):
    """The reference's CIFAR exit: two stride-2 3x3 convs, average pool, linear.

    Pooling is global so any classifier resolution works (2x2 after the convs on 8x8).
    It reads the last carried tensor (the features of the block before it).
    """

    def __init__(self, cin: int, width: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(conv_bn_relu(cin, width, 3, 2), conv_bn_relu(width, width, 3, 2),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.linear = nn.Linear(width, num_classes)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from one feature map."""
        return self.linear(self.features(x))

    def forward(self, *carry: torch.Tensor) -> torch.Tensor:
        return self.classify(carry[-1])


class RANet(nn.Module):
    """Resolution adaptive network; `blocks`/`exits` follow the zoo contract (one stage per exit)."""

    def __init__(self, in_channels: int, num_classes: int, scales: int, channels: int, growth: int, layers: int,
                 exits_per_scale: int, compress: float, reduction: float, head_channels: int):
        super().__init__()
        blocks: list[RANetStage] = []
        exits: list[Classifier] = []
        coarse: list[int] = []  # dense widths of the coarser sub-network's blocks
        for s in range(scales):
            factor = 2 ** (scales - 1 - s)  # this sub-network's grid is `factor` x coarser, its layers as much wider
            g, last_fusion, cin = growth * factor, exits_per_scale * s - 1, channels * factor
            stem = Stem(in_channels, cin, factor)
            fusions, dense_widths = [], []
            for b, coarse_channels in enumerate(coarse):
                down = (b + 1) % exits_per_scale == 0  # where an earlier sub-network's run of exits ended
                fusion = FusionBlock(cin, coarse_channels, g, layers, down, 1 if b == last_fusion else 2,
                                     compress, reduction)
                fusions.append(fusion)
                dense_widths.append(fusion.dense.out_channels)
                cin = fusion.out_channels
            for j in range(exits_per_scale):
                plain = DenseBlock(cin, g, layers)
                cin = plain.out_channels
                dense_widths.append(cin)
                blocks.append(RANetStage(stem if j == 0 else None, fusions if j == 0 else [], plain,
                                         carries_image=s < scales - 1))
                exits.append(Classifier(cin, head_channels, num_classes))
            coarse = dense_widths
        self.blocks = nn.ModuleList(blocks)
        self.exits = nn.ModuleList(exits)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits, walking the sub-networks directly (feature lists, no carry tuples)."""
        logits, coarse, feats = [], [], []
        for stage, head in zip(self.blocks, self.exits):
            if stage.stem is not None:  # a new sub-network: it fuses the previous one's blocks
                coarse, feats, h = feats, [], stage.stem(x)
                for fusion, low in zip(stage.fusions, coarse):
                    h, dense = fusion(h, low)
                    feats.append(dense)
            h = stage.plain(h)
            feats.append(h)
            logits.append(head.classify(h))
        return logits


def _check_int(name: str, value, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


@register("ranet")
def ranet(in_channels: int, num_classes: int, scales: int = 3, channels: int = 8, growth: int = 4,
          layers: int = 2, exits_per_scale: int = 2, compress: float = 0.25, reduction: float = 0.5,
          head_channels: int = 32) -> RANet:
    """RANet with `scales` sub-networks of `exits_per_scale` exits each (scales x exits_per_scale exits).

    scales: sub-networks, resolutions input/2^(scales-1) ... input (the side must divide).
    channels: stem width of the finest sub-network (x2 per coarser scale).
    growth: dense growth rate of the finest sub-network (x2 per coarser scale).
    layers: dense layers per block.
    exits_per_scale: plain blocks, each with an exit, per sub-network (the reference's
        nBlocks = block_step).
    compress: width of the fused coarse features, as a share of the block's dense width.
    reduction: share of channels a transition (after a resolution drop) keeps.
    head_channels: width of the exits' two convs (128 in the reference).
    """
    for name, value in (("scales", scales), ("channels", channels), ("growth", growth), ("layers", layers),
                        ("exits_per_scale", exits_per_scale), ("head_channels", head_channels)):
        _check_int(name, value)
    return RANet(in_channels, num_classes, scales, channels, growth, layers, exits_per_scale,
                 _check_fraction("compress", compress), _check_fraction("reduction", reduction), head_channels)
