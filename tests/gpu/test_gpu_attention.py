"""Every packed-attention kernel present (varlen_attn, flash-attn varlen, FlexAttention, SDPA with the
block mask) against a per-sample SDPA reference in fp32, on packed bf16 THD batches: outputs and
gradients of q, k and v.

Tolerances: bf16 inputs, fp32 reference. Outputs: max |error| <= 2e-2 (values are convex
combinations of unit-normal v rows, so |out| < ~4). Gradients: ||error|| / ||reference|| <= 2e-2
per tensor (bf16 has an 8-bit mantissa: ~4e-3 per rounding, a few roundings deep).
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megatron_eve.model.attention import TorchAttention, available_backends

pytestmark = pytest.mark.gpu

# Sample boundaries of one packed row: uneven lengths, a 1-token sample, a long one.
CU_SEQLENS = [0, 37, 38, 165, 230, 512]


def reference(q, k, v, cu, scale):
    """Per-sample causal SDPA in fp32: [t, heads, hd] → [t, heads, hd]."""
    groups = q.shape[1] // k.shape[1]
    out = []
    for start, end in zip(cu[:-1], cu[1:]):
        qs, ks, vs = (x[start:end].float().transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(out)


def packed_attention(backend: str, head_dim: int):
    """A TorchAttention bound to `backend`, without megatron-core's process groups: only what its
    THD path reads (the backend, softmax scale and dropout) is set."""
    module = TorchAttention.__new__(TorchAttention)
    torch.nn.Module.__init__(module)
    module.backend = backend
    module.softmax_scale = 1.0 / math.sqrt(head_dim)
    module.config = SimpleNamespace(attention_dropout=0.0)
    return module


@pytest.mark.parametrize("heads, groups", [(8, 8), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("backend", ["varlen", "flash", "flex", "sdpa"])
def test_packed_kernel_matches_per_sample_reference(device, backend, heads, groups):
    from megatron.core.packed_seq_params import PackedSeqParams

    if backend not in available_backends():
        pytest.skip(f"{backend} is not available here")
    head_dim, total = 64, CU_SEQLENS[-1]
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(total, h, head_dim, generator=gen).to(device, torch.bfloat16).requires_grad_()
               for h in (heads, groups, groups))
    cu = torch.tensor(CU_SEQLENS, dtype=torch.int32, device=device)
    longest = max(b - a for a, b in zip(CU_SEQLENS[:-1], CU_SEQLENS[1:]))
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=longest, max_seqlen_kv=longest)
    out = packed_attention(backend, head_dim)(q, k, v, None, packed_seq_params=params)
    assert out.shape == (total, heads, head_dim) and out.dtype == torch.bfloat16
    scale = 1.0 / math.sqrt(head_dim)
    ref_inputs = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = reference(*ref_inputs, CU_SEQLENS, scale)
    assert float((out.float() - ref).abs().max()) <= 2e-2

    upstream = torch.randn(total, heads, head_dim, generator=gen).to(device)
    out.backward(upstream.to(out.dtype))
    ref.backward(upstream)
    for name, ours, theirs in zip("qkv", (q, k, v), ref_inputs):
        error = float((ours.grad.float() - theirs.grad).norm() / theirs.grad.norm())
        assert error <= 2e-2, (name, error)
