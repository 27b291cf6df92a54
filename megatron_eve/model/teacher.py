"""The frozen CLIP teacher whose penultimate-layer patch features the aligner regresses (eve.md §1).

It is loaded from a local Hugging Face folder (no hub access at run time), never trained and never
saved: it is not a submodule of the model, so it stays out of checkpoints, optimizers and DDP.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_eve.config import AlignerConfig, ConfigError, VisionConfig


class CLIPTeacher:
    def __init__(self, aligner: AlignerConfig, vision: VisionConfig, device, dtype: torch.dtype):
        path = aligner.teacher_path
        if not path or not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(
                f"vision teacher path {path!r} is not a local Hugging Face folder with a "
                "config.json (e.g. a download of openai/clip-vit-large-patch14-336)"
            )
        from transformers import CLIPVisionConfig, CLIPVisionModel

        config = CLIPVisionConfig.from_pretrained(path)
        expected = {
            "image_size": vision.teacher_image_size,
            "patch_size": vision.patch_size,
            "hidden_size": aligner.hidden_size,
        }
        wrong = {k: (getattr(config, k), v) for k, v in expected.items() if getattr(config, k) != v}
        if wrong:
            details = ", ".join(f"{k} is {got}, model expects {want}" for k, (got, want) in wrong.items())
            raise ConfigError(f"vision teacher at {path} does not fit this model: {details}")
        model = CLIPVisionModel.from_pretrained(path).to(dtype)
        # Keep the layers up to the selected one: deeper layers would be computed and thrown away.
        encoder = getattr(model, "vision_model", model).encoder
        depth = len(encoder.layers)
        keep = depth + 1 + aligner.teacher_select_layer if aligner.teacher_select_layer < 0 else (
            aligner.teacher_select_layer
        )
        if not 1 <= keep <= depth:
            raise ConfigError(
                f"teacher_select_layer {aligner.teacher_select_layer} is outside a {depth}-layer "
                "teacher"
            )
        encoder.layers = encoder.layers[:keep]
        model.requires_grad_(False)
        self.model = model.to(device).eval()
        self.patch_size = vision.patch_size

    @torch.no_grad()
    def patch_features(self, images: Tensor, patches: Optional[Tensor] = None, split_over=None) -> Tensor:
        """images [N, 4, L, L] (RGB + mask) → features of the valid patches [V, C], image-major,
        row-major inside each image (the order the aligner's cells use). `patches`: their flat
        indices, planned on the host (data.images.square_patch_index); else read from the masks,
        which waits on the device. `split_over`: a process group (tensor-parallel ranks, which all
        need the same targets) whose ranks each encode a share of the images and exchange them."""
        hidden = self._encode(images, split_over)
        if patches is not None:
            return hidden.reshape(-1, hidden.shape[-1]).index_select(0, patches)
        valid = F.avg_pool2d(images[:, 3:].float(), kernel_size=self.patch_size) > 0
        return hidden[valid.flatten(1)]

    def _encode(self, images: Tensor, group) -> Tensor:
        """Penultimate-layer patch features [N, G, C] (CLS dropped)."""
        dtype = next(self.model.parameters()).dtype
        if group is None or group.size() == 1:
            return self.model(pixel_values=images[:, :3].to(dtype)).last_hidden_state[:, 1:]
        import torch.distributed as dist

        size, count = group.size(), images.shape[0]
        share = -(-count // size)
        first = group.rank() * share
        mine = images[first:first + share, :3].to(dtype)
        if mine.shape[0] < share:  # the last ranks get fewer images, or none: zero squares fill in
            mine = torch.cat([mine, mine.new_zeros(share - mine.shape[0], *mine.shape[1:])])
        local = self.model(pixel_values=mine).last_hidden_state[:, 1:].contiguous()
        gathered = local.new_empty((size * share, *local.shape[1:]))
        dist.all_gather_into_tensor(gathered, local, group=group)
        return gathered[:count]
