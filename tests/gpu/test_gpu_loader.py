"""The loader feeding the GPU: worker processes, pinned host batches, non-blocking copies; the
model inputs equal those of a single-process, unpinned loader."""

import pytest
import torch

from megatron_eve.config import DataConfig
from megatron_eve.data.dataset import build_datasets
from megatron_eve.data.loader import BatchPlan, build_loader, model_inputs
from tests.helpers import tiny_config

pytestmark = pytest.mark.gpu


def inputs_of(data, device, workers: int, pin: bool, count: int = 4):
    vision = tiny_config().vision
    sets = build_datasets(DataConfig(data_path=[data["captions"]], seq_length=512, split="100,0,0",
                                     packing_buffer_size=100), seed=3)
    loader = build_loader(sets["train"], 1, num_workers=workers, pin_memory=pin,
                          plan=BatchPlan.of(vision, thd=True))
    out = []
    for _, batch in zip(range(count), loader):
        if pin:
            assert batch["tokens"].is_pinned() and batch["images"][0].is_pinned()
            assert batch["pel_plan"].first_runs.is_pinned()  # planned in a worker, pinned by the loader
        out.append(model_inputs(batch, vision, device, thd=True, dtype=torch.bfloat16))
    return out


def test_workers_and_pinned_memory_feed_the_device(device, on_gpu, data):
    fast = inputs_of(data, device, workers=2, pin=on_gpu)
    plain = inputs_of(data, torch.device("cpu"), workers=0, pin=False)
    assert len(fast) == len(plain) == 4
    for ours, theirs in zip(fast, plain):
        assert ours["input_ids"].device.type == device.type and ours["images"][0].device.type == device.type
        assert ours["images"][0].dtype == torch.bfloat16
        for key in ("input_ids", "labels", "image_grid_hw"):
            assert torch.equal(ours[key].cpu(), theirs[key]), key
        for a, b in zip(ours["images"], theirs["images"]):
            assert torch.equal(a.cpu(), b)
        assert torch.equal(ours["teacher_images"].cpu(), theirs["teacher_images"])
        assert ours["pel_plan"].token_positions.device.type == device.type
        assert torch.equal(ours["pel_plan"].token_positions.cpu(), theirs["pel_plan"].token_positions)
        p, q = ours["packed_seq_params"], theirs["packed_seq_params"]
        assert torch.equal(p.cu_seqlens_q.cpu(), q.cu_seqlens_q) and p.max_seqlen_q == q.max_seqlen_q
