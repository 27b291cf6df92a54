"""Greedy generation from a converted tiny checkpoint at this TP / PP (launched by
tests/test_generation.py): batched with the KV cache, batched without it, and one by one."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_eve import distributed  # noqa: E402
from megatron_eve.config import ParallelConfig  # noqa: E402
from megatron_eve.inference.backends import MegatronBackend, Request  # noqa: E402
from megatron_eve.inference.generate import Generator, Sampling, chat_prompt  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--load", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--images", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()
    parallel = ParallelConfig(args.tp, args.pp)
    distributed.initialize(parallel)
    backend = MegatronBackend(args.load, args.tokenizer, parallel)
    requests = [Request(chat_prompt("What is in the picture?", True), [args.images[0]]),
                Request(chat_prompt("Describe the shape and its colour in detail, please.", True), [args.images[1]]),
                Request(chat_prompt("What is two plus three?", False)),
                Request(chat_prompt("Where is it?", True), [args.images[2]])]
    prompts = [backend.prepare(r) for r in requests]
    sampling = Sampling(max_new_tokens=8)
    cached = Generator(backend.model, True, backend.tokenizer.vocab_size).generate(prompts, sampling)
    uncached = Generator(backend.model, False, backend.tokenizer.vocab_size).generate(prompts, sampling)
    single = [Generator(backend.model, True, backend.tokenizer.vocab_size).generate([p], sampling)[0] for p in prompts]
    texts = backend.answer(requests, sampling)
    results = {"cached": cached, "uncached": uncached, "single": single, "texts": [str(t) for t in texts],
               "prompt_lengths": [len(p.tokens) for p in prompts]}
    # --bf16: the stage runs in bf16 (Float16Module, as in training) and follows the fp32 logits.
    half = MegatronBackend(args.load, args.tokenizer, parallel, bf16=True)
    results["bf16_dtype"] = str(next(half.model.parameters()).dtype)
    results["bf16_texts"] = [str(t) for t in half.answer(requests, sampling)]
    if dist.get_world_size() == 1:
        first = prompts[3]
        ids = torch.tensor([first.tokens])
        mask = ~torch.ones(1, 1, len(first.tokens), len(first.tokens), dtype=torch.bool).tril()
        images = torch.stack(first.images)
        full = Generator(backend.model, False)._forward(ids, mask, images, None)
        reduced = Generator(half.model, False)._forward(ids, mask, images.bfloat16(), None)
        results["bf16_logits_rel_error"] = float((reduced - full).norm() / full.norm())
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results))
    distributed.destroy()


if __name__ == "__main__":
    main()
