"""What each EVE stage trains (eve.md §5).

prealign: the PEL, projector and aligner only (the reference's `vision_tower` + `mm_projector`
          names, the aligner included); the LLM is frozen.
pretrain, finetune: everything (the CLIP teacher is never a parameter of the model).
"""

from __future__ import annotations

from typing import Iterable, Tuple

import torch

VISION_MODULES = ("vision_model.", "vision_projection.", "aligner.")


def is_vision_parameter(name: str) -> bool:
    return any(part in name for part in VISION_MODULES)


def apply_stage(model: torch.nn.Module, stage: str) -> Tuple[int, int]:
    """Set requires_grad per the stage; returns (trainable, frozen) parameter counts."""
    trainable = frozen = 0
    for name, param in model.named_parameters():
        param.requires_grad = stage != "prealign" or is_vision_parameter(name)
        if param.requires_grad:
            trainable += param.numel()
        else:
            frozen += param.numel()
    return trainable, frozen


def vision_name_patterns() -> Iterable[str]:
    """fnmatch patterns of the vision parameters (for optimizer parameter groups)."""
    return tuple(f"*{part}*" for part in VISION_MODULES)
