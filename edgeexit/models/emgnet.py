"""EMGNet (Lee et al., CIKM 2021): multi-scale features from one shared 5x5 kernel per channel.

Every convolution is a `MultiScaleConv`: each output channel owns one 5x5 kernel whose
centre 3x3 *is* its 3x3 kernel, and a learned per-channel gate picks the 3x3 or the 5x5
response. Training runs one 5x5 convolution whose outer ring is zeroed on the channels
gated to 3x3 (hard decision forward, sigmoid straight-through gradient backward); the
eval / deployed form splits the channels into a 3x3 group and a 5x5 group and runs one
small convolution per group, so a channel gated to 3x3 never pays for the 5x5 ring.

Unlike the reference code, whose gate depends on each input's activations, the gate here is
a learned constant per channel: only then is the deployed graph static (TensorRT, no
data-dependent control flow) and the unused branch really skipped. Without a cost the gates
have no reason to close, so `ring_price` adds the gradient of `ring_price x (share of a
layer's channels at 5x5)` to every layer's gates (inside the gate's backward, so any
training loop applies it): a ring stays open only where the task loss pays for it.

The backbone is a small ResNet (one carried tensor per stage, `eenet.ExitBlock` exits) so
that the multi-scale convolution is a drop-in for the 3x3 convolution and nothing else
changes; in a multi-scale grid like MSDNet it would replace the same-scale convolutions.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgeexit.models.eenet import ExitBlock
from edgeexit.models.registry import register
from edgeexit.staging import run_exits


class _PricedGate(torch.autograd.Function):
    """Hard 0/1 gate forward; backward the sigmoid's gradient (straight-through) of the task
    loss plus `price`, i.e. the gradient of `price * sigmoid(gate)` added per channel."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, price: float) -> torch.Tensor:
        ctx.save_for_backward(gate)
        ctx.price = price
        return (gate > 0).to(gate.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (gate,) = ctx.saved_tensors
        soft = torch.sigmoid(gate)
        return (grad + ctx.price) * soft * (1 - soft), None


def _ring_mask() -> torch.Tensor:
    """(1, 1, 5, 5): 1 on the outer ring of a 5x5 kernel, 0 on its centre 3x3."""
    mask = torch.ones(1, 1, 5, 5)
    mask[..., 1:4, 1:4] = 0
    return mask


class MultiScaleConv(nn.Module):
    """A 5x5-or-3x3 convolution per output channel with shared centre weights, plus batch norm.

    `weight` (cout, cin, 5, 5) holds one 5x5 kernel per output channel; its centre
    `weight[..., 1:4, 1:4]` is that channel's 3x3 kernel (EMGNet's weight sharing: the
    two scales cost the parameters of one). `gate` (cout,) is an input-independent
    logit per output channel: > 0 selects the 5x5 response, <= 0 the 3x3 one. Being
    input-independent is what lets the deployed graph be static (TensorRT needs that);
    the reference code's per-sample gate would force both branches to be computed.

    Batch norm belongs to the module because the deployed form folds it into each
    channel group's convolution before the groups are put back in channel order.
    `ring_price` is the loss price of opening every ring of this layer (see the module
    docstring). `gate_init` starts every ring just open, so the rings are trained from the
    start and the gates sit near their decision boundary, where task loss and price decide.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, ring_price: float = 0.0, gate_init: float = 0.01):
        super().__init__()
        if cin < 1 or cout < 1 or stride < 1:
            raise ValueError(f"MultiScaleConv needs positive channels and stride, got cin={cin}, cout={cout}, stride={stride}")
        if ring_price < 0:
            raise ValueError(f"ring_price must be >= 0, got {ring_price}")
        self.stride, self.ring_price = stride, ring_price
        self.weight = nn.Parameter(torch.empty(cout, cin, 5, 5))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.gate = nn.Parameter(torch.full((cout,), float(gate_init)))
        self.bn = nn.BatchNorm2d(cout)
        self.register_buffer("ring", _ring_mask(), persistent=False)
        self._gates: tuple[tuple[int, int], list[bool]] | None = None  # see gate_list

    def count_ops(self, inp: torch.Tensor, out: torch.Tensor) -> int:
        """Multiply-adds of the deployed form (for `edgeexit.flops`): 25 taps per input
        channel for 5x5-gated output channels, 9 for the rest."""
        n5 = int(self.five().sum())
        taps = n5 * 25 + (self.gate.numel() - n5) * 9
        return out.numel() // out.shape[1] * inp.shape[1] * taps

    def five(self) -> torch.Tensor:
        """(cout,) bool: the hard gate decision, True where the channel uses its 5x5 kernel."""
        return self.gate.detach() > 0

    def gate_list(self) -> list[bool]:
        """`five()` as host booleans, kept until the gate changes (its storage or version
        counter), so that an eval forward copies nothing to the host: it can then be
        captured in a CUDA graph (torch-cuda backend)."""
        key = (self.gate.data_ptr(), self.gate._version)
        if self._gates is None or self._gates[0] != key:
            self._gates = (key, self.five().tolist())
        return self._gates[1]

    def masked_weight(self) -> torch.Tensor:
        """The 5x5 weight with the outer ring scaled by the gate: hard 0/1 forward, and the
        sigmoid's gradient backward (straight-through), so the gates learn from the task loss
        (plus `ring_price / cout` per channel). A closed ring gets no gradient: it is not part
        of the function."""
        open_ring = _PricedGate.apply(self.gate, self.ring_price / self.gate.numel()).view(-1, 1, 1, 1)
        return self.weight * (1 - self.ring + self.ring * open_ring)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.bn(F.conv2d(x, self.masked_weight(), None, self.stride, 2))
        return self.deployed(x)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The 5x5 weight and a bias with the eval-mode batch norm folded in (per output channel)."""
        scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        return self.weight * scale.view(-1, 1, 1, 1), self.bn.bias - self.bn.running_mean * scale

    def grouped(self, x: torch.Tensor, in_order: Sequence[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        """The deployed convolution, output left grouped: (y, order), y[:, j] being channel order[j].

        Batch norm is folded in; the 3x3-gated channels come first, from one 3x3 conv with
        the centre weights (padding 1), then the 5x5-gated ones from one 5x5 conv. Same
        function as the training form with the same hard gates: a 5x5 kernel with a zero
        ring and padding 2 equals its centre 3x3 with padding 1, at any stride. With every
        channel in one group there is one conv. `in_order` says that `x` itself arrives
        grouped (another conv's `order`): it is folded into this conv's input channels.
        """
        w, b = self.folded()
        if in_order is not None:
            w = w[:, list(in_order)]
        with warnings.catch_warnings():  # the gates are constants of the deployed graph: baking them
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # into the trace is the point
            five = self.gate_list()
        idx3 = [c for c, f in enumerate(five) if not f]
        idx5 = [c for c, f in enumerate(five) if f]
        parts = []
        if idx3:
            parts.append(F.conv2d(x, w[idx3][:, :, 1:4, 1:4], b[idx3], self.stride, 1))
        if idx5:
            parts.append(F.conv2d(x, w[idx5], b[idx5], self.stride, 2))
        return (parts[0] if len(parts) == 1 else torch.cat(parts, 1)), idx3 + idx5

    def deployed(self, x: torch.Tensor, in_order: Sequence[int] | None = None) -> torch.Tensor:
        """`grouped`, then back to channel order by one constant channel gather (none when
        the gates leave the order unchanged, e.g. all channels in one group)."""
        y, order = self.grouped(x, in_order)
        if order == sorted(order):
            return y
        return y[:, sorted(range(len(order)), key=order.__getitem__)]


class EMGBlock(nn.Module):
    """A ResNet basic block of two MultiScaleConvs with a shortcut (1x1 conv when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, ring_price: float):
        super().__init__()
        self.conv1 = MultiScaleConv(cin, cout, stride, ring_price)
        self.conv2 = MultiScaleConv(cout, cout, 1, ring_price)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def count_ops(self, inp: torch.Tensor, out: torch.Tensor) -> int:
        """Multiply-adds of the block (for `edgeexit.flops`; the deployed form calls its convs'
        grouped/deployed methods, which module hooks cannot see)."""
        shortcut = 0 if isinstance(self.shortcut, nn.Identity) else out.numel() * inp.shape[1]
        return self.conv1.count_ops(inp, out) + self.conv2.count_ops(out, out) + shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            y = self.conv2(torch.relu(self.conv1(x)))
        else:  # conv1's channel grouping is folded into conv2's input channels: no gather between them
            h, order = self.conv1.grouped(x)
            y = self.conv2.deployed(torch.relu(h), in_order=order)
        return torch.relu(y + self.shortcut(x))


class EMGNet(nn.Module):
    """A ResNet of EMGBlocks with one EENets-style exit per stage (`blocks`/`exits` contract)."""

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int], depths: Sequence[int],
                 strides: Sequence[int], exit_pool: int, ring_price: float):
        super().__init__()
        if not (len(widths) == len(depths) == len(strides)) or len(widths) < 2:
            raise ValueError("widths, depths and strides need the same length, at least 2 (one exit per stage)")
        if min(widths) < 1 or min(depths) < 1 or exit_pool < 1:
            raise ValueError("widths, depths and exit_pool must be positive")
        if any(s not in (1, 2) for s in strides):
            raise ValueError(f"strides must each be 1 or 2, got {list(strides)}")
        blocks, cin = [], in_channels
        for k, (width, depth, stride) in enumerate(zip(widths, depths, strides)):
            layers: list[nn.Module] = []
            if k == 0:
                layers += [MultiScaleConv(cin, width, 1, ring_price), nn.ReLU()]
                cin = width
            for d in range(depth):
                layers.append(EMGBlock(cin, width, stride if d == 0 else 1, ring_price))
                cin = width
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.exits = nn.ModuleList(ExitBlock(w, num_classes, exit_pool) for w in widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return run_exits(self, x)[0]

    def gate_report(self) -> dict[str, float]:
        """Share of 5x5-gated output channels of every MultiScaleConv, keyed by module name."""
        return {name: float(m.five().float().mean()) for name, m in self.named_modules()
                if isinstance(m, MultiScaleConv)}


@register("emgnet")
def emgnet(in_channels: int, num_classes: int, widths: Sequence[int] = (16, 32, 64),
           depths: Sequence[int] = (1, 1, 1), strides: Sequence[int] = (1, 2, 2), exit_pool: int = 2,
           ring_price: float = 0.05) -> EMGNet:
    """EMGNet ResNet: stage k has `widths[k]` channels, `depths[k]` blocks, and its first block
    uses stride `strides[k]`; one exit per stage reading an `exit_pool` x `exit_pool` pooled map.
    Every conv but the 1x1 shortcuts is a MultiScaleConv; `ring_price` is the loss price of a
    layer fully at 5x5 (0: the gates follow the task loss alone, and stay open in practice).
    On a 2x2 map a stride-1 5x5 ring only ever sees padding: keep the last stages at 4x4 or more.
    """
    return EMGNet(in_channels, num_classes, list(widths), list(depths), list(strides), exit_pool, ring_price)
