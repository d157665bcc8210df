"""EMGNet: the shared-centre multi-scale conv, its deployed split, and the zoo contract."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from edgeexit.data import normalize
from edgeexit.errors import SpecError
from edgeexit.export.onnx import export_graph, export_stages
from edgeexit.models import build_model
from edgeexit.models.emgnet import EMGBlock, MultiScaleConv, emgnet
from edgeexit.spec import load_spec
from edgeexit.staging import check_staging, make_stages, stage_io
from conftest import ROOT

EXAMPLE = ROOT / "examples" / "emgnet" / "model.yaml"


def _conv(cin: int, cout: int, stride: int, five: torch.Tensor, seed: int = 0) -> MultiScaleConv:
    """A MultiScaleConv with the given hard gates and non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    m = MultiScaleConv(cin, cout, stride)
    with torch.no_grad():
        m.gate.copy_(torch.where(five, 1.0, -1.0))
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.5, 0.5)
    return m


def _train_form(module: torch.nn.Module, *args) -> torch.Tensor:
    """`module`'s training-mode function (masked 5x5 convs), batch norm on running statistics."""
    module.train()
    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.eval()
    with torch.no_grad():
        out = module(*args)
    module.eval()
    return out


GATES = {
    "mixed": lambda n: torch.rand(n, generator=torch.Generator().manual_seed(1)) > 0.5,
    "all-3x3": lambda n: torch.zeros(n, dtype=torch.bool),
    "all-5x5": lambda n: torch.ones(n, dtype=torch.bool),
}


def test_centre_of_the_5x5_kernel_is_the_3x3_kernel():
    m = _conv(4, 6, 1, torch.zeros(6, dtype=torch.bool))
    x = torch.randn(2, 4, 7, 7)
    ring_zeroed = m.weight * (1 - m.ring)
    with torch.no_grad():
        via_ring = F.conv2d(x, ring_zeroed, None, 1, 2)
        via_centre = F.conv2d(x, m.weight[:, :, 1:4, 1:4], None, 1, 1)
        via_mask = F.conv2d(x, m.masked_weight(), None, 1, 2)  # every gate closed
    assert torch.equal(ring_zeroed[:, :, 1:4, 1:4], m.weight[:, :, 1:4, 1:4])
    assert float((via_ring - via_centre).abs().max()) <= 1e-5
    assert float((via_mask - via_centre).abs().max()) <= 1e-5


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("gates", list(GATES))
def test_deployed_split_equals_training_function(gates, stride):
    m = _conv(5, 12, stride, GATES[gates](12))
    x = torch.randn(3, 5, 9, 9)
    want = _train_form(m, x)
    with torch.no_grad():
        got = m(x)
        y, order = m.grouped(x)
    assert float((got - want).abs().max()) <= 1e-5
    five = m.five()
    assert order == torch.cat([(~five).nonzero(), five.nonzero()]).flatten().tolist()
    assert float((y - want[:, order]).abs().max()) <= 1e-5


@pytest.mark.parametrize("gates", list(GATES))
def test_block_folds_conv1_grouping_into_conv2(gates):
    torch.manual_seed(0)
    block = EMGBlock(6, 10, 2, ring_price=0.0)
    for i, conv in enumerate((block.conv1, block.conv2)):
        fresh = _conv(conv.weight.shape[1], 10, conv.stride, GATES[gates](10), seed=i)
        conv.load_state_dict(fresh.state_dict())
    x = torch.randn(3, 6, 8, 8)
    want = _train_form(block, x)
    with torch.no_grad():
        got = block(x)
    assert float((got - want).abs().max()) <= 1e-5


def test_gradients_reach_weights_and_gates():
    m = _conv(3, 8, 1, GATES["mixed"](8))
    m.train()
    m(torch.randn(4, 3, 6, 6)).pow(2).mean().backward()
    five = m.five()
    assert m.weight.grad is not None and m.gate.grad is not None
    assert bool((m.gate.grad != 0).all())
    ring_grad = (m.weight.grad * m.ring).abs().sum(dim=(1, 2, 3))
    assert bool((ring_grad[five] > 0).all())  # open rings learn...
    assert bool((ring_grad[~five] == 0).all())  # ...closed ones are not part of the function
    assert bool((m.weight.grad[:, :, 1:4, 1:4] != 0).flatten(1).any(dim=1).all())


def test_ring_price_pushes_gates_towards_3x3():
    free, priced = (MultiScaleConv(3, 8, ring_price=p) for p in (0.0, 8.0))
    priced.load_state_dict(free.state_dict())
    x = torch.randn(2, 3, 6, 6)
    for m in (free, priced):
        m.train()
        m(x).sum().mul(0).backward()  # no task gradient: only the price remains
    assert bool((free.gate.grad == 0).all())
    soft = torch.sigmoid(priced.gate.detach())
    assert torch.allclose(priced.gate.grad, soft * (1 - soft))  # d/dgate of 8/8 * sigmoid(gate)


def _example_model():
    spec = load_spec(EXAMPLE)
    torch.manual_seed(0)
    model = build_model(spec.model, spec.input, spec.base_dir)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MultiScaleConv):  # untrained gates would all open; mix them
                m.gate.copy_(torch.randn(m.gate.shape, generator=torch.Generator().manual_seed(m.gate.numel())))
    return spec, model.eval()


def test_gate_report_and_registry():
    spec, model = _example_model()
    report = model.gate_report()
    assert len(report) == 1 + 2 * sum(spec.model.args["depths"])
    assert all(0.0 <= v <= 1.0 for v in report.values())
    assert 0.0 < sum(report.values()) / len(report) < 1.0
    with pytest.raises(ValueError, match="strides must each be 1 or 2"):
        emgnet(1, 10, strides=(1, 3, 1))
    with pytest.raises(ValueError, match="same length"):
        emgnet(1, 10, widths=(8, 16), depths=(1, 1, 1))
    bad = spec.model.__class__(arch="emgnet", factory=None, args={"widths": [8, 16], "depths": [1]})
    with pytest.raises(SpecError, match="emgnet rejected its arguments"):
        build_model(bad, spec.input, spec.base_dir)


@pytest.mark.parametrize("kind", ["max_softmax", "learned"])
def test_staged_equals_monolithic(kind):
    spec, model = _example_model()
    x = torch.randn(16, *spec.input.shape)
    assert check_staging(model, make_stages(model, kind), x) <= 1e-5


def test_onnx_parity_on_digits(tmp_path, digits_raw):
    spec, model = _example_model()
    x = torch.from_numpy(normalize(digits_raw[0][:64], spec.input.mean, spec.input.std))
    stages = make_stages(model, "learned")
    ios = stage_io(stages, x, spec.input.name)
    graphs = export_stages(stages, ios, x, tmp_path, opset=17, atol=1e-4)
    assert all(g.parity <= 1e-4 and g.pred_agreement == 1.0 for g in graphs)


def test_exported_layer_has_one_conv_per_channel_group(tmp_path):
    five = GATES["mixed"](16)
    m = _conv(8, 16, 1, five).eval()
    path = tmp_path / "layer.onnx"
    export_graph(m, (torch.randn(2, 8, 10, 10),), path, ("x",), ("y",), 17)
    graph = onnx.load(str(path)).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    kernels = sorted(weights[n.input[1]].shape for n in graph.node if n.op_type == "Conv")
    n5 = int(five.sum())
    assert kernels == sorted([(16 - n5, 8, 3, 3), (n5, 8, 5, 5)])
    assert [n.op_type for n in graph.node].count("Gather") == 1  # the constant channel restore


def test_eval_forward_reads_the_gates_once_until_they_change(monkeypatch):
    """The deployed form's gate list is kept between eval calls (no device-to-host copy per
    call, so a CUDA graph can capture it) and follows any change of the gate."""
    torch.manual_seed(0)
    conv = MultiScaleConv(4, 6).eval()
    with torch.no_grad():
        conv.gate.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0]))
    calls = []
    five = MultiScaleConv.five
    monkeypatch.setattr(MultiScaleConv, "five", lambda self: (calls.append(1), five(self))[1])
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        first = conv(x)
        assert torch.equal(conv(x), first) and len(calls) == 1
        conv.gate.fill_(-1.0)  # an in-place change (an optimiser step, load_state_dict) bumps the version
        assert conv.gate_list() == [False] * 6 and len(calls) == 2
        assert not torch.allclose(conv(x), first)
