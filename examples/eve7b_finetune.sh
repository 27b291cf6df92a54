#!/usr/bin/env bash
# Stage 3, SFT of EVE-7B: from the pretrain checkpoint, LLaVA-mix-665K with the
# vicuna_v1 template, lr 2e-5 for all parameters, warmup 1%, global batch 128 samples (here 32
# sequences ≈ 160 samples, and one epoch 4,156 steps, the reference's 5,198: see eve7b_common.sh).
# Data: tools/preprocess_data.py --template vicuna_v1 --image-size 672 (the default --max-length 4096
# keeps every sample the reference keeps: 2048 text tokens + 601 image positions).
# Usage: bash examples/eve7b_finetune.sh ${node_rank} ${master_addr}
set -euo pipefail
source "$(dirname "$0")/eve7b_common.sh"
train "${COMMON[@]}" \
  --stage finetune --image-size 672 --seq-length 4096 \
  --global-batch-size 32 --train-samples 133000 \
  --lr 2e-5 --vision-lr 2e-5 --lr-warmup-fraction 0.01 \
  --data-path "$DATA/llava_v1_5_mix665k" --split 998,2,0 --eval-interval 500 --eval-iters 10 \
  --pretrained-checkpoint "$CHECKPOINTS/eve-7b-prtr1-672" \
  --load "$CHECKPOINTS/eve-7b-sft-672" --save "$CHECKPOINTS/eve-7b-sft-672" --save-interval 1000 \
  --tensorboard-dir "$CHECKPOINTS/eve-7b-sft-672/tensorboard"
