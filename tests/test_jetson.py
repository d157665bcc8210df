"""Jetson helpers: tegrastats lines recorded on four JetPack generations, the background sampler run
against a fake tegrastats executable, and board facts read from a fake /etc, /proc and /sys tree."""

from __future__ import annotations

import stat
import statistics
import time
from pathlib import Path

import pytest

from edgeexit.jetson import (
    TegrastatsSampler,
    jetson_facts,
    parse_tegrastats,
    total_rail,
)

DATA = Path(__file__).resolve().parent / "data" / "tegrastats"
FILES = ("jetpack4_nano.txt", "jetpack4_xavier.txt", "jetpack5_orin.txt", "jetpack6_orin.txt")


def recorded(name: str) -> list[str]:
    """The tegrastats lines of a recorded file, without its comment lines."""
    lines = (DATA / name).read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("name", FILES)
def test_every_recorded_line_parses(name):
    lines = recorded(name)
    assert len(lines) >= 2
    for line in lines:
        sample = parse_tegrastats(line)
        assert sample.rails_mw and sample.temps_c
        assert sample.ram_used_mb < sample.ram_total_mb


def test_jetpack4_nano():
    first, _, non_root, _ = (parse_tegrastats(line) for line in recorded("jetpack4_nano.txt"))
    assert first.rails_mw == {"POM_5V_IN": 4520.0, "POM_5V_GPU": 0.0, "POM_5V_CPU": 1078.0}
    assert (first.gpu_load_pct, first.gpu_freq_mhz) == (0.0, 76.0)
    assert (first.ram_used_mb, first.ram_total_mb) == (1180.0, 3965.0)
    assert first.temps_c["CPU"] == 60.5 and first.temps_c["thermal"] == 59.75
    assert first.timestamp is None
    # Without root, GR3D_FREQ has no clock.
    assert (non_root.gpu_load_pct, non_root.gpu_freq_mhz) == (0.0, None)
    assert total_rail(first.rails_mw) == "POM_5V_IN"


def test_jetpack4_tx2_and_agx_xavier():
    tx2, _, xavier = (parse_tegrastats(line) for line in recorded("jetpack4_xavier.txt"))
    assert tx2.rails_mw["VDD_IN"] == 5297.0 and tx2.rails_mw["VDD_SYS_GPU"] == 182.0
    assert (tx2.gpu_load_pct, tx2.gpu_freq_mhz) == (0.0, 114.0)
    assert (tx2.ram_used_mb, tx2.ram_total_mb) == (3276.0, 7859.0)
    assert total_rail(tx2.rails_mw) == "VDD_IN"
    assert xavier.rails_mw == {
        "GPU": 1155.0,
        "CPU": 385.0,
        "SOC": 2502.0,
        "CV": 0.0,
        "VDDRQ": 192.0,
        "SYS5V": 2692.0,
    }
    assert (xavier.gpu_load_pct, xavier.gpu_freq_mhz) == (12.0, 1377.0)
    assert total_rail(xavier.rails_mw) is None


def test_jetpack5_agx_orin_and_xavier_nx():
    orin, orin_gpc, xavier_nx = (parse_tegrastats(line) for line in recorded("jetpack5_orin.txt"))
    assert orin.timestamp == "01-03-2023 16:07:54"
    # "NC 0mW/0mW" (unconnected channel) is dropped, and so are sensors reading -256C.
    assert orin.rails_mw == {
        "VDD_GPU_SOC": 2390.0,
        "VDD_CPU_CV": 796.0,
        "VIN_SYS_5V0": 3522.0,
        "VDDQ_VDD2_1V8AO": 301.0,
    }
    assert "CV0" not in orin.temps_c and orin.temps_c["tj"] == 41.656
    assert (orin.gpu_load_pct, orin.gpu_freq_mhz) == (17.0, 0.0)
    assert (orin.ram_used_mb, orin.ram_total_mb) == (2257.0, 30536.0)
    assert orin_gpc.gpu_freq_mhz == 0.0
    assert total_rail(orin.rails_mw) is None
    # The instantaneous reading, not the average after the slash.
    assert xavier_nx.rails_mw == {"VDD_IN": 2763.0, "VDD_CPU_GPU_CV": 650.0, "VDD_SOC": 650.0}
    assert (xavier_nx.gpu_load_pct, xavier_nx.gpu_freq_mhz) == (0.0, 114.0)
    assert total_rail(xavier_nx.rails_mw) == "VDD_IN"


def test_jetpack6_orin_nano_and_agx_orin():
    nano, nano_non_root, agx, agx_next = (
        parse_tegrastats(line) for line in recorded("jetpack6_orin.txt")
    )
    assert nano.timestamp == "11-15-2024 08:38:09"
    assert nano.rails_mw == {"VDD_IN": 12479.0, "VDD_CPU_GPU_CV": 4667.0, "VDD_SOC": 2817.0}
    assert (nano.gpu_load_pct, nano.gpu_freq_mhz) == (63.0, 621.0)
    assert (nano.ram_used_mb, nano.ram_total_mb) == (6185.0, 7620.0)
    assert nano.temps_c["tj"] == 53.968 and nano.temps_c["gpu"] == 53.343
    assert (nano_non_root.gpu_load_pct, nano_non_root.gpu_freq_mhz) == (0.0, None)
    assert total_rail(nano.rails_mw) == "VDD_IN"
    assert agx.rails_mw == {"VDD_GPU_SOC": 2412.0, "VDD_CPU_CV": 1607.0, "VIN_SYS_5V0": 4707.0}
    assert agx_next.rails_mw["VIN_SYS_5V0"] == 4607.0
    assert total_rail(agx.rails_mw) is None


@pytest.mark.parametrize(
    ("field", "load", "freq"),
    [
        ("GR3D_FREQ 0%@[305,0]", 0.0, 305.0),  # JetPack 6, one clock per GPC
        ("GR3D_FREQ 99%@[1300,1300]", 99.0, 1300.0),
        ("GR3D_FREQ @[0,0,0]", None, 0.0),  # Thor: clocks only
        ("GR3D_FREQ 45%", 45.0, None),
    ],
)
def test_gpu_field_forms(field, load, freq):
    sample = parse_tegrastats(f"RAM 1000/7620MB {field} VDD_IN 5012mW/5012mW")
    assert (sample.gpu_load_pct, sample.gpu_freq_mhz) == (load, freq)


def test_total_rail_prefers_vdd_in():
    assert total_rail(["POM_5V_IN", "VDD_IN"]) == "VDD_IN"
    assert total_rail({"VIN_SYS_5V0": 1.0, "VDD_GPU_SOC": 2.0}) is None


@pytest.mark.parametrize("line", ["", "hello world", "NVPM WARN: power mode already set", "RAM"])
def test_unrecognisable_line_raises(line):
    with pytest.raises(ValueError, match="not a tegrastats line"):
        parse_tegrastats(line)


def test_error_names_the_line_truncated():
    with pytest.raises(ValueError) as info:
        parse_tegrastats("garbage " * 40)
    message = str(info.value)
    assert "garbage garbage" in message and "\n" not in message and len(message) < 120


def fake_tegrastats(tmp_path: Path, lines: list[str]) -> list[str]:
    """Command line of a stand-in for tegrastats: it prints a warning (which the sampler must skip),
    then each of ``lines`` with a short sleep, then idles until it is terminated."""
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")
    script = tmp_path / "tegrastats"
    script.write_text(
        "#!/bin/sh\n"
        "echo 'tegrastats: warning, some stats need root'\n"
        f"exec < '{tmp_path}/lines.txt'\n"
        "while IFS= read -r line; do printf '%s\\n' \"$line\"; sleep 0.02; done\n"
        "exec sleep 60\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return [str(script), "--interval", "20"]


def wait_for_samples(sampler: TegrastatsSampler, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(sampler.samples) < count and time.monotonic() < deadline:
        time.sleep(0.01)


def test_sampler_averages_what_tegrastats_printed(tmp_path):
    command = fake_tegrastats(tmp_path, recorded("jetpack4_nano.txt"))
    started = time.monotonic()
    with TegrastatsSampler(command=command) as sampler:
        wait_for_samples(sampler, 4)
    # Leaving the block terminated the fake, which would otherwise sleep for a minute.
    assert time.monotonic() - started < 10

    summary = sampler.summary(seconds=2.0, inferences=400)
    pom_5v_in = [4520, 933, 2545, 2003]  # instantaneous readings in the recorded lines
    assert summary["samples"] == 4
    assert summary["total_rail"] == "POM_5V_IN"
    assert summary["rails_mw"]["POM_5V_IN"] == pytest.approx(statistics.fmean(pom_5v_in))
    pom_5v_cpu = statistics.fmean([1078, 84, 549, 320])
    assert summary["rails_mw"]["POM_5V_CPU"] == pytest.approx(pom_5v_cpu)
    assert summary["total_power_w"] == pytest.approx(2.50025)
    # 2.50025 W x 2 s / 400 inferences = 12.50125 mJ per inference.
    assert summary["energy_per_inference_mj"] == pytest.approx(12.50125)
    assert summary["gpu_load_pct"] == pytest.approx(statistics.fmean([0, 37, 0, 0]))


def test_sampler_without_total_rail_reports_no_energy(tmp_path):
    agx_orin = [line for line in recorded("jetpack5_orin.txt") if "VDD_GPU_SOC" in line]
    with TegrastatsSampler(command=fake_tegrastats(tmp_path, agx_orin)) as sampler:
        wait_for_samples(sampler, 2)
    summary = sampler.summary(seconds=1.0, inferences=10)
    assert summary["samples"] == 2
    assert summary["total_rail"] is None
    assert summary["total_power_w"] is None and summary["energy_per_inference_mj"] is None
    assert summary["rails_mw"]["VDD_GPU_SOC"] == pytest.approx(statistics.fmean([2390, 2340]))
    assert summary["gpu_load_pct"] == pytest.approx(8.5)


def test_sampler_summary_rejects_empty_runs(tmp_path):
    # Only the warning line comes out: nothing to average.
    with TegrastatsSampler(command=fake_tegrastats(tmp_path, [])) as sampler:
        time.sleep(0.1)
    with pytest.raises(RuntimeError, match="no tegrastats samples"):
        sampler.summary(seconds=1.0, inferences=1)
    with pytest.raises(ValueError, match="inferences > 0"):
        sampler.summary(seconds=1.0, inferences=0)


def test_sampler_without_tegrastats_binary(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="'tegrastats' is not on PATH"), TegrastatsSampler():
        pass


def jetson_tree(root: Path, gpu_devfreq: str, gpu: tuple, cpu: tuple, release: str | None) -> Path:
    """A fake /proc, /etc and /sys of a Jetson under ``root``."""
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/model").write_text("NVIDIA Jetson AGX Orin Developer Kit\x00")
    if release is not None:
        (root / "etc").mkdir()
        (root / "etc/nv_tegra_release").write_text(release)
    devfreq = root / gpu_devfreq
    devfreq.mkdir(parents=True)
    for name, value in zip(("min_freq", "max_freq", "cur_freq"), gpu, strict=True):
        (devfreq / name).write_text(f"{value}\n")
    cpufreq = root / "sys/devices/system/cpu/cpu0/cpufreq"
    cpufreq.mkdir(parents=True)
    for name, value in zip(("scaling_min_freq", "scaling_max_freq"), cpu, strict=True):
        (cpufreq / name).write_text(f"{value}\n")
    return root


ORIN_GPU = "sys/devices/platform/bus@0/17000000.gpu/devfreq/17000000.gpu"
NANO_GPU = "sys/devices/57000000.gpu/devfreq/57000000.gpu"
R35 = (
    "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
    "DATE: Tue Aug  1 19:57:35 UTC 2023\n# KERNEL_VARIANT: oot\n"
)


def test_jetson_facts_with_clocks_locked(tmp_path):
    root = jetson_tree(tmp_path, ORIN_GPU, (1300500000,) * 3, (2201600, 2201600), R35)
    calls = []

    def run(command):
        calls.append(list(command))
        return "NVPM WARN: patching tpc_pg_mask\nNV Power Mode: MAXN\n0\n"

    assert jetson_facts(root, run) == {
        "model": "NVIDIA Jetson AGX Orin Developer Kit",
        "l4t": "35.4.1",
        "nvpmodel": "MAXN",
        "nvpmodel_id": 0,
        "jetson_clocks": True,
    }
    assert calls == [["nvpmodel", "-q"]]


def test_jetson_facts_with_clocks_scaling(tmp_path):
    gpu = (76800000, 921600000, 76800000)
    release = "# R32 (release), REVISION: 7.1\n"
    root = jetson_tree(tmp_path, NANO_GPU, gpu, (102000, 1479000), release)

    def run(command):
        raise FileNotFoundError("nvpmodel")

    facts = jetson_facts(root, run)
    assert facts["l4t"] == "32.7.1"
    assert facts["jetson_clocks"] is False
    assert (facts["nvpmodel"], facts["nvpmodel_id"]) == (None, None)


def test_jetson_clocks_needs_both_gpu_and_cpu_pinned(tmp_path):
    # GPU pinned but cpu0 still scaling: jetson_clocks is not (fully) on.
    root = jetson_tree(tmp_path, ORIN_GPU, (1300500000,) * 3, (115200, 2201600), R35)
    assert jetson_facts(root, lambda command: "")["jetson_clocks"] is False


def test_jetson_facts_unknown_without_sysfs(tmp_path):
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_text("NVIDIA Jetson Nano Developer Kit\x00")
    facts = jetson_facts(tmp_path, lambda command: "NV Power Mode: 5W\n1\n")
    assert facts == {
        "model": "NVIDIA Jetson Nano Developer Kit",
        "l4t": None,
        "nvpmodel": "5W",
        "nvpmodel_id": 1,
        "jetson_clocks": None,
    }


def test_jetson_facts_none_off_jetson(tmp_path):
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_text("Raspberry Pi 4 Model B Rev 1.4\x00")
    assert jetson_facts(tmp_path) is None
    assert jetson_facts(tmp_path / "empty") is None


@pytest.mark.skipif(Path("/etc/nv_tegra_release").exists(), reason="running on a Jetson")
def test_jetson_facts_none_on_this_host():
    assert jetson_facts() is None
