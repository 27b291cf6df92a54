#!/usr/bin/env python3
"""Train EVE on megatron-core. Launch with torchrun, e.g. on one node with 8 GPUs:

  torchrun --nproc-per-node 8 pretrain_eve.py --stage prealign --preset eve-7b \\
      --tensor-model-parallel-size 2 --micro-batch-size 2 --global-batch-size 512 --seq-length 4096 \\
      --lr 4e-4 --lr-warmup-fraction 0.03 --train-iters 31250 --bf16 \\
      --data-path data/cap --tokenizer-model vicuna-7b-v1.5 \\
      --vision-teacher-path clip-vit-large-patch14-336 --save ckpt/prealign --save-interval 1000

`python pretrain_eve.py --help` lists every flag (Megatron-LM names); examples/ has the four stages.
"""

import sys

from megatron_eve.training.loop import main

if __name__ == "__main__":
    sys.exit(main())
