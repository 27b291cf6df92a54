"""Where the visual tokens of a micro-batch sit, computed identically on every pipeline stage.

The token stream carries IMAGE_TOKEN_INDEX at every visual position: each image's placeholder has
already been expanded into a run of 1 + h(w + 1) positions (the data pipeline knows h, w from the
image size), so sequence lengths and packing boundaries are final before the model runs. The k-th
visual position receives the k-th visual token, images in order (batch-major, then position).

From `grid_hw` alone every stage can also find each image's patch tokens (CLS and split tokens
excluded) and group them into the teacher's grid cells — what the aligner compares with CLIP.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

# The reference's placeholder id for <image> (eve/constants.py).
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100


class VisualLayoutError(ValueError):
    """Visual placeholders and image grids in a micro-batch disagree."""


@dataclass
class VisualLayout:
    """Indices into hidden states laid out [s, b] (megatron-core's order), flattened to s*b."""

    positions: Tensor  # [T] every visual position, image order
    cell_positions: Tensor  # [P] positions of patch tokens that fall in a teacher cell
    cell_index: Tensor  # [P] which aligned cell (0..V-1) each of those belongs to
    cell_image: Tensor  # [V] image of each cell
    num_cells: int  # V
    num_images: int
    pool: int  # patch tokens per cell side (1 at 672 px, 2 at 1344 px)
    grid_hw: Tensor  # [N, 2] the grids it was built from, kept on the host

    @staticmethod
    def build(input_ids: Tensor, grid_hw: Tensor, pool: int) -> "VisualLayout":
        """input_ids [b, s] with IMAGE_TOKEN_INDEX runs; grid_hw [N, 2] token grids in image order.
        Built from host tensors (the loader workers do, see data.loader.BatchPlan) it costs the
        device nothing; built from device tensors it reads counts back to the host."""
        batch = input_ids.shape[0]
        device = input_ids.device
        host_grid = grid_hw.detach().to("cpu", torch.long).view(-1, 2)
        grid_hw = grid_hw.to(device=device, dtype=torch.long).view(-1, 2)
        rows, cols = grid_hw[:, 0], grid_hw[:, 1]
        counts = 1 + rows * (cols + 1)
        sample, pos = torch.nonzero(input_ids == IMAGE_TOKEN_INDEX, as_tuple=True)  # batch-major
        if sample.numel() != int(counts.sum()):
            raise VisualLayoutError(
                f"the micro-batch has {sample.numel()} image-token positions but its "
                f"{grid_hw.shape[0]} images need {int(counts.sum())} (1 + h(w+1) each for grids "
                f"{grid_hw.tolist()})"
            )
        positions = pos * batch + sample

        # Per visual token: its image and its index k inside that image's run.
        image = torch.repeat_interleave(torch.arange(grid_hw.shape[0], device=device), counts)
        k = torch.arange(positions.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[image]
        width = (cols + 1)[image]
        row, col = (k - 1).div(width, rounding_mode="floor"), (k - 1) % width
        # Patch tokens only (not CLS, not split), inside the whole pooled cells (floor, as
        # avg_pool2d does for a grid not divisible by the pool).
        cell_rows, cell_cols = rows // pool, cols // pool
        keep = (k > 0) & (col < cols[image]) & (row < cell_rows[image] * pool) & (
            col < cell_cols[image] * pool
        )
        cells_per_image = cell_rows * cell_cols
        cell_start = torch.cumsum(cells_per_image, 0) - cells_per_image
        cell = (
            cell_start[image] + (row // pool) * cell_cols[image] + col.div(pool, rounding_mode="floor")
        )
        num_cells = int(cells_per_image.sum())
        return VisualLayout(
            positions=positions,
            cell_positions=positions[keep],
            cell_index=cell[keep],
            cell_image=torch.repeat_interleave(
                torch.arange(grid_hw.shape[0], device=device), cells_per_image
            ),
            num_cells=num_cells,
            num_images=grid_hw.shape[0],
            pool=pool,
            grid_hw=host_grid,
        )

    def _map(self, move) -> "VisualLayout":
        moved = {name: move(getattr(self, name)) for name in ("positions", "cell_positions", "cell_index", "cell_image")}
        return dataclasses.replace(self, **moved)

    def to(self, device, non_blocking: bool = False) -> "VisualLayout":
        """The index tensors on `device` (grid_hw stays on the host, where checks read it)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "VisualLayout":
        """Called by the DataLoader's pin-memory thread, so the copy to the GPU can be asynchronous."""
        return self._map(lambda t: t.pin_memory())

    def cells(self, hidden: Tensor, first_row: Optional[int] = None) -> Tensor:
        """hidden [s, b, H] → per-cell mean of its patch tokens [V, H] (the reference pools first).

        With first_row, hidden holds only rows first_row.. of the sequence (a sequence-parallel
        shard): the result holds those rows' share of every cell (zero elsewhere), so the shards'
        results sum to the whole; the indices are masked, not filtered (no device sync). That share
        stays in the accumulation dtype (at least fp32): the caller sums the shards' shares and
        rounds once, as for the whole sequence — rounding each share would round a cell cut by a
        shard border twice."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        if first_row is None:
            picked = flat.index_select(0, self.cell_positions)
            if self.pool == 1:
                # One token per cell; positions are already in cell order.
                return picked
        else:
            local = self.cell_positions - first_row * hidden.shape[1]
            held = (local >= 0) & (local < flat.shape[0])
            picked = flat.index_select(0, local.clamp(0, flat.shape[0] - 1)) * held.unsqueeze(1).to(flat.dtype)
        # Summed in at least fp32 (as the reference's average pooling accumulates): a half-precision
        # index_add would round after every token it adds, in whatever order the device adds them.
        accumulate = torch.promote_types(picked.dtype, torch.float32)
        summed = picked.new_zeros(self.num_cells, flat.shape[-1], dtype=accumulate).index_add(
            0, self.cell_index, picked.to(accumulate))
        mean = summed / (self.pool * self.pool)
        return mean if first_row is not None else mean.to(picked.dtype)

    def splice(self, embeddings: Tensor, visual_tokens: Tensor) -> Tensor:
        """embeddings [s, b, H] with visual_tokens [T, H] written at the visual positions."""
        if visual_tokens.shape[0] != self.positions.numel():
            raise VisualLayoutError(
                f"the vision model produced {visual_tokens.shape[0]} tokens for "
                f"{self.positions.numel()} image-token positions: an image's mask does not match "
                "the grid its placeholder run was sized for"
            )
        s, b, h = embeddings.shape
        flat = embeddings.reshape(s * b, h).index_copy(
            0, self.positions, visual_tokens.to(embeddings.dtype)
        )
        return flat.view(s, b, h)
