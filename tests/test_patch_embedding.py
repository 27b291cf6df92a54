"""The PEL (batched by shape) against a per-image implementation written from eve.md §1."""

import pytest
import torch

from megatron_eve.config import VisionConfig
from megatron_eve.data.images import preprocess_image, token_grid
from megatron_eve.model.patch_embedding import ImageInputError, PatchEmbeddingLayer, VisionProjection
from tests.helpers import random_image

VISION = VisionConfig(hidden_size=32, num_heads=8, image_size=224, teacher_image_size=112)


def per_image_reference(pel: PatchEmbeddingLayer, images: torch.Tensor):
    """One image at a time, as the reference VisionTokenizer loops: the transcription shipped in
    every HF export (modeling_eve.py), given the same weights."""
    from types import SimpleNamespace

    from megatron_eve.hf.modeling_eve import VisionTokenizer

    reference = VisionTokenizer(SimpleNamespace(mm_hidden_size=pel.class_embedding.numel(), patch_stride=14,
                                                conv_stride=2, mm_vision_heads=8))
    reference.load_state_dict(pel.state_dict())
    return torch.cat(reference(images))


def batch_of(sizes, seed=0):
    return torch.stack([preprocess_image(random_image(w, h, seed + i), VISION)[0]
                        for i, (w, h) in enumerate(sizes)])


def test_batched_equals_per_image_reference():
    torch.manual_seed(0)
    pel = PatchEmbeddingLayer(VISION)
    # Two landscape of one shape, a portrait, a square, another landscape shape: 4 groups.
    images = batch_of([(200, 100), (90, 180), (200, 100), (160, 160), (300, 60)])
    with torch.no_grad():
        tokens, grid = pel(images)
        expected = per_image_reference(pel, images)
    assert tokens.shape == expected.shape
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    assert grid.tolist() == [[4, 8], [8, 4], [4, 8], [8, 8], [2, 8]]


def test_list_of_differently_sized_squares():
    torch.manual_seed(0)
    pel = PatchEmbeddingLayer(VISION)
    small = batch_of([(100, 200)])[0]
    hd = VisionConfig(hidden_size=32, num_heads=8, image_size=448, teacher_image_size=112)
    large = preprocess_image(random_image(120, 80, 5), hd)[0]
    with torch.no_grad():
        tokens, grid = pel([small, large])
        one, _ = pel(small[None])
        two, _ = pel(large[None])
    torch.testing.assert_close(tokens, torch.cat([one, two]))
    assert grid.tolist() == [list(token_grid(100, 200, VISION)), list(token_grid(120, 80, hd))]


def test_gradients_reach_every_pel_parameter():
    torch.manual_seed(0)
    pel, proj = PatchEmbeddingLayer(VISION), VisionProjection(32, 48)
    tokens, _ = pel(batch_of([(200, 100), (160, 160)]))
    proj(tokens).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pel.parameters())


def test_dummy_image_uses_the_reference_corner_crop():
    pel = PatchEmbeddingLayer(VISION)
    images = batch_of([(160, 160)])
    images[:, 3] = 0
    with torch.no_grad():
        tokens, grid = pel(images)
    assert grid.tolist() == [[8, 8]] and tokens.shape[0] == 1 + 8 * 9


def test_partial_patch_mask_is_rejected():
    images = batch_of([(200, 100), (160, 160)])
    images[1, 3, 0, 0] = 0  # one pixel of a valid patch masked
    with pytest.raises(ImageInputError, match="image 1: its mask does not match the 14-px"):
        PatchEmbeddingLayer(VISION)(images)


def test_image_below_one_token_cell_is_rejected():
    images = batch_of([(160, 160)])
    images[0, 3] = 0
    images[0, 3, 14:28, 14:42] = 1  # 14 x 28 px: one patch tall
    with pytest.raises(ImageInputError, match="image 0: its valid region is 14x28 px, below one 28-px"):
        PatchEmbeddingLayer(VISION)(images)


def test_missing_mask_channel_is_rejected():
    with pytest.raises(ImageInputError, match=r"expected \[N, 4, H, W\]"):
        PatchEmbeddingLayer(VISION)(torch.zeros(1, 3, 224, 224))


def test_side_not_a_whole_number_of_patches_is_rejected():
    with pytest.raises(ImageInputError, match="not a whole number of 14-px patches"):
        PatchEmbeddingLayer(VISION)(torch.ones(1, 4, 220, 220))


def test_crops_give_the_same_tokens_as_masked_squares():
    """The data pipeline feeds valid crops; the reference feeds padded squares with masks."""
    from megatron_eve.data.images import compose_squares, image_layout, normalise_crops

    torch.manual_seed(0)
    pel = PatchEmbeddingLayer(VISION)
    crops = []
    for i, (w, h) in enumerate([(200, 100), (90, 180), (160, 160), (300, 60)]):
        layout = image_layout(w, h, VISION)
        pixels = torch.randint(0, 256, (3, layout.height, layout.width), dtype=torch.uint8)
        crops.append(pixels)
    squares = compose_squares(crops, VISION.image_size, VISION.patch_size * 2, "cpu")
    with torch.no_grad():
        from_squares, grid_a = pel(squares)
        from_crops, grid_b = pel(normalise_crops(crops, "cpu"))
    torch.testing.assert_close(from_crops, from_squares)
    assert torch.equal(grid_a, grid_b)
    # compose_squares places a crop exactly where preprocess_image pastes the image.
    image = random_image(200, 100, 3)
    reference, _ = preprocess_image(image, VISION)
    layout = image_layout(200, 100, VISION)
    crop = torch.from_numpy(__import__("numpy").array(image.resize((layout.width, layout.height), 3))).permute(2, 0, 1)
    torch.testing.assert_close(compose_squares([crop], VISION.image_size, 28, "cpu")[0], reference)


def test_crop_not_whole_token_cells_is_rejected():
    with pytest.raises(ImageInputError, match="image 0: a 30x56 px crop is not a whole number of 28-px"):
        PatchEmbeddingLayer(VISION)([torch.zeros(3, 30, 56)])


# The flat path (all crops in a fixed number of kernels) against the per-shape path.

# (height, width) px: repeated shapes, tall and wide, the minimal 28x28 crop, several distinct shapes.
MIXED_SHAPES = [(56, 84), (84, 56), (56, 84), (28, 28), (28, 168), (168, 28), (112, 112), (56, 84)]


def crops_of(shapes, dtype, seed=0):
    """Normalised-looking crops: odd ones HWC-strided as the loader makes them, the rest CHW."""
    generator = torch.Generator().manual_seed(seed)
    crops = []
    for index, (height, width) in enumerate(shapes):
        pixels = torch.randn(height, width, 3, generator=generator, dtype=dtype)
        crop = pixels.permute(2, 0, 1) if index % 2 else pixels.permute(2, 0, 1).contiguous()
        crops.append(crop.requires_grad_())
    return crops


def tokens_and_gradients(pel, crops, flat):
    """Forward one path; backward a fixed random projection of the tokens."""
    pel.zero_grad()
    for crop in crops:
        crop.grad = None
    tokens, grid = pel(crops, flat=flat)
    probe = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(1), dtype=tokens.dtype)
    (tokens * probe).sum().backward()
    grads = {name: param.grad.clone() for name, param in pel.named_parameters()}
    grads.update({f"pixels {i}": crop.grad.clone() for i, crop in enumerate(crops)})
    return tokens.detach(), grid, grads


# fp32 within 1e-5 (sums run in another order); float64 within 1e-10.
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("shapes", [MIXED_SHAPES, [(28, 28)], [(56, 196)]], ids=["mix", "minimal", "single"])
def test_flat_equals_per_shape_tokens_and_gradients(dtype, tolerance, shapes):
    torch.manual_seed(0)
    pel = PatchEmbeddingLayer(VISION).to(dtype)
    crops = crops_of(shapes, dtype)
    flat, flat_grid, flat_grads = tokens_and_gradients(pel, crops, flat=True)
    per_shape, grid, grads = tokens_and_gradients(pel, crops, flat=False)
    assert flat.dtype == dtype and flat.shape == per_shape.shape
    torch.testing.assert_close(flat, per_shape, rtol=tolerance, atol=tolerance)
    assert torch.equal(flat_grid, grid)
    assert flat_grads.keys() == grads.keys() and len(grads) == len(list(pel.parameters())) + len(crops)
    for name in grads:
        torch.testing.assert_close(flat_grads[name], grads[name], rtol=tolerance, atol=tolerance, msg=name)


def test_flat_bf16_is_as_close_to_float64_as_per_shape_bf16():
    """bf16 rounds differently in the two paths; the flat one must not lose accuracy."""
    torch.manual_seed(0)
    pel = PatchEmbeddingLayer(VISION).double()
    crops = [crop.detach() for crop in crops_of(MIXED_SHAPES, torch.float64)]
    with torch.no_grad():
        exact, _ = pel(crops, flat=False)
        pel, crops = pel.to(torch.bfloat16), [crop.to(torch.bfloat16) for crop in crops]
        errors = {flat: (pel(crops, flat=flat)[0].double() - exact).abs().mean() for flat in (True, False)}
    assert errors[True] <= 1.1 * errors[False]


def test_flat_equals_per_shape_on_masked_squares_with_odd_patch_boxes():
    """A valid box of 3x5 patches: both paths drop the patches outside whole 2x2 windows."""
    torch.manual_seed(0)
    pel = PatchEmbeddingLayer(VISION)
    images = batch_of([(200, 100), (90, 180), (160, 160)])
    images[2, 3] = 0
    images[2, 3, 28:70, 14:84] = 1  # 42 x 70 px: 3 x 5 patches → 1 x 2 tokens
    with torch.no_grad():
        flat, grid = pel(images)
        per_shape, per_shape_grid = pel(images, flat=False)
    torch.testing.assert_close(flat, per_shape, rtol=1e-5, atol=1e-5)
    assert grid.tolist()[2] == [1, 2] and torch.equal(grid, per_shape_grid)


def test_window_mean_of_patch_rows_is_avg_pool():
    """The flat path pools each window as the mean of its s*s consecutive patch rows."""
    from megatron_eve.model.patch_embedding import FlatPlan

    pel = PatchEmbeddingLayer(VISION)
    crop = torch.randn(3, 56, 84)
    plan = FlatPlan.of([(56, 84)], 14, 2)
    pixels = crop.permute(1, 2, 0).reshape(-1, 3 * 14)
    patches = pixels[plan.pixel_runs().view(-1)].view(-1, 14 * 14 * 3)
    kernel = pel.patch_embedding.weight.permute(0, 2, 3, 1).reshape(32, -1)
    with torch.no_grad():
        means = (patches @ kernel.T).view(-1, 4, 32).mean(1)
        pooled = torch.nn.functional.avg_pool2d(pel.patch_embedding(crop[None]), 2)[0]
    torch.testing.assert_close(means, pooled.flatten(1).T, rtol=1e-5, atol=1e-5)


def test_every_pel_module_is_called_by_the_flat_path():
    """Every PEL module holding parameters runs through its own call on the flat path, so module
    hooks see its weights used: megatron-core's overlapped parameter gather (distributed optimizer,
    --overlap-param-gather) waits for a module's parameters in a forward pre-hook."""
    pel = PatchEmbeddingLayer(VISION)
    called = set()
    for name, module in pel.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            module.register_forward_pre_hook(lambda module, args, name=name: called.add(name))
    pel(crops_of([(56, 84), (28, 112)], torch.float32), flat=True)
    holders = {name for name, module in pel.named_modules() if any(True for _ in module.parameters(recurse=False))}
    assert called == holders, holders - called


def test_flat_plan_is_built_from_shapes_alone():
    from megatron_eve.model.patch_embedding import FlatPlan

    # One 28x28 crop: 2x2 patches, one cell; HWC pixel rows of 3*14 values, 2 runs per pixel row.
    plan = FlatPlan.of([(28, 28)], patch_size=14, conv_stride=2)
    rows = torch.arange(14) * 2
    expected = torch.stack([rows, rows + 1, rows + 28, rows + 29])
    assert torch.equal(plan.pixel_runs(), expected)
    assert plan.token_positions.tolist() == [0, 1, 2]  # CLS, the cell, its row's split token
    assert plan.grid_hw.tolist() == [[1, 1]] and plan.num_splits == 1

    shapes = [(56, 84), (28, 56), (84, 28)]
    plan = FlatPlan.of(shapes, patch_size=14, conv_stride=2)
    tensors = (plan.grid_hw, plan.first_runs, plan.row_runs, plan.cell_image, plan.token_positions)
    assert all(t.device.type == "cpu" and t.dtype == torch.long for t in tensors)
    assert plan.grid_hw.tolist() == [[2, 3], [1, 2], [3, 1]]
    assert plan.cell_image.tolist() == [0] * 6 + [1] * 2 + [2] * 3
    num_tokens = sum(1 + h * (w + 1) for h, w in plan.grid_hw.tolist())
    assert sorted(plan.token_positions.tolist()) == list(range(num_tokens))
    # Every pixel row of every patch is read exactly once (all crops are whole cells here).
    assert sorted(plan.pixel_runs().flatten().tolist()) == list(range(sum(h * w // 14 for h, w in shapes)))
    with pytest.raises(ImageInputError, match="image 1: a 28x30 px crop"):
        FlatPlan.of([(28, 28), (28, 30)], patch_size=14, conv_stride=2)


def test_prebuilt_plan_is_used_and_checked():
    from megatron_eve.model.patch_embedding import FlatPlan

    torch.manual_seed(0)
    pel = PatchEmbeddingLayer(VISION)
    crops = [torch.randn(3, 56, 84), torch.randn(3, 28, 56)]
    with torch.no_grad():
        tokens, grid = pel(crops, plan=FlatPlan.of([(56, 84), (28, 56)], 14, 2))
        expected, _ = pel(crops, flat=False)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ImageInputError, match="the plan is for crops"):
        pel(crops, plan=FlatPlan.of([(28, 56), (56, 84)], 14, 2))


def count_aten_calls(pel, crops, flat):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        pel(crops, flat=flat)
    return Count.calls


def test_flat_op_count_does_not_grow_with_distinct_shapes():
    """Same number of crops, 1 vs 6 distinct shapes: the flat path runs the same ops."""
    pel = PatchEmbeddingLayer(VISION)
    alike = [torch.randn(3, 56, 84) for _ in range(6)]
    mixed = [torch.randn(3, 28 * (1 + i % 3), 28 * (1 + i // 3)) for i in range(6)]
    assert count_aten_calls(pel, alike, flat=True) == count_aten_calls(pel, mixed, flat=True)
    assert count_aten_calls(pel, alike, flat=False) < count_aten_calls(pel, mixed, flat=False)
