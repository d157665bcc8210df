"""Per-stage ONNX export: dynamic batch, checker-clean, parity with torch on real inputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgeexit.data import load_dataset, normalize
from edgeexit.export.onnx import export_checked, export_stages
from edgeexit.models import build_model
from edgeexit.runtime.onnxruntime_backend import make_session
from edgeexit.spec import load_spec
from edgeexit.stage_io import StageIO
from edgeexit.staging import Monolithic, make_stages, stage_io
from conftest import EXAMPLE


def _real_batch(spec, n=48):
    data = load_dataset(spec)
    return torch.from_numpy(normalize(data.test.x[:n], spec.input.mean, spec.input.std))


@pytest.mark.filterwarnings("error::torch.jit.TracerWarning")  # entropy gating once leaked one into the build
@pytest.mark.parametrize("which", ["example", "twoscale"])
def test_stage_onnx_parity_and_dynamic_batch(tmp_path, twoscale_spec, which):
    spec = load_spec(EXAMPLE if which == "example" else twoscale_spec)
    torch.manual_seed(0)
    model = build_model(spec.model, spec.input, spec.base_dir).eval()
    x = _real_batch(spec)
    stages = make_stages(model, "entropy")
    ios = stage_io(stages, x, spec.input.name)
    graphs = export_stages(stages, ios, x, tmp_path, opset=17, atol=1e-4)
    assert len(graphs) == len(stages)
    carry = (x,)
    for g, stage, io in zip(graphs, stages, ios):
        assert g.parity <= 1e-4 and g.pred_agreement == 1.0
        model_proto = onnx.load(str(g.path))
        onnx.checker.check_model(model_proto, full_check=True)
        assert model_proto.opset_import[0].version == 17
        assert [i.name for i in model_proto.graph.input] == list(io.inputs)
        assert [o.name for o in model_proto.graph.output] == list(io.outputs)
        assert all(i.type.tensor_type.shape.dim[0].dim_param for i in model_proto.graph.input)
        session = make_session(g.path)
        for n in (1, 7):  # any batch size runs: the batch axis is dynamic
            feeds = {name: t[:n].numpy() for name, t in zip(io.inputs, carry)}
            got = session.run(list(io.outputs), feeds)
            with torch.inference_mode():
                want = stage(*(t[:n] for t in carry))
            for a, b in zip(got, want):
                assert a.shape == tuple(b.shape)
                np.testing.assert_allclose(a, b.numpy(), atol=1e-4)
        assert g.flops > 0 and g.params > 0
        with torch.inference_mode():
            carry = stage(*carry)[:len(io.carry)]


def test_monolithic_graph_matches_final_exit(tmp_path):
    spec = load_spec(EXAMPLE)
    torch.manual_seed(0)
    model = build_model(spec.model, spec.input, spec.base_dir).eval()
    x = _real_batch(spec)
    io = StageIO(0, ("image",), (), "logits", "conf", "pred")
    g = export_checked(Monolithic(model, "max_softmax"), (x,), tmp_path / "mono.onnx", io, 17, 1e-4)
    logits = make_session(g.path).run(["logits"], {"image": x.numpy()})[0]
    with torch.inference_mode():
        np.testing.assert_allclose(logits, model(x)[-1].numpy(), atol=1e-4)
    stage_flops = sum(s.flops for s in export_stages(make_stages(model, "max_softmax"),
                                                     stage_io(make_stages(model, "max_softmax"), x, "image"),
                                                     x, tmp_path / "st", 17, 1e-4))
    assert g.flops < stage_flops  # the monolithic graph skips the early exit heads


class _FFT(torch.nn.Module):  # aten::fft_rfft2 has no ONNX symbolic
    def forward(self, x):
        return torch.fft.rfft2(x).abs().mean(dim=(2, 3))


class _Noise(torch.nn.Module):  # exports, but its output is not torch's
    def forward(self, x):
        return x.mean(dim=(2, 3)) + torch.randn(x.shape[0], 3)


class _Unused(torch.nn.Module):  # reads one of its two inputs: the exporter drops the other
    def forward(self, a, b):
        return a.mean(dim=(2, 3)) * 2


@pytest.mark.parametrize("module, inputs, message", [
    (_FFT(), ("image",), "export: stage1: torch.onnx.export failed: operator aten::fft_rfft2 has no ONNX form at opset 17"),
    (_Noise(), ("image",), "export: stage1: tensor s1_logits differs from torch by up to"),
    (_Unused(), ("s0_carry0", "s0_carry1"), "export: stage1: input tensor s0_carry1 is not read by the graph"),
])
def test_an_export_failure_is_one_line_naming_the_stage_and_the_tensor(tmp_path, module, inputs, message):
    from edgeexit.errors import EdgeExitError

    x = torch.randn(2, 3, 8, 8)
    io = StageIO(1, inputs, (), "s1_logits", "s1_conf", "s1_pred")

    class Outputs(torch.nn.Module):  # logits, conf, pred as a stage returns them
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, *args):
            logits = self.inner(*args)
            return logits, logits.softmax(1).max(1).values, logits.argmax(1)

    with pytest.raises(EdgeExitError) as err:
        export_checked(Outputs(), (x,) * len(inputs), tmp_path / "stage1.onnx", io, 17, 1e-5)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), err.value
