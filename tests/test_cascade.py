"""The gating loop: thresholds, compaction, input order, and backends that agree."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from edgeexit.runtime.cascade import LATE_WIDEN, NEVER, ON_TIME_NARROW, Cascade, trace
from edgeexit.runtime.loader import open_backend
from edgeexit.runtime.onnxruntime_backend import make_session


@pytest.fixture(scope="module")
def setup(example_build, digits_raw):
    from edgeexit.data import normalize

    bundle, _ = example_build
    x = normalize(digits_raw[0][:300], bundle.input["mean"], bundle.input["std"])
    return bundle, x, digits_raw[1][:300]


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_zero_thresholds_exit_everything_at_exit_0(setup, backend):
    bundle, x, _ = setup
    result = Cascade(open_backend(bundle, backend), bundle.stage_ios, [0.0, 0.0, None])(x)
    assert np.all(result.exit == 0)
    assert list(result.stage_samples) == [len(x), 0, 0]
    first = trace(open_backend(bundle, "onnxruntime"), bundle.stage_ios, x, 64)
    np.testing.assert_array_equal(result.pred, first.exit_pred[:, 0])


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_thresholds_above_one_run_every_stage_and_match_monolithic(setup, backend):
    bundle, x, _ = setup
    result = Cascade(open_backend(bundle, backend), bundle.stage_ios, [1.01, 1.5, None])(x)
    assert np.all(result.exit == len(bundle.stage_ios) - 1)
    assert list(result.stage_samples) == [len(x)] * len(bundle.stage_ios)
    logits = make_session(bundle.monolithic_path).run(["logits"], {"image": x})[0]
    np.testing.assert_array_equal(result.pred, logits.argmax(1))  # exactly the monolithic prediction
    np.testing.assert_allclose(result.logits, logits, atol=1e-4)
    np.testing.assert_allclose(result.probs.sum(1), 1.0, atol=1e-5)


def test_compaction_keeps_input_order(setup):
    """Each sample's result equals what its own exit says in a no-exit trace, in input order."""
    bundle, x, _ = setup
    backend = open_backend(bundle, "onnxruntime")
    every = trace(backend, bundle.stage_ios, x, 1000)
    # Thresholds at the median confidence: roughly half leave at each early exit, interleaved.
    th = [float(np.median(every.exit_conf[:, 0])), float(np.median(every.exit_conf[:, 1])), None]
    result = Cascade(backend, bundle.stage_ios, th)(x)
    expected_exit = np.where(every.exit_conf[:, 0] >= th[0], 0, np.where(every.exit_conf[:, 1] >= th[1], 1, 2))
    assert len(set(expected_exit.tolist())) == 3 and 0 < np.mean(expected_exit == 0) < 1
    np.testing.assert_array_equal(result.exit, expected_exit)
    np.testing.assert_array_equal(result.pred, every.exit_pred[np.arange(len(x)), expected_exit])
    np.testing.assert_allclose(result.conf, every.exit_conf[np.arange(len(x)), expected_exit], atol=1e-6)
    assert list(result.stage_samples) == [len(x), int(np.sum(expected_exit > 0)), int(np.sum(expected_exit > 1))]
    # Same answers when the input is shuffled: order comes from the input, not from the exits.
    perm = np.random.default_rng(0).permutation(len(x))
    shuffled = Cascade(backend, bundle.stage_ios, th)(x[perm])
    np.testing.assert_array_equal(shuffled.exit, result.exit[perm])
    np.testing.assert_array_equal(shuffled.pred, result.pred[perm])


def test_batched_run_equals_one_batch_and_backends_agree(setup):
    bundle, x, _ = setup
    th = bundle.thresholds
    ort_result = Cascade(open_backend(bundle, "onnxruntime"), bundle.stage_ios, th)
    whole, chunked = ort_result(x), ort_result.run_batched(x, 7)
    np.testing.assert_array_equal(whole.exit, chunked.exit)
    np.testing.assert_array_equal(whole.pred, chunked.pred)
    np.testing.assert_array_equal(whole.stage_samples, chunked.stage_samples)
    ref = Cascade(open_backend(bundle, "torch"), bundle.stage_ios, th)(x)
    assert np.mean(ref.exit == whole.exit) >= 0.99  # a confidence right at a threshold may flip
    assert np.mean(ref.pred == whole.pred) >= 0.99
    np.testing.assert_allclose(ref.conf, whole.conf, atol=1e-4)


def test_gather_stays_on_the_backend(setup):
    """The cascade hands carried tensors back to the backend untouched: the torch backend's
    tensors are never converted to numpy except conf, pred and leaving logits."""
    bundle, x, _ = setup
    backend = open_backend(bundle, "torch")
    downloaded = []
    original = backend.download
    backend.download = lambda v: (downloaded.append(tuple(v.shape)), original(v))[1]
    fed = []
    run = backend.run
    backend.run = lambda k, feeds: (fed.append({n: type(v) for n, v in feeds.items()}), run(k, feeds))[1]
    Cascade(backend, bundle.stage_ios, [0.999, 0.999, None])(x[:32])
    assert all(t is torch.Tensor for f in fed for t in f.values())
    assert all(len(shape) <= 2 for shape in downloaded)  # (B,) decisions and (B, classes) logits only


def test_threshold_count_is_checked(setup):
    bundle, _, _ = setup
    from edgeexit.errors import EdgeExitError

    with pytest.raises(EdgeExitError, match="2 values for 3 exits"):
        Cascade(open_backend(bundle, "onnxruntime"), bundle.stage_ios, [0.5, None])
    with pytest.raises(EdgeExitError, match="only the last threshold may be null"):
        Cascade(open_backend(bundle, "onnxruntime"), bundle.stage_ios, [None, 0.5, None])
    assert NEVER > 1


@pytest.mark.parametrize("thresholds, message", [
    ([0.95, 0.9], "gating.thresholds: 2 values for 3 exits; give one per exit, the last null"),  # not "set it to null"
    ([0.9, 0.8, 0.7, None], "gating.thresholds: 4 values for 3 exits"),
    ([None, 0.5, None], "gating.thresholds: only the last threshold may be null"),
    ([0.9, 0.9, 0.5], "gating.thresholds: the last exit takes every remaining sample; set its threshold to null"),
])
def test_gate_thresholds_checks_the_count_before_the_values(thresholds, message):
    from edgeexit.errors import EdgeExitError
    from edgeexit.runtime.cascade import gate_thresholds

    with pytest.raises(EdgeExitError, match=f"^{message}"):
        gate_thresholds(thresholds, 3)
    assert gate_thresholds([0.9, 0.8, None], 3)[:2] == [0.9, 0.8] and gate_thresholds([0.9, 0.8, 0.0], 3)[-1] == -NEVER


def test_a_deadline_stops_before_a_stage_that_cannot_finish_and_says_who_was_cut_off(setup):
    """Anytime: with stage costs predicted (here in seconds, so that the real time spent is
    negligible beside them: stage 1 costs 5, stage 2 costs 50) and a deadline of 20, no call
    starts stage 2: samples that would have gone there answer from exit 1, exactly as exit 1
    predicts them, and are marked cut off; the rest are unchanged."""
    bundle, x, _ = setup
    backend = open_backend(bundle, "onnxruntime")
    thresholds = [0.999, 0.999, None]
    plain = Cascade(backend, bundle.stage_ios, thresholds)(x)
    every = trace(backend, bundle.stage_ios, x, 64)
    costs = [1.0, 5.0, 50.0]

    def timed(deadline):
        return Cascade(backend, bundle.stage_ios, thresholds, deadline=deadline, predict=lambda k, n: costs[k])

    result = timed(20.0)(x)
    went_deep = plain.exit == 2
    assert went_deep.any() and np.array_equal(result.cut_off, went_deep)
    assert np.all(result.exit[went_deep] == 1) and result.stage_samples[2] == 0
    np.testing.assert_array_equal(result.pred[went_deep], every.exit_pred[went_deep, 1])
    np.testing.assert_array_equal(result.pred[~went_deep], plain.pred[~went_deep])
    # a deadline every stage fits changes nothing; one below stage 1's cost answers everyone from exit 0
    roomy = timed(1000.0)(x)
    assert not roomy.cut_off.any() and np.array_equal(roomy.exit, plain.exit)
    tight = timed(2.0)(x)
    assert np.all(tight.exit == 0) and np.array_equal(tight.cut_off, plain.exit > 0)
    assert timed(20.0).run_batched(x, 7).cut_off.shape == (len(x),)
    with pytest.raises(Exception, match="needs the stages' profiled costs"):
        Cascade(backend, bundle.stage_ios, thresholds, deadline=0.01)


class SlowStage:
    """A backend whose stage 1 takes `seconds` longer than the profile says (a machine busier
    now than when it was profiled)."""

    def __init__(self, backend, seconds: float):
        self.backend, self.seconds = backend, seconds

    def run(self, k, feeds):
        if k == 1:
            time.sleep(self.seconds)
        return self.backend.run(k, feeds)

    def __getattr__(self, name):
        return getattr(self.backend, name)


def test_late_calls_widen_the_predictions_until_the_deadline_holds_and_calls_in_time_narrow_them(setup):
    """Stage 1 is predicted at 0.125 s but takes over 0.25 s, so a 0.2 s deadline lets it start and
    every such call is late: each widens the predictions by 10%, until (past 1.6x) stage 1 is no
    longer started and calls answer from exit 0 in time, each narrowing the margin again."""
    bundle, x, _ = setup
    cascade = Cascade(SlowStage(open_backend(bundle, "onnxruntime"), 0.25), bundle.stage_ios, [NEVER, NEVER, None],
                      deadline=0.2, predict=lambda k, n: [0.0, 0.125, 0.0][k])
    exits = [int(cascade(x[:1]).exit[0]) for _ in range(8)]
    widened = int(np.ceil(np.log(0.2 / 0.125) / np.log(LATE_WIDEN)))  # late calls before 0.125 x margin > 0.2
    assert exits == [1] * widened + [0] * (8 - widened)
    assert cascade.margin == pytest.approx(LATE_WIDEN ** widened * (1 - ON_TIME_NARROW) ** (8 - widened))
