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
