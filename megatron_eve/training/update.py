"""Between an iteration's backward and the next forward: the all-ranks flags and the optimizer update.

Whether an update may happen depends on every rank's losses and gradients being finite. Read on the
host before the step, that costs a wait for the whole backward and a second pass over every
gradient. When the optimizer can skip on the device (optim.skips_updates_on_the_device: fused AdamW
that clips), neither is needed: the loss flag goes to the AdamW as its found_inf, the gradient norm
the clip computes anyway stands for the gradients' finiteness, and the host reads the flags after the
step, from a copy that was ready before the step's own wait for the norm (megatron-core's, as in
Megatron-LM). Otherwise the flags are read first and a non-finite step is not taken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

from megatron_eve.training.iteration_stats import IterationStats
from megatron_eve.training.metrics import BatchWork
from megatron_eve.training.optim import arm_update_skip, has_loss_scaler, skips_updates_on_the_device


@dataclass
class Update:
    finite: bool  # every rank's losses and gradients: if not, the weights and the optimizer state are as before
    updated: bool  # the weights changed (finite, and no fp16 loss-scale overflow)
    grad_norm: Optional[float]  # the step's gradient norm when it was taken, else None
    sigterm: bool
    over_time: bool


def _host_norm(grad_norm) -> Optional[float]:
    return None if grad_norm is None else float(grad_norm)  # a device norm (Transformer Engine's) is read here


def reduce_and_update(optimizer, stats: IterationStats, losses: Sequence[Dict[str, torch.Tensor]],
                      grad_buffers: Sequence[torch.Tensor], work: Optional[BatchWork] = None,
                      sigterm: bool = False, over_time: bool = False) -> Update:
    """The iteration's flags (IterationStats, one all-reduce) and the optimizer step they allow."""
    if skips_updates_on_the_device(optimizer):
        pending = stats.launch(losses, (), work, sigterm, over_time)  # the norm checks the gradients
        arm_update_skip(optimizer, pending.nonfinite)
        updated, grad_norm, _ = optimizer.step()
        norm = _host_norm(grad_norm)
        flags = pending.read()
        finite = flags["finite"] and norm is not None and math.isfinite(norm)
        if flags["finite"] and not finite:
            stats.drop_last_losses()  # as a non-finite gradient found before the step would have
        return Update(finite, updated and finite, norm if finite else None, flags["sigterm"], flags["over_time"])
    # fp16's scaled gradients overflow now and then by design: its step finds that and skips (the
    # scale backs off), so only the losses decide here.
    flags = stats.reduce(losses, () if has_loss_scaler(optimizer) else grad_buffers, work, sigterm, over_time)
    updated, norm = False, None
    if flags["finite"]:
        updated, grad_norm, _ = optimizer.step()
        norm = _host_norm(grad_norm)
    return Update(flags["finite"], bool(updated), norm, flags["sigterm"], flags["over_time"])
