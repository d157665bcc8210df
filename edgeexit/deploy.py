"""`edgeexit deploy BUNDLE HOST`: put a bundle on a Jetson, build and profile it there, calibrate
on the device's own latency, and keep the device's previous bundle until the new one is whole.

SSH goes through the system OpenSSH client, not a Python SSH library: HOST then means what
it means to ``ssh`` (``~/.ssh/config`` aliases, agents, ProxyJump, known_hosts, certificates)
without edgeexit re-implementing any of it, and one multiplexed connection (ControlMaster)
carries every step. Nothing is run on the device but edgeexit itself, from a venv it installs
there from a wheel built here (``--system-site-packages``, so JetPack's TensorRT is visible).

The device holds ``DIR/venv``, ``DIR/<bundle>`` (what the device runs), ``DIR/.<bundle>.next``
(a new version while it is being prepared) and ``DIR/engine-cache``. The steps, each printing
one line and, on failure, naming the host and the step:

1. pre-flight: Python, free disk, then `edgeexit doctor`'s facts from the device's edgeexit;
2. runtime: install or update edgeexit when the device's code digest differs from this one's;
3. upload: only files whose checksums differ from the device's bundle, unpacked and verified
   there into the new version (unchanged files come from the old one);
4. engines: `edgeexit engines` there (progress streamed back), reusing the engine cache;
5. ``--profile``: `edgeexit profile` there, merged into the local bundle's profile.json under
   its ``<backend>@<device>`` key;
6. ``--budget-ms``: `calibrate` here on that entry; the changed files go back;
7. switch: the new version replaces the old one in one rename; both ends then verify the same
   manifest.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from edgeexit.device_probe import gib
from edgeexit.errors import EdgeExitError

DEFAULT_DIR = "/opt/edgeexit"
INSTALL_BYTES = 300 << 20  # what a runtime install (numpy, onnx, onnxruntime) may take on the device
# sh -c SCRIPT sh VENV WHEEL PYTHON [PIP OPTIONS]: the venv (seeing JetPack's TensorRT) and this
# wheel in it; with a wheelhouse the options are --no-index --find-links DIR/wheels (offline)
INSTALL_RUNTIME = ('set -e; v="$1"; w="$2"; [ -x "$v/bin/python" ] || "$3" -m venv --system-site-packages "$v"; '
                   'shift 3; "$v/bin/python" -m pip install --quiet --disable-pip-version-check "$@" "$w"; '
                   '"$v/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$w"')


def probe_source() -> str:
    """The pre-flight probe's source, run on the device as ``python3 -c`` (see edgeexit.device_probe)."""
    return (Path(__file__).parent / "device_probe.py").read_text()


class DeployError(EdgeExitError):
    """A deploy step failed on one host; the message names the host and the step."""


def say(message: str, quiet: bool = False) -> None:
    """One progress line on stderr."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)


class Ssh:
    """The system ``ssh`` to one host over one multiplexed connection."""

    def __init__(self, host: str, config: str | None = None, options: Sequence[str] = (), quiet: bool = False):
        self.host, self.quiet = host, quiet
        self._control = tempfile.mkdtemp(prefix="ee-ssh-", dir="/tmp")  # a socket path must stay short
        self.base = ["ssh", *(["-F", config] if config else []), "-o", "BatchMode=yes",
                     "-o", "ControlMaster=auto", "-o", f"ControlPath={self._control}/%C", "-o", "ControlPersist=60",
                     *[arg for opt in options for arg in ("-o", opt)], host]

    def run(self, argv: Sequence[str], step: str, *, stdin: Any = None, stream: bool = False) -> str:
        """Run `argv` on the host (quoted for its shell) and return its stdout; stderr lines are
        echoed as ``HOST: line`` when `stream`. A failure raises DeployError naming the step."""
        command = " ".join(shlex.quote(str(a)) for a in argv)
        proc = subprocess.Popen([*self.base, "--", command], stdin=stdin if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        errors: list[str] = []

        def pump():
            for raw in proc.stderr:
                line = raw.decode(errors="replace").rstrip()
                if line:
                    errors.append(line)
                    if stream:
                        say(f"{self.host}: {line}", self.quiet)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        out = proc.stdout.read()
        proc.wait()
        reader.join()
        if proc.returncode != 0:
            last = next((e for e in reversed(errors) if e.startswith("edgeexit:")), errors[-1] if errors else "")
            last = re.sub(r"^edgeexit: (error: )?", "", last)
            if proc.returncode == 255 and not last.startswith(("deploy", "receive")):
                raise DeployError(f"deploy: {self.host}: {step}: ssh failed ({last or 'no message'})")
            raise DeployError(f"deploy: {self.host}: {step} failed ({last or f'exit status {proc.returncode}'})")
        return out.decode(errors="replace")

    def json(self, argv: Sequence[str], step: str, **kwargs) -> dict[str, Any]:
        """`run`, with stdout read as one JSON object."""
        out = self.run(argv, step, **kwargs)
        try:
            return json.loads(out)
        except ValueError:
            raise DeployError(f"deploy: {self.host}: {step}: the device answered {out[:80]!r}, not JSON") from None

    def close(self) -> None:
        """End the shared connection."""
        subprocess.run([*self.base[:-1], "-O", "exit", self.host], capture_output=True)
        shutil.rmtree(self._control, ignore_errors=True)


@dataclass
class Outcome:
    """What one deploy did, for the summary line and the fleet table."""

    host: str
    device: str | None = None
    installed: bool = False
    uploaded: int = 0
    uploaded_bytes: int = 0
    engines: str = "-"
    profile_key: str | None = None
    batch1_ms: float | None = None
    thresholds: list | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Options:
    """How to deploy (the CLI's flags)."""

    path: str = DEFAULT_DIR
    profile: bool = False
    budget_ms: float | None = None
    tail: str = "mean"
    batch: int = 1
    backend: str = "auto"
    iters: int = 200
    device: str | None = None  # engines' device profile; None: the board's own, else the bundle's target
    wheel: str | None = None
    wheelhouse: str | None = None  # wheels of edgeexit's requirements for the device: installed offline
    python: str = "python3"
    engines: bool = True
    ssh_config: str | None = None
    ssh_options: tuple[str, ...] = ()
    quiet: bool = False


def manifest_digest(bundle) -> tuple[str, dict[str, str]]:
    """The digest of the engine-free manifest `pack` sends, and its files: what `remote state` reports."""
    from edgeexit.archive import archive_contents
    from edgeexit.seal import digest

    manifest, files, _ = archive_contents(bundle, engines=False)
    return digest(manifest), {rel: manifest["files"][rel] for rel in files}


def device_layout(path: str, name: str) -> dict[str, str]:
    """Where a deploy keeps things under DIR on the device (see docs/DEPLOY.md, "Layout")."""
    root = PurePosixPath(path)
    if not root.is_absolute():
        raise EdgeExitError(f"--path: {path!r} must be an absolute path on the device")
    if "$" in path or "$" in name:  # Ansible's file modules would expand $VAR where commands take it literally
        raise EdgeExitError(f"--path: {path!r} (bundle {name!r}) holds '$'; name the folder literally")
    return {"root": str(root), "python": str(root / "venv/bin/python"), "edgeexit": str(root / "venv/bin/edgeexit"),
            "venv": str(root / "venv"), "wheels": str(root / "wheels"), "live": str(root / name),
            "next": str(root / f".{name}.next"), "cache": str(root / "engine-cache"),
            "profile_data": str(root / f".{name}.profile-data.npz"), "incoming": str(root / f".{name}.incoming.tar")}


class _Device:
    """The paths and commands of one deploy on one host."""

    def __init__(self, ssh: Ssh, opts: Options, name: str):
        self.layout = layout = device_layout(opts.path, name)
        self.ssh, self.opts, self.root = ssh, opts, PurePosixPath(layout["root"])
        self.python, self.edgeexit, self.cache = layout["python"], layout["edgeexit"], layout["cache"]
        self.live, self.next, self.profile_data = layout["live"], layout["next"], layout["profile_data"]

    def remote(self, op: str, *args: str, step: str, **kwargs) -> dict[str, Any]:
        return self.ssh.json([self.python, "-m", "edgeexit.remote", op, *args], step, **kwargs)


def _preflight(dev: _Device, bundle_bytes: int) -> dict[str, Any] | None:
    """Python and disk on the device, then its edgeexit's facts (None when it has none yet)."""
    bare = dev.ssh.json([dev.opts.python, "-c", probe_source(), str(dev.root), str(bundle_bytes), str(INSTALL_BYTES)],
                        "pre-flight")
    if bare["problem"]:
        hint = {"python": " (--python names another interpreter there)",
                "write": "; choose --path or give this user that folder"}.get(bare["kind"], "")
        raise DeployError(f"deploy: {dev.ssh.host}: pre-flight: {bare['problem']}{hint}")
    facts = None
    if bare["venv"]:
        try:
            facts = dev.remote("facts", step="pre-flight")
        except DeployError:
            facts = None  # a broken or foreign venv: the runtime step reinstalls
    doctor = (facts or {}).get("doctor") or {}
    board = doctor.get("module") or "not a Jetson"
    if doctor.get("l4t"):
        board += f", L4T {doctor['l4t']} (JetPack {doctor.get('jetpack') or 'unknown'})"
    stack = ", ".join(f"{k} {doctor[v]}" for k, v in (("TensorRT", "tensorrt"), ("CUDA", "cuda_driver")) if doctor.get(v))
    say(f"{dev.ssh.host}: pre-flight: {board}{', ' + stack if stack else ''}, Python {bare['python']}, "
        f"{gib(bare['free_bytes'])} free at {dev.root}"
        + ("" if facts else "; no edgeexit there yet"), dev.opts.quiet)
    return facts


def _install_runtime(dev: _Device, facts: dict[str, Any] | None, out: Outcome) -> dict[str, Any]:
    """Install this edgeexit (torch-free) into DIR/venv unless the device already runs the same code."""
    from edgeexit import __version__
    from edgeexit.wheel import code_digest

    mine = code_digest()
    if facts is not None and facts.get("code") == mine:
        say(f"{dev.ssh.host}: runtime: edgeexit {facts['edgeexit']} up to date in {dev.root}/venv", dev.opts.quiet)
        return facts
    layout, offline = dev.layout, []
    with tempfile.TemporaryDirectory(prefix="edgeexit-wheel-") as tmp:
        wheel, extra = runtime_wheels(dev.opts, tmp)
        for path in [wheel, *extra]:
            _put(dev, path, f"{layout['wheels']}/{path.name}", "runtime: upload the wheels")
    if extra:
        offline = ["--no-index", "--find-links", layout["wheels"]]
    say(f"{dev.ssh.host}: runtime: installing edgeexit {__version__} into {layout['venv']} (--system-site-packages"
        f"{', offline from ' + str(len(extra)) + ' wheels' if extra else ''}) ...", dev.opts.quiet)
    dev.ssh.run(["sh", "-c", INSTALL_RUNTIME, "sh", layout["venv"], f"{layout['wheels']}/{wheel.name}", dev.opts.python,
                 *offline], "runtime: pip install")
    facts = dev.remote("facts", step="runtime: check the install")
    if facts.get("code") != mine:
        raise DeployError(f"deploy: {dev.ssh.host}: runtime: the installed edgeexit is not this one (code "
                          f"{str(facts.get('code'))[:12]} there, {mine[:12]} here)")
    out.installed = True
    return facts


def check_wheels(opts: Options) -> list[Path]:
    """--wheel and --wheelhouse, refused in one line before any device is touched; returns the
    wheelhouse's wheels."""
    from edgeexit.flash import wheelhouse_wheels

    if opts.wheel and not (Path(opts.wheel).is_file() and opts.wheel.endswith(".whl")):
        raise EdgeExitError(f"--wheel: {opts.wheel} is not a wheel file")
    return wheelhouse_wheels(Path(opts.wheelhouse)) if opts.wheelhouse else []


def runtime_wheels(opts: Options, tmp: str) -> tuple[Path, list[Path]]:
    """The edgeexit wheel for the device (--wheel, else built into `tmp` from this checkout) and
    the --wheelhouse wheels to install it offline from (none: the device's pip index)."""
    from edgeexit.wheel import build_wheel

    extra = check_wheels(opts)
    wheel = Path(opts.wheel) if opts.wheel else build_wheel(tmp)
    return wheel, [p for p in extra if p.name != wheel.name]


def _put(dev: _Device, local: Path, remote: str, step: str) -> None:
    """Copy one file to the device, appearing under its name only once it is complete."""
    with open(local, "rb") as f:
        dev.ssh.run(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1.part" && mv "$1.part" "$1"', "sh", remote],
                    step, stdin=f)


def pack_delta(bundle, have: dict[str, Any], dest: Path) -> dict[str, Any] | None:
    """Pack into `dest` what a device's bundle (its `remote state` answer, `have`) lacks of
    `bundle`: the manifest and the files whose checksums differ. None when the device's bundle
    is this one already (nothing to send)."""
    from edgeexit.archive import pack

    digest, files = manifest_digest(bundle)
    if have.get("exists") and have.get("manifest") == digest:
        return None
    theirs = have.get("files") or {}
    changed = [rel for rel, h in files.items() if theirs.get(rel) != h]
    packed = pack(bundle.path, dest, only=changed)
    return {"path": str(packed.path), "files": len(changed), "of": len(files), "bytes": packed.bytes,
            "base": bool(have.get("exists"))}


def _upload(dev: _Device, bundle, base: str, step: str, out: Outcome) -> bool:
    """Send what the device's bundle at `base` lacks and unpack it at DIR/.<name>.next; False if
    the device already has this bundle there (nothing is sent)."""
    have = dev.remote("state", base, step=step)
    with tempfile.TemporaryDirectory(prefix="edgeexit-upload-") as tmp:
        sent = pack_delta(bundle, have, Path(tmp) / f"{bundle.name}.tar")
        if sent is None:
            return False
        with open(sent["path"], "rb") as f:
            dev.remote("receive", dev.next, *(["--base", base] if sent["base"] else []), step=step, stdin=f)
    out.uploaded += sent["files"]
    out.uploaded_bytes += sent["bytes"]
    say(f"{dev.ssh.host}: {step}: {sent['files']} of {sent['of']} files ({sent['bytes'] / (1 << 20):.2f} MiB), "
        f"unpacked and verified at {dev.next}", dev.opts.quiet)
    return True


def engines_note(plan: dict[str, Any], built: bool) -> str:
    """What the engine step did, from the device's `engine-set` answer: for the summary and the fleet table."""
    if plan["key"] is None:
        return "no TensorRT"
    if not built:
        return f"{plan['key']} (kept)"
    return f"{plan['key']} ({plan['stages'] - plan['from_cache']} built, {plan['from_cache']} from the cache)"


def _engines(dev: _Device, target: str, out: Outcome) -> None:
    """`edgeexit engines` on the device for its own module, through the engine cache."""
    device = ["--device", dev.opts.device] if dev.opts.device else []
    plan = dev.remote("engine-set", target, *device, step="engines")
    if plan["key"] is None:
        out.engines = engines_note(plan, False)
        say(f"{dev.ssh.host}: engines: skipped: no TensorRT there (the bundle runs on onnxruntime)", dev.opts.quiet)
        return
    if plan["have"]:
        out.engines = engines_note(plan, False)
        say(f"{dev.ssh.host}: engines: {plan['key']} built before from these graphs; kept", dev.opts.quiet)
        return
    say(f"{dev.ssh.host}: engines: building {plan['key']} (cache {dev.cache}) ...", dev.opts.quiet)
    dev.ssh.run([dev.edgeexit, "engines", target, "--device", plan["device"], "--cache", dev.cache], "engines",
                stream=True)
    plan = dev.remote("engine-set", target, *device, step="engines")
    if not plan["have"]:
        raise DeployError(f"deploy: {dev.ssh.host}: engines: the device wrote no engine set {plan['key']}")
    out.engines = engines_note(plan, True)


def profile_sizes(bundle, batch: int) -> list[int]:
    """Batch sizes to profile on a device: 1, 8, 32 (up to the bundle's maximum) and those a
    budget at `batch` is costed from."""
    from edgeexit.calibrate import profile_batches
    from edgeexit.runtime.loader import max_batch

    top = max_batch(bundle)
    return sorted({b for b in (1, 8, 32) if b <= top} | set(profile_batches(batch)))


def save_test_split(bundle, path: Path) -> None:
    """The bundle's test split as .npz (x, y): sent along for profiling, as the device may lack
    the data set (scikit-learn's digits, a folder of images)."""
    import numpy as np

    from edgeexit.data import bundle_split

    split = bundle_split(bundle.manifest, "test", None)
    np.savez(path, x=split.x, y=split.y)


def merge_profiles(bundle, entries: dict[str, dict[str, Any]]):
    """The bundle with `entries` (profile.json key -> a device's `profile --json`) merged in."""
    from edgeexit.bundle import Change, update_bundle
    from edgeexit.profile import PROFILE, with_profiles

    return update_bundle(bundle, lambda current: Change(with_profiles(current.path, entries), {"profile": PROFILE}))


def batch1_ms(entry: dict[str, Any]) -> float | None:
    """A profile entry's mean batch-1 cascade call, for the summary and the fleet table."""
    return ((entry["batches"].get("1") or {}).get("end_to_end") or {}).get("cascade", {}).get("mean_ms")


def _profile(dev: _Device, facts: dict[str, Any], bundle, target: str, out: Outcome):
    """Profile on the device and merge its entry into the local bundle; returns (bundle, key)."""
    from edgeexit.profile import PROFILE, profile_key

    batches = profile_sizes(bundle, dev.opts.batch)
    say(f"{dev.ssh.host}: profile: batch {','.join(map(str, batches))}, {dev.opts.iters} calls each, "
        f"backend {dev.opts.backend} ...", dev.opts.quiet)
    data = dev.profile_data
    with tempfile.TemporaryDirectory(prefix="edgeexit-data-") as tmp:
        save_test_split(bundle, Path(tmp) / "test.npz")
        _put(dev, Path(tmp) / "test.npz", data, "profile: upload the test split")
    argv = [dev.edgeexit, "profile", target, "--backend", dev.opts.backend, "--batch", ",".join(map(str, batches)),
            "--iters", str(dev.opts.iters), "--data", data, "--json", "--quiet", "--no-save"]
    entry = dev.ssh.json(argv + ([] if facts.get("tegrastats") else ["--no-power"]), "profile")
    dev.ssh.run(["rm", "-f", data], "profile: remove the test split")
    key = profile_key(entry["backend"], entry["device"])
    bundle = merge_profiles(bundle, {key: entry})
    out.profile_key, out.batch1_ms = key, batch1_ms(entry)
    say(f"{dev.ssh.host}: profile: merged into {bundle.path / PROFILE} [{key}]", dev.opts.quiet)
    return bundle, key


def calibrate_on(bundle, keys: Sequence[str], opts: Options, who: str):
    """Thresholds for the budget on these profile.json entries (devices' profiles; with several,
    the worst of them, so the budget holds on each), fitted and checked here; returns (bundle,
    calibration record)."""
    from calibration.solvers import TAILS, Budget
    from edgeexit.calibrate import calibrate
    from edgeexit.runtime.loader import open_backend

    budget = Budget(opts.budget_ms / 1e3, opts.batch, TAILS[opts.tail])
    on = f"profile.json[{keys[0]}]" if len(keys) == 1 else f"the worst of {len(keys)} devices' profiles"
    say(f"{who}: calibrate: {opts.tail} latency <= {opts.budget_ms:g} ms at batch {opts.batch} on {on} ...",
        opts.quiet)
    with open_backend(bundle, "onnxruntime") as backend:
        bundle, record = calibrate(bundle, backend, budget, latency="profile", progress=False, latency_key=list(keys))
    test = record["test"]
    say(f"{who}: calibrate: thresholds {record['thresholds']}; on the test split {test['accuracy'] * 100:.1f}% "
        f"accuracy, {test['mean_ms']:.3f} ms mean / {test['p95_ms']:.3f} ms p95 per call on {on}", opts.quiet)
    return bundle, record


def deploy(bundle_path: str | Path, host: str, opts: Options = Options(),
           ssh_factory: Callable[..., Ssh] = Ssh) -> Outcome:
    """Deploy the bundle at `bundle_path` to `host`: see the module text for the steps. The
    device's previous bundle stays in place until the new one is complete and verified there."""
    from edgeexit.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    check_wheels(opts)
    out = Outcome(host)
    ssh = ssh_factory(host, opts.ssh_config, opts.ssh_options, opts.quiet)
    try:
        dev = _Device(ssh, opts, bundle.name)
        size = sum((bundle.path / rel).stat().st_size for rel in bundle.present)
        facts = _install_runtime(dev, _preflight(dev, size), out)
        out.device = facts.get("device")
        target = dev.next if _upload(dev, bundle, dev.live, "upload", out) else dev.live
        if target == dev.live:
            say(f"{host}: upload: nothing to send, the device has this bundle", opts.quiet)
        if opts.engines:
            _engines(dev, target, out)
        if opts.profile or opts.budget_ms is not None:
            bundle, key = _profile(dev, facts, bundle, target, out)
            if opts.budget_ms is not None:
                bundle, record = calibrate_on(bundle, [key], opts, host)
                out.thresholds = record["thresholds"]
            if _upload(dev, bundle, target, "push", out):
                target = dev.next
        if target == dev.next:
            dev.remote("switch", dev.next, dev.live, step="switch")
            say(f"{host}: switch: {dev.live} is the new version (the previous one is removed)", opts.quiet)
        final = dev.remote("state", dev.live, step="verify")
        if final.get("manifest") != manifest_digest(load_bundle(bundle.path))[0]:
            raise DeployError(f"deploy: {host}: verify: the device's bundle differs from {bundle.path} "
                              "(changed there during the deploy?); run deploy again")
    finally:
        ssh.close()
    return out


def summary(out: Outcome) -> str:
    """The line `edgeexit deploy` prints at the end."""
    parts = [f"deployed: {out.host}", f"{out.uploaded} file(s) uploaded ({out.uploaded_bytes / (1 << 20):.2f} MiB)",
             "runtime installed" if out.installed else "runtime up to date", f"engines: {out.engines}"]
    if out.batch1_ms is not None:
        parts.append(f"batch 1 {out.batch1_ms:.3f} ms [{out.profile_key}]")
    if out.thresholds is not None:
        parts.append("thresholds " + ", ".join("never" if t is None else f"{t:.4g}" for t in out.thresholds))
    return "; ".join(parts)
