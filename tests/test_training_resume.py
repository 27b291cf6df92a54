"""pretrain_eve.py stopped and resumed, on 2 CPU processes: exact resume after kill -9 (losses and
validations), resume at another tensor-parallel size and global batch, SIGTERM saving on exit, and a
failing run exiting instead of waiting on its loader workers."""

import os
import re
import signal
import subprocess
import sys
import time

import psutil

from tests.helpers import ROOT, base_args, child_environment, final_evaluations, launch, train, validations


def test_kill_and_resume_gives_the_same_losses(data, tmp_path):
    """Training and validation losses: a resumed run evaluates on the batches the uninterrupted run
    reads next, not the split's first ones again."""
    # Rows of 160 hold a caption or two: each evaluation's 4 rows are others than the last one's.
    args = base_args(data, "pretrain") + ["--train-iters", 6, "--save-interval", 2, "--split", "50,50,0",
                                          "--seq-length", 160, "--eval-interval", 2, "--eval-iters", 1]
    full, full_out = train(args + ["--save", tmp_path / "full"])
    proc = launch(args + ["--save", tmp_path / "killed"])
    marker = tmp_path / "killed" / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 240
    while time.time() < deadline and not (marker.exists() and marker.read_text().strip() == "4"):
        time.sleep(0.2)
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    proc.kill()
    proc.communicate()
    assert marker.read_text().strip() == "4"
    resumed, resumed_out = train(args + ["--save", tmp_path / "killed", "--load", tmp_path / "killed"])
    assert sorted(resumed) == [5, 6]
    for iteration in (5, 6):
        assert resumed[iteration] == full[iteration]  # identical to the printed digit
    assert list(validations(full_out)) == ["2", "4", "6"]
    # megatron-core's notices that say nothing here (the CPU shim's one RNG; our choice of async saver).
    assert "CPU RNG state changed" not in full_out and "async save is deprecated" not in full_out
    assert validations(resumed_out) == {"6": validations(full_out)["6"]}
    # The evaluation after training goes on from there too (the checkpoint was saved before it).
    assert [(i, split) for i, split, _ in final_evaluations(full_out)] == [("6", "validation")]  # --split: no test
    assert final_evaluations(resumed_out) == final_evaluations(full_out)

    # The checkpoint records the run's --tokenizer-model: an export without the flag carries it.
    export = subprocess.run([sys.executable, str(ROOT / "checkpoint_conversion" / "megatron_to_hf.py"), "--megatron",
                             str(tmp_path / "killed"), "--out", str(tmp_path / "exp"), "--no-progress"],
                            capture_output=True, text=True, timeout=240, env=child_environment())
    assert export.returncode == 0, export.stderr[-3000:]
    assert f"tokenizer from {os.path.abspath(data['tokenizer'])}, recorded in the checkpoint" in export.stdout
    assert (tmp_path / "exp" / "tokenizer.model").read_bytes() == open(data["tokenizer"], "rb").read()
    # ... and its content's SHA-256, by which a resume's --tokenizer-model is compared.
    from megatron.core import dist_checkpointing

    from megatron_eve.data.tokenizer import Tokenizer

    common = dist_checkpointing.load_common_state_dict(str(tmp_path / "killed" / "iter_0000006"))
    assert common["tokenizer_sha256"] == Tokenizer(data["tokenizer"]).checksum

    # --ckpt-step loads an earlier iteration than the tracker's: the same losses from there on.
    from_4, _ = train(args + ["--load", tmp_path / "killed", "--ckpt-step", 4, "--save", tmp_path / "from4"])
    assert from_4 == {iteration: full[iteration] for iteration in (5, 6)}

    # Run again once finished: nothing to train, so nothing is saved (the final checkpoint stays as is).
    final = tmp_path / "killed" / "iter_0000006"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in final.iterdir())
    again, out = train(args + ["--save", tmp_path / "killed", "--load", tmp_path / "killed"])
    assert again == {} and "nothing to do: the checkpoint is at iteration 6 of 6" in out
    assert final_evaluations(out) == final_evaluations(full_out)  # as Megatron-LM's pretrain(): evaluated
    assert sorted((p.name, p.stat().st_mtime_ns) for p in final.iterdir()) == before



def test_resume_at_another_tensor_parallel_size(data, tmp_path):
    args = base_args(data, "pretrain") + ["--train-iters", 4]
    full, _ = train(args + ["--save", tmp_path / "a", "--save-interval", 2])  # 2-way data parallel
    (tmp_path / "a" / "latest_checkpointed_iteration.txt").write_text("2")
    resumed, _ = train(args + ["--tensor-model-parallel-size", 2, "--load", tmp_path / "a"])
    assert sorted(resumed) == [3, 4]
    for iteration in (3, 4):
        for ours, theirs in zip(resumed[iteration][:2], full[iteration][:2]):
            assert abs(ours - theirs) <= 1e-5 * abs(theirs)


def test_a_train_samples_run_resumed_at_another_global_batch_ends_at_train_samples(data, tmp_path):
    """--train-samples counts samples: resumed at another --global-batch-size (its default changes
    with the data-parallel size), the run ends where the samples do, in whole batches of the new
    size, not at train_samples // the new batch (which repeated samples past --train-samples, or
    stopped short of it)."""
    import shutil

    args = base_args(data, "pretrain") + ["--train-samples", 24]
    _, out = train(args + ["--exit-interval", 2, "--save", tmp_path / "a"])  # 8 samples consumed
    assert "consumed samples:            8 |" in out
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    lines = r"iteration\s+(\d+)/\s*(\d+) \| consumed samples:\s+(\d+) \|"
    _, out = train(args + ["--global-batch-size", 8, "--load", tmp_path / "a", "--save", tmp_path / "a"])
    assert re.findall(lines, out)[-1] == ("4", "4", "24"), out[-3000:]
    _, out = train(args + ["--global-batch-size", 2, "--load", tmp_path / "b", "--save", tmp_path / "b"], nproc=1)
    assert re.findall(lines, out)[-1] == ("10", "10", "24"), out[-3000:]


def test_sigterm_saves_and_exits_cleanly(data, tmp_path):
    """After earlier saves too: their write-results process (megatron-core's) is signalled with the
    others and must outlive SIGTERM, or the save on exit fails (BrokenPipeError)."""
    proc = launch(base_args(data, "pretrain") + ["--train-iters", 1000, "--save", tmp_path / "ck",
                                                 "--save-interval", 1, "--exit-signal-handler"])
    output = []
    while True:
        line = proc.stdout.readline()
        output.append(line)
        if "iteration        2/" in line or not line:
            break
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.send_signal(signal.SIGTERM)  # as a cluster scheduler signals every task
    out, _ = proc.communicate(timeout=120)
    text = "".join(output) + out
    assert proc.returncode == 0, text[-4000:]
    assert "exiting: SIGTERM at iteration" in text
    saved = int((tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= saved < 1000 and (tmp_path / "ck" / f"iter_{saved:07d}").is_dir()
    from megatron_eve.atomic import STAGING_MARK

    assert not list((tmp_path / "ck").glob("*.tmp")) and not list((tmp_path / "ck").glob("*" + STAGING_MARK))


FAILING_SAVE = """
import sys
from megatron_eve.training import checkpoint, loop

def save(*args, **kwargs):
    raise RuntimeError("simulated: the save failed")

checkpoint.save = save
sys.exit(loop.main(sys.argv[1:]))
"""


def test_a_failing_run_exits_instead_of_waiting_on_its_loader_workers(data, tmp_path):
    """An error after the loaders started (here: the first save) is printed and the process exits with
    status 1: the loaders' workers, which ignore SIGTERM, made the interpreter's exit wait forever."""
    args = base_args(data, "pretrain") + ["--train-iters", "1", "--save", tmp_path / "ck", "--num-workers", "2"]
    out = subprocess.run([sys.executable, "-c", FAILING_SAVE, *map(str, args)], capture_output=True, text=True,
                         timeout=240, env=child_environment(), cwd=ROOT)
    assert out.returncode == 1, out.stderr[-4000:]
    assert "RuntimeError: simulated: the save failed" in out.stderr and "Traceback" in out.stderr
