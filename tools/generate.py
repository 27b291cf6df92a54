#!/usr/bin/env python3
"""Chat with an EVE model: an image (or none) and a question, answered with the vicuna_v1 template.

  # a megatron checkpoint, any TP / PP
  torchrun --nproc-per-node 2 tools/generate.py --load checkpoints/eve-7b-sft-672 \\
      --tokenizer-model vicuna-7b-v1.5 --tensor-model-parallel-size 2 --image cat.jpg --prompt "What is this?"
  # an HF export under plain transformers
  python tools/generate.py --hf exports/eve-7b --image cat.jpg --prompt "What is this?"

Greedy by default (--temperature, with --top-k / --top-p, to sample), stops at </s> or where the
model's positions end (--max-new-tokens is cut to what the prompt leaves), uses a KV cache
(--no-kv-cache recomputes the whole sequence each step). Without --prompt, reads questions
from standard input, one per line.
"""

import argparse
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eve.config import ConfigError, ParallelConfig, RuntimeConfig  # noqa: E402
from megatron_eve.config.options import add_flags  # noqa: E402
from megatron_eve.inference.generate import PromptError, Sampling, SamplingError, chat_prompt  # noqa: E402
from megatron_eve.inference.generate import checked_sampling  # noqa: E402


class Parser(argparse.ArgumentParser):
    """A command-line mistake is one line (and exit code 2), not a usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def integer_in(least: int, most: Optional[int] = None):
    """An argparse type: an integer in [least, most] (eval_vqa's counts, the demo's port: out of range,
    they fail late, e.g. OverflowError)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < least or (most is not None and value > most):
            bounds = f"{least} or more" if most is None else f"between {least} and {most}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, not {value}")
        return value
    return parse


def add_model_args(p: argparse.ArgumentParser, demo: bool = False, max_new_tokens_help: Optional[str] = None) -> None:
    """The model and sampling flags of generate.py, eval_vqa.py answer and (demo) app.py. The demo
    serves a --load checkpoint in one process (TP = PP = 1): it has no --hf and no TP / PP flags.
    `max_new_tokens_help`: --max-new-tokens defaults to None (the caller picks it), and says so."""
    g = p.add_argument_group("model")
    g.add_argument("--load", required=demo,
                   help="megatron checkpoint root" + ("" if demo else " (launch with torchrun)"))
    if demo:
        p.set_defaults(hf=None, tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    else:
        g.add_argument("--hf", help="HF export folder, holding config.json (python, one process)")
    g.add_argument("--tokenizer-model", help="with --load: tokenizer.model or a folder holding one")
    if not demo:
        add_flags(g, ParallelConfig, only=("tensor_model_parallel_size", "pipeline_model_parallel_size"))
    g.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence at each step")
    # Not RuntimeConfig's --bf16: its help is about training (the optimizer's fp32 master weights).
    g.add_argument("--bf16", action="store_true", help="bf16 weights and activations (default: fp32)")
    add_flags(g, RuntimeConfig, only=("transformer_impl",))  # the layer spec matters with --load only
    g = p.add_argument_group("sampling" + (": the sliders' starting values" if demo else ""))
    g.add_argument("--max-new-tokens", type=int, default=None if max_new_tokens_help else 128,
                   help=max_new_tokens_help or "1 or more")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    if not demo:  # the demo's sliders have no top-k: it samples with the default, as the reference demo does
        g.add_argument("--top-k", type=int, default=50,
                       help="0 (off) or more; default 50, as transformers' generate() samples (after "
                            "--temperature, before --top-p)")
    g.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]")
    # torch.manual_seed's range: beyond it, an OverflowError once the model has loaded
    g.add_argument("--seed", type=integer_in(-0x8000_0000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF), default=0,
                   help="of the sampling (temperature > 0)")


def check_sampling_args(p: argparse.ArgumentParser, args) -> None:
    """Sampling flags out of range: refused as a command-line mistake, before any model is loaded."""
    try:
        sampling(args)
    except SamplingError as error:
        p.error(str(error))


def setup(args):
    """The backend, and whether this process prints (rank 0 of a megatron launch)."""
    from megatron_eve.inference.backends import make_backend

    if bool(args.load) == bool(args.hf):
        raise SystemExit("error: give exactly one of --load (with --tokenizer-model) and --hf")
    if args.hf:
        return make_backend(args), True
    if not args.tokenizer_model:
        raise SystemExit("error: --load needs --tokenizer-model")
    import torch.distributed as dist

    from megatron_eve import distributed

    parallel = ParallelConfig(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    distributed.initialize(parallel)
    return make_backend(args, parallel), dist.get_rank() == 0


def sampling(args) -> Sampling:
    """The flags' Sampling (SamplingError out of range: check_sampling_args reports it)."""
    return checked_sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed,
                            top_k=getattr(args, "top_k", 50))  # the demo has no --top-k


def main(argv=None) -> int:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    p.add_argument("--prompt", default=None, help="the question; omitted: read questions from stdin")
    args = p.parse_args(argv)
    check_sampling_args(p, args)
    if args.prompt is not None and not args.prompt.strip():  # else nothing (or blanks) would be asked
        p.error("--prompt is empty: give a question, or omit --prompt to read questions from standard input")
    try:
        return answer_questions(args)
    except KeyboardInterrupt:  # Ctrl-C (on every rank of a launch): one line, from rank 0
        from megatron_eve.ranks import is_rank_zero

        if is_rank_zero():
            print("interrupted", file=sys.stderr)
        return 130


def answer_questions(args) -> int:
    from megatron_eve.inference.backends import Request

    try:
        backend, printer = setup(args)
    except ConfigError as error:  # a flag, or a checkpoint that cannot be loaded: one line naming it
        print(f"error: {error}", file=sys.stderr)
        return 1
    questions = [args.prompt.strip()] if args.prompt is not None else (line.strip() for line in sys.stdin)
    status = 0
    for question in questions:
        if not question:
            continue
        text = chat_prompt(question, with_image=False)
        if args.image:
            text = chat_prompt("<image>\n" * (len(args.image) - 1) + question, with_image=True)
        answer = backend.answer([Request(text, args.image)], sampling(args))[0]
        if printer:
            if isinstance(answer, PromptError):
                print(f"error: {answer}", file=sys.stderr)
                status = 1
            else:
                print(answer, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
