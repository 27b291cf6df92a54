"""Writes that never leave a torn file, and never lose the only good copy.

Every output is written under a temporary name beside its final one and renamed into place once
complete. A directory being replaced is first moved aside (renamed, not deleted) and removed only
after its replacement is in place, so at every instant one complete copy exists; a reader that
finds only the moved-aside copy puts it back (`recover_replaced`). Output folders we did not write
are never overwritten without the user saying so, and an output never replaces or lies inside one of
its command's inputs (`check_apart_from_inputs`). A staging directory is named by the process writing
it, so that only a dead writer's is taken for a leftover (`remove_stagings`); a folder that one run at
a time writes in is locked (megatron_eve.locks).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
import stat
from typing import IO, Callable, Dict, Iterable, Iterator, Optional, Sequence, Tuple, Union

from megatron_eve.config import ConfigError

# Names of our own making beside an output: a directory being written (unique per run) and one
# moved aside while its replacement is renamed in. They carry a mark no user folder has, so what
# we create or delete there is never a folder of someone else's (such as "out.tmp").
STAGING_MARK = ".megatron_eve-staging"
ASIDE_MARK = ".megatron_eve-replaced"
LEGACY_ASIDE_SUFFIX = ".replaced"  # what earlier versions moved a checkpoint aside to


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


def _umask() -> int:
    """This process's umask, read without changing it where Linux reports it (os.umask can only
    be read by setting it, which races with threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_mode(path: str) -> None:
    """Give `path` the mode a plain open() / mkdir would (0666 / 0777 less the umask). Writers that
    create their output private (safetensors' save_file, mkstemp: 0600; mkdtemp: 0700) would
    otherwise leave files that other users of a shared filesystem cannot read."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~_umask())


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


# How libraries that write files say a write failed without raising OSError: safetensors' SafetensorError
# ("I/O error: No space left on device"), torch.save's zip writer ("unexpected pos N vs M": a short
# write), torch.distributed.checkpoint's CheckpointException (which carries the rank's OSError),
# megatron-core's background save ("Worker failure": its write process failed, the cause not kept).
_WRITE_FAILURE_SIGNS = ("No space left", "Disk quota", "I/O error", "Input/output error", "unexpected pos",
                        "Read-only file system", "Errno", "Worker failure")


def _nearly_full(path: str) -> bool:
    """Whether the file system holding `path` has under 1 MiB free (a short write's likely cause)."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


@contextlib.contextmanager
def named_write_errors(path: str) -> Iterator[None]:
    """A failed write inside the block, whatever the library raised, becomes one OSError naming `path`
    (ENOSPC when the disk is full), so the tools print it in one line; other errors pass unchanged."""
    try:
        yield
    except OSError as error:
        if error.filename is None:
            raise OSError(error.errno, error.strerror or str(error), path) from error
        raise
    except BaseException as error:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        text = str(error)
        if not (isinstance(error, Exception) or type(error).__name__ == "CheckpointException") \
                or not any(sign in text for sign in _WRITE_FAILURE_SIGNS):
            raise  # KeyboardInterrupt and the like; errors that are not a failed write
        if "No space left" in text or _nearly_full(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from error
        last = text.strip().splitlines()[-1] if text.strip() else type(error).__name__  # a rank's error: its last
        raise OSError(errno.EIO, f"write failed ({last})", path) from error


def nearest_existing(path: str) -> str:
    """`path` (absolute) if it exists, else its nearest ancestor that does: where its folders would be made."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    return existing


def os_error_line(error: OSError, output: Optional[str]) -> str:
    """One line for a failed read or write: the file it names, else `output` (an unnamed errno, such as a
    full disk at a flush, is the output's), then why; an error without an errno carries its own message."""
    if error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    if error.strerror and output:
        return f"{output}: {error.strerror}"
    return str(error)


def host_name() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _staging_pattern(base: str, regex: bool = False) -> "re.Pattern":
    """A staging directory's name: whose it is (host and process) and a unique tail. `base`: the final
    name (or, with `regex`, a pattern of final names, matched as the group "base")."""
    return re.compile(f"(?P<base>{base if regex else re.escape(base)})"
                      r"\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)-[0-9a-f]{8}" + re.escape(STAGING_MARK))


def staging_name(base: str) -> str:
    """A new staging name for the final name `base`: this process's (host and pid) with a unique tail."""
    return f"{base}.{host_name()}-{os.getpid()}-{secrets.token_hex(4)}{STAGING_MARK}"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


def remove_dead_stagings(final: str) -> None:
    """Delete the staging directories of `final` left by writes of ours killed on this host (their
    process is gone): an interrupted export would otherwise leave a whole copy behind at every try.
    Those of a live process, or of another host (it may still be writing), are left alone."""
    parent, base = os.path.split(os.path.realpath(final))
    remove_stagings(parent, re.escape(base))


def remove_stagings(folder: str, bases: str, all_but_ours: bool = False) -> None:
    """Delete the staging directories in `folder` of the final names matching the pattern `bases`
    left by killed writes of ours: those of a dead process of this host; with `all_but_ours`, every
    one not this process's (for a folder whose lock this process holds: no other writer is alive)."""
    if not os.path.isdir(folder):
        return
    pattern, host, pid = _staging_pattern(bases, regex=True), host_name(), os.getpid()
    for name in os.listdir(folder):
        match = pattern.fullmatch(name)
        if not match:
            continue
        ours = match["host"] == host and int(match["pid"]) == pid
        dead = match["host"] == host and not process_alive(int(match["pid"]))
        if dead or (all_but_ours and not ours):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def new_staging_directory(final: str) -> str:
    """A new empty directory beside the real location of `final` (a linked output is written beside
    the folder the link points to), named as ours (host and process: remove_dead_stagings) and unique:
    nothing already there is reused."""
    parent, base = os.path.split(os.path.realpath(final))
    os.makedirs(parent, exist_ok=True)
    remove_dead_stagings(final)
    while True:
        staging = os.path.join(parent, staging_name(base))
        try:
            os.mkdir(staging)
            return staging
        except FileExistsError:
            continue


@contextlib.contextmanager
def staged_directory(final: str) -> Iterator[str]:
    """A fresh staging directory (new_staging_directory) to write a replacement of `final` in,
    swapped in by replace_directory when the block completes, removed if the block fails."""
    staging = new_staging_directory(final)
    try:
        yield staging
        replace_directory(staging, final)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)


def _aside_copies(final: str, legacy: bool) -> list:
    """The moved-aside copies of `final` (a real path) on disk, the most recently moved first."""
    parent, base = os.path.split(final)
    if not os.path.isdir(parent):
        return []
    suffix = re.escape(ASIDE_MARK) + r"(\.\d+)?" + (f"|{re.escape(LEGACY_ASIDE_SUFFIX)}" if legacy else "")
    pattern = re.compile(re.escape(base) + f"(?:{suffix})")
    paths = [os.path.join(parent, name) for name in os.listdir(parent) if pattern.fullmatch(name)]
    moved = []
    for path in paths:
        try:
            status = os.lstat(path)
        except FileNotFoundError:  # put back meanwhile by another reader
            continue
        if stat.S_ISDIR(status.st_mode):
            moved.append((status.st_ctime, path))
    return [path for _, path in sorted(moved, reverse=True)]  # a rename sets ctime


def replace_directory(staging: str, final: str) -> None:
    """Rename the complete directory `staging` to `final`; an existing `final` is moved aside first
    and deleted only once the new one is in place. A linked `final` keeps its link: the folder it
    points to is replaced. Earlier aside copies (an interrupted replacement's, by our mark only)
    are older versions of `final`: deleted with the one moved aside now, once the new one is in place."""
    final = os.path.realpath(final)
    aside = final + ASIDE_MARK
    number = 1
    while os.path.lexists(aside):
        number += 1
        aside = f"{final}{ASIDE_MARK}.{number}"
    moved = os.path.isdir(final)
    if moved:
        os.replace(final, aside)
    try:
        os.replace(staging, final)
    except BaseException:
        if moved:
            os.replace(aside, final)  # the old copy back: nothing changed
        raise
    for copy in _aside_copies(final, legacy=False):
        shutil.rmtree(copy, ignore_errors=True)


def recover_replaced(final: str, legacy: bool = True) -> None:
    """A replacement killed between its two renames leaves only the moved-aside copy: put it back.
    legacy: also the name earlier versions used (final + ".replaced"), for checkpoints they wrote;
    off for an output folder, whose ".replaced" sibling may be a user's own."""
    final = os.path.realpath(final)  # replace_directory moved the folder a link points to
    if os.path.lexists(final):
        return
    copies = _aside_copies(final, legacy)
    if copies:
        try:
            os.replace(copies[0], final)
        except OSError:
            if not os.path.lexists(final):
                raise
            # Another reader (another rank of the same job) put it back first.


def check_output_dir(path: str, ours: Callable[[str], bool], overwrite: bool, what: str,
                     flag: str = "--overwrite") -> None:
    """Refuse a non-empty output folder that is not our own earlier output of this kind (`ours`),
    unless the user passed `flag`."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ConfigError(f"{path} exists and is not a folder: choose another output folder")
    if overwrite or not os.path.isdir(path) or not os.listdir(path) or ours(path):
        return
    raise ConfigError(f"{path} exists and holds files that are not {what}: choose another output folder, "
                      f"or pass {flag} to replace it")


def is_leftover(name: str) -> bool:
    """A temporary or moved-aside name that an interrupted write of ours leaves behind."""
    return (name.endswith((".tmp", LEGACY_ASIDE_SUFFIX, STAGING_MARK)) or re.search(r"\.tmp\d+$", name) is not None
            or re.search(re.escape(ASIDE_MARK) + r"(\.\d+)?$", name) is not None)


def entries(path: str) -> Optional[set]:
    """The names in a folder (None if it does not exist), leaving out our interrupted writes."""
    if not os.path.isdir(path):
        return None
    return {name for name in os.listdir(path) if not is_leftover(name)}


# ------------------------------------------------------------------ outputs apart from inputs
# the flag naming each input → its path (None: not given); pairs where one flag names several
Inputs = Union[Dict[str, Optional[str]], Sequence[Tuple[str, Optional[str]]]]


class OutputRefused(ConfigError):
    """An output path the user has to change (or pass --overwrite for); the command exits 2."""


def _is_or_holds(output: str, path: str) -> bool:
    """Whether `path` is `output` or lies inside it (resolved: links, hard links and ../ see through)."""
    if os.path.exists(output) and os.path.exists(path) and os.path.samefile(output, path):
        return True
    output, path = os.path.realpath(output), os.path.realpath(path)
    return output == path or os.path.commonpath([output, path]) == output


def check_not_an_input(output: str, inputs: Inputs, flag: str) -> None:
    """Refuse an output that is, or holds, one of the inputs: even --overwrite does not allow that."""
    for name, path in (inputs.items() if isinstance(inputs, dict) else inputs):
        if path and _is_or_holds(output, path):
            raise OutputRefused(f"{flag} {output} would replace the {name} input {path}: choose another {flag}")


def _lies_inside(output: str, folder: str) -> bool:
    """Whether `output` lies inside `folder` (resolved as _is_or_holds does: links, ../ and a folder
    reached by another path, e.g. a bind mount, see through)."""
    if not os.path.isdir(folder):
        return False
    probe = os.path.realpath(output)
    while os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
        if os.path.exists(probe) and os.path.samefile(probe, folder):
            return True
    folder = os.path.realpath(folder)
    return os.path.commonpath([folder, os.path.realpath(output)]) == folder


def check_apart_from_inputs(output: str, inputs: Inputs, flag: str) -> None:
    """Refuse an output folder that is, holds or lies inside one of the input folders (a converter's
    --out and its checkpoint or HF folder): replacing it would delete the input, and writing into it
    would mix the output with it. Even --overwrite does not allow that."""
    check_not_an_input(output, inputs, flag)
    for name, path in (inputs.items() if isinstance(inputs, dict) else inputs):
        if path and _lies_inside(output, path):
            raise OutputRefused(f"{flag} {output} lies inside the {name} input {path}: choose another {flag} "
                                f"(even --overwrite does not write into an input)")
