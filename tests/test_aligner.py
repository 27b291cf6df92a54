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
