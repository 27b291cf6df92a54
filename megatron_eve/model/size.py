"""Parameter counts and FLOPs-relevant sizes of an EVE configuration, without building it."""

from __future__ import annotations

from typing import Dict

from megatron_eve.config import EVEModelConfig


def parameter_counts(model: EVEModelConfig, padded_vocab: int = 0) -> Dict[str, int]:
    """Trainable parameters per component (the CLIP teacher is frozen and counted apart)."""
    lm, vision, aligner = model.language, model.vision, model.aligner
    h, f, c = lm.hidden_size, lm.ffn_hidden_size, vision.hidden_size
    vocab = padded_vocab or lm.vocab_size
    head_dim = h // lm.num_attention_heads
    qkv = h * (h + 2 * lm.num_query_groups * head_dim)
    layer = qkv + h * h + 3 * h * f + 2 * h  # attention, SwiGLU MLP, two RMSNorms
    norm_linear_params = lambda width, out: 2 * width + width * out  # noqa: E731 - LayerNorm + Linear
    pel_attention = norm_linear_params(c, c) + norm_linear_params(c, 2 * c) + c * c + c
    counts = {
        "embedding": vocab * h,
        "decoder": lm.num_layers * layer + h,
        "output_layer": vocab * h,
        "patch_embedding": 3 * vision.patch_size**2 * c + 2 * c + 2 * pel_attention,
        "projector": c * h + h + h * h + h,
    }
    if aligner.enabled:
        a = aligner.hidden_size
        taps = len(aligner.taps(lm.num_layers))
        counts["aligner"] = taps * norm_linear_params(h, a) + h * a + a + a * a + a
    counts["total"] = sum(counts.values())
    return counts
