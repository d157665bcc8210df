"""model.yaml validation: one line naming the field, and nothing written on error."""

from __future__ import annotations

import copy

import pytest

from conftest import example_raw, write_spec
from edgeexit.cli import main
from edgeexit.errors import SpecError
from edgeexit.spec import load_spec, parse_spec


def _parse(tmp_path, raw):
    return parse_spec(raw, tmp_path, source=tmp_path / "model.yaml")


def test_example_parses_with_defaults_filled(tmp_path):
    spec = load_spec(write_spec(tmp_path, example_raw()))
    assert spec.input.shape == (1, 8, 8)
    assert spec.gating.thresholds == (0.95, 0.9, None)
    assert spec.output == tmp_path / "build" / "digits-eenet"
    assert spec.export.batch.min <= spec.export.batch.opt <= spec.export.batch.max


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(gatting=r.pop("gating")), "gatting: unknown key; did you mean 'gating'?"),
    (lambda r: r["input"].update(shpe=r["input"].pop("shape")), "input.shpe: unknown key; did you mean 'shape'?"),
    (lambda r: r["export"]["batch"].update(max="big"), "export.batch.max: expected an integer, got str"),
    (lambda r: r["export"]["batch"].update(min=32, max=8), "export.batch: need min <= opt <= max"),
    (lambda r: r["gating"].update(confidence="softmax"), "gating.confidence: 'softmax' is not allowed"),
    (lambda r: r["gating"].update(thresholds=[0.9, -1, None]), "gating.thresholds[1]: -1 is out of range"),
    (lambda r: r["model"].update(arch="resnet9000"), "model.arch: 'resnet9000' is not allowed"),
    (lambda r: r["model"].update(factory="x:y"), "model: give exactly one of 'arch'"),
    (lambda r: r["input"].update(std=[0]), "input.std[0]: 0 is out of range"),
    (lambda r: r["input"].update(mean=[1, 2]), "input.mean: 2 values for 1 channel(s)"),
    (lambda r: r["input"].update(shape=[8, 8]), "input.shape: expected [channels, height, width]"),
    (lambda r: r["input"].update(classes=["a", "a"]), "input.classes: class names must be unique"),
    (lambda r: r["data"].update(source="nowhere.npz"), "data.source: file not found"),
    (lambda r: r["data"]["splits"].update(train=0.9), "data.splits: fractions add up to 1.3"),
    (lambda r: r["target"].update(backend="tpu"), "target.backend: 'tpu' is not allowed"),
    (lambda r: r["target"].update(device="jetson-nano-9000"), "target.device: unknown device 'jetson-nano-9000'"),
    (lambda r: r["train"].update(epochs=0), "train.epochs: 0 is out of range"),
    (lambda r: r.update(weights="missing.pt"), "weights: file not found"),
    (lambda r: r.update(name="bad name"), "name: 'bad name' must be"),
    (lambda r: r.pop("input"), "input: required field is missing"),
])
def test_bad_field_is_named_in_one_line(tmp_path, mutate, message):
    raw = copy.deepcopy(example_raw())
    mutate(raw)
    with pytest.raises(SpecError) as err:
        _parse(tmp_path, raw)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_folder_for_the_yaml_is_named_as_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match=r"^model.yaml: \. is a folder, not a yaml file$"):
        load_spec(".")
    write_spec(tmp_path, example_raw())
    with pytest.raises(SpecError, match=r"^model.yaml: \. is a folder, not a yaml file \(did you mean model.yaml\?\)$"):
        load_spec(".")
    with pytest.raises(SpecError, match="model.yaml: file not found: nope.yaml"):
        load_spec("nope.yaml")


def test_invalid_yaml_is_reported_with_its_line(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(SpecError, match=r"model.yaml: not valid YAML at line"):
        load_spec(path)


def test_yaml_tags_are_not_constructed(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)


def test_unknown_model_argument_is_named(tmp_path):
    from edgeexit.models import build_model

    raw = copy.deepcopy(example_raw())
    raw["model"]["args"]["widht"] = 3
    spec = _parse(tmp_path, raw)
    with pytest.raises(SpecError, match=r"model.args.widht: eenet_resnet has no argument 'widht'"):
        build_model(spec.model, spec.input, spec.base_dir)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(gatting=r.pop("gating")), "gatting: unknown key"),
    (lambda r: r.update(weights="weights/missing.pt"), "weights: file not found"),
    (lambda r: r["input"].update(shape=[1, 8, 9]), "input.shape: [1, 8, 9] does not match the data (images are [1, 8, 8])"),
    (lambda r: r["gating"].update(thresholds=[0.9, None]), "gating.thresholds: 2 values for 3 exits"),
    # the reported case: a short list was told to end in null, not that it was short
    (lambda r: r["gating"].update(thresholds=[0.95, 0.9]),
     "gating.thresholds: 2 values for 3 exits; give one per exit, the last null"),
    (lambda r: r["gating"].update(thresholds=[0.9, 0.9, 0.5]), "gating.thresholds: the last exit takes every remaining sample"),
    (lambda r: r["gating"].update(thresholds=[None, 0.9, None]), "gating.thresholds: only the last threshold may be null"),
    (lambda r: (r["target"].update(device="jetson-nano"), r["export"].update(precision="int8")),
     "export.precision: int8 has no fast hardware support on jetson-nano"),
    (lambda r: (r["target"].update(device="jetson-orin-nano-8gb", dla=0), r["export"].update(precision="fp16")),
     "target.dla: jetson-orin-nano-8gb has no DLA cores"),
    (lambda r: (r["target"].update(device="jetson-nano"), r["export"]["batch"].update(max=2_000_000)),
     "export.batch.max: 2000000 needs"),
    (lambda r: r["export"].update(stage_precision={7: "fp16"}), "export.stage_precision.7: the model has 3 stages"),
])
def test_cli_build_fails_cleanly_and_writes_nothing(tmp_path, capsys, mutate, message):
    raw = copy.deepcopy(example_raw())
    raw["train"]["epochs"] = 1
    mutate(raw)
    spec_path = write_spec(tmp_path, raw)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["build", str(spec_path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("edgeexit: error: ") and message in err[-1]
    assert not any(line.startswith("edgeexit: error") for line in err[:-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output directory, no partial files


@pytest.mark.parametrize("budget, message", [
    ({"latency_ms": 1, "batch": 512}, "budget.batch: 512 is above export.batch.max"),
    ({"latency_ms": 1, "tail": "p50"}, "budget.tail: 'p50' is not allowed"),
    ({"latency_ms": 0}, "budget.latency_ms"),
])
def test_budget_fields_are_checked(tmp_path, budget, message):
    raw = example_raw()
    raw["budget"] = budget
    with pytest.raises(SpecError, match=message):
        load_spec(write_spec(tmp_path, raw))
