"""pretrain_eve.py with --async-save and the distributed optimizer (2 CPU processes): checkpoints
written in the background are published by the loop (each iteration's poll, the exit's wait),
verify, and resume; a resume that lengthens the run says which learning-rate schedule to follow,
one with another --vision-lr is refused."""

import math
import re
import subprocess
import sys

import pytest

from megatron_eve.config import ConfigError
from megatron_eve.training.arguments import parse_args
from megatron_eve.training.loop import check_job
from tests.helpers import ROOT, base_args, train


def test_async_save_is_published_and_resumes(data, tmp_path):
    args = base_args(data, "pretrain") + ["--use-distributed-optimizer", "--save-interval", 2, "--async-save",
                                          "--save", tmp_path / "ck", "--lr-decay-style", "cosine"]
    train(args + ["--train-iters", 4])
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text() == "4"  # the exit waited
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "iter_0000002", "iter_0000004", "latest_checkpointed_iteration.txt"]

    # 6 iterations instead of 4: the cosine decay's length differs from the checkpoint's (Megatron-LM refuses).
    longer = args + ["--train-iters", 6, "--load", tmp_path / "ck", "--verify-checkpoint"]
    refused = subprocess.run([sys.executable, str(ROOT / "pretrain_eve.py"), *map(str, longer)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "was trained on another learning-rate schedule" in refused.stderr
    assert "lr_decay_steps: checkpoint 16, flags 24" in refused.stderr and "--override-opt-param-scheduler" in refused.stderr
    # Another --vision-lr: megatron-core pairs the optimizer's param groups with the checkpoint's by
    # their learning rates (here read from the data-parallel-sharded optimizer's object), so no flag helps.
    with pytest.raises(ConfigError, match=r"vision max_lr: checkpoint 0\.001, flags 0\.0005 \(--vision-lr\)"):
        check_job(parse_args([*map(str, longer), "--vision-lr", "5e-4", "--override-opt-param-scheduler"]), 2)

    resumed, out = train(longer + ["--override-opt-param-scheduler"])
    assert sorted(resumed) == [5, 6]
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text() == "6"
    # The flags' schedule from the checkpoint's step: after 5 steps of 4 samples, cosine over 24 (the
    # checkpoint's own schedule had decayed to 0 at 16).
    lr = float(re.search(r"iteration +5/ +6 \|.*? learning rate: (\S+) \|", out)[1])
    assert abs(lr - 1e-3 * 0.5 * (1 + math.cos(math.pi * 20 / 24))) < 1e-9
