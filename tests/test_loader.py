"""Collation and model inputs: masks for packed rows, THD boundaries, stage-dependent reads."""

import numpy as np
import torch

from megatron_eve.config import VisionConfig
from megatron_eve.data.dataset import assemble_sequence
from megatron_eve.data.loader import collate, model_inputs
from megatron_eve.model.visual_layout import IGNORE_INDEX

VISION = VisionConfig(image_size=224, teacher_image_size=112)


def sample(n, first=10):
    tokens = np.arange(first, first + n, dtype=np.int32)
    return {"tokens": tokens, "labels": tokens.copy(), "image_grids": []}


def test_assembled_rows_shift_labels_inside_each_sample():
    row = assemble_sequence([sample(3, 10), sample(2, 20)], pad_to=8)
    assert row["tokens"].tolist() == [10, 11, 12, 20, 21, 0, 0, 0]
    # Targets never cross into the next sample or the padding.
    assert row["labels"].tolist() == [11, 12, IGNORE_INDEX, 21, IGNORE_INDEX] + [IGNORE_INDEX] * 3
    assert row["position_ids"].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert row["segment_ids"].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert row["real_tokens"] == 5 and row["num_samples"] == 2


def test_block_diagonal_mask_for_packed_rows():
    batch = collate([assemble_sequence([sample(3), sample(2)], pad_to=6)])
    mask = model_inputs(batch, VISION, "cpu")["attention_mask"][0, 0]
    allowed = ~mask
    assert allowed[4, 3] and allowed[2, 0] and not allowed[3, 2] and not allowed[0, 1]
    assert not allowed[5, 4]  # padding sees only itself


def test_unpacked_rows_use_the_causal_default():
    batch = collate([assemble_sequence([sample(3)], None), assemble_sequence([sample(5)], None)])
    assert batch["tokens"].shape == (2, 5) and batch["labels"][0, 3:].eq(IGNORE_INDEX).all()
    assert "attention_mask" not in model_inputs(batch, VISION, "cpu")


def test_thd_boundaries_over_flattened_rows():
    batch = collate([assemble_sequence([sample(3), sample(2)], pad_to=6),
                     assemble_sequence([sample(4)], pad_to=6)])
    inputs = model_inputs(batch, VISION, "cpu", thd=True)
    params = inputs["packed_seq_params"]
    assert params.cu_seqlens_q.tolist() == [0, 3, 5, 6, 10, 12]
    assert params.max_seqlen_q == 4 and inputs["input_ids"].shape == (1, 12)


def test_images_become_crops_and_teacher_squares():
    crop = np.full((56, 112, 3), 200, dtype=np.uint8)
    teacher = np.full((28, 112, 3), 200, dtype=np.uint8)
    row = assemble_sequence([{**sample(4), "images": [crop], "teacher_images": [teacher],
                              "image_grids": [(2, 4)]}], None)
    inputs = model_inputs(collate([row]), VISION, "cpu")
    assert inputs["images"][0].shape == (3, 56, 112) and inputs["image_grid_hw"].tolist() == [[2, 4]]
    squares = inputs["teacher_images"]
    assert squares.shape == (1, 4, 112, 112)
    mask = squares[0, 3]
    assert mask[42:70].eq(1).all() and mask[:42].eq(0).all() and mask[70:].eq(0).all()
    assert torch.allclose(squares[0, :3, 50, 50], inputs["images"][0][:, 0, 0])
