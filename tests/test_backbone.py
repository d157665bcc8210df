"""Exits on any backbone (edgeexit.backbone): the automatic cut into stages.

Staged == the untouched backbone (the model's forward runs the original network, the stages
run the split graph), carries found from the graph (a skip connection across a cut, a list of
scales passed between blocks), and one-line refusals for cuts that cannot be made.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from edgeexit.backbone import ExitHead, attach_exits, import_torchvision
from edgeexit.errors import SpecError
from edgeexit.staging import carry_bytes, check_staging, make_stages, per_stage
from skipnet import Across, MultiScale, SideBranch, SizeAcross, Twice, multiscale, skipnet

X = torch.randn(4, 1, 8, 8)


def _carries(model, x) -> list[list[tuple[int, ...]]]:
    shapes, carry = [], (x,)
    with torch.no_grad():
        for block in model.blocks:
            carry = tuple(block(*carry))
            shapes.append([tuple(t.shape[1:]) for t in carry])
    return shapes


@pytest.mark.parametrize("head", ["pool-linear", "conv-pool-linear"])
def test_a_skip_connection_across_a_cut_is_carried_and_the_stages_equal_the_backbone(head):
    torch.manual_seed(0)
    model = attach_exits(skipnet(width=16), ["block_a", "block_b"], ExitHead(head, 32), X, 10, "skipnet").eval()
    assert _carries(model, X) == [[(16, 8, 8)], [(16, 8, 8), (16, 8, 8)], [(10,)]]  # `a` crosses the second cut
    assert check_staging(model, make_stages(model, "max_softmax"), X) <= 1e-5
    handed = per_stage(make_stages(model, "max_softmax"), X[:1], lambda _k, _stage, carry: carry_bytes(carry))
    assert handed[1:] == [16 * 64 * 4, 2 * 16 * 64 * 4]  # what the build summary reports per stage
    assert len(model(X)) == 3 and model(X)[-1].shape == (4, 10)


def test_lists_of_scales_are_carried_element_by_element():
    """MSDNet's reference style: blocks take and return a list, one tensor per scale; block3 iterates
    over its list, which fx cannot trace through, so it is kept whole."""
    torch.manual_seed(0)
    model = attach_exits(multiscale(width=8), ["block1", "block2"], ExitHead("conv-pool-linear", 16), X, 10,
                         "multiscale").eval()
    assert _carries(model, X) == [[(16, 4, 4), (8, 8, 8)]] * 2 + [[(10,)]]  # the exit reads the coarsest scale
    assert check_staging(model, make_stages(model, "max_softmax"), X) <= 1e-5
    assert isinstance(model.backbone, MultiScale)


def test_a_network_with_its_own_classifiers_keeps_them_as_its_exits(tmp_path):
    """MSDNet's official style (tests/skipnet.OwnExits): forward returns every classifier's
    logits. Cut after blocks.0 and blocks.1, each classifier runs in its block's stage (not in
    the next one), the stages carry each scale once (the classifier and the next block take the
    coarsest out separately), exit_head is not used, and every stage exports with parity."""
    from edgeexit.backbone import OwnExit
    from edgeexit.export.onnx import export_stages
    from edgeexit.staging import stage_io
    from skipnet import own_exits

    torch.manual_seed(0)
    net = own_exits(width=8)
    model = attach_exits(net, ["blocks.0", "blocks.1"], ExitHead("conv-pool-linear", 99), X, 10, "own").eval()
    assert [type(e) for e in model.exits[:2]] == [OwnExit, OwnExit] and model.own_exits
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(X), net(X)))
    assert _carries(model, X) == [[(16, 4, 4), (8, 8, 8)]] * 2 + [[(10,)]]
    stages = make_stages(model, "max_softmax")
    assert check_staging(model, stages, X) == 0.0
    own_params = {id(p) for p in net.classifier.parameters()}
    assert own_params <= {id(p) for e in model.exits[:2] for p in e.parameters()} | {id(p) for p in model.blocks[-1].parameters()}
    graphs = export_stages(stages, stage_io(stages, X, "image"), X, tmp_path, 17, 1e-4)
    assert max(g.parity for g in graphs) <= 1e-4
    with pytest.raises(SpecError, match=re.escape("own's forward() returns 3 exits (its own classifiers); name 2 layers")):
        attach_exits(own_exits(width=8), ["blocks.0"], ExitHead(), X, 10, "own")


def test_the_batch_size_and_functions_of_parameters_are_recomputed_not_carried():
    """`x.size(0)` before a cut (any carried tensor gives it again) and a gate computed from a
    parameter before it (never carried: it has no batch axis, and the cascade splits batches)."""
    for net in (SizeAcross(), Across()):
        model = attach_exits(net, ["a"], ExitHead(), X, 10, type(net).__name__).eval()
        assert [len(c) for c in _carries(model, X)] == [1, 1]
        stages = make_stages(model, "max_softmax")
        assert check_staging(model, stages, X) <= 1e-5 and check_staging(model, stages, X[:1]) <= 1e-5


def test_torch_export_captures_what_fx_cannot_trace(tmp_path):
    """forward branches on the input's size: fx refuses, torch.export resolves it for input.shape
    (with any batch); the cut after `a` then still carries the skip connection, and the stages
    export with parity at a batch other than the one traced."""
    from edgeexit.export.onnx import export_stages
    from edgeexit.staging import stage_io
    from skipnet import BatchBranch, ShapeBranch, ValueBranch

    torch.manual_seed(0)
    big = torch.randn(4, 1, 32, 32)
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(ShapeBranch())
    model = attach_exits(ShapeBranch(), ["a", "b"], ExitHead(), big[:2], 10, "shapebranch").eval()
    assert "captured by torch.export (fx cannot trace it); its layers run in inference form" in model.cut_note
    assert _carries(model, big) == [[(8, 16, 16)], [(8, 16, 16), (8, 16, 16)], [(10,)]]
    stages = make_stages(model, "max_softmax")
    assert check_staging(model, stages, big) <= 1e-5 and check_staging(model, stages, big[:1]) <= 1e-5
    graphs = export_stages(stages, stage_io(stages, big, "image"), big, tmp_path, 17, 1e-4)
    assert max(g.parity for g in graphs) <= 1e-4
    with pytest.raises(SpecError, match="differs from batchbranch on a batch of 1 .forward branches on the batch"):
        attach_exits(BatchBranch(), ["a"], ExitHead(), big[:2], 10, "batchbranch")
    with pytest.raises(SpecError) as err:
        attach_exits(ValueBranch(), ["a"], ExitHead(), X, 10, "valuebranch")
    assert "torch.fx cannot trace valuebranch" in str(err.value) and "torch.export fails too" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_scale_computed_only_to_be_dropped_is_not_carried():
    """Without mixing, nothing the network returns depends on the fine scale, but fx sees only
    that the blocks (kept whole) take it in. Probing finds it unread: no cut carries it (the
    blocks are fed zeros in its place), and the ONNX exporter's dropped input cannot break a feed."""
    torch.manual_seed(0)
    model = attach_exits(multiscale(width=8, mix=False), ["block1", "block2"], ExitHead(), X, 10, "multiscale").eval()
    assert _carries(model, X) == [[(16, 4, 4)], [(16, 4, 4)], [(10,)]]
    assert check_staging(model, make_stages(model, "max_softmax"), X) <= 1e-5


@pytest.mark.parametrize("mix, inputs", [(True, [("image",), ("s0_carry0", "s0_carry1"), ("s1_carry0", "s1_carry1")]),
                                         (False, [("image",), ("s0_carry0",), ("s1_carry0",)])])
def test_every_stage_of_a_list_passing_backbone_exports_with_parity(tmp_path, mix, inputs):
    from edgeexit.export.onnx import export_stages
    from edgeexit.staging import stage_io

    torch.manual_seed(0)
    model = attach_exits(multiscale(width=8, mix=mix), ["block1", "block2"], ExitHead("conv-pool-linear", 16), X, 10,
                         "multiscale").eval()
    stages = make_stages(model, "max_softmax")
    graphs = export_stages(stages, stage_io(stages, X, "image"), X, tmp_path, 17, 1e-4)
    assert [g.io.inputs for g in graphs] == inputs
    assert max(g.parity for g in graphs) <= 1e-4 and min(g.pred_agreement for g in graphs) == 1.0


def test_a_factory_model_whose_block_returns_what_the_next_never_reads_is_refused_before_training():
    """The rules the RANet adapter met only at export, now refused by the contract check in one
    line naming the block and the value: unread, None, and one tensor twice."""
    from edgeexit.staging import check_carries

    class Unread(nn.Module):
        def forward(self, x):
            return x, x * 2

    class Twin(nn.Module):
        def forward(self, x):
            y = x + 1
            return y, y

    class NoneCarry(nn.Module):
        def forward(self, x):
            return x + 1, None

    class Reads(nn.Module):
        def forward(self, a, b=None):
            return a.mean(dim=(2, 3))

    class Reads2(nn.Module):
        def forward(self, a, b):
            return (a + b).mean(dim=(2, 3))

    class Model(nn.Module):
        def __init__(self, first, second):
            super().__init__()
            self.blocks = nn.ModuleList([first, second])
            self.exits = nn.ModuleList([Head(), nn.Identity()])

    class Head(nn.Module):
        def forward(self, *carry):
            return carry[0].mean(dim=(2, 3))

    for first, second, message in ((Unread(), Reads(), "block 1 never reads carried value 1 of block 0 (shape (1, 8, 8))"),
                                   (Twin(), Reads2(), "block 0 returns the same tensor as carried values 0 and 1"),
                                   (NoneCarry(), Reads(), "block 0 returns NoneType as carried value 1")):
        with pytest.raises(SpecError, match=re.escape(message)):
            check_carries(make_stages(Model(first, second), "max_softmax"), X)


@pytest.mark.parametrize("make, cuts, message", [
    (skipnet, ["block_x"], "'block_x' is not a module of the backbone (did you mean ... block_a"),
    (skipnet, ["block_b", "block_a"], "'block_a' runs before 'block_b'"),
    (Twice, ["conv"], "'conv' is called 2 times by forward()"),
    (lambda: SizeAcross(width=True), ["a"], "size_1 ... is computed before the cut after 'a' and used after it, "
                                             "but is not a tensor"),
    (lambda: Across(batch_mean=True), ["a"], "mean (shape (1, 1, 1, 1)) is computed before the cut after 'a' ... "
                                             "has no batch axis first"),
    (SideBranch, ["side"], "the output of 'side' is not used after it"),
    (skipnet, ["block_a", "block_a"], "a layer is named twice"),
])
def test_cuts_that_cannot_be_made_are_refused_in_one_line(make, cuts, message):
    with pytest.raises(SpecError) as err:
        attach_exits(make(), cuts, ExitHead(), X, 10, "net")
    text = str(err.value)
    assert "\n" not in text and all(part in text for part in message.split(" ... ")), text


def test_model_yaml_takes_a_backbone_with_exits_after(tmp_path):
    from edgeexit.spec import _model as parse

    def _model(raw):
        return parse(raw, tmp_path)

    m = _model({"backbone": "torchvision:resnet18", "exits_after": ["layer1", "layer2"],
                "exit_head": {"kind": "conv-pool-linear", "width": 64}})
    assert (m.backbone, m.exits_after, m.exit_head) == ("torchvision:resnet18", ("layer1", "layer2"),
                                                        {"kind": "conv-pool-linear", "width": 64})
    assert m.to_manifest()["exits_after"] == ["layer1", "layer2"] and m.label == "torchvision:resnet18"
    for raw, message in (({"backbone": "torchvision:resnet18"}, "model.exits_after: name the layers"),
                         ({"arch": "eenet_resnet", "exits_after": ["a"]}, "model.exits_after: only with model.backbone"),
                         ({"backbone": "resnet18", "exits_after": ["a"]}, "is not torchvision:NAME"),
                         ({"backbone": "a:b", "arch": "eenet_resnet"}, "give exactly one of"),
                         ({"backbone": "a:b", "exits_after": ["x"], "exit_head": {"kind": "mlp"}}, "exit_head.kind"),
                         ({"backbone": "a:b", "exits_after": ["x"], "checkpoint": "no.pt"}, "model.checkpoint: file not"),
                         ({"arch": "eenet_resnet", "checkpoint": "no.pt"}, "model.checkpoint: only with model.backbone"),
                         ({"backbone": "torchvision:resnet18", "exits_after": ["layer1"],
                           "args": {"weights": "IMAGENET1K_V1"}}, "model.args.weights: edgeexit downloads nothing"),
                         ({"backbone": "timm:resnet18", "exits_after": ["layer1"], "args": {"pretrained": True}},
                          "model.args.pretrained: .*name it in model.checkpoint")):
        with pytest.raises(SpecError, match=message):
            _model(raw)


@pytest.mark.parametrize("name, cuts", [("resnet18", ["layer1", "layer2", "layer3"]),
                                        ("mobilenet_v3_small", ["features.3", "features.8"])])
def test_torchvision_backbones_split_after_named_layers(name, cuts):
    try:
        models = import_torchvision().models
    except ImportError:
        pytest.skip("torchvision is not installed (the README's test command installs it)")
    from edgeexit.models import build_model
    from edgeexit.spec import InputSpec, ModelSpec

    inp = InputSpec("image", (3, 32, 32), "float32", (0.5,) * 3, (0.25,) * 3, tuple("abcde"))
    model = build_model(ModelSpec(None, None, {}, f"torchvision:{name}", tuple(cuts), {"kind": "pool-linear",
                                                                                     "width": 64}), inp, None)
    assert type(model.backbone) is type(models.get_model(name))
    x = torch.randn(2, 3, 32, 32)
    assert check_staging(model, make_stages(model, "max_softmax"), x) <= 1e-5
    assert len(model.blocks) == len(cuts) + 1 and model(x)[-1].shape == (2, 5)


@pytest.mark.slow
def test_a_backbone_yaml_builds_a_bundle_whose_middle_stage_carries_two_tensors(tmp_path):
    """The whole pipeline from a yaml naming a plain network: the skip connection becomes a
    second carried tensor in the manifest, every stage is parity-checked against torch, and
    the torch backend (trusting the factory) rebuilds the same model from the bundle."""
    import shutil
    from pathlib import Path

    import numpy as np
    import yaml

    from conftest import EXAMPLE
    from edgeexit.build import build
    from edgeexit.runtime.loader import open_backend
    from edgeexit.spec import load_spec
    from edgeexit.tracing import split_inputs

    raw = yaml.safe_load(Path(EXAMPLE).read_text())
    raw.update(name="digits-skipnet", output="build/digits-skipnet",
               model={"backbone": "skipnet:skipnet", "exits_after": ["block_a", "block_b"],
                      "exit_head": {"kind": "conv-pool-linear", "width": 32}, "args": {"width": 16}})
    raw["train"]["epochs"] = 3
    shutil.copy(Path(__file__).parent / "skipnet.py", tmp_path / "skipnet.py")
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(raw))
    bundle, first = build(load_spec(tmp_path / "model.yaml"), tmp_path / "bundle", progress=False)
    stages = bundle.manifest["stages"]
    assert [len(s["outputs"]["carry"]) for s in stages] == [1, 2, 0] and stages[2]["inputs"] == ["s1_carry0", "s1_carry1"]
    assert max(s["parity_max_abs_diff"] for s in stages) < 1e-4
    assert bundle.manifest["model"]["exits_after"] == ["block_a", "block_b"]
    x, _ = split_inputs(bundle, "test", None)
    from edgeexit.runtime.cascade import Cascade

    preds = {}
    for kind, trust in (("onnxruntime", False), ("torch", True)):
        with open_backend(bundle, kind, trust_code=trust) as backend:
            preds[kind] = Cascade(backend, bundle.stage_ios, [0.9, 0.9, None])(x[:64]).pred
    assert np.array_equal(preds["onnxruntime"], preds["torch"])

    # its backbone as a checkpoint: a second build trains only new exit heads on it, distilled from the final exit
    state = torch.load(bundle.path / "weights.pt", weights_only=True)
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    torch.save(backbone, tmp_path / "skipnet.pt")
    raw["model"]["checkpoint"] = "skipnet.pt"
    raw["model"]["exits_after"] = {"auto": 2}  # cut where no skip connection spans: after block_a and block_c
    raw["train"].update(freeze_backbone=True, distill={"temperature": 4.0, "weight": 1.0}, seed=1)
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(raw))
    heads, report = build(load_spec(tmp_path / "model.yaml"), tmp_path / "heads", progress=False)
    assert heads.manifest["model"]["exits_after"] == ["block_a", "block_c"]
    assert [len(s["outputs"]["carry"]) for s in heads.manifest["stages"]] == [1, 1, 0]
    with open_backend(heads, "torch", trust_code=True) as backend:  # rebuilt from the names the bundle records
        assert len(backend.ios) == 3
    trained = torch.load(heads.path / "weights.pt", weights_only=True)
    assert all(torch.equal(trained[f"backbone.{k}"], v) for k, v in backbone.items())  # frozen, BN statistics too
    assert not torch.equal(trained["exits.0.head.0.weight"], state["exits.0.head.0.weight"])
    assert report["exit_accuracy"][-1] == first["exit_accuracy"][-1]  # the same final exit


def test_a_conv_head_on_a_large_map_pools_it_to_about_8x8_first():
    """MSDNet's classifiers read its coarsest scale (8x8 on CIFAR); on a 56x56 map (ResNet's
    layer1 at 224x224) the head pools by 7 first, so it costs what it costs at 32x32."""
    from edgeexit.backbone import make_head
    from edgeexit.export.onnx import count_flops

    head = ExitHead("conv-pool-linear", 16)
    big, small = make_head(head, 32, 10, 56), make_head(head, 32, 10, 8)
    assert isinstance(big[0], nn.AvgPool2d) and big[0].kernel_size == 7 and not isinstance(small[0], nn.AvgPool2d)
    pooled = {size: make_head(head, 32, 10, size)[0] for size in (14, 28, 11)}  # to 7x7 (ImageNet's MSDNet), 11 stays
    assert [m.kernel_size if isinstance(m, nn.AvgPool2d) else None for m in pooled.values()] == [2, 4, None]
    assert big(torch.randn(2, 32, 56, 56)).shape == (2, 10)
    convs = [m for m in big if isinstance(m, nn.Conv2d)]
    assert count_flops(nn.Sequential(*big[1:]), (torch.randn(1, 32, 8, 8),)) == \
        count_flops(nn.Sequential(*small), (torch.randn(1, 32, 8, 8),)) and len(convs) == 2


def test_auto_cut_points_are_blocks_whose_cut_carries_only_their_output():
    """skipnet: the skip connection from block_a spans block_b, so block_b is no clean cut; the
    stem, block_a and block_c are. Single layers (fc) are no candidates."""
    from edgeexit.backbone import _trace
    from edgeexit.cut_points import choose_cuts, clean_cuts

    net = skipnet()
    assert sorted(clean_cuts(_trace(net, (), X[:1], "skipnet"), net)) == ["block_a", "block_c", "stem"]
    chosen = choose_cuts(net, 2, "flops", X, "skipnet")
    assert [c.module for c in chosen] == ["block_a", "block_c"] and 0 < chosen[0].share < chosen[1].share < 1
    with pytest.raises(SpecError, match="auto: skipnet has 3 places where a cut carries only one feature map, fewer than 4"):
        choose_cuts(net, 4, "flops", X, "skipnet")


def test_auto_cuts_never_take_a_block_and_the_stage_holding_it():
    """A cut after layer1.0 and one after layer1 cannot both be made (the stage is traced as one
    leaf, or its blocks are): with as many exits as ResNet-18 has stages, one cut per stage."""
    from edgeexit.cut_points import choose_cuts

    try:
        models = import_torchvision().models
    except ImportError:
        pytest.skip("torchvision is not installed (the README's test command installs it)")
    net, x = models.resnet18(num_classes=5), torch.randn(1, 3, 64, 64)
    chosen = [c.module for c in choose_cuts(net, 4, "flops", x, "resnet18")]
    assert [name.split(".")[0] for name in chosen] == ["layer1", "layer2", "layer3", "layer4"], chosen
    with pytest.raises(SpecError, match=r"fewer than 5 places .* \(a block and the stage holding it count once\)"):
        choose_cuts(net, 5, "flops", x, "resnet18")


@pytest.mark.parametrize("cost", ["flops", "measured"])
def test_auto_exits_on_resnet18_are_spread_by_cost_and_carry_one_tensor(cost):
    from edgeexit.models import build_model
    from edgeexit.spec import InputSpec, ModelSpec

    try:
        import_torchvision()
    except ImportError:
        pytest.skip("torchvision is not installed (the README's test command installs it)")
    inp = InputSpec("image", (3, 64, 64), "float32", (0.5,) * 3, (0.25,) * 3, tuple("abcde"))
    spec = ModelSpec(None, None, {}, "torchvision:resnet18", (), {"kind": "pool-linear", "width": 64},
                     exits_auto=(3, cost))
    model = build_model(spec, inp, None)
    shares = [int(share) / 100 for share in re.findall(r"\((\d+)%\)", model.cut_note)]
    assert model.cut_note.startswith(f"model.exits_after: auto ({cost}): ") and len(model.cuts) == 3
    assert shares == sorted(shares) and len(set(shares)) == 3 and 0 < shares[0] and shares[-1] < 1, model.cut_note
    if cost == "flops":  # counted, so exact: nearest the quarters (measured times move with the machine's load)
        assert all(abs(share - k / 4) <= 0.1 for k, share in zip((1, 2, 3), shares)), model.cut_note
    x = torch.randn(2, 3, 64, 64)
    assert [len(c) for c in _carries(model, x)] == [1, 1, 1, 1]  # clean cuts: no skip connection spans them
    assert check_staging(model, make_stages(model, "max_softmax"), x) <= 1e-5


def test_exits_after_auto_is_parsed_and_checked(tmp_path):
    from edgeexit.spec import _model

    m = _model({"backbone": "a:b", "exits_after": {"auto": 3, "cost": "measured"}}, tmp_path)
    assert m.exits_auto == (3, "measured") and m.exits_after == ()
    assert _model({"backbone": "a:b", "exits_after": {"auto": 2}}, tmp_path).exits_auto == (2, "flops")
    for bad, message in (({"auto": 0}, "model.exits_after.auto"), ({"auto": 2, "cost": "time"}, "model.exits_after.cost"),
                         ({"count": 2}, "model.exits_after")):
        with pytest.raises(SpecError, match=re.escape(message)):
            _model({"backbone": "a:b", "exits_after": bad}, tmp_path)


@pytest.mark.parametrize("name, cuts", [("mobilenetv3_small_050", ["blocks.1", "blocks.3"]),
                                        ("efficientnet_b0", ["blocks.2", "blocks.4"]),
                                        ("convnext_atto", ["stages.0", "stages.1", "stages.2"])])
def test_timm_backbones_split_after_named_layers(name, cuts):
    """timm's own networks (random init: nothing is downloaded), cut where their stages end."""
    try:
        import_torchvision()
        import timm
    except ImportError:
        pytest.skip("timm is not installed (the dev extra installs it)")
    from edgeexit.models import build_model
    from edgeexit.spec import InputSpec, ModelSpec

    inp = InputSpec("image", (3, 64, 64), "float32", (0.5,) * 3, (0.25,) * 3, tuple("abcde"))
    model = build_model(ModelSpec(None, None, {}, f"timm:{name}", tuple(cuts), {"kind": "pool-linear", "width": 64}),
                        inp, None)
    assert type(model.backbone) is type(timm.create_model(name, pretrained=False))
    x = torch.randn(2, 3, 64, 64)
    assert check_staging(model, make_stages(model, "max_softmax"), x) <= 1e-5
    assert len(model.blocks) == len(cuts) + 1 and model(x)[-1].shape == (2, 5)


def test_train_freeze_backbone_needs_a_backbone_checkpoint_and_distill_is_parsed(tmp_path):
    import yaml

    from conftest import EXAMPLE
    from edgeexit.spec import load_spec

    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["data"] = {"source": "digits"}
    raw["train"].update(freeze_backbone=True)
    for model, message in (({"arch": "eenet_resnet"}, "this model has no backbone"),
                           ({"backbone": "skipnet:skipnet", "exits_after": ["block_a"]}, "a frozen random backbone")):
        raw["model"] = model
        (tmp_path / "model.yaml").write_text(yaml.safe_dump(raw))
        with pytest.raises(SpecError, match=f"train.freeze_backbone: .*{message}"):
            load_spec(tmp_path / "model.yaml")
    torch.save(skipnet().state_dict(), tmp_path / "ckpt.pt")
    raw["model"]["checkpoint"] = "ckpt.pt"
    raw["train"]["distill"] = {"temperature": 3}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(raw))
    spec = load_spec(tmp_path / "model.yaml")
    assert spec.train.freeze_backbone and spec.train.distill == (3.0, 1.0)
    assert spec.model.checkpoint == tmp_path / "ckpt.pt"


@pytest.mark.slow
@pytest.mark.parametrize("example, exits", [("resnet18", 4), ("mobilenetv3", 3)])
def test_the_torchvision_examples_build_from_their_yaml(example, exits, tmp_path):
    """The shipped torchvision examples, unchanged: exits after named layers of torchvision's own
    ResNet-18 / MobileNetV3-Small, trained on digits (resized, grey repeated to RGB)."""
    try:
        import_torchvision()
    except ImportError:
        pytest.skip("torchvision is not installed (the README's test command installs it)")
    from pathlib import Path

    from edgeexit.build import build
    from edgeexit.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "examples" / example / "model.yaml")
    bundle, report = build(spec, tmp_path / "bundle", progress=False)
    assert len(bundle.manifest["stages"]) == exits and bundle.manifest["model"]["backbone"].startswith("torchvision:")
    assert report["staged_max_abs_diff"] <= 1e-5 and max(report["parity"]) < 1e-3
    assert report["cascade_accuracy"] >= 0.9 and report["exit_accuracy"][-1] >= 0.9
    assert report["cascade_flops"] < report["monolithic_flops"]
    from edgeexit.export.trt_ops import unsupported

    graphs = [s["onnx"] for s in bundle.manifest["stages"]] + [bundle.manifest["monolithic"]]
    for version in ("8.5.2", "10.3.0"):  # JetPack 5 and 6: every node parses (MobileNetV3's HardSwish decomposed)
        assert [(g, unsupported(bundle.path / g, version)) for g in graphs] == [(g, []) for g in graphs]


def test_a_checkpoint_with_other_key_names_loads_by_position_when_every_shape_matches(tmp_path):
    """An official checkpoint of the same network, written by other code (here: other names and
    a DataParallel prefix), loads by position and says so; one shape off is refused by name."""
    from edgeexit.models import load_weights

    source, target = skipnet(width=8), skipnet(width=8)
    renamed = {f"module.layer{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(source.state_dict().items())}
    torch.save(renamed, tmp_path / "official.pt")
    with pytest.raises(SpecError, match="does not fit the model: keys missing 26 \\(stem.0.weight, .*; unexpected 26 \\(module.layer0.weight, module.layer1"):
        load_weights(target, tmp_path / "official.pt")
    note = load_weights(target, tmp_path / "official.pt", field="model.checkpoint", by_position=True)
    assert note.startswith("model.checkpoint: the keys of ") and "loaded by position, every shape equal" in note
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    assert load_weights(target, tmp_path / "official.pt", by_position=True) is not None
    torch.save(source.state_dict(), tmp_path / "same.pt")
    assert load_weights(target, tmp_path / "same.pt", by_position=True) is None  # same names: loaded by name
    bad = dict(renamed)
    first = next(iter(bad))
    bad[first] = torch.zeros(3)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(SpecError, match="model.checkpoint: .* does not fit the model.*map them with"):
        load_weights(target, tmp_path / "bad.pt", field="model.checkpoint", by_position=True)


def test_a_key_map_renames_prefixes_skips_a_classifier_and_unwraps_a_training_checkpoint(tmp_path):
    """An official training checkpoint ({'state_dict': ..., 'epoch': ...}, DataParallel's
    'module.' prefix, a classifier for another class count): `keys` strips the prefix and skips
    the classifier, which keeps its initial weights; everything else loads by name."""
    from edgeexit.models import load_weights

    source, target = skipnet(width=8), skipnet(width=8)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    last = [k for k in source.state_dict()][-2:]  # the final linear layer's weight and bias
    prefix = last[0].rsplit(".", 1)[0] + "."
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    state[f"module.{last[0]}"] = torch.zeros(1000, state[f"module.{last[0]}"].shape[1])  # ImageNet's head
    state[f"module.{last[1]}"] = torch.zeros(1000)
    torch.save({"state_dict": state, "epoch": 90, "arch": "skipnet", "best_prec1": 71.2}, tmp_path / "official.pth")
    with pytest.raises(SpecError, match="other shape 2"):  # the shapes differ: no load by position either
        load_weights(target, tmp_path / "official.pth", field="model.checkpoint", by_position=True,
                     keys=(("module.", ""),))
    note = load_weights(target, tmp_path / "official.pth", field="model.checkpoint", by_position=True,
                        keys=(("module.", ""), ("module." + prefix, None)))
    assert "under 'state_dict' of a training checkpoint" in note and "renamed by model.checkpoint.keys, 2 skipped" in note
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k] if k.startswith(prefix) else source.state_dict()[k]), k


def test_old_checkpoints_without_the_batch_norm_counter_load_and_two_keys_onto_one_are_refused(tmp_path):
    """A state_dict from before torch 0.4.1 has no num_batches_tracked (torch loads it, so does
    edgeexit); a key map sending two file keys to one model key (a model and its EMA copy under
    one prefix) is refused in one line instead of loading whichever came last."""
    from edgeexit.models import load_weights

    source, target = skipnet(width=8), skipnet(width=8)
    old = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pt")
    assert load_weights(target, tmp_path / "old.pt", by_position=True) is None
    assert all(torch.equal(target.state_dict()[k], v) for k, v in old.items())
    both = {**{f"module.{k}": v for k, v in old.items()}, **{f"module.ema.{k}": v for k, v in old.items()}}
    torch.save(both, tmp_path / "ema.pt")
    with pytest.raises(SpecError, match="model.checkpoint.keys: 'module.ema.stem.0.weight' and another key of the "
                                        "file both become 'stem.0.weight'"):
        load_weights(target, tmp_path / "ema.pt", field="model.checkpoint", by_position=True,
                     keys=(("module.", ""), ("module.ema.", "")))
    note = load_weights(target, tmp_path / "ema.pt", field="model.checkpoint", by_position=True,
                        keys=(("module.", ""), ("module.ema.", None)))
    assert f"{len(old)} keys renamed by model.checkpoint.keys, {len(old)} skipped" in note


def test_checkpoint_and_weights_take_a_path_or_a_path_with_keys(tmp_path):
    import re
    from pathlib import Path

    import yaml

    from edgeexit.spec import _model, parse_spec

    (tmp_path / "ckpt.pt").write_bytes(b"")
    m = _model({"backbone": "a:b", "exits_after": ["x"],
                "checkpoint": {"path": "ckpt.pt", "keys": {"module.": "", "fc.": None}}}, tmp_path)
    assert m.checkpoint == tmp_path / "ckpt.pt" and m.checkpoint_keys == (("module.", ""), ("fc.", None))
    raw = yaml.safe_load((Path(__file__).parent.parent / "examples" / "resnet18" / "model.yaml").read_text())
    raw["weights"] = {"path": "w.pt", "keys": {"blocks.": "blocks."}}
    spec = parse_spec(raw, tmp_path, require_weights=False)
    assert spec.weights == tmp_path / "w.pt" and spec.weights_keys == (("blocks.", "blocks."),)
    for bad, message in (({"path": "ckpt.pt", "keys": ["a"]}, "model.checkpoint.keys: expected a mapping"),
                         ({"path": "ckpt.pt", "keys": {"a.": 3}}, "model.checkpoint.keys.a.: expected the model's"),
                         ({"keys": {}}, "model.checkpoint.path: required field is missing")):
        with pytest.raises(SpecError, match=re.escape(message)):
            _model({"backbone": "a:b", "exits_after": ["x"], "checkpoint": bad}, tmp_path)
