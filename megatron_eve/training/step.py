"""forward_step / loss for megatron-core's get_forward_backward_func schedules.

A micro-batch is a dict: tokens [b, s], labels [b, s], optional attention_mask [b, 1, s, s],
images [N, 4, S, S] (first stage), image_grid_hw [N, 2] (every stage), teacher_images
[N, 4, L, L] (last stage). Stages that do not need a key may omit it.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Iterator

import torch

from megatron_eve.model.eve import eve_loss


def loss_func(labels: torch.Tensor, align_weight: float, output):
    """Last stage: EVE's micro-batch loss (token-mean LM + weight x image-mean align)."""
    total, lm, align = eve_loss(*output, labels, align_weight)
    return total, {"lm loss": lm.detach(), "align loss": align.detach()}


def forward_step(align_weight: float, data_iterator: Iterator[Dict[str, torch.Tensor]], model):
    batch = next(data_iterator)
    output = model(
        batch["tokens"],
        attention_mask=batch.get("attention_mask"),
        labels=batch["labels"],
        images=batch.get("images"),
        image_grid_hw=batch.get("image_grid_hw"),
        teacher_images=batch.get("teacher_images"),
        packed_seq_params=batch.get("packed_seq_params"),
    )
    return output, partial(loss_func, batch["labels"], align_weight)
