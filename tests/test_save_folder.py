"""Checkpoint folders, nothing lost: a root that an interrupted conversion or export moved aside is put
back by every reader; one run at a time saves into a --save folder (its lock), and a staging
directory is only ever deleted as a dead run's; a new stage never saves over the checkpoints of the
folder it starts from; --ckpt-keep-last never deletes a checkpoint newer than the one just saved."""

import errno
import os
import re
import subprocess
import sys

import pytest

from megatron_eve import locks
from megatron_eve.atomic import ASIDE_MARK, STAGING_MARK, host_name
from megatron_eve.locks import LOCK_NAME, FolderLocked, lock_folder
from megatron_eve.config import ConfigError
from megatron_eve.training import checkpoint_records
from megatron_eve.training.checkpoint_records import TRACKER, checkpoint_dir
from tests.helpers import ROOT


def _root(path, iterations=(2, 4, 6), tracker=6):
    """A checkpoint root as training leaves it (iteration folders with their metadata, the tracker)."""
    for iteration in iterations:
        os.makedirs(checkpoint_dir(str(path), iteration))
        open(os.path.join(checkpoint_dir(str(path), iteration), "metadata.json"), "w").close()
    (path / TRACKER).write_text(str(tracker))
    return path


# ------------------------------------------------------------------- D4: a root moved aside is put back
def test_readers_put_back_a_root_an_interrupted_conversion_moved_aside(tmp_path, monkeypatch):
    """replace_directory killed between its two renames leaves only X.megatron_eve-replaced: training's
    checks (checkpoint_to_load / latest_iteration), --load and --hf of the inference tools put it back."""
    from megatron_eve.inference import backends, generate

    aside = _root(tmp_path / f"ck{ASIDE_MARK}")
    ck = str(tmp_path / "ck")
    assert checkpoint_records.checkpoint_to_load(ck, None) == ck  # --load X
    assert checkpoint_records.latest_iteration(ck) == 6 and os.path.isdir(checkpoint_dir(ck, 6))
    assert not aside.exists()

    os.rename(ck, str(aside))
    monkeypatch.setattr(backends, "Tokenizer", lambda path: None)

    def loaded(root, *args, **kwargs):
        raise RuntimeError(f"loading {root}")  # the folder check passed: what follows is not this test's

    monkeypatch.setattr(generate, "load_model_for_inference", loaded)
    with pytest.raises(RuntimeError, match=re.escape(f"loading {ck}")):
        backends.MegatronBackend(ck, "tokenizer.model", None)
    assert os.path.isdir(checkpoint_dir(ck, 6)) and not aside.exists()

    export = tmp_path / "export"
    (tmp_path / f"export{ASIDE_MARK}").mkdir()
    (tmp_path / f"export{ASIDE_MARK}" / "config.json").write_text("{}")
    backends.check_export_folder(str(export))
    assert (export / "config.json").read_text() == "{}"
    # The converters' inputs: hf_to_megatron's --hf (HFWeights), megatron_to_hf's --megatron with --iteration.
    import importlib.util

    from megatron_eve.checkpoint.hf_eve import CheckpointFormatError, HFWeights

    os.rename(export, str(tmp_path / f"export{ASIDE_MARK}"))
    with pytest.raises(CheckpointFormatError, match="no model.safetensors"):  # (the folder back, its weights read)
        HFWeights(str(export))
    assert (export / "config.json").is_file()
    os.rename(ck, str(aside))
    spec = importlib.util.spec_from_file_location("m2h", ROOT / "checkpoint_conversion" / "megatron_to_hf.py")
    exporter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exporter)
    assert exporter.checkpoint_to_export(ck, 4) == checkpoint_dir(ck, 4) and not aside.exists()
    # A user's own "X.replaced" beside a root is not ours: never taken for it.
    (tmp_path / "mine.replaced").mkdir()
    assert checkpoint_records.latest_iteration(str(tmp_path / "mine")) is None
    assert (tmp_path / "mine.replaced").is_dir() and not (tmp_path / "mine").exists()


# ------------------------------------------------------------------ D5: one run at a time per --save
HOLD = """
import sys, time
from megatron_eve.locks import lock_folder
lock_folder(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def _holder(folder):
    """Another process holding `folder`'s lock (as a run's rank 0 holds its --save)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_cannot_lock_a_folder_until_the_first_ends(tmp_path):
    folder = tmp_path / "save"
    proc = _holder(folder)
    try:
        held = f"another run is saving to {folder} (pid {proc.pid} on host "
        with pytest.raises(FolderLocked, match=re.escape(held)):
            lock_folder(str(folder))
    finally:
        proc.kill()
        proc.wait()
    lock_folder(str(folder))  # killed: the kernel released its lock
    lock_folder(str(folder))  # this process again: already its own
    assert locks.holds_lock(str(folder))
    assert (folder / LOCK_NAME).read_text() == f"pid {os.getpid()} on host {host_name()}"


HOLD_AND_FORK = """
import multiprocessing, sys, time
from megatron_eve.locks import lock_folder
lock_folder(sys.argv[1])
child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,), daemon=False)
child.start()  # as a loader worker or megatron-core's background checkpoint writer
print(child.pid, flush=True)
time.sleep(600)
"""


def test_a_killed_runs_lock_ends_with_it_not_with_the_processes_it_forked(tmp_path):
    """An flock lasts while any copy of its descriptor is open: a forked child outliving its killed
    run kept the --save folder locked, and the restart was refused."""
    path = tmp_path / "save"
    proc = subprocess.Popen([sys.executable, "-c", HOLD_AND_FORK, str(path)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    child = int(proc.stdout.readline())
    try:
        proc.kill()
        proc.wait()
        assert os.path.exists(f"/proc/{child}")  # the child lives on
        lock_folder(str(path))
    finally:
        os.kill(child, 9)


def test_a_lock_file_that_keeps_changing_is_named_so(tmp_path, monkeypatch):
    """Replaced or removed at every try (runs starting and ending): said so, not taken for a holder."""
    real_stat, lock = os.stat, os.path.join(os.path.realpath(tmp_path), "save", LOCK_NAME)

    def stat(path, *args, **kwargs):
        if str(path) == lock:
            raise FileNotFoundError(path)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(locks.os, "stat", stat)
    with pytest.raises(FolderLocked, match=re.escape(f"cannot lock {tmp_path / 'save'}: {lock} keeps changing")):
        lock_folder(str(tmp_path / "save"))


def test_without_flock_the_lock_file_names_its_holder(tmp_path, monkeypatch):
    """A file system without flock (some network mounts): the file is the lock; a dead process's of
    this host is taken over, a live one's (or another host's) refused naming the file to delete."""
    def no_flock(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locks.fcntl, "flock", no_flock)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, owner, taken in (("dead", f"pid {dead.pid} on host {host_name()}", True),
                               ("live", f"pid {os.getppid()} on host {host_name()}", False),
                               ("elsewhere", "pid 1 on host another-host", False)):
        (tmp_path / name).mkdir()
        lock = tmp_path / name / LOCK_NAME
        lock.write_text(owner)
        if taken:
            lock_folder(str(tmp_path / name))
            assert lock.read_text() == f"pid {os.getpid()} on host {host_name()}"
        else:
            with pytest.raises(FolderLocked, match=re.escape(f"({owner}; this file system has no flock: if no run is "
                                                             f"saving there, delete {lock})")):
                lock_folder(str(tmp_path / name))
    lock_folder(str(tmp_path / "new"))
    assert (tmp_path / "new" / LOCK_NAME).read_text() == f"pid {os.getpid()} on host {host_name()}"


def test_only_a_dead_runs_staging_is_removed(tmp_path):
    """A save's staging directory is named by its run's rank 0 (host, pid): another run's live one
    is left alone; a dead one's removed; holding the --save lock, every one but this process's."""
    from megatron_eve.training.checkpoint_writes import remove_stale_staging

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = host_name()
    names = {"live": f"iter_0000002.{host}-{live.pid}-0123abcd{STAGING_MARK}",
             "dead": f"iter_0000004.{host}-{dead.pid}-0123abcd{STAGING_MARK}",
             "elsewhere": f"iter_0000004.another-host-{live.pid}-0123abcd{STAGING_MARK}",
             "ours": f"iter_0000006.{host}-{os.getpid()}-0123abcd{STAGING_MARK}",
             "legacy": "iter_0000008.tmp", "user": "notes.megatron_eve-staging"}
    try:
        for name in names.values():
            (tmp_path / name).mkdir()
        remove_stale_staging(str(tmp_path))
        assert sorted(os.listdir(tmp_path)) == sorted(names[k] for k in ("live", "elsewhere", "ours", "user"))
        lock_folder(str(tmp_path))  # no other run can be writing here now
        remove_stale_staging(str(tmp_path))
        assert sorted(os.listdir(tmp_path)) == sorted([names["ours"], names["user"], LOCK_NAME])
    finally:
        live.kill()
        live.wait()


def test_a_second_run_on_the_same_save_is_refused_before_work(data, tmp_path):
    from megatron_eve.training.loop import check_job
    from tests.test_training_preflight import job_args

    save = tmp_path / "save"
    proc = _holder(save)
    try:
        with pytest.raises(ConfigError, match=re.escape(f"another run is saving to {save} (pid {proc.pid} on host ")
                           + r".*: wait for it to end, or choose another --save"):
            check_job(job_args(data, "--save", save), 1)
    finally:
        proc.kill()
        proc.wait()
    check_job(job_args(data, "--save", save), 1)
    assert locks.holds_lock(str(save))


# ------------------------------------- D6: a new stage never saves over the folder it starts from
def test_a_new_stage_from_the_save_folder_is_refused(data, tmp_path, monkeypatch, caplog):
    """--pretrained-checkpoint X --save X (or --load X --save X --finetune) counts from iteration 0
    and would replace X's checkpoints one by one: refused as any --save holding another run's. A
    resume from an earlier iteration than X's newest is warned about once."""
    from dataclasses import asdict

    from megatron.core import dist_checkpointing

    from megatron_eve.training.loop import check_job
    from tests.test_training_preflight import job_args

    ck = _root(tmp_path / "ck")
    common = {"model_config": asdict(job_args(data).model)}
    monkeypatch.setattr(dist_checkpointing, "load_common_state_dict", lambda directory: common)
    monkeypatch.setenv("RANK", "0")
    refusal = f"--save {ck} holds another run's checkpoints (up to iteration 6), which this run would overwrite: "
    with pytest.raises(ConfigError, match=re.escape(refusal + f"pass --load {ck}")):
        check_job(job_args(data, "--pretrained-checkpoint", ck, "--save", ck), 1)
    with pytest.raises(ConfigError, match=re.escape(refusal + "--finetune starts again at iteration 0")):
        check_job(job_args(data, "--load", ck, "--save", ck, "--finetune"), 1)
    caplog.clear()
    check_job(job_args(data, "--load", ck, "--save", ck), 1)  # a resume
    assert not [r for r in caplog.records if "newer than" in r.getMessage()]
    (ck / TRACKER).write_text("2")
    check_job(job_args(data, "--load", ck, "--save", ck), 1)
    warnings = [r.getMessage() for r in caplog.records if "newer than" in r.getMessage()]
    assert warnings == [f"warning: --save {ck} holds iterations 4, 6, newer than iteration 2 this run resumes from: "
                        "each stays until this run saves that iteration, which replaces it (--ckpt-keep-last never "
                        "deletes them); the tracker names this run's newest"]
    assert sorted(os.listdir(ck)) == sorted(["iter_0000002", "iter_0000004", "iter_0000006", TRACKER,
                                             LOCK_NAME])


# -------------------------------------------- B-D3: --ckpt-keep-last never deletes a newer checkpoint
def test_keep_last_prunes_only_up_to_the_checkpoint_just_saved(tmp_path):
    """Saved 2, 4, 6; resumed from 2 (tracker set back), saving every iteration with --ckpt-keep-last 2:
    this run's own newest two stay, and 6 (newer than anything this run saved) is not deleted."""
    from megatron_eve.training.checkpoint_writes import _prune

    root = _root(tmp_path, tracker=2)
    for iteration in (3, 4):
        os.makedirs(checkpoint_dir(str(root), iteration), exist_ok=True)  # (4: replaced by this run's)
        _prune(str(root), 2, keep=iteration)
    assert sorted(n for n in os.listdir(root) if n.startswith("iter_")) == [
        "iter_0000003", "iter_0000004", "iter_0000006"]
    _prune(str(root), 1, keep=6)  # this run reached 6: the older ones go as usual
    assert sorted(n for n in os.listdir(root) if n.startswith("iter_")) == ["iter_0000006"]


def test_the_lock_file_is_gone_when_its_run_ends(tmp_path):
    out = subprocess.run([sys.executable, "-c", "import sys; from megatron_eve.locks import lock_folder; "
                          "lock_folder(sys.argv[1])", str(tmp_path / "save")], cwd=ROOT, timeout=60)
    assert out.returncode == 0 and os.listdir(tmp_path / "save") == []
