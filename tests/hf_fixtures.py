"""Tiny HF EVE checkpoints for conversion tests, laid out like the BAAI/EVE-7B release."""

from __future__ import annotations

import json
import os

import torch

from megatron_eve.checkpoint.hf_eve import hf_config
from tests.helpers import tiny_config


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
    keys = sorted(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    if fmt == "bin":
        names = [f"pytorch_model-0000{i + 1}-of-00002.bin" for i in range(2)]
        for name, part in zip(names, halves):
            torch.save({k: state[k] for k in part}, os.path.join(folder, name))
        index = {"metadata": {"total_size": 0}, "weight_map": {k: names[i] for i, part in enumerate(halves) for k in part}}
        with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as handle:
            json.dump(index, handle)
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
