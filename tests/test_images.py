"""EVE's any-resolution rule and visual-token counts (eve.md §3) at 672 and 1344 px."""

import math

import pytest
import torch

from megatron_eve.config import VisionConfig
from megatron_eve.data.images import (
    BACKGROUND_RGB,
    CLIP_MEAN,
    CLIP_STD,
    image_layout,
    num_visual_tokens,
    preprocess_image,
    teacher_layout,
    token_grid,
)
from megatron_eve.model.patch_embedding import PatchEmbeddingLayer
from tests.helpers import random_image

SIZES = {  # (width, height): landscape, portrait, square, extreme and tiny ratios
    "square": (500, 500),
    "landscape": (640, 480),
    "wide": (1000, 100),
    "portrait": (300, 700),
    "tall": (50, 2000),
    "small": (20, 30),
}


def short_side_patches(width, height):
    """v in eve.md §3: CLIP patches along the short side at 336 px."""
    return math.ceil(336 * min(width, height) / max(width, height) / 14)


def expected_tokens(width, height, image_size):
    v = short_side_patches(width, height)
    if v == 24:  # square after rounding
        return 601 if image_size == 672 else 2353
    if width > height:
        return 1 + 25 * v if image_size == 672 else 1 + 98 * v
    return 1 + 24 * (v + 1) if image_size == 672 else 1 + 48 * (2 * v + 1)


@pytest.mark.parametrize("image_size", [672, 1344])
@pytest.mark.parametrize("name", sorted(SIZES))
def test_token_count_formula(name, image_size):
    width, height = SIZES[name]
    vision = VisionConfig(image_size=image_size)
    assert num_visual_tokens(width, height, vision) == expected_tokens(width, height, image_size)


def test_square_counts_are_eves():
    assert num_visual_tokens(336, 336, VisionConfig(image_size=672)) == 601
    assert num_visual_tokens(336, 336, VisionConfig(image_size=1344)) == 2353


@pytest.mark.parametrize("image_size", [672, 1344])
@pytest.mark.parametrize("name", ["square", "landscape", "portrait", "wide", "tall"])
def test_pel_emits_the_formula_count(name, image_size):
    """The PEL itself, on the preprocessed pixels, emits exactly 1 + h(w+1) tokens."""
    width, height = SIZES[name]
    vision = VisionConfig(image_size=image_size, hidden_size=16, num_heads=2)
    pel = PatchEmbeddingLayer(vision)
    pixels, _ = preprocess_image(random_image(width, height, seed=0), vision)
    with torch.no_grad():
        tokens, grid = pel(pixels[None])
    assert tokens.shape == (expected_tokens(width, height, image_size), 16)
    assert tuple(grid[0].tolist()) == token_grid(width, height, vision)


@pytest.mark.parametrize("image_size", [672, 1344])
def test_layout_and_mask_placement(image_size):
    vision = VisionConfig(image_size=image_size)
    ratio = image_size // 336
    width, height = 640, 300  # landscape: v = ceil(336*300/640/14) = 12
    v = short_side_patches(width, height)
    base = teacher_layout(width, height, vision)
    assert (base.width, base.height, base.pad_before) == (336, 14 * v, (24 - v) // 2 * 14)
    assert image_layout(width, height, vision) == base.scaled(ratio)

    pixels, teacher = preprocess_image(random_image(width, height, seed=1), vision)
    assert pixels.shape == (4, image_size, image_size) and teacher.shape == (4, 336, 336)
    for view, scale in ((pixels, ratio), (teacher, 1)):
        mask = view[3]
        rows = torch.nonzero(mask.amax(dim=1)).flatten()
        lo, hi = base.pad_before * scale, (base.pad_before + 14 * v) * scale
        assert rows[0] == lo and rows[-1] == hi - 1
        assert mask[lo:hi].eq(1).all() and mask.sum() == (hi - lo) * view.shape[2]
        # Padding is the mean colour, i.e. about zero after normalisation.
        background = (torch.tensor(BACKGROUND_RGB) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
        assert torch.allclose(view[:3, 0, 0], background, atol=1e-5)


def test_square_images_are_unpadded():
    pixels, teacher = preprocess_image(random_image(400, 400, seed=2), VisionConfig())
    assert pixels[3].eq(1).all() and teacher[3].eq(1).all()


def test_degenerate_image_rejected():
    with pytest.raises(ValueError, match="no pixels"):
        teacher_layout(0, 10, VisionConfig())


def test_teacher_patch_index_planned_on_the_host_equals_the_masks():
    """The valid teacher patches found from the crop sizes alone are those whose mask average is
    positive (the device-side rule), for crops of whole patches, partial patches and full sides."""
    from megatron_eve.data.images import compose_squares, square_patch_index

    sizes = [(28, 112), (112, 56), (30, 45), (112, 112), (14, 13), (100, 1)]
    crops = [torch.zeros(3, h, w, dtype=torch.uint8) for h, w in sizes]
    squares = compose_squares(crops, 112, 14, "cpu")
    valid = torch.nn.functional.avg_pool2d(squares[:, 3:], kernel_size=14) > 0
    expected = torch.nonzero(valid.flatten()).flatten()
    planned = square_patch_index(sizes, 112, 14, 14)
    assert torch.equal(planned, expected)
    assert planned[:8].tolist() == [24, 25, 26, 27, 28, 29, 30, 31]  # 2 x 8 patches from row 3 (top 42 px)
