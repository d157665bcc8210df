"""Seed-style op counting: the MSDNet paper's per-exit figures and hand-computed cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import edgeexit.models.msdnet  # noqa: F401  (registers the architecture)
from edgeexit.flops import count_ops, exit_flops
from edgeexit.models import ARCHITECTURES

# MSDNet's CIFAR-100 budgeted-batch network (kalviny/MSDNet-PyTorch op_counter), MFLOPs per exit.
MSDNET_CIFAR100_MFLOPS = [6.86, 14.35, 27.54, 41.71, 58.48]


def test_msdnet_cifar100_budgeted_matches_published_exit_flops():
    torch.manual_seed(0)
    model = ARCHITECTURES["msdnet"](in_channels=3, num_classes=100, blocks=5, stepmode="lin_grow", step=1,
                                    base=1, growth=6, channels=16, scales=3)
    got = [ops / 1e6 for ops in exit_flops(model, (3, 32, 32))]
    assert got == pytest.approx(MSDNET_CIFAR100_MFLOPS, rel=0.02)
    # Tighter: equal at the published precision. Dropping the ReLU/pooling terms (~1%)
    # would still pass the 2% check above but not this one.
    assert [round(v, 2) for v in got] == MSDNET_CIFAR100_MFLOPS


def test_each_counted_layer_by_hand():
    x = torch.zeros(3, 2, 5, 5)  # batch 3: counts are per sample
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    conv, relu, pool, linear = 2 * 4 * 9 * 25, 4 * 25, 4 * 25, 4 * 3 + 3  # BN and Flatten count 0
    assert count_ops(model, x) == conv + relu + pool + linear == 2015
    assert count_ops(nn.Conv2d(4, 6, 3, padding=1, groups=2), torch.zeros(1, 4, 5, 5)) == 4 * 6 * 9 * 25 // 2
    assert count_ops(nn.Conv2d(2, 4, 3, stride=2, padding=1), x) == 2 * 4 * 9 * 3 * 3
    assert count_ops(nn.AvgPool2d(2), torch.zeros(1, 4, 4, 4)) == 4 * 2 * 2 * 4  # 4 adds per output
    # max pooling as MSDNet's op_counter counts it (a ResNet stem's): kernel elements per output
    assert count_ops(nn.MaxPool2d(3, 2, 1), torch.zeros(1, 64, 16, 16)) == 64 * 8 * 8 * 9
    assert count_ops(nn.Linear(4, 3, bias=False), torch.zeros(2, 4)) == 12


class _ChannelSubset(nn.Module):
    """A conv that reads only the first two channels of its input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)

    def forward(self, x):
        return self.conv(x[:, :2])


def test_counts_the_tensors_a_layer_actually_sees():
    assert count_ops(_ChannelSubset(), torch.zeros(1, 8, 4, 4)) == 2 * 3 * 16


class _TwoExits(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Conv2d(1, 2, 1, bias=False), nn.Conv2d(2, 2, 1, bias=False)])
        self.exits = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))
                                   for _ in range(2))


def test_exit_flops_accumulate_blocks_and_every_earlier_head():
    model = _TwoExits().train()
    head = 2 * 16 + 2 * 3 + 3  # pool + linear
    assert exit_flops(model, (1, 4, 4)) == [1 * 2 * 16 + head, 1 * 2 * 16 + head + 2 * 2 * 16 + head]
    assert model.training  # the caller's mode is left as it was


def test_exit_flops_on_a_single_carry_zoo_model():
    model = ARCHITECTURES["eenet_resnet"](in_channels=1, num_classes=10)
    flops = exit_flops(model, (1, 8, 8))
    assert len(flops) == 3 and 0 < flops[0] < flops[1] < flops[2]
    x = torch.zeros(1, 1, 8, 8)
    by_parts = 0
    for block, head in zip(model.blocks, model.exits):
        by_parts += count_ops(block, x)
        x = block(x)
        by_parts += count_ops(head, x)
    assert flops[-1] == by_parts
