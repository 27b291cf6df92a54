"""From packed-sequence datasets to model inputs: a resumable data-parallel sampler, collation,
the DataLoader, and the device-side step that turns a collated batch into EVEModel arguments.

The index plan of a micro-batch (THD boundaries, where its visual tokens and aligner cells sit, the
PEL's FlatPlan of its crops) is computed from host tensors in the loader workers and shipped
(pinned) with the batch, so the training step never waits on the device to learn a shape or an
index.

Sampler state is the number of sequences consumed (all data-parallel ranks together), as in
Megatron: a run resumed at `consumed` sees exactly the micro-batches an uninterrupted run would.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from megatron_eve.config import VisionConfig
from megatron_eve.data.images import compose_squares, normalise_crops, square_patch_index
from megatron_eve.model.patch_embedding import FlatPlan
from megatron_eve.model.visual_layout import IGNORE_INDEX, VisualLayout


class MicroBatchSampler:
    """Index lists of this data-parallel rank's micro-batches, from `consumed` on.

    Global position g belongs to the step g // (mbs * dp); inside a step, rank r takes the r-th
    block of micro_batch_size sequences (Megatron's MegatronPretrainingSampler).
    """

    def __init__(self, total: int, consumed: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        if consumed > total:
            raise ValueError(f"consumed {consumed} sequences but the dataset holds {total}")
        self.total, self.consumed = total, consumed
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __len__(self) -> int:
        return (self.total - self.consumed) // (self.micro_batch_size * self.dp_size)

    def __iter__(self) -> Iterator[List[int]]:
        step = self.micro_batch_size * self.dp_size
        for start in range(self.consumed, self.total - step + 1, step):
            first = start + self.dp_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))


@dataclass(frozen=True)
class BatchPlan:
    """How the model will read a micro-batch: what its index plan depends on."""

    align_pool: int  # VisionConfig.align_pool
    thd: bool  # rows flattened to one THD sequence (RuntimeConfig.uses_thd())
    teacher_image_size: int  # the teacher's square side
    patch_size: int
    conv_stride: int  # VisionConfig.conv_stride: the PEL's merge window side, in patches

    @staticmethod
    def of(vision: VisionConfig, thd: bool) -> "BatchPlan":
        return BatchPlan(vision.align_pool, thd, vision.teacher_image_size, vision.patch_size, vision.conv_stride)


def plan_batch(batch: Dict, plan: BatchPlan) -> Dict:
    """Adds the micro-batch's index plan, from its host tensors: cu_seqlens and the longest sample
    (THD), the VisualLayout of its image tokens as the model will see them ([b, s], or one flattened
    row with THD; an empty layout for text-only batches), the PEL's FlatPlan of its crops, and
    which teacher patches hold pixels."""
    tokens = batch["tokens"]
    if plan.thd:
        batch["cu_seqlens"], batch["max_seqlen"] = thd_boundaries(batch["segment_ids"])
        tokens = tokens.view(1, -1)
    batch["visual_layout"] = VisualLayout.build(tokens, batch["image_grid_hw"], plan.align_pool)
    if "images" in batch:
        shapes = [tuple(crop.shape[1:]) for crop in batch["images"]]  # crops are [3, H, W]
        batch["pel_plan"] = FlatPlan.of(shapes, plan.patch_size, plan.conv_stride)
    if "teacher_images" in batch:
        sizes = [tuple(crop.shape[1:]) for crop in batch["teacher_images"]]
        batch["teacher_patches"] = square_patch_index(sizes, plan.teacher_image_size, plan.patch_size, plan.patch_size)
    batch["plan"] = plan
    return batch


def collate(rows: List[Dict], plan: Optional[BatchPlan] = None, row_multiple: int = 1) -> Dict:
    """Rows (assembled sequences) → a micro-batch; rows are padded to the longest, rounded up to a
    multiple of `row_multiple` (sequence parallelism splits a row's positions over the tensor-parallel
    ranks); a no-op for packed rows, which all have seq-length positions. With a plan, its index plan
    too."""
    length = -(-max(len(r["tokens"]) for r in rows) // row_multiple) * row_multiple

    def padded(key, value):
        return torch.from_numpy(np.stack([
            np.concatenate([r[key], np.full(length - len(r[key]), value if value is not None else r[key][-1] + 1)])
            for r in rows
        ]))

    batch = {
        "tokens": padded("tokens", 0),
        "labels": padded("labels", IGNORE_INDEX),
        "position_ids": padded("position_ids", 0),
        "segment_ids": padded("segment_ids", None),  # padding: a segment of its own
        "image_grid_hw": torch.tensor([g for r in rows for g in r["image_grids"]], dtype=torch.long).view(-1, 2),
        "real_tokens": torch.tensor(sum(r["real_tokens"] for r in rows)),
        "sample_lengths": torch.tensor([n for r in rows for n in r["sample_lengths"]], dtype=torch.long),
        "num_samples": torch.tensor(sum(r["num_samples"] for r in rows)),
    }
    for key in ("images", "teacher_images"):
        crops = [torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1) for r in rows for im in r[key]]
        if crops:
            batch[key] = crops
    return plan_batch(batch, plan) if plan is not None else batch


def _ignore_sigterm(worker_id: int) -> None:  # noqa: ARG001
    """Schedulers send SIGTERM to every process of a job; a worker's death would fail the loader
    before the trainer could save. Workers leave on the trainer's own shutdown instead."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_loader(dataset, micro_batch_size: int, num_workers: int, *, consumed: int = 0, dp_rank: int = 0,
                 dp_size: int = 1, pin_memory: bool = False, plan: Optional[BatchPlan] = None,
                 row_multiple: int = 1) -> torch.utils.data.DataLoader:
    """This data-parallel rank's micro-batches of `dataset` from sequence `consumed` on (all ranks
    together); with `plan`, index plans are built in the `num_workers` worker processes; rows padded
    to a multiple of `row_multiple` positions (collate)."""
    sampler = MicroBatchSampler(len(dataset), consumed, micro_batch_size, dp_rank, dp_size)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=functools.partial(collate, plan=plan, row_multiple=row_multiple),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=_ignore_sigterm,
        prefetch_factor=4 if num_workers > 0 else None,
    )


def model_inputs(batch: Dict, vision: VisionConfig, device, *, thd: bool = False,
                 dtype: torch.dtype = torch.float32) -> Dict:
    """A collated micro-batch → EVEModel keyword inputs on `device`.

    Packed rows attend within their segments: a block-diagonal causal mask on the local path, or
    (thd=True, Transformer Engine) the rows flattened to one THD sequence with cu_seqlens.
    Pixels present become normalised crops (the PEL's input) with the PEL's index plan (pel_plan);
    teacher views become the reference's padded squares with their masks.
    """
    if batch.get("plan") != BatchPlan.of(vision, thd):  # not planned in a worker, or differently
        batch = plan_batch(dict(batch), BatchPlan.of(vision, thd))
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    out = {"image_grid_hw": batch["image_grid_hw"],
           "visual_layout": batch["visual_layout"].to(device, non_blocking=True)}
    if thd:
        from megatron.core.packed_seq_params import PackedSeqParams

        cu, longest = batch["cu_seqlens"].to(device, non_blocking=True), batch["max_seqlen"]
        out["packed_seq_params"] = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest
        )
        tokens, labels = tokens.view(1, -1), labels.view(1, -1)
    elif _has_packed_rows(batch):
        segments = batch["segment_ids"].to(device, non_blocking=True)
        same = segments[:, :, None] == segments[:, None, :]
        causal = torch.ones(segments.shape[1], segments.shape[1], dtype=torch.bool, device=device).tril()
        out["attention_mask"] = (~(same & causal)).unsqueeze(1)
    out["input_ids"], out["labels"] = tokens, labels
    if "images" in batch:
        out["images"] = normalise_crops(batch["images"], device, dtype)
        out["pel_plan"] = batch["pel_plan"].to(device)
    if "teacher_images" in batch:
        out["teacher_images"] = compose_squares(batch["teacher_images"], vision.teacher_image_size,
                                                vision.patch_size, device, dtype)
        out["teacher_patches"] = batch["teacher_patches"].to(device, non_blocking=True)
    return out


def thd_boundaries(segments: torch.Tensor):
    """Segment ids [rows, length] → (cu_seqlens int32 over the flattened rows, longest segment).
    A new row always starts a new segment; padding is a segment of its own."""
    rows, length = segments.shape
    flat = (segments.long() + torch.arange(rows)[:, None] * (int(segments.max()) + 1)).flatten()
    starts = torch.nonzero(torch.diff(flat, prepend=flat[:1] - 1)).flatten()
    cu = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _has_packed_rows(batch: Dict) -> bool:
    """True if some row holds more than one sample (else a plain causal mask is exact)."""
    return int(batch["num_samples"]) > batch["tokens"].shape[0]
