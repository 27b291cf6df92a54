"""Greedy generation from a converted tiny checkpoint at this TP / PP (launched by
tests/test_generation.py): batched with the KV cache, batched without it, and one by one."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

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
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps({"cached": cached, "uncached": uncached, "single": single,
                                              "texts": [str(t) for t in texts],
                                              "prompt_lengths": [len(p.tokens) for p in prompts]}))
    distributed.destroy()


if __name__ == "__main__":
    main()
