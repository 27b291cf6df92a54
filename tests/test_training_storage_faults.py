"""pretrain_eve.py when its files cannot grow (RLIMIT_FSIZE: every write past the limit fails, as on
a full disk): a checkpoint save that fails, written in place or in the background, is one error line
naming the folder, deletes its partial files and keeps the last checkpoint the latest, and the run
exits (its loader workers ignore SIGTERM: a failure that kept them alive hung the exit forever); a
TensorBoard folder that cannot be written costs the charts, not the run."""

import re
import resource
import signal
import subprocess
import sys

import pytest

from megatron_eve.atomic import STAGING_MARK
from tests.helpers import ROOT, base_args, child_environment, free_port, train


def run_limited(args, limit: int, timeout: int = 240) -> subprocess.CompletedProcess:
    """pretrain_eve.py on one process, no file of it growing past `limit` bytes."""
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(ROOT / "pretrain_eve.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_environment(), cwd=ROOT,
                          preexec_fn=limit_file_size)


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory):
    """A checkpoint at iteration 2 (one process)."""
    root = tmp_path_factory.mktemp("faults") / "ck"
    args = base_args(data, "pretrain") + ["--train-iters", 2, "--save-interval", 2, "--save", root]
    train(args, nproc=1)
    return args


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_save_that_cannot_be_written_is_one_line_and_keeps_the_last_checkpoint(saved, tmp_path, mode):
    root = tmp_path / "ck"
    source = saved[saved.index("--save") + 1]
    subprocess.run(["cp", "-a", str(source), str(root)], check=True)
    args = [str(a) for a in saved]
    args[args.index("--save") + 1] = str(root)
    args[args.index("--train-iters") + 1] = "4"
    args += ["--load", str(root), "--override-opt-param-scheduler"] + (["--async-save"] if mode == "async" else [])
    out = run_limited(args, 1 << 20)  # the tiny model's shards are larger
    # sync: the staging directory rank 0's process named (checkpoint.save); async: the --save folder
    staging = re.escape(f"{root}/iter_0000004.") + r"[\w-]+" + re.escape(STAGING_MARK)
    where = staging if mode == "sync" else re.escape(f"{root}")
    assert out.returncode == 1 and re.search(f"error: {where}: write failed \\(", out.stderr), out.stderr[-4000:]
    assert "Traceback" not in out.stderr.split("error: ")[0][-2000:]  # no trainer traceback before the line
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000002", "latest_checkpointed_iteration.txt"]


def test_a_tensorboard_folder_that_cannot_be_written_stops_the_charts_not_the_run(tmp_path, caplog):
    """The event writer's thread fails (here: the file may not grow), add_scalar re-raises its error in
    the training loop: one warning, no more TensorBoard, and the error no longer holds the loop's
    frames (the writer thread keeps it: with them it kept the loaders' workers alive past the run)."""
    from megatron_eve.training.metrics import TensorBoard

    board = TensorBoard(str(tmp_path / "tb"))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        for iteration in range(1, 2000):
            board.write({"lm loss": 1.0, "grad-norm": 2.0}, iteration, 4 * iteration, vs_samples=("lm loss",))
            if board.writer is None:
                break
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert board.writer is None and board.samples_writer is None
    assert f"--tensorboard-dir {tmp_path / 'tb'}: cannot write (" in caplog.text
    assert "TensorBoard logging stops, training goes on" in caplog.text
    board.write({"lm loss": 1.0}, iteration + 1, 0)  # no more writes, no error
    board.close()
