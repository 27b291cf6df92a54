"""megatron_eve.model.lm_loss (--cross-entropy-fusion-impl torch) against torch's cross-entropy in fp64.

One vocabulary shard (TP=1) here; over two TP shards, one of them padded, against megatron-core's loss
in a training step: tests/test_parallel_parity.py (tp2_sp_fusions); on CUDA at EVE-7B's shape:
tests/gpu/test_gpu_fused_updates.py."""

import pytest
import torch
import torch.nn.functional as F

from megatron_eve.model.lm_loss import vocab_parallel_lm_loss


def loss_and_grad_errors(logits, labels, vocab_size, grad):
    """Our per-token loss and the logits' gradient for an upstream gradient `grad` [b, s], against fp64
    F.cross_entropy over the same (rounded) logits' first vocab_size columns: (loss error, gradient
    error relative to the exact gradient's rounding step, the gradient in the padded columns)."""
    logits = logits.detach().requires_grad_()
    loss = vocab_parallel_lm_loss(logits, labels, vocab_size, None)
    assert loss.dtype == torch.float32 and loss.shape == labels.shape
    (loss * grad).sum().backward()
    exact_logits = logits.detach().double().requires_grad_()
    exact = F.cross_entropy(exact_logits[..., :vocab_size].permute(1, 2, 0), labels, reduction="none")
    (exact * grad.double()).sum().backward()
    assert logits.grad.dtype == logits.dtype
    # The gradient comes out in the logits' dtype: compare in units of its rounding step.
    step = torch.finfo(logits.dtype).eps * exact_logits.grad.abs().clamp(min=torch.finfo(logits.dtype).tiny)
    return (float((loss.detach().double() - exact.detach()).abs().max()),
            float(((logits.grad.double() - exact_logits.grad).abs() / step).max()),
            float(logits.grad[..., vocab_size:].abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_gradient_match_fp64_cross_entropy(dtype):
    """Losses within fp32 rounding (logits ~N(0, 3), losses ~5); each gradient entry, in rounding steps
    of its dtype at its own size: bf16 within 1 (measured 0.50: the exact value rounded to nearest), fp32
    within 64 (measured 13: fp32 arithmetic's relative error on the smallest probabilities); the 6 padded
    vocabulary columns get no probability and no gradient. A second shape (another micro-batch) too."""
    generator = torch.Generator().manual_seed(0)
    for s, b in ((37, 2), (50, 1)):
        logits = (3 * torch.randn(s, b, 256, generator=generator)).to(dtype)
        labels = torch.randint(0, 250, (b, s), generator=generator)
        grad = torch.rand(b, s, generator=generator)  # per-token weights, as the loss mask makes them
        loss_error, grad_steps, padded_grad = loss_and_grad_errors(logits, labels, 250, grad)
        assert loss_error <= 1e-5, loss_error
        assert grad_steps <= (64 if dtype == torch.float32 else 1.0), grad_steps
        assert padded_grad == 0.0
