"""Directory writes that cannot lose anything: staging folders, an atomic swap, a lock.

A bundle is assembled in a staging folder beside its destination (`.NAME.partial-PID-RAND`,
same filesystem) and put in place by one atomic operation: `rename` where the destination is
absent or an empty folder, else Linux `renameat2(RENAME_EXCHANGE)` (macOS: `renamex_np`
with `RENAME_SWAP`), which swaps the two folders in one step — at every instant the path
holds the old bundle or the new one. The old one, now in the staging folder's place, is
deleted afterwards; a kill -9 before that leaves a staging folder whose PID is dead and whose
flock is free, and the next write to the same destination removes it.

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


def check_writable_beside(dest: Path) -> None:
    """Refuse, before any work, an update whose result could not be written: the lock and the
    staging folder go beside `dest`, so its parent folder must be writable."""
    if not os.access(dest.parent, os.W_OK | os.X_OK):
        raise BundleError(f"bundle: cannot write beside {dest} (its folder {dest.parent} is not writable); "
                          "nothing was done")


def refuse_under_file(path: Path, what: str) -> None:
    """One line when a parent of `path` is a file (nothing can be written there)."""
    for parent in reversed(Path(os.path.abspath(path)).parents):
        if os.path.lexists(parent) and not parent.is_dir():
            raise BundleError(f"{what}: {path} lies under {parent}, which is a file")


def staging_name(dest: Path, kind: str = "partial") -> str:
    """The name of a staging folder for `dest`: `.NAME.KIND-PID-RAND`."""
    return f".{dest.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


_HELD: dict[str, int] = {}  # staging folder -> open fd holding its flock while this process uses it


def make_staging(dest: Path, kind: str = "partial") -> Path:
    """A new, empty staging folder beside `dest` with the usual permissions (umask applies,
    unlike mkdtemp's 0700, so a service user can read the bundle it becomes). The folder is
    flock-ed while this process uses it, so no cleaner, in this PID namespace or another
    sharing the filesystem, takes it for a leftover."""
    import fcntl

    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(dest)
    path = dest.parent / staging_name(dest, kind)
    path.mkdir(mode=0o777)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _HELD[str(path)] = fd
    return path


def discard_staging(path: Path) -> None:
    """Remove a staging folder (what is left in it after the install) and drop its lock."""
    shutil.rmtree(path, ignore_errors=True)
    fd = _HELD.pop(str(path), None)
    if fd is not None:
        os.close(fd)


@contextlib.contextmanager
def staging(dest: Path, kind: str = "partial") -> Iterator[Path]:
    """`make_staging`, removed again on the way out (it is empty after a successful install)."""
    path = make_staging(dest, kind)
    try:
        yield path
    finally:
        discard_staging(path)


# exactly what staging_name writes, for the kinds edgeexit makes: nothing else is ever removed
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:partial|engines)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _alive(pid: int) -> bool:
    """Whether process `pid` may still write: it exists and is not a zombie (a killed writer
    whose parent has not reaped it yet, which happens where PID 1 reaps orphans late)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc: cannot tell, so it may be alive


def _in_use(path: str) -> bool:
    """Whether some process holds the staging folder's flock (make_staging takes it)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return True  # cannot tell: leave it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def clean_leftovers(dest: Path) -> list[Path]:
    """Remove staging folders of interrupted writes to `dest`: named exactly as edgeexit names
    them, owned by this user, their PID dead here and their lock free (a write from another
    PID namespace still holds it). Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(dest.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        m = _LEFTOVER.match(entry.name)
        if not m or m["name"] != dest.name or not entry.is_dir(follow_symlinks=False):
            continue
        if entry.stat(follow_symlinks=False).st_uid != os.getuid() or _alive(int(m["pid"])) or _in_use(entry.path):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def locked(dest: Path) -> Iterator[None]:
    """Hold the advisory lock of `dest` (`.NAME.lock` beside it) for the duration."""
    import fcntl

    lock = dest.parent / f".{dest.name}.lock"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)  # never through a planted link
    except OSError as exc:
        why = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        raise BundleError(f"bundle: cannot take the lock {lock}: {why}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
