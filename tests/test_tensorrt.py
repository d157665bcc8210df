"""TensorRT engine builder and backend.

TensorRT and pycuda exist only on NVIDIA machines, so most of this file runs against small
stand-ins registered in ``sys.modules``:

- ``fake_trt(version)``: a TensorRT module that carries only the names that version really has
  (see TRT_NAMES / OBJECT_NAMES and where each was read) and records what the builder does with
  them; touching a name the version lacks raises AttributeError, as the real binding would.
- ``fake_pycuda()`` + the fake TensorRT runtime: a *simulator* of device memory (numpy bytes
  behind integer pointers) whose engines run the stage's ONNX graph on onnxruntime, so the
  backend's shape setting, address binding, output-buffer reuse and on-device gathers can be
  checked end to end against the onnxruntime backend. Its gather launches run the kernel's own
  CUDA source, compiled for the host (``host_kernels.py``). It checks the bookkeeping and the
  kernel's indexing, not CUDA.

Tests needing the real libraries use ``pytest.importorskip`` and skip here with a reason.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import leftovers
from edgeexit.errors import EdgeExitError
from host_kernels import host_gather
from trt_sim import (ALL, BACKEND_SRC, BUILDER_SRC, DEVICE, EXAMPLE, SIM, TRT8, TRT_NAMES, VERSIONS,
                     fake_cuda_driver, fake_pycuda, fake_trt, flag_names, network_flag_names)

# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_bundle(tmp_path_factory):
    """The shipped example, built once with the CLI (~15 s)."""
    from edgeexit.cli import main

    out = tmp_path_factory.mktemp("trt") / "bundle"
    assert main(["build", str(EXAMPLE), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture()
def bundle(built_bundle, tmp_path):
    """A private copy of the built bundle (tests rewrite it)."""
    import shutil

    dest = tmp_path / "bundle"
    shutil.copytree(built_bundle, dest)
    return dest


# Real CUDA modules, where a GPU machine has them, are hidden from the simulated tests: the
# builder would otherwise record the real GPU in engine.json and the backend refuse the plans
# on the simulated one.
CUDA_MODULES = ("pycuda", "pycuda.driver", "pycuda.tools", "pycuda.compiler", "cuda", "cuda.bindings",
                "cuda.bindings.driver", "cuda.bindings.runtime", "cuda.cuda", "cuda.cudart")


@pytest.fixture()
def use_trt(monkeypatch):
    """Install fake_trt(version) as `tensorrt` (and no real CUDA modules); returns the module."""
    for name in CUDA_MODULES:
        monkeypatch.setitem(sys.modules, name, None)

    def install(version_key, **kwargs):
        mod = fake_trt(version_key, **kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", mod)
        return mod
    return install


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def stage0(bundle_path: Path) -> Path:
    return bundle_path / "stages" / "stage0.onnx"


def qdq_model(path: Path) -> Path:
    """A tiny explicitly quantized graph (Q/DQ around an identity) with a dynamic batch."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="quant"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dequant")]
    graph = helper.make_graph(
        nodes, "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", TensorProto.INT8, [], [0])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def build(onnx_path, tmp_path, **kwargs):
    from edgeexit.export.tensorrt import build_engine, graph_facts

    facts = graph_facts(onnx_path)
    args = dict(batch=(1, 16, 256), input_shapes=facts.input_shapes, precision="fp32", workspace_mb=512,
                timing_cache=tmp_path / "timing.cache")
    args.update(kwargs)
    return build_engine(onnx_path, tmp_path / "stage.plan", **args)


# --- without TensorRT ------------------------------------------------------------------------------


@pytest.mark.slow
def test_no_tensorrt_fails_in_one_line_and_leaves_the_bundle_untouched(bundle, monkeypatch):
    from edgeexit.bundle import load_bundle
    from edgeexit.export.tensorrt import NOT_INSTALLED, build_engines, trt_available

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    assert not trt_available()
    before = snapshot(bundle)
    parent_before = sorted(p.name for p in bundle.parent.iterdir())
    with pytest.raises(EdgeExitError) as err:
        build_engines(bundle, DEVICE, precision="fp16", dla_core=1)
    assert str(err.value).startswith(NOT_INSTALLED.split("\u2014")[0]) and "\n" not in str(err.value)
    # the exact command to run on the device
    assert str(err.value).endswith(
        f"on the Jetson run `edgeexit engines {bundle} --device {DEVICE} --precision fp16 --dla 1`")
    assert snapshot(bundle) == before
    assert sorted(p.name for p in bundle.parent.iterdir()) == parent_before  # no staging left over
    load_bundle(bundle)  # still verifies


def test_backend_module_imports_without_tensorrt_and_refuses_cleanly(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    import edgeexit.runtime.tensorrt_backend as tb

    with pytest.raises(EdgeExitError, match="TensorRT is not installed"):
        tb.TensorRTBackend([], [])


def test_versions_parse():
    from edgeexit.export.tensorrt import engine_key, parse_version

    assert parse_version("10.3.0.26") == (10, 3, 0, 26)
    assert parse_version("8.5.2.2") == (8, 5, 2, 2)
    assert parse_version("11.0.0b1") == (11, 0, 0)
    assert engine_key("jetson-orin-nx-16gb", (10, 3, 0)) == "jetson-orin-nx-16gb-trt10.3"


def test_graph_facts(bundle, tmp_path):
    from edgeexit.export.tensorrt import graph_facts

    facts = graph_facts(stage0(bundle))
    assert facts.precision == "fp32"
    assert facts.input_shapes == {"image": (1, 8, 8)}
    assert facts.node_names[0] and len(facts.node_names) == len(facts.node_ops)
    assert graph_facts(qdq_model(tmp_path / "q.onnx")).precision == "int8"


# --- version-dependent builder branches (fake TensorRT) ---------------------------------------------


def test_trt85_explicit_batch_no_optimization_level_no_strong_typing(bundle, tmp_path, use_trt):
    trt = use_trt("8.5")
    meta = build(stage0(bundle), tmp_path, optimization_level=3)
    st = trt._state
    assert network_flag_names(trt) == {"EXPLICIT_BATCH"}
    assert not hasattr(st.config, "builder_optimization_level")  # never touched: 8.5 has none
    assert meta["optimization_level"] is None and meta["strongly_typed"] is False
    assert st.flags == [] and meta["builder_flags"] == []
    assert st.pool_limits == {trt.MemoryPoolType.WORKSPACE: 512 << 20}
    # one static profile per bucket: batch 1 gets kernels tuned for batch 1
    assert st.profiles == [{"image": ((b, 1, 8, 8),) * 3} for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
    assert (tmp_path / "stage.plan").read_bytes().startswith(b"{")
    assert (tmp_path / "timing.cache").read_bytes() == b"+timed"
    assert meta["profiles"] == {"mode": "buckets", "batches": [[b, b, b] for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)],
                                "inputs": {"image": [1, 8, 8]}}
    assert meta["tensorrt"] == "8.5.2.2" and meta["placement"] is None

    trt = use_trt("8.5")  # one range profile, tuned for opt, where a user prefers one engine that fits all
    meta = build(stage0(bundle), tmp_path, batch=(2, 16, 100), profiles="range")
    assert trt._state.profiles == [{"image": ((2, 1, 8, 8), (16, 1, 8, 8), (100, 1, 8, 8))}]
    assert meta["profiles"]["batches"] == [[2, 16, 100]]
    use_trt("8.5")
    meta = build(stage0(bundle), tmp_path, batch=(3, 16, 100))
    assert meta["profiles"]["batches"] == [[b, b, b] for b in (4, 8, 16, 32, 64, 100)]


def test_trt85_weak_typing_flags_for_fp16_and_qdq_int8(bundle, tmp_path, use_trt):
    trt = use_trt("8.5")
    build(stage0(bundle), tmp_path, precision="fp16")
    assert flag_names(trt, "BuilderFlag", trt._state.flags) == {"FP16"}
    assert network_flag_names(trt) == {"EXPLICIT_BATCH"}

    trt = use_trt("8.5")
    meta = build(qdq_model(tmp_path / "q.onnx"), tmp_path, precision="int8", batch=(1, 8, 64))
    # 8.x: Q/DQ needs INT8, and FP16 lets the layers left unquantized run fp16 rather than fp32
    assert flag_names(trt, "BuilderFlag", trt._state.flags) == {"INT8", "FP16"}
    assert meta["graph_precision"] == "int8" and meta["strongly_typed"] is False


def test_trt10_strongly_typed_for_graph_precision_and_optimization_level(bundle, tmp_path, use_trt):
    trt = use_trt("10.3")
    meta = build(qdq_model(tmp_path / "q.onnx"), tmp_path, precision="int8", optimization_level=4)
    assert network_flag_names(trt) == {"STRONGLY_TYPED"}  # no EXPLICIT_BATCH: ignored since 10.0
    assert trt._state.flags == []  # precision comes from the Q/DQ nodes, no INT8 flag
    assert trt._state.config.builder_optimization_level == 4 and meta["optimization_level"] == 4

    trt = use_trt("10.3")
    meta = build(stage0(bundle), tmp_path)  # fp32 graph at fp32: weakly typed, no flags
    assert network_flag_names(trt) == set() and trt._state.flags == [] and not meta["strongly_typed"]

    trt = use_trt("10.3")
    build(stage0(bundle), tmp_path, precision="fp16")  # fp16 from an fp32 graph: the FP16 flag
    assert network_flag_names(trt) == set() and flag_names(trt, "BuilderFlag", trt._state.flags) == {"FP16"}


def test_trt11_always_strongly_typed_and_never_touches_removed_flags(bundle, tmp_path, use_trt):
    trt = use_trt("11.0")
    assert not hasattr(trt.BuilderFlag, "FP16") and not hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    meta = build(qdq_model(tmp_path / "q.onnx"), tmp_path, precision="int8")
    assert network_flag_names(trt) == {"STRONGLY_TYPED"} and trt._state.flags == []
    assert meta["strongly_typed"] is True

    trt = use_trt("11.0")
    meta = build(stage0(bundle), tmp_path)
    assert meta["strongly_typed"] is True and trt._state.flags == []

    use_trt("11.0")
    with pytest.raises(EdgeExitError, match="strongly typed") as err:
        build(stage0(bundle), tmp_path, precision="fp16")
    assert "export.precision: fp16" in str(err.value) and "\n" not in str(err.value)


def test_int8_without_qdq_is_refused(bundle, tmp_path, use_trt):
    use_trt("10.3")
    with pytest.raises(EdgeExitError, match="explicit Q/DQ"):
        build(stage0(bundle), tmp_path, precision="int8")
    use_trt("8.5")
    with pytest.raises(EdgeExitError, match="Q/DQ"):
        build(qdq_model(tmp_path / "q.onnx"), tmp_path, precision="fp16")


def test_parser_errors_name_the_nodes(bundle, tmp_path, use_trt):
    from edgeexit.export.tensorrt import graph_facts

    trt = use_trt("10.3")
    trt._state.parser_errors = [("Unsupported operator FancyOp\nno importer", 3, "/block/fancy", "FancyOp")]
    with pytest.raises(EdgeExitError) as err:
        build(stage0(bundle), tmp_path)
    text = str(err.value)
    assert "cannot parse stage0.onnx" in text and "node '/block/fancy' (FancyOp)" in text and "\n" not in text

    trt = use_trt("8.5")  # 8.5: only a node index; the name comes from the graph itself
    trt._state.parser_errors = [("Assertion failed: axis", 1), ("graph error", -1)]
    with pytest.raises(EdgeExitError) as err:
        build(stage0(bundle), tmp_path)
    facts = graph_facts(stage0(bundle))
    assert f"node {facts.node_names[1]!r} ({facts.node_ops[1]}): Assertion failed: axis" in str(err.value)
    assert "graph: graph error" in str(err.value)
    assert not (tmp_path / "stage.plan").exists()


def test_failed_build_is_one_line_and_writes_nothing(bundle, tmp_path, use_trt):
    trt = use_trt("10.3")
    trt._state.fail_build = True
    with pytest.raises(EdgeExitError) as err:
        build(stage0(bundle), tmp_path)
    assert "out of memory" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "stage.plan").exists() and not (tmp_path / "timing.cache").exists()


def test_dla_settings(bundle, tmp_path, use_trt):
    trt = use_trt("10.3", dla_cores=2)
    build(stage0(bundle), tmp_path, precision="fp16", dla_core=1)
    cfg = trt._state.config
    assert cfg.default_device_type == trt.DeviceType.DLA and cfg.DLA_core == 1
    assert flag_names(trt, "BuilderFlag", trt._state.flags) == {"FP16", "GPU_FALLBACK"}
    use_trt("10.3", dla_cores=2)
    with pytest.raises(EdgeExitError, match="fp16 or int8"):
        build(stage0(bundle), tmp_path, precision="fp32", dla_core=0)
    use_trt("10.3", dla_cores=0)
    with pytest.raises(EdgeExitError, match="0 DLA core"):
        build(stage0(bundle), tmp_path, precision="fp16", dla_core=0)


def test_dla_builds_are_static_and_report_where_layers_landed(bundle, tmp_path, use_trt):
    trt = use_trt("8.6", dla_cores=2)
    meta = build(stage0(bundle), tmp_path, precision="fp16", dla_core=0, batch=(1, 8, 32))
    assert all(lo == hi for shapes in trt._state.profiles for lo, _, hi in shapes.values())  # DLA: static only
    assert trt._state.config.profiling_verbosity == trt.ProfilingVerbosity.DETAILED
    assert meta["placement"]["dla"] == 1 and meta["placement"]["gpu"] == 2
    assert meta["placement"]["dla_layers"][0].startswith("{ForeignNode[")
    use_trt("8.6", dla_cores=2)
    with pytest.raises(EdgeExitError, match="DLA has no dynamic shapes.*profiles: buckets"):
        build(stage0(bundle), tmp_path, precision="fp16", dla_core=0, profiles="range")


def test_a_dla_set_where_nothing_lands_on_the_dla_is_refused(bundle, use_trt):
    from edgeexit.bundle import load_bundle
    from edgeexit.export.tensorrt import build_engines

    before = snapshot(bundle)
    trt = use_trt("10.3", dla_cores=2)
    trt._state.dla_takes = False  # every layer falls back to the GPU
    with pytest.raises(EdgeExitError) as err:
        build_engines(bundle, DEVICE, precision="fp16", dla_core=0, progress=False)
    text = str(err.value)
    assert "nothing landed on DLA core 0" in text and "stage 0 (" in text and "stage 2 (" in text and "\n" not in text
    assert snapshot(bundle) == before and leftovers(bundle.parent) == []

    trt = use_trt("10.3", dla_cores=2)
    build_engines(bundle, DEVICE, precision="fp16", dla_core=0, progress=False)
    entry = load_bundle(bundle).manifest["engines"][f"{DEVICE}-trt10.3"]
    meta = json.loads((bundle / entry["metadata"]).read_text())
    assert [m["placement"]["dla"] for m in meta["stages"]] == [1, 1, 1] and entry["dla_stages"] == [0, 1, 2]


def test_engines_checks_its_choices_before_it_needs_tensorrt(bundle, monkeypatch):
    from edgeexit.export.tensorrt import build_engines

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    cases = [(dict(device_name="jetson-orn-nano-8gb"), "unknown device"),
             (dict(device_name="jetson-nano"), "TensorRT 8.2, older than 8.5; run this bundle on onnxruntime"),
             (dict(device_name="jetson-orin-nano-8gb", dla_core=0), "0 DLA core"),
             (dict(device_name=DEVICE, precision="int4"), "unknown precision"),
             (dict(device_name=DEVICE, precision="fp32", dla_core=0), "DLA of jetson-agx-orin-64gb runs fp16, int8")]
    for kwargs, message in cases:
        with pytest.raises(EdgeExitError, match=message):
            build_engines(bundle, progress=False, **kwargs)
    with pytest.raises(EdgeExitError, match="not installed here"):  # valid choices: only then TensorRT is missed
        build_engines(bundle, "jetson-orin-nano-8gb", precision="fp16", progress=False)


def test_a_foreign_timing_cache_is_replaced_not_a_crash(bundle, tmp_path, use_trt):
    trt = use_trt("10.3")
    (tmp_path / "timing.cache").write_bytes(b"foreign bytes")  # create_timing_cache returns None for it
    build(stage0(bundle), tmp_path)
    assert trt._state.cache_loaded == b"" and (tmp_path / "timing.cache").read_bytes() == b"+timed"


def test_tensorrt_older_than_85_is_refused(bundle, tmp_path, use_trt):
    trt = use_trt("8.5")
    trt.__version__ = "8.2.1.8"
    with pytest.raises(EdgeExitError, match="older than 8.5"):
        build(stage0(bundle), tmp_path)


# --- build_engines on a real bundle (fake TensorRT) -------------------------------------------------


def test_build_engines_adds_engines_and_reseals_the_bundle(bundle, use_trt, capsys):
    from edgeexit.bundle import load_bundle
    from edgeexit.export.tensorrt import build_engines

    before = snapshot(bundle)
    trt = use_trt("10.3")
    out = build_engines(bundle, DEVICE, optimization_level=3)
    key = f"{DEVICE}-trt10.3"
    assert out == bundle / "engines" / key
    loaded = load_bundle(bundle)  # every checksum, the new files included
    entry = loaded.manifest["engines"][key]
    assert entry["stages"] == [f"engines/{key}/stage{k}.plan" for k in range(3)]
    assert entry["tensorrt"] == "10.3.0.26" and entry["metadata"] == f"engines/{key}/engine.json"
    for rel in [*entry["stages"], entry["metadata"], f"engines/{key}/timing.cache"]:
        assert rel in loaded.manifest["files"] and (bundle / rel).is_file()
    meta = json.loads((bundle / entry["metadata"]).read_text())
    assert [m["stage"] for m in meta["stages"]] == [0, 1, 2] and meta["workspace_mb"] == 4096
    assert meta["stages"][1]["profiles"]["inputs"]["s0_carry0"] == [32, 8, 8]
    assert meta["stages"][1]["profiles"]["batches"][0] == [1, 1, 1] and meta["batch"]["profiles"] == "buckets"
    assert trt._state.pool_limits == {trt.MemoryPoolType.WORKSPACE: 4096 << 20}  # from the device profile
    after = snapshot(bundle)
    assert {k: v for k, v in after.items() if k in before and k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}  # nothing else changed
    assert leftovers(bundle.parent) == []  # no staging left
    err = capsys.readouterr().err
    assert "stage 3/3" in err

    use_trt("10.3")  # rebuilding replaces the set and reuses its timing cache
    build_engines(bundle, DEVICE, progress=False)
    assert sorted(load_bundle(bundle).manifest["engines"]) == [key]
    assert sys.modules["tensorrt"]._state.cache_loaded.startswith(b"+timed")


def _board(root: Path, model: str, release: str) -> Path:
    (root / "proc/device-tree").mkdir(parents=True, exist_ok=True)
    (root / "etc").mkdir(exist_ok=True)
    (root / "proc/device-tree/model").write_text(model + "\0")
    (root / "etc/nv_tegra_release").write_text(f"# R{release} (release), REVISION: 4.3, GCID: 1, BOARD: generic\n")
    return root


def test_the_engine_cache_reuses_a_plan_only_for_the_same_module_l4t_tensorrt_graph_and_settings(
        bundle, tmp_path, use_trt, monkeypatch, capsys):
    import shutil

    from edgeexit.bundle import load_bundle
    from edgeexit.export.tensorrt import build_engines

    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEEXIT_BOARD_ROOT", str(_board(tmp_path / "orin", "NVIDIA Jetson AGX Orin", "36")))
    builds = []

    def counted(version):
        trt = use_trt(version)
        real = trt.Builder

        def builder(logger):
            b = real(logger)
            original = b.build_serialized_network
            b.build_serialized_network = lambda *a: (builds.append(1), original(*a))[1]
            return b
        trt.Builder = builder
        return trt

    per_set = 4  # three stage plans and the fused cascade plan
    counted("10.3")
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    build_engines(bundle, DEVICE, cache=cache, progress=False)
    assert len(builds) == per_set and len(list(cache.iterdir())) == per_set
    key = f"{DEVICE}-trt10.3"
    first = {rel: load_bundle(bundle).manifest["files"][rel] for rel in load_bundle(bundle).manifest["engines"][key]["stages"]}

    counted("10.3")  # another bundle with the same graphs: nothing is built
    build_engines(copy, DEVICE, cache=cache)
    assert len(builds) == per_set
    err = capsys.readouterr().err
    assert "(0 built, 3 from the cache)" in err and "fused cascade graph (stages/cascade.onnx, fp32) from the engine" in err
    reused = load_bundle(copy).manifest
    assert {rel: reused["files"][rel] for rel in reused["engines"][key]["stages"]} == first
    meta = json.loads((copy / reused["engines"][key]["metadata"]).read_text())
    assert all(m["from_cache"] for m in meta["stages"]) and [m["stage"] for m in meta["stages"]] == [0, 1, 2]

    counted("10.3")  # a different precision, optimization level or module each misses
    build_engines(copy, DEVICE, cache=cache, progress=False, optimization_level=2)
    assert len(builds) == 2 * per_set
    monkeypatch.setenv("EDGEEXIT_BOARD_ROOT", str(_board(tmp_path / "nx", "NVIDIA Jetson Orin NX", "36")))
    counted("10.3")
    build_engines(copy, DEVICE, cache=cache, progress=False)
    assert len(builds) == 3 * per_set
    counted("8.6")  # another TensorRT
    build_engines(copy, DEVICE, cache=cache, progress=False)
    assert len(builds) == 4 * per_set

    damaged = [e for e in cache.iterdir() if (f := json.loads((e / "entry.json").read_text())["fields"])["tensorrt"]
               == "10.3.0.26" and f["module"] == "NVIDIA Jetson Orin NX" and f["optimization_level"] is None]
    assert len(damaged) == per_set
    (damaged[1] / "stage.plan").write_bytes(b"garbage")  # a damaged plan is not trusted: that stage is rebuilt
    counted("10.3")
    build_engines(copy, DEVICE, cache=cache, progress=False)
    assert len(builds) == 4 * per_set + 1 and not [p for p in cache.iterdir() if p.name.startswith(".")]
    assert load_bundle(copy).manifest["engines"][key]


def test_build_engines_failure_leaves_the_bundle_as_it_was(bundle, use_trt):
    from edgeexit.bundle import load_bundle
    from edgeexit.export.tensorrt import build_engines

    before = snapshot(bundle)
    trt = use_trt("10.3")
    trt._state.fail_build = True
    with pytest.raises(EdgeExitError, match="building stage0.onnx"):
        build_engines(bundle, DEVICE, progress=False)
    assert snapshot(bundle) == before
    assert leftovers(bundle.parent) == []
    load_bundle(bundle)


def test_build_engines_checks_the_device(bundle, use_trt):
    from edgeexit.export.tensorrt import build_engines

    use_trt("10.3")
    with pytest.raises(EdgeExitError, match="has no TensorRT"):
        build_engines(bundle, "host-cpu", progress=False)
    with pytest.raises(EdgeExitError, match="DLA core"):
        build_engines(bundle, "jetson-orin-nano-8gb", dla_core=0, progress=False)
    with pytest.raises(EdgeExitError, match="unknown device"):
        build_engines(bundle, "no-such-device", progress=False)


# --- the backend on the simulator ---------------------------------------------------------------


def test_contiguous_runs_and_launch_shape():
    from edgeexit.runtime.pycuda_memory import contiguous_runs, gather_launch

    assert contiguous_runs([0, 1, 2, 5, 6, 9]) == [(0, 0, 3), (5, 3, 2), (9, 5, 1)]
    assert contiguous_runs([4, 2, 3]) == [(4, 0, 1), (2, 1, 2)]
    assert contiguous_runs([]) == []
    assert gather_launch(10, 32 * 8 * 8 * 4) == ("u32", 2048, 80)
    assert gather_launch(3, 3) == ("u8", 3, 1)
    assert gather_launch(10**6, 4096)[2] == 65535  # grid-stride loop covers the rest


@pytest.mark.parametrize("row_shape, dtype", [((32, 8, 8), np.float32), ((10,), np.float16), ((3,), np.uint8),
                                              ((5,), np.int64)])
@pytest.mark.parametrize("grid", ["launch", 1, 3])
def test_gather_kernel_source_gathers_like_numpy(row_shape, dtype, grid):
    """The kernel's own code, run on the host: dst[i] = src[rows[i]] for any rows, row size and
    grid (a grid smaller than the work exercises the grid-stride loop); nothing past n rows of
    dst is written."""
    from edgeexit.runtime.pycuda_memory import _BLOCK, gather_launch

    kernel = host_gather()
    if kernel is None:
        pytest.skip("no C++ compiler here to run the gather kernel's source on the host")
    rng = np.random.default_rng(7)
    src = rng.integers(0, 250, size=(64, *row_shape)).astype(dtype)
    for rows in (np.array([3, 0, 63, 17, 17, 40]), np.arange(10, 42), rng.permutation(64)[:37], np.array([5])):
        rows = rows.astype(np.int64)
        dst = np.full((len(rows) + 2, *row_shape), 7, dtype)  # two guard rows after the n written
        kind, units, blocks = gather_launch(len(rows), src[0].nbytes)
        kernel.launch(kind, blocks if grid == "launch" else grid, _BLOCK, dst.ctypes.data, src.ctypes.data,
                      rows.ctypes.data, len(rows), units)
        np.testing.assert_array_equal(dst[:len(rows)], src[rows])
        assert (dst[len(rows):] == 7).all()


def test_select_engines(bundle):
    from edgeexit.bundle import Bundle
    from edgeexit.runtime.tensorrt_backend import select_engines

    manifest = {"engines": {f"{DEVICE}-trt10.3": {"stages": []}, "jetson-orin-nx-16gb-trt8.5": {"stages": []}}}
    b = Bundle(bundle, manifest)
    assert select_engines(b, version=(10, 3, 0))[0] == f"{DEVICE}-trt10.3"
    assert select_engines(b, "jetson-orin-nx-16gb", version=(8, 5))[0] == "jetson-orin-nx-16gb-trt8.5"
    with pytest.raises(EdgeExitError, match="no engines for TensorRT 11.0"):
        select_engines(b, version=(11, 0))
    with pytest.raises(EdgeExitError, match="edgeexit engines"):
        select_engines(Bundle(bundle, {}), version=(10, 3))


def digits_batch(bundle_path):
    from edgeexit.bundle import load_bundle
    from edgeexit.data import normalize

    try:
        from sklearn.datasets import load_digits

        images = load_digits().images.astype(np.float32)[:, None][:300]
    except ImportError:
        images = np.random.default_rng(0).uniform(0, 16, (300, 1, 8, 8)).astype(np.float32)
    b = load_bundle(bundle_path)
    return b, normalize(images, b.input["mean"], b.input["std"])


def gpu_sim(monkeypatch, compile_ok=True, cuda_python=True):
    """Install the simulated pycuda (and cuda-python's driver, for graphs); reset the counters."""
    if compile_ok and host_gather() is None:
        pytest.skip("no C++ compiler here to run the gather kernel's source on the host")
    modules = {name: None for name in CUDA_MODULES}
    modules.update(fake_pycuda(compile_ok))
    if cuda_python:
        modules.update(fake_cuda_driver())
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    SIM.copies = SIM.launches = SIM.contexts = SIM.executions = SIM.graph_launches = SIM.own_memory_contexts = 0
    SIM.syncs = SIM.to_host_bytes = SIM.allocations = 0
    SIM.fail_enqueue = []
    SIM.capturing, SIM.capture_breaks, SIM.gpu = None, False, ("Simulated GPU", (8, 7))
    SIM.pending = SIM.last_error = SIM.context_syncs = 0
    SIM.sticky = None
    return modules


def reference_cascade(b, x):
    """The onnxruntime cascade with thresholds at the median confidence (about half leave per exit)."""
    from edgeexit.runtime.cascade import Cascade, trace
    from edgeexit.runtime.onnxruntime_backend import OnnxRuntimeBackend

    reference = OnnxRuntimeBackend(b.stage_paths, b.stage_ios)
    traced = trace(reference, b.stage_ios, x, 64)
    thresholds = [float(np.median(traced.exit_conf[:, 0])), float(np.median(traced.exit_conf[:, 1])), None]
    return thresholds, Cascade(reference, b.stage_ios, thresholds).run_batched(x, 64, collect=True)


def assert_same(got, want):
    np.testing.assert_array_equal(got.exit, want.exit)
    np.testing.assert_array_equal(got.pred, want.pred)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.conf, want.conf, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got.stage_samples, want.stage_samples)


@pytest.fixture()
def engines_bundle(bundle, use_trt):
    """The example bundle with engines built by the fake TensorRT 10.3 (the plans embed the ONNX)."""
    from edgeexit.export.tensorrt import build_engines

    use_trt("10.3")
    build_engines(bundle, DEVICE, progress=False)
    return bundle


@pytest.mark.parametrize("version_key, gather, api, graphs", [
    ("10.3", "kernel", "auto", True), ("10.3", "memcpy", "auto", False), ("8.5", "auto", "auto", True),
    ("8.5", "auto", "tensors", False), ("11.0", "kernel", "auto", True)])
def test_backend_cascade_matches_onnxruntime_on_the_simulator(bundle, use_trt, monkeypatch, version_key, gather,
                                                              api, graphs):
    from edgeexit.export.tensorrt import build_engines
    from edgeexit.runtime.cascade import Cascade
    from edgeexit.runtime.tensorrt_backend import TensorRTBackend

    use_trt(version_key)
    build_engines(bundle, DEVICE, progress=False)
    b, x = digits_batch(bundle)
    thresholds, want = reference_cascade(b, x)
    assert 0 < want.exit_shares()[0] < 1 and 0 < want.exit_shares()[1] < 1

    pycuda = gpu_sim(monkeypatch, compile_ok=gather != "memcpy")
    backend = TensorRTBackend.from_bundle(b, gather=gather, api=api, graphs=graphs)
    with backend:
        assert backend.api == ("bindings" if version_key in TRT8 and api == "auto" else "tensors")
        assert backend.gather_mode == ("memcpy" if gather == "memcpy" else "kernel")
        cascade = Cascade(backend, b.stage_ios, thresholds)
        # What may cross to the host: conf + pred of every active sample at every stage, and the
        # logits of each sample once, where it leaves. Never an activation.
        pred_bytes = 4 if version_key in TRT8 else 8  # 8.x's ONNX parser makes int64 int32
        allowed = int(want.stage_samples.sum()) * (4 + pred_bytes) + want.logits.size * 4
        for i in range(3):  # plain runs, then (with graphs) captures, then replays: the same answers
            SIM.syncs = SIM.to_host_bytes = SIM.allocations = 0
            made = SIM.contexts + len(backend.graphs.graphs) + len(backend.graphs.failed)
            assert_same(cascade.run_batched(x, 64, collect=True), want)
            chunks = -(-len(x) // 64)  # the host waits once per stage (conf+pred), once for all logits,
            # and once after binding a new context to its profile and before each capture
            made = SIM.contexts + len(backend.graphs.graphs) + len(backend.graphs.failed) - made
            assert SIM.syncs <= (len(b.stage_ios) + 1) * chunks + made
            assert not made or i < 2  # the third pass only replays: no new context, no capture
            assert SIM.to_host_bytes == allowed
            if i:
                assert SIM.allocations == 0  # every buffer was made on the first pass, once per bucket
        keys = {(k, bucket) for k, bucket in backend.graphs.runs}
        assert SIM.contexts == len(keys)  # one context per (stage, bucket), made once
        assert SIM.own_memory_contexts == 0  # all of them share one activation block
        if graphs:
            assert backend.graphs.graphs and not backend.graphs.failed and SIM.graph_launches > 0
        else:
            assert not backend.graphs.graphs and SIM.graph_launches == 0
    assert pycuda["pycuda.driver"].pushed == 0  # the context was released
    assert not backend.buffers and (not graphs or pycuda["cuda.bindings.driver"].graphs_alive == 0)
    if gather == "memcpy":
        assert SIM.copies > 0 and SIM.launches == 0
    else:
        assert SIM.launches > 0


def set_profiles(bundle_path, mode):
    """Rewrite the bundle's export.batch.profiles (and reseal), as a yaml with that key would have built it."""
    from edgeexit.bundle import Change, load_bundle, update_bundle

    b = load_bundle(bundle_path)
    export = {**b.manifest["export"], "batch": {**b.manifest["export"]["batch"], "profiles": mode}}
    update_bundle(b, lambda current: Change({}, {"export": export}))


@pytest.mark.parametrize("version_key", ["8.5", "8.6", "10.3", "11.0"])
@pytest.mark.parametrize("profiles", ["buckets", "range"])
def test_cascades_of_every_size_match_onnxruntime_plain_captured_and_replayed(bundle, use_trt, monkeypatch,
                                                                              version_key, profiles):
    """The acceptance test of the profile rules: on each version's simulator, a cascade over
    batch sizes 1, 3, 5, 17, 33, 64 and a 300-sample run_batched give onnxruntime's answers on
    the first (plain), second (captured) and third (replayed) pass. Before 10.0 every context
    needs its own profile: per-bucket profiles give each (stage, bucket) one, and a range
    profile shares one context per stage, reshaped per bucket, without graphs."""
    from edgeexit.export.tensorrt import build_engines
    from edgeexit.runtime.cascade import Cascade
    from edgeexit.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from edgeexit.runtime.tensorrt_backend import TensorRTBackend

    set_profiles(bundle, profiles)
    use_trt(version_key)
    build_engines(bundle, DEVICE, progress=False)
    b, x = digits_batch(bundle)
    thresholds, _ = reference_cascade(b, x)
    reference = Cascade(OnnxRuntimeBackend(b.stage_paths, b.stage_ios), b.stage_ios, thresholds)
    sizes = (1, 3, 5, 17, 33, 64)
    want = [reference(x[:n], collect=True) for n in sizes]
    want_all = reference.run_batched(x, 64, collect=True)
    gpu_sim(monkeypatch)
    with TensorRTBackend.from_bundle(b, warmup=1) as backend:
        cascade = Cascade(backend, b.stage_ios, thresholds)
        for _ in range(3):  # plain, then captured, then replayed
            for n, w in zip(sizes, want):
                assert_same(cascade(x[:n], collect=True), w)
            assert_same(cascade.run_batched(x, 64, collect=True), want_all)
        assert SIM.context_syncs == 0  # buffers are zeroed on the stream, never with a device-wide wait
        shared = profiles == "range" and version_key in TRT8
        if shared:  # one context per stage and profile; no graphs, and the reason is given
            assert not backend.graphs.graphs and SIM.graph_launches == 0
            assert all("TensorRT < 10" in why for why in backend.graphs.failed.values())
            assert SIM.contexts == len(b.stage_ios)
        else:
            assert backend.graphs.graphs and not backend.graphs.failed and SIM.graph_launches > 0
            assert SIM.contexts == len({key for key in backend.graphs.runs})
    assert sys.modules["pycuda.driver"].pushed == 0


def test_the_8x_simulator_enforces_one_context_per_profile(bundle, use_trt):
    """What the code before per-bucket profiles did on 8.5: a second context without
    set_optimization_profile_async has no profile and cannot run; asking for a profile a live
    context holds fails with TensorRT's message."""
    from edgeexit.export.tensorrt import build_engines

    trt = use_trt("8.5")
    build_engines(bundle, DEVICE, progress=False)
    engine = trt.Runtime(None).deserialize_cuda_engine((bundle / "engines" / f"{DEVICE}-trt8.5" / "stage0.plan").read_bytes())
    first, second = engine.create_execution_context(), engine.create_execution_context()
    assert first._profile == 0 and second._profile == -1
    assert not second.set_input_shape("image", (1, 1, 8, 8))
    assert not second.set_optimization_profile_async(0, 0)  # profile 0 is chosen by `first`
    assert second.set_optimization_profile_async(3, 0) and second.set_input_shape("image", (8, 1, 8, 8))
    assert not second.set_input_shape("image", (4, 1, 8, 8))  # outside profile 3 (batch 8)
    assert not first.set_tensor_address("no-such-tensor", 0x100)
    del first
    third = engine.create_execution_context()
    assert third._profile == 0  # profile 0 is free again once its context is gone
    trt10 = use_trt("10.3")
    build_engines(bundle, DEVICE, progress=False)
    engine = trt10.Runtime(None).deserialize_cuda_engine(
        (bundle / "engines" / f"{DEVICE}-trt10.3" / "stage0.plan").read_bytes())
    assert [engine.create_execution_context()._profile for _ in range(2)] == [0, 0]  # 10.0+: shared


def test_a_failed_capture_clears_the_cuda_error_and_the_next_plain_call_runs(engines_bundle, monkeypatch):
    from edgeexit.runtime.cascade import Cascade
    from edgeexit.runtime.tensorrt_backend import TensorRTBackend

    b, x = digits_batch(engines_bundle)
    thresholds, want = reference_cascade(b, x[:64])
    gpu_sim(monkeypatch)
    with TensorRTBackend.from_bundle(b, warmup=1) as backend:
        SIM.capture_breaks = True  # the first capture is invalidated and leaves the error set
        cascade = Cascade(backend, b.stage_ios, thresholds)
        assert_same(cascade(x[:64], collect=True), want)  # the enqueue after the failed capture ran
        assert SIM.last_error == 0 and "INVALIDATED" in backend.graphs.failed[(0, 64)]


def test_recovery_raises_the_original_error_and_a_sticky_one_says_to_reopen(engines_bundle, monkeypatch):
    from edgeexit.runtime.cascade import Cascade
    from edgeexit.runtime.tensorrt_backend import TensorRTBackend

    b, x = digits_batch(engines_bundle)
    thresholds, _ = reference_cascade(b, x[:64])
    gpu_sim(monkeypatch)
    with TensorRTBackend.from_bundle(b) as backend:
        cascade = Cascade(backend, b.stage_ios, thresholds)
        cascade(x[:64])  # contexts made and bound
        SIM.fail_enqueue = [True]
        SIM.sticky = "an illegal memory access was encountered"  # the wait in recovery raises too
        with pytest.raises(EdgeExitError, match="stage 0 failed to enqueue"):
            cascade(x[:64])
        with pytest.raises(EdgeExitError, match="error state .*illegal memory access.*open a new one"):
            cascade(x[:64])
        SIM.sticky = None


def test_an_address_the_engine_refuses_is_an_error():
    from edgeexit.runtime.tensorrt_backend import _TensorNames

    api = _TensorNames.__new__(_TensorNames)
    context = types.SimpleNamespace(set_tensor_address=lambda name, ptr: name != "bad")
    api.bind(context, {"good": 0x100}, 0)
    with pytest.raises(EdgeExitError, match="refuses an address for tensor 'bad'"):
        api.bind(context, {"good": 0x100, "bad": 0x200}, 0)


def test_padding_rows_never_reach_the_results(engines_bundle, monkeypatch):
    """Batches between buckets run padded; every answer matches running each sample alone."""
    from edgeexit.runtime.cascade import Cascade
    from edgeexit.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from edgeexit.runtime.tensorrt_backend import TensorRTBackend

    b, x = digits_batch(engines_bundle)
    gpu_sim(monkeypatch)
    thresholds = [0.99, 0.99, None]
    with TensorRTBackend.from_bundle(b) as backend:
        for n in (1, 3, 5, 17, 33):
            got = Cascade(backend, b.stage_ios, thresholds)(x[:n])
            want = Cascade(OnnxRuntimeBackend(b.stage_paths, b.stage_ios), b.stage_ios, thresholds)(x[:n])
            assert_same(got, want)
        assert {bucket for _, bucket in backend.graphs.runs} >= {1, 4, 8, 32, 64}


def test_a_capture_that_fails_runs_plainly(engines_bundle, monkeypatch):
    from edgeexit.runtime.cascade import Cascade
    from edgeexit.runtime.tensorrt_backend import TensorRTBackend

    b, x = digits_batch(engines_bundle)
    thresholds, want = reference_cascade(b, x[:64])
    gpu_sim(monkeypatch)
    with TensorRTBackend.from_bundle(b, warmup=1) as backend:
        SIM.capture_breaks = True  # the first capture is invalidated
        cascade = Cascade(backend, b.stage_ios, thresholds)
        for _ in range(3):
            assert_same(cascade.run_batched(x[:64], 64, collect=True), want)
        assert list(backend.graphs.failed) == [(0, 64)]
        assert "INVALIDATED" in backend.graphs.failed[(0, 64)]
        assert (0, 64) not in backend.graphs.graphs and (1, 32) in backend.graphs.graphs


def test_graphs_need_cuda_python_and_run_plainly_without_it(engines_bundle, monkeypatch):
    from edgeexit.runtime.cascade import Cascade
    from edgeexit.runtime.tensorrt_backend import TensorRTBackend

    b, x = digits_batch(engines_bundle)
    thresholds, want = reference_cascade(b, x[:64])
    gpu_sim(monkeypatch, cuda_python=False)
    with TensorRTBackend.from_bundle(b) as backend:
        for _ in range(3):
            assert_same(Cascade(backend, b.stage_ios, thresholds)(x[:64], collect=True), want)
        assert not backend.graphs.graphs
        assert all("cuda-python is not installed" in why for why in backend.graphs.failed.values())


def test_a_failed_call_does_not_poison_the_next(engines_bundle, monkeypatch):
    from edgeexit.runtime.cascade import Cascade
    from edgeexit.runtime.tensorrt_backend import TensorRTBackend

    b, x = digits_batch(engines_bundle)
    thresholds, want = reference_cascade(b, x[:64])
    gpu_sim(monkeypatch)
    with TensorRTBackend.from_bundle(b) as backend:
        cascade = Cascade(backend, b.stage_ios, thresholds)
        SIM.fail_enqueue = [False, True]  # stage 1 fails, after stage 0 ran and the gathers were queued
        with pytest.raises(EdgeExitError, match="stage 1 failed to enqueue at batch 32"):
            cascade(x[:64])
        assert backend.lock.acquire(blocking=False)  # the lock was released
        backend.lock.release()
        for _ in range(3):
            assert_same(cascade(x[:64], collect=True), want)
        with pytest.raises(EdgeExitError, match="max batch 256"):
            cascade(np.zeros((300, 1, 8, 8), np.float32))
        assert_same(cascade(x[:64], collect=True), want)


def test_calls_from_other_threads_push_the_context_and_are_serialised(engines_bundle, monkeypatch):
    import threading

    from edgeexit.runtime.cascade import Cascade
    from edgeexit.runtime.tensorrt_backend import TensorRTBackend

    b, x = digits_batch(engines_bundle)
    thresholds, want = reference_cascade(b, x[:64])
    pycuda = gpu_sim(monkeypatch)
    driver = pycuda["pycuda.driver"]
    with TensorRTBackend.from_bundle(b) as backend:
        cascade = Cascade(backend, b.stage_ios, thresholds)
        results, seen = [], []
        original = backend._enter

        def enter():
            original()
            seen.append(driver.pushed)

        backend._enter = enter
        threads = [threading.Thread(target=lambda: results.append(cascade(x[:64], collect=True))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 4 and seen == [1] * 4  # this call's push only, one call at a time
        for got in results:
            assert_same(got, want)
        assert driver.pushed == 0  # no thread keeps the context between calls
        closer = threading.Thread(target=backend.close)  # closing from another thread works too
        closer.start()
        closer.join()
        assert backend._ctx is None and not backend.buffers
    assert driver.pushed == 0


def test_engines_from_another_tensorrt_or_gpu_are_refused(engines_bundle, monkeypatch):
    from edgeexit.bundle import load_bundle
    from edgeexit.runtime.tensorrt_backend import TensorRTBackend

    b = load_bundle(engines_bundle)
    meta = engines_bundle / b.manifest["engines"][f"{DEVICE}-trt10.3"]["metadata"]
    record = json.loads(meta.read_text())
    gpu_sim(monkeypatch)

    sys.modules["tensorrt"].__version__ = "10.3.1.5"  # same 10.3 key, another release
    with pytest.raises(EdgeExitError, match=r"built by TensorRT 10\.3\.0\.26, this is 10\.3\.1\.5.*edgeexit engines"):
        TensorRTBackend.from_bundle(b)
    sys.modules["tensorrt"].__version__ = "10.3.0.26"

    record["gpu"] = {"name": "Orin", "compute_capability": "8.7"}
    meta.write_text(json.dumps(record))  # the check reads engine.json itself (no reload needed)
    SIM.gpu = ("NVIDIA H200", (9, 0))
    with pytest.raises(EdgeExitError, match=r"built for SM 8\.7 \(Orin\), this GPU is SM 9\.0 \(NVIDIA H200\)"):
        TensorRTBackend.from_bundle(b)
    SIM.gpu = ("Orin (nvgpu)", (8, 7))
    with pytest.raises(EdgeExitError, match="built on Orin, this GPU is Orin \\(nvgpu\\)"):
        TensorRTBackend.from_bundle(b)
    SIM.gpu = ("Orin", (8, 7))
    with TensorRTBackend.from_bundle(b) as backend:
        assert backend.gpu == {"name": "Orin", "compute_capability": "8.7"}
    assert sys.modules["pycuda.driver"].pushed == 0


def test_cli_runs_and_profiles_a_bundle_on_tensorrt(engines_bundle, monkeypatch, tmp_path, capsys):
    """`edgeexit run/profile --backend tensorrt` on the simulator: the loader, the engine check
    and the profiler's machine facts, end to end through the CLI."""
    from edgeexit.bundle import load_bundle
    from edgeexit.cli import main
    from edgeexit.profile import read_profiles

    b, x = digits_batch(engines_bundle)
    raw = x[:20] * np.asarray(b.input["std"], np.float32).reshape(1, -1, 1, 1) + \
        np.asarray(b.input["mean"], np.float32).reshape(1, -1, 1, 1)  # back to pixel units: run normalises
    np.save(tmp_path / "x.npy", raw)
    gpu_sim(monkeypatch)
    answers = {}
    for backend in ("onnxruntime", "tensorrt"):
        assert main(["run", str(engines_bundle), "--input", str(tmp_path / "x.npy"), "--backend", backend, "--json"]) == 0
        answers[backend] = json.loads(capsys.readouterr().out)
    assert answers["tensorrt"]["backend"] == "tensorrt"
    for a, t in zip(answers["onnxruntime"]["samples"], answers["tensorrt"]["samples"]):
        assert (a["class"], a["exit"]) == (t["class"], t["exit"]) and abs(a["confidence"] - t["confidence"]) < 1e-5
    assert main(["profile", str(engines_bundle), "--backend", "tensorrt", "--batch", "1,8", "--iters", "3",
                 "--warmup", "1", "--quiet"]) == 0
    entry = read_profiles(engines_bundle)["profiles"]["tensorrt@Simulated GPU"]
    assert entry["machine"]["compute_capability"] == "8.7" and set(entry["batches"]) == {"1", "8"}
    load_bundle(engines_bundle)  # resealed: every checksum holds
    assert sys.modules["pycuda.driver"].pushed == 0


def test_backend_checks_shapes_and_the_bindings_api_is_refused_on_10(engines_bundle, monkeypatch, use_trt):
    from edgeexit.bundle import load_bundle
    from edgeexit.runtime.static import Rows
    from edgeexit.runtime.tensorrt_backend import TensorRTBackend

    gpu_sim(monkeypatch)
    with TensorRTBackend.from_bundle(load_bundle(engines_bundle)) as backend:
        out = backend.run(0, {"image": np.zeros((3, 1, 8, 8))})  # a host float64 array is copied up as float32
        assert out["s0_carry0"] == Rows("s0_carry0", 4, 3)
        assert backend.download(out["s0_logits"]).shape == (3, 10)
        with pytest.raises(EdgeExitError, match="max batch 256"):
            backend.run(0, {"image": backend.upload(np.zeros((300, 1, 8, 8), np.float32))})
        with pytest.raises(EdgeExitError, match=r"input image takes \[N, 1, 8, 8\], got \[2, 1, 4, 4\]"):
            backend.run(0, {"image": backend.upload(np.zeros((2, 1, 4, 4), np.float32))})
    with pytest.raises(EdgeExitError, match="no bindings API"):
        TensorRTBackend.from_bundle(load_bundle(engines_bundle), api="bindings")


# --- the TensorRT names used by the code exist where they are used --------------------------------


def _trt_chains(tree: ast.AST) -> set[str]:
    """Every `trt.X` / `trt.X.Y` accessed in a module (longest chain, dunders below the top cut)."""
    chains = set()

    class Visitor(ast.NodeVisitor):
        def visit_Attribute(self, node):
            parts, cur = [], node
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id == "trt":
                parts.reverse()
                chains.add(".".join(p for i, p in enumerate(parts[:2]) if i == 0 or not p.startswith("__")))
                return  # do not also count the inner prefix
            self.generic_visit(node)

    Visitor().visit(tree)
    return chains


def _hasattr_guards(tree: ast.AST) -> set[str]:
    """'X.Y' for every hasattr(trt.X, "Y") and 'X' for every hasattr(trt, "X") in a module."""
    guards = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr"
                and len(node.args) == 2 and isinstance(node.args[1], ast.Constant)):
            target = node.args[0]
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "trt":
                guards.add(f"{target.attr}.{node.args[1].value}")
            elif isinstance(target, ast.Name) and target.id == "trt":
                guards.add(str(node.args[1].value))
    return guards


@pytest.mark.parametrize("source", [BUILDER_SRC, BACKEND_SRC], ids=["builder", "backend"])
def test_every_trt_name_exists_and_version_specific_ones_are_guarded(source):
    tree = ast.parse(source.read_text())
    used = _trt_chains(tree)
    assert used, "expected TensorRT names in the module"
    unknown = sorted(used - set(TRT_NAMES))
    assert not unknown, f"names not in any supported TensorRT version's list: {unknown}"
    guards = _hasattr_guards(tree)
    for name in sorted(used):
        if TRT_NAMES[name] != ALL:  # guarded itself, or its enum is guarded and has the member wherever it exists
            top = name.split(".")[0]
            ok = name in guards or (top in guards and TRT_NAMES[name] == TRT_NAMES.get(top))
            assert ok, f"trt.{name} exists only in {sorted(TRT_NAMES[name])}; guard it with hasattr"


def test_fake_modules_match_the_name_lists():
    for key in VERSIONS:
        mod = fake_trt(key)
        for name, versions in TRT_NAMES.items():
            obj = mod
            present = True
            for part in name.split("."):
                if not hasattr(obj, part):
                    present = False
                    break
                obj = getattr(obj, part)
            assert present == (key in versions), (key, name)


# --- on real hardware --------------------------------------------------------------------------------


def test_real_tensorrt_cascade_matches_onnxruntime(bundle):
    """On a machine with TensorRT + pycuda + a GPU: build real engines and compare with onnxruntime.

    The device profile is taken from EDGEEXIT_TRT_DEVICE (default jetson-agx-orin-64gb).
    """
    pytest.importorskip("tensorrt", reason="TensorRT is installed only on NVIDIA machines (JetPack)")
    pytest.importorskip("pycuda.driver", reason="pycuda is installed only on NVIDIA machines")
    from edgeexit.export.tensorrt import build_engines, gpu_info
    from edgeexit.runtime.cascade import Cascade
    from edgeexit.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from edgeexit.runtime.tensorrt_backend import TensorRTBackend

    if gpu_info() is None:
        pytest.skip("no CUDA device visible")
    device = os.environ.get("EDGEEXIT_TRT_DEVICE", DEVICE)
    build_engines(bundle, device, progress=False)
    b, x = digits_batch(bundle)
    thresholds = b.thresholds
    want = Cascade(OnnxRuntimeBackend(b.stage_paths, b.stage_ios), b.stage_ios, thresholds).run_batched(x, 64)
    with TensorRTBackend.from_bundle(b, device) as backend:
        got = Cascade(backend, b.stage_ios, thresholds).run_batched(x, 64)
    assert np.mean(got.pred == want.pred) > 0.99
    np.testing.assert_allclose(got.conf[got.exit == want.exit], want.conf[got.exit == want.exit], atol=1e-3)


@pytest.mark.parametrize("arch", ["sm_72", "sm_87", "sm_90", "sm_110"])  # Xavier, Orin, H100/H200, Thor
def test_gather_kernel_compiles_for_the_jetson_gpus(tmp_path, arch):
    """The device-side gather kernel is real CUDA: nvcc builds it for each GPU it knows, warning-free."""
    import shutil
    import subprocess

    from edgeexit.runtime.pycuda_memory import GATHER_SOURCE

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed here")
    known = subprocess.run([nvcc, "--list-gpu-arch"], check=True, capture_output=True, text=True).stdout.split()
    if arch.replace("sm_", "compute_") not in known:
        pytest.skip(f"this nvcc cannot build for {arch} (CUDA 13 dropped Volta; JetPack 5's CUDA 11.4 builds it)")
    source = tmp_path / "gather.cu"
    source.write_text('extern "C" {\n' + GATHER_SOURCE + "\n}\n")  # pycuda's SourceModule wraps it so too
    cubin = tmp_path / "gather.cubin"
    subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-Werror", "all-warnings", str(source), "-o", str(cubin)],
                   check=True, capture_output=True)
    symbols = cubin.read_bytes()
    assert b"gather_rows_u32" in symbols and b"gather_rows_u8" in symbols


@pytest.mark.parametrize("version_key", ["8.5", "10.3"])
def test_the_fused_cascade_plan_is_built_beside_the_stages_and_runs_on_the_simulator(bundle, use_trt, monkeypatch,
                                                                                      version_key, capsys):
    """`edgeexit engines` builds the fused cascade graph as one static batch-1 plan (If branches
    and all), and `FusedTensorRT` runs it with the version's execution API: per input, the exit
    and class the staged onnxruntime cascade gives, from one enqueue and one read-back."""
    from edgeexit.export.tensorrt import FUSED_PLAN, build_engines
    from edgeexit.runtime.tensorrt_backend import FusedTensorRT

    use_trt(version_key)
    build_engines(bundle, DEVICE)
    assert "fused cascade graph (stages/cascade.onnx, fp32, batch 1) building" in capsys.readouterr().err
    b, x = digits_batch(bundle)
    key, entry = next(iter(b.manifest["engines"].items()))
    assert entry["fused"] == f"engines/{key}/{FUSED_PLAN}" and entry["fused"] in b.manifest["files"]
    meta = json.loads((bundle / entry["metadata"]).read_text())
    assert meta["fused"]["profiles"]["inputs"] == {} and meta["fused_refused"] is None  # static: no profile
    thresholds, staged = reference_cascade(b, x[:40])
    gpu_sim(monkeypatch, compile_ok=False)
    with FusedTensorRT(bundle / entry["fused"], b.input["name"], thresholds, 3, read=b.read) as fused:
        SIM.to_host_bytes = 0
        got = fused(x[:40])
        assert SIM.to_host_bytes == 40 * (10 * 4 + 4 + 4 + 4)  # per input: logits, conf, pred and exit, nothing else
    np.testing.assert_array_equal(got.exit, staged.exit)
    np.testing.assert_array_equal(got.pred, staged.pred)
    np.testing.assert_allclose(got.logits, staged.logits, rtol=1e-6, atol=1e-6)


def test_a_target_that_cannot_take_the_fused_graph_keeps_the_per_stage_plans_and_says_why(bundle, use_trt, capsys):
    from edgeexit.bundle import load_bundle
    from edgeexit.export.tensorrt import build_engines

    use_trt("10.3", dla_cores=2)
    build_engines(bundle, DEVICE, precision="fp16", dla_core=0)
    assert "fused cascade graph not built (DLA runs no conditionals (If)): the per-stage plans run" in \
        capsys.readouterr().err
    entry = next(iter(load_bundle(bundle).manifest["engines"].values()))
    assert entry["fused"] is None and len(entry["stages"]) == 3


def test_run_picks_the_fused_plan_at_batch_1_on_tensorrt_and_the_stages_otherwise(engines_bundle, monkeypatch):
    from edgeexit.runtime.cascade import Cascade
    from edgeexit.runtime.loader import open_cascade
    from edgeexit.runtime.tensorrt_backend import FusedTensorRT, TensorRTBackend

    b, x = digits_batch(engines_bundle)
    thresholds, want = reference_cascade(b, x[:8])
    gpu_sim(monkeypatch, compile_ok=False)
    with TensorRTBackend.from_bundle(b, gather="memcpy") as backend:
        one, note = open_cascade(b, backend, thresholds)
        assert isinstance(one, FusedTensorRT) and note is None
        with one:
            got = one(x[:8])
        assert (got.exit == want.exit).all() and (got.pred == want.pred).all()
        many, note = open_cascade(b, backend, thresholds, batch=8)
        assert isinstance(many, Cascade) and note is None
        timed, note = open_cascade(b, backend, thresholds, deadline=1.0, predict=lambda k, n: 0.0)
        assert isinstance(timed, Cascade) and "cannot stop between its stages on a clock" in note
