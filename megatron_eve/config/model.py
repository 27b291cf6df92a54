"""The EVE model's typed configuration: decoder, PEL, aligner; presets; what its architecture is.

Configs are plain dataclasses built once at the edge (CLI, tests, converters); nothing reads global
arguments. Fields declared with `option` are also command-line flags (options.py): unset, a model
flag keeps the preset's value.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from megatron_eve.config.options import option


class ConfigError(ValueError):
    """A configuration that cannot work, reported before anything heavy is built."""


def _arch(help: str = "", flag: Optional[str] = None, default=None):  # noqa: A002
    """A model field settable from the command line; unset, the preset's value stays."""
    return option(default, help=help, flag=flag, from_preset=True)


@dataclass
class LanguageModelConfig:
    """The Vicuna / Llama decoder (eve.md §1: Vicuna-7B-v1.5)."""

    num_layers: int = _arch(default=32)
    hidden_size: int = _arch(default=4096)
    ffn_hidden_size: int = _arch(default=11008)
    num_attention_heads: int = _arch(default=32)
    # = heads: Vicuna-7B is plain multi-head attention
    num_query_groups: int = _arch("key/value heads (grouped-query attention; = heads: multi-head)", default=32)
    vocab_size: int = _arch(default=32000)
    max_position_embeddings: int = _arch(default=4096)
    norm_epsilon: float = _arch(default=1e-5)
    rotary_base: int = _arch(default=10000)
    init_method_std: float = _arch("std of the normal initialisation of new weights", default=0.02)
    # Megatron pads the vocabulary so each TP rank holds an equal, aligned slice.
    make_vocab_size_divisible_by: int = _arch(default=128)


@dataclass
class VisionConfig:
    """The Patch Embedding Layer (PEL) and projector (eve.md §1, §3)."""

    hidden_size: int = _arch("PEL width (the release's mm_hidden_size)", "--vision-hidden-size", 1024)
    num_heads: int = _arch("heads of the PEL's local and global attention", "--vision-num-attention-heads", 8)
    patch_size: int = 14  # patch_stride
    conv_stride: int = 2  # 2x2 local attention window
    image_size: int = _arch("side of the padded square the PEL sees (672, or 1344 for HD)", default=672)
    teacher_image_size: int = _arch("side of the CLIP teacher's square (image_size_clip)", default=336)
    projector_type: str = "mlp2x_gelu"

    @property
    def token_cell(self) -> int:
        """Pixels per visual token side (28 for EVE): one conv patch times the 2x2 window."""
        return self.patch_size * self.conv_stride

    @property
    def teacher_grid(self) -> int:
        """CLIP patches per side of the teacher square (24 at 336 px)."""
        return self.teacher_image_size // self.patch_size

    @property
    def align_pool(self) -> int:
        """Pooling from the PEL token grid to the teacher grid: 1 at 672 px, 2 at 1344 px."""
        return (self.image_size // self.token_cell) // self.teacher_grid


@dataclass
class AlignerConfig:
    """The Patch Aligning Layer (PAL) and its frozen CLIP teacher (eve.md §1)."""

    enabled: bool = option(True, flag="--disable-aligner", negate=True,
                           help="train without the patch aligning layer (and its CLIP teacher)")
    # Decoder depth between taps; None means num_layers / 8, i.e. 9 taps (EVE: every 4 of 32).
    tap_interval: Optional[int] = _arch("decoder layers between aligner taps (default num-layers / 8)",
                                        "--aligner-tap-interval")
    num_heads: int = _arch("heads of the aligner's parameter-free attention across taps",
                           "--aligner-num-attention-heads", 8)
    hidden_size: int = _arch("aligner width = the CLIP teacher's hidden size (ViT-L/14: 1024)",
                             "--aligner-hidden-size", 1024)
    loss_weight: float = option(1.0, flag="--align-loss-weight", help="total loss = LM + w * align; 0 turns "
                                "the aligner off")
    teacher_path: Optional[str] = option(None, flag="--vision-teacher-path", metavar="DIR",
                                         help="local HF folder of the CLIP teacher "
                                              "(openai/clip-vit-large-patch14-336)")
    teacher_select_layer: int = -2  # penultimate layer, patch tokens (mm_vision_select_layer)

    def taps(self, num_layers: int) -> List[int]:
        """Hidden-state indices tapped, in the reference's order: num_layers first, 0 last.

        Index 0 is the embedding output (after splicing), i in 1..L-1 the output of decoder layer
        i, and L the final-norm output — the HF `output_hidden_states` convention EVE uses.
        """
        interval = self.tap_interval if self.tap_interval is not None else num_layers // 8
        return list(range(num_layers, -1, -interval))


@dataclass
class EVEModelConfig:
    name: str = "eve-7b"
    language: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    aligner: AlignerConfig = field(default_factory=AlignerConfig)


def _vicuna_7b() -> LanguageModelConfig:
    return LanguageModelConfig()


def _preset_eve_7b() -> EVEModelConfig:
    return EVEModelConfig(name="eve-7b", language=_vicuna_7b(), vision=VisionConfig(image_size=672))


def _preset_eve_7b_hd() -> EVEModelConfig:
    return EVEModelConfig(
        name="eve-7b-hd", language=_vicuna_7b(), vision=VisionConfig(image_size=1344)
    )


def _preset_tiny() -> EVEModelConfig:
    """A seconds-per-step model for CPU tests and the quick-start.

    8 layers keep EVE's 9-tap aligner rule (every num_layers/8); 224-px images over a 112-px
    teacher keep the 672/336 geometry (ratio 2, 28-px token cells): 1 + 8*9 = 73 tokens per square.
    """
    return EVEModelConfig(
        name="tiny",
        language=LanguageModelConfig(
            num_layers=8,
            hidden_size=128,
            ffn_hidden_size=352,
            num_attention_heads=4,
            num_query_groups=4,
            vocab_size=1024,
            max_position_embeddings=2048,
        ),
        vision=VisionConfig(hidden_size=64, num_heads=8, image_size=224, teacher_image_size=112),
        aligner=AlignerConfig(hidden_size=64, num_heads=8),
    )


PRESETS: Dict[str, callable] = {
    "eve-7b": _preset_eve_7b,
    "eve-7b-hd": _preset_eve_7b_hd,
    "tiny": _preset_tiny,
}


def get_preset(name: str) -> EVEModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def replace(config, **changes):
    """dataclasses.replace that also reaches one level into nested configs ('vision.image_size')."""
    nested: Dict[str, Dict[str, object]] = {}
    flat = {}
    for key, value in changes.items():
        if "." in key:
            head, tail = key.split(".", 1)
            nested.setdefault(head, {})[tail] = value
        else:
            flat[key] = value
    for head, sub in nested.items():
        flat[head] = replace(getattr(config, head), **sub)
    return dataclasses.replace(config, **flat)


def model_config_from_dict(values: Dict) -> EVEModelConfig:
    """Inverse of dataclasses.asdict for EVEModelConfig (as stored in checkpoints)."""
    return EVEModelConfig(
        name=values.get("name", "eve"),
        language=LanguageModelConfig(**values["language"]),
        vision=VisionConfig(**values["vision"]),
        aligner=AlignerConfig(**values["aligner"]),
    )


# Fields that only steer a run (resolution of this stage, the longest sequence it takes, whether /
# how strongly to align, where the teacher lives, how weights were initialised): everything else decides
# the weights' shapes or values. RoPE has no position table, so a stage may take longer sequences than
# the one before (EVE-7B-HD: 8192 positions from the 4096 of its pretrain checkpoint).
RUN_OPTIONS = ("name", "language.init_method_std", "language.max_position_embeddings", "vision.image_size",
               "aligner.enabled", "aligner.loss_weight", "aligner.teacher_path")


ALIGNER_GEOMETRY = ("vision.teacher_image_size",)  # only shapes anything when the aligner runs


def architecture(model: EVEModelConfig) -> Dict[str, object]:
    """The architecture fields of a model config, flat ("language.hidden_size": 4096, ...); the
    aligner's (and the teacher's) only when the aligner is enabled."""
    flat = {}
    for part in ("language", "vision", "aligner"):
        for key, value in dataclasses.asdict(getattr(model, part)).items():
            flat[f"{part}.{key}"] = value
    flat["aligner.tap_interval"] = model.language.num_layers // 8 if model.aligner.tap_interval is None \
        else model.aligner.tap_interval  # None means the default interval: compare what it means
    return {key: value for key, value in flat.items() if key not in RUN_OPTIONS and (
        model.aligner.enabled or not (key.startswith("aligner.") or key in ALIGNER_GEOMETRY))}


def architecture_differences(ours: EVEModelConfig, recorded: EVEModelConfig) -> List[str]:
    """"field: ours vs recorded" for each architecture field both configs state and differ on."""
    a, b = architecture(ours), architecture(recorded)
    return [f"{key}: {a[key]} vs {b[key]}" for key in a if key in b and a[key] != b[key]]


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron's rule: round up to a multiple of divisible_by * TP."""
    multiple = divisible_by * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


