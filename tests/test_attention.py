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
