"""Exclusive locks that one process at a time holds, taken without waiting: an flock on a lock file,
which the kernel releases when its holder ends however it ends, the holder's process written in the
file for a second run's message. `flock_now` / `try_flock` are the one primitive under the locks we
take: training's --save folder (`lock_folder`, held for the run's life), preprocessing's output prefix
(`megatron_eve.data.prefix_swap.prefix_lock`, held while a run writes it) and evaluation's answers side
file (`megatron_eve.eval.resume.SideFile`)."""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import os
import re
from dataclasses import dataclass
from typing import Optional

from megatron_eve.atomic import host_name, process_alive
from megatron_eve.config import ConfigError

# Errors of a file system without flock (an NFS mount without lockd, Lustre mounted noflock, ...).
NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
_BUSY = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}


@dataclass
class Flock:
    """What try_flock got: `fd` the open lock file (None: another process holds the lock); `created`
    whether this call made the file; `flocked` False where the file system has no flock (fd unlocked)."""

    fd: Optional[int]
    created: bool = False
    flocked: bool = False
    changing: bool = False  # (fd None) the file was replaced or removed at every try: runs starting and ending


def flock_now(fd: int) -> Optional[bool]:
    """An exclusive flock on the open file `fd`, without waiting: True taken, False another process
    holds it, None the file system has no flock (then nothing can be locked there)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in NO_FLOCK:
            return None
        if error.errno in _BUSY:
            return False
        raise
    return True


def try_flock(path: str) -> Flock:
    """An exclusive flock on `path` (created if absent), without waiting. The file locked is the one
    on disk: a holder deletes its file before unlocking, so a lock taken on a deleted file is retried
    on the new one, up to 100 times (then `changing`)."""
    for _ in range(100):
        try:
            fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
        except FileExistsError:
            try:
                fd, created = os.open(path, os.O_RDWR), False
            except FileNotFoundError:
                continue
            except PermissionError:  # another user's file: locked all the same (flock needs no write access)
                fd, created = os.open(path, os.O_RDONLY), False
        try:
            got = flock_now(fd)
        except OSError:
            os.close(fd)
            raise
        if got is None:
            return Flock(fd, created, flocked=False)
        if not got:
            os.close(fd)
            return Flock(None)
        try:
            current = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            current = False
        if current:
            return Flock(fd, created, flocked=True)
        os.close(fd)
    return Flock(None, changing=True)


def owner(pid: Optional[int] = None) -> str:
    """How a lock file names its holder."""
    return f"pid {pid or os.getpid()} on host {host_name()}"


def record_owner(fd: int) -> None:
    """Write this process into the lock file it holds (for the message of a second run)."""
    with contextlib.suppress(OSError):  # (a file opened read-only: the lock holds, unnamed)
        os.ftruncate(fd, 0)
        os.write(fd, owner().encode())
        os.fsync(fd)


def read_owner(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read(200).strip()
    except OSError:
        return ""


def _dead_holder(recorded: str) -> bool:
    """Whether `recorded` names a process of this host that has ended."""
    match = re.fullmatch(r"pid (\d+) on host (\S+)", recorded)
    return bool(match) and match[2] == host_name() and not process_alive(int(match[1]))


def described_holder(path: str) -> str:
    """Who holds an flock on `path`: the process recorded in it; one of this host that has ended left
    the lock to a process it forked (a background checkpoint writer, a data loader worker), still alive."""
    recorded = read_owner(path)
    if _dead_holder(recorded):
        return f"{recorded}, which has ended; a process it started still holds the lock"
    return recorded or "its process is not recorded"


# ---------------------------------------------------------------------------------- folder locks
LOCK_NAME = ".megatron_eve-lock"  # in a folder one run at a time writes (training's --save)
_held_locks: dict = {}  # real path of a locked folder -> (open lock file, its path, flock or not)


class FolderLocked(ConfigError):
    """Another process holds the folder's lock (lock_folder)."""


def holds_lock(folder: str) -> bool:
    """Whether this process holds `folder`'s lock (lock_folder)."""
    return os.path.realpath(folder) in _held_locks


def lock_folder(folder: str) -> None:
    """Take `folder`'s exclusive lock (making the folder) for the rest of this process's life: a
    second process (another run on the same folder) gets FolderLocked naming the holder. An flock
    on the folder's LOCK_NAME file; where the file system has no flock, the file's existence is the
    lock, and one a dead process of this host left is taken over (one of another host cannot be
    checked: deleting it is the user's call). Taken again by the same process: nothing to do. The
    file is deleted when the process exits."""
    os.makedirs(folder, exist_ok=True)
    real = os.path.realpath(folder)
    if real in _held_locks:
        return
    path = os.path.join(real, LOCK_NAME)
    for _ in range(100):  # a stale file (no flock) taken over: try again
        lock = try_flock(path)
        if lock.changing:
            break
        if lock.fd is None:
            raise FolderLocked(f"another run is saving to {folder} ({described_holder(path)})")
        if lock.flocked or lock.created:
            _hold(real, path, lock)
            return
        os.close(lock.fd)
        if not _stale_lock_removed(path):
            recorded = read_owner(path) or "its process is not recorded"
            raise FolderLocked(f"another run is saving to {folder} ({recorded}; this file system has no flock: "
                               f"if no run is saving there, delete {path})")
    raise FolderLocked(f"cannot lock {folder}: {path} keeps changing (another run starting?)")


def _stale_lock_removed(path: str) -> bool:
    """A lock file (of a file system without flock) whose holder, a process of this host, is gone: deleted."""
    recorded = read_owner(path)
    if not _dead_holder(recorded):
        return False
    if read_owner(path) == recorded:  # (not taken over meanwhile)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    return True


def _hold(real: str, path: str, lock: Flock) -> None:
    """Record this process as the holder, and release the lock at exit."""
    record_owner(lock.fd)
    _held_locks[real] = (lock.fd, path, lock.flocked)
    atexit.register(_release, real, os.getpid())


def _forget_in_child() -> None:
    """A forked child (a loader worker, a background checkpoint writer) does not hold its parent's
    locks: an flock lasts while any copy of its file descriptor is open, so a child outliving a
    killed run kept its folder locked, and the restart was refused until the child ended."""
    for fd, _, _ in _held_locks.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_locks.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def _release(real: str, pid: int) -> None:
    """At exit: delete the lock file (still holding it) and close it. Not in a forked child."""
    if os.getpid() != pid or real not in _held_locks:
        return
    fd, path, _ = _held_locks.pop(real)
    try:
        if os.path.samestat(os.fstat(fd), os.stat(path)) and read_owner(path) == owner(pid):
            os.remove(path)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        os.close(fd)
