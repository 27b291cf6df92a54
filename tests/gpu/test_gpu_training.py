"""pretrain_eve.py on one GPU under torchrun (NCCL + gloo groups): tiny preset, bf16, torch kernels,
packed THD batches, the aligner and its CLIP teacher on; save, resume, and the same losses.

Iteration 3 runs on the weights, optimizer state, RNG and data position saved after iteration 2, so
its losses match the printed digits exactly. Iteration 4 follows a backward pass whose CUDA kernels
may accumulate in a different order (atomics in attention and embedding gradients), so its losses
agree within 1e-3 relative.
"""

import pytest

from tests.helpers import base_args, train

pytestmark = pytest.mark.gpu


def test_train_save_resume_on_one_gpu(tmp_path, device, on_gpu, data):
    args = base_args(data, "pretrain") + [
        "--train-iters", 4, "--save-interval", 2, "--save", tmp_path / "ck", "--bf16",
        "--transformer-impl", "torch", "--packed-attention", "thd", "--num-workers", 2]
    full, out = train(args, nproc=1, cuda=on_gpu, timeout=400)
    assert sorted(full) == [1, 2, 3, 4], out[-3000:]
    assert all(loss[0] > 0 and loss[1] > 0 for loss in full.values())  # LM and align losses
    if on_gpu:
        assert "tokens/s/GPU" in out and "MFU: n/a" not in out  # the H100 / H200 peak was found

    (tmp_path / "ck" / "latest_checkpointed_iteration.txt").write_text("2")
    resumed, out = train(args + ["--load", tmp_path / "ck"], nproc=1, cuda=on_gpu, timeout=400)
    assert sorted(resumed) == [3, 4], out[-3000:]
    assert resumed[3][:2] == full[3][:2]
    for ours, theirs in zip(resumed[4][:2], full[4][:2]):
        assert abs(ours - theirs) <= 1e-3 * abs(theirs)
