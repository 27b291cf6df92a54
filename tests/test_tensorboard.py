"""TensorBoard after a kill and a resume: the resumed run's points replace what the killed run logged
past the checkpoint, in the iteration charts and in the "vs samples" charts."""

import time

from megatron_eve.training.metrics import TensorBoard


def read(folder):
    # The reader of TensorBoard's UI: the older event_accumulator does not apply purges.
    from tensorboard.backend.event_processing import plugin_event_accumulator
    from tensorboard.util import tensor_util

    events = plugin_event_accumulator.EventAccumulator(str(folder), tensor_size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]
            for tag in events.Tags()["tensors"]}


def log(board, iterations, offset):
    for iteration in iterations:
        consumed = 4 * iteration
        board.write({"lm loss": offset + iteration, "learning-rate": 1e-3}, iteration, consumed,
                    vs_samples=("lm loss", "learning-rate"))
        if iteration % 2 == 0:
            board.write({"lm loss validation": offset - iteration}, iteration, consumed,
                        vs_samples=("lm loss validation",))
    board.close()


def test_a_resumed_run_replaces_what_the_killed_run_logged_past_its_checkpoint(tmp_path):
    log(TensorBoard(str(tmp_path)), range(1, 6), 0.0)  # killed after iteration 5, checkpoint at 3
    # Event files are read in name order, and the name starts with the second it was opened in.
    second = int(time.time())
    while int(time.time()) == second:
        time.sleep(0.05)
    log(TensorBoard(str(tmp_path), iteration=3, consumed_samples=12), range(4, 9), 100.0)

    by_iteration = read(tmp_path)
    assert by_iteration["lm loss"] == [(1, 1.0), (2, 2.0), (3, 3.0)] + [(i, 100.0 + i) for i in range(4, 9)]
    assert by_iteration["lm loss validation"] == [(2, -2.0), (4, 96.0), (6, 94.0), (8, 92.0)]
    assert not any(tag.endswith(" vs samples") for tag in by_iteration)

    by_samples = read(tmp_path / TensorBoard.VS_SAMPLES)
    assert by_samples["lm loss vs samples"] == [(4 * i, (100.0 if i > 3 else 0.0) + i) for i in range(1, 9)]
    assert [step for step, _ in by_samples["learning-rate vs samples"]] == list(range(4, 33, 4))
    assert by_samples["lm loss validation vs samples"] == [(8, -2.0), (16, 96.0), (24, 94.0), (32, 92.0)]
    assert set(by_samples) == {"lm loss vs samples", "learning-rate vs samples", "lm loss validation vs samples"}


FULL_DISK = """
import logging, resource, signal, sys
from megatron_eve.training.metrics import TensorBoard
logging.basicConfig(level=logging.WARNING, format="%(message)s")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
board = TensorBoard(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.RLIM_INFINITY))
for iteration in range(1, 201):
    board.write({"lm loss": float(iteration), "learning-rate": 1e-3}, iteration, 4 * iteration,
                vs_samples=("lm loss",))
board.close()
assert board.writer is None, "the writes never failed"
print("training went on")
"""


def test_a_failed_write_is_one_warning_without_the_writer_threads_traceback(tmp_path):
    """A full disk (here a file-size limit) under --tensorboard-dir: one warning naming it, and the
    event writer's thread does not print its own "Exception in thread ..." traceback."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path / "tb")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "training went on" in out.stdout, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip() and "Warning" not in line and "warn(" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"--tensorboard-dir {tmp_path / 'tb'}: cannot write"), out.stderr
    assert "File too large" in lines[0] and "Traceback" not in out.stderr and "Exception" not in out.stderr
