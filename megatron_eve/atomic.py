"""Writes that never leave a torn file, and never lose the only good copy.

Every output is written under a temporary name beside its final one and renamed into place once
complete. A directory being replaced is first moved aside (renamed, not deleted) and removed only
after its replacement is in place, so at every instant one complete copy exists; a reader that
finds only the moved-aside copy puts it back (`recover_replaced`). Output folders we did not write
are never overwritten without the user saying so.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from typing import IO, Callable, Iterable, Iterator, Optional

from megatron_eve.config import ConfigError

ASIDE_SUFFIX = ".replaced"


@contextlib.contextmanager
def replacing(path: str, mode: str = "w") -> Iterator[IO]:
    """A handle on a temporary file beside `path`, fsynced and renamed over `path` when the block
    completes: an interrupted write leaves the previous file whole."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with open(temporary, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_text(path: str, text: str) -> None:
    """Replace the file at `path` with `text`, atomically (temporary file, fsync, rename)."""
    write_lines(path, [text], newline="")


def write_bytes(path: str, data: bytes) -> None:
    with replacing(path, "wb") as handle:
        handle.write(data)


def write_lines(path: str, lines: Iterable[str], newline: str = "\n") -> None:
    """Each line (plus `newline`), replacing the file at `path` atomically."""
    with replacing(path) as handle:
        for line in lines:
            handle.write(line + newline)


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    write_lines(path, (json.dumps(row) for row in rows))


def replace_directory(staging: str, final: str) -> None:
    """Rename the complete directory `staging` to `final`; an existing `final` is moved aside first
    and deleted only once the new one is in place."""
    aside = final.rstrip("/") + ASIDE_SUFFIX
    if os.path.isdir(final):
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(staging, final)
    shutil.rmtree(aside, ignore_errors=True)


def recover_replaced(final: str) -> None:
    """A replacement killed between its two renames leaves only the moved-aside copy: put it back."""
    aside = final.rstrip("/") + ASIDE_SUFFIX
    if not os.path.isdir(final) and os.path.isdir(aside):
        os.replace(aside, final)


def check_output_dir(path: str, ours: Callable[[str], bool], overwrite: bool, what: str,
                     flag: str = "--overwrite") -> None:
    """Refuse a non-empty output folder that is not our own earlier output of this kind (`ours`),
    unless the user passed `flag`."""
    if overwrite or not os.path.isdir(path) or not os.listdir(path) or ours(path):
        return
    raise ConfigError(f"{path} exists and holds files that are not {what}: choose another output folder, "
                      f"or pass {flag} to replace it")


def is_leftover(name: str) -> bool:
    """A temporary or moved-aside name that an interrupted write of ours leaves behind."""
    return name.endswith((".tmp", ASIDE_SUFFIX)) or re.search(r"\.tmp\d+$", name) is not None


def entries(path: str) -> Optional[set]:
    """The names in a folder (None if it does not exist), leaving out our interrupted writes."""
    if not os.path.isdir(path):
        return None
    return {name for name in os.listdir(path) if not is_leftover(name)}
