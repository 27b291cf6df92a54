"""The language-model loss over vocabulary-parallel logits in few passes (--cross-entropy-fusion-impl torch).

megatron-core's loss (fused or not) copies the logits to fp32, shifts them, exponentiates, normalises and
keeps that fp32 softmax for the backward pass: about seven passes over a [tokens x vocabulary] fp32 tensor
per micro-batch, memory-bound (on an H100, ~2 ms a forward for 4096 tokens x 32k). Here the logits stay
as they are (bf16 in a bf16 run) and are kept for the backward pass instead of the softmax; torch.compile
turns each direction into one kernel over them: the forward reads them for each row's log-sum-exp and
target logit (two kernels under tensor parallelism, megatron-core's two all-reduces in between), the
backward recomputes the softmax and writes the logits' gradient in their dtype. The arithmetic is in fp32
as megatron-core's is. Padded vocabulary rows (Megatron pads the vocabulary for TP alignment) are left
out of the softmax here, so the logits need no masked copy."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _fp32_without_padding(logits: Tensor, valid: int) -> Tensor:
    """The logits in fp32 with this shard's padded vocabulary columns (index >= valid) at -inf."""
    logits = logits.float()
    if valid == logits.shape[-1]:
        return logits
    columns = torch.arange(logits.shape[-1], device=logits.device)
    return logits.masked_fill(columns >= valid, float("-inf"))


def _pick(logits: Tensor, local_target: Tensor) -> Tensor:
    """Each row's logit at its target column, 0 where the target lies in another shard."""
    width = logits.shape[-1]
    in_shard = (local_target >= 0) & (local_target < width)
    picked = logits.gather(-1, local_target.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(in_shard, picked, 0.0)


@torch.compile(dynamic=None)
def _log_sum_exp_and_target(logits: Tensor, target: Tensor, valid: int):
    """The whole vocabulary on this rank: per row log(sum(exp)) and the target's logit, fp32."""
    logits = _fp32_without_padding(logits, valid)
    return torch.logsumexp(logits, dim=-1), _pick(logits, target)


@torch.compile(dynamic=None)
def _row_max(logits: Tensor, valid: int) -> Tensor:
    return _fp32_without_padding(logits, valid).amax(dim=-1)


@torch.compile(dynamic=None)
def _sum_exp_and_target(logits: Tensor, local_target: Tensor, row_max: Tensor, valid: int) -> Tensor:
    """This shard's sum of exp(logit - row max) and its part of the target logit (minus the row max), stacked."""
    shifted = _fp32_without_padding(logits, valid) - row_max.unsqueeze(-1)
    return torch.stack((torch.exp(shifted).sum(dim=-1), _pick(shifted, local_target)))


@torch.compile(dynamic=None)
def _logits_grad(logits: Tensor, local_target: Tensor, log_sum_exp: Tensor, grad: Tensor, valid: int) -> Tensor:
    """(softmax - one-hot(target)) x the loss's gradient, in the logits' dtype."""
    softmax = torch.exp(_fp32_without_padding(logits, valid) - log_sum_exp.unsqueeze(-1))
    columns = torch.arange(logits.shape[-1], device=logits.device)
    softmax = torch.where(columns == local_target.unsqueeze(-1), softmax - 1.0, softmax)
    return (softmax * grad.unsqueeze(-1)).to(logits.dtype)


class _VocabParallelLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, vocab_start: int, valid: int, tp_group):
        local_target = target - vocab_start
        if tp_group is None or tp_group.size() == 1:
            log_sum_exp, target_logit = _log_sum_exp_and_target(logits, local_target, valid)
            loss = log_sum_exp - target_logit
        else:
            row_max = _row_max(logits, valid)
            torch.distributed.all_reduce(row_max, op=torch.distributed.ReduceOp.MAX, group=tp_group)
            stats = _sum_exp_and_target(logits, local_target, row_max, valid)
            torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.SUM, group=tp_group)
            log_of_sum = torch.log(stats[0])
            loss = log_of_sum - stats[1]  # as megatron-core: both relative to the row max
            log_sum_exp = log_of_sum + row_max
        ctx.save_for_backward(logits, local_target, log_sum_exp)
        ctx.valid = valid
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, local_target, log_sum_exp = ctx.saved_tensors
        return _logits_grad(logits, local_target, log_sum_exp, grad.contiguous(), ctx.valid), None, None, None, None


def vocab_parallel_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int, tp_group: Optional[object]) -> Tensor:
    """Per-token cross-entropy [b, s] (fp32) of this rank's vocabulary shard of the logits [s, b, V/TP]
    (the output layer's, parallel_output) against labels [b, s] in [0, vocab_size); columns past
    vocab_size are padding and take no probability."""
    width = logits.shape[-1]
    rank = tp_group.rank() if tp_group is not None else 0
    vocab_start = rank * width
    valid = max(0, min(width, vocab_size - vocab_start))
    loss = _VocabParallelLoss.apply(logits, labels.transpose(0, 1).contiguous(), vocab_start, valid, tp_group)
    return loss.transpose(0, 1).contiguous()
