"""Visual-token placement, splicing and the aligner's cell pooling vs a per-image reference."""

import pytest
import torch
import torch.nn.functional as F

from megatron_eve.model.visual_layout import IMAGE_TOKEN_INDEX, VisualLayout, VisualLayoutError

GRIDS = [(4, 6), (2, 2), (6, 4)]  # (h, w) per image


def tokens_with_images(grids, layout):
    """layout: per sample, a list of ('t', n) text runs and ('i', k) image k."""
    rows = []
    for sample in layout:
        row = []
        for kind, value in sample:
            row += [7] * value if kind == "t" else [IMAGE_TOKEN_INDEX] * (1 + grids[value][0] * (grids[value][1] + 1))
        rows.append(row)
    length = max(map(len, rows))
    return torch.tensor([r + [0] * (length - len(r)) for r in rows])


# Sample 0 holds images 0 and 1 back to back (packed), sample 1 holds image 2.
LAYOUT = [[("t", 3), ("i", 0), ("i", 1), ("t", 2)], [("t", 5), ("i", 2), ("t", 1)]]


def reference_cells(hidden, input_ids, grids, pool):
    """Per image: take its run, drop CLS, reshape (h, w+1), drop split, avg-pool — eve.md §1."""
    cells, image = [], 0
    for b in range(input_ids.shape[0]):
        positions = torch.nonzero(input_ids[b] == IMAGE_TOKEN_INDEX).flatten().tolist()
        while positions:
            h, w = grids[image]
            run, positions = positions[: 1 + h * (w + 1)], positions[1 + h * (w + 1):]
            feats = hidden[run[1:], b]  # [h(w+1), H]
            grid = feats.T.reshape(-1, h, w + 1)[:, :, :w]
            if pool > 1:
                grid = F.avg_pool2d(grid[None], pool)[0]
            cells.append(grid.flatten(1).T)
            image += 1
    return torch.cat(cells)


@pytest.mark.parametrize("pool", [1, 2])
def test_cells_match_reference(pool):
    input_ids = tokens_with_images(GRIDS, LAYOUT)
    hidden = torch.randn(input_ids.shape[1], input_ids.shape[0], 5)  # [s, b, H]
    layout = VisualLayout.build(input_ids, torch.tensor(GRIDS), pool)
    expected = reference_cells(hidden, input_ids, GRIDS, pool)
    assert layout.num_cells == expected.shape[0]
    torch.testing.assert_close(layout.cells(hidden), expected)
    per_image = [(h // pool) * (w // pool) for h, w in GRIDS]
    assert layout.cell_image.tolist() == sum(([i] * n for i, n in enumerate(per_image)), [])


@pytest.mark.parametrize("pool", [1, 2])
@pytest.mark.parametrize("shards", [2, 3])
def test_cells_of_sequence_shards_sum_to_the_whole(pool, shards):
    """Sequence parallelism: each rank pools the cell tokens of its rows; the shards' parts sum to
    the cells of the whole sequence (shard borders cut through images and through 2x2 cells)."""
    input_ids = tokens_with_images(GRIDS, LAYOUT)
    length = -(-input_ids.shape[1] // shards) * shards
    input_ids = F.pad(input_ids, (0, length - input_ids.shape[1]))
    hidden = torch.randn(length, input_ids.shape[0], 5, dtype=torch.float64)
    layout = VisualLayout.build(input_ids, torch.tensor(GRIDS), pool)
    rows = length // shards
    parts = [layout.cells(hidden[r * rows:(r + 1) * rows], first_row=r * rows) for r in range(shards)]
    assert all(p.abs().sum() > 0 for p in parts)  # every shard holds part of some cell
    torch.testing.assert_close(sum(parts), reference_cells(hidden, input_ids, GRIDS, pool))


def test_splice_writes_tokens_in_image_order():
    input_ids = tokens_with_images(GRIDS, LAYOUT)
    s, b = input_ids.shape[1], input_ids.shape[0]
    layout = VisualLayout.build(input_ids, torch.tensor(GRIDS), 1)
    visual = torch.arange(layout.positions.numel(), dtype=torch.float)[:, None].expand(-1, 3)
    out = layout.splice(torch.full((s, b, 3), -1.0), visual)
    # Sample 0 receives images 0 and 1 (tokens 0..), sample 1 image 2, text stays untouched.
    n0 = sum(1 + h * (w + 1) for h, w in GRIDS[:2])
    assert out[3 : 3 + n0, 0, 0].tolist() == list(range(n0))
    assert out[5 : 5 + 1 + 6 * 5, 1, 0].tolist() == list(range(n0, n0 + 31))
    assert (out[:, :, 0][input_ids.T != IMAGE_TOKEN_INDEX] == -1).all()


def test_count_mismatch_is_reported():
    input_ids = tokens_with_images(GRIDS, LAYOUT)
    with pytest.raises(VisualLayoutError, match="image-token positions but its 3 images need"):
        VisualLayout.build(input_ids, torch.tensor([(4, 6), (2, 2), (6, 5)]), 1)
    layout = VisualLayout.build(input_ids, torch.tensor(GRIDS), 1)
    with pytest.raises(VisualLayoutError, match="vision model produced 3 tokens"):
        layout.splice(torch.zeros(input_ids.shape[1], 2, 4), torch.zeros(3, 4))
