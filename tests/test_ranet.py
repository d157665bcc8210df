"""RANet: staged == monolithic, the designed carry, ONNX parity, real fusion, argument checks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from edgeexit.errors import SpecError
from edgeexit.export.onnx import export_stages
from edgeexit.models import build_model
from edgeexit.models.ranet import ranet  # importing it registers "ranet"
from edgeexit.spec import load_spec
from edgeexit.staging import check_staging, make_stages, stage_io
from conftest import ROOT

RANET_EXAMPLE = ROOT / "examples" / "ranet" / "model.yaml"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: on a shared CPU, intra-op threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(**args) -> torch.nn.Module:
    """An untrained RANet whose BatchNorm statistics come from data, so eval mode keeps the
    signal alive through the deep dense stacks (default statistics let it fade to ~1e-5)."""
    torch.manual_seed(0)
    model = ranet(1, 10, **args)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # running statistics = plain average over the batches below
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, 1, 32, 32))
    return model.eval()


@pytest.fixture(scope="module")
def digits32(digits_raw) -> torch.Tensor:
    """48 real digits, upsampled bilinearly to 32x32 and normalised like the example."""
    x = torch.from_numpy(digits_raw[0][:48])
    return (F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False) - 4.88) / 6.02


@pytest.mark.parametrize("args, carries", [
    ({}, [2, 3, 4, 5, 1, 0]),  # 3 scales x 2 exits: (image, block outputs so far), then the finest's features
    ({"scales": 2, "exits_per_scale": 1}, [2, 0]),
    ({"scales": 1}, [1, 0]),
    ({"scales": 3, "exits_per_scale": 1, "layers": 1}, [2, 3, 0]),
])
def test_staged_equals_monolithic_with_designed_carry(args, carries):
    model = _model(**args)
    x = torch.randn(3, 1, 32, 32)
    stages = make_stages(model, "max_softmax")
    assert check_staging(model, stages, x) <= 1e-5  # carry tuples vs the hand-written feature-list walk
    ios = stage_io(stages, x, "image")
    assert [len(io.carry) for io in ios] == carries
    assert all(ios[k + 1].inputs == ios[k].carry for k in range(len(ios) - 1))


def test_carry_shapes_follow_the_resolutions():
    stages = make_stages(_model(), "max_softmax")
    carry, shapes = (torch.randn(2, 1, 32, 32),), []
    with torch.inference_mode():
        for stage in stages[:-1]:
            carry = stage(*carry)[:-3]
            shapes.append([tuple(t.shape[2:]) for t in carry])
    image, g8, g16 = (32, 32), (8, 8), (16, 16)
    assert shapes == [
        [image, g8], [image, g8, g8],  # 8x8 sub-network: its two block outputs
        [image, g16, g8, g8], [image, g16, g8, g8, g8],  # 16x16 sub-network: drops to 8x8 after fusing
        [g8],  # 32x32 sub-network: only its running features, already down to the exits' 8x8
    ]


def _chain(stages, carry: tuple) -> list[torch.Tensor]:
    """Exit logits of `stages` run one after the other from `carry` (any stage's input)."""
    logits = []
    for stage in stages:
        out = stage(*carry)
        carry = out[:-3]
        logits.append(out[-3])
    return logits


def test_every_carried_tensor_reaches_a_later_exit():
    """Nothing is carried in vain: perturbing any carried tensor changes some later exit's logits."""
    stages = make_stages(_model(), "max_softmax")
    carry = (torch.randn(4, 1, 32, 32),)
    with torch.inference_mode():
        for k in range(len(stages) - 1):
            carry = tuple(stages[k](*carry)[:-3])
            reference = _chain(stages[k + 1:], carry)
            for i in range(len(carry)):
                bumped = tuple(t + 0.5 if j == i else t for j, t in enumerate(carry))
                change = max(float((a - b).abs().max()) for a, b in zip(_chain(stages[k + 1:], bumped), reference))
                assert change > 1e-4, f"stage {k} carries tensor {i} but no later exit uses it"


def test_later_sub_networks_fuse_the_coarser_features():
    """The 32x32 sub-network's first exit (stage 4) reads every 16x16 block output it is handed."""
    stages = make_stages(_model(), "max_softmax")
    carry = (torch.randn(4, 1, 32, 32),)
    with torch.inference_mode():
        for stage in stages[:4]:
            carry = tuple(stage(*carry)[:-3])
        base = stages[4](*carry)[-3]
        for i in range(1, len(carry)):  # carry[0] is the image, the rest are the features it fuses
            zeroed = tuple(torch.zeros_like(t) if j == i else t for j, t in enumerate(carry))
            assert float((stages[4](*zeroed)[-3] - base).abs().max()) > 1e-4, f"fused feature {i} is ignored"


def test_onnx_parity_on_real_digits(tmp_path: Path, digits32):
    model = _model()
    stages = make_stages(model, "max_softmax")
    ios = stage_io(stages, digits32, "image")
    graphs = export_stages(stages, ios, digits32, tmp_path, opset=17, atol=1e-4)
    assert len(graphs) == 6
    assert max(g.parity for g in graphs) <= 1e-4
    assert all(g.pred_agreement == 1.0 for g in graphs)
    assert graphs[0].flops < graphs[4].flops  # the coarse stage is the cheap one


def test_every_parameter_gets_a_gradient():
    model = _model().train()
    loss = sum(F.cross_entropy(lg, torch.arange(4)) for lg in model(torch.randn(4, 1, 32, 32)))
    loss.backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not unused


@pytest.mark.parametrize("arg, value", [
    ("scales", 0), ("channels", -1), ("growth", 1.5), ("layers", True), ("exits_per_scale", 0),
    ("head_channels", "32"), ("compress", 0), ("compress", 1.5), ("reduction", -0.5), ("reduction", "half"),
])
def test_bad_arguments_name_the_argument(arg, value):
    with pytest.raises(ValueError, match=rf"^{arg} must be"):
        ranet(1, 10, **{arg: value})


def test_bad_argument_in_a_spec_is_one_spec_error():
    spec = load_spec(RANET_EXAMPLE)
    bad = replace(spec.model, args={**spec.model.args, "growth": 0})
    with pytest.raises(SpecError, match="ranet rejected its arguments: growth must be an integer >= 1"):
        build_model(bad, spec.input, spec.base_dir)


def test_example_spec_builds_six_exits():
    spec = load_spec(RANET_EXAMPLE)
    assert spec.input.shape == (1, 32, 32) and spec.data.resize
    model = build_model(spec.model, spec.input, spec.base_dir)
    with torch.inference_mode():
        logits = model(torch.zeros(2, *spec.input.shape))
    assert len(model.blocks) == len(logits) == 6
    assert all(lg.shape == (2, 10) for lg in logits)
