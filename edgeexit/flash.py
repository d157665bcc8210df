"""`edgeexit stage BUNDLE ROOTFS`: a bundle in an L4T root filesystem, its engines built at first boot.

Before a Jetson is flashed with L4T's ``flash.sh`` or ``l4t_initrd_flash.sh``, its root
filesystem is a folder on the x86 host (``Linux_for_Tegra/rootfs``). `stage` puts into it:

- the verified bundle at ``<prefix>/<name>/`` (packed and unpacked through `edgeexit.archive`, so
  it is checked the way a device checks it and appears in one rename; TensorRT engines stay out:
  a plan runs only on the module and TensorRT that built it);
- the torch-free edgeexit wheel and any ``--wheelhouse`` wheels in ``<prefix>/wheels/`` (the
  device installs them offline: a freshly flashed board may have no network);
- ``<prefix>/bin/edgeexit-firstboot``, which makes the venv (``--system-site-packages``, so
  JetPack's TensorRT is visible), installs the wheels and runs ``edgeexit engines --device auto
  --cache /var/cache/edgeexit/engines`` for the module it finds;
- ``etc/systemd/system/edgeexit-firstboot.service``, a oneshot that runs the script before the
  user's own service (``--service``), skipped once a stamp named after the digest of the staged
  manifest exists (a restaged bundle has a new stamp, so it is built again), enabled with the
  symbolic links ``systemctl --root=ROOTFS enable`` would make.

Nothing the user wrote is replaced: the unit and the script carry a marker line, the wheel
folder a marker file, the bundle folder must be empty or an intact bundle, and an enable link
must be edgeexit's own. Every check runs before the first write, and nothing is written through
a symbolic link in the rootfs (its links point into the device's tree, not the host's).
"""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from edgeexit.atomic import discard_staging, install, locked, make_staging
from edgeexit.bundle import Bundle, check_output, load_bundle
from edgeexit.doctor import JETPACK, MIN_PYTHON, l4t_release
from edgeexit.errors import EdgeExitError
from edgeexit.seal import seal_digest

UNIT = "edgeexit-firstboot.service"
UNIT_DIR = "etc/systemd/system"
SCRIPT = "edgeexit-firstboot"
MARKER = "# Written by `edgeexit stage`: edgeexit replaces this file when it stages again."
WHEELS_MARKER = ".edgeexit-wheels"
ENGINE_CACHE = "/var/cache/edgeexit/engines"
STAMPS = "/var/lib/edgeexit/firstboot"
DEFAULT_PREFIX = "/opt/edgeexit"
# Building the plans of a five-model bundle takes minutes on an Orin Nano; a oneshot has no start
# timeout unless given one, and a hung build must not hold the boot forever.
START_TIMEOUT = "1h"
_SAFE_PATH = re.compile(r"^(/[A-Za-z0-9._-]+)+$")  # goes into a unit and a shell script unquoted-safe
_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.@\\-]+\.(service|target|socket|timer|path|mount)$")
_WHEEL_NAME = re.compile(r"^(?P<name>[^-]+)-[^-]+(-\d[^-]*)?-[^-]+-[^-]+-(?P<platform>[^-]+)\.whl$")


@dataclass(frozen=True)
class RootFs:
    """An L4T root filesystem on the host: where it is, its L4T release and its python3."""

    path: Path
    l4t: str | None  # "36.4.3"; None when nv_tegra_release does not parse
    python: tuple[int, int]


def read_rootfs(path: str | Path) -> RootFs:
    """The root filesystem at `path`, refused in one line when it is not an L4T rootfs (no etc/,
    no etc/nv_tegra_release, which apply_binaries.sh writes, or no usr/lib) or when its python3
    cannot run edgeexit (below 3.10, or without the venv module the first boot needs)."""
    root = Path(path)
    if not root.is_dir():
        raise EdgeExitError(f"stage: {root} is not a folder; give the L4T root filesystem (Linux_for_Tegra/rootfs)")
    for rel, is_kind in (("etc", Path.is_dir), ("etc/nv_tegra_release", Path.is_file), ("usr/lib", Path.is_dir)):
        if not is_kind(root / rel):
            raise EdgeExitError(f"stage: {root} does not look like an L4T root filesystem (no {rel}); give "
                                "Linux_for_Tegra/rootfs after the sample rootfs is unpacked and "
                                "`sudo ./apply_binaries.sh` has run")
    l4t = l4t_release(root)
    python = _python_of(root)
    where = f"{root}/usr/bin/python3"
    if python is None:
        raise EdgeExitError(f"stage: cannot tell which Python {where} is (not a link to python3.N); the first "
                            "boot runs edgeexit with it")
    version = f"{python[0]}.{python[1]}"
    if python < MIN_PYTHON:
        raise EdgeExitError(f"stage: {where} is Python {version} (JetPack 5 and older ship Ubuntu 20.04 or 18.04); "
                            "edgeexit needs 3.10+, as on JetPack 6 (L4T 36)")
    if not (root / f"usr/lib/python{version}/ensurepip/__init__.py").is_file():
        raise EdgeExitError(f"stage: {root} lacks python{version}-venv (no usr/lib/python{version}/ensurepip), "
                            "which the first boot needs to make the venv; install python3-venv into the rootfs "
                            "first (docs/FLASHING.md)")
    return RootFs(root, l4t, python)


def _python_of(root: Path) -> tuple[int, int] | None:
    """The version of the rootfs's usr/bin/python3, from the name its links lead to. Links are
    followed inside `root` (an absolute target is the device's path, not the host's)."""
    path = root / "usr/bin/python3"
    for _ in range(8):
        if not path.is_symlink():
            break
        target = os.readlink(path)
        path = root / target.lstrip("/") if target.startswith("/") else path.parent / target
    match = re.fullmatch(r"python(\d+)\.(\d+)", path.name)
    return (int(match[1]), int(match[2])) if match and os.path.lexists(path) else None


def check_prefix(prefix: str) -> PurePosixPath:
    """The install folder on the device: an absolute, plain path (it goes into a unit and a script)."""
    if not _SAFE_PATH.match(prefix) or any(part in (".", "..") for part in prefix.split("/")):
        raise EdgeExitError(f"--prefix: {prefix!r} must be an absolute path of letters, digits, _ . - (e.g. "
                            f"{DEFAULT_PREFIX})")
    return PurePosixPath(prefix)


def unit_name(name: str) -> str:
    """`--service NAME` as a systemd unit name (``.service`` added when it has no unit suffix)."""
    full = name if _UNIT_NAME.match(name) else f"{name}.service"
    if not _UNIT_NAME.match(full):
        raise EdgeExitError(f"--service: {name!r} is not a systemd unit name (e.g. myapp.service)")
    return full


def _in_rootfs(root: Path, device_path: str | PurePosixPath) -> Path:
    """`device_path` (absolute, on the device) under `root`, refused where a folder on the way is a
    symbolic link: it points into the device's tree, so writing through it would write on the host."""
    path = root
    for part in PurePosixPath(device_path).parts[1:]:
        path = path / part
        if path.is_symlink():
            raise EdgeExitError(f"stage: {path} is a symbolic link; edgeexit does not write through links in a "
                                "root filesystem")
    return path


def _written_by_us(path: Path) -> bool:
    """Whether the file at `path` carries edgeexit's marker line (then stage may replace it)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return MARKER in f.read(4096).splitlines()[:2]  # line 1 of the unit, line 2 of the script
    except OSError:
        return False


def _check_ours(path: Path, what: str) -> None:
    """Refuse a file at `path` that edgeexit did not write (absent is fine)."""
    if os.path.lexists(path) and (path.is_symlink() or not path.is_file() or not _written_by_us(path)):
        raise EdgeExitError(f"stage: {path} exists and was not written by edgeexit ({what}); move it away or "
                            "remove it yourself")


def _check_wheels_dir(path: Path) -> None:
    if os.path.lexists(path) and (path.is_symlink() or not path.is_dir()
                                  or (any(path.iterdir()) and not (path / WHEELS_MARKER).is_file())):
        raise EdgeExitError(f"stage: {path} exists and was not written by edgeexit (no {WHEELS_MARKER}); "
                            "choose another --prefix or empty it yourself")


def _check_writable(paths: Sequence[Path]) -> None:
    """Refuse, before any write, when the folder each path is renamed into cannot be written."""
    for path in paths:
        existing = next(p for p in path.parents if os.path.lexists(p))
        if not os.access(existing, os.W_OK | os.X_OK):
            raise EdgeExitError(f"stage: cannot write in {existing} (permission denied); the rootfs belongs to "
                                "root after apply_binaries.sh: run `sudo edgeexit stage ...`")


def _write_file(path: Path, text: str, mode: int) -> None:
    """`text` at `path` in one rename from a temporary file beside it, with `mode` (not the umask's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _link(path: Path, target: str) -> None:
    """A symbolic link `path` -> `target`, put in place in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, path)


def wheel_requirements(wheel: Path) -> list[str]:
    """The distributions a wheel requires (its METADATA's Requires-Dist, extras left out), normalised."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            meta = next((n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1), None)
            text = zf.read(meta).decode("utf-8", errors="replace") if meta else None
    except (OSError, zipfile.BadZipFile) as exc:
        raise EdgeExitError(f"stage: cannot read the wheel {wheel} ({exc})") from None
    if text is None:
        raise EdgeExitError(f"stage: {wheel} has no .dist-info/METADATA; not a wheel")
    message = email.parser.Parser().parsestr(text)
    names = []
    for req in message.get_all("Requires-Dist") or []:
        if "extra" in req.partition(";")[2]:
            continue
        names.append(_normalise(re.match(r"[A-Za-z0-9._-]+", req.strip())[0]))
    return names


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheelhouse_wheels(wheelhouse: Path) -> list[Path]:
    """The .whl files of a --wheelhouse folder, refused in one line when there are none."""
    if not wheelhouse.is_dir():
        raise EdgeExitError(f"--wheelhouse: {wheelhouse} is not a folder of wheels")
    found = sorted(p for p in wheelhouse.iterdir() if p.suffix == ".whl" and p.is_file())
    if not found:
        raise EdgeExitError(f"--wheelhouse: {wheelhouse} holds no .whl files")
    return found


def wheel_warnings(ours: Path, others: Sequence[Path]) -> list[str]:
    """What the offline install at first boot would miss: edgeexit's requirements no wheel
    provides, and wheels built for another platform than the Jetson's aarch64."""
    lines = []
    for wheel in others:
        match = _WHEEL_NAME.match(wheel.name)
        platform = match["platform"] if match else "?"
        if platform != "any" and "aarch64" not in platform:
            lines.append(f"{wheel.name} is for {platform}, not the Jetson's aarch64 (pip download --platform "
                         "manylinux2014_aarch64 ...)")
    have = {_normalise(m["name"]) for w in others if (m := _WHEEL_NAME.match(w.name))}
    missing = [name for name in wheel_requirements(ours) if name not in have]
    if missing:
        lines.append(f"no wheel for {', '.join(missing)} (edgeexit's requirements): the first boot installs offline, "
                     "so the rootfs must already have them, else add them with --wheelhouse (docs/FLASHING.md)")
    return lines


def firstboot_script(prefix: PurePosixPath, bundle: str, wheel: str, stamp: str) -> str:
    """The shell script the unit runs on the device (POSIX sh: the rootfs's /bin/sh is dash)."""
    venv = prefix / "venv"
    pip = f"{venv}/bin/python -m pip install --quiet --disable-pip-version-check --no-index"
    return f"""#!/bin/sh
{MARKER}
# First boot of a flashed Jetson: build the TensorRT engines of {prefix / bundle}
# for the module this runs on, once per staged bundle (the stamp names the staged manifest's
# digest). Offline: the wheels come from {prefix / 'wheels'}. Run by {UNIT}
# (journalctl -u {UNIT.removesuffix('.service')}).
set -eu
stamp={stamp}
if [ -e "$stamp" ]; then
    echo "engines of {bundle} already built ($stamp)"
    exit 0
fi
if [ ! -x {venv}/bin/python ]; then
    echo "creating {venv} (with the system site packages, where JetPack's TensorRT is)"
    /usr/bin/python3 -m venv --system-site-packages {venv}
fi
echo "installing edgeexit and its requirements from {prefix / 'wheels'} (offline)"
{pip} --find-links {prefix / 'wheels'} {prefix / 'wheels' / wheel}
# the same version may be installed from an earlier staging: this wheel replaces it
{pip} --no-deps --force-reinstall {prefix / 'wheels' / wheel}
echo "building the engines of {bundle} (minutes; plans in {ENGINE_CACHE} are reused)"
{venv}/bin/edgeexit engines {prefix / bundle} --device auto --cache {ENGINE_CACHE} --quiet
mkdir -p {STAMPS}
rm -f {STAMPS}/{bundle}.{"[0-9a-f]" * 16}.done
: > "$stamp"
echo "engines of {bundle} built"
"""


def firstboot_unit(prefix: PurePosixPath, bundle: str, stamp: str, service: str | None) -> str:
    """The systemd unit: a oneshot, skipped once the stamp exists, ordered before `service`."""
    before = f"Before={service}\n" if service else ""
    required = f"RequiredBy={service}\n" if service else ""
    return f"""{MARKER}
# Builds the TensorRT engines of {prefix / bundle} at first boot for the module it finds
# (journalctl -u {UNIT.removesuffix('.service')}). No network-online.target: the wheels are
# installed offline and the engines are built on the board.
[Unit]
Description=edgeexit: build the TensorRT engines of {bundle} for this Jetson
ConditionPathExists=!{stamp}
RequiresMountsFor={prefix} {STAMPS} {PurePosixPath(ENGINE_CACHE).parent}
# plans are timed while they are built: after nvpmodel has set the power mode
After=nvpmodel.service
{before}
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={prefix / 'bin' / SCRIPT}
TimeoutStartSec={START_TIMEOUT}
StandardOutput=journal
StandardError=journal
SyslogIdentifier={UNIT.removesuffix('.service')}

[Install]
WantedBy=multi-user.target
{required}"""


def enable_links(service: str | None) -> list[str]:
    """The links `systemctl enable` makes for the unit's [Install] section, relative to etc/systemd/system."""
    return [f"multi-user.target.wants/{UNIT}"] + ([f"{service}.requires/{UNIT}"] if service else [])


def flash_command(device: str | None, l4t: str | None) -> str:
    """The L4T command that flashes this rootfs onto the bundle's module (developer-kit board
    configs, JetPack 6), or a pointer to the guide where edgeexit cannot tell."""
    major_minor = tuple(int(p) for p in l4t.split(".")) if l4t else ()
    if device and device.startswith(("jetson-orin-nano", "jetson-orin-nx")) and major_minor[:1] == (36,):
        board = "jetson-orin-nano-devkit-super" if major_minor >= (36, 4, 3) else "jetson-orin-nano-devkit"
        return ("sudo ./tools/kernel_flash/l4t_initrd_flash.sh --external-device nvme0n1p1 "
                "-c tools/kernel_flash/flash_l4t_t234_nvme.xml -p \"-c bootloader/generic/cfg/flash_t234_qspi.xml\" "
                f"--showlogs --network usb0 {board} internal")
    if device and device.startswith("jetson-agx-orin") and major_minor[:1] == (36,):
        return "sudo ./flash.sh jetson-agx-orin-devkit internal"
    return "sudo ./flash.sh <board> internal, or l4t_initrd_flash.sh for NVMe (docs/FLASHING.md)"


def _jetpack_warning(bundle: Bundle, rootfs: RootFs) -> str | None:
    """One line when the rootfs's JetPack is not the one the bundle's target profile names."""
    from edgeexit.devices import load_device

    device = bundle.manifest["target"]["device"]
    try:
        profile = load_device(device)
    except EdgeExitError:
        return f"the bundle's target {device} has no device profile here, so its JetPack is not compared"
    if profile.kind != "jetson":
        return (f"the bundle targets {device}, not a Jetson; the engines are built at first boot for the module "
                "found there")
    jetpack = JETPACK.get(rootfs.l4t) if rootfs.l4t else None
    if jetpack is None:
        return (f"the rootfs's L4T release ({rootfs.l4t or 'unreadable'}) is unknown to edgeexit, so its JetPack is "
                f"not compared with {device}'s {profile.jetpack.version}")
    if jetpack != profile.jetpack.version:
        return (f"the rootfs is L4T {rootfs.l4t} (JetPack {jetpack}) but the bundle's target {device} names JetPack "
                f"{profile.jetpack.version} (TensorRT {profile.jetpack.tensorrt}); the engines are built for what the "
                "board runs")
    return None


def stage(bundle_path: str | Path, rootfs_path: str | Path, prefix: str = DEFAULT_PREFIX,
          service: str | None = None, wheelhouse: str | Path | None = None, wheel: str | Path | None = None,
          say: Callable[[str], None] = print,
          warn: Callable[[str], None] = lambda line: print(f"stage: warning: {line}", file=sys.stderr)) -> Bundle:
    """Install the bundle at `bundle_path` into the root filesystem `rootfs_path` (see the module
    text) and return it as staged there. `wheel` is the edgeexit wheel to install (default: built
    from this checkout). Every refusal comes before the first write; `say` gets one line per
    thing written, then the flash command."""
    from edgeexit.archive import pack, unpack

    bundle = load_bundle(bundle_path)
    rootfs = read_rootfs(rootfs_path)
    device_prefix = check_prefix(prefix)
    service = unit_name(service) if service else None
    root, name = rootfs.path, bundle.name
    dest = _in_rootfs(root, device_prefix / name)
    wheels_dir = _in_rootfs(root, device_prefix / "wheels")
    script = _in_rootfs(root, device_prefix / "bin" / SCRIPT)
    unit_dir = _in_rootfs(root, f"/{UNIT_DIR}")
    unit = unit_dir / UNIT
    stamps = _in_rootfs(root, STAMPS)
    links = [(unit_dir / rel, f"/{UNIT_DIR}/{UNIT}") for rel in enable_links(service)]
    check_output(dest)
    _check_wheels_dir(wheels_dir)
    _check_ours(script, "the first-boot script")
    _check_ours(unit, "a unit of the same name")
    for link, target in links:
        _in_rootfs(root, f"/{link.parent.relative_to(root).as_posix()}")  # the link itself is checked below
        if os.path.lexists(link) and not (link.is_symlink() and os.readlink(link) == target):
            raise EdgeExitError(f"stage: {link} exists and is not edgeexit's link to {target}; remove it yourself")
    extra = wheelhouse_wheels(Path(wheelhouse)) if wheelhouse is not None else []
    _check_writable([dest, wheels_dir, script, unit, *(link for link, _ in links)])
    if (line := _jetpack_warning(bundle, rootfs)) is not None:
        warn(line)
    if service and not any((root / d / service).exists() for d in ("etc/systemd/system", "lib/systemd/system",
                                                                   "usr/lib/systemd/system")):
        warn(f"{service} is not in the rootfs yet; the first-boot unit is ordered before it once it is installed")

    with tempfile.TemporaryDirectory(prefix="edgeexit-stage-") as tmp:
        ours = edgeexit_wheel(Path(tmp), wheel)
        for line in wheel_warnings(ours, extra):
            warn(line)
        archive = pack(bundle.path, Path(tmp) / f"{name}.tar").path  # engines stay out
        staged = unpack(archive, dest)
        say(f"staged: {dest} ({len(staged.present)} files, checksums verified; engines are built at first boot)")
        _install_wheels(wheels_dir, [ours, *extra])
        say(f"staged: {wheels_dir} ({ours.name}" + (f" and {len(extra)} more wheels)" if extra else ")"))
    stamp = f"{STAMPS}/{name}.{seal_digest(staged.manifest)[:16]}.done"
    _drop_stamps(stamps, name, say)
    _write_file(script, firstboot_script(device_prefix, name, ours.name, stamp), 0o755)
    say(f"staged: {script}")
    _write_file(unit, firstboot_unit(device_prefix, name, stamp, service), 0o644)
    say(f"staged: {unit}")
    for link, target in links:
        _link(link, target)
        say(f"enabled: {link} -> {target}")
    _disable_others(unit_dir, {link for link, _ in links}, say)
    command = flash_command(bundle.manifest["target"]["device"], rootfs.l4t)
    cd = f"cd {root.parent} && " if (root.parent / "flash.sh").is_file() else ""
    say(f"next: put the module in recovery mode and flash from Linux_for_Tegra: {cd}{command}")
    return staged


def _drop_stamps(stamps: Path, name: str, say: Callable[[str], None]) -> None:
    """Remove the first-boot stamps of bundle `name` (an image taken from a board that booted has
    them): the bundle just staged has no engines, so its first boot must build them."""
    for old in sorted(stamps.iterdir()) if stamps.is_dir() else ():
        if re.fullmatch(re.escape(name) + r"\.[0-9a-f]{16}\.done", old.name):
            old.unlink()
            say(f"removed: {old} (the engines of the restaged bundle are built again)")


def _disable_others(unit_dir: Path, wanted: set[Path], say: Callable[[str], None]) -> None:
    """Remove edgeexit's own enable links that this staging did not ask for (a dropped --service)."""
    for folder in sorted(unit_dir.iterdir()):  # not glob: it skips links whose target is not on this host
        old = folder / UNIT
        if (folder.name.endswith((".wants", ".requires")) and not folder.is_symlink() and old not in wanted
                and old.is_symlink() and os.readlink(old) == f"/{UNIT_DIR}/{UNIT}"):
            old.unlink()
            say(f"disabled: {old} (not asked for this time)")


def edgeexit_wheel(tmp: Path, wheel: str | Path | None) -> Path:
    """The edgeexit wheel to stage: `wheel`, or one built from this checkout into `tmp`."""
    if wheel is None:
        from edgeexit.wheel import build_wheel

        return build_wheel(tmp / "wheel")
    path = Path(wheel)
    if not path.is_file() or not re.match(r"^edgeexit-[^-]+-.*\.whl$", path.name):
        raise EdgeExitError(f"--wheel: {wheel} is not an edgeexit wheel file (edgeexit-VERSION-...whl)")
    return path


def _install_wheels(dest: Path, wheels: Sequence[Path]) -> None:
    """`wheels` as the folder `dest` (with edgeexit's marker), replacing edgeexit's previous one in one step."""
    dest = Path(os.path.abspath(dest))
    with locked(dest):
        _check_wheels_dir(dest)  # again: it may have changed meanwhile
        part = make_staging(dest)
        try:
            for wheel in wheels:
                shutil.copyfile(wheel, part / wheel.name)
                os.chmod(part / wheel.name, 0o644)
            (part / WHEELS_MARKER).write_text("Wheels for the first boot, written by `edgeexit stage`; it replaces "
                                              "this folder when it stages again.\n")
            os.chmod(part, 0o755)
            install(part, dest)
        finally:
            discard_staging(part)
