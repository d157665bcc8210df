"""The Stage contract: a multi-exit model cut into the modules the runtime executes.

Stage k maps its carried tensors (the image for stage 0) to its own carried tensors,
then the exit's `logits`, `conf` (B,) and `pred` (B,). The confidence is computed inside
the graph, so a runtime reads only `conf` and `pred` to decide; thresholds stay runtime
data. Several carried tensors are allowed (MSDNet carries one feature map per scale).
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch import nn

from edgeexit.errors import EdgeExitError, SpecError
from edgeexit.stage_io import StageIO

T = TypeVar("T")


def as_tuple(value) -> tuple[torch.Tensor, ...]:
    """A block's output as a tuple of tensors, whether it returned one tensor or several."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def split_exit(value) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An exit's output as (logits, learned confidence or None)."""
    if isinstance(value, (tuple, list)):
        logits, conf = value
        return logits, conf.reshape(-1)
    return value, None


def confidence(kind: str, logits: torch.Tensor, learned: torch.Tensor | None) -> torch.Tensor:
    """Per-sample confidence in [0, 1], higher = more certain, for every gating kind.

    max_softmax: top probability; margin: top1 - top2 probability; entropy: 1 - H(p)/log C;
    learned: the exit's own confidence branch (EENets).
    """
    if kind == "learned":
        if learned is None:
            raise SpecError("gating.confidence: 'learned' needs exits with a confidence branch; this model's exits return logits only")
        return learned
    probs = torch.softmax(logits, dim=1)
    if kind == "max_softmax":
        return probs.max(dim=1).values
    if kind == "margin":
        top2 = torch.topk(probs, 2, dim=1).values
        return top2[:, 0] - top2[:, 1]
    if kind == "entropy":
        ent = -(probs * torch.log_softmax(logits, dim=1)).sum(dim=1)
        # log C computed in the graph: a Python math.log of the traced shape leaks a TracerWarning
        return 1.0 - ent / torch.log(torch.ones_like(logits).sum(dim=1))
    raise SpecError(f"gating.confidence: unknown kind {kind!r}")


def run_exits(model: nn.Module, x: torch.Tensor,
              handoff: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]] | None = None,
              ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Every exit's logits and learned confidence (None where the exit has no branch).

    `handoff`, if given, transforms the carry passed on to the next block (never what the
    exit sees): training methods such as Deep Feature Surgery hook in here.
    """
    carry, logits, learned = (x,), [], []
    last = len(model.blocks) - 1
    for k, (block, exit_head) in enumerate(zip(model.blocks, model.exits)):
        carry = as_tuple(block(*carry))
        lg, conf = split_exit(exit_head(*carry))
        logits.append(lg)
        learned.append(conf)
        if handoff is not None and k < last:
            carry = handoff(carry)
    return logits, learned


class Stage(nn.Module):
    """One deployable stage: backbone block k plus exit k, confidence and prediction in-graph."""

    def __init__(self, block: nn.Module, exit_head: nn.Module, kind: str, last: bool):
        super().__init__()
        self.block, self.exit_head, self.kind, self.last = block, exit_head, kind, last
        self.eval()

    def forward(self, *carry: torch.Tensor):
        out = as_tuple(self.block(*carry))
        logits, learned = split_exit(self.exit_head(*out))
        conf = confidence(self.kind, logits, learned)
        pred = torch.argmax(logits, dim=1)
        return (logits, conf, pred) if self.last else (*out, logits, conf, pred)


class Monolithic(nn.Module):
    """The whole backbone and the final exit only: the baseline every comparison uses."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model, self.kind = model, kind
        self.eval()

    def forward(self, x: torch.Tensor):
        carry = (x,)
        for block in self.model.blocks:
            carry = as_tuple(block(*carry))
        logits, learned = split_exit(self.model.exits[-1](*carry))
        return logits, confidence(self.kind, logits, learned), torch.argmax(logits, dim=1)


def make_stages(model: nn.Module, kind: str) -> list[Stage]:
    """The model's ordered stages for confidence kind `kind` (modules are shared, not copied)."""
    n = len(model.blocks)
    return [Stage(model.blocks[k], model.exits[k], kind, k == n - 1) for k in range(n)]


def stage_io(stages: list[Stage], sample: torch.Tensor, input_name: str) -> list[StageIO]:
    """Name every stage's tensors; carried tensors of stage k are `s{k}_carry{i}`.

    The consumer's input names equal the producer's output names, so the runtime feeds
    stage k+1 with stage k's carry by name.
    """
    ios, inputs, carry = [], (input_name,), (sample,)
    with torch.inference_mode():
        for k, stage in enumerate(stages):
            out = stage(*carry)
            n_carry = len(out) - 3
            carry_names = tuple(f"s{k}_carry{i}" for i in range(n_carry))
            ios.append(StageIO(k, inputs, carry_names, f"s{k}_logits", f"s{k}_conf", f"s{k}_pred"))
            inputs, carry = carry_names, out[:n_carry]
    return ios


def carry_bytes(carry: tuple[torch.Tensor, ...]) -> int:
    """Bytes of the tensors one stage hands the next (what a device keeps between stages)."""
    return sum(t.numel() * t.element_size() for t in carry)


def per_stage(stages: list[Stage], x: torch.Tensor, measure: Callable[[int, Stage, tuple], T]) -> list[T]:
    """`measure(k, stage, carry)` for every stage, each fed the real carry of the stages before."""
    results, carry = [], (x,)
    for k, stage in enumerate(stages):
        results.append(measure(k, stage, carry))
        with torch.inference_mode():
            carry = tuple(stage(*carry)[:-3])
    return results


def run_stages(stages: list[Stage], x: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Chain the stages on `x`; returns each stage's (logits, conf, pred)."""
    results, carry = [], (x,)
    for stage in stages:
        out = stage(*carry)
        carry = out[:-3]
        results.append(tuple(out[-3:]))
    return results


def unread_inputs(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[int]:
    """Positions of the floating-point `inputs` that `module`'s outputs do not depend on: values
    the ONNX exporter would drop as unused graph inputs. Both must hold: autograd finds no path
    from the input to any output, and replacing the input by random values of two scales leaves
    every output bit for bit unchanged (a value read only through a comparison, an argmax, a
    detach or under no_grad has no gradient but is read)."""
    probe = tuple(t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs)
    floats = [i for i, t in enumerate(probe) if t.requires_grad]
    try:
        with torch.enable_grad():
            outputs = [t for t in as_tuple(module(*probe)) if t.is_floating_point() and t.requires_grad]
            grads = torch.autograd.grad(sum(t.sum() for t in outputs), [probe[i] for i in floats],
                                        allow_unused=True) if outputs else [None] * len(floats)
    except RuntimeError:
        return []
    candidates = [i for i, grad in zip(floats, grads) if grad is None]
    if not candidates:
        return []
    with torch.no_grad():
        reference = as_tuple(module(*inputs))
        unread = []
        for i in candidates:
            generator = torch.Generator(device=inputs[i].device).manual_seed(i)
            for scale in (1.0, 1e3):
                noise = torch.randn(inputs[i].shape, generator=generator, device=inputs[i].device,
                                    dtype=inputs[i].dtype) * scale
                changed = as_tuple(module(*inputs[:i], noise, *inputs[i + 1:]))
                if not all(torch.equal(a, b) for a, b in zip(reference, changed)):
                    break
            else:
                unread.append(i)
    return unread


def check_carries(stages: list[Stage], x: torch.Tensor) -> None:
    """Refuse, in one line naming the block and the value, carried values that ONNX cannot
    pass between stages: None or a non-tensor, one tensor returned twice (the exporter then
    has fewer outputs than names), and a tensor the next stage never reads (the exporter drops
    unused graph inputs, and the runtime's feed by name then fails)."""
    carry: tuple = (x,)
    for k, stage in enumerate(stages[:-1]):
        with torch.inference_mode():
            out = stage(*carry)[:-3]
        for i, value in enumerate(out):
            if not isinstance(value, torch.Tensor):
                raise SpecError(f"model: block {k} returns {type(value).__name__} as carried value {i}; a block returns "
                                "tensors only (leave out what the next block does not need)")
            twin = next((j for j in range(i) if out[j] is value), None)
            if twin is not None:
                raise SpecError(f"model: block {k} returns the same tensor as carried values {twin} and {i}; return it "
                                "once (ONNX cannot give one value two output names)")
        unread = unread_inputs(stages[k + 1], out)
        if unread:
            i = unread[0]
            raise SpecError(f"model: block {k + 1} never reads carried value {i} of block {k} (shape "
                            f"{tuple(out[i].shape[1:])}); the ONNX exporter drops an unused input, so block {k} "
                            "must not return it")
        carry = out


def check_staging(model: nn.Module, stages: list[Stage], x: torch.Tensor, atol: float = 1e-5) -> float:
    """Max abs difference between the chained stages' exit logits and the model's own forward.

    Raises when it exceeds `atol`: a stage split that changes the maths must not ship. Carried
    values ONNX cannot pass between stages are refused first (`check_carries`).
    """
    check_carries(stages, x)
    with torch.inference_mode():
        reference = model(x)
        staged = run_stages(stages, x)
    if len(reference) != len(staged):
        raise EdgeExitError(f"model: forward() returns {len(reference)} exits but the model has {len(staged)} stages")
    worst = max(float((ref - got[0]).abs().max()) for ref, got in zip(reference, staged))
    if worst > atol:
        raise EdgeExitError(f"model: chained stages differ from the model's forward by {worst:.3g} (> {atol:g}); check blocks/exits")
    return worst
