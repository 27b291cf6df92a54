#!/usr/bin/env python3
"""HF EVE folder (the BAAI/EVE-7B release layout: config.json + pytorch_model-*.bin shards and
index, or safetensors) → a megatron_eve dist checkpoint, written a layer at a time.

  python checkpoint_conversion/hf_to_megatron.py --hf EVE-7B-HD-v1.0 --out checkpoints/eve-7b-hd-megatron \\
      --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2

The result is a checkpoint like the trainer writes (SAVE/iter_0000000/ + latest marker); start a
run from it with --pretrained-checkpoint. dist-checkpointing reshards on load, so it loads at any
TP / PP; the target sizes are checked against the model and set the vocabulary padding.
"""

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_eve.checkpoint.dcp_writer import write_checkpoint  # noqa: E402
from megatron_eve.checkpoint.hf_eve import (  # noqa: E402
    CheckpointFormatError,
    HFWeights,
    check_keys,
    check_padded_vocab,
    check_shapes,
    megatron_plan,
    model_config,
    read_hf_config,
)
from megatron_eve.checkpoint.megatron_dirs import finish_checkpoint, parse_dtype  # noqa: E402
from megatron_eve.config import ConfigError, ParallelConfig, RuntimeConfig, validate  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="HF EVE folder")
    p.add_argument("--out", required=True, help="megatron checkpoint root (iter_0000000/ is written inside)")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--image-size", type=int, default=None, help="override the PEL resolution read from config.json")
    p.add_argument("--dtype", default="bfloat16", help="stored dtype: bfloat16, float16 or float32")
    args = p.parse_args(argv)
    try:
        hf = HFWeights(args.hf)
        model = model_config(read_hf_config(args.hf), hf, args.image_size)
        validate(model, ParallelConfig(args.target_tensor_parallel_size, args.target_pipeline_parallel_size),
                 RuntimeConfig())
        check_keys(hf, model.language, need_vision=True)
        check_shapes(hf, model)
        padded = check_padded_vocab(model, args.target_tensor_parallel_size)
        plan = megatron_plan(hf, model, padded, parse_dtype(args.dtype))
        common = {"converted_from": os.path.abspath(args.hf), "model_config": asdict(model)}
        directory = finish_checkpoint(args.out, lambda d: write_checkpoint(d, plan, common), plan)
    except (CheckpointFormatError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {directory}: {len(plan)} tensors, {model.language.num_layers} layers, "
          f"{'with' if model.aligner.enabled else 'without'} the aligner; start training from it with "
          f"--pretrained-checkpoint {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
