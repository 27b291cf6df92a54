#!/usr/bin/env bash
# Stage 1, prealign: from Vicuna-7B-v1.5, train only the PEL, projector and aligner
# on EVE-cap (16M of the 33M captions), lr 4e-4 (the reference's vision / projector lr), warmup 3%.
# Usage: bash examples/eve7b_prealign.sh ${node_rank} ${master_addr}
set -euo pipefail
source "$(dirname "$0")/eve7b_common.sh"
# Vicuna-7B-v1.5 converted to a megatron checkpoint (checkpoint_conversion/): the starting weights;
# a resubmitted job resumes from its own --load instead.
VICUNA=${VICUNA:-$CHECKPOINTS/vicuna-7b-v1.5-megatron}
train "${COMMON[@]}" \
  --stage prealign --image-size 672 --seq-length 4096 \
  --global-batch-size 80 --train-samples 2461600 \
  --lr 4e-4 --vision-lr 4e-4 --lr-warmup-fraction 0.03 \
  --data-path "$DATA/eve_cap16m" --split 1000,0,0 \
  --pretrained-checkpoint "$VICUNA" \
  --load "$CHECKPOINTS/eve-7b-prtr0-672" --save "$CHECKPOINTS/eve-7b-prtr0-672" --save-interval 1000 \
  --tensorboard-dir "$CHECKPOINTS/eve-7b-prtr0-672/tensorboard"
