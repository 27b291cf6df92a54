"""EVE's Patch Embedding Layer (PEL) and its mlp2x_gelu projector (eve.md §1).

conv 14x14 → crop to the valid patches → 2x2 local cross-attention → CLS by global attention →
a split token after every row → projector, giving 1 + h(w + 1) tokens per image of any aspect
ratio. Images whose valid region has the same shape and place run through every step together,
so a micro-batch costs one pass per distinct shape, not one per image.
"""

from __future__ import annotations

from typing import List, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_eve.config import VisionConfig

# The reference crops a 16x16 patch grid out of an all-masked (dummy) image.
_EMPTY_IMAGE_PATCHES = 16


class ImageInputError(ValueError):
    """An image tensor the PEL cannot turn into tokens; the message names the image."""


def norm_linear(width: int, out: int) -> nn.Sequential:
    """LayerNorm then a bias-free Linear: EVE's q / kv projections and the aligner's taps."""
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out, bias=False))


class LocalAttention(nn.Module):
    """2x2 window merge: the window's average queries its 4 pixels; residual on the average."""

    def __init__(self, width: int, stride: int, num_heads: int):
        super().__init__()
        self.stride, self.num_heads = stride, num_heads
        self.scale = width**-0.5  # the full width, not the head width, as in the reference
        self.q = norm_linear(width, width)
        self.kv = norm_linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, grid: Tensor) -> Tensor:
        """[n, C, H, W] → [n, h*w, C] with h, w = H // stride, W // stride."""
        n, c, _, _ = grid.shape
        s, heads = self.stride, self.num_heads
        reduced = F.avg_pool2d(grid, kernel_size=s, stride=s)
        h, w = reduced.shape[-2:]
        reduced = reduced.flatten(2).transpose(1, 2)  # [n, hw, C]
        q = self.q(reduced).view(n, h * w, 1, heads, -1)
        # The s*s pixels of every window, row-major: [n, hw, s*s, C].
        windows = grid[:, :, : h * s, : w * s].reshape(n, c, h, s, w, s)
        windows = windows.permute(0, 2, 4, 3, 5, 1).reshape(n, h * w, s * s, c)
        k, v = self.kv(windows).view(n, h * w, s * s, 2, heads, -1).unbind(3)
        attn = ((q * self.scale) * k).sum(-1).softmax(dim=2)  # [n, hw, s*s, heads]
        merged = (attn.unsqueeze(-1) * v).sum(2).reshape(n, h * w, c)
        return reduced + self.proj(merged)


class GlobalAttention(nn.Module):
    """The learned CLS token attends over all merged patches of its image."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = width**-0.5
        self.q = norm_linear(width, width)
        self.kv = norm_linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, cls: Tensor, tokens: Tensor) -> Tensor:
        """cls [C], tokens [n, L, C] → [n, 1, C]."""
        n, length, c = tokens.shape
        heads = self.num_heads
        q = self.q(cls).view(1, 1, heads, -1)
        k, v = self.kv(tokens).view(n, length, 2, heads, -1).unbind(2)  # [n, L, heads, d]
        attn = ((q * self.scale) * k).sum(-1).softmax(dim=1)  # [n, L, heads]
        pooled = (attn.unsqueeze(-1) * v).sum(1).reshape(n, 1, c)
        return cls.view(1, 1, c) + self.proj(pooled)


class PatchEmbeddingLayer(nn.Module):
    """The PEL proper (HF keys `model.vision_tower.*`): pixels → [CLS, rows + split] tokens."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        width = config.hidden_size
        self.patch_size, self.conv_stride = config.patch_size, config.conv_stride
        self.patch_embedding = nn.Conv2d(
            3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.split_embedding = nn.Parameter(torch.randn(width))
        self.local_attention = LocalAttention(width, config.conv_stride, config.num_heads)
        self.global_attention = GlobalAttention(width, config.num_heads)

    def valid_patch_boxes(self, images: Tensor, first_index: int = 0) -> List[Tuple[int, ...]]:
        """Per image of [n, 4, S, S], the patch box (row0, row1, col0, col1) of its valid pixels."""
        p, cell = self.patch_size, self.patch_size * self.conv_stride
        if images.dim() != 4 or images.shape[1] != 4:
            raise ImageInputError(
                f"images {first_index}..: expected [N, 4, H, W] (RGB + validity mask), got "
                f"{list(images.shape)}"
            )
        side_h, side_w = images.shape[2:]
        if side_h % p or side_w % p:
            raise ImageInputError(
                f"images {first_index}..: {side_h}x{side_w} px is not a whole number of {p}-px "
                "patches"
            )
        patch_mask = F.avg_pool2d(images[:, 3:].float(), kernel_size=p, stride=p)[:, 0]
        partial = ((patch_mask != 0) & (patch_mask != 1)).flatten(1).any(1)
        if partial.any():
            bad = first_index + int(partial.nonzero()[0])
            raise ImageInputError(
                f"image {bad}: its mask does not match the {p}-px patch grid (a patch is partly "
                "valid); the mask channel must be 1 on whole patches and 0 elsewhere"
            )
        rows, cols = patch_mask.amax(dim=2) > 0, patch_mask.amax(dim=1) > 0  # [n, G]

        def span(valid: Tensor) -> Tuple[Tensor, Tensor]:
            first = valid.float().argmax(dim=1)
            last = valid.shape[1] - valid.flip(1).float().argmax(dim=1)
            return first, last

        (r0, r1), (c0, c1) = span(rows), span(cols)
        empty = ~rows.any(dim=1)
        # A dummy (all-masked) image keeps the reference's fixed corner crop.
        r0, c0 = r0.masked_fill(empty, 0), c0.masked_fill(empty, 0)
        r1 = r1.masked_fill(empty, _EMPTY_IMAGE_PATCHES)
        c1 = c1.masked_fill(empty, _EMPTY_IMAGE_PATCHES)
        boxes = [tuple(box) for box in torch.stack([r0, r1, c0, c1], dim=1).tolist()]
        for offset, (b_r0, b_r1, b_c0, b_c1) in enumerate(boxes):
            if min(b_r1 - b_r0, b_c1 - b_c0) < self.conv_stride:
                raise ImageInputError(
                    f"image {first_index + offset}: its valid region is {(b_r1 - b_r0) * p}x"
                    f"{(b_c1 - b_c0) * p} px, below one {cell}-px token cell"
                )
        return boxes

    def encode_group(self, pixels: Tensor) -> Tensor:
        """Same-shape crops [n, 3, H, W] → tokens [n, 1 + h(w+1), C]."""
        grid = self.patch_embedding(pixels)
        h, w = grid.shape[-2] // self.conv_stride, grid.shape[-1] // self.conv_stride
        merged = self.local_attention(grid)  # [n, hw, C]
        cls = self.global_attention(self.class_embedding, merged)
        n, _, c = merged.shape
        split = self.split_embedding.view(1, 1, 1, c).expand(n, h, 1, c)
        rows = torch.cat([merged.view(n, h, w, c), split], dim=2).reshape(n, h * (w + 1), c)
        return torch.cat([cls, rows], dim=1)

    def forward(self, images: Union[Tensor, List[Tensor]]) -> Tuple[Tensor, Tensor]:
        """Images → (tokens [ΣT_i, C] concatenated in image order, grid_hw [N, 2] per image).

        images: the reference's masked squares, [N, 4, S, S] or a list of [4, S_i, S_i]; or the
        valid crops themselves, a list of normalised [3, H_i, W_i] (H, W whole token cells), which
        is what the data pipeline supplies — the same tokens without building the padded squares.
        """
        if isinstance(images, Tensor) or images[0].shape[0] == 4:
            groups = self._square_groups(images)
        else:
            groups = self._crop_groups(images)
        num_images = sum(len(ids) for ids, _ in groups)
        s = self.conv_stride * self.patch_size
        grid_hw = torch.zeros(num_images, 2, dtype=torch.long)
        for ids, pixels in groups:
            grid_hw[ids] = torch.tensor([pixels.shape[-2] // s, pixels.shape[-1] // s])
        counts = 1 + grid_hw[:, 0] * (grid_hw[:, 1] + 1)
        starts = torch.cumsum(counts, 0) - counts
        dtype = self.patch_embedding.weight.dtype
        outputs, destinations = [], []
        for ids, pixels in groups:
            tokens = self.encode_group(pixels.to(dtype))  # [n, T, C]
            outputs.append(tokens.flatten(0, 1))
            destinations.append((starts[ids][:, None] + torch.arange(tokens.shape[1])).flatten())
        out = torch.cat(outputs)
        order = torch.cat(destinations)
        # A pinned host copy goes to the GPU without stalling the host (a pageable one would not).
        order = order.pin_memory().to(out.device, non_blocking=True) if out.is_cuda else order.to(out.device)
        return torch.empty_like(out).index_copy(0, order, out), grid_hw

    def _square_groups(self, images: Union[Tensor, List[Tensor]]) -> List[Tuple[Tensor, Tensor]]:
        """(image ids, cropped pixels [n, 3, H, W]) per distinct valid box."""
        if isinstance(images, Tensor):
            batches = [(list(range(images.shape[0])), images)]
        else:  # differently sized squares: one batch per size
            by_size = {}
            for index, image in enumerate(images):
                by_size.setdefault(tuple(image.shape), []).append(index)
            batches = [(members, torch.stack([images[i] for i in members])) for members in by_size.values()]
        p = self.patch_size
        groups = []
        for members, batch in batches:
            by_box = {}
            for pos, box in enumerate(self.valid_patch_boxes(batch, members[0])):
                by_box.setdefault(box, []).append(pos)
            for (r0, r1, c0, c1), positions in by_box.items():
                picked = batch.index_select(0, torch.tensor(positions, device=batch.device))
                ids = torch.tensor([members[pos] for pos in positions])
                groups.append((ids, picked[:, :3, r0 * p : r1 * p, c0 * p : c1 * p]))
        return groups

    def _crop_groups(self, crops: List[Tensor]) -> List[Tuple[Tensor, Tensor]]:
        """(image ids, stacked crops) per distinct crop shape."""
        cell = self.patch_size * self.conv_stride
        by_shape = {}
        for index, crop in enumerate(crops):
            if crop.dim() != 3 or crop.shape[0] != 3:
                raise ImageInputError(f"image {index}: expected a [3, H, W] crop, got {list(crop.shape)}")
            height, width = crop.shape[1:]
            if height % cell or width % cell or min(height, width) < cell:
                raise ImageInputError(
                    f"image {index}: a {height}x{width} px crop is not a whole number of {cell}-px "
                    "token cells"
                )
            by_shape.setdefault(tuple(crop.shape), []).append(index)
        return [(torch.tensor(ids), torch.stack([crops[i] for i in ids])) for ids in by_shape.values()]


class VisionProjection(nn.Sequential):
    """mlp2x_gelu (HF keys `model.mm_projector.{0,2}`): Linear → GELU → Linear, on every token."""

    def __init__(self, vision_width: int, lm_width: int):
        super().__init__(nn.Linear(vision_width, lm_width), nn.GELU(), nn.Linear(lm_width, lm_width))
