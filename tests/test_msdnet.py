"""MSDNet in the zoo: stage split, shrinking multi-scale carry, ONNX parity, argument checks."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F

import edgeexit.models.msdnet  # noqa: F401  (registers the architecture)
from edgeexit.errors import SpecError
from edgeexit.export.onnx import export_stages
from edgeexit.models import ARCHITECTURES, build_model
from edgeexit.spec import load_spec
from edgeexit.staging import check_staging, make_stages, stage_io
from conftest import ROOT

SMALL = dict(blocks=3, stepmode="even", step=1, base=1, channels=4, growth=4, head_width=8)


def _small(**overrides):
    torch.manual_seed(0)
    return ARCHITECTURES["msdnet"](in_channels=1, num_classes=10, **{**SMALL, **overrides}).eval()


def _digits_32(digits_raw, n=24):
    x, _ = digits_raw
    x = F.interpolate(torch.from_numpy(x[:n]), size=(32, 32), mode="bilinear", align_corners=False)
    return (x - 4.88) / 6.02


def test_staged_equals_monolithic_and_carry_shrinks_with_pruning():
    model = _small()
    x = torch.randn(4, 1, 32, 32)
    stages = make_stages(model, "max_softmax")
    assert check_staging(model, stages, x) <= 1e-5
    ios = stage_io(stages, x, "image")
    # 3 layers over 3 scales: layer 2 drops scale 0, layer 3 drops scale 1.
    assert [len(io.inputs) for io in ios] == [1, 3, 2]
    assert [len(io.carry) for io in ios] == [3, 2, 0]
    assert ios[1].inputs == ios[0].carry and ios[2].inputs == ios[1].carry


def test_lin_grow_and_transitions_follow_the_paper():
    model = ARCHITECTURES["msdnet"](in_channels=3, num_classes=10, blocks=10, stepmode="even", step=2, base=4)
    # The reference CIFAR-10 MSDNet (10 blocks, even, step 2, base 4): exit input widths and size.
    assert [e.features[0][0].in_channels for e in model.exits] == [160, 208, 256, 164, 212, 260, 308, 188, 236, 284]
    assert sum(p.numel() for p in model.parameters()) == 4839544
    lin = ARCHITECTURES["msdnet"](in_channels=3, num_classes=10, blocks=4, stepmode="lin_grow", step=1, base=1)
    layers = [sum(type(m).__name__ == "MSDLayer" for m in b.layers) for b in lin.blocks]
    assert layers == [1, 2, 3, 4]


def test_stage_onnx_parity_on_real_digits(tmp_path, digits_raw):
    model = _small()
    x = _digits_32(digits_raw)
    stages = make_stages(model, "max_softmax")
    graphs = export_stages(stages, stage_io(stages, x, "image"), x, tmp_path, opset=17, atol=1e-4)
    assert len(graphs) == 3
    for g in graphs:
        assert g.parity <= 1e-4 and g.pred_agreement == 1.0
        ops = {n.op_type for n in onnx.load(str(g.path)).graph.node}
        assert ops <= {"Conv", "Relu", "Concat", "GlobalAveragePool", "Flatten", "Gemm",
                       "Softmax", "ReduceMax", "ArgMax"}, ops


def test_example_spec_builds(digits_raw):
    spec = load_spec(ROOT / "examples" / "msdnet" / "model.yaml")
    assert spec.data.resize and spec.input.shape == (1, 32, 32)
    model = build_model(spec.model, spec.input, spec.base_dir)
    x = _digits_32(digits_raw, n=2)
    ios = stage_io(make_stages(model, spec.gating.confidence), x, spec.input.name)
    assert len(ios) == len(spec.gating.thresholds) == 4
    assert [len(io.carry) for io in ios] == [3, 2, 2, 0]


@pytest.mark.parametrize("bad, name", [
    ({"stepmode": "cubic"}, "stepmode"),
    ({"scales": 0}, "scales"),
    ({"blocks": 0}, "blocks"),
    ({"growth": 2.5}, "growth"),
    ({"growth": 3, "gr_factor": [1, 3, 6]}, "growth"),  # 9 new channels cannot split in two halves
    ({"reduction": 1.5}, "reduction"),
    ({"bottleneck": "yes"}, "bottleneck"),
    ({"gr_factor": [1, 2]}, "gr_factor"),
    ({"bn_factor": [1, 0, 4]}, "bn_factor"),
])
def test_bad_arguments_name_the_argument(bad, name):
    with pytest.raises(ValueError, match=name):
        ARCHITECTURES["msdnet"](in_channels=1, num_classes=10, **{**SMALL, **bad})


def test_bad_argument_in_a_spec_is_a_spec_error(tmp_path):
    spec = load_spec(ROOT / "examples" / "msdnet" / "model.yaml")
    bad = type(spec.model)(arch="msdnet", factory=None, args={"stepmode": "cubic"})
    with pytest.raises(SpecError, match="msdnet rejected its arguments: stepmode must be one of even, lin_grow"):
        build_model(bad, spec.input, tmp_path)

