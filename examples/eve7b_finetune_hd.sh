#!/usr/bin/env bash
# Stage 3, SFT of EVE-7B-HD: from the 672-px pretrain checkpoint (not EVE-7B), at
# 1344 px (the PEL has no position table, so the same weights take the larger images),
# eve_instruct_mix1.8m, lr 2e-5, warmup 1%, global batch 128 samples (here 48 sequences ≈ 144:
# see eve7b_common.sh). A square image is 2353 tokens and the reference allows 4096 text tokens
# besides, so sequences are 8192 positions (RoPE has no learned table; Vicuna's 4096 is not a hard
# limit, as in the reference: --max-position-embeddings is the run's, not the checkpoint's).
# Data: tools/preprocess_data.py --template vicuna_v1 --image-size 1344 --max-length 8192 (the
# default 4096 would drop a square image's sample with more than ~1,740 text tokens).
# Usage: bash examples/eve7b_finetune_hd.sh ${node_rank} ${master_addr}
set -euo pipefail
source "$(dirname "$0")/eve7b_common.sh"
train "${COMMON[@]}" \
  --stage finetune --preset eve-7b-hd --image-size 1344 --seq-length 8192 --max-position-embeddings 8192 \
  --global-batch-size 48 --train-samples 600000 \
  --lr 2e-5 --vision-lr 2e-5 --lr-warmup-fraction 0.01 \
  --data-path "$DATA/eve_instruct_mix1.8m_1344" --split 998,2,0 --eval-interval 500 --eval-iters 10 \
  --pretrained-checkpoint "$CHECKPOINTS/eve-7b-prtr1-672" \
  --load "$CHECKPOINTS/eve-7b-hd-sft-1344" --save "$CHECKPOINTS/eve-7b-hd-sft-1344" --save-interval 1000 \
  --tensorboard-dir "$CHECKPOINTS/eve-7b-hd-sft-1344/tensorboard"
