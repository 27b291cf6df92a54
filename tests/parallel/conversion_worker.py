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
from megatron_eve.config import ParallelConfig  # noqa: E402
from megatron_eve.training.checkpoint_records import TRACKER, checkpoint_dir  # noqa: E402


def load_model(root, parallel):
    """The checkpoint's model at this layout, weights only (it raises if any is missing)."""
    from megatron_eve.inference.generate import load_model_for_inference

    return load_model_for_inference(root, parallel)


def relayout(args):
    from megatron.core import dist_checkpointing

    parallel = ParallelConfig(args.tp, args.pp)
    distributed.initialize(parallel)
    model, cfg = load_model(args.src, parallel)
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
    model, cfg = load_model(args.megatron, ParallelConfig())
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
        llama, llama_cfg = load_model(args.llama_megatron, ParallelConfig())
        reference = LlamaForCausalLM.from_pretrained(args.llama_hf, dtype=torch.float32).eval()
        with torch.no_grad():
            diff = (llama.eval()(text)[..., : llama_cfg.language.vocab_size] - reference(text).logits).abs().max()
        results["llama_max_abs_diff"] = float(diff)
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
