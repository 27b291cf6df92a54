"""Replacing a dataset's files (PREFIX.bin / .idx / .meta.json and companions such as the rejects list)
so that no mix of old and new files ever reads as complete. Only the run holding the prefix's lock
(`prefix_lock`, an flock on PREFIX.lock) writes there. It stages every new file at PREFIX{suffix}.tmp;
the staged sidecar, written last and recording the files' sizes, is the commit. Then the old sidecar
is removed and the staged files renamed in, the sidecar last; a swap killed between its renames is
finished by the next reader or writer (`finish_swap`) from the staged files."""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Dict, Iterator, Sequence

from megatron_eve.locks import described_holder, record_owner, try_flock

SIDECAR_SUFFIX = ".meta.json"
LOCK_SUFFIX = ".lock"
_HELD: Dict[str, list] = {}  # real path of a prefix -> [lock fd, depth]: the prefixes this process holds


class BusyError(RuntimeError):
    """Another live run is writing the prefix (it holds PREFIX.lock)."""


@contextlib.contextmanager
def prefix_lock(prefix: str) -> Iterator[None]:
    """Exclusive right to write PREFIX's files (re-entrant within a process); BusyError, in one line,
    while another live run holds it. The kernel releases it when its holder dies, however it dies."""
    key = os.path.realpath(prefix)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    path = prefix + LOCK_SUFFIX
    lock = try_flock(path)  # (a file system without flock: unlocked, as before locks were taken)
    if lock.fd is None:
        raise BusyError(f"another run is writing {prefix} ({path}: {described_holder(path)}): wait for it to "
                        "end, or choose another --output-prefix")
    record_owner(lock.fd)
    _HELD[key] = [lock.fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.remove(path)  # while still locked: a run waiting on this file retries on a new one
        os.close(lock.fd)


def staged_name(prefix: str, suffix: str) -> str:
    return f"{prefix}{suffix}.tmp"


def fsync_file(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def swap_in(prefix: str, suffixes: Sequence[str]) -> None:
    """Rename the staged files still at their .tmp names into place, the sidecar last (it marks
    completeness). Only under the prefix's lock, once the staged sidecar is complete."""
    for suffix in (*suffixes, SIDECAR_SUFFIX):
        if suffix == SIDECAR_SUFFIX or os.path.isfile(staged_name(prefix, suffix)):
            os.replace(staged_name(prefix, suffix), prefix + suffix)


def roll_forward(prefix: str) -> bool:
    """Under the prefix's lock: finish a replacement killed between its renames. Only when the final
    sidecar is gone (removed after the commit) and the staged one is complete, and every file it
    records is, at its staged or its final name, of the size recorded: then the renames left are done."""
    sidecar = staged_name(prefix, SIDECAR_SUFFIX)
    if os.path.isfile(prefix + SIDECAR_SUFFIX) or not os.path.isfile(sidecar):
        return False
    try:
        with open(sidecar, encoding="utf-8") as handle:
            meta = json.load(handle)
        files = {**meta["files"], **meta.get("companions", {})}
    except (OSError, ValueError, TypeError, KeyError):
        return False
    for suffix, size in files.items():
        path = staged_name(prefix, suffix) if os.path.isfile(staged_name(prefix, suffix)) else prefix + suffix
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return False
    swap_in(prefix, list(files))
    return True


def finish_swap(prefix: str, wait: float = 10.0) -> bool:
    """A reader's part: complete the swap of a replacement that was killed between its renames, once
    no live run holds the prefix (a live one finishes its own swap: up to `wait` s for its sidecar)."""
    key = os.path.realpath(prefix)
    if key in _HELD:  # this process is the writer
        return roll_forward(prefix)
    deadline = time.monotonic() + wait
    while True:
        try:
            with prefix_lock(prefix):
                return roll_forward(prefix)
        except BusyError:
            if os.path.isfile(prefix + SIDECAR_SUFFIX) or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        except OSError:  # a folder this reader may not write: the dataset reads as incomplete
            return False
