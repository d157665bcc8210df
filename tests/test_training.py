"""Training options of the zoo: EENets' cost-aware losses, Deep Feature Surgery, resized data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgeexit.data import load_dataset, resize
from edgeexit.errors import EdgeExitError, SpecError
from edgeexit.models import build_model
from edgeexit.spec import load_spec
from edgeexit.staging import run_exits
from edgeexit.train import _eenets_loss, surgery_handoff, train
from conftest import example_raw, write_spec


def test_surgery_handoff_keeps_values_and_cuts_gradient_of_the_specific_share():
    t = torch.randn(3, 10, 4, 4, requires_grad=True)
    (out,) = surgery_handoff(0.3)((t,))
    assert torch.equal(out, t)
    out.sum().backward()
    assert torch.all(t.grad[:, :7] == 1) and torch.all(t.grad[:, 7:] == 0)  # 30% of 10 channels detached


def test_surgery_leaves_at_least_one_shared_channel():
    t = torch.randn(2, 2, 3, 3, requires_grad=True)
    (out,) = surgery_handoff(1.0)((t,))
    out.sum().backward()
    assert torch.all(t.grad[:, 0] == 1) and torch.all(t.grad[:, 1] == 0)


def test_surgery_blocks_deeper_exit_gradients_into_the_specific_channels(tmp_path):
    spec = load_spec(write_spec(tmp_path, example_raw()))
    torch.manual_seed(0)
    model = build_model(spec.model, spec.input, spec.base_dir)
    carry = {}

    def record(module, _inputs, output):
        output.retain_grad()
        carry["out"] = output

    model.blocks[0].register_forward_hook(record)
    logits, _ = run_exits(model, torch.randn(4, *spec.input.shape), surgery_handoff(0.5))
    F.cross_entropy(logits[-1], torch.arange(4)).backward()  # only the last exit's loss
    grad = carry["out"].grad.abs().flatten(2).sum(dim=(0, 2))
    half = grad.shape[0] // 2
    assert torch.all(grad[half:] == 0) and torch.all(grad[:half] > 0)


def test_eenets_losses_match_the_recursion_written_out():
    torch.manual_seed(0)
    logits = [torch.randn(5, 4) for _ in range(3)]
    conf = [torch.rand(5) for _ in range(3)]
    target = torch.tensor([0, 1, 2, 3, 0])
    costs, lam = [0.2, 0.6, 1.0], 0.3
    p = [torch.softmax(lg, 1) for lg in logits]
    mix2 = p[2]
    mix1 = conf[1][:, None] * p[1] + (1 - conf[1][:, None]) * mix2
    mix0 = conf[0][:, None] * p[0] + (1 - conf[0][:, None]) * mix1
    cost1 = conf[1] * 0.6 + (1 - conf[1]) * 1.0
    cost0 = conf[0] * 0.2 + (1 - conf[0]) * cost1

    def term(m, c):
        return F.nll_loss(m.log(), target) + lam * c.mean()

    v1 = _eenets_loss(logits, conf, target, costs, lam, every_exit=False)
    v2 = _eenets_loss(logits, conf, target, costs, lam, every_exit=True)
    assert float(v1) == pytest.approx(float(term(mix0, cost0)), rel=1e-6)
    assert float(v2) == pytest.approx(float(term(mix2, torch.ones(5)) + term(mix1, cost1) + term(mix0, cost0)), rel=1e-6)


def test_eenets_sum_trains_the_confidence_branches(tmp_path):
    raw = example_raw()
    raw["train"].update(loss="eenets_sum", epochs=2, feature_surgery=0.5)
    spec = load_spec(write_spec(tmp_path, raw))
    torch.manual_seed(0)
    model = build_model(spec.model, spec.input, spec.base_dir)
    before = model.exits[0].confidence.weight.detach().clone()
    result = train(model, spec, load_dataset(spec), costs=[0.2, 0.6, 1.0], progress=False)
    assert not torch.equal(before, model.exits[0].confidence.weight)
    assert len(result.epoch_seconds) == 2 and all(s > 0 for s in result.epoch_seconds)
    assert result.losses[1] < result.losses[0]


@pytest.mark.parametrize("loss", ["ce", "eenets"])
def test_nan_outputs_end_training_in_one_line_before_any_loss_sees_them(tmp_path, loss):
    """The reported case: lr 10 made the confidences NaN, and binary_cross_entropy raised a
    RuntimeError on them before the loss could be checked."""
    raw = example_raw()
    raw["train"].update(epochs=1, lr=10, loss=loss)
    spec = load_spec(write_spec(tmp_path, raw))
    torch.manual_seed(0)
    model = build_model(spec.model, spec.input, spec.base_dir)
    with torch.no_grad():
        model.exits[0].confidence.weight.fill_(float("nan"))  # what a diverged step leaves
    with pytest.raises(EdgeExitError, match=r"^train: the loss diverged at epoch 1, step 1 \(the exits' outputs are "
                                            r"NaN/Inf\); lower train.lr \(now 10\)"):
        train(model, spec, load_dataset(spec), costs=[0.2, 0.6, 1.0], progress=False)


def test_eenets_loss_needs_a_confidence_branch(twoscale_spec):
    spec = load_spec(twoscale_spec)
    model = build_model(spec.model, spec.input, spec.base_dir)
    logits, learned = run_exits(model, torch.randn(2, *spec.input.shape))
    with pytest.raises(SpecError, match="confidence branch"):
        _eenets_loss(logits, learned, torch.tensor([0, 1]), [0.5, 0.8, 1.0], 0.1, every_exit=False)


@pytest.mark.parametrize("value, message", [(0, "train.feature_surgery: 0 is out of range"),
                                            (1.5, "train.feature_surgery: 1.5 is out of range"),
                                            ("half", "train.feature_surgery: expected a number")])
def test_feature_surgery_is_validated(tmp_path, value, message):
    raw = example_raw()
    raw["train"]["feature_surgery"] = value
    with pytest.raises(SpecError, match=message):
        load_spec(write_spec(tmp_path, raw))


def test_resize_brings_digits_to_the_input_shape(tmp_path):
    raw = example_raw()
    raw["input"]["shape"] = [1, 32, 32]
    with pytest.raises(SpecError, match="set data.resize: true"):
        load_dataset(load_spec(write_spec(tmp_path, raw)))
    raw["data"]["resize"] = True
    data = load_dataset(load_spec(write_spec(tmp_path, raw)))
    assert data.train.x.shape[1:] == (1, 32, 32)
    small = resize(data.test.x, (8, 8))  # bilinear down again: close to the original scale of values
    assert small.shape[2:] == (8, 8) and 0 <= small.min() and small.max() <= 16.0 + 1e-4


def test_resize_must_be_a_boolean(tmp_path):
    raw = example_raw()
    raw["data"]["resize"] = "yes"
    with pytest.raises(SpecError, match="data.resize: expected true or false"):
        load_spec(write_spec(tmp_path, raw))
