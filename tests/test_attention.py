"""Torch-kernel core attention: backend choice and the packed mask."""

import pytest
import torch

from megatron_eve.model.attention import available_backends, block_causal_mask, resolve_backend


def test_block_causal_mask_from_cu_seqlens():
    mask = block_causal_mask(torch.tensor([0, 2, 5], dtype=torch.int32), 5)
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_backend_choice():
    assert available_backends()[-1] == "sdpa"
    assert resolve_backend("sdpa") == "sdpa"
    if not torch.cuda.is_available():
        assert resolve_backend("auto") == "sdpa"
        with pytest.raises(ValueError, match="attention backend 'varlen' is not available here"):
            resolve_backend("varlen")


def test_varlen_call_is_chosen_from_the_signature(monkeypatch):
    """The causal spelling is read once from varlen_attn's signature, never by retrying on TypeError."""
    import torch.nn.attention.varlen as varlen_module

    from megatron_eve.model import attention

    attention.varlen_call_options.cache_clear()
    installed = attention.varlen_call_options()
    assert installed["causal"] in ({"window_size": (-1, 0)}, {"is_causal": True})

    def window(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        pass

    def flag(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False, scale=None, enable_gqa=False):
        pass

    def neither(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None):
        pass

    expected = [(window, {"causal": {"window_size": (-1, 0)}, "native_gqa": False}),
                (flag, {"causal": {"is_causal": True}, "native_gqa": True})]
    try:
        for fake, options in expected:
            monkeypatch.setattr(varlen_module, "varlen_attn", fake)
            attention.varlen_call_options.cache_clear()
            assert attention.varlen_call_options() == options
        monkeypatch.setattr(varlen_module, "varlen_attn", neither)
        attention.varlen_call_options.cache_clear()
        with pytest.raises(RuntimeError, match="takes neither window_size nor is_causal"):
            attention.varlen_call_options()
    finally:
        attention.varlen_call_options.cache_clear()


def test_flex_block_mask_is_built_once_per_micro_batch(monkeypatch):
    """Every layer of a micro-batch (and its recomputation) reuses the block mask carried on its
    PackedSeqParams; a new micro-batch gets its own."""
    import torch.nn.attention.flex_attention as flex

    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_eve.model.attention import document_block_mask

    built = []

    def fake_create_block_mask(mask_mod, b, h, q_len, kv_len, device=None, _compile=False):
        built.append((q_len, _compile))
        q, kv = torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :]
        return mask_mod(0, 0, q, kv)

    monkeypatch.setattr(flex, "create_block_mask", fake_create_block_mask)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=3, max_seqlen_kv=3)
    masks = [document_block_mask(params, 5, "cpu") for _ in range(8)]  # 8 layers
    assert len(built) == 1 and all(m is masks[0] for m in masks)
    assert torch.equal(masks[0], block_causal_mask(cu, 5))  # the document-causal pattern
    other = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu.clone(), cu_seqlens_kv=cu, max_seqlen_q=3,
                            max_seqlen_kv=3)
    document_block_mask(other, 5, "cpu")
    assert len(built) == 2 and built[0] == (5, False)


def rope_operands(dtype, tokens=24, heads=4, dim=16):
    """q-like [tokens, heads, dim] and the rotary table as megatron-core's RotaryEmbedding makes it
    ([tokens, 1, 1, dim] fp32, the angles repeated over both halves)."""
    inverse = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(tokens, dtype=torch.float32), inverse)
    freqs = torch.cat((angles, angles), dim=-1)[:, None, None, :]
    t = torch.randn(tokens, heads, dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    return t, freqs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_rope_is_megatron_cores_rope(dtype):
    """FlatRotary (tables made once per micro-batch) gives megatron-core's unfused RoPE bit for bit,
    for a slice of the table too (the rows of a shorter tensor)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megatron_eve.model.attention import FlatRotary

    t, freqs = rope_operands(dtype)
    rotary = FlatRotary(freqs)
    for rows in (t, t[:17]):
        theirs = _apply_rotary_pos_emb_bshd(rows.unsqueeze(1), freqs[: rows.shape[0]]).squeeze(1)
        assert torch.equal(rotary.apply(rows, fused=True), theirs)  # fused applies on CUDA only
    assert list(rotary._tables) == [dtype]  # one cos / sin pair, reused
    # Made when handed over for the activations' dtype (no layer fills the cache: see compile_layers).
    assert list(FlatRotary(freqs, dtype)._tables) == [dtype]


def test_compiled_rope_matches_the_eager_one():
    """The compiled kernel CUDA runs (compiled here for the CPU): values and gradients as eager."""
    from megatron_eve.model.attention import _compiled_rotate, rotate

    t, freqs = rope_operands(torch.float32)
    cos, sin = freqs[:, 0].cos(), freqs[:, 0].sin()
    eager, compiled = t.clone().requires_grad_(), t.clone().requires_grad_()
    upstream = torch.randn_like(t)
    (rotate(eager, cos, sin) * upstream).sum().backward()
    out = _compiled_rotate()(compiled, cos, sin)
    (out * upstream).sum().backward()
    torch.testing.assert_close(out, rotate(t, cos, sin), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled.grad, eager.grad, rtol=1e-6, atol=1e-6)
