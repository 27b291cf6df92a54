"""Core attention on torch's own fused kernels, as a megatron-core core-attention module.

megatron-core's local DotProductAttention materialises the full score matrix (and refuses packed
THD batches); Transformer Engine is the usual way out, but is not always installed. This module
keeps the local spec's projections and swaps only the core attention:

  THD (packed samples, PackedSeqParams):
    "varlen"  torch.nn.attention.varlen.varlen_attn — the flash-attention varlen kernel (CUDA)
    "aten-flash" the same kernels called directly (aten's _flash_attention_forward / _backward in an
              autograd function of ours), without varlen_attn's custom-op wrapper and its host work,
              which left the GPU idle before each layer's attention on an H100 (opt-in until measured)
    "flash"   flash_attn.flash_attn_varlen_func when the flash-attn package is installed (CUDA)
    "flex"    FlexAttention with a document-causal block mask, compiled (CUDA)
    "sdpa"    scaled_dot_product_attention with the block-diagonal mask made from cu_seqlens
              (any device; the CPU path of the packed code)
  [s, b] batches: scaled_dot_product_attention (flash / memory-efficient / math kernels).

With THD, RoPE is applied here over the packed row's flat positions (see carry_flat_rotary), its
cos / sin tables made once per micro-batch, in one compiled kernel per tensor on CUDA (rope_fusion).

"auto" takes the first of varlen, flash, flex that works here for the tensors' dtype (the varlen
and flash kernels take fp16 / bf16 only: an fp32 model gets flex on CUDA, else sdpa).
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.dot_product_attention import DotProductAttention

from megatron_eve.config import ConfigError

BACKENDS = ("auto", "varlen", "flash", "flex", "sdpa", "aten-flash")
HALF_ONLY = ("varlen", "flash", "aten-flash")  # flash-attention kernels: fp16 / bf16 tensors only


@functools.lru_cache(maxsize=None)
def available_backends() -> tuple:
    found = []
    if torch.cuda.is_available():
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401

            found.append("varlen")
        except ImportError:
            pass
        try:
            import flash_attn  # noqa: F401

            found.append("flash")
        except ImportError:
            pass
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

            found.append("flex")
        except ImportError:
            pass
    found.append("sdpa")
    if torch.cuda.is_available() and hasattr(torch.ops.aten, "_flash_attention_backward"):
        found.append("aten-flash")  # after sdpa: "auto" does not take it
    return tuple(found)


def supports_dtype(backend: str, dtype: torch.dtype) -> bool:
    return backend not in HALF_ONLY or dtype in (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def resolve_backend(name: str, dtype: torch.dtype = torch.bfloat16) -> str:
    """The kernel `name` stands for here, for tensors of `dtype`."""
    if name == "auto":
        return next(b for b in available_backends() if supports_dtype(b, dtype))
    if name not in available_backends():
        raise ValueError(f"attention backend {name!r} is not available here (available: "
                         f"{', '.join(available_backends())})")
    if not supports_dtype(name, dtype):
        raise ValueError(f"attention backend {name!r} takes fp16 / bf16 tensors, not {dtype}: train with "
                         "--bf16, or choose --attention-backend flex or sdpa")
    return name


@functools.lru_cache(maxsize=None)
def varlen_call_options() -> dict:
    """How this torch's varlen_attn is asked for causal attention (and whether it repeats K/V
    itself), read once from its signature: releases spell causal as a flash-style window (-1, 0)
    or as is_causal=True. A TypeError at call time then means a real error, never a spelling."""
    from torch.nn.attention.varlen import varlen_attn

    parameters = inspect.signature(varlen_attn).parameters
    if "window_size" in parameters:
        options = {"window_size": (-1, 0)}
    elif "is_causal" in parameters:
        options = {"is_causal": True}
    else:
        raise RuntimeError("torch.nn.attention.varlen.varlen_attn takes neither window_size nor is_causal: "
                           "this torch release is not supported; use --attention-backend flex or sdpa")
    return {"causal": options, "native_gqa": "enable_gqa" in parameters}


def block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total, total] bool, True where a query may attend: same sample and not in the future."""
    segment = torch.zeros(total, dtype=torch.long, device=cu_seqlens.device)
    segment[cu_seqlens[1:-1].long()] = 1
    segment = segment.cumsum(0)
    position = torch.arange(total, device=cu_seqlens.device)
    return (segment[:, None] == segment[None, :]) & (position[None, :] <= position[:, None])


@functools.lru_cache(maxsize=8)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


class TorchAttention(DotProductAttention):
    """Drop-in for DotProductAttention (same construction); the kernel is chosen by `backend`,
    RoPE's (THD) by `rope_fusion`."""

    backend = "auto"
    rope_fusion = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The kernel for the parameters' dtype, chosen here, outside any compiled region: choosing imports
        # optional packages and reads varlen_attn's signature, which split a compiled layer's graph
        # (--torch-compile-layers) in two on CUDA (seen on an H100). Another dtype, or a backend that
        # cannot serve this one, is resolved at the call (and refused there with its message).
        dtype = self.config.params_dtype
        try:
            self._kernel = (dtype, *self._choose_kernel(dtype))
        except (ValueError, RuntimeError):
            self._kernel = None

    def _choose_kernel(self, dtype: torch.dtype):
        """(backend, varlen_attn's call options or None) for tensors of `dtype`."""
        backend = resolve_backend(self.backend, dtype)
        return backend, varlen_call_options() if backend == "varlen" else None

    def _kernel_for(self, dtype: torch.dtype):
        """The kernel chosen at construction when `dtype` is the parameters', else chosen now."""
        if self._kernel is not None and self._kernel[0] == dtype:
            return self._kernel[1:]
        return self._choose_kernel(dtype)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [sq, b, np, hn]; key / value [sk, b, ng, hn] → context [sq, b, np * hn]. With THD
        megatron-core passes [t, np, hn] (batch squeezed) and takes [t, np, hn] back."""
        dropout = self.config.attention_dropout if self.training else 0.0
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            rotary = getattr(packed_seq_params, "_eve_flat_rotary", None)
            if rotary is not None:
                query, key = rotary.apply(query, self.rope_fusion), rotary.apply(key, self.rope_fusion)
            return self._packed(query, key, value, packed_seq_params, dropout)
        sq, batch, heads, head_dim = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        causal = attention_mask is None and (attn_mask_type is None or attn_mask_type.name == "causal") and sq == k.shape[2]
        mask = None if attention_mask is None else ~attention_mask  # megatron: True = masked
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                             scale=self.softmax_scale, enable_gqa=k.shape[1] != heads)
        return out.permute(2, 0, 1, 3).reshape(sq, batch, heads * head_dim)

    def _packed(self, q, k, v, params, dropout: float) -> torch.Tensor:
        """THD tensors [t, heads, hn] of samples delimited by cu_seqlens."""
        backend, options = self._kernel_for(q.dtype)
        cu_q, cu_k = params.cu_seqlens_q, params.cu_seqlens_kv
        if backend == "varlen":
            from torch.nn.attention.varlen import varlen_attn

            groups = q.shape[1] // k.shape[1]
            extra = dict(options["causal"])
            if groups > 1 and options["native_gqa"]:
                extra["enable_gqa"] = True
            elif groups > 1:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            return varlen_attn(q, k, v, cu_q, cu_k, params.max_seqlen_q, params.max_seqlen_kv,
                               scale=self.softmax_scale, **extra)
        if backend == "aten-flash":
            return _CausalFlashVarlen.apply(q, k, v, cu_q, cu_k, params.max_seqlen_q, params.max_seqlen_kv,
                                            self.softmax_scale)
        if backend == "flash":
            from flash_attn import flash_attn_varlen_func

            return flash_attn_varlen_func(q, k, v, cu_q, cu_k, params.max_seqlen_q, params.max_seqlen_kv,
                                          dropout_p=dropout, softmax_scale=self.softmax_scale, causal=True)
        total = q.shape[0]
        if backend == "flex":
            block = document_block_mask(params, total, q.device)
            out = _compiled_flex()(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                   block_mask=block, scale=self.softmax_scale,
                                   enable_gqa=k.shape[1] != q.shape[1])
            return out[0].transpose(0, 1)
        mask = block_causal_mask(cu_q, total)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                             attn_mask=mask, dropout_p=dropout, scale=self.softmax_scale,
                                             enable_gqa=k.shape[1] != q.shape[1])
        return out[0].transpose(0, 1)


class _CausalFlashVarlen(torch.autograd.Function):
    """Causal attention over THD samples by aten's flash kernels, called as varlen_attn calls them
    (no dropout; grouped K / V heads served by the kernel), with none of its custom-op dispatch."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: Optional[float]):
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, rng_state, unused)
        ctx.max_q, ctx.max_k, ctx.scale = max_q, max_k, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_q, cu_k, rng_state, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, cu_q, cu_k, ctx.max_q, ctx.max_k, 0.0, True, rng_state,
            unused, scale=ctx.scale)
        return dq, dk, dv, None, None, None, None, None


def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as megatron-core's unfused path computes it (rotate-half, non-interleaved), in t's
    dtype: t [tokens, heads, d], cos / sin [tokens, 1, d]."""
    x1, x2 = torch.chunk(t, 2, dim=-1)
    return t * cos + torch.cat((-x2, x1), dim=-1) * sin


@functools.lru_cache(maxsize=None)
def _compiled_rotate():
    # One fused kernel forward and one backward instead of about six elementwise passes over
    # q and k each (negate, cat, two products, sum, and megatron-core's final cat). Not fullgraph: its
    # variants (q / k head counts, grad on / off under recomputation, row lengths) share one recompile
    # limit, past which a call runs eagerly instead of raising.
    return torch.compile(rotate)


class FlatRotary:
    """RoPE over a packed row's flat positions: the frequency table [t, 1, 1, d] and its cos / sin in
    the activations' dtype, made once (for `dtype` when given, else on first use) and reused by every
    layer (and recomputation) of the micro-batch. Made up front, no layer fills the cache: a compiled
    layer (--torch-compile-layers) would otherwise recompile when it does."""

    def __init__(self, freqs: torch.Tensor, dtype: Optional[torch.dtype] = None):
        self.freqs = freqs
        self._tables = {}
        if dtype is not None:
            self._tables[dtype] = self._made(dtype)

    def _made(self, dtype: torch.dtype):
        freqs = self.freqs[:, 0]
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    def apply(self, t: torch.Tensor, fused: bool) -> torch.Tensor:
        tables = self._tables.get(t.dtype)
        if tables is None:
            tables = self._tables[t.dtype] = self._made(t.dtype)
        cos, sin = (table[: t.shape[0]] for table in tables)
        if not (fused and t.is_cuda) or torch.compiler.is_compiling():  # (a compiled layer fuses it itself)
            return rotate(t, cos, sin)
        try:
            return _compiled_rotate()(t, cos, sin)
        except torch._dynamo.exc.TorchDynamoException as error:  # e.g. no working Triton
            raise ConfigError(f"RoPE fusion does not compile here ({str(error).splitlines()[0][:200]}): "
                              "run with --no-rope-fusion") from error


def carry_flat_rotary(params, rotary: torch.Tensor, dtype: Optional[torch.dtype] = None) -> None:
    """Hands TorchAttention the RoPE table of the packed row's flat positions [t, 1, 1, d] (the
    decoder then gets rotary_pos_emb=None). RoPE is relative and packed samples never attend across
    their boundaries, so rotating by flat positions equals restarting positions at every sample,
    without megatron-core's per-sample THD loop (a .tolist(), an .item() and one launch per sample,
    for q and k in every layer). `dtype`: the activations', whose cos / sin tables are made now."""
    params._eve_flat_rotary = FlatRotary(rotary, dtype)


def document_block_mask(params, total: int, device):
    """FlexAttention's document-causal block mask of a packed micro-batch, built once and carried
    on its PackedSeqParams: every layer (and every recomputation) of the micro-batch reuses it."""
    cached = getattr(params, "_eve_block_mask", None)
    if cached is not None and cached[0] is params.cu_seqlens_q and cached[1] == total:
        return cached[2]
    from torch.nn.attention.flex_attention import create_block_mask

    segment = torch.zeros(total, dtype=torch.long, device=device)
    segment[params.cu_seqlens_q[1:-1].long()] = 1
    segment = segment.cumsum(0)

    def document_causal(b, h, q_idx, kv_idx):
        return (segment[q_idx] == segment[kv_idx]) & (kv_idx <= q_idx)

    # Compiled on CUDA: the mask is made block by block instead of as a dense t x t tensor.
    block = create_block_mask(document_causal, None, None, total, total, device=device,
                              _compile=torch.device(device).type == "cuda")
    params._eve_block_mask = (params.cu_seqlens_q, total, block)
    return block


def torch_attention(backend: str, rope_fusion: bool = True):
    """A TorchAttention subclass bound to one backend and RoPE path (specs take classes)."""
    return type(f"TorchAttention_{backend}", (TorchAttention,), {"backend": backend, "rope_fusion": rope_fusion})
