"""forward_step / loss for megatron-core's get_forward_backward_func schedules.

A micro-batch is a dict of EVEModel keyword arguments (what data.loader.model_inputs makes):
input_ids and labels [b, s], attention_mask or packed_seq_params, images (first stage),
image_grid_hw (every stage), teacher_images (last stage). Stages may omit what they do not use.
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
    return model(**batch), partial(loss_func, batch["labels"], align_weight)
