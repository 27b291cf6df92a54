#!/usr/bin/env bash
# Stage 2, pretrain: from the prealign checkpoint, train everything (the CLIP teacher
# stays frozen) on EVE-cap33M, lr 4e-5 for all parameters, warmup 1%.
# Usage: bash examples/eve7b_pretrain.sh ${node_rank} ${master_addr}
set -euo pipefail
source "$(dirname "$0")/eve7b_common.sh"
train "${COMMON[@]}" \
  --stage pretrain --image-size 672 --seq-length 4096 \
  --global-batch-size 80 --train-samples 5076900 \
  --lr 4e-5 --lr-warmup-fraction 0.01 \
  --data-path "$DATA/eve_cap33m" --split 1000,0,0 \
  --pretrained-checkpoint "$CHECKPOINTS/eve-7b-prtr0-672" \
  --load "$CHECKPOINTS/eve-7b-prtr1-672" --save "$CHECKPOINTS/eve-7b-prtr1-672" --save-interval 1000 \
  --tensorboard-dir "$CHECKPOINTS/eve-7b-prtr1-672/tensorboard"
