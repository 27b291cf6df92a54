"""Collation and model inputs: masks for packed rows, THD boundaries, stage-dependent reads."""

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch

from megatron_eve.config import VisionConfig
from megatron_eve.data.dataset import assemble_sequence
from megatron_eve.data.loader import BatchPlan, build_loader, collate, model_inputs
from megatron_eve.model.patch_embedding import FlatPlan, PatchEmbeddingLayer
from megatron_eve.model.visual_layout import IGNORE_INDEX, IMAGE_TOKEN_INDEX, VisualLayout, VisualLayoutError

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
    # Sequence parallelism's rows: a multiple of the TP ranks, the padding a segment of its own.
    split = collate([assemble_sequence([sample(3)], None), assemble_sequence([sample(5)], None)], row_multiple=4)
    assert split["tokens"].shape == (2, 8) and split["labels"][1, 5:].eq(IGNORE_INDEX).all()
    assert split["segment_ids"][1].tolist()[4:] == [0, 1, 1, 1]


def test_thd_boundaries_over_flattened_rows():
    batch = collate([assemble_sequence([sample(3), sample(2)], pad_to=6),
                     assemble_sequence([sample(4)], pad_to=6)])
    inputs = model_inputs(batch, VISION, "cpu", thd=True)
    params = inputs["packed_seq_params"]
    assert params.cu_seqlens_q.tolist() == [0, 3, 5, 6, 10, 12]
    assert params.max_seqlen_q == 4 and inputs["input_ids"].shape == (1, 12)


def image_sample(grid=(2, 4), text=4):
    """A sample whose placeholder run fits its grid (1 + h(w + 1) positions), with its crops."""
    h, w = grid
    tokens = np.concatenate([[1, 2], np.full(1 + h * (w + 1), IMAGE_TOKEN_INDEX), np.arange(10, 10 + text)])
    crop = np.full((h * 28, w * 28, 3), 200, dtype=np.uint8)
    teacher = np.full((h * 14, w * 28, 3), 200, dtype=np.uint8)
    return {"tokens": tokens.astype(np.int32), "labels": tokens.astype(np.int32), "images": [crop],
            "teacher_images": [teacher], "image_grids": [grid]}


def assert_same_layout(a: VisualLayout, b: VisualLayout):
    for name in ("positions", "cell_positions", "cell_index", "cell_image", "grid_hw"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.num_cells, a.num_images, a.pool) == (b.num_cells, b.num_images, b.pool)


def test_loader_workers_plan_the_batch_the_model_reads():
    """The index plan (THD boundaries, visual layout) is made in the workers from host tensors and
    equals what the model would build from the same micro-batch on its device."""
    rows = [assemble_sequence([image_sample((2, 4)), sample(3)], pad_to=40),
            assemble_sequence([sample(5), image_sample((1, 2), 2)], pad_to=40)]
    plan = BatchPlan.of(VISION, thd=True)
    loader = build_loader(rows, 2, num_workers=1, plan=plan)
    planned = next(iter(loader))
    assert planned["plan"] == plan and planned["max_seqlen"] == 27
    assert planned["cu_seqlens"].tolist() == [0, 17, 20, 40, 45, 53, 80]
    flat = planned["tokens"].view(1, -1)
    assert_same_layout(planned["visual_layout"], VisualLayout.build(flat, planned["image_grid_hw"], VISION.align_pool))
    assert planned["visual_layout"].positions.numel() == 11 + 4

    inputs = model_inputs(planned, VISION, "cpu", thd=True)
    assert_same_layout(inputs["visual_layout"], planned["visual_layout"])
    masks = torch.nn.functional.avg_pool2d(inputs["teacher_images"][:, 3:], kernel_size=VISION.patch_size) > 0
    assert torch.equal(inputs["teacher_patches"], torch.nonzero(masks.flatten()).flatten())
    assert inputs["packed_seq_params"].cu_seqlens_q.tolist() == planned["cu_seqlens"].tolist()
    # Planned for THD, read as [b, s]: the plan is made again for that layout.
    rows_first = model_inputs(planned, VISION, "cpu", thd=False)["visual_layout"]
    assert_same_layout(rows_first, VisualLayout.build(planned["tokens"], planned["image_grid_hw"], VISION.align_pool))
    text_only = model_inputs(collate([assemble_sequence([sample(4)], None)]), VISION, "cpu")
    assert text_only["visual_layout"].positions.numel() == 0 and text_only["visual_layout"].num_images == 0


def test_a_run_that_does_not_fit_its_grid_fails_in_the_plan():
    row = assemble_sequence([{**sample(4), "image_grids": [(2, 4)]}], None)
    with pytest.raises(VisualLayoutError, match="0 image-token positions but its 1 images need 11"):
        collate([row], plan=BatchPlan.of(VISION, thd=False))


def test_images_become_crops_and_teacher_squares():
    row = assemble_sequence([image_sample((2, 4))], None)
    inputs = model_inputs(collate([row]), VISION, "cpu")
    assert inputs["images"][0].shape == (3, 56, 112) and inputs["image_grid_hw"].tolist() == [[2, 4]]
    squares = inputs["teacher_images"]
    assert squares.shape == (1, 4, 112, 112)
    mask = squares[0, 3]
    assert mask[42:70].eq(1).all() and mask[:42].eq(0).all() and mask[70:].eq(0).all()
    assert torch.allclose(squares[0, :3, 50, 50], inputs["images"][0][:, 0, 0])


def pel_rows():
    """Two packed rows with crops of distinct, non-square shapes: wide, small, tall."""
    return [assemble_sequence([image_sample((2, 4)), sample(3)], pad_to=48),
            assemble_sequence([sample(5), image_sample((1, 2), 2), image_sample((3, 1), 1)], pad_to=48)]


def assert_same_flat_plan(ours: FlatPlan, theirs: FlatPlan):
    for field in dataclasses.fields(FlatPlan):
        a, b = getattr(ours, field.name), getattr(theirs, field.name)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), field.name
        else:
            assert a == b, field.name


def recording_pel_plans(monkeypatch) -> list:
    """Every FlatPlan the PEL's flat path runs with, from now on, in call order."""
    plans = []
    encode_flat = PatchEmbeddingLayer.encode_flat
    monkeypatch.setattr(PatchEmbeddingLayer, "encode_flat",
                        lambda pel, crops, plan: plans.append(plan) or encode_flat(pel, crops, plan))
    return plans


def test_loader_workers_plan_the_pel_like_the_model(monkeypatch):
    """The PEL's FlatPlan made in a worker equals the one the PEL builds from the crops the model
    receives; model_inputs hands that very plan on, and the PEL runs with it."""
    loader = build_loader(pel_rows(), 2, num_workers=1, plan=BatchPlan.of(VISION, thd=False))
    planned = next(iter(loader))
    worker_plan = planned["pel_plan"]
    assert worker_plan.shapes == ((56, 112), (28, 56), (84, 28))  # (height, width) of each crop
    inputs = model_inputs(planned, VISION, "cpu")
    assert inputs["pel_plan"].first_runs is worker_plan.first_runs  # not planned again

    plans = recording_pel_plans(monkeypatch)
    pel = PatchEmbeddingLayer(VISION)
    with torch.no_grad():
        planned_tokens, planned_grid = pel(inputs["images"], plan=inputs["pel_plan"])
        own_tokens, own_grid = pel(inputs["images"])
    given, own = plans
    assert given is inputs["pel_plan"] and own is not given
    assert_same_flat_plan(worker_plan, own)
    assert torch.equal(planned_tokens, own_tokens) and torch.equal(planned_grid, own_grid)
    assert torch.equal(planned_grid, planned["image_grid_hw"])
    text_only = collate([assemble_sequence([sample(4)], None)], BatchPlan.of(VISION, thd=False))
    assert "pel_plan" not in text_only and "pel_plan" not in model_inputs(text_only, VISION, "cpu")


def test_unplanned_batches_get_their_pel_plan_in_model_inputs():
    batch = collate(pel_rows())
    assert "pel_plan" not in batch
    plan = model_inputs(batch, VISION, "cpu")["pel_plan"]
    assert_same_flat_plan(plan, FlatPlan.of([(56, 112), (28, 56), (84, 28)], VISION.patch_size, VISION.conv_stride))


def test_the_model_runs_on_the_loaders_pel_plan(tmp_path):
    """EVEModel (tiny preset) on a micro-batch planned as a loader worker plans it, in a process of
    its own (see model_reads_the_pel_plan; its assertions fail the child)."""
    from tests.helpers import child_report

    report = child_report("tests.test_loader", tmp_path / "report.json")
    assert report["loader_vs_own_max_abs_diff"] == 0.0
    assert report["scrambled_plan_max_abs_diff"] > 1e-3  # the plan given is the plan used
    assert report["later_stage_max_abs_diff"] == 0.0


def model_reads_the_pel_plan(report_path: str):
    """The PEL runs with the loader's FlatPlan when given it and builds an equal one when not;
    the logits agree exactly; a plan with the tokens' positions scrambled changes them; a later
    pipeline stage handed the same inputs ignores the plan. Runs in a child process, so that
    megatron-core's process group and CPU shims stay out of pytest's."""
    from megatron_eve import distributed
    from megatron_eve.config import ParallelConfig, RuntimeConfig, get_preset, transformer_config
    from megatron_eve.model.build import build_model
    from megatron_eve.model.eve import EVEModel

    parallel, runtime = ParallelConfig(), RuntimeConfig(use_cpu_initialization=True)
    distributed.initialize(parallel)
    cfg = get_preset("tiny")
    model = build_model(cfg, parallel, runtime, load_teacher=False).eval()
    # What a loader worker makes (test_loader_workers_plan_the_pel_like_the_model); no worker
    # process here, which an assertion failing would leave the child waiting on at exit.
    inputs = model_inputs(collate(pel_rows(), BatchPlan.of(cfg.vision, thd=False)), cfg.vision, "cpu")
    del inputs["labels"]  # logits, which every visual token reaches
    given = inputs["pel_plan"]
    own = {key: value for key, value in inputs.items() if key != "pel_plan"}
    scrambled = {**inputs, "pel_plan": dataclasses.replace(given, token_positions=given.token_positions.flip(0))}
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        plans = recording_pel_plans(patch)
        logits, own_logits, scrambled_logits = model(**inputs), model(**own), model(**scrambled)
    assert plans[0] is given and plans[1] is not given
    assert_same_flat_plan(plans[1], given)

    # A later stage: the same inputs, its hidden states from upstream instead of the PEL.
    later = EVEModel(cfg, transformer_config(cfg, parallel, runtime), pre_process=False, load_teacher=False).eval()
    later.set_input_tensor(torch.randn(inputs["input_ids"].shape[1], 2, cfg.language.hidden_size))
    with torch.no_grad():
        later_logits, later_own_logits = later(**inputs), later(**own)
    with open(report_path, "w") as report:
        json.dump({
            "loader_vs_own_max_abs_diff": float((logits - own_logits).abs().max()),
            "scrambled_plan_max_abs_diff": float((logits - scrambled_logits).abs().max()),
            "later_stage_max_abs_diff": float((later_logits - later_own_logits).abs().max()),
        }, report)
    distributed.destroy()


if __name__ == "__main__":
    model_reads_the_pel_plan(sys.argv[1])
