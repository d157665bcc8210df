"""edgeexit.doctor on fake Jetson trees, fake tensorrt / cuda-python modules, and this machine."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import types

import pytest

from edgeexit import doctor

RELEASES = {  # first line of /etc/nv_tegra_release -> (l4t, jetpack)
    "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, DATE: Mon May  6 17:34:21 UTC 2024":
        ("36.3.0", "6.0"),
    "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025":
        ("36.4.3", "6.2"),
    "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 19:57:35 UTC 2023":
        ("35.4.1", "5.1.2"),
    "# R37 (release), REVISION: 9.0, GCID: 1, BOARD: generic, EABI: aarch64, DATE: -": ("37.9.0", None),
}
MODEL = "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"
COMPATIBLE = ["nvidia,p3768-0000+p3767-0005-super", "nvidia,p3767-0005", "nvidia,tegra234"]
SYSTEM_TRT = "/usr/lib/python3.10/dist-packages/tensorrt/__init__.py"


def jetson_tree(tmp_path, release_line, nvcc=True):
    """A root with etc/nv_tegra_release, the device-tree model/compatible and maybe nvcc."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text(release_line + "\n# KERNEL_VARIANT: oot\n")
    dt = tmp_path / "proc/device-tree"
    dt.mkdir(parents=True)
    (dt / "model").write_bytes(MODEL.encode() + b"\x00")
    (dt / "compatible").write_bytes(b"".join(c.encode() + b"\x00" for c in COMPATIBLE))
    if nvcc:
        bin_dir = tmp_path / "usr/local/cuda/bin"
        bin_dir.mkdir(parents=True)
        (bin_dir / "nvcc").write_text("#!/bin/sh\n")
        (bin_dir / "nvcc").chmod(0o755)
    return tmp_path


def fake_run(argv):
    """nvcc --version as JetPack 6.1+ prints it; every other command is missing."""
    if argv[0].endswith("nvcc"):
        return "Cuda compilation tools, release 12.6, V12.6.68\nBuild cuda_12.6.r12.6/compiler.34714021_0\n"
    raise FileNotFoundError(argv[0])


def fake_versions(**versions):
    """importlib.metadata.version over ``versions`` (cuda_python= names cuda-python)."""
    table = {name.replace("_", "-"): v for name, v in versions.items()}

    def version(name):
        if name in table:
            return table[name]
        raise importlib.metadata.PackageNotFoundError(name)

    return version


def fake_cudart(driver=12060, runtime=12060, name=b"Orin\x00\x00", cc=(8, 7)):
    """A cuda.bindings.runtime stand-in: (err, value) pairs like cuda-python's."""
    rt = types.ModuleType("cuda.bindings.runtime")
    rt.cudaDriverGetVersion = lambda: (0, driver)
    rt.cudaRuntimeGetVersion = lambda: (0, runtime)
    rt.cudaGetDeviceProperties = lambda i: (0, types.SimpleNamespace(name=name, major=cc[0], minor=cc[1]))
    return rt


@pytest.fixture
def modules(monkeypatch):
    """Install fake modules in sys.modules: None means "not importable"; real ones are hidden."""
    def install(**mods):
        names = {"tensorrt": None, "cuda.bindings.runtime": None, "cuda.cudart": None, "pycuda.driver": None,
                 "onnxruntime": None}
        names.update({k.replace("__", "."): v for k, v in mods.items()})
        for name, module in names.items():
            monkeypatch.setitem(sys.modules, name, module)
    return install


def fake_trt(version, path=SYSTEM_TRT):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.__file__ = path
    return trt


def fake_ort():
    ort = types.ModuleType("onnxruntime")
    ort.__version__ = "1.20.0"
    ort.get_available_providers = lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ort


def gather_on(root, tmp_path, versions=None, env=None):
    venv = tmp_path / "venv"
    venv.mkdir(exist_ok=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = true\n")
    return doctor.gather(root, run=fake_run, env=env or {"PATH": ""}, dist_version=versions or fake_versions(),
                         prefix=str(venv), base_prefix="/usr")


@pytest.mark.parametrize("line", list(RELEASES))
def test_release_parsing(tmp_path, modules, line):
    modules()
    facts = gather_on(jetson_tree(tmp_path, line), tmp_path)
    l4t, jetpack = RELEASES[line]
    assert (facts["l4t"], facts["jetpack"]) == (l4t, jetpack)
    assert facts["module"] == MODEL
    assert facts["compatible"] == COMPATIBLE
    assert facts["jetson"] is True
    assert facts["nvcc"] == "12.6" and facts["nvcc_on_path"] is False
    assert facts["in_venv"] is True and facts["venv_system_site_packages"] is True
    report = doctor.format_report(facts, doctor.advice(facts))
    if jetpack is None:
        assert f"L4T {l4t} (JetPack unknown to edgeexit)" in report


def test_healthy_jetpack_62(tmp_path, modules, monkeypatch):
    modules(tensorrt=fake_trt("10.3.0"), cuda__bindings__runtime=fake_cudart(), onnxruntime=fake_ort(),
            pycuda__driver=types.ModuleType("pycuda.driver"))
    root = jetson_tree(tmp_path, next(k for k, v in RELEASES.items() if v[1] == "6.2"))
    versions = fake_versions(cuda_python="12.6.2", pycuda="2024.1.2")
    facts = gather_on(root, tmp_path, versions, env={"PATH": str(root / "usr/local/cuda/bin")})
    assert facts["tensorrt"] == "10.3.0" and facts["tensorrt_source"] == "system"
    assert (facts["cuda_driver"], facts["cuda_runtime"]) == ("12.6", "12.6")
    assert facts["gpu"] == {"name": "Orin", "compute_capability": "8.7"}
    assert facts["pycuda"] == "2024.1.2" and facts["pycuda_driver"] is True
    assert facts["onnxruntime_providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert doctor.advice(facts) == []
    report = doctor.format_report(facts, [])
    assert "None" not in report and "all good" in report
    assert "tensorrt: " in report and "10.3.0 (system: " + SYSTEM_TRT in report


def test_jetpack_60_tensorrt_8(tmp_path, modules):
    modules(tensorrt=fake_trt("8.6.2.3"), cuda__cudart=fake_cudart(12020, 12020), onnxruntime=fake_ort())
    root = jetson_tree(tmp_path, next(iter(RELEASES)))
    facts = gather_on(root, tmp_path, fake_versions(cuda_python="12.2.1"))
    assert facts["jetpack"] == "6.0" and facts["tensorrt"] == "8.6.2.3" and facts["cuda_driver"] == "12.2"
    lines = doctor.advice(facts)
    assert not any(line.startswith(("tensorrt", "cuda-python")) for line in lines)
    assert any(line.startswith("pycuda: not installed") and "pip install pycuda" in line for line in lines)
    assert any(line.startswith("nvcc:") and "export PATH=/usr/local/cuda/bin:$PATH" in line for line in lines)


def test_missing_tensorrt_on_jetson(tmp_path, modules):
    modules()
    facts = gather_on(jetson_tree(tmp_path, next(iter(RELEASES))), tmp_path)
    facts["venv_system_site_packages"] = False
    lines = doctor.advice(facts)
    trt = [line for line in lines if line.startswith("tensorrt:")]
    assert len(trt) == 1
    assert "python3-libnvinfer" in trt[0] and "python3 -m venv --system-site-packages" in trt[0]
    assert "this venv was made without it" in trt[0]
    assert "None" not in doctor.format_report(facts, lines)


def test_pip_tensorrt_on_jetson_warns(tmp_path, modules):
    wheel = str(tmp_path / "venv/lib/python3.10/site-packages/tensorrt/__init__.py")
    modules(tensorrt=fake_trt("10.7.0", wheel))
    facts = gather_on(jetson_tree(tmp_path, next(iter(RELEASES))), tmp_path)
    assert facts["tensorrt_source"] == "venv"
    assert any("shadow" in line and "pip uninstall tensorrt" in line for line in doctor.advice(facts))


def test_old_tensorrt(tmp_path, modules):
    modules(tensorrt=fake_trt("8.2.1"))
    facts = gather_on(jetson_tree(tmp_path, next(iter(RELEASES))), tmp_path)
    assert any("JetPack 4: run bundles on onnxruntime" in line for line in doctor.advice(facts))


def test_cuda_python_13_with_cuda_12_driver(tmp_path, modules):
    modules(tensorrt=fake_trt("10.3.0"), cuda__bindings__runtime=fake_cudart(12060, 13000))
    facts = gather_on(jetson_tree(tmp_path, next(iter(RELEASES))), tmp_path, fake_versions(cuda_python="13.0.1"))
    assert facts["cuda_driver"] == "12.6" and facts["cuda_python"] == "13.0.1"
    lines = [line for line in doctor.advice(facts) if line.startswith("cuda-python")]
    assert lines == ["cuda-python: 13.0.1 does not match the CUDA 12 driver: pip install 'cuda-python>=12,<13'"]


def test_cuda_python_missing_uses_jetpack_cuda(tmp_path, modules):
    modules(tensorrt=fake_trt("10.3.0"))
    facts = gather_on(jetson_tree(tmp_path, next(iter(RELEASES))), tmp_path)
    assert facts["cuda_driver"] is None and facts["gpu"] is None
    assert any(line.startswith("cuda-python: not installed") and "'cuda-python>=12,<13'" in line
               for line in doctor.advice(facts))


def test_python_38(tmp_path, modules):
    modules()
    facts = gather_on(jetson_tree(tmp_path, list(RELEASES)[2]), tmp_path)
    facts["python"] = "3.8.10"
    lines = doctor.advice(facts)
    assert any(line.startswith("python: 3.8.10") and "3.10+" in line and "JetPack 6" in line for line in lines)


def test_non_jetson_host_without_gpu(tmp_path, modules):
    modules(onnxruntime=fake_ort())
    facts = gather_on(tmp_path, tmp_path)
    assert facts["jetson"] is False
    assert all(facts[k] is None for k in ("l4t", "jetpack", "module", "compatible", "tensorrt", "gpu"))
    assert doctor.advice(facts) == ["this host runs bundles on onnxruntime; build engines on the Jetson"]
    report = doctor.format_report(facts, doctor.advice(facts))
    assert "None" not in report and "True" not in report and "False" not in report
    assert report.splitlines()[-1] == "- this host runs bundles on onnxruntime; build engines on the Jetson"


def test_desktop_gpu_from_nvidia_smi(tmp_path, modules):
    modules(onnxruntime=fake_ort())

    def run(argv):
        if argv[0] == "nvidia-smi":
            return "NVIDIA H200, 9.0\n"
        raise subprocess.CalledProcessError(1, argv)

    facts = doctor.gather(tmp_path, run=run, env={"PATH": ""}, dist_version=fake_versions(),
                          prefix=str(tmp_path), base_prefix=str(tmp_path))
    assert facts["gpu"] == {"name": "NVIDIA H200", "compute_capability": "9.0"} and facts["in_venv"] is False
    lines = doctor.advice(facts)
    assert not any("build engines on the Jetson" in line for line in lines)
    assert any(line.startswith("tensorrt: not importable") for line in lines)
    assert "None" not in doctor.format_report(facts, lines)


def test_broken_imports_are_not_fatal(tmp_path):
    def import_module(name):
        raise OSError("libnvinfer.so.10: cannot open shared object file") if name == "tensorrt" else ImportError(name)

    facts = doctor.gather(tmp_path, run=fake_run, env={"PATH": ""}, import_module=import_module,
                          dist_version=fake_versions(), prefix=str(tmp_path), base_prefix=str(tmp_path))
    assert facts["tensorrt"] is None and facts["onnxruntime"] is None
    assert any(line.startswith("onnxruntime: not importable") for line in doctor.advice(facts))


def test_format_report_never_prints_none():
    facts = {key: None for key in ("jetson", "module", "compatible", "l4t", "jetpack", "python", "in_venv",
                                   "venv_system_site_packages", "tensorrt", "tensorrt_path", "tensorrt_source",
                                   "cuda_driver", "cuda_runtime", "cuda_python", "pycuda", "pycuda_driver", "nvcc",
                                   "nvcc_path", "nvcc_on_path", "onnxruntime", "onnxruntime_providers", "gpu")}
    report = doctor.format_report(facts, doctor.advice(facts))
    assert "None" not in report
    rows = [line for line in report.splitlines() if line and not line.startswith("- ")]
    starts = {len(line) - len(line.split(":", 1)[1].lstrip()) for line in rows}
    assert len(starts) == 1  # every value starts in the same column
    assert all(line.split(":", 1)[1].strip() for line in rows)


def test_gather_on_this_machine():
    facts = doctor.gather()
    assert set(facts) >= {"l4t", "module", "compatible", "jetpack", "python", "tensorrt", "cuda_driver",
                          "cuda_runtime", "cuda_python", "pycuda", "nvcc", "onnxruntime", "gpu", "in_venv",
                          "venv_system_site_packages"}
    assert facts["python"] == "{}.{}.{}".format(*sys.version_info[:3])
    report = doctor.format_report(facts, doctor.advice(facts))
    assert "None" not in report and report.startswith("jetson:")


def test_import_is_light():
    code = "import sys, edgeexit.doctor as d; d.gather(); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
