"""The trainer's per-iteration scalars: one collective per iteration, on the rank's device."""

import json
import math

import torch

from megatron_eve.training.iteration_stats import nonfinite_count
from tests.helpers import torchrun


def test_nonfinite_count_reads_each_buffer_without_a_mask():
    device = torch.device("cpu")
    assert nonfinite_count([], device).item() == 0
    buffers = [torch.ones(8), torch.tensor([1.0, float("nan")]), torch.tensor([float("-inf")]),
               torch.full((4,), 3e38)]  # finite, but its sum overflows: counted, as a broken gradient
    assert nonfinite_count(buffers, device).item() == 3
    assert nonfinite_count([torch.ones(3, dtype=torch.bfloat16)], device).dtype == torch.float64


def test_one_collective_per_iteration_agrees_on_every_rank():
    out = torchrun("iteration_stats_worker.py", 2, timeout=180)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["dp_flags"] == {"finite": True, "sigterm": True, "over_time": False}
    # Mean over 4 micro-batches (2 per rank): lm (1+3+2+4)/4, align (2+4+3+5)/4.
    assert r["dp_last"] == {"lm loss": 2.5, "align loss": 3.5}
    assert r["dp_nan_grad_flags"]["finite"] is False
    assert r["dp_inf_loss_flags"]["finite"] is False
    assert r["dp_pending_nan"] == {"nonfinite": 1.0, "finite": False, "sigterm": False, "over_time": False}
    assert r["dp_pending_ok"] == {"nonfinite": 0.0, "finite": True, "sigterm": False, "over_time": False}
    # The four non-finite iterations (the last one dropped after its reduction) leave the losses
    # alone but their work still counts.
    assert r["dp_interval"]["losses"] == {"lm loss": 2.5, "align loss": 3.5}
    assert r["dp_interval"]["iterations"] == 5
    assert r["dp_interval"]["real_tokens"] == 5 * (10 + 20) and r["dp_interval"]["samples"] == 5 * 4
    assert r["dp_interval"]["flops"] == 10e15
    assert r["dp_after_read"] == 0
    assert r["tp_interval"] == {"losses": {"lm loss": 2.0, "align loss": 0.5}, "real_tokens": 10}
    assert math.isnan(r["eval_nan"])
    assert r["collectives"] == 7 and r["collective_devices"] == ["cpu"]


def test_flops_of_a_micro_batch_count_frozen_matmuls_twice_and_the_pel_global_keys():
    """Prealign's frozen LLM costs forward + input gradient (2x its forward, not 3x); the PEL's
    CLS attention projects every merged token to a key and a value."""
    from megatron_eve.model.size import parameter_counts
    from megatron_eve.training.metrics import micro_batch_work
    from tests.helpers import tiny_config

    cfg = tiny_config()  # hidden 128, 8 layers, vocab 1024; PEL width 64, patch 14
    image = {"sample_lengths": torch.tensor([10, 6]), "image_grid_hw": torch.tensor([[2, 3]]),
             "tokens": torch.zeros(1, 16), "num_samples": torch.tensor(2)}
    text = {**image, "image_grid_hw": torch.zeros(0, 2, dtype=torch.long)}
    trained = micro_batch_work(image, cfg, align=False).flops
    frozen = micro_batch_work(image, cfg, align=False, llm_trains=False).flops
    matmul_weights = parameter_counts(cfg)["decoder"] - 8 * 2 * 128 - 128
    assert trained - frozen == 2.0 * 16 * (matmul_weights + 128 * 1024)
    # 6 merged tokens (2 x 3), 1 + 2 x (3 + 1) = 9 visual tokens, one image.
    pel = 6 * (4 * 2 * 3 * 14**2 * 64 + 2 * 64**2 + 16 * 64**2 + 2 * 64**2 + 4 * 64**2) + 4 * 64**2
    projector = 9 * 2 * (64 * 128 + 128 * 128)
    assert trained - micro_batch_work(text, cfg, align=False).flops == 3.0 * (pel + projector)


def test_an_iterations_losses_come_with_its_flags_without_another_read(monkeypatch):
    """TensorBoard's per-iteration losses: from the copy the flags were read from, with no read of the
    device of their own (a host synchronisation on a GPU)."""
    import pytest
    import torch.distributed as dist

    from megatron_eve.training.iteration_stats import IterationStats

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        stats = IterationStats(torch.device("cpu"), counts_losses=True, counts_work=False)

        def micro(lm, align):
            return {"lm loss": torch.tensor(lm), "align loss": torch.tensor(align)}

        pending = stats.launch([micro(1.0, 2.0), micro(3.0, 6.0)])
        with pytest.raises(AssertionError):
            stats.read_losses()  # not before the flags' read
        assert pending.read()["finite"]
        reads = []

        def counted(real):
            return lambda self, *args, **kwargs: reads.append(1) or real(self, *args, **kwargs)

        for name in ("tolist", "item", "cpu", "__float__"):
            monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
        assert stats.read_losses() == {"lm loss": 2.0, "align loss": 4.0} and reads == []
        monkeypatch.undo()
        stats.reduce([micro(5.0, 1.0)])
        assert stats.read_losses() == {"lm loss": 5.0, "align loss": 1.0}
    finally:
        dist.destroy_process_group()

