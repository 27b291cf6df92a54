"""The aligner's fusion and loss against a direct transcription of eve.md §1."""

import torch
import torch.nn.functional as F

from megatron_eve.config import AlignerConfig
from megatron_eve.model.aligner import PatchAligner, alignment_loss


def test_taps_follow_every_num_layers_over_8():
    assert AlignerConfig().taps(32) == [32, 28, 24, 20, 16, 12, 8, 4, 0]
    assert AlignerConfig().taps(8) == [8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert AlignerConfig(tap_interval=2).taps(4) == [4, 2, 0]


def test_fusion_matches_reference_transcription():
    torch.manual_seed(0)
    config = AlignerConfig(hidden_size=16, num_heads=4)
    aligner = PatchAligner(24, config, range(9), with_head=True)
    hidden = [torch.randn(10, 24) for _ in range(9)]  # hidden[j] = tap j's pooled states
    # Reference: stack norm_layer[j](tap j) → q = slot 0, kv = slots 1..8 (same tensor);
    # 4 heads, scale C^-0.5, softmax over taps; input_layer(tap 0) + output_layer(fused).
    stacked = torch.stack([aligner.norm_layer[str(j)](hidden[j]) for j in range(9)], dim=1)
    q = stacked[:, :1].reshape(10, 1, 4, 4).transpose(1, 2)
    kv = stacked[:, 1:].reshape(10, 8, 4, 4).transpose(1, 2)
    attn = (q * 16**-0.5 * kv).sum(-1).softmax(-1)
    fused = (attn[..., None] * kv).sum(-2).reshape(10, 16)
    expected = aligner.input_layer(hidden[0]) + aligner.output_layer(fused)

    keys = torch.stack([aligner.project(j, hidden[j]) for j in range(1, 9)], dim=1)
    got = aligner.predict(hidden[0], aligner.project(0, hidden[0]), keys)
    torch.testing.assert_close(got, expected)
    # The fusion attends over a set of taps: their order does not matter.
    torch.testing.assert_close(aligner.predict(hidden[0], aligner.project(0, hidden[0]), keys.flip(1)), expected)


def test_stage_holds_only_its_taps():
    aligner = PatchAligner(24, AlignerConfig(hidden_size=16), [3, 4], with_head=False)
    assert sorted(aligner.norm_layer.keys()) == ["3", "4"]
    assert not hasattr(aligner, "input_layer")
    assert sorted(k for k in aligner.state_dict()) == [
        "norm_layer.3.0.bias", "norm_layer.3.0.weight", "norm_layer.3.1.weight",
        "norm_layer.4.0.bias", "norm_layer.4.0.weight", "norm_layer.4.1.weight",
    ]


def test_loss_is_mean_over_images_of_one_minus_mean_cosine():
    torch.manual_seed(0)
    pred, target = torch.randn(7, 8), torch.randn(7, 8)
    image = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    target[5:] = 3 * pred[5:]  # image 2 is perfectly aligned (cosine 1, scale-free)
    total, count = alignment_loss(pred, target, image, 4)  # image 3 has no cells
    cos = F.cosine_similarity(pred, target, dim=-1)
    expected = (1 - cos[:3].mean()) + (1 - cos[3:5].mean()) + 0.0
    torch.testing.assert_close(total, expected)
    assert float(count) == 3


def test_eve_7b_component_sizes_match_the_reference():
    """eve.md §1: PEL ≈ 9M, projector ≈ 21M, PAL ≈ 43M on top of Vicuna-7B (6.74B)."""
    from megatron_eve.config import get_preset
    from megatron_eve.model.size import parameter_counts

    counts = parameter_counts(get_preset("eve-7b"))
    assert round(counts["patch_embedding"] / 1e6) == 9
    assert round(counts["projector"] / 1e6) == 21
    assert round(counts["aligner"] / 1e6) == 43
    llm = counts["embedding"] + counts["decoder"] + counts["output_layer"]
    assert round(llm / 1e9, 2) == 6.74


def _bf16_shards():
    """bf16 hidden states of the visual-layout test batch padded to 42 rows, and the two
    sequence-parallel shards of TP=2 (rows 0..20, 21..41): the border cuts 2x2 cells."""
    from megatron_eve.model.visual_layout import VisualLayout
    from tests.test_visual_layout import GRIDS, LAYOUT, tokens_with_images

    input_ids = F.pad(tokens_with_images(GRIDS, LAYOUT), (0, 1))
    layout = VisualLayout.build(input_ids, torch.tensor(GRIDS), 2)
    half = input_ids.shape[1] // 2
    below = layout.cell_positions < half * input_ids.shape[0]
    assert set(layout.cell_index[below].tolist()) & set(layout.cell_index[~below].tolist())
    torch.manual_seed(0)
    hidden = torch.randn(input_ids.shape[1], input_ids.shape[0], 1024).to(torch.bfloat16)
    return layout, hidden, half


def test_bf16_shard_cells_are_summed_in_fp32_and_rounded_once():
    """A shard's share of the cells stays fp32, so the shards' sum rounded once to bf16 is the
    unsharded cells bit for bit (rounding each share first rounds a cut cell twice)."""
    layout, hidden, half = _bf16_shards()
    parts = [layout.cells(hidden[:half], first_row=0), layout.cells(hidden[half:], first_row=half)]
    assert all(p.dtype == torch.float32 for p in parts)
    whole = layout.cells(hidden)
    assert whole.dtype == torch.bfloat16
    assert torch.equal((parts[0] + parts[1]).to(torch.bfloat16), whole)


def test_sequence_parallel_cells_reduce_in_fp32_and_match_unsharded(monkeypatch):
    """EVEModel._cells under SP on TP rank 1 of 2 (the all-reduce stood in for by adding rank 0's
    share, backward the identity as megatron-core's): the all-reduce gets fp32, the cells come back
    bf16 equal to the unsharded ones, and the shard's gradient is bf16 and the unsharded one's rows."""
    from types import SimpleNamespace

    from megatron.core import tensor_parallel

    from megatron_eve.model.eve import EVEModel

    layout, hidden, half = _bf16_shards()
    other = layout.cells(hidden[:half], first_row=0).detach()

    def all_reduce(partial, group=None):
        assert partial.dtype == torch.float32
        return partial + other

    monkeypatch.setattr(tensor_parallel, "reduce_from_tensor_model_parallel_region", all_reduce)
    model = SimpleNamespace(config=SimpleNamespace(sequence_parallel=True), tp_group=SimpleNamespace(rank=lambda: 1))
    shard = hidden[half:].clone().requires_grad_()
    cells = EVEModel._cells(model, layout, shard)
    whole_hidden = hidden.clone().requires_grad_()
    whole = layout.cells(whole_hidden)
    assert cells.dtype == torch.bfloat16 and torch.equal(cells, whole)

    grad = torch.randn(whole.shape).to(torch.bfloat16)
    cells.backward(grad)
    whole.backward(grad)
    assert shard.grad.dtype == torch.bfloat16
    assert torch.equal(shard.grad, whole_hidden.grad[half:])
