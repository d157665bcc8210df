"""A small two-scale multi-exit model (MSDNet-like carry: one map per scale) for the tests.

Used through `model.factory: "twoscale_model:build"`, so it also exercises user factories.
Its forward() is written out by hand, independently of blocks/exits, so the staged ==
monolithic check compares two different code paths.
"""

import torch
from torch import nn


class Entry(nn.Module):
    def __init__(self, cin, width):
        super().__init__()
        self.fine = nn.Conv2d(cin, width, 3, padding=1)
        self.coarse = nn.Conv2d(cin, 2 * width, 3, stride=2, padding=1)

    def forward(self, x):
        return torch.relu(self.fine(x)), torch.relu(self.coarse(x))


class Mix(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fine = nn.Conv2d(width, width, 3, padding=1)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.coarse = nn.Conv2d(2 * width, 2 * width, 3, padding=1)

    def forward(self, fine, coarse):
        new_fine = torch.relu(self.fine(fine)) + fine
        new_coarse = torch.relu(self.coarse(coarse) + self.down(fine))
        return new_fine, new_coarse


class Head(nn.Module):
    def __init__(self, width, num_classes):
        super().__init__()
        self.linear = nn.Linear(2 * width, num_classes)

    def forward(self, fine, coarse):
        return self.linear(coarse.mean(dim=(2, 3)))


class TwoScale(nn.Module):
    def __init__(self, in_channels, num_classes, width, depth):
        super().__init__()
        self.blocks = nn.ModuleList([Entry(in_channels, width)] + [Mix(width) for _ in range(depth - 1)])
        self.exits = nn.ModuleList(Head(width, num_classes) for _ in range(depth))

    def forward(self, x):
        fine = torch.relu(self.blocks[0].fine(x))
        coarse = torch.relu(self.blocks[0].coarse(x))
        out = [self.exits[0].linear(coarse.mean(dim=(2, 3)))]
        for k in range(1, len(self.blocks)):
            mix = self.blocks[k]
            fine, coarse = torch.relu(mix.fine(fine)) + fine, torch.relu(mix.coarse(coarse) + mix.down(fine))
            out.append(self.exits[k].linear(coarse.mean(dim=(2, 3))))
        return out


def build(in_channels, num_classes, width=8, depth=3):
    return TwoScale(in_channels, num_classes, width, depth)
