"""EENets-style ResNet (Demir & Akbas, 2024) sized for small images.

A ResNet of BasicBlocks in a few stages; after every stage an exit block with two
separately parameterised branches: a softmax (classification) branch and a confidence
branch (linear -> sigmoid) that learns when the exit can be trusted. The confidence
branch is what `gating.confidence: learned` reads; the other confidence kinds use only
the softmax branch.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from edgeexit.models.registry import register
from edgeexit.staging import run_exits


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3x3 convolutions with batch norm and a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ExitBlock(nn.Module):
    """EENets exit: pooled features feed a classifier and a separate confidence branch."""

    def __init__(self, channels: int, num_classes: int, pool: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(pool)
        features = channels * pool * pool
        self.classifier = nn.Linear(features, num_classes)
        self.confidence = nn.Linear(features, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.flatten(self.pool(x), 1)
        return self.classifier(f), torch.sigmoid(self.confidence(f)).squeeze(1)


class EENetResNet(nn.Module):
    """A ResNet with one exit per stage; `blocks`/`exits` follow the zoo contract."""

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int], depths: Sequence[int],
                 exit_pool: int):
        super().__init__()
        if len(widths) != len(depths) or len(widths) < 2:
            raise ValueError("widths and depths need the same length, at least 2 (one exit per stage)")
        if min(widths) < 1 or min(depths) < 1 or exit_pool < 1:
            raise ValueError("widths, depths and exit_pool must be positive")
        blocks, cin = [], in_channels
        for k, (width, depth) in enumerate(zip(widths, depths)):
            layers: list[nn.Module] = []
            if k == 0:
                layers += [nn.Conv2d(cin, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                cin = width
            for d in range(depth):
                layers.append(BasicBlock(cin, width, 2 if (k > 0 and d == 0) else 1))
                cin = width
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.exits = nn.ModuleList(ExitBlock(w, num_classes, exit_pool) for w in widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return run_exits(self, x)[0]


@register("eenet_resnet")
def eenet_resnet(in_channels: int, num_classes: int, widths: Sequence[int] = (16, 32, 64),
                 depths: Sequence[int] = (1, 1, 1), exit_pool: int = 2) -> EENetResNet:
    """EENets ResNet: `widths[k]` channels and `depths[k]` basic blocks in stage k, one exit each.

    Stage 0 keeps the resolution, later stages halve it; `exit_pool` is the side of the
    pooled map each exit reads (2 keeps some layout on 8x8 inputs).
    """
    return EENetResNet(in_channels, num_classes, list(widths), list(depths), exit_pool)
