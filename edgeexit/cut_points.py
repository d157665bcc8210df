"""Where to cut a backbone when the user asks for `model.exits_after: {auto: N}`.

The backbone is traced once with nothing kept whole, so every node knows the modules it runs
in (fx's `nn_module_stack`). A module is a clean cut point when its nodes run as one contiguous
stretch, once, and nothing computed before its end but itself is read after it: a cut there
carries only its output (no skip connection spans it), which is also the cheapest cut for a
device to keep between stages. Each node's cost is counted (FLOPs, as torch's counter
counts them) or measured (its time on this CPU at batch 1), and the N cut points are the clean
ones whose cumulative cost lies nearest k/(N+1) of the whole, k = 1..N: exits spread by cost,
as the seeds place their classifiers at even compute intervals.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from edgeexit.errors import SpecError

COSTS = ("flops", "measured")  # model.exits_after.cost


@dataclass(frozen=True)
class CutPoint:
    module: str  # as named_modules() prints it
    share: float  # cumulative cost up to and including it, as a share of the whole network's


def _node_costs(gm: fx.GraphModule, sample: torch.Tensor, cost: str) -> dict[fx.Node, float]:
    """Every node's cost on `sample`: counted FLOPs, or the best of 5 timed runs (seconds)."""
    costs: dict[fx.Node, float] = {}

    class Costed(fx.Interpreter):
        def run_node(self, n):
            if cost == "flops":
                with FlopCounterMode(display=False) as counter:
                    result = super().run_node(n)
                costs[n] = costs.get(n, 0.0) + counter.get_total_flops()
                return result
            start = time.perf_counter()
            result = super().run_node(n)
            costs[n] = min(costs.get(n, float("inf")), time.perf_counter() - start)
            return result

    with torch.no_grad():
        for _ in range(1 if cost == "flops" else 5):
            Costed(gm).run(sample)
    return costs


def clean_cuts(gm: fx.GraphModule, backbone: nn.Module) -> dict[str, int]:
    """The blocks a cut after which carries only their own output: name -> index of their last
    node. Where several end at the same node, the outermost name is kept (layer1, not
    layer1.1); single layers (a convolution before its batch norm) and modules called more
    than once are not candidates."""
    nodes = list(gm.graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    spans: dict[str, list[int]] = {}
    repeated = set()
    for i, node in enumerate(nodes):
        for key, (name, _type) in (node.meta.get("nn_module_stack") or {}).items():
            spans.setdefault(name, []).append(i)  # fx's and torch.export's graphs both: {key: (path, type)}
            if "@" in key:  # a later call of the same module
                repeated.add(name)
    last_use = {node: max((index[u] for u in node.users), default=-1) for node in nodes}
    found: dict[int, str] = {}
    for name, at in spans.items():
        first, last = at[0], at[-1]
        if name in repeated or not name or len(set(at)) != last - first + 1:
            continue  # called twice, or interleaved with other code
        if not any(True for _ in backbone.get_submodule(name).children()):
            continue  # a single layer, not a block
        node = nodes[last]
        meta = node.meta.get("tensor_meta")
        if not (hasattr(meta, "shape") and len(meta.shape) == 4) or last_use[node] <= last:
            continue  # an exit head reads a (C, H, W) feature map that the network reads on
        live = [v for v in nodes[:last + 1] if v.op not in ("get_attr", "output") and last_use[v] > last]
        if live != [node]:
            continue  # a skip connection (or the input) spans the cut
        if last not in found or len(name) < len(found[last]):
            found[last] = name
    return {name: last for last, name in found.items()}


def choose_cuts(backbone: nn.Module, count: int, cost: str, sample: torch.Tensor, label: str) -> list[CutPoint]:
    """`count` clean cut points of `backbone`, spread by `cost` ('flops' or 'measured')."""
    from edgeexit.backbone import _trace

    gm = _trace(backbone.eval(), (), sample[:1], label)
    candidates = clean_cuts(gm, backbone)
    costs = _node_costs(gm, sample[:1], cost)
    order = list(gm.graph.nodes)
    cumulative, total = [], 0.0
    for node in order:
        total += costs.get(node, 0.0)
        cumulative.append(total)
    if total <= 0:
        raise SpecError(f"model.exits_after: auto: {label} costs nothing by {cost}; name the layers instead")
    shares = sorted((cumulative[last] / total, _numel(order[last]), name) for name, last in candidates.items()
                    if 0 < cumulative[last] / total < 1)
    if len(shares) < count:
        raise SpecError(f"model.exits_after: auto: {label} has {len(shares)} places where a cut carries only one "
                        f"feature map, fewer than {count}; ask for fewer exits or name the layers")
    chosen: list[CutPoint] = []
    for k in range(1, count + 1):
        left = [s for s in shares if (not chosen or s[0] > chosen[-1].share)
                and not any(_nested(s[2], c.module) for c in chosen)]  # a block and its stage: one leaf or the other
        left = left[:len(left) - (count - k)]  # leave enough later candidates for the exits still to place
        if not left:  # blocks of equal cumulative cost (a block that costs nothing) count once
            raise SpecError(f"model.exits_after: auto: {label} has fewer than {count} places of distinct cost where "
                            "a cut carries only one feature map (a block and the stage holding it count once); ask "
                            "for fewer exits or name the layers")
        target = k / (count + 1)
        nearest = min(abs(s[0] - target) for s in left)
        # the nearest clean cut, or one within SLACK of it that hands on a smaller feature map
        pick = min((s for s in left if abs(s[0] - target) <= nearest + SLACK),
                   key=lambda s: (s[1], abs(s[0] - target)))
        chosen.append(CutPoint(pick[2], pick[0]))
    return chosen


SLACK = 0.05  # share of the cost an auto cut may move from its target to carry less


def _nested(a: str, b: str) -> bool:
    """Whether module `a` contains module `b` or lies inside it (dotted names)."""
    return a.startswith(b + ".") or b.startswith(a + ".")


def _numel(node: fx.Node) -> int:
    shape = node.meta["tensor_meta"].shape
    return int(torch.Size(shape[1:]).numel())


def describe(cuts: Sequence[CutPoint], cost: str) -> str:
    """One line for the build log: where auto cut, and at what share of the cost."""
    return f"model.exits_after: auto ({cost}): " + ", ".join(f"{c.module} ({c.share:.0%})" for c in cuts)
