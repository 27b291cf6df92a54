"""EVE's Patch Aligning Layer (PAL, HF keys `model.vision_tower_compressor.*`; eve.md §1).

Decoder hidden states are tapped every num_layers/8 layers (9 taps for 32 layers: the final-norm
output first, the embedding output last), pooled onto the teacher's patch grid, projected by a
LayerNorm + Linear per tap, fused by a parameter-free multi-head attention in which the final tap
queries the other eight, and compared with the CLIP teacher's patch features by 1 - cosine.

Under pipeline parallelism each stage owns the projections of its own taps, and the last stage
owns the fusion head; projected taps travel to the last stage with the activations.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_eve.config import AlignerConfig
from megatron_eve.model.patch_embedding import norm_linear


class PatchAligner(nn.Module):
    """The PAL parameters that live on one pipeline stage.

    tap_slots: indices j into config.taps(num_layers) projected on this stage (norm_layer.{j});
    with_head: whether the fusion head (input_layer, output_layer) is here (the last stage).
    """

    def __init__(self, lm_width: int, config: AlignerConfig, tap_slots: Iterable[int], with_head: bool):
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_heads
        self.scale = width**-0.5
        self.norm_layer = nn.ModuleDict({str(j): norm_linear(lm_width, width) for j in tap_slots})
        if with_head:
            self.input_layer = nn.Linear(lm_width, width)
            self.output_layer = nn.Linear(width, width)

    def project(self, slot: int, cells: Tensor) -> Tensor:
        """Tap `slot`'s pooled hidden states [V, H] → [V, C]."""
        return self.norm_layer[str(slot)](cells)

    def predict(self, final_cells: Tensor, query: Tensor, keys: Tensor) -> Tensor:
        """final_cells [V, H] (last tap, unprojected), query [V, C] (its projection),
        keys [V, K, C] (projections of the other taps, in tap order) → prediction [V, C]."""
        v, k, c = keys.shape
        heads = self.num_heads
        q = query.view(v, 1, heads, c // heads)
        kv = keys.view(v, k, heads, c // heads)
        attn = ((q * self.scale) * kv).sum(-1).softmax(dim=1)  # over taps: [V, K, heads]
        fused = (attn.unsqueeze(-1) * kv).sum(1).reshape(v, c)
        return self.input_layer(final_cells) + self.output_layer(fused)


def alignment_loss(prediction: Tensor, target: Tensor, cell_image: Tensor, num_images: int):
    """Σ over images of (1 - mean cosine over the image's cells); also returns how many images.

    The micro-batch's align loss is this sum over the count (eve.md §4: averaged over images).
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"the aligner predicts {tuple(prediction.shape)} but the teacher gives "
            f"{tuple(target.shape)}: the teacher view's mask does not match the image's token grid"
        )
    cosine = F.cosine_similarity(prediction.float(), target.float(), dim=-1)
    per_image_sum = cosine.new_zeros(num_images).index_add(0, cell_image, cosine)
    # Counted by index_add, not bincount: CUDA's bincount reads the largest index to the host.
    cells = cosine.new_zeros(num_images).index_add(0, cell_image, torch.ones_like(cosine))
    present = cells > 0
    # Masked by where, not indexed by `present`: a boolean index would wait on the device.
    loss = torch.where(present, 1.0 - per_image_sum / cells.clamp(min=1), 0.0).sum()
    return loss, present.sum().to(loss.dtype)
