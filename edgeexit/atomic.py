"""Directory writes that cannot lose anything: staging folders, an atomic swap, a lock.

A bundle is assembled in a staging folder beside its destination (`.NAME.partial-PID-RAND`,
same filesystem) and put in place by one atomic operation: `rename` where the destination is
absent or an empty folder, else Linux `renameat2(RENAME_EXCHANGE)` (macOS: `renamex_np`
with `RENAME_SWAP`), which swaps the two folders in one step — at every instant the path
holds the old bundle or the new one. The old one, now in the staging folder's place, is
deleted afterwards; a kill -9 before that leaves a staging folder whose PID is dead, and the
next write to the same destination removes it.

Why an exchange rather than a versioned folder plus a symlink swapped with `rename`: the
bundle stays a real directory at the path the user chose, so `cp -r`, `rsync -a`, `tar`
and a root-filesystem staging step see the bundle and not a link to a sibling folder, and
nothing beside the bundle has to be kept forever. Where the filesystem cannot exchange
(EINVAL: some network and FUSE filesystems), the write is refused rather than done in two
steps.

Updates of one bundle serialise on an advisory lock (`flock`) on `.NAME.lock` beside it;
a lock held by a killed process is released by the kernel.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import platform
import re
import secrets
import shutil
import sys
from pathlib import Path
from typing import Iterator

from edgeexit.errors import BundleError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
_RENAME_SWAP = 2  # macOS sys/stdio.h
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "arm64": 276}  # glibc < 2.28 lacks the wrapper


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def exchange(a: Path, b: Path) -> None:
    """Swap two existing directories atomically (both names stay valid at every instant)."""
    libc = _libc()
    fa, fb = os.fsencode(a), os.fsencode(b)
    if sys.platform == "darwin":
        rc = libc.renamex_np(fa, fb, ctypes.c_uint(_RENAME_SWAP))
    elif hasattr(libc, "renameat2"):
        rc = libc.renameat2(_AT_FDCWD, fa, _AT_FDCWD, fb, ctypes.c_uint(_RENAME_EXCHANGE))
    elif platform.machine() in _SYS_RENAMEAT2:
        rc = libc.syscall(_SYS_RENAMEAT2[platform.machine()], _AT_FDCWD, fa, _AT_FDCWD, fb,
                          ctypes.c_uint(_RENAME_EXCHANGE))
    else:
        raise BundleError(f"output: cannot replace {b} atomically on {sys.platform}/{platform.machine()}; "
                          "write to a new output path")
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise BundleError(f"output: the filesystem of {b} cannot swap folders atomically "
                              f"({os.strerror(err)}); write to a new output path")
        raise OSError(err, os.strerror(err), str(b))


def install(partial: Path, dest: Path) -> None:
    """Put the folder `partial` at `dest` in one atomic step; an old `dest` ends up at
    `partial` (the caller deletes it; nothing is there when `dest` was absent or empty)."""
    if not os.path.lexists(dest) or (dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir())):
        os.rename(partial, dest)  # onto nothing or onto an empty folder: atomic
    else:
        exchange(partial, dest)


def refuse_under_file(path: Path, what: str) -> None:
    """One line when a parent of `path` is a file (nothing can be written there)."""
    for parent in reversed(Path(os.path.abspath(path)).parents):
        if os.path.lexists(parent) and not parent.is_dir():
            raise BundleError(f"{what}: {path} lies under {parent}, which is a file")


def staging_name(dest: Path, kind: str = "partial") -> str:
    """The name of a staging folder for `dest`: `.NAME.KIND-PID-RAND`."""
    return f".{dest.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def make_staging(dest: Path, kind: str = "partial") -> Path:
    """A new, empty staging folder beside `dest` with the usual permissions (umask applies,
    unlike mkdtemp's 0700, so a service user can read the bundle it becomes)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(dest)
    path = dest.parent / staging_name(dest, kind)
    path.mkdir(mode=0o777)
    return path


@contextlib.contextmanager
def staging(dest: Path, kind: str = "partial") -> Iterator[Path]:
    """`make_staging`, removed again on the way out (it is empty after a successful install)."""
    path = make_staging(dest, kind)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:partial|old|engines|sign)-(?P<pid>\d+)(?:-[0-9a-f]+)?$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(dest: Path) -> list[Path]:
    """Remove staging folders of interrupted writes to `dest` (their PID is dead); only
    folders this user owns and edgeexit names are touched. Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(dest.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        m = _LEFTOVER.match(entry.name)
        if not m or m["name"] != dest.name or not entry.is_dir(follow_symlinks=False):
            continue
        if entry.stat(follow_symlinks=False).st_uid != os.getuid() or _alive(int(m["pid"])):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def locked(dest: Path) -> Iterator[None]:
    """Hold the advisory lock of `dest` (`.NAME.lock` beside it) for the duration."""
    import fcntl

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest.parent / f".{dest.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
