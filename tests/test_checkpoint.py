"""Checkpoints: across layer specs, replacement without a window of loss, no restart over unmarked ones."""

import json
import subprocess
import sys

from tests.helpers import ROOT, child_environment


def test_checkpoints_across_specs_and_safe_replacement(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "parallel" / "checkpoint_worker.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=child_environment(), cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["plain_to_te"] == {"iteration": 1, "weights_equal": True, "extra_state_loaded": None}
    assert r["te_to_plain"] == {"iteration": 2, "weights_equal": True}
    assert r["te_to_te"] == {"extra_state_loaded": {"fp8_meta": 1}}
    assert "iter_0000002 cannot be loaded" in r["damaged"] and "truncated, damaged or missing" in r["damaged"]
    assert "\n" not in r["damaged"]
    assert r["resaved_entries"] == ["iter_0000001", "latest_checkpointed_iteration.txt"]
    assert r["recovered_iteration"] == 1 and r["recovered_entries"] == r["resaved_entries"]
    assert "holds" in r["unmarked"] and "iter_0000001 but no latest_checkpointed_iteration.txt" in r["unmarked"]


class _Payload:
    """What a crafted checkpoint would carry: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_crafted_metadata_does_not_run(tmp_path):
    import pickle

    from megatron_eve.checkpoint.hf_eve import MegatronCheckpoint

    directory = tmp_path / "iter_0000001"
    directory.mkdir()
    marker = tmp_path / "code-ran"
    (directory / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    (directory / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1}')
    try:
        MegatronCheckpoint(str(directory))
        raised = None
    except pickle.UnpicklingError as error:
        raised = str(error)
    assert not marker.exists()
    assert raised and "refers to posix.system" in raised and "refusing to load it" in raised


# ------------------------------------------------------------ optimizer formats and --async-save
def _worker(mode, root, nproc=2):
    from tests.helpers import torchrun

    out = torchrun("async_checkpoint_worker.py", nproc, [mode, root], timeout=400)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_optimizer_formats_async_save_and_resharding(tmp_path):
    """Distributed optimizer, 2 processes (gloo): the default format is written by each data-parallel
    rank as it holds it and resumes bitwise at the same layout, and at another data-parallel size;
    at another TP it is refused in one line (weights-only still loads); the fully reshardable format
    loads at TP2 with every global tensor bitwise equal; --async-save resumes like a sync save."""
    r = _worker("formats", tmp_path)
    assert r["default_format"] == "dp_reshardable" and r["reshardable_format"] == "fully_reshardable"
    same = {"iteration": 3, "consumed": 12, "weights": True, "optimizer": True, "scheduler": True}
    assert r["resume_sync"] == r["resume_async"] == r["resume_full"] == same
    assert r["async_returned_unpublished"]  # save() returned before the checkpoint was marked
    assert r["async_published"] == ["iter_0000003", "latest_checkpointed_iteration.txt"]
    assert r["async_verified"] is True and r["checksums_cover_all"]
    message = r["tp2_default"]
    assert "\n" not in message and "sync/iter_0000003 holds the distributed optimizer's state sharded by " \
        "data-parallel rank" in message and "at TP=2 PP=1 (saved at TP=1 PP=1)" in message
    assert "--no-load-optim" in message and "--dist-ckpt-optim-fully-reshardable" in message
    assert r["tp2_default_no_load_optim"] == 3 and r["tp2_default_weights_equal"]
    assert r["tp2_full"] == 3 and r["tp2_full_tensors_equal"] and r["tp2_full_optimizer_tensors"] > 0
    # The same default-format checkpoint at one process (TP1/DP1): every global tensor as saved.
    assert _worker("dp1", tmp_path, nproc=1) == {"iteration": 3, "tensors_equal": True}


def test_kill_9_during_async_save_keeps_the_previous_checkpoint(tmp_path):
    """Iteration 1 is published; the background save of iteration 2 is in flight (rank 0's shard
    written, rank 1's not) while training goes on; kill -9 every process: the marker still names
    iteration 1, which loads with the saved state; the torn directory is never marked and the next
    save replaces it."""
    import subprocess
    import time

    import psutil

    from tests.helpers import child_environment, free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(ROOT / "tests" / "parallel" / "async_checkpoint_worker.py"),
           "hang", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=child_environment(), cwd=ROOT)
    steps = tmp_path / "steps0"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (
            (tmp_path / "writing0").exists() and (tmp_path / "writing1").exists()
            and steps.exists() and steps.read_text().strip().isdigit() and int(steps.read_text()) >= 3):
        time.sleep(0.2)
    alive = proc.poll() is None
    for child in psutil.Process(proc.pid).children(recursive=True):  # ranks and their writers
        child.kill()
    proc.kill()
    out, _ = proc.communicate()
    assert alive, out[-4000:]
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert "iter_0000002" not in entries and "iter_0000002.tmp" in entries
    assert any(p.name.startswith("__0_") for p in (tmp_path / "iter_0000002.tmp").iterdir())  # torn

    r = _worker("after", tmp_path)
    assert r["marked"] == 1 and r["resumed"] == 1 and r["weights"] and r["optimizer"]
    assert r["resaved"] == 2 and r["entries_after"] == ["iter_0000001", "iter_0000002"]
