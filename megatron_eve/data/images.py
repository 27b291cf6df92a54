"""EVE's any-resolution image rule (eve.md §3) and the visual-token arithmetic built on it.

An image keeps its aspect ratio: its long side becomes the teacher square's side L (336), its short
side is rounded up to whole 14-px patches, and it is pasted centred on a mean-colour square with a
validity mask. The PEL view is the same layout scaled by image_size / L (2 at 672 px, 4 at 1344).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import torch

from megatron_eve.config import VisionConfig

# OpenAI CLIP normalisation, used by EVE's processors.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Padding colour of the square canvas: the mean as 8-bit RGB, (122, 116, 104).
BACKGROUND_RGB = tuple(int(m * 255) for m in CLIP_MEAN)


@dataclass(frozen=True)
class SquareLayout:
    """Where a resized image sits inside its square canvas, in pixels.

    The image spans the whole square along its long side and [pad_before, pad_before + short)
    along the short side.
    """

    width: int
    height: int
    pad_before: int
    square: int

    @property
    def is_square(self) -> bool:
        return self.width == self.height

    def scaled(self, ratio: int) -> "SquareLayout":
        return SquareLayout(
            self.width * ratio, self.height * ratio, self.pad_before * ratio, self.square * ratio
        )


def teacher_layout(width: int, height: int, vision: VisionConfig) -> SquareLayout:
    """The teacher-resolution layout of a width x height image (EVE's compute_basehw)."""
    if width < 1 or height < 1:
        raise ValueError(f"image has no pixels ({width}x{height})")
    side, patch = vision.teacher_image_size, vision.patch_size
    grid = side // patch
    long_side, short_side = max(width, height), min(width, height)
    short_patches = max(1, int(math.ceil(side * short_side / long_side / patch)))
    short_px = short_patches * patch
    pad_before = (grid - short_patches) // 2 * patch
    if width > height:
        return SquareLayout(side, short_px, pad_before, side)
    return SquareLayout(short_px, side, pad_before, side)


def image_layout(width: int, height: int, vision: VisionConfig) -> SquareLayout:
    """The PEL-resolution layout: the teacher layout scaled to image_size."""
    return teacher_layout(width, height, vision).scaled(
        vision.image_size // vision.teacher_image_size
    )


def token_grid(width: int, height: int, vision: VisionConfig) -> Tuple[int, int]:
    """(rows, cols) of the PEL's token grid for a width x height image (after the 2x2 merge)."""
    layout = image_layout(width, height, vision)
    return layout.height // vision.token_cell, layout.width // vision.token_cell


def tokens_per_image(rows: int, cols: int) -> int:
    """CLS + one split token after every row: 1 + h(w + 1)."""
    return 1 + rows * (cols + 1)


def num_visual_tokens(width: int, height: int, vision: VisionConfig) -> int:
    return tokens_per_image(*token_grid(width, height, vision))


def _canvas(image, layout: SquareLayout) -> Tuple[np.ndarray, np.ndarray]:
    """Resize (bicubic, as PIL's default) and paste centred; return uint8 HWC pixels and mask."""
    from PIL import Image

    resized = image.convert("RGB").resize((layout.width, layout.height), Image.BICUBIC)
    mask = np.zeros((layout.square, layout.square), dtype=np.uint8)
    if layout.is_square:
        mask[:] = 1
        return np.array(resized), mask
    canvas = Image.new("RGB", (layout.square, layout.square), BACKGROUND_RGB)
    lo, hi = layout.pad_before, layout.pad_before + min(layout.width, layout.height)
    if layout.width > layout.height:
        canvas.paste(resized, (0, lo))
        mask[lo:hi, :] = 1
    else:
        canvas.paste(resized, (lo, 0))
        mask[:, lo:hi] = 1
    return np.array(canvas), mask


def to_model_tensor(pixels: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """uint8 HWC RGB + HW {0,1} mask → float [4, H, W]: CLIP-normalised RGB, mask as channel 3."""
    rgb = torch.from_numpy(np.array(pixels, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    rgb = (rgb - mean) / std
    return torch.cat([rgb, torch.from_numpy(mask).float()[None]], dim=0)


def preprocess_image(image, vision: VisionConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """A PIL image → (PEL input [4, S, S], teacher input [4, L, L]) exactly as EVE prepares them."""
    width, height = image.size
    base = teacher_layout(width, height, vision)
    pel = to_model_tensor(*_canvas(image, image_layout(width, height, vision)))
    teacher = to_model_tensor(*_canvas(image, base))
    return pel, teacher


# ------------------------------------------------------------------ device-side batch assembly
@functools.lru_cache(maxsize=None)
def _colour_constants(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CLIP's mean and std [3, 1, 1] (float32) and the background colour [1, 3, 1, 1] (uint8), made on
    `device` once: a tensor made from Python numbers on a GPU is copied from pageable memory, which
    waits for the device, and these are needed for every crop of every micro-batch."""
    return (torch.tensor(CLIP_MEAN, device=device).view(3, 1, 1), torch.tensor(CLIP_STD, device=device).view(3, 1, 1),
            torch.tensor(BACKGROUND_RGB, dtype=torch.uint8, device=device).view(1, 3, 1, 1))


def _normalise(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [..., 3, H, W] → CLIP-normalised float."""
    mean, std, _ = _colour_constants(pixels.device)
    return ((pixels.float() / 255.0 - mean) / std).to(dtype)


def normalise_crops(crops, device, dtype=torch.float32):
    """uint8 [3, H, W] crops → normalised float crops on `device` (the PEL's crop input)."""
    return [_normalise(crop.to(device, non_blocking=True), dtype) for crop in crops]


def _placement(height: int, width: int, side: int, unit: int) -> Tuple[int, int]:
    """Where compose_squares pastes a crop: (top, left), whole `unit`s of padding before it."""
    top = (side // unit - height // unit) // 2 * unit if height < side else 0
    left = (side // unit - width // unit) // 2 * unit if width < side else 0
    return top, left


def compose_squares(crops, side: int, unit: int, device, dtype=torch.float32) -> torch.Tensor:
    """uint8 [3, h, w] crops → the reference's [N, 4, side, side] input: each crop centred on
    a mean-colour square (pad before = whole `unit`s, as EVE pastes it), mask as channel 3."""
    background = _colour_constants(torch.device(device))[2]
    canvas = background.expand(len(crops), 3, side, side).clone()
    mask = torch.zeros(len(crops), 1, side, side, device=device)
    for index, crop in enumerate(crops):
        height, width = crop.shape[1:]
        top, left = _placement(height, width, side, unit)
        canvas[index, :, top : top + height, left : left + width] = crop.to(device, non_blocking=True)
        mask[index, :, top : top + height, left : left + width] = 1
    return torch.cat([_normalise(canvas, dtype), mask.to(dtype)], dim=1)


def square_patch_index(sizes: Sequence[Tuple[int, int]], side: int, unit: int, patch: int) -> torch.Tensor:
    """Flat indices (image-major, row-major over the side // patch grid) of the patches of
    compose_squares' squares that hold crop pixels, i.e. where avg_pool2d(mask, patch) > 0 —
    computed on the host from the crop sizes, so the teacher selects them without a device sync."""
    grid = side // patch
    picked = []
    for image, (height, width) in enumerate(sizes):
        top, left = _placement(height, width, side, unit)
        bottom, right = min(top + height, grid * patch), min(left + width, grid * patch)
        rows = torch.arange(top // patch, -(-bottom // patch))
        cols = torch.arange(left // patch, -(-right // patch))
        picked.append(image * grid * grid + (rows[:, None] * grid + cols[None, :]).flatten())
    return torch.cat(picked) if picked else torch.zeros(0, dtype=torch.long)
