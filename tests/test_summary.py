"""The build summary says what the bundle ships and when early exit does not pay."""

from __future__ import annotations

import copy

from edgeexit.build import early_exit_verdicts, format_summary


def _report(example_build, **changes):
    _, report = example_build
    r = copy.deepcopy(report)
    for key, value in changes.items():
        if key in r["latency_ms"]:
            r["latency_ms"][key] = value
        else:
            r[key] = value
    return r


def test_the_example_pays_and_says_nothing_more(example_build):
    bundle, report = example_build
    text = format_summary(bundle, report)
    assert "thresholds from the yaml" in text and "median of 7 interleaved rounds" in text
    assert "full depth" in text and "rounds " in text
    lo, hi = report["latency_ms"]["ratio_range"]
    assert lo <= report["latency_ms"]["ratio"] <= hi
    assert "int8" not in text  # an fp32 build says nothing of int8 calibration


def test_a_cascade_slower_than_monolithic_is_said_with_what_to_do(example_build):
    report = _report(example_build, ratio=1.38, full_depth_ratio=1.6)
    lines = early_exit_verdicts(report, 10)
    assert any("early exit does not pay on this machine: the cascade takes 1.38x" in v and "monolithic.onnx" in v
               for v in lines)


def test_an_exit_never_taken_or_near_chance_is_named(example_build):
    never = early_exit_verdicts(_report(example_build, exit_share=[0.0, 0.8, 0.2], ratio=0.9, carried_bytes=[]), 10)
    assert never == ["exit 0 is never taken at threshold 0.95 on the test split: its head runs for every sample "
                     "for nothing; lower its threshold or remove the exit"]
    weak = early_exit_verdicts(_report(example_build, exit_accuracy=[0.446, 0.97, 0.985], ratio=0.9,
                                       carried_bytes=[]), 10)
    assert len(weak) == 1 and weak[0].startswith("exit 0 is barely better than chance (44.6% with 10 classes")


def test_what_stages_hand_on_is_shown_and_more_than_the_image_is_named(example_build):
    bundle, report = example_build
    # the example's 8x8 grey digit is 256 bytes; its first stage hands on 32 maps of 8x8 float32
    assert report["input_bytes"] == 1 * 8 * 8 * 4 and report["carried_bytes"][0] == 32 * 8 * 8 * 4
    assert "carried per sample between stages: 8.0 KiB, " in format_summary(bundle, report)
    lines = early_exit_verdicts(_report(example_build, ratio=0.9), 10)
    assert any(v.startswith("stages hand on more per sample than the input image (0.2 KiB): stage 0 8.0 KiB")
               for v in lines)
    assert not any("hand on" in v for v in early_exit_verdicts(_report(example_build, ratio=0.9,
                                                                        input_bytes=1 << 20), 10))


def test_verdicts_print_in_the_summary(example_build):
    bundle, _ = example_build
    report = _report(example_build, ratio=1.2)
    report["verdicts"] = early_exit_verdicts(report, 10)
    assert "note: early exit does not pay" in format_summary(bundle, report)


def test_an_fp16_summary_does_not_speak_of_int8(example_build):
    bundle, _ = example_build
    report = _report(example_build)
    report["precision"] = {**report["precision"], "stages": ["fp16"] * 3, "final_drop_pt": 0.0, "tolerance_pt": 0.5,
                           "fallbacks": {}, "exits": [{"fp32_accuracy": 0.98, "agreement": 1.0}] * 3,
                           "calibration": {"method": "minmax", "samples": 256}}
    report["monolithic_precision"] = "fp16"
    text = format_summary(bundle, report)
    assert "pt below fp32" in text and "int8" not in text
    report["precision"]["stages"] = ["int8", "fp16", "fp16"]
    assert "int8 calibrated with minmax on 256 samples" in format_summary(bundle, report)


def test_a_broken_model_contract_fails_before_training(twoscale_spec, monkeypatch, capsys):
    """blocks/exits that disagree with forward() are refused in one line before any epoch."""
    import yaml

    import edgeexit.build
    from edgeexit.cli import main

    (twoscale_spec.parent / "reversed_model.py").write_text(
        "from twoscale_model import TwoScale\n\n"
        "class Reversed(TwoScale):\n"
        "    def forward(self, x):\n"
        "        return super().forward(x)[::-1]\n\n"
        "def build(in_channels, num_classes, width, depth):\n"
        "    return Reversed(in_channels, num_classes, width, depth)\n")
    raw = yaml.safe_load(twoscale_spec.read_text())
    raw["model"]["factory"] = "reversed_model:build"
    twoscale_spec.write_text(yaml.safe_dump(raw))

    def no_training(*args, **kwargs):
        raise AssertionError("training started before the contract was checked")

    monkeypatch.setattr(edgeexit.build, "train", no_training)
    try:
        assert main(["build", str(twoscale_spec), "--quiet"]) == 2
        assert main(["train", str(twoscale_spec), "--quiet"]) == 2
    finally:
        import sys

        sys.modules.pop("reversed_model", None)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("chained stages differ from the model's forward" in line for line in err)
