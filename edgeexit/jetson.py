"""Measurements that only a Jetson can make: tegrastats power samples and the board's settings.

A latency or energy figure from a Jetson is only comparable with another when the power mode and
clocks behind it are known, and energy per inference needs the module's input power while the
benchmark runs. This module gets both with the standard library alone, so it imports, and its
parsers run, on any host:

* ``parse_tegrastats`` reads one line of ``tegrastats`` output, from any JetPack generation;
* ``TegrastatsSampler`` runs ``tegrastats`` around a benchmark and turns what it printed into
  average power and energy per inference;
* ``jetson_facts`` reports the module, L4T release, nvpmodel mode and whether jetson_clocks is on.

The tegrastats line changed between releases (recorded examples are in tests/data/tegrastats):

* JetPack 4 (L4T R32): rails without a unit, ``POM_5V_IN 2545/2547`` (Nano), ``VDD_IN 5297/5297``
  (TX2, Xavier NX), ``GPU 1155/1155 ... SYS5V 2692/2692`` (AGX Xavier); ``GR3D_FREQ 0%@76``.
* JetPack 5 (L4T R35): rails in mW, ``VDD_GPU_SOC 2390mW/2390mW``, ``NC 0mW/0mW`` for unconnected
  channels; ``GR3D_FREQ 17%@0`` or ``GR3D_FREQ 0%@[114]``; a leading ``MM-DD-YYYY HH:MM:SS``.
* JetPack 6 (L4T R36): as JetPack 5, with one clock per GPC (``GR3D_FREQ 0%@[305,0]``) and
  lower-case temperature names (``cpu@50.03C tj@50.25C``).

Without root some releases print ``GR3D_FREQ 0%`` (no clock) or leave the rails out.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

# Rails that measure the whole module input, preferred first: VDD_IN (TX2, Xavier NX, Orin NX and
# Nano), POM_5V_IN (Nano). AGX Xavier and AGX Orin have no such rail; their SYS5V / VIN_SYS_5V0
# channel is only the 5 V system supply beside the separately fed compute rails, so taking it as
# the total would under-report (jetson_stats issue #344; on AGX Thor it is below VDD_CPU_SOC_MSS).
TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")

_TIMESTAMP = re.compile(r"^(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
# GR3D_FREQ 12%@1377 | 0%@[305,0] | 0% | @[0,0,0] (Thor: clocks only)
_GR3D = re.compile(r"\bGR3D_FREQ (?:(\d+)%)?(?:@\[?(\d+))?")
# POM_5V_IN 2545/2547 | VDD_IN 5012mW/5012mW: instantaneous/average, mW. "RAM 1180/3965MB" fails
# the trailing (?!\S).
_RAIL = re.compile(r"(?<!\S)([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/\d+(?:mW)?(?!\S)")
# CPU@34.5C | tj@50.25C | cpu@52.968C/52.968C (JetPack 7 appends a second reading)
_TEMP = re.compile(r"(?<!\S)([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C(?=/|\s|$)")
# Placeholders: "NC" is an unconnected monitor channel, -256C an offline thermal sensor.
_UNCONNECTED_RAIL = "NC"
_OFFLINE_C = -256.0


@dataclass(frozen=True)
class TegrastatsSample:
    """One tegrastats line: power per rail (mW, instantaneous), GPU load and clock, RAM, temps.

    Fields the line does not carry are None (or empty dicts); ``gpu_freq_mhz`` is the first GPC's
    clock when tegrastats lists one per GPC.
    """

    rails_mw: dict[str, float]
    gpu_load_pct: float | None
    gpu_freq_mhz: float | None
    ram_used_mb: float | None
    ram_total_mb: float | None
    temps_c: dict[str, float]
    timestamp: str | None


def parse_tegrastats(line: str) -> TegrastatsSample:
    """Parse one line of ``tegrastats`` output from JetPack 4, 5 or 6 into a ``TegrastatsSample``.

    Fields this module does not use (CPU cores, EMC, engines, swap) are ignored, as are unconnected
    rails and offline sensors. Raises ``ValueError`` naming the line when nothing in it is
    recognisable, so a reader can skip warnings that tegrastats interleaves with its samples.
    """
    text = line.strip()
    timestamp = _TIMESTAMP.match(text)
    ram = _RAM.search(text)
    gr3d = _GR3D.search(text)
    load, freq = gr3d.groups() if gr3d else (None, None)
    rails = {name: float(mw) for name, mw in _RAIL.findall(text) if name != _UNCONNECTED_RAIL}
    temps = {name: float(c) for name, c in _TEMP.findall(text) if float(c) > _OFFLINE_C}
    if not (rails or temps or ram or load is not None or freq is not None):
        raise ValueError(f"not a tegrastats line: {text[:80]!r}")
    return TegrastatsSample(
        rails_mw=rails,
        gpu_load_pct=float(load) if load is not None else None,
        gpu_freq_mhz=float(freq) if freq is not None else None,
        ram_used_mb=float(ram[1]) if ram else None,
        ram_total_mb=float(ram[2]) if ram else None,
        temps_c=temps,
        timestamp=timestamp[1] if timestamp else None,
    )


def total_rail(rails: Iterable[str]) -> str | None:
    """The rail among ``rails`` that measures the whole module input (see ``TOTAL_RAILS``), or None.

    None means the board has no such rail (AGX Xavier, AGX Orin): no single reading is its total
    power, so energy per inference cannot be derived from tegrastats there.
    """
    present = set(rails)
    return next((name for name in TOTAL_RAILS if name in present), None)


class TegrastatsSampler:
    """Run ``tegrastats`` in the background for the duration of a ``with`` block.

    Wrapped around a timed benchmark loop, the samples it collects give the average power of each
    rail and, from the module's input rail, the energy per inference::

        with TegrastatsSampler(interval_ms=100) as power:
            elapsed, count = run_benchmark()
        report = power.summary(seconds=elapsed, inferences=count)

    ``command`` replaces the whole command line, e.g. ``["sudo", "tegrastats", "--interval", "50"]``
    where the rails are only shown to root. Lines that do not parse are skipped.
    """

    def __init__(self, interval_ms: int = 100, command: Sequence[str] | None = None) -> None:
        self.command = list(command) if command else ["tegrastats", "--interval", str(interval_ms)]
        self._samples: list[TegrastatsSample] = []
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def samples(self) -> list[TegrastatsSample]:
        """The samples parsed so far, oldest first (a copy: the reader thread may still append)."""
        with self._lock:
            return list(self._samples)

    def __enter__(self) -> TegrastatsSampler:  # noqa: PYI034 - typing.Self is 3.11+
        if shutil.which(self.command[0]) is None:
            raise RuntimeError(
                f"{self.command[0]!r} is not on PATH: power sampling reads tegrastats, "
                "which only JetPack installs; run this on the Jetson"
            )
        self._process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1
        )
        self._reader = threading.Thread(
            target=self._read, args=(self._process.stdout,), name="tegrastats-reader", daemon=True
        )
        self._reader.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._reader.join(timeout=5)

    def _read(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                try:
                    sample = parse_tegrastats(line)
                except ValueError:
                    continue
                with self._lock:
                    self._samples.append(sample)

    def summary(self, seconds: float, inferences: int) -> dict:
        """Average power over the samples; energy per inference of ``inferences`` in ``seconds``.

        Keys: ``rails_mw`` (mean instantaneous power per rail), ``total_rail`` (see ``total_rail``),
        ``total_power_w``, ``energy_per_inference_mj`` (average total power x seconds / inferences;
        both None without a total rail), ``samples`` and ``gpu_load_pct`` (mean; None when
        tegrastats reported no load). The energy is the whole module's, idle draw included.
        Raises ``RuntimeError`` when no sample was collected (a run shorter than the interval).
        """
        if seconds <= 0 or inferences <= 0:
            raise ValueError(f"need seconds > 0 and inferences > 0, got {seconds} and {inferences}")
        samples = self.samples
        if not samples:
            raise RuntimeError(
                f"no tegrastats samples from {' '.join(self.command)!r}: "
                "measure for longer than the sampling interval"
            )
        names = dict.fromkeys(name for sample in samples for name in sample.rails_mw)
        rails_mw = {
            name: statistics.fmean(s.rails_mw[name] for s in samples if name in s.rails_mw)
            for name in names
        }
        total = total_rail(rails_mw)
        total_w = rails_mw[total] / 1000 if total else None
        loads = [s.gpu_load_pct for s in samples if s.gpu_load_pct is not None]
        return {
            "rails_mw": rails_mw,
            "total_rail": total,
            "total_power_w": total_w,
            "energy_per_inference_mj": total_w * seconds / inferences * 1000 if total else None,
            "samples": len(samples),
            "gpu_load_pct": statistics.fmean(loads) if loads else None,
        }


# GPU devfreq nodes. /sys/class/devfreq links to every one; the device paths are where they live on
# Nano (57000000.gpu), Xavier (17000000.gv11b), Orin on JetPack 5 (17000000.ga10b) and on JetPack 6
# (platform/bus@0/17000000.gpu). Other devfreq devices (EMC, NVDLA) are filtered out by name.
_GPU_DEVFREQ_GLOBS = (
    "sys/class/devfreq/*",
    "sys/devices/*/devfreq/*",
    "sys/devices/platform/*/devfreq/*",
    "sys/devices/platform/bus@0/*/devfreq/*",
)
_GPU_DEVFREQ_NAME = re.compile(r"^[0-9a-f]+\.(?:gpu|gv11b|gp10b|ga10b)$")
_CPU0_FREQ = "sys/devices/system/cpu/cpu0/cpufreq"
# "# R35 (release), REVISION: 4.1, GCID: ..." -> 35.4.1
_L4T = re.compile(r"^# R(\d+) \(release\), REVISION: ([\d.]+)")
# "NV Power Mode: MAXN" followed by the mode id on the next line
_NV_POWER_MODE = re.compile(r"^NV Power Mode:[ \t]*(.*?)[ \t]*(?:\n\s*(\d+))?$", re.MULTILINE)


def _run(command: Sequence[str]) -> str:
    """Stdout of ``command``; raises OSError or SubprocessError when it cannot run or fails."""
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=10).stdout


BOARD_ROOT_ENV = "EDGEEXIT_BOARD_ROOT"


def board_root() -> Path:
    """Where the board's files (etc/nv_tegra_release, proc/device-tree, proc/meminfo) are read:
    ``/``, or ``$EDGEEXIT_BOARD_ROOT`` (a container that mounts the host's at another path, a
    mounted root filesystem image, or a test's stand-in device)."""
    return Path(os.environ.get(BOARD_ROOT_ENV) or "/")


def jetson_facts(
    root: str | os.PathLike[str] | None = None, run: Callable[[Sequence[str]], str] = _run
) -> dict | None:
    """The settings a Jetson benchmark depends on, or None when this is not a Jetson.

    A Jetson is recognised by ``/etc/nv_tegra_release`` or a device-tree model naming Jetson/NVIDIA.
    Returns ``model``, ``l4t`` (e.g. "35.4.1"), ``nvpmodel`` and ``nvpmodel_id`` (from
    ``nvpmodel -q``) and ``jetson_clocks``: True when the GPU devfreq clock is pinned
    (min == max == cur) and cpu0's scaling range is a single frequency, False when either is free to
    scale, None when neither could be read. Any value that cannot be read is None. ``root`` (where
    /etc, /proc and /sys are looked up) and ``run`` (which runs nvpmodel and returns its stdout)
    exist so tests can use a fake tree; ``root`` defaults to `board_root()`.
    """
    base = Path(root) if root is not None else board_root()
    model = _read(base / "proc/device-tree/model")
    release = _read(base / "etc/nv_tegra_release")
    if release is None and not (model and ("Jetson" in model or "NVIDIA" in model)):
        return None
    l4t = _L4T.match(release) if release else None
    mode, mode_id = _nvpmodel(run)
    return {
        "model": model,
        "l4t": f"{l4t[1]}.{l4t[2]}" if l4t else None,
        "nvpmodel": mode,
        "nvpmodel_id": mode_id,
        "jetson_clocks": _jetson_clocks_on(base),
    }


def _read(path: Path) -> str | None:
    """Stripped text of a small sysfs/proc file, NULs removed; None if unreadable or empty."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    return text.replace("\x00", "").strip() or None


def _nvpmodel(run: Callable[[Sequence[str]], str]) -> tuple[str | None, int | None]:
    """Name and id of the current nvpmodel mode, (None, None) when ``nvpmodel -q`` fails."""
    try:
        output = run(["nvpmodel", "-q"])
    except (OSError, subprocess.SubprocessError):
        return None, None
    match = _NV_POWER_MODE.search(output)
    if match is None:
        return None, None
    return match[1] or None, int(match[2]) if match[2] else None


def _jetson_clocks_on(base: Path) -> bool | None:
    """Whether GPU and cpu0 clocks are pinned the way jetson_clocks leaves them (None: unknown)."""
    readings = [
        _gpu_frequencies(base),
        _frequencies(base / _CPU0_FREQ, ("scaling_min_freq", "scaling_max_freq")),
    ]
    known = [values for values in readings if values is not None]
    if not known:
        return None
    return all(len(set(values)) == 1 for values in known)


def _gpu_frequencies(base: Path) -> list[str] | None:
    """min/max/cur of the first readable GPU devfreq node."""
    for pattern in _GPU_DEVFREQ_GLOBS:
        for directory in sorted(base.glob(pattern)):
            if _GPU_DEVFREQ_NAME.match(directory.name):
                values = _frequencies(directory, ("min_freq", "max_freq", "cur_freq"))
                if values is not None:
                    return values
    return None


def _frequencies(directory: Path, names: Sequence[str]) -> list[str] | None:
    """The contents of the named files in ``directory``, None unless all are readable."""
    values = [_read(directory / name) for name in names]
    return None if None in values else values
