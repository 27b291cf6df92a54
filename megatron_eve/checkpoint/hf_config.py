"""config.json of the HF EVE release (eve.md §2) ↔ EVEModelConfig: reading a release's (field types
and ranges checked, geometry it does not state read from its weights) and writing an export's, with
the preprocessor_config.json of EVE's any-resolution processor."""

from __future__ import annotations

import json
import math
import os
import re
from typing import Dict, Optional

import torch

from megatron_eve.checkpoint.hf_eve import CheckpointFormatError, HFWeights
from megatron_eve.config import AlignerConfig, EVEModelConfig, LanguageModelConfig, VisionConfig

# config.json's numeric fields: whole numbers >= 1, and numbers > 0 (a string "8" or 0 heads would only
# fail deep inside the model build, or be recorded as they are).
POSITIVE_INT_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                       "num_key_value_heads", "vocab_size", "max_position_embeddings", "mm_hidden_size",
                       "mm_hidden_size_clip", "image_size", "image_size_clip")
POSITIVE_NUMBER_FIELDS = ("rms_norm_eps", "rope_theta")
# Fields a release may leave null (then the default applies, as the original code's).
NULLABLE_FIELDS = ("num_key_value_heads", "mm_hidden_size_clip", "image_size", "rope_theta")


def field_problem(name: str, value, whole: bool) -> Optional[str]:
    """Why config.json's `name` is not a positive whole number (`whole`) or positive number; None if it is."""
    if value is None and name in NULLABLE_FIELDS:
        return None
    if whole and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        return f"{name} is {json.dumps(value)}, not a whole number >= 1"
    if not whole and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                      or value <= 0):
        return f"{name} is {json.dumps(value)}, not a number > 0"
    return None


def read_hf_config(folder: str) -> Dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointFormatError(f"{folder}: no config.json")
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointFormatError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise CheckpointFormatError(f"{path}: not a JSON object")
    problems = [field_problem(name, config[name], whole) for fields, whole in
                ((POSITIVE_INT_FIELDS, True), (POSITIVE_NUMBER_FIELDS, False)) for name in fields if name in config]
    problems = [problem for problem in problems if problem]
    if problems:
        raise CheckpointFormatError(f"{path}: {'; '.join(problems)}")
    return config


def _image_size_from(config: Dict) -> int:
    if config.get("image_size"):
        return int(config["image_size"])
    match = re.search(r"anypixel-(\d+)", str(config.get("mm_vision_tower", "")))
    return int(match.group(1)) if match else 672


def rope_base(config: Dict) -> float:
    """RoPE's base as transformers writes it: top-level `rope_theta` (releases up to 4.x) or
    `rope_parameters.rope_theta` (transformers 5). Absent from both: Llama's 10000, as the
    original code assumes. RoPE scaling changes the model and is refused, never ignored."""
    parameters = config.get("rope_parameters") or {}
    if not isinstance(parameters, dict):
        raise CheckpointFormatError(f"config.json: rope_parameters is {parameters!r}, not an object")
    scaling = config.get("rope_scaling") or {}
    for where, kind in (("rope_scaling", scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict)
                         else scaling), ("rope_parameters", parameters.get("rope_type"))):
        if kind not in (None, "default"):
            raise CheckpointFormatError(f"config.json: {where} asks for {kind!r} RoPE scaling, which EVE on "
                                        "megatron_eve does not implement")
    nested = parameters.get("rope_theta")
    problem = nested is not None and field_problem("rope_parameters.rope_theta", nested, whole=False)
    if problem:
        raise CheckpointFormatError(f"config.json: {problem}")
    values = {v for v in (config.get("rope_theta"), nested) if v is not None}
    if len(values) > 1:
        raise CheckpointFormatError(f"config.json: rope_theta {config['rope_theta']} and "
                                    f"rope_parameters.rope_theta {parameters['rope_theta']} disagree")
    return float(values.pop()) if values else 10000.0


def language_config(config: Dict) -> LanguageModelConfig:
    missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                           "vocab_size") if config.get(k) is None]
    if missing:
        raise CheckpointFormatError(f"config.json lacks {', '.join(missing)}")
    heads = config["num_attention_heads"]
    base = rope_base(config)
    if base != int(base):
        raise CheckpointFormatError(f"config.json: a RoPE base of {base} is not a whole number")
    return LanguageModelConfig(
        num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"], num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads, vocab_size=config["vocab_size"],
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        norm_epsilon=float(config.get("rms_norm_eps", 1e-5)), rotary_base=int(base),
    )


def _aligner_width(config: Dict, weights: HFWeights) -> int:
    """The aligner's width is the CLIP teacher's (release configs do not state it; eve.md §1): the
    rows of its input projection. A config that does state it must agree."""
    key = "model.vision_tower_compressor.input_layer.weight"
    if key not in weights:
        raise CheckpointFormatError(f"{weights.folder}: the aligner's norm layers are there but not {key}")
    width = int(weights.shape(key)[0])
    stated = config.get("mm_hidden_size_clip")
    if stated is not None and int(stated) != width:
        raise CheckpointFormatError(f"config.json says mm_hidden_size_clip {stated}, but {key} has {width} rows")
    return width


def model_config(config: Dict, weights: Optional[HFWeights] = None, image_size: Optional[int] = None) -> EVEModelConfig:
    """EVEModelConfig of an HF EVE folder. Geometry a release config does not state is read from
    the weights: the aligner's taps (its norm layers) and width (the teacher's: its input layer)."""
    if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise CheckpointFormatError(f"mm_projector_type {config['mm_projector_type']!r} is not EVE's mlp2x_gelu")
    lm = language_config(config)
    vision = VisionConfig(hidden_size=config.get("mm_hidden_size", 1024), image_size=image_size or _image_size_from(config),
                          teacher_image_size=config.get("image_size_clip", 336))
    taps, width = 0, config.get("mm_hidden_size_clip")
    if weights is not None:
        taps = len({k.split(".")[3] for k in weights.keys() if k.startswith("model.vision_tower_compressor.norm_layer.")})
        width = _aligner_width(config, weights) if taps else width
    aligner = AlignerConfig(enabled=taps > 0, hidden_size=int(width or vision.hidden_size))
    if taps:
        if lm.num_layers % (taps - 1):
            raise CheckpointFormatError(f"{taps} aligner taps do not divide {lm.num_layers} layers evenly")
        aligner.tap_interval = lm.num_layers // (taps - 1)
    return EVEModelConfig(name=config.get("_name_or_path", "eve"), language=lm, vision=vision, aligner=aligner)


CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
RELEASE_TEACHER = "openai/clip-vit-large-patch14-336"


def teacher_reference(teacher: Optional[str]) -> str:
    """mm_vision_tower_clip for `teacher`: a local folder as an absolute path (a relative one, as
    recorded at training, breaks once config.json is read from another directory); a hub id, the
    release's above all (transformers fetches it wherever the export is read), or a path that is
    not here, as it is."""
    if not teacher:
        return RELEASE_TEACHER
    if teacher != RELEASE_TEACHER and os.path.isdir(teacher):
        return os.path.abspath(teacher)
    return teacher


def preprocessor_config(model: EVEModelConfig) -> Dict:
    """preprocessor_config.json of EVE's any-resolution processor (the folder the original code
    names in mm_vision_tower and reads with CLIPImageProcessor; eve.md §3): images arrive already
    padded to a square, so resizing and cropping are off."""
    vision = model.vision
    return {
        "image_processor_type": "CLIPImageProcessor", "feature_extractor_type": "CLIPFeatureExtractor",
        "do_resize": False, "do_center_crop": False, "do_normalize": True, "do_rescale": True,
        "do_convert_rgb": True, "rescale_factor": 1 / 255, "resample": 3,
        "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "size": {"shortest_edge": vision.image_size},
        "crop_size": {"height": vision.image_size, "width": vision.image_size},
        "image_size": vision.image_size, "image_size_clip": vision.teacher_image_size,
        "patch_stride": vision.patch_size, "conv_stride": vision.conv_stride, "patch_stride_clip": vision.patch_size,
    }


def hf_config(model: EVEModelConfig, dtype: torch.dtype, vision_tower: Optional[str] = None,
              teacher: Optional[str] = None) -> Dict:
    """config.json of the HF EVE release (eve.md §2) plus what modeling_eve.py needs to run without
    EVE's processor folders, and auto_map so transformers finds our modeling file.

    vision_tower: the folder holding preprocessor_config.json (an export names itself); teacher:
    the CLIP teacher's folder or hub name (the one trained with; the release's name otherwise)."""
    import transformers

    lm, vision = model.language, model.vision
    return {
        "architectures": ["EVELlamaForCausalLM"],
        "model_type": "eve",
        "auto_map": {"AutoConfig": "modeling_eve.EVEConfig", "AutoModelForCausalLM": "modeling_eve.EVELlamaForCausalLM"},
        "hidden_size": lm.hidden_size, "intermediate_size": lm.ffn_hidden_size,
        "num_hidden_layers": lm.num_layers, "num_attention_heads": lm.num_attention_heads,
        "num_key_value_heads": lm.num_query_groups, "max_position_embeddings": lm.max_position_embeddings,
        "rms_norm_eps": lm.norm_epsilon, "rope_theta": float(lm.rotary_base), "rope_scaling": None,
        "vocab_size": lm.vocab_size, "hidden_act": "silu", "initializer_range": 0.02,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
        "torch_dtype": str(dtype).replace("torch.", ""), "use_cache": True,
        "transformers_version": transformers.__version__,  # as save_pretrained (and the release's 4.31.0) writes
        "mm_hidden_size": vision.hidden_size, "mm_projector_type": vision.projector_type,
        "mm_vision_tower": vision_tower or f"openai/eve-patch14-anypixel-{vision.image_size}",
        "mm_vision_tower_clip": teacher_reference(teacher),
        "mm_vision_select_layer": model.aligner.teacher_select_layer, "mm_vision_select_feature": "patch",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
        "requires_cliploss": model.aligner.enabled, "use_mm_proj": True, "tune_mm_mlp_adapter": False,
        "image_aspect_ratio": "square", "image_grid_pinpoints": None,
        "mm_projector_lr": None, "vision_tower_lr": None,
        # Geometry of EVE's processor (its configs were never released with the weights).
        "image_size": vision.image_size, "image_size_clip": vision.teacher_image_size,
        "patch_stride": vision.patch_size, "conv_stride": vision.conv_stride, "mm_vision_heads": vision.num_heads,
        "mm_hidden_size_clip": model.aligner.hidden_size, "mm_aligner_heads": model.aligner.num_heads,
        "mm_aligner_taps": len(model.aligner.taps(lm.num_layers)) if model.aligner.enabled else 0,
    }
