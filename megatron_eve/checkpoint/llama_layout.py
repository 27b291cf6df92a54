"""Weight layouts of the Llama decoder: Hugging Face's (separate q/k/v, gate/up) and
megatron-core's (fused QKV grouped per query group, fused [gate; up] fc1).

These are the tensor-level rules the checkpoint converters build on.
"""

from __future__ import annotations

from typing import Dict, Tuple

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


def hf_llama_to_local(hf: Dict[str, Tensor], lm: LanguageModelConfig, padded_vocab: int) -> Dict[str, Tensor]:
    """An HF LlamaForCausalLM state dict → EVEModel's decoder / embedding / output parameters
    (megatron-core local spec, TP=1, PP=1). Vocabulary rows beyond the HF vocab are zero."""

    def pad_vocab(weight: Tensor) -> Tensor:
        return torch.cat([weight, weight.new_zeros(padded_vocab - weight.shape[0], weight.shape[1])])

    out = {
        "embedding.word_embeddings.weight": pad_vocab(hf["model.embed_tokens.weight"]),
        "output_layer.weight": pad_vocab(hf["lm_head.weight"]),
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
    }
    for i in range(lm.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[dst + "input_layernorm.weight"] = hf[src + "input_layernorm.weight"]
        out[dst + "self_attention.linear_qkv.weight"] = fuse_qkv(
            hf[src + "self_attn.q_proj.weight"], hf[src + "self_attn.k_proj.weight"],
            hf[src + "self_attn.v_proj.weight"], lm,
        )
        out[dst + "self_attention.linear_proj.weight"] = hf[src + "self_attn.o_proj.weight"]
        out[dst + "pre_mlp_layernorm.weight"] = hf[src + "post_attention_layernorm.weight"]
        # megatron's SwiGLU applies the activation to the first half of fc1's output.
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]]
        )
        out[dst + "mlp.linear_fc2.weight"] = hf[src + "mlp.down_proj.weight"]
    return out
