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

from edgeexit.errors import EdgeExitError

DEFAULT_DIR = "/opt/edgeexit"
MIN_PYTHON = (3, 10)
_INSTALL_SLACK = 300 << 20  # what a runtime install (numpy, onnx, onnxruntime) may take on the device
_PREFLIGHT = r"""
import json, os, shutil, sys
d, error = sys.argv[1], None
if sys.version_info >= (3, 10):
    try:
        os.makedirs(d, exist_ok=True)
        probe = os.path.join(d, ".edgeexit-write-test")
        open(probe, "w").close()
        os.unlink(probe)
    except OSError as exc:
        error = "%s: %s" % (d, exc.strerror or exc)
p = d
while not os.path.exists(p):
    p = os.path.dirname(p) or "/"
print(json.dumps({"python": "%d.%d.%d" % sys.version_info[:3], "free_bytes": shutil.disk_usage(p).free,
                  "error": error, "venv": os.path.isfile(os.path.join(d, "venv/bin/python"))}))
"""


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
    python: str = "python3"
    engines: bool = True
    ssh_config: str | None = None
    ssh_options: tuple[str, ...] = ()
    quiet: bool = False


def _manifest_digest(bundle) -> tuple[str, dict[str, str]]:
    """The digest of the engine-free manifest `pack` sends, and its files: what `remote state` reports."""
    from edgeexit.archive import archive_contents
    from edgeexit.seal import digest

    manifest, files, _ = archive_contents(bundle, engines=False)
    return digest(manifest), {rel: manifest["files"][rel] for rel in files}


class _Device:
    """The paths and commands of one deploy on one host."""

    def __init__(self, ssh: Ssh, opts: Options, name: str):
        root = PurePosixPath(opts.path)
        if not root.is_absolute():
            raise EdgeExitError(f"--path: {opts.path!r} must be an absolute path on the device")
        self.ssh, self.opts, self.root = ssh, opts, root
        self.python = str(root / "venv/bin/python")
        self.edgeexit = str(root / "venv/bin/edgeexit")
        self.live, self.next = str(root / name), str(root / f".{name}.next")
        self.cache = str(root / "engine-cache")

    def remote(self, op: str, *args: str, step: str, **kwargs) -> dict[str, Any]:
        return self.ssh.json([self.python, "-m", "edgeexit.remote", op, *args], step, **kwargs)


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def _preflight(dev: _Device, bundle_bytes: int) -> dict[str, Any] | None:
    """Python and disk on the device, then its edgeexit's facts (None when it has none yet)."""
    bare = dev.ssh.json([dev.opts.python, "-c", _PREFLIGHT, str(dev.root)], "pre-flight")
    version = tuple(int(p) for p in bare["python"].split("."))
    if version < MIN_PYTHON:
        raise DeployError(f"deploy: {dev.ssh.host}: pre-flight: {dev.opts.python} is Python {bare['python']}; edgeexit "
                          "needs 3.10+ (--python names another interpreter there)")
    if bare["error"]:
        raise DeployError(f"deploy: {dev.ssh.host}: pre-flight: cannot write {bare['error']}; choose --path or give "
                          "this user that folder")
    need = 2 * bundle_bytes + (0 if bare["venv"] else _INSTALL_SLACK)
    if bare["free_bytes"] < need:
        raise DeployError(f"deploy: {dev.ssh.host}: pre-flight: {_gib(bare['free_bytes'])} free at {dev.root}, "
                          f"{_gib(need)} needed")
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
        f"{_gib(bare['free_bytes'])} free at {dev.root}"
        + ("" if facts else "; no edgeexit there yet"), dev.opts.quiet)
    return facts


def _install_runtime(dev: _Device, facts: dict[str, Any] | None, out: Outcome) -> dict[str, Any]:
    """Install this edgeexit (torch-free) into DIR/venv unless the device already runs the same code."""
    from edgeexit import __version__
    from edgeexit.wheel import build_wheel, code_digest

    mine = code_digest()
    if facts is not None and facts.get("code") == mine:
        say(f"{dev.ssh.host}: runtime: edgeexit {facts['edgeexit']} up to date in {dev.root}/venv", dev.opts.quiet)
        return facts
    with tempfile.TemporaryDirectory(prefix="edgeexit-wheel-") as tmp:
        wheel = Path(dev.opts.wheel) if dev.opts.wheel else build_wheel(tmp)
        if not wheel.is_file() or not wheel.name.endswith(".whl"):
            raise EdgeExitError(f"--wheel: {wheel} is not a wheel file")
        remote_wheel = str(dev.root / "wheels" / wheel.name)
        venv = str(dev.root / "venv")
        _put(dev, wheel, remote_wheel, "runtime: upload the wheel")
    say(f"{dev.ssh.host}: runtime: installing edgeexit {__version__} into {venv} (--system-site-packages) ...",
        dev.opts.quiet)
    script = ('set -e; [ -x "$1/bin/python" ] || "$3" -m venv --system-site-packages "$1"; '
              '"$1/bin/python" -m pip install --quiet --disable-pip-version-check "$2"; '
              '"$1/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$2"')
    dev.ssh.run(["sh", "-c", script, "sh", venv, remote_wheel, dev.opts.python], "runtime: pip install")
    facts = dev.remote("facts", step="runtime: check the install")
    if facts.get("code") != mine:
        raise DeployError(f"deploy: {dev.ssh.host}: runtime: the installed edgeexit is not this one (code "
                          f"{str(facts.get('code'))[:12]} there, {mine[:12]} here)")
    out.installed = True
    return facts


def _put(dev: _Device, local: Path, remote: str, step: str) -> None:
    """Copy one file to the device, appearing under its name only once it is complete."""
    with open(local, "rb") as f:
        dev.ssh.run(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1.part" && mv "$1.part" "$1"', "sh", remote],
                    step, stdin=f)


def _upload(dev: _Device, bundle, base: str, step: str, out: Outcome) -> bool:
    """Send what the device's bundle at `base` lacks and unpack it at DIR/.<name>.next; False if
    the device already has this bundle there (nothing is sent)."""
    from edgeexit.archive import pack

    have = dev.remote("state", base, step=step)
    digest, files = _manifest_digest(bundle)
    if have.get("exists") and have.get("manifest") == digest:
        return False
    theirs = have.get("files") or {}
    changed = [rel for rel, h in files.items() if theirs.get(rel) != h]
    with tempfile.TemporaryDirectory(prefix="edgeexit-upload-") as tmp:
        packed = pack(bundle.path, Path(tmp) / f"{bundle.name}.tar", only=changed)
        with open(packed.path, "rb") as f:
            dev.remote("receive", dev.next, *(["--base", base] if have.get("exists") else []), step=step, stdin=f)
    out.uploaded += len(changed)
    out.uploaded_bytes += packed.bytes
    say(f"{dev.ssh.host}: {step}: {len(changed)} of {len(files)} files ({packed.bytes / (1 << 20):.2f} MiB), "
        f"unpacked and verified at {dev.next}", dev.opts.quiet)
    return True


def _engines(dev: _Device, facts: dict[str, Any], bundle, target: str, out: Outcome) -> None:
    """`edgeexit engines` on the device for its own module, through the engine cache."""
    doctor = facts.get("doctor") or {}
    if not doctor.get("tensorrt"):
        out.engines = "no TensorRT"
        say(f"{dev.ssh.host}: engines: skipped: no TensorRT there (the bundle runs on onnxruntime)", dev.opts.quiet)
        return
    from edgeexit.export.tensorrt import engine_key, parse_version

    device = dev.opts.device or facts.get("device") or bundle.manifest["target"]["device"]
    key = engine_key(device, parse_version(doctor["tensorrt"]))
    if key in (dev.remote("state", target, step="engines").get("engines") or {}):
        out.engines = f"{key} (kept)"
        say(f"{dev.ssh.host}: engines: {key} built before from these graphs; kept", dev.opts.quiet)
        return
    say(f"{dev.ssh.host}: engines: building {key} (cache {dev.cache}) ...", dev.opts.quiet)
    dev.ssh.run([dev.edgeexit, "engines", target, "--device", device, "--cache", dev.cache], "engines", stream=True)
    if key not in (dev.remote("state", target, step="engines").get("engines") or {}):
        raise DeployError(f"deploy: {dev.ssh.host}: engines: the device wrote no engine set {key}")
    out.engines = key


def _profile(dev: _Device, facts: dict[str, Any], bundle, target: str, out: Outcome):
    """Profile on the device and merge its entry into the local bundle; returns (bundle, key)."""
    from edgeexit.bundle import Change, update_bundle
    from edgeexit.calibrate import profile_batches
    from edgeexit.profile import PROFILE, profile_key, with_profiles
    from edgeexit.runtime.loader import max_batch

    top = max_batch(bundle)
    batches = sorted({b for b in (1, 8, 32) if b <= top} | set(profile_batches(dev.opts.batch)))
    say(f"{dev.ssh.host}: profile: batch {','.join(map(str, batches))}, {dev.opts.iters} calls each, "
        f"backend {dev.opts.backend} ...", dev.opts.quiet)
    # the device may lack the data set (scikit-learn's digits, a folder of images): its test split goes along
    import numpy as np

    from edgeexit.data import bundle_split

    split = bundle_split(bundle.manifest, "test", None)
    data = str(dev.root / f".{bundle.name}.profile-data.npz")
    with tempfile.TemporaryDirectory(prefix="edgeexit-data-") as tmp:
        np.savez(Path(tmp) / "test.npz", x=split.x, y=split.y)
        _put(dev, Path(tmp) / "test.npz", data, "profile: upload the test split")
    argv = [dev.edgeexit, "profile", target, "--backend", dev.opts.backend, "--batch", ",".join(map(str, batches)),
            "--iters", str(dev.opts.iters), "--data", data, "--json", "--quiet"]
    entry = dev.ssh.json(argv + ([] if facts.get("tegrastats") else ["--no-power"]), "profile")
    dev.ssh.run(["rm", "-f", data], "profile: remove the test split")
    key = profile_key(entry["backend"], entry["device"])
    bundle = update_bundle(bundle, lambda current: Change(with_profiles(current.path, {key: entry}),
                                                          {"profile": PROFILE}))
    out.profile_key = key
    out.batch1_ms = ((entry["batches"].get("1") or {}).get("end_to_end") or {}).get("cascade", {}).get("mean_ms")
    say(f"{dev.ssh.host}: profile: merged into {bundle.path / PROFILE} [{key}]", dev.opts.quiet)
    return bundle, key


def _calibrate(bundle, key: str, opts: Options, host: str, out: Outcome):
    """Thresholds for the budget on the device's profile entry, fitted and checked here."""
    from calibration.solvers import TAILS, Budget
    from edgeexit.calibrate import calibrate
    from edgeexit.runtime.loader import open_backend

    budget = Budget(opts.budget_ms / 1e3, opts.batch, TAILS[opts.tail])
    say(f"{host}: calibrate: {opts.tail} latency <= {opts.budget_ms:g} ms at batch {opts.batch} on "
        f"profile.json[{key}] ...", opts.quiet)
    with open_backend(bundle, "onnxruntime") as backend:
        bundle, record = calibrate(bundle, backend, budget, latency="profile", progress=False, latency_key=key)
    out.thresholds = record["thresholds"]
    test = record["test"]
    say(f"{host}: calibrate: thresholds {record['thresholds']}; on the test split {test['accuracy'] * 100:.1f}% "
        f"accuracy, {test['mean_ms']:.3f} ms mean / {test['p95_ms']:.3f} ms p95 per call on the device's profile",
        opts.quiet)
    return bundle


def deploy(bundle_path: str | Path, host: str, opts: Options = Options(),
           ssh_factory: Callable[..., Ssh] = Ssh) -> Outcome:
    """Deploy the bundle at `bundle_path` to `host`: see the module text for the steps. The
    device's previous bundle stays in place until the new one is complete and verified there."""
    from edgeexit.bundle import load_bundle

    bundle = load_bundle(bundle_path)
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
            _engines(dev, facts, bundle, target, out)
        if opts.profile or opts.budget_ms is not None:
            bundle, key = _profile(dev, facts, bundle, target, out)
            if opts.budget_ms is not None:
                bundle = _calibrate(bundle, key, opts, host, out)
            if _upload(dev, bundle, target, "push", out):
                target = dev.next
        if target == dev.next:
            dev.remote("switch", dev.next, dev.live, step="switch")
            say(f"{host}: switch: {dev.live} is the new version (the previous one is removed)", opts.quiet)
        final = dev.remote("state", dev.live, step="verify")
        if final.get("manifest") != _manifest_digest(load_bundle(bundle.path))[0]:
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
