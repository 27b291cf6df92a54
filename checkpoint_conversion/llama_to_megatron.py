#!/usr/bin/env python3
"""Llama / Vicuna HF folder (e.g. lmsys/vicuna-7b-v1.5) → a megatron_eve dist checkpoint for
EVE's first stage: the language model converted, the patch embedding layer, projector and
aligner freshly initialised as the reference does (PyTorch defaults, CLS / split ~ N(0, 1)).

  python checkpoint_conversion/llama_to_megatron.py --hf vicuna-7b-v1.5 --preset eve-7b \\
      --out checkpoints/vicuna-7b-v1.5-megatron
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eve.atomic import os_error_line  # noqa: E402
from megatron_eve.checkpoint.hf_config import language_config, read_hf_config  # noqa: E402
from megatron_eve.checkpoint.hf_eve import CheckpointFormatError, HFWeights, fresh_vision_tensors  # noqa: E402
from megatron_eve.checkpoint.megatron_dirs import write_megatron  # noqa: E402
from megatron_eve.config import PRESETS, ConfigError, get_preset, replace  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="HF LlamaForCausalLM folder")
    p.add_argument("--out", required=True, help="megatron checkpoint root")
    p.add_argument("--preset", choices=sorted(PRESETS), default="eve-7b", help="vision and aligner settings")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it holds files that are not an earlier conversion")
    p.add_argument("--dtype", default=None, help="stored dtype: bfloat16, float16 or float32 (default: the source's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, batch jobs)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the fresh vision modules")
    args = p.parse_args(argv)
    try:
        hf = HFWeights(args.hf)
        config = read_hf_config(args.hf)
        model = replace(get_preset(args.preset), language=language_config(config))
        if args.image_size:
            model = replace(model, **{"vision.image_size": args.image_size})
        if any(k.startswith(("model.vision_tower.", "model.mm_projector.")) for k in hf.keys()):
            raise CheckpointFormatError(f"{args.hf} already holds EVE vision weights: use hf_to_megatron.py")
        directory, _ = write_megatron(hf, model, args.out, args.target_tensor_parallel_size,
                                      args.target_pipeline_parallel_size, args.dtype, need_vision=False,
                                      extra=fresh_vision_tensors(model, args.seed), overwrite=args.overwrite,
                                      progress=not args.no_progress)
    except (CheckpointFormatError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # the output side (a full disk, rights): the file, else --out
        print(f"error: {os_error_line(error, args.out)}", file=sys.stderr)
        return 1
    print(f"wrote {directory}: {model.language.num_layers}-layer language model with a fresh PEL, projector and "
          f"aligner; start the prealign stage with --pretrained-checkpoint {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
