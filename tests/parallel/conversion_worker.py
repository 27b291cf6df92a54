"""Conversion checks on the real model (launched by tests/test_conversion.py).

relayout: load a converted checkpoint at this TP / PP (weights only, as --pretrained-checkpoint
          does), save it again from this layout.
logits:   one process: logits of the megatron model from a checkpoint vs the exported HF folder
          under plain transformers, text only and with an image; and a Llama-only conversion vs
          LlamaForCausalLM.
"""

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_eve import distributed  # noqa: E402
from megatron_eve.config import ParallelConfig, RuntimeConfig, model_config_from_dict  # noqa: E402
from megatron_eve.model.build import build_model  # noqa: E402
from megatron_eve.training.checkpoint import TRACKER, checkpoint_dir, latest_iteration  # noqa: E402

RUNTIME = RuntimeConfig(use_cpu_initialization=True)


def load_model(root, parallel):
    from megatron.core import dist_checkpointing

    directory = checkpoint_dir(root, latest_iteration(root))
    cfg = model_config_from_dict(dist_checkpointing.load_common_state_dict(directory)["model_config"])
    cfg.aligner.teacher_path = None
    model = build_model(cfg, parallel, RUNTIME)
    sd = model.sharded_state_dict()
    available = set(dist_checkpointing.load_tensors_metadata(directory))
    present = {k: v for k, v in sd.items() if getattr(v, "key", k) in available}
    model.load_state_dict(dist_checkpointing.load(present, directory), strict=False)
    return model, cfg, sorted(set(sd) - set(present))


def relayout(args):
    from megatron.core import dist_checkpointing

    parallel = ParallelConfig(args.tp, args.pp)
    distributed.initialize(parallel)
    model, cfg, missing = load_model(args.src, parallel)
    assert not [k for k in missing if "_extra_state" not in k], missing
    out = checkpoint_dir(args.dst, 0)
    if dist.get_rank() == 0:
        os.makedirs(out, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save({**model.sharded_state_dict(), "model_config": asdict(cfg)}, out)
    if dist.get_rank() == 0:
        Path(args.dst, TRACKER).write_text("0")
    distributed.destroy()


def logits(args):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from megatron_eve.data.images import preprocess_image, token_grid, tokens_per_image
    from megatron_eve.model.visual_layout import IMAGE_TOKEN_INDEX
    from tests.helpers import random_image

    distributed.initialize(ParallelConfig())
    results = {}
    model, cfg, _ = load_model(args.megatron, ParallelConfig())
    model.eval()
    hf = AutoModelForCausalLM.from_pretrained(args.hf, trust_remote_code=True, dtype=torch.float32).eval()
    results["hf_class"] = type(hf).__name__
    text = torch.randint(3, cfg.language.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    image = random_image(200, 120, seed=1)
    pixels, _ = preprocess_image(image, cfg.vision)
    run = tokens_per_image(*token_grid(200, 120, cfg.vision))
    expanded = torch.cat([text[:, :5], torch.full((1, run), IMAGE_TOKEN_INDEX), text[:, 5:]], dim=1)
    single = torch.cat([text[:, :5], torch.full((1, 1), IMAGE_TOKEN_INDEX), text[:, 5:]], dim=1)
    with torch.no_grad():
        ours_text = model(text)[..., : cfg.language.vocab_size]
        theirs_text = hf(input_ids=text).logits
        ours_image = model(expanded, images=pixels[None])[..., : cfg.language.vocab_size]
        theirs_image = hf(input_ids=single, images=hf.process_images([image])).logits
        hf_pixels = hf.process_images([image])
        generated = hf.generate(single, images=hf_pixels, max_new_tokens=4, do_sample=False)
    results["text_max_abs_diff"] = float((ours_text - theirs_text).abs().max())
    results["image_shapes"] = [list(ours_image.shape), list(theirs_image.shape)]
    results["image_max_abs_diff"] = float((ours_image - theirs_image).abs().max())
    results["logit_scale"] = float(theirs_image.abs().max())
    results["process_images_max_abs_diff"] = float((hf_pixels[0] - pixels).abs().max())
    results["generated_shape"] = list(generated.shape)

    if args.llama_hf:
        llama, llama_cfg, missing = load_model(args.llama_megatron, ParallelConfig())
        reference = LlamaForCausalLM.from_pretrained(args.llama_hf, dtype=torch.float32).eval()
        with torch.no_grad():
            diff = (llama.eval()(text)[..., : llama_cfg.language.vocab_size] - reference(text).logits).abs().max()
        results["llama_max_abs_diff"] = float(diff)
        results["llama_missing"] = [k for k in missing if "_extra_state" not in k]
    Path(args.out).write_text(json.dumps(results, indent=1))
    distributed.destroy()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["relayout", "logits"])
    for name in ("--src", "--dst", "--megatron", "--hf", "--out", "--llama-hf", "--llama-megatron"):
        parser.add_argument(name)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parsed = parser.parse_args()
    relayout(parsed) if parsed.mode == "relayout" else logits(parsed)
