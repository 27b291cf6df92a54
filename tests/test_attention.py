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
