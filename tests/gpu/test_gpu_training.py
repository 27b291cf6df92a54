"""pretrain_eve.py on one GPU under torchrun (NCCL + gloo groups): tiny preset, bf16, torch kernels,
packed THD batches, the aligner and its CLIP teacher on; save, resume, and the same losses; and the
EVE-7B recipes' optimizer and recompute flags (examples/eve7b_common.sh), the same losses as the plain
run.

Iteration 3 runs on the weights, optimizer state, RNG and data position saved after iteration 2, so
its losses match the printed digits exactly. Iteration 4 follows a backward pass whose CUDA kernels
may accumulate in a different order (atomics in attention and embedding gradients), so its losses
agree within 1e-3 relative; so do the recipe flags' four iterations, from the same seed.
"""

import pytest

from tests.helpers import base_args, train

pytestmark = pytest.mark.gpu

# examples/eve7b_common.sh's optimizer and recompute flags (its TP=2 + SP needs two GPUs).
RECIPE = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
          "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", 1]


def gpu_args(data, *extra):
    return base_args(data, "pretrain") + ["--bf16", "--transformer-impl", "torch", "--packed-attention", "thd",
                                          "--num-workers", 2, *extra]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, data, on_gpu):
    """Four iterations with the plain optimizer, saved after the second: (losses, checkpoint dir, args)."""
    checkpoints = tmp_path_factory.mktemp("gpu_train") / "ck"
    args = gpu_args(data, "--train-iters", 4, "--save-interval", 2, "--save", checkpoints)
    full, out = train(args, nproc=1, cuda=on_gpu, timeout=400)
    assert sorted(full) == [1, 2, 3, 4], out[-3000:]
    assert all(loss[0] > 0 and loss[1] > 0 for loss in full.values())  # LM and align losses
    if on_gpu:
        assert "tokens/s/GPU" in out and "MFU: n/a" not in out  # the H100 / H200 peak was found
    return full, checkpoints, args


def close(ours, theirs, tolerance=1e-3):
    return all(abs(a - b) <= tolerance * abs(b) for a, b in zip(ours[:2], theirs[:2]))


def test_train_save_resume_on_one_gpu(first_run, on_gpu):
    full, checkpoints, args = first_run
    (checkpoints / "latest_checkpointed_iteration.txt").write_text("2")
    resumed, out = train(args + ["--load", checkpoints], nproc=1, cuda=on_gpu, timeout=400)
    assert sorted(resumed) == [3, 4], out[-3000:]
    assert resumed[3][:2] == full[3][:2]
    assert close(resumed[4], full[4]), (resumed[4], full[4])


def test_recipe_flags_train_like_the_plain_run(first_run, data, on_gpu):
    """The distributed optimizer with both overlaps (its buckets, param-gather hooks and side streams
    on CUDA) and full recompute (megatron-core's checkpointing, its CUDA RNG states forked), from the
    same seed: the same losses as the plain first run."""
    full = first_run[0]
    recipe, out = train(gpu_args(data, "--train-iters", 4, *RECIPE), nproc=1, cuda=on_gpu, timeout=400)
    assert sorted(recipe) == [1, 2, 3, 4], out[-3000:]
    for iteration in (1, 2, 3, 4):
        assert close(recipe[iteration], full[iteration]), (iteration, recipe[iteration], full[iteration])
