"""pretrain_eve.py with --async-save and the distributed optimizer (2 CPU processes): checkpoints
written in the background are published by the loop (each iteration's poll, the exit's wait),
verify, and resume."""

from tests.helpers import base_args, train


def test_async_save_is_published_and_resumes(data, tmp_path):
    args = base_args(data, "pretrain") + ["--use-distributed-optimizer", "--save-interval", 2, "--async-save",
                                          "--save", tmp_path / "ck"]
    train(args + ["--train-iters", 4])
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text() == "4"  # the exit waited
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "iter_0000002", "iter_0000004", "latest_checkpointed_iteration.txt"]
    resumed, _ = train(args + ["--train-iters", 6, "--load", tmp_path / "ck", "--verify-checkpoint"])
    assert sorted(resumed) == [5, 6]
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text() == "6"
