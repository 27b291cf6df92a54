"""Weight layouts of the Llama decoder: Hugging Face's (separate q/k/v, gate/up) and
megatron-core's (fused QKV grouped per query group, fused [gate; up] fc1).

These are the tensor-level rules the checkpoint converters build on: LAYER_RULES and OUTER_KEYS
are the one table both directions (hf_eve), the shape checks and the local-spec loader read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch
from torch import Tensor

from megatron_eve.config import LanguageModelConfig


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, lm: LanguageModelConfig) -> Tensor:
    """HF q [nh*d, H], k/v [ng*d, H] → megatron linear_qkv [(nh + 2ng)*d, H]: for each query
    group, its query heads, then its key head, then its value head."""
    groups, d = lm.num_query_groups, lm.hidden_size // lm.num_attention_heads
    per_group = lm.num_attention_heads // groups
    q = q.view(groups, per_group * d, -1)
    k, v = k.view(groups, d, -1), v.view(groups, d, -1)
    return torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])


def split_qkv(qkv: Tensor, lm: LanguageModelConfig) -> Tuple[Tensor, Tensor, Tensor]:
    """Inverse of fuse_qkv."""
    groups, d = lm.num_query_groups, lm.hidden_size // lm.num_attention_heads
    per_group = lm.num_attention_heads // groups
    grouped = qkv.view(groups, (per_group + 2) * d, -1)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return q.reshape(-1, qkv.shape[-1]), k.reshape(-1, qkv.shape[-1]), v.reshape(-1, qkv.shape[-1])


@dataclass(frozen=True)
class LayerRule:
    """One megatron decoder-layer tensor and the HF per-layer tensors it is made of."""

    megatron: str  # under `decoder.layers.` in dist checkpoints (stacked over layers)
    local: str  # under `decoder.layers.{i}.` in the local spec's state dict
    hf: Tuple[str, ...]  # under `model.layers.{i}.`
    join: Callable[..., Tensor]  # (lm, *hf tensors) → the megatron tensor
    split: Callable[..., Tuple[Tensor, ...]]  # (lm, megatron tensor) → the hf tensors
    shapes: Callable[[LanguageModelConfig], Tuple[Tuple[int, ...], ...]]  # of the hf tensors


def _same(lm, tensor):
    return tensor


def _alone(lm, tensor):
    return (tensor,)


def _dims(lm: LanguageModelConfig):
    return lm.hidden_size, lm.ffn_hidden_size, lm.hidden_size // lm.num_attention_heads


# The single source of the Llama decoder's key and layout mapping: both conversion directions, the
# key and shape checks and the local-spec loader below derive from it.
LAYER_RULES: Tuple[LayerRule, ...] = (
    LayerRule("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight", ("input_layernorm.weight",),
              _same, _alone, lambda lm: ((lm.hidden_size,),)),
    LayerRule("self_attention.linear_qkv.weight", "self_attention.linear_qkv.weight",
              ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
              lambda lm, q, k, v: fuse_qkv(q, k, v, lm), lambda lm, qkv: split_qkv(qkv, lm),
              lambda lm: ((lm.num_attention_heads * _dims(lm)[2], lm.hidden_size),
                          (lm.num_query_groups * _dims(lm)[2], lm.hidden_size),
                          (lm.num_query_groups * _dims(lm)[2], lm.hidden_size))),
    LayerRule("self_attention.linear_proj.weight", "self_attention.linear_proj.weight", ("self_attn.o_proj.weight",),
              _same, _alone, lambda lm: ((lm.hidden_size, lm.hidden_size),)),
    LayerRule("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",),
              _same, _alone, lambda lm: ((lm.hidden_size,),)),
    # megatron's SwiGLU applies the activation to the first half of fc1's output: [gate; up].
    LayerRule("mlp.linear_fc1.weight", "mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
              lambda lm, gate, up: torch.cat([gate, up]), lambda lm, fc1: tuple(fc1.chunk(2)),
              lambda lm: ((lm.ffn_hidden_size, lm.hidden_size),) * 2),
    LayerRule("mlp.linear_fc2.weight", "mlp.linear_fc2.weight", ("mlp.down_proj.weight",),
              _same, _alone, lambda lm: ((lm.hidden_size, lm.ffn_hidden_size),)),
)

# Tensors outside the layers: (megatron key, HF key, rows padded to the padded vocabulary).
OUTER_KEYS: Tuple[Tuple[str, str, bool], ...] = (
    ("embedding.word_embeddings.weight", "model.embed_tokens.weight", True),
    ("decoder.final_layernorm.weight", "model.norm.weight", False),
    ("output_layer.weight", "lm_head.weight", True),
)


def hf_layer_shapes(lm: LanguageModelConfig) -> Dict[str, Tuple[int, ...]]:
    """HF per-layer suffix → shape, for this language model."""
    return {name: shape for rule in LAYER_RULES for name, shape in zip(rule.hf, rule.shapes(lm))}


def pad_vocab(weight: Tensor, padded_vocab: int) -> Tensor:
    """Vocabulary rows beyond the HF vocab (Megatron's TP padding) are zero."""
    return torch.cat([weight, weight.new_zeros(padded_vocab - weight.shape[0], weight.shape[1])])


def hf_llama_to_local(hf: Dict[str, Tensor], lm: LanguageModelConfig, padded_vocab: int) -> Dict[str, Tensor]:
    """An HF LlamaForCausalLM state dict → EVEModel's decoder / embedding / output parameters
    (megatron-core local spec, TP=1, PP=1)."""
    out = {dst: pad_vocab(hf[src], padded_vocab) if padded else hf[src] for dst, src, padded in OUTER_KEYS}
    for i in range(lm.num_layers):
        for rule in LAYER_RULES:
            out[f"decoder.layers.{i}.{rule.local}"] = rule.join(lm, *(hf[f"model.layers.{i}.{s}"] for s in rule.hf))
    return out
