"""Multi-exit training: summed per-exit cross-entropy, or the EENets cost-aware loss.

`ce`: unweighted sum of every exit's cross-entropy (the MSDNet/RANet recipe); exits with a
confidence branch also learn to predict whether their own answer is right (binary
cross-entropy against correctness), so `gating.confidence: learned` has a trained head.
`eenets`: the recursive cost-aware loss of EENets, walking from the last exit back:
`cum_pred = c_k p_k + (1 - c_k) cum_pred`, `cum_cost = c_k cost_k + (1 - c_k) cum_cost`,
`loss = NLL(cum_pred) + lambda * mean(cum_cost)`, cost_k being exit k's share of the
full network's FLOPs (EENets' loss v1).
`eenets_sum`: the same recursion with the loss summed over every exit's partial mixture
(`sum_k NLL(cum_pred_k) + lambda * mean(cum_cost_k)`, EENets' v2), so every exit's
confidence gets a direct training signal rather than only through exit 0's mixture.

`train.feature_surgery: beta` (Deep Feature Surgery, Gong et al. 2024) splits the
channels of every carried tensor at each exit: the last `beta` share is exit-specific and
is handed to the deeper blocks detached, `cat([shared, specific.detach()])`, while the
exit itself sees all of it. Gradients of deeper exits then reach only the shared part.
The forward values are unchanged, so staging and export do not see the difference.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from edgeexit.data import Dataset, normalize
from edgeexit.errors import EdgeExitError, SpecError
from edgeexit.spec import Spec
from edgeexit.staging import run_exits


@dataclass(frozen=True)
class TrainResult:
    val_accuracy: list[float]  # per exit, after the last epoch
    losses: list[float]  # mean training loss per epoch
    epoch_seconds: list[float]  # wall time of each epoch's optimisation steps


def seed_everything(seed: int) -> None:
    """Same seed, same weights: python, numpy and torch generators all start from `seed`."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def exit_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 512) -> list[float]:
    """Top-1 accuracy of every exit on normalised inputs `x` (model in eval mode)."""
    model.eval()
    correct = None
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            logits, _ = run_exits(model, torch.from_numpy(x[i:i + batch]))
            hits = [int((lg.argmax(1).numpy() == y[i:i + batch]).sum()) for lg in logits]
            correct = hits if correct is None else [a + b for a, b in zip(correct, hits)]
    return [c / len(x) for c in correct]


def _ce_loss(logits, learned, target) -> torch.Tensor:
    loss = sum(F.cross_entropy(lg, target) for lg in logits)
    for lg, conf in zip(logits, learned):
        if conf is not None:
            right = (lg.argmax(1) == target).float()
            loss = loss + F.binary_cross_entropy(conf.clamp(1e-6, 1 - 1e-6), right)
    return loss


def _eenets_loss(logits, learned, target, costs: list[float], lam: float, every_exit: bool) -> torch.Tensor:
    if any(c is None for c in learned[:-1]):
        raise SpecError("train.loss: the EENets losses need exits with a confidence branch (e.g. model.arch: eenet_resnet)")

    def term(pred, cost):
        return F.nll_loss(torch.log(pred.clamp_min(1e-8)), target) + lam * cost.mean()

    cum_pred = torch.softmax(logits[-1], 1)
    cum_cost = torch.full((len(target),), costs[-1], dtype=cum_pred.dtype)
    total = term(cum_pred, cum_cost) if every_exit else 0.0
    for k in range(len(logits) - 2, -1, -1):
        c = learned[k]
        cum_pred = c.unsqueeze(1) * torch.softmax(logits[k], 1) + (1 - c.unsqueeze(1)) * cum_pred
        cum_cost = c * costs[k] + (1 - c) * cum_cost
        if every_exit:
            total = total + term(cum_pred, cum_cost)
    return total if every_exit else term(cum_pred, cum_cost)


def surgery_handoff(beta: float) -> Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]:
    """Deep Feature Surgery's hand-off: the last `beta` share of each carried tensor's
    channels reaches deeper blocks detached (at least one channel stays shared)."""

    def handoff(carry: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        out = []
        for t in carry:
            channels = t.shape[1]
            shared = min(channels - 1, max(1, round(channels * (1.0 - beta)))) if channels > 1 else channels
            out.append(t if shared == channels else torch.cat([t[:, :shared], t[:, shared:].detach()], dim=1))
        return tuple(out)

    return handoff


def _distill_loss(logits, temperature: float) -> torch.Tensor:
    """Self-distillation: every earlier exit learns the final exit's softened distribution (the
    teacher is not trained by it), scaled by T^2 as in Hinton et al."""
    teacher = F.softmax(logits[-1].detach() / temperature, dim=1)
    return sum(F.kl_div(F.log_softmax(lg / temperature, dim=1), teacher, reduction="batchmean")
               for lg in logits[:-1]) * temperature ** 2


def _frozen_backbone(model: nn.Module) -> list[nn.Parameter]:
    """Freeze `model.backbone` (train.freeze_backbone) and return the parameters left to train:
    the exit heads'. The backbone's batch norms keep their statistics (see `train`)."""
    frozen = {id(p) for p in model.backbone.parameters()}
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    return [p for p in model.parameters() if id(p) not in frozen]


def _all_finite(logits, learned) -> bool:
    """Whether every exit's logits and learned confidence (None: no branch) are finite."""
    return all(bool(torch.isfinite(t).all()) for t in (*logits, *learned) if t is not None)


def _diverged(where: str, what: str, lr: float) -> EdgeExitError:
    return EdgeExitError(f"train: the loss diverged at {where} ({what}); lower train.lr (now {lr:g}) or check the data")


def train(model: nn.Module, spec: Spec, data: Dataset, costs: list[float] | None = None,
          progress: bool = True) -> TrainResult:
    """Train `model` in place on the spec's train split; SGD with cosine decay, fixed seed.

    `costs` (cumulative FLOPs share per exit, last = 1) is needed by the `eenets` loss.
    """
    cfg = spec.train
    seed_everything(cfg.seed)
    x = torch.from_numpy(normalize(data.train.x, spec.input.mean, spec.input.std))
    y = torch.from_numpy(data.train.y)
    params = _frozen_backbone(model) if cfg.freeze_backbone else list(model.parameters())
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    steps = cfg.epochs * ((len(x) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    handoff = None if cfg.feature_surgery is None else surgery_handoff(cfg.feature_surgery)
    losses, seconds = [], []
    bar = tqdm(range(cfg.epochs), desc=f"train {spec.name}", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        if cfg.freeze_backbone:
            model.backbone.eval()  # its batch norms (shared with the blocks) keep the checkpoint's statistics
        total, order = 0.0, torch.randperm(len(x), generator=gen)
        start = time.perf_counter()
        for i in range(0, len(x), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            logits, learned = run_exits(model, x[idx], handoff)
            where = f"epoch {epoch + 1}, step {i // cfg.batch_size + 1}"
            if not _all_finite(logits, learned):  # before the losses: binary_cross_entropy raises on NaN
                bar.close()
                raise _diverged(where, "the exits' outputs are NaN/Inf", cfg.lr)
            if cfg.loss in ("eenets", "eenets_sum"):
                loss = _eenets_loss(logits, learned, y[idx], costs, cfg.cost_lambda, cfg.loss == "eenets_sum")
            else:
                loss = _ce_loss(logits, learned, y[idx])
            if cfg.distill is not None:
                loss = loss + cfg.distill[1] * _distill_loss(logits, cfg.distill[0])
            if not torch.isfinite(loss):
                bar.close()
                raise _diverged(where, f"loss {float(loss.detach())}", cfg.lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        seconds.append(time.perf_counter() - start)
        losses.append(total / len(x))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise EdgeExitError(f"train: the weights diverged to NaN/Inf; lower train.lr (now {cfg.lr:g})")
    val = exit_accuracy(model, normalize(data.val.x, spec.input.mean, spec.input.std), data.val.y)
    return TrainResult(val_accuracy=val, losses=losses, epoch_seconds=seconds)
