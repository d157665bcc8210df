"""The GPU runtime design: static per-bucket buffers, on-device compaction, CUDA graphs.

Runs everywhere: the bucket/buffer bookkeeping of `StaticBackend` through `TorchCudaBackend`
on the CPU (the same code path as on a GPU, without graphs) against the plain torch and
onnxruntime cascades, and `GraphCache` with a recording capture.
Runs on an NVIDIA GPU only (skipped elsewhere, with the reason): torch-CUDA with CUDA graphs
against the CPU reference, and pycuda's buffers and gather kernel against torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeexit.errors import EdgeExitError
from edgeexit.runtime.cascade import Cascade, full_depth, trace
from edgeexit.runtime.static import GraphCache, Rows, bucket_for, bucket_sizes

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (or a CPU build of torch)")


@pytest.fixture(scope="module")
def bundle(example_build):
    """The shipped example's bundle (built once per session, see conftest); only read here."""
    return example_build[0]


@pytest.fixture(scope="module")
def data(bundle):
    from edgeexit.tracing import split_inputs

    x, _ = split_inputs(bundle, "test")
    return x


@pytest.fixture(scope="module")
def reference(bundle, data):
    """Thresholds at each early exit's median confidence, and the onnxruntime cascade there."""
    from edgeexit.runtime.loader import open_backend

    ort = open_backend(bundle, "onnxruntime")
    traced = trace(ort, bundle.stage_ios, data, 64)
    thresholds = [clear_threshold(traced.exit_conf[:, k]) for k in range(len(bundle.stage_ios) - 1)] + [None]
    return ort, thresholds


def clear_threshold(conf: np.ndarray) -> float:
    """A threshold near the median confidence in the widest gap between neighbouring values, so
    that GPU rounding (~1e-6) cannot move a sample across it; about half the samples leave."""
    c = np.sort(conf)
    middle = np.arange(int(0.3 * len(c)), int(0.7 * len(c)))
    i = middle[np.argmax(c[middle + 1] - c[middle])]
    return float((c[i] + c[i + 1]) / 2)


def static_torch(bundle, device="cpu", **kwargs):
    from edgeexit.runtime.loader import torch_stages
    from edgeexit.runtime.torch_cuda_backend import TorchCudaBackend

    return TorchCudaBackend(torch_stages(bundle), bundle.stage_ios, device, input_shape=bundle.input["shape"][1:],
                            **kwargs)


def assert_same(got, want, atol=1e-5):
    np.testing.assert_array_equal(got.exit, want.exit)
    np.testing.assert_array_equal(got.pred, want.pred)
    np.testing.assert_allclose(got.logits, want.logits, atol=atol, rtol=1e-5)
    np.testing.assert_allclose(got.conf, want.conf, atol=atol, rtol=1e-5)
    np.testing.assert_array_equal(got.stage_samples, want.stage_samples)


# --- buckets and the graph cache ---------------------------------------------------------------


def test_buckets():
    assert bucket_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert bucket_sizes(48) == (1, 2, 4, 8, 16, 32, 48)
    assert bucket_sizes(1) == (1,)
    sizes = bucket_sizes(48)
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 33, 48)] == [1, 2, 4, 48, 48]
    with pytest.raises(EdgeExitError, match="max batch 48"):
        bucket_for(49, sizes)


def test_graph_cache_captures_after_warmup_and_falls_back_when_capture_fails():
    ran, captured = [], []

    def capture(key, fn):
        if key == "bad":
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        captured.append(key)
        return lambda: ran.append(("replay", key))

    cache = GraphCache(capture, enabled=True, warmup=2)
    for _ in range(4):
        cache("good", lambda: ran.append(("plain", "good")))
        cache("bad", lambda: ran.append(("plain", "bad")))
    assert [r for r in ran if r[1] == "good"] == [("plain", "good")] * 2 + [("replay", "good")] * 2
    assert [r for r in ran if r[1] == "bad"] == [("plain", "bad")] * 4
    assert captured == ["good"] and cache.failed == {"bad": "RuntimeError: operation not permitted when stream is capturing"}
    off = GraphCache(capture, enabled=False)
    for _ in range(3):
        off("good", lambda: None)
    assert not off.graphs and off.runs == {"good": 3}


# --- the static-buffer backend on the CPU ------------------------------------------------------------


@pytest.mark.parametrize("chunk", [64, 37, 1])
def test_static_buffers_reproduce_the_cascade(bundle, data, reference, chunk):
    ort, thresholds = reference
    want = Cascade(ort, bundle.stage_ios, thresholds).run_batched(data, chunk, collect=True)
    backend = static_torch(bundle, max_batch=64)
    cascade = Cascade(backend, bundle.stage_ios, thresholds)
    for _ in range(2):  # buffers are reused: the second pass reads buffers the first one left dirty
        assert_same(cascade.run_batched(data, chunk, collect=True), want)
    assert not backend.graphs.enabled  # no graphs on a CPU device
    assert {b for (_, b) in backend.buffers} <= set(backend.buckets)
    if chunk == 64:  # kept rows that do not shrink the bucket go through a scratch buffer
        assert backend._scratch


def test_stage_k_reads_stage_k_minus_1_outputs_in_place(bundle, data):
    """With nobody leaving, the carried tensor handed on is the very buffer stage k+1 reads."""
    backend = static_torch(bundle, max_batch=64)
    out = backend.run(0, {"image": backend.upload(data[:5])})
    carry = bundle.stage_ios[0].carry[0]
    assert out[carry] == Rows(carry, 8, 5)
    before = backend.buffers[(carry, 8)].data_ptr()
    out1 = backend.run(1, {carry: out[carry]})
    assert backend.buffers[(carry, 8)].data_ptr() == before and out1[bundle.stage_ios[1].conf].n == 5
    kept = backend.take(out[carry], np.array([0, 2, 4]))
    assert kept == Rows(carry, 4, 3)
    ref = backend.download(out[carry])
    np.testing.assert_array_equal(backend.download(kept), ref[[0, 2, 4]])
    with pytest.raises(IndexError):
        backend.take(out[carry], np.array([5]))


def test_bad_calls_fail_cleanly_and_leave_the_backend_usable(bundle, data, reference):
    ort, thresholds = reference
    backend = static_torch(bundle, max_batch=64)
    cascade = Cascade(backend, bundle.stage_ios, thresholds)
    with pytest.raises(EdgeExitError, match="max batch 64"):
        cascade(data[:65])
    with pytest.raises(EdgeExitError, match="empty batch"):
        cascade(data[:0])
    with pytest.raises(EdgeExitError, match=r"input image takes \[N, 1, 8, 8\], got \[4, 1, 5, 5\]"):
        cascade(np.zeros((4, 1, 5, 5), np.float32))
    assert backend.lock.acquire(blocking=False)
    backend.lock.release()
    want = Cascade(ort, bundle.stage_ios, thresholds)(data[:40], collect=True)
    assert_same(cascade(data[:40], collect=True), want)


def test_loader_offers_torch_cuda_and_says_what_to_do_without_cuda(bundle):
    from edgeexit.runtime.loader import open_backend, open_monolithic

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(EdgeExitError, match="torch-cuda: this torch has no CUDA device"):
        open_backend(bundle, "torch-cuda")
    with pytest.raises(EdgeExitError, match="no CUDA device"):
        open_monolithic(bundle, "torch-cuda")


def test_torch_cuda_on_an_explicit_cpu_device_is_a_dry_run_of_the_gpu_path(bundle, data, reference):
    """`--device cpu` opens the static-buffer backend (no graphs) for the stages and for the
    monolithic baseline; both agree with onnxruntime."""
    from edgeexit.runtime.loader import open_backend, open_monolithic

    ort, thresholds = reference
    with open_backend(bundle, "torch-cuda", "cpu") as backend, open_monolithic(bundle, "torch-cuda", "cpu") as mono:
        assert backend.name == mono.name == "torch-cuda" and not backend.graphs.enabled
        assert_same(Cascade(backend, bundle.stage_ios, thresholds).run_batched(data, 32),
                    Cascade(ort, bundle.stage_ios, thresholds).run_batched(data, 32))
        whole = Cascade(mono, [bundle.monolithic_io], [None]).run_batched(data, 32)
        np.testing.assert_array_equal(whole.pred, full_depth(ort, bundle.stage_ios)(data).pred)


# --- on an NVIDIA GPU ----------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("graphs", [True, False])
def test_torch_cuda_cascade_matches_the_cpu_reference(bundle, data, reference, graphs, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convolutions, as on the CPU
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ort, thresholds = reference
    backend = static_torch(bundle, "cuda", max_batch=64, graphs=graphs)
    cascade = Cascade(backend, bundle.stage_ios, thresholds)
    want = Cascade(ort, bundle.stage_ios, thresholds).run_batched(data, 37, collect=True)
    for _ in range(4):  # plain, plain + capture, replays
        assert_same(cascade.run_batched(data, 37, collect=True), want, atol=1e-4)
    if graphs:
        assert backend.graphs.graphs and not backend.graphs.failed, backend.graphs.failed
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    cascade.run_batched(data, 37)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == held  # replays allocate nothing new
    backend.close()


@needs_cuda
def test_pycuda_memory_gathers_like_torch():
    """The compaction kernel and the memcpy fallback against torch.index_select on the GPU."""
    pytest.importorskip("pycuda.driver", reason="pycuda is built only on NVIDIA machines")
    import pycuda.driver as cuda

    from edgeexit.runtime.pycuda_memory import PycudaMemory

    cuda.init()
    ctx = cuda.Device(0).retain_primary_context()
    ctx.push()
    try:
        rng = np.random.default_rng(0)
        for mode in ("kernel", "memcpy"):
            mem = PycudaMemory(mode)
            assert mem.gather_mode == mode
            for row_shape, dtype in (((32, 8, 8), np.float32), ((3,), np.float16), ((5,), np.int64), ((3,), np.uint8)):
                src_host = rng.normal(size=(64, *row_shape)).astype(dtype) if dtype != np.uint8 else \
                    rng.integers(0, 255, (64, *row_shape)).astype(np.uint8)
                src = mem.new_buffer(64, row_shape, np.dtype(dtype))
                dst = mem.new_buffer(64, row_shape, np.dtype(dtype))
                mem.write(src, src_host)
                rows = np.sort(rng.choice(64, 23, replace=False))
                mem.gather(dst, src, rows)
                want = torch.from_numpy(src_host).cuda().index_select(0, torch.from_numpy(rows).cuda()).cpu().numpy()
                got, whole = mem.read([(dst, 23), (dst, 64)])  # two copies, one wait
                np.testing.assert_array_equal(got, want)
                np.testing.assert_array_equal(whole[23:], 0)  # untouched rows stay zero
                mem.copy_rows(src, dst, 23)
                np.testing.assert_array_equal(mem.read([(src, 23)])[0], want)
                mem.free([src, dst])
            mem.close()
    finally:
        cuda.Context.pop()


def test_profiler_and_traces_run_on_the_static_backend(bundle, data, reference):
    """`edgeexit profile` and `trace` drive a backend through the same calls on a GPU: here
    the static-buffer one on the CPU, with every number checked for sense."""
    from edgeexit.profile import profile_bundle
    from edgeexit.runtime.loader import open_monolithic

    ort, thresholds = reference
    backend = static_torch(bundle, max_batch=64)
    mono = open_monolithic(bundle, "torch-cuda", "cpu")
    entry = profile_bundle(backend, bundle.stage_ios, mono, bundle.monolithic_io, data, [1, 8], thresholds,
                           iters=5, warmup=2)
    assert entry["backend"] == "torch-cuda" and set(entry["batches"]) == {"1", "8"}
    for figures in entry["batches"].values():
        stages = figures["stages"]
        assert len(stages) == len(bundle.stage_ios) and all(s["mean_ms"] > 0 for s in stages)
    every = trace(backend, bundle.stage_ios, data, 64)
    want = trace(ort, bundle.stage_ios, data, 64)
    np.testing.assert_array_equal(every.exit_pred, want.exit_pred)
    np.testing.assert_allclose(every.exit_conf, want.exit_conf, atol=1e-5)


# --- the cascade decided on the device -----------------------------------------------------------


def device_cascade(bundle, thresholds, device="cpu", **kwargs):
    from edgeexit.runtime.device_cascade import DeviceCascade
    from edgeexit.runtime.loader import torch_stages

    return DeviceCascade(torch_stages(bundle), bundle.stage_ios, thresholds, device,
                         input_shape=bundle.input["shape"][1:], **kwargs)


@pytest.mark.parametrize("chunk", [64, 37, 1])
def test_decisions_on_the_device_give_the_staged_cascades_exits_and_classes(bundle, data, reference, chunk):
    """Every row runs every stage in one pass; the exit chosen on the device per row is the
    staged loop's, and so are its class, confidence and logits (the CPU dry run of the GPU path)."""
    ort, thresholds = reference
    want = Cascade(ort, bundle.stage_ios, thresholds).run_batched(data, chunk, collect=True)
    cascade = device_cascade(bundle, thresholds)
    got = cascade.run_batched(data, chunk, collect=True)
    np.testing.assert_array_equal(got.exit, want.exit)
    np.testing.assert_array_equal(got.pred, want.pred)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got.exit_conf, np.nan_to_num(want.exit_conf, nan=got.exit_conf), atol=1e-5)
    assert got.stage_samples.tolist() == [len(data)] * len(bundle.stage_ios)  # no compaction: every row, every stage
    cascade.set_thresholds([-1.0, 2.0, None])  # read at every call: no new capture needed
    assert (cascade(data[:chunk]).exit == 0).all()


@needs_cuda
def test_decisions_on_the_device_with_cuda_graphs_match_the_cpu_reference(bundle, data, reference, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ort, thresholds = reference
    want = Cascade(ort, bundle.stage_ios, thresholds).run_batched(data, 32)
    cascade = device_cascade(bundle, thresholds, "cuda", max_batch=32)
    for _ in range(4):  # plain, plain + capture, replays
        got = cascade.run_batched(data, 32)
        np.testing.assert_array_equal(got.exit, want.exit)
        np.testing.assert_array_equal(got.pred, want.pred)
    assert cascade.graphs.graphs and not cascade.graphs.failed, cascade.graphs.failed  # captured
    cascade.set_thresholds([NEVER_LEAVE, NEVER_LEAVE, None])
    assert (cascade.run_batched(data, 32).exit == len(bundle.stage_ios) - 1).all()  # the graph reads the new values
    cascade.close()


NEVER_LEAVE = 2.0  # above any softmax confidence
