"""EVE's Patch Embedding Layer (PEL) and its mlp2x_gelu projector (eve.md §1).

conv 14x14 → crop to the valid patches → 2x2 local cross-attention → CLS by global attention →
a split token after every row → projector, giving 1 + h(w + 1) tokens per image of any aspect
ratio.

Two equivalent paths. The flat one (the default) runs all patches of the micro-batch together in a
fixed number of kernels whatever the mix of shapes: one gather patchifies every crop, the conv is
one matmul, the 2x2 windows are consecutive patch rows, the CLS attention is a softmax segmented
by image, and one index_copy lays the tokens out. Its index tensors (a FlatPlan) depend on the
crops' shapes alone, so they are built on the host with no device sync. The per-shape path runs
one pass per distinct crop shape; it is kept as the parity reference.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple, Union

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
        s = self.stride
        reduced = F.avg_pool2d(grid, kernel_size=s, stride=s)
        h, w = reduced.shape[-2:]
        reduced = reduced.flatten(2).transpose(1, 2).reshape(n * h * w, c)
        # The s*s pixels of every window, row-major: [n*hw, s*s, C].
        windows = grid[:, :, : h * s, : w * s].reshape(n, c, h, s, w, s)
        windows = windows.permute(0, 2, 4, 3, 5, 1).reshape(n * h * w, s * s, c)
        return self.attend(reduced, windows).view(n, h * w, c)

    def attend(self, reduced: Tensor, windows: Tensor) -> Tensor:
        """Window averages [m, C] and their pixels [m, s*s, C] (row-major) → merged [m, C]."""
        m, c = reduced.shape
        heads = self.num_heads
        q = self.q(reduced).view(m, 1, heads, -1)
        k, v = self.kv(windows).view(m, windows.shape[1], 2, heads, -1).unbind(2)
        attn = ((q * self.scale) * k).sum(-1).softmax(dim=1)  # [m, s*s, heads]
        merged = (attn.unsqueeze(-1) * v).sum(1).reshape(m, c)
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

    def forward_segments(self, cls: Tensor, tokens: Tensor, image: Tensor, num_images: int) -> Tensor:
        """cls [C], tokens [M, C] of all images back to back, image [M] (whose token) → [N, C].

        The softmax over each image's tokens is segmented: per-image max, exp, per-image sums. Its
        sums accumulate in at least fp32 (what softmax and sum do internally) so bf16 stays close
        to the per-image path.
        """
        m, c = tokens.shape
        heads = self.num_heads
        q = self.q(cls).view(1, heads, -1)
        k, v = self.kv(tokens).view(m, 2, heads, -1).unbind(1)  # [M, heads, d]
        accumulate = torch.promote_types(tokens.dtype, torch.float32)
        logits = ((q * self.scale) * k).sum(-1).to(accumulate)  # [M, heads]
        by_head = image.view(m, 1).expand(m, heads)
        # The max only keeps exp in range; the softmax does not depend on it, so no gradient.
        peak = logits.new_full((num_images, heads), float("-inf"))
        peak = peak.scatter_reduce(0, by_head, logits.detach(), "amax")
        weights = (logits - peak.index_select(0, image)).exp()
        totals = logits.new_zeros(num_images, heads).index_add(0, image, weights)
        attn = weights / totals.index_select(0, image)
        pooled = logits.new_zeros(num_images, heads, c // heads)
        pooled = pooled.index_add(0, image, attn.unsqueeze(-1) * v.to(accumulate))
        return cls.view(1, c) + self.proj(pooled.to(tokens.dtype).view(num_images, c))


@dataclasses.dataclass(frozen=True)
class FlatPlan:
    """The flat PEL's index tensors for one micro-batch: a pure function of the crops' shapes.

    The crops are read as one image-major buffer of HWC pixels (the loader's crops are HWC views
    of the decoded arrays, so flattening them copies nothing), cut into runs of 3*patch values:
    one patch's pixel row. Patches are ordered by merged cell (image-major, row-major) and, within
    a cell, row-major over its 2x2 window, so every window is s*s consecutive patch rows. Built on
    the host (by the loader workers, data.loader.plan_batch) and moved once; nothing waits on the
    device.
    """

    shapes: Tuple[Tuple[int, int], ...]  # (height, width) px per crop
    patch_size: int
    grid_hw: Tensor  # [N, 2] token rows, cols per image
    first_runs: Tensor  # [P]: the run number of each patch's first pixel row in the buffer
    row_runs: Tensor  # [P]: runs per pixel row of each patch's image (the step to its next row)
    cell_image: Tensor  # [M]: the image of every merged cell
    token_positions: Tensor  # [N + M + splits]: output row of each of cat(CLS, cells, splits)

    @classmethod
    def of(cls, shapes: Sequence[Tuple[int, int]], patch_size: int, conv_stride: int) -> "FlatPlan":
        """shapes: (height, width) px per crop, whole patches and at least one token cell each."""
        p, s = patch_size, conv_stride
        for index, (height, width) in enumerate(shapes):
            if height % p or width % p or min(height, width) < p * s:
                raise ImageInputError(
                    f"image {index}: a {height}x{width} px crop is not whole {p}-px patches of at "
                    f"least one {p * s}-px token cell"
                )
        sides = torch.tensor([tuple(shape) for shape in shapes], dtype=torch.long).view(-1, 2)
        patch_cols = sides[:, 1] // p
        rows, cols = sides[:, 0] // (p * s), patch_cols // s
        cells, num_images = rows * cols, len(shapes)

        def exclusive_cumsum(counts: Tensor) -> Tensor:
            return torch.cumsum(counts, 0) - counts

        # Merged cells, image-major then row-major.
        cell_image = torch.repeat_interleave(torch.arange(num_images), cells)
        local = torch.arange(int(cells.sum())) - exclusive_cumsum(cells)[cell_image]
        cell_cols = cols[cell_image]
        cell_row, cell_col = local // cell_cols, local % cell_cols
        # Each cell's s*s patches, row-major, and the run of each patch's first pixel row. An
        # image holds height * patch_cols runs, patch_cols per pixel row.
        offsets = torch.arange(s)
        patch_row = cell_row[:, None, None] * s + offsets[None, :, None]  # [M, s, 1]
        patch_col = cell_col[:, None, None] * s + offsets[None, None, :]  # [M, 1, s]
        row_runs = patch_cols[cell_image].view(-1, 1, 1)
        image_runs = exclusive_cumsum(sides[:, 0] * patch_cols)[cell_image].view(-1, 1, 1)
        first_runs = image_runs + patch_row * p * row_runs + patch_col  # [M, s, s]
        # Tokens per image: CLS, then every row's cells followed by a split token.
        start = exclusive_cumsum(1 + rows * (cols + 1))
        row_start = start[cell_image] + 1 + cell_row * (cell_cols + 1)
        split_image = torch.repeat_interleave(torch.arange(num_images), rows)
        split_row = torch.arange(int(rows.sum())) - exclusive_cumsum(rows)[split_image]
        split_position = start[split_image] + 1 + split_row * (cols[split_image] + 1) + cols[split_image]
        return cls(
            shapes=tuple((int(h), int(w)) for h, w in shapes),
            patch_size=p,
            grid_hw=torch.stack([rows, cols], dim=1),
            first_runs=first_runs.flatten(),
            row_runs=row_runs.expand(-1, s, s).flatten(),
            cell_image=cell_image,
            token_positions=torch.cat([start, row_start + cell_col, split_position]),
        )

    def pixel_runs(self) -> Tensor:
        """[P, patch]: every patch's pixel rows as run numbers, expanded where the plan lives
        (patch-fold fewer values to build on the host and to copy)."""
        rows = torch.arange(self.patch_size, device=self.first_runs.device)
        return self.first_runs[:, None] + self.row_runs[:, None] * rows

    @property
    def num_splits(self) -> int:
        return self.token_positions.numel() - self.grid_hw.shape[0] - self.cell_image.numel()

    def _map(self, move) -> "FlatPlan":
        """The plan with `move` applied to the index tensors the device reads (not grid_hw)."""
        names = ("first_runs", "row_runs", "cell_image", "token_positions")
        return dataclasses.replace(self, **{name: move(getattr(self, name)) for name in names})

    def pin_memory(self) -> "FlatPlan":
        """Called by the DataLoader's pin-memory thread, so the copy to the GPU can be asynchronous."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device) -> "FlatPlan":
        """The index tensors on `device` (a no-op where they already are); grid_hw stays on the
        host, where the model checks it. A host plan goes to the GPU without stalling the host:
        pinned first unless it already is (the loader's and the TP feed's are when they pin)."""
        device = torch.device(device)

        def move(tensor: Tensor) -> Tensor:
            if device.type == "cuda" and tensor.device.type == "cpu":
                pinned = tensor if tensor.is_pinned() else tensor.pin_memory()
                return pinned.to(device, non_blocking=True)
            return tensor.to(device)

        return self._map(move)


class PatchConv(nn.Conv2d):
    """The PEL's bias-free patch convolution (kernel = stride = patch). It also takes flat patches
    [P, patch * patch * 3] in (dy, dx, rgb) order, as one matmul (the flat path): the weight is then
    read inside the module's own call, where module hooks see it (megatron-core's overlapped
    parameter gather waits in a forward pre-hook for the parameters of the module being called)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            return super().forward(x)
        return F.linear(x, self.weight.permute(0, 2, 3, 1).reshape(self.out_channels, -1))


class PatchEmbeddingLayer(nn.Module):
    """The PEL proper (HF keys `model.vision_tower.*`): pixels → [CLS, rows + split] tokens."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        width = config.hidden_size
        self.patch_size, self.conv_stride = config.patch_size, config.conv_stride
        self.patch_embedding = PatchConv(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
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

    def encode_flat(self, crops: Sequence[Tensor], plan: FlatPlan) -> Tensor:
        """All crops [3, H_i, W_i] at once, whatever their shapes → tokens [ΣT_i, C] in image order."""
        p, s = self.patch_size, self.conv_stride
        width = self.class_embedding.numel()
        # One buffer of every crop's HWC pixels (views for HWC-strided crops) cut into pixel rows.
        pixels = torch.cat([crop.permute(1, 2, 0).reshape(-1) for crop in crops])
        pixels = pixels.to(self.patch_embedding.weight.dtype).view(-1, 3 * p)
        plan = plan.to(pixels.device)
        patches = pixels.index_select(0, plan.pixel_runs().view(-1)).view(-1, p * p * 3)
        windows = self.patch_embedding(patches).view(-1, s * s, width)  # the conv as one matmul: [M, s*s, C]
        merged = self.local_attention.attend(windows.mean(dim=1), windows)
        cls = self.global_attention.forward_segments(
            self.class_embedding, merged, plan.cell_image, len(plan.shapes)
        )
        splits = self.split_embedding.view(1, width).expand(plan.num_splits, width)
        tokens = torch.cat([cls, merged, splits])
        return torch.empty_like(tokens).index_copy(0, plan.token_positions, tokens)

    def encode_by_shape(self, crops: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
        """The parity reference for encode_flat: one encode_group per distinct crop shape.
        Returns (tokens [ΣT_i, C] in image order, grid_hw [N, 2])."""
        by_shape = {}
        for index, crop in enumerate(crops):
            by_shape.setdefault(tuple(crop.shape), []).append(index)
        cell = self.conv_stride * self.patch_size
        grid_hw = torch.tensor([[crop.shape[1] // cell, crop.shape[2] // cell] for crop in crops])
        counts = 1 + grid_hw[:, 0] * (grid_hw[:, 1] + 1)
        starts = torch.cumsum(counts, 0) - counts
        dtype = self.patch_embedding.weight.dtype
        outputs, destinations = [], []
        for ids in by_shape.values():
            tokens = self.encode_group(torch.stack([crops[i] for i in ids]).to(dtype))  # [n, T, C]
            outputs.append(tokens.flatten(0, 1))
            destinations.append((starts[ids][:, None] + torch.arange(tokens.shape[1])).flatten())
        out = torch.cat(outputs)
        order = torch.cat(destinations)
        # A pinned host copy goes to the GPU without stalling the host (a pageable one would not).
        order = order.pin_memory().to(out.device, non_blocking=True) if out.is_cuda else order.to(out.device)
        return torch.empty_like(out).index_copy(0, order, out), grid_hw

    def forward(
        self, images: Union[Tensor, List[Tensor]], plan: Optional[FlatPlan] = None, flat: bool = True
    ) -> Tuple[Tensor, Tensor]:
        """Images → (tokens [ΣT_i, C] concatenated in image order, grid_hw [N, 2] per image).

        images: the reference's masked squares, [N, 4, S, S] or a list of [4, S_i, S_i]; or the
        valid crops themselves, a list of normalised [3, H_i, W_i] (H, W whole token cells), which
        is what the data pipeline supplies — the same tokens without building the padded squares.
        plan: FlatPlan.of the crops' shapes, when built ahead (e.g. by the loader). flat=False runs
        the per-shape reference path instead (and takes no plan).
        """
        if isinstance(images, Tensor) or images[0].shape[0] == 4:
            crops = self._square_crops(images)
        else:
            crops = self._checked_crops(images)
        if not flat:
            return self.encode_by_shape(crops)
        shapes = tuple((crop.shape[1], crop.shape[2]) for crop in crops)
        if plan is None:
            plan = FlatPlan.of(shapes, self.patch_size, self.conv_stride)
        elif plan.shapes != shapes:
            raise ImageInputError(f"the plan is for crops {list(plan.shapes)}, not {list(shapes)}")
        return self.encode_flat(crops, plan), plan.grid_hw

    def _square_crops(self, images: Union[Tensor, List[Tensor]]) -> List[Tensor]:
        """Each masked square's valid region [3, h, w] (a view), in image order."""
        if isinstance(images, Tensor):
            batches = [(list(range(images.shape[0])), images)]
        else:  # differently sized squares: one batch per size
            by_size = {}
            for index, image in enumerate(images):
                by_size.setdefault(tuple(image.shape), []).append(index)
            batches = [(members, torch.stack([images[i] for i in members])) for members in by_size.values()]
        p = self.patch_size
        crops = [None] * sum(len(members) for members, _ in batches)
        for members, batch in batches:
            for pos, (r0, r1, c0, c1) in enumerate(self.valid_patch_boxes(batch, members[0])):
                crops[members[pos]] = batch[pos, :3, r0 * p : r1 * p, c0 * p : c1 * p]
        return crops

    def _checked_crops(self, crops: List[Tensor]) -> List[Tensor]:
        """The crops, once each is known to be [3, H, W] of whole token cells."""
        cell = self.patch_size * self.conv_stride
        for index, crop in enumerate(crops):
            if crop.dim() != 3 or crop.shape[0] != 3:
                raise ImageInputError(f"image {index}: expected a [3, H, W] crop, got {list(crop.shape)}")
            height, width = crop.shape[1:]
            if height % cell or width % cell or min(height, width) < cell:
                raise ImageInputError(
                    f"image {index}: a {height}x{width} px crop is not a whole number of {cell}-px "
                    "token cells"
                )
        return crops


class VisionProjection(nn.Sequential):
    """mlp2x_gelu (HF keys `model.mm_projector.{0,2}`): Linear → GELU → Linear, on every token."""

    def __init__(self, vision_width: int, lm_width: int):
        super().__init__(nn.Linear(vision_width, lm_width), nn.GELU(), nn.Linear(lm_width, lm_width))
