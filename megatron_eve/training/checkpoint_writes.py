"""How a checkpoint's files reach the disk once save() has built its state: written in place, or by
megatron-core's background process (--async-save) while training goes on, then published (checksums,
renamed into place, marked the latest, older ones pruned) when every rank has written its part. A
save that fails deletes its partial files and is one OSError naming its folder."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
from typing import List, Optional

import torch.distributed as dist

from megatron_eve.atomic import named_write_errors, remove_stagings, replace_directory, write_text
from megatron_eve.locks import holds_lock
from megatron_eve.training.checkpoint_records import TRACKER, checkpoint_dir
from megatron_eve.training.checksums import record_checksums, record_own_shards

_async_queue = None  # megatron-core's AsyncCallsQueue, made at the first --async-save
# save() asks for megatron-core's own async machinery on purpose (NVRx's, which its notice
# recommends, is not a dependency); the notice printed in every run, async or not, said nothing to users.
logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").addFilter(
    lambda record: not record.getMessage().startswith("MCore's async save is deprecated"))
_results_manager = None  # the process holding megatron-core's write-results queue (start_results_queue)


def start_results_queue() -> None:
    """megatron-core collects every save's write results (sync saves too) in a queue held by a
    Manager process it starts at the first save, with SIGTERM's default action. torchrun (os.killpg)
    and Slurm signal every process of the job, so that process died first and the save
    --exit-signal-handler makes on SIGTERM failed (BrokenPipeError): the same queue, from a process
    that ignores SIGTERM (it still ends with this one: the manager's finalizer, or SIGKILL)."""
    global _results_manager
    import multiprocessing
    import signal
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    _results_manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    _results_manager.start(initializer=signal.signal, initargs=(signal.SIGTERM, signal.SIG_IGN))
    filesystem_async._results_queue = _results_manager.Queue()


def finalize_async_saves(blocking: bool) -> None:
    """Publish the background saves every rank has finished writing (checksums, rename, marker);
    with `blocking`, wait for all of them first. A collective: every rank calls it at the same
    point (each iteration without blocking; before the next save and at exit blocking)."""
    if _async_queue is not None and _async_queue.get_num_unfinalized_calls():
        with _failed_save_cleared(_async_root):
            _async_queue.maybe_finalize_async_calls(blocking=blocking)
        _async_stagings[:] = [staging for staging in _async_stagings if os.path.isdir(staging)]


_async_root: Optional[str] = None  # the --save of the background saves in flight
_async_stagings: List[str] = []  # their staging directories (a published one is renamed away)


@contextlib.contextmanager
def _failed_save_cleared(root: str, staging: Optional[str] = None):
    """A save that fails (a full disk: megatron-core raises a CheckpointException, torch a RuntimeError)
    becomes one OSError naming its folder, and its partial files are deleted at once (`staging`, else
    every unfinished one under `root`): the last complete checkpoint stays the latest, and the disk is
    not left full of a checkpoint that will never be published."""
    try:
        with named_write_errors(staging or root):
            yield
    except BaseException:
        for path in [staging] if staging is not None else _async_stagings:
            shutil.rmtree(path, ignore_errors=True)
        if staging is None:
            _async_stagings.clear()
            if root is not None:
                remove_stale_staging(root)
        raise



def write(request, root: str, staging: str, final: str, iteration: int, keep_last: Optional[int],
          in_background: bool) -> None:
    """Write megatron-core's save `request` into `staging` and publish it as `final`: here, or (in_background)
    by a forked process, published by a later finalize_async_saves."""
    if request.async_fn is not None:
        request = request._replace(async_fn=functools.partial(_write_then_hash, request.async_fn, staging,
                                                              dist.get_rank()))
    request.add_finalize_fn(functools.partial(_publish, root, staging, final, iteration, keep_last))
    if in_background:
        global _async_queue, _async_root
        if _async_queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            _async_queue = AsyncCallsQueue()
        _async_root = root
        _async_stagings.append(staging)
        _async_queue.schedule_async_request(request)
    else:
        with _failed_save_cleared(root, staging):
            request.execute_sync()


def remove_stale_staging(root: str) -> None:
    """Staging directories of saves that never completed (killed): incomplete by construction. Each
    is named by the process (rank 0) of the run that made it (checkpoint.save): a live run's, which
    may still be writing, is left alone. While this process holds the --save folder's lock (taken
    before work, preflight) no other run writes there, so every staging but this process's own is a
    dead run's, whichever host it ran on; otherwise only those of dead processes of this host. (No
    save of this process is in flight now: save() waited for the previous one.) Also the fixed
    "iter_N.tmp" name earlier versions used."""
    if not os.path.isdir(root):
        return
    remove_stagings(root, r"iter_\d+", all_but_ours=holds_lock(root))
    for name in os.listdir(root):
        if re.fullmatch(r"iter_\d+\.tmp", name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _write_then_hash(write, staging: str, rank: int, *args, **kwargs) -> None:
    """Runs where the shards are written (the background process with --async-save): write this
    rank's files, then checksum them while they are still in the page cache. A record that cannot be
    written (a full disk: the write itself has failed then, and the finalize says so in one line) is
    left out, not a traceback of this process: the finalize hashes shards without one itself."""
    write(*args, **kwargs)
    with contextlib.suppress(OSError):
        record_own_shards(staging, rank)


def _publish(root: str, staging: str, final: str, iteration: int, keep_last: Optional[int]) -> None:
    """Every rank has written its part: record the checksums, rename the checkpoint into place and
    only then mark it the latest."""
    record_checksums(staging)  # its gather is the barrier before rank 0 renames
    if dist.get_rank() == 0:
        replace_directory(staging, final)
        write_text(os.path.join(root, TRACKER), str(iteration))  # only now is this checkpoint the latest
        _prune(root, keep_last, keep=iteration)
    dist.barrier()


def _prune(root: str, keep_last: Optional[int], keep: int) -> None:
    """--ckpt-keep-last: of the checkpoints up to `keep` (the one just published) the newest keep_last
    stay. A newer one than `keep` (a resume from an earlier iteration: another run's, or this run's
    before it went back) is never deleted here: it is the only copy of its state; this run replaces
    it when it saves that iteration (preflight warns at start)."""
    if not keep_last:
        return
    iterations = sorted(int(name[5:]) for name in os.listdir(root)
                        if name.startswith("iter_") and name[5:].isdigit() and int(name[5:]) <= keep)
    for iteration in iterations[:-keep_last]:
        if iteration != keep:
            shutil.rmtree(checkpoint_dir(root, iteration), ignore_errors=True)
