"""Loopback "Jetsons" for the deploy tests: a real OpenSSH sshd on 127.0.0.1 per device.

Each device has throw-away host and user keys, an ssh_config entry (``Host NAME``) with a
pinned known_hosts line, and a board of its own: sshd's ``SetEnv`` gives every session
``EDGEEXIT_BOARD_ROOT`` (a fake /etc/nv_tegra_release, device-tree model and meminfo) and puts
the TensorRT simulator (``trt_site/``) on ``PYTHONPATH``, so `edgeexit engines` there builds
simulated plans. The device side runs onnxruntime, as a Jetson without TensorRT would.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"

BOARDS = {
    "orin-nano": ("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", "36", "4.3", 7_800_000),
    "agx-orin": ("NVIDIA Jetson AGX Orin Developer Kit", "36", "4.3", 62_000_000),
}


def sshd_missing() -> str | None:
    """Why no loopback device can be started here, or None."""
    if not os.path.isfile(SSHD):
        return "no sshd: apt-get install openssh-server (CI installs it)"
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "no OpenSSH client"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Device:
    """One loopback device: its ssh alias, the ssh_config that defines it, its folders."""

    name: str
    config: Path
    home: Path  # where deploy --path points
    board: Path
    process: subprocess.Popen

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _board(root: Path, board: str) -> Path:
    model, major, revision, mem_kb = BOARDS[board]
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "proc/device-tree/model").write_text(model + "\0")
    (root / "proc/meminfo").write_text(f"MemTotal:       {mem_kb} kB\n")
    (root / "etc/nv_tegra_release").write_text(
        f"# R{major} (release), REVISION: {revision}, GCID: 38968081, BOARD: generic, EABI: aarch64\n")
    return root


# pip on an offline device: no config files (this machine's point at a local index), an index that refuses
OFFLINE_PIP = "PIP_CONFIG_FILE=/dev/null PIP_INDEX_URL=http://127.0.0.1:9/simple/ PIP_RETRIES=0"


def start_device(folder: Path, name: str, board: str, config: Path, offline: bool = False) -> Device:
    """Start sshd for one device under `folder` and add its ``Host name`` entry to `config`;
    `offline`: its pip reaches no index, as a Jetson on an isolated network."""
    folder.mkdir(parents=True)
    keys = folder / "keys"
    keys.mkdir(mode=0o700)
    for key in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / key)], check=True)
    (keys / "authorized_keys").write_text((keys / "user.pub").read_text())
    port = _free_port()
    board_root = _board(folder / "board", board)
    env = f"EDGEEXIT_BOARD_ROOT={board_root} PYTHONPATH={TESTS / 'trt_site'} EDGEEXIT_SIM_TRT=10.3"
    if offline:
        env += " " + OFFLINE_PIP
    (folder / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {keys / 'host'}
AuthorizedKeysFile {keys / 'authorized_keys'}
PidFile {folder / 'sshd.pid'}
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
SetEnv {env}
""")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation folder
    log = open(folder / "sshd.log", "wb")
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(folder / "sshd_config")], stdout=log, stderr=log)
    host_key = " ".join((keys / "host.pub").read_text().split()[:2])
    (folder / "known_hosts").write_text(f"{name} {host_key}\n")
    with open(config, "a") as f:
        f.write(f"""\
Host {name}
  HostName 127.0.0.1
  Port {port}
  User {pwd.getpwuid(os.getuid()).pw_name}
  IdentityFile {keys / 'user'}
  IdentitiesOnly yes
  HostKeyAlias {name}
  UserKnownHostsFile {folder / 'known_hosts'}
  StrictHostKeyChecking yes
""")
    device = Device(name, config, folder / "opt" / "edgeexit", board_root, process)
    deadline = time.monotonic() + 20
    while True:
        done = subprocess.run(["ssh", "-F", str(config), "-o", "BatchMode=yes", name, "true"], capture_output=True)
        if done.returncode == 0:
            return device
        if process.poll() is not None or time.monotonic() > deadline:
            device.stop()
            raise RuntimeError(f"loopback sshd {name} did not start: {(folder / 'sshd.log').read_text()[-500:]} "
                               f"{done.stderr.decode()[-300:]}")
        time.sleep(0.2)
