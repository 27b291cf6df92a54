"""Decoder layer spec: Transformer Engine kernels when present, megatron-core's local modules else.

Kernels are chosen here, by spec, never by branches inside model code.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

from megatron_eve.config import ConfigError


def transformer_engine_available() -> bool:
    """TE's PyTorch extension imports and a CUDA device exists to run it."""
    if not torch.cuda.is_available():
        return False
    from megatron.core.models.gpt import gpt_layer_specs

    # megatron-core guards its TE import; calling the TE spec without TE fails obscurely.
    return bool(getattr(gpt_layer_specs, "HAVE_TE", False))


def resolve_transformer_impl(impl: str) -> str:
    """'auto' → 'transformer_engine' when TE and CUDA are usable, 'torch' (torch's fused
    attention kernels) on CUDA without TE, else 'local' (megatron-core's modules)."""
    if impl == "auto":
        if transformer_engine_available():
            return "transformer_engine"
        import torch

        return "torch" if torch.cuda.is_available() else "local"
    if impl == "transformer_engine":
        if not transformer_engine_available():
            raise ConfigError(
                "transformer_impl 'transformer_engine' needs Transformer Engine's PyTorch extension "
                "and a CUDA device; install the [gpu] extra (or use an NGC PyTorch container) or "
                "pass --transformer-impl local"
            )
        return impl
    if impl in ("local", "torch"):
        return impl
    raise ConfigError(f"unknown transformer_impl {impl!r}: choose auto, transformer_engine, torch or local")


class RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm with megatron-core's norm signature, usable under sequence parallelism.

    megatron-core's own torch fallback (WrappedTorchNorm) refuses sequence parallelism; the only
    thing SP needs from a norm is that its weight be marked, so finalize_model_grads all-reduces
    the partial gradients each TP rank computes from its sequence shard.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


class LigerRMSNorm(RMSNorm):
    """RMSNorm through liger-kernel's Triton kernels (CUDA): the inverse RMS in fp32, the normalised
    input cast back to the input's dtype before the weight multiplies it, as HF's LlamaRMSNorm
    computes. The weight's gradient is summed in fp32. The input's gradient goes to a buffer of its
    own, not over the output's gradient (liger's in-place mode; the same bytes move either way): as
    liger-kernel's own megatron-core norm does, since recomputation and CUDA graphs may still hold
    that gradient. Same parameter and state-dict keys as RMSNorm."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        return LigerRMSNormFunction.apply(hidden_states, self.weight, self.eps, 0.0, "llama", False)


def llama_rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm's arithmetic: the inverse RMS in fp32, the normalised input cast back to the
    input's dtype, then times the weight."""
    variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
    return weight * (hidden_states.float() * torch.rsqrt(variance + eps)).to(hidden_states.dtype)


@functools.lru_cache(maxsize=None)
def _compiled_llama_rms_norm():
    # One compiled function serves every norm of the process: its variants (dtypes, grad on / off under
    # recomputation, a decode step's size-1 dimensions) share torch.compile's recompile limit, past which
    # a call runs eagerly (fullgraph=True would make that an error). The casts are kept, as LlamaRMSNorm
    # rounds: the normalised input to the input's dtype before the weight multiplies it.
    return torch.compile(llama_rms_norm, options={"emulate_precision_casts": True})


class CompiledRMSNorm(RMSNorm):
    """RMSNorm as HF's LlamaRMSNorm computes it, compiled by torch.compile: inductor fuses each
    direction into a few kernels (torch's fused backward ran at a third of an H100's bandwidth).
    Any device inductor compiles for; inside a compiled layer (--torch-compile-layers, which keeps
    the casts too) traced as is. Same parameter and state-dict keys as RMSNorm."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return llama_rms_norm(hidden_states, self.weight, self.eps)
        return _compiled_llama_rms_norm()(hidden_states, self.weight, self.eps)


NORMS = {"torch": RMSNorm, "liger": LigerRMSNorm, "compiled": CompiledRMSNorm}


def decoder_block_spec(config, impl: str, vp_stage: Optional[int] = None, attention_backend: str = "auto",
                       rope_fusion: bool = True, norm_kernel: str = "torch"):
    """Block spec of this stage's Llama decoder layers (RMSNorm, SwiGLU, RoPE self-attention)
    and the final norm; attention_backend and rope_fusion choose the torch impl's kernels,
    norm_kernel the torch and local impls' RMSNorm."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if resolve_transformer_impl(impl) == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        layer, final_norm = get_gpt_layer_with_transformer_engine_spec(), TENorm
    else:
        norm = NORMS[norm_kernel]
        layer = get_gpt_layer_local_spec(normalization="RMSNorm")
        layer.submodules = dataclasses.replace(layer.submodules, input_layernorm=norm, pre_mlp_layernorm=norm)
        if resolve_transformer_impl(impl) == "torch":
            from megatron_eve.model.attention import torch_attention

            attention = layer.submodules.self_attention
            attention.submodules = dataclasses.replace(
                attention.submodules, core_attention=torch_attention(attention_backend, rope_fusion)
            )
        final_norm = norm
    layers = get_num_layers_to_build(config, vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * layers, layer_norm=final_norm)
