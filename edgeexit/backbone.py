"""Exits on any backbone: cut an `nn.Module` after named layers into edgeexit's stages.

A user names the modules to exit after (``model.exits_after: [layer1, layer2, layer3]``, as
``named_modules()`` prints them). `torch.fx` traces the backbone with those modules kept whole,
the graph is split after each of them, and every segment becomes a block whose carried tensors
are exactly the values live across its cut: the main feature map, and also a skip connection
that spans the cut, or every scale of a multi-scale network. A module that returns a list or
tuple (MSDNet's blocks pass one tensor per scale) is flattened: its elements are carried one
by one, and only those a later stage reads. Parameters and buffers are never carried: each
stage reads its own. The result is the `blocks`/`exits` contract the rest of edgeexit consumes;
`forward` runs the untouched backbone (with hooks catching the features at the cuts), so the
staging check compares the split against the original network, not against itself.

A cut that cannot be made is refused in one line naming the node: a layer called twice, a
non-tensor value (a shape, a Python number) computed before a cut and used after it, a
backbone fx cannot trace (data-dependent control flow).
"""

from __future__ import annotations

import difflib
import operator
from collections.abc import Container, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from edgeexit.errors import SpecError

@dataclass(frozen=True)
class ExitHead:
    """`model.exit_head`: the classifier attached at every cut (the backbone's own head is the last exit)."""

    kind: str = "pool-linear"
    width: int = 128  # conv-pool-linear: the channels of its two convolutions


HEAD_MAP = 8  # conv-pool-linear: larger feature maps are average-pooled to about this size first


def make_head(spec: ExitHead, channels: int, classes: int, size: int = HEAD_MAP) -> nn.Module:
    """A small classifier on a (B, C, H, W) feature map (`size`: min(H, W)): global average pool
    and a linear layer, or, as MSDNet's classifiers, two strided 3x3 convolutions (BN, ReLU)
    before them. MSDNet's classifiers read its coarsest scale (8x8 on CIFAR, 7x7 on ImageNet),
    so a larger map is average-pooled first by the whole factor that brings it nearest 8x8
    (56 and 28 and 14 to 8 and 7 and 7): the head then costs about the same at 224x224 as at
    32x32 (a whole factor: ONNX and TensorRT pool it exactly)."""
    if spec.kind == "pool-linear":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))
    factor = max(1, round(size / HEAD_MAP))
    layers: list[nn.Module] = [nn.AvgPool2d(factor)] if factor > 1 else []
    for c_in in (channels, spec.width):
        layers += [nn.Conv2d(c_in, spec.width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(spec.width),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(spec.width, classes))


class FeatureExit(nn.Module):
    """Exit k: its head on one of the tensors block k carries (the cut's feature map)."""

    def __init__(self, index: int, head: nn.Module):
        super().__init__()
        self.index, self.head = index, head

    def forward(self, *carry: torch.Tensor) -> torch.Tensor:
        return self.head(carry[self.index])


class CutModel(nn.Module):
    """A backbone with exits after named layers, in the multi-exit contract (`blocks`, `exits`).

    The blocks share their layers with `backbone`; `forward` runs `backbone` itself and returns
    every exit's logits, the backbone's own output last (all its outputs, when its forward
    returns one per exit: `own_exits`)."""

    def __init__(self, backbone: nn.Module, blocks: Sequence[nn.Module], exits: Sequence[nn.Module],
                 cuts: Sequence[str], own_exits: bool = False):
        super().__init__()
        self.backbone = backbone
        self.blocks, self.exits = nn.ModuleList(blocks), nn.ModuleList(exits)
        self.cuts, self.own_exits = tuple(cuts), own_exits
        self.cut_note: str | None = None  # how the cuts were chosen, for the build log (exits_after: {auto: N})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.own_exits:
            return list(self.backbone(x))
        seen: dict[str, object] = {}
        handles = [self.backbone.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: seen.setdefault(name, out)) for name in self.cuts]
        try:
            out = self.backbone(x)
        finally:
            for handle in handles:
                handle.remove()
        features = [_feature_of(seen[name]) for name in self.cuts]
        return [exit_head.head(f) for exit_head, f in zip(self.exits, features)] + [out]


def _feature_of(value):
    """What an exit reads from a cut layer's output: the tensor, or a list's last element (the
    coarsest scale, as MSDNet's classifiers read it)."""
    return value[-1] if isinstance(value, (list, tuple)) else value


class _Tracer(fx.Tracer):
    """fx's tracer, keeping the cut layers (and layers fx cannot trace through) whole, so each
    is one node of the graph; it notes the innermost layer whose tracing failed."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves, self.failed = leaves, None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:
                self.failed = self.path_of_module(m)
            raise


_MAX_OPAQUE = 64  # layers kept whole because fx cannot trace through them, at the most


def _trace(backbone: nn.Module, cuts: Sequence[str], sample: torch.Tensor, label: str) -> fx.GraphModule:
    """The traced backbone with shapes on every node. A layer fx cannot trace through (it
    iterates over a list it was passed, or branches on data) that lies outside every cut is
    kept whole and traced again; where that cannot help (the failure is in forward itself, or
    in a layer holding a cut), torch.export captures the graph instead."""
    leaves = set(cuts)
    for _ in range(_MAX_OPAQUE):
        tracer = _Tracer(leaves)
        try:
            graph = tracer.trace(backbone)
            gm = fx.GraphModule(tracer.root, graph)
            break
        except Exception as exc:  # noqa: BLE001 - whatever fx says, in one line
            failed = tracer.failed
            if failed and failed not in leaves and not any(c.startswith(failed + ".") for c in cuts):
                leaves.add(failed)
                continue
            detail = " ".join(str(exc).split())[:300]
            where = f" in {failed!r}" if failed else ""
            gm = _export(backbone, sample, label,
                         f"torch.fx cannot trace {label}{where} ({type(exc).__name__}: {detail})")
            break
    else:
        raise SpecError(f"model.backbone: torch.fx cannot trace {label}: more than {_MAX_OPAQUE} layers fail")
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(sample)
    except Exception as exc:  # noqa: BLE001
        detail = " ".join(str(exc).split())[:300]
        raise SpecError(f"model.backbone: {label} does not run on an input of shape {tuple(sample.shape[1:])} "
                        f"(input.shape): {type(exc).__name__}: {detail}") from None
    return gm


def _export(backbone: nn.Module, sample: torch.Tensor, label: str, why: str) -> fx.GraphModule:
    """The backbone as `torch.export` captures it, where fx's symbolic tracing fails (Python
    control flow on shapes or sizes, which export resolves for the input shape): a graph of
    aten operators whose nodes name the modules they run in, which `_cut_nodes` cuts by span."""
    try:
        try:  # any batch size, as the cascade runs partial batches
            ep = torch.export.export(backbone, (sample,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), strict=False)
        except Exception:  # noqa: BLE001 - forward specialises on the batch size: the export then
            ep = torch.export.export(backbone, (sample,), strict=False)  # fixes it, and parity at another fails
        gm = ep.module()
    except Exception as exc:  # noqa: BLE001 - both tracers failed: say both, in one line
        detail = " ".join(str(exc).split())[:200]
        raise SpecError(f"model.backbone: {why}; torch.export fails too ({type(exc).__name__}: {detail}); "
                        "data-dependent control flow must sit inside a layer that is cut after or holds no cut") \
            from None
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and not node.users and node.target.startswith("_guards"):
            gm.graph.erase_node(node)  # export's check of the input shape: the cascade feeds any batch
    gm.recompile()
    gm.meta["exported"] = True
    # export assumes batches of 2 and more: a forward that branches on the batch size differs at 1
    one = torch.randn(sample[:1].shape, generator=torch.Generator().manual_seed(0), dtype=sample.dtype)
    with torch.no_grad():
        same = all(torch.allclose(a, b, atol=1e-5) for a, b in zip(_flat(backbone(one)), _flat(gm(one))))
    if not same:
        raise SpecError(f"model.backbone: {why}; what torch.export captured differs from {label} on a batch of 1 "
                        "(forward branches on the batch size), and the cascade runs any batch from 1")
    return gm


def _flat(value) -> list[torch.Tensor]:
    """The tensors in a forward's output (one, or nested lists and tuples of them)."""
    return [t for v in value for t in _flat(v)] if isinstance(value, (list, tuple)) else [value]


def _module_paths(node: fx.Node) -> list[str]:
    """The modules a node of an exported graph runs in, outermost first."""
    return [path for path, _type in (node.meta.get("nn_module_stack") or {}).values()]


def _span_end(gm: fx.GraphModule, name: str) -> fx.Node | None:
    """In an exported graph, the node holding module `name`'s output: the last of its nodes,
    provided they run as one stretch and nothing else of theirs is read outside it."""
    nodes = list(gm.graph.nodes)
    at = [i for i, node in enumerate(nodes) if name in _module_paths(node)]
    if not at:
        return None
    stretch = set(nodes[at[0]:at[-1] + 1])
    if len(at) != len(stretch):
        raise SpecError(f"model.exits_after: {name!r} does not run as one stretch in the exported graph "
                        "(called twice, or interleaved with other code); cut after another layer")
    last = nodes[at[-1]]
    leaks = [n for n in stretch if n is not last and any(u not in stretch for u in n.users)]
    if leaks:
        raise SpecError(f"model.exits_after: {name!r} hands on more than one value ({leaks[0].name}); in a graph "
                        "torch.export captured, cut after a layer that returns one tensor")
    return last


Item = tuple  # (node, None) for a tensor, (node, i) for element i of a list or tuple of tensors


def _items(node: fx.Node) -> list[Item] | None:
    """How `node`'s value crosses a cut: itself (a tensor), its elements (a flat list or tuple of
    tensors, e.g. MSDNet's scales), or None (anything else cannot)."""
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, TensorMetadata):
        return [(node, None)]
    if isinstance(meta, (list, tuple)) and meta and all(isinstance(m, TensorMetadata) for m in meta):
        return [(node, i) for i in range(len(meta))]
    return None


def _item_meta(item: Item) -> TensorMetadata:
    meta = item[0].meta["tensor_meta"]
    return meta if item[1] is None else meta[item[1]]


def _cut_nodes(gm: fx.GraphModule, cuts: Sequence[str], backbone: nn.Module) -> list[fx.Node]:
    """The graph node of every cut layer, in the order the forward runs them."""
    names = {n for n, _ in backbone.named_modules() if n}
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    found = []
    for name in cuts:
        if name not in names:
            close = difflib.get_close_matches(name, sorted(names), 3)
            raise SpecError(f"model.exits_after: {name!r} is not a module of the backbone"
                            + (f" (did you mean {', '.join(close)}?)" if close else
                               " (names as named_modules() prints them, e.g. layer1, features.3)"))
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name]
        if gm.meta.get("exported"):
            end = _span_end(gm, name)
            calls = [end] if end is not None else []
        if len(calls) != 1:
            raise SpecError(f"model.exits_after: {name!r} is " + ("never called by forward()" if not calls else
                            f"called {len(calls)} times by forward(); cut after a layer that runs once"))
        found.append(calls[0])
    for (a, na), (b, nb) in zip(zip(cuts, found), zip(cuts[1:], found[1:])):
        if order[nb] <= order[na]:
            raise SpecError(f"model.exits_after: {b!r} runs before {a!r}; list the layers in the order forward() runs them")
    return found


def _segments(gm: fx.GraphModule, cut_nodes: list[fx.Node]) -> dict[fx.Node, int]:
    """The segment of every computing node: k for nodes after cut k-1 up to and including cut
    k. An element taken out of a list or tuple goes with the node that made it, so a cut
    carries the elements a later stage reads, not the whole container."""
    cuts, seg, current = {node: k for k, node in enumerate(cut_nodes)}, {}, 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        source = node.args[0] if node.args else None
        if node.target is operator.getitem and isinstance(source, fx.Node) and _items(source) != [(source, None)]:
            seg[node] = seg.get(source, 0)
        else:
            seg[node] = current
        if node in cuts:
            current = cuts[node] + 1
    return seg


def _exit_feature(cut: fx.Node, name: str) -> Item:
    """The tensor exit k reads: the cut layer's output, or the last element of a list it returns
    (the coarsest scale, as MSDNet's classifiers read it)."""
    items = _items(cut)
    if items is None:
        raise SpecError(f"model.exits_after: {name!r} returns something other than a tensor or a list of tensors; "
                        "cut after another layer")
    return items[-1]


def _recomputed(node: fx.Node) -> bool:
    """Whether a value never crosses a cut but is computed again where it is needed: one that
    depends on no input (a function of parameters, e.g. a gate's sigmoid) or the batch size
    (`x.size(0)`, which any carried tensor gives, as every one has the batch first)."""
    if "edgeexit_recomputed" not in node.meta:
        if node.op == "get_attr" or _batch_size(node):
            value = True
        elif node.op == "placeholder" or node.op == "output":
            value = False
        else:
            value = all(_recomputed(n) for n in node.all_input_nodes)
        node.meta["edgeexit_recomputed"] = value
    return node.meta["edgeexit_recomputed"]


def _batch_size(node: fx.Node) -> bool:
    """`x.size(0)` as fx traces it, or torch.export's `sym_size(x, 0)`."""
    if node.op == "call_method" and node.target == "size":
        return len(node.args) > 1 and node.args[1] == 0
    return node.op == "call_function" and node.target is torch.ops.aten.sym_size.int and node.args[1] == 0


def _element(node: fx.Node) -> Item | None:
    """(list, i) for a node taking element i out of a list (or tuple) of tensors, else None."""
    if node.target is not operator.getitem or not isinstance(node.args[0], fx.Node):
        return None
    source, index = node.args[0], node.args[1]
    items = _items(source)
    if not isinstance(index, int) or items is None or items[0][1] is None:
        return None
    return source, index % len(items)


def split_backbone(backbone: nn.Module, cuts: Sequence[str], sample: torch.Tensor,
                   label: str) -> tuple[list[fx.GraphModule], list[Item], list[OwnExit], bool]:
    """Trace `backbone` and split it after each layer in `cuts`: the block of every segment (each
    returning what it carries out, exit k's feature first), the exit features, the backbone's
    own early exits when its forward returns one logits tensor per exit, and whether the graph
    is torch.export's (fx could not trace it)."""
    backbone = backbone.eval()
    gm = _trace(backbone, cuts, sample, label)
    cut_nodes = _cut_nodes(gm, cuts, backbone)
    seg = _segments(gm, cut_nodes)
    n = len(cut_nodes) + 1
    output = next(node for node in gm.graph.nodes if node.op == "output")
    returned = output.args[0]
    if gm.meta.get("exported") and isinstance(returned, (tuple, list)) and len(returned) == 1:
        returned = returned[0]  # export flattens what forward returns into a tuple
    result, own = _own_exits(returned, len(cuts), label)
    cones = _cones(own, set(cut_nodes))
    for k, cone in enumerate(cones):
        for node in cone:
            for w in node.all_input_nodes:
                if w not in cone and w.op not in ("placeholder", "get_attr") and seg[w] > k:
                    raise SpecError(f"model.exits_after: {label}'s exit {k} reads {w.name}, computed after the cut "
                                    f"after {cuts[k]!r}; cut after a later layer")
    in_cone = {node: k for k, cone in enumerate(cones) for node in cone}
    features = [_exit_feature(node, name) for node, name in zip(cut_nodes, cuts)]

    def read_after(node: fx.Node, k: int) -> bool:  # does stage k+1 on, or exit k, need `node`?
        if node in in_cone:
            return in_cone[node] >= k
        return node.op == "output" or seg[node] > k

    carries: list[list[Item]] = []
    for k in range(n - 1):
        live: list[Item] = []
        for v in gm.graph.nodes:
            if v.op in ("output", "get_attr") or v in in_cone or (v.op != "placeholder" and seg[v] > k):
                continue
            if _element(v) is not None or _recomputed(v):
                continue  # a list's element crosses as that list's item; the batch size and parameter functions are recomputed
            items = _items(v)
            if items is None:
                if any(read_after(u, k) for u in v.users):
                    raise SpecError(f"model.exits_after: {v.name} ({v.format_node()[:120]}) is computed before the cut "
                                    f"after {cuts[k]!r} and used after it, but is not a tensor or a list of tensors; "
                                    "only tensors can cross a cut (compute it after the cut, or cut after another layer)")
            elif items == [(v, None)]:
                live += items if any(read_after(u, k) for u in v.users) else []
            else:  # a list: the elements read after the cut, taken out there or passed on whole
                for u in v.users:
                    element = _element(u)
                    if element is None:
                        live += items if read_after(u, k) else []
                    elif read_after(u, k) or any(read_after(w, k) for w in u.users):
                        live.append(element)
        live = list(dict.fromkeys(live))  # one element taken out twice is carried once
        for item in live:
            shape = _item_meta(item).shape
            if not shape or shape[0] != sample.shape[0]:
                raise SpecError(f"model.exits_after: {item[0].name} (shape {tuple(shape)}) is computed before the cut "
                                f"after {cuts[k]!r} and used after it, but has no batch axis first (a value taken "
                                "across the batch); the cascade splits batches, so compute it after the cut")
        if features[k] not in live:
            raise SpecError(f"model.exits_after: the output of {cuts[k]!r} is not used after it; cut after a layer whose "
                            "output the network reads on")
        carries.append([features[k]] + [item for item in live if item != features[k]])
    carries.append([(result, None)])
    placeholders = [(node, None) for node in gm.graph.nodes if node.op == "placeholder"]
    segments = [[v for v in gm.graph.nodes if v.op not in ("placeholder", "output", "get_attr") and seg[v] == k
                 and v not in in_cone] for k in range(n)]
    read_by_head = [{item for item in carries[k] if _reads(cones[k], item)} for k in range(len(cones))]

    def heads() -> list[OwnExit]:  # on what each block carries once pruned
        return [OwnExit(_block(gm, [v for v in gm.graph.nodes if v in cone], carries[k], [(own[k], None)]))
                for k, cone in enumerate(cones)]

    received = [placeholders] + [list(c) for c in carries[:-1]]  # what each block's graph takes in

    def blocks_of(zeroed: list[list[Item]]) -> list[fx.GraphModule]:
        return [_block(gm, segments[k], received[k], carries[k], zeroed[k]) for k in range(n)]

    zeroed: list[list[Item]] = [[] for _ in range(n)]
    blocks = blocks_of(zeroed)
    while True:  # a layer kept whole reads a value only to compute what nothing uses: carry it no more
        unread = _unread_carries(blocks, received, zeroed, sample)
        for k in range(1, n):
            for item in unread[k]:
                if k - 1 < len(read_by_head) and item in read_by_head[k - 1]:
                    raise SpecError(f"model.exits_after: {label}'s exit {k - 1} reads {item[0].name} but the network "
                                    f"after {cuts[k - 1]!r} does not; a stage passes on all it carries, so cut "
                                    "after a layer whose outputs the next block reads")
        if not any(unread):
            return blocks, features, heads(), bool(gm.meta.get("exported"))
        for k in range(1, n):
            zeroed[k] += unread[k]
            carries[k - 1] = [item for item in carries[k - 1] if item not in unread[k]]
        blocks = blocks_of(zeroed)  # the block before may now compute that value for nothing too: probe again


class OwnExit(nn.Module):
    """One of the backbone's own classifiers (its forward returns one logits tensor per exit),
    run on what its block carries: the nodes only that exit needs, cut out of the traced graph."""

    def __init__(self, graph: fx.GraphModule):
        super().__init__()
        self.graph = graph

    def forward(self, *carry: torch.Tensor) -> torch.Tensor:
        return self.graph(*carry)[0]


def _own_exits(result, cuts: int, label: str) -> tuple[fx.Node, list[fx.Node]]:
    """The network's final logits and its own earlier exits: forward() returns one tensor, or a
    list of them (the seeds' reference code: MSDNet, RANet return one per classifier), the last
    the final exit; then each earlier one follows a cut, in order."""
    if isinstance(result, fx.Node) and _items(result) == [(result, None)]:
        return result, []
    if isinstance(result, (list, tuple)) and len(result) > 1 and all(
            isinstance(r, fx.Node) and _items(r) == [(r, None)] for r in result):
        if len(result) - 1 != cuts:
            raise SpecError(f"model.exits_after: {label}'s forward() returns {len(result)} exits (its own "
                            f"classifiers); name {len(result) - 1} layers, the one each earlier exit follows")
        return result[-1], list(result[:-1])
    raise SpecError(f"model.backbone: {label}'s forward() returns {type(result).__name__}; the last exit needs "
                    "one tensor of logits (or a list of them, one per exit)")


def _reads(nodes: Container[fx.Node], item: Item) -> bool:
    """Whether `nodes` read `item`: the value itself, or that element of a list (or the whole list)."""
    return any(item[1] is None or _element(user) in (None, item) for user in item[0].users if user in nodes)


def _cones(own: list[fx.Node], cut_nodes: set[fx.Node]) -> list[set[fx.Node]]:
    """Per own exit, the nodes computed only for it (its classifier), which run in its stage
    after the block instead of in the next block."""
    cones = []
    for k, head in enumerate(own):
        if any(u.op != "output" for u in head.users):
            raise SpecError(f"model.backbone: exit {k}'s logits ({head.name}) are also read by later layers; edgeexit "
                            "cannot carry an exit's output on: return them only")
        cone = {head}
        for node in reversed(list(head.graph.nodes)):
            if node in cone or node in cut_nodes or node.op in ("placeholder", "get_attr", "output"):
                continue
            if node.users and all(u in cone for u in node.users):
                cone.add(node)
        cones.append(cone)
    return cones


def _unread_carries(blocks: list[fx.GraphModule], received: list[list[Item]], zeroed: list[list[Item]],
                    sample: torch.Tensor) -> list[list[Item]]:
    """Per block, the carried values it passes only to layers kept whole (fx cannot see into
    them) and none of its outputs depends on (`unread_inputs`): a scale computed only to be
    dropped. The ONNX exporter would drop such an input; the block is fed zeros in its place
    instead, and the check against the untouched backbone proves the outputs unchanged. A value
    fx sees read (a comparison, a mask) is never one of these. `sample` should be random data."""
    from edgeexit.staging import unread_inputs

    unread, carry = [[]], (sample,)
    with torch.no_grad():
        for k, block in enumerate(blocks):
            if k:
                taken = [item for item in received[k] if item not in zeroed[k]]
                opaque = [all(u.op == "call_module" for u in ph.users)  # read only inside layers fx cannot see into
                          for ph in block.graph.nodes if ph.op == "placeholder"]
                unread.append([taken[i] for i in unread_inputs(block, carry) if i > 0 and opaque[i]])
            carry = tuple(block(*carry))
    return unread


def _block(gm: fx.GraphModule, nodes: list[fx.Node], inputs: list[Item], outputs: list[Item],
           zeroed: Sequence[Item] = ()) -> fx.GraphModule:
    """One segment as a module: `inputs` -> `nodes` -> the tuple of `outputs` (layers and
    parameters shared with `gm`, never copied). A list carried as its elements is taken in as
    placeholders and rebuilt as the list its consumers expect; an input in `zeroed` is not
    taken in: zeros of its shape stand for it (its value reaches no output)."""
    graph, env = fx.Graph(), {}
    parts: dict[fx.Node, dict[int, fx.Node]] = {}
    taken = [item for item in inputs if item not in zeroed]
    phs = {item: graph.placeholder(item[0].name if item[0].op == "placeholder" else f"carry{i}")
           for i, item in enumerate(taken)}
    batch: list[fx.Node] = []

    def batch_size() -> fx.Node:  # any carried tensor's first dimension, asked once
        if not batch:
            batch.append(graph.call_method("size", (phs[taken[0]], 0)))
        return batch[0]

    for item in inputs:
        value, index = item
        if item in phs:
            ph = phs[item]
        else:
            meta = _item_meta(item)
            ph = graph.call_method("new_zeros", (phs[taken[0]], (batch_size(), *meta.shape[1:])), {"dtype": meta.dtype})
        if index is None:
            env[value] = ph
        else:
            parts.setdefault(value, {})[index] = ph
    for value, elements in parts.items():  # a list taken in whole is rebuilt for the layer that reads it
        if len(elements) == len(value.meta["tensor_meta"]):
            env[value] = type(value.meta["tensor_meta"])(elements[i] for i in range(len(elements)))

    def arg(value: fx.Node) -> fx.Node:
        element = _element(value)
        if value not in env and element is not None and element[0] in parts:  # an element carried in
            env[value] = parts[element[0]][element[1]]
        if value not in env and _batch_size(value):  # the batch size, computed before the cut: asked again here
            env[value] = batch_size()
        elif value not in env and _recomputed(value):  # parameters and their functions: read, never carried
            env[value] = graph.node_copy(value, arg)
        return env[value]

    for node in nodes:
        element = _element(node)
        env[node] = arg(node) if element is not None and element[0] in parts else graph.node_copy(node, arg)

    def out(item: Item):
        value, index = item
        if index is None:
            return env[value]
        if value in parts:  # an element carried in and passed on
            return parts[value][index]
        held = env[value]
        return held[index] if isinstance(held, (list, tuple)) else graph.call_function(operator.getitem, (held, index))

    graph.output(tuple(out(item) for item in outputs))
    graph.lint()
    return fx.GraphModule(gm, graph)


def import_torchvision():
    """torchvision, also where its compiled operators were built for another torch (a CUDA
    wheel beside a CPU torch; JetPack's torch beside a pip torchvision): its import then fails
    registering `torchvision::nms`. Its classification models need none of those operators, so
    each missing one is declared (a schema, no kernel: calling it still fails) and the import
    retried, with one warning."""
    import re
    import sys
    import warnings

    declared = []
    for _ in range(16):
        try:
            import torchvision
        except RuntimeError as exc:
            missing = re.search(r"operator torchvision::(\w+) does not exist", str(exc))
            if missing is None or missing[1] in declared:
                raise
            if not declared:
                _TORCHVISION_OPS.append(torch.library.Library("torchvision", "FRAGMENT"))
            _TORCHVISION_OPS[0].define(f"{missing[1]}(Tensor x) -> Tensor")
            declared.append(missing[1])
            for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[name]
            continue
        if declared:
            warnings.warn(f"torchvision {torchvision.__version__}'s compiled operators do not load against torch "
                          f"{torch.__version__}; its models run without them ({', '.join(declared)} would fail)",
                          stacklevel=2)
        return torchvision
    raise SpecError("model.backbone: torchvision cannot be imported with this torch")


_TORCHVISION_OPS: list = []  # the library fragment holding the declared operators, kept alive


def backbone_constructor(name: str, implied: dict[str, int], base_dir, refuse_under):
    """The function that builds `model.backbone` (torchvision:NAME, timm:NAME or a factory), its
    label, and the arguments the input section implies under the names it takes."""
    from edgeexit.models.registry import resolve_factory

    library, _, model = name.partition(":")
    if library == "torchvision":
        try:
            models = import_torchvision().models
        except ImportError:
            raise SpecError("model.backbone: torchvision is not installed (pip install torchvision, the build "
                            "matching your torch)") from None
        if model not in models.list_models(models):
            close = difflib.get_close_matches(model, models.list_models(models), 3)
            raise SpecError(f"model.backbone: torchvision has no classification model {model!r}"
                            + (f" (did you mean {', '.join(close)}?)" if close else ""))
        if implied["in_channels"] != 3:
            raise SpecError(f"model.backbone: torchvision's {model} takes 3 input channels, input.shape has "
                            f"{implied['in_channels']}; give RGB data (an image folder decodes to input.shape's "
                            "channels) or a backbone that takes in_channels")
        return models.get_model_builder(model), name, {"num_classes": implied["num_classes"]}
    if library == "timm":
        try:
            import_torchvision()  # timm imports it: the same declared operators on a CPU torch
            import timm
        except ImportError:
            raise SpecError("model.backbone: timm is not installed (pip install timm)") from None
        if model not in timm.list_models():
            raise SpecError(f"model.backbone: timm has no model {model!r} (timm.list_models() lists them)")

        def create(num_classes: int, in_chans: int, **kwargs) -> nn.Module:
            return timm.create_model(model, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)

        return create, name, {"num_classes": implied["num_classes"], "in_chans": implied["in_channels"]}
    return resolve_factory(name, base_dir, refuse_under, field="model.backbone"), name, implied


def attach_exits(backbone: nn.Module, cuts: Sequence[str], head: ExitHead, sample: torch.Tensor, classes: int,
                 label: str) -> CutModel:
    """The backbone with an exit after every layer in `cuts` (a `head` each) and its own output as
    the last exit: edgeexit's multi-exit contract, checked on `sample` (a batch of the input)."""
    if not cuts:
        raise SpecError("model.exits_after: name at least one layer to exit after")
    if len(set(cuts)) != len(cuts):
        raise SpecError("model.exits_after: a layer is named twice")
    blocks, features, own, exported = split_backbone(backbone, cuts, sample, label)
    model = _exits(backbone, blocks, features, own, cuts, head, classes)
    if exported:  # its batch norms and dropout were captured in inference form: training cannot change that
        model.cut_note = (f"model.backbone: {label} was captured by torch.export (fx cannot trace it); its layers run "
                          "in inference form, also in training (batch norms keep their statistics, no dropout): "
                          "train it beforehand and give model.checkpoint with train.freeze_backbone")
    return model


def _exits(backbone: nn.Module, blocks: list[fx.GraphModule], features: list[Item], own: list[OwnExit],
           cuts: Sequence[str], head: ExitHead, classes: int) -> CutModel:
    """The CutModel: the network's own classifiers as its exits, or a `head` after every cut."""
    if own:  # the network's own classifiers are its exits; model.exit_head is not used
        return CutModel(backbone, blocks, [*own, FeatureExit(0, nn.Identity())], cuts, own_exits=True)
    exits = []
    for feature, name in zip(features, cuts):
        shape = _item_meta(feature).shape
        if len(shape) != 4:
            raise SpecError(f"model.exits_after: {name!r} gives a tensor of shape {tuple(shape[1:])}; an exit head "
                            "reads a (C, H, W) feature map")
        exits.append(FeatureExit(0, make_head(head, int(shape[1]), classes, int(min(shape[2:])))))
    exits.append(FeatureExit(0, nn.Identity()))
    return CutModel(backbone, blocks, exits, cuts)

