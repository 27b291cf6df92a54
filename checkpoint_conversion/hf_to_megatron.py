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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eve.atomic import os_error_line  # noqa: E402
from megatron_eve.checkpoint.hf_config import model_config, read_hf_config  # noqa: E402
from megatron_eve.checkpoint.hf_eve import CheckpointFormatError, HFWeights  # noqa: E402
from megatron_eve.checkpoint.megatron_dirs import write_megatron  # noqa: E402
from megatron_eve.config import ConfigError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="HF EVE folder")
    p.add_argument("--out", required=True, help="megatron checkpoint root (iter_0000000/ is written inside)")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--image-size", type=int, default=None, help="override the PEL resolution read from config.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it holds files that are not an earlier conversion")
    p.add_argument("--dtype", default=None, help="stored dtype: bfloat16, float16 or float32 (default: the source's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, batch jobs)")
    args = p.parse_args(argv)
    try:
        hf = HFWeights(args.hf)
        model = model_config(read_hf_config(args.hf), hf, args.image_size)
        directory, count = write_megatron(hf, model, args.out, args.target_tensor_parallel_size,
                                          args.target_pipeline_parallel_size, args.dtype, need_vision=True,
                                          overwrite=args.overwrite, progress=not args.no_progress)
    except (CheckpointFormatError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # the output side (a full disk, rights): the file, else --out
        print(f"error: {os_error_line(error, args.out)}", file=sys.stderr)
        return 1
    print(f"wrote {directory}: {count} tensors, {model.language.num_layers} layers, "
          f"{'with' if model.aligner.enabled else 'without'} the aligner; start training from it with "
          f"--pretrained-checkpoint {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
