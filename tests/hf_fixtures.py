"""Tiny HF EVE checkpoints for conversion tests, laid out like the BAAI/EVE-7B release."""

from __future__ import annotations

import json
import os

import torch

from megatron_eve.checkpoint.hf_config import hf_config
from tests.helpers import tiny_config


def write_bin_shards(folder: str, state: dict) -> None:
    """Two pytorch_model-*.bin shards and their index, as the release ships its weights."""
    keys = sorted(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    names = [f"pytorch_model-0000{i + 1}-of-00002.bin" for i in range(2)]
    for name, part in zip(names, halves):
        torch.save({k: state[k] for k in part}, os.path.join(folder, name))
    index = {"metadata": {"total_size": 0}, "weight_map": {k: names[i] for i, part in enumerate(halves) for k in part}}
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as handle:
        json.dump(index, handle)


def tiny_hf_eve(folder: str, fmt: str = "bin", seed: int = 0, with_teacher_keys: bool = True) -> dict:
    """A random tiny EVE in HF format: two `.bin` shards + index (or safetensors), config.json with
    EVE's fields, and — as the release has — the CLIP teacher's keys, which converters skip."""
    from megatron_eve.hf.modeling_eve import EVEConfig, EVELlamaForCausalLM

    os.makedirs(folder, exist_ok=True)
    config = hf_config(tiny_config(), torch.float32)
    config["torch_dtype"] = "float32"
    config.pop("auto_map")
    torch.manual_seed(seed)
    model = EVELlamaForCausalLM(EVEConfig(**config)).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for key in list(state):  # random values everywhere (HF init leaves some tensors at exact 0/1)
        state[key] = torch.randn_like(state[key]) * 0.05 + (1.0 if key.endswith("norm.weight") else 0.0)
    if with_teacher_keys:
        for name in ("model.vision_clip.backbone.vision_model.embeddings.class_embedding",
                     "model.vision_tower_compressor.clip_layer.backbone.vision_model.embeddings.class_embedding"):
            state[name] = torch.randn(64)
    if fmt == "bin":
        write_bin_shards(folder, state)
    else:
        from safetensors.torch import save_file

        save_file(state, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(config, handle)
    return state


def converted_tiny_eve(root, tokenizer: str) -> dict:
    """tiny_hf_eve converted to a megatron checkpoint (fp32) by the real converter, plus three
    images of different shapes: what generation tests load."""
    import subprocess
    import sys

    from tests.helpers import ROOT, random_image

    tiny_hf_eve(str(root / "hf"), fmt="safetensors", with_teacher_keys=False)
    out = subprocess.run([sys.executable, str(ROOT / "checkpoint_conversion" / "hf_to_megatron.py"), "--hf",
                          root / "hf", "--out", root / "ckpt", "--dtype", "float32"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    images = []
    for i, size in enumerate([(200, 120), (90, 180), (160, 160)]):
        path = root / f"image{i}.png"
        random_image(*size, seed=i).save(path)
        images.append(str(path))
    return {"root": root, "load": str(root / "ckpt"), "tokenizer": tokenizer, "images": images}


def release_config(model, dtype: str = "bfloat16") -> dict:
    """config.json with exactly the fields the BAAI/EVE-7B-v1.0 release writes (eve.md §2), for
    `model`'s sizes: nothing that only our exporter writes (no aligner width, taps or processor
    geometry), so readers must take those from the weights or the release's conventions."""
    lm, vision = model.language, model.vision
    return {
        "_name_or_path": "checkpoints/eve-7b-prtr1-672-mse", "architectures": ["EVELlamaForCausalLM"],
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": lm.hidden_size,
        "image_aspect_ratio": "square", "image_grid_pinpoints": None, "initializer_range": 0.02,
        "intermediate_size": lm.ffn_hidden_size, "max_position_embeddings": lm.max_position_embeddings,
        "mm_hidden_size": vision.hidden_size, "mm_projector_lr": 2e-05, "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": f"openai/eve-patch14-anypixel-{vision.image_size}",
        "mm_vision_tower_clip": "openai/clip-vit-large-patch14-336", "model_type": "eve",
        "num_attention_heads": lm.num_attention_heads, "num_hidden_layers": lm.num_layers,
        "num_key_value_heads": lm.num_query_groups, "pad_token_id": 0, "pretraining_tp": 1,
        "requires_cliploss": True, "rms_norm_eps": lm.norm_epsilon, "rope_scaling": None,
        "tie_word_embeddings": False, "torch_dtype": dtype, "transformers_version": "4.31.0",
        "tune_mm_mlp_adapter": False, "use_cache": True, "use_mm_proj": True, "vision_tower_lr": 2e-05,
        "vocab_size": lm.vocab_size,
    }


def release_like_eve(folder: str, model, dtype=torch.bfloat16, seed: int = 0) -> dict:
    """A random EVE saved the way the release is: `.bin` shards + index under the reference's key
    names (the teacher's keys and rotary inv_freq buffers included), release_config() as config.json."""
    from megatron_eve.checkpoint.hf_eve import expected_shapes

    os.makedirs(folder, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    state = {key: (torch.randn(shape, generator=generator) * 0.05
                   + (1.0 if key.endswith(("norm.weight", ".0.weight")) and len(shape) == 1 else 0.0)).to(dtype)
             for key, shape in expected_shapes(model).items()}
    for i in range(model.language.num_layers):
        head = model.language.hidden_size // model.language.num_attention_heads
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(head // 2, generator=generator)
    width = model.aligner.hidden_size
    state["model.vision_clip.backbone.vision_model.embeddings.class_embedding"] = torch.randn(width).to(dtype)
    write_bin_shards(folder, state)
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(release_config(model, str(dtype).replace("torch.", "")), handle, indent=2)
    return state
