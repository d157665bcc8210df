"""The stage contract: staged == monolithic, several carried tensors, in-graph confidence."""

from __future__ import annotations

import pytest
import torch

from edgeexit.errors import EdgeExitError, SpecError
from edgeexit.models import build_model
from edgeexit.spec import load_spec
from edgeexit.staging import check_staging, confidence, make_stages, run_stages, stage_io
from conftest import EXAMPLE


def _model(spec_path):
    spec = load_spec(spec_path)
    torch.manual_seed(0)
    return spec, build_model(spec.model, spec.input, spec.base_dir).eval()


@pytest.mark.parametrize("kind", ["max_softmax", "margin", "entropy", "learned"])
def test_staged_equals_monolithic_single_carry(kind):
    spec, model = _model(EXAMPLE)
    x = torch.randn(16, *spec.input.shape)
    stages = make_stages(model, kind)
    assert check_staging(model, stages, x) <= 1e-5
    ios = stage_io(stages, x, "image")
    assert [len(io.carry) for io in ios] == [1, 1, 0]


def test_staged_equals_monolithic_two_scale_carry(twoscale_spec):
    spec, model = _model(twoscale_spec)
    x = torch.randn(5, *spec.input.shape)
    stages = make_stages(model, "max_softmax")
    ios = stage_io(stages, x, "image")
    assert [len(io.carry) for io in ios] == [2, 2, 0]
    assert ios[1].inputs == ios[0].carry  # consumer names = producer names
    with torch.inference_mode():
        reference = model(x)  # the hand-written forward, not the block/exit walk
        staged = run_stages(stages, x)
    for ref, (logits, conf, pred) in zip(reference, staged):
        assert float((ref - logits).abs().max()) <= 1e-5
        assert torch.equal(pred, ref.argmax(1))
        assert conf.shape == (5,)


def test_broken_split_is_caught(twoscale_spec):
    spec, model = _model(twoscale_spec)
    _, other = _model(twoscale_spec)  # same seed, same weights...
    with torch.no_grad():
        other.blocks[1].fine.weight.mul_(2)  # ...until one block differs
    with pytest.raises(EdgeExitError, match="chained stages differ"):
        check_staging(model, make_stages(other, "max_softmax"), torch.randn(3, *spec.input.shape))


def test_confidence_kinds_are_in_unit_interval_and_ordered():
    logits = torch.tensor([[5.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 1.9, -3.0]])
    for kind in ("max_softmax", "margin", "entropy"):
        c = confidence(kind, logits, None)
        assert torch.all((c >= 0) & (c <= 1 + 1e-6))
        assert c[0] > c[2] >= c[1] - 1e-6  # peaked > two-way tie > uniform
    assert float(confidence("margin", logits, None)[1]) == pytest.approx(0.0, abs=1e-6)
    assert float(confidence("entropy", logits, None)[1]) == pytest.approx(0.0, abs=1e-6)


def test_learned_confidence_needs_a_branch(twoscale_spec):
    spec, model = _model(twoscale_spec)
    with pytest.raises(SpecError, match="'learned' needs exits with a confidence branch"):
        run_stages(make_stages(model, "learned"), torch.randn(2, *spec.input.shape))
