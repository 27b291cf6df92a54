#!/usr/bin/env bash
# EVE on a laptop-sized CPU machine, end to end in about 10 minutes on 2 cores:
# a synthetic corpus of coloured shapes (captions and Q&A) → a SentencePiece tokenizer →
# indexed datasets → prealign (TP=2) → pretrain (PP=2) → finetune (TP=2), 2 processes each,
# with TensorBoard logs. Run from anywhere: bash examples/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-runs/quickstart}
CAPTIONS=${CAPTIONS:-2000}
QA=${QA:-2000}

if [ ! -x .venv/bin/python ]; then  # first run: the install of README.md
  PYTHON=${PYTHON:-$(command -v python3.12 || echo "$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3.12")}
  "$PYTHON" -m venv .venv
  .venv/bin/pip install --upgrade pip
  .venv/bin/pip install torch==2.13.0 -e ".[dev]"
fi
PY=.venv/bin/python
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
mkdir -p "$WORK/logs"

echo "== 1/5 synthetic corpus, tokenizer and a small random CLIP teacher"
$PY tools/make_synthetic_corpus.py --out "$WORK/corpus" --captions "$CAPTIONS" --qa "$QA"

echo "== 2/5 preprocessing (tiny geometry: 224-px PEL view, 112-px teacher view)"
for pair in "caption.json:plain:captions" "qa_train.json:vicuna_v1:qa"; do
  IFS=: read -r input template name <<< "$pair"
  $PY tools/preprocess_data.py --input "$WORK/corpus/$input" --image-folder "$WORK/corpus" \
    --template "$template" --tokenizer-model "$WORK/corpus/tokenizer.model" \
    --image-size 224 --teacher-image-size 112 --max-length 512 \
    --output-prefix "$WORK/data/$name" --workers 2 --no-progress
done

COMMON=(--preset tiny --micro-batch-size 4 --seq-length 512 --split 98,2,0 --num-workers 1
        --tokenizer-model "$WORK/corpus/tokenizer.model" --vision-teacher-path "$WORK/corpus/teacher"
        --lr-decay-style cosine --weight-decay 0.0 --log-interval 10 --eval-interval 50 --eval-iters 1
        --seed 1234)
train() {  # stage, log name, extra flags...
  local stage=$1 name=$2; shift 2
  echo "== $stage"
  $PY -m torch.distributed.run --nproc-per-node 2 --master-port "${MASTER_PORT:-29500}" pretrain_eve.py \
    --stage "$stage" "${COMMON[@]}" --tensorboard-dir "$WORK/tensorboard/$name" "$@" 2>&1 \
    | tee "$WORK/logs/$name.log" | grep -E "iteration +[0-9]+/|validation|error|Error" || true
  test "${PIPESTATUS[0]}" -eq 0
}

echo "== 3/5 prealign: PEL, projector and aligner learn; the language model is frozen"
train prealign prealign --tensor-model-parallel-size 2 --global-batch-size 8 --train-iters 30 \
  --lr 2e-3 --lr-warmup-fraction 0.03 --data-path "$WORK/data/captions" \
  --load "$WORK/checkpoints/prealign" --save "$WORK/checkpoints/prealign"

echo "== 4/5 pretrain: everything learns (2 pipeline stages)"
train pretrain pretrain --pipeline-model-parallel-size 2 --global-batch-size 8 --train-iters 120 \
  --lr 1e-3 --lr-warmup-fraction 0.01 --data-path "$WORK/data/captions" \
  --pretrained-checkpoint "$WORK/checkpoints/prealign" --load "$WORK/checkpoints/pretrain" \
  --save "$WORK/checkpoints/pretrain"

echo "== 5/5 finetune on questions and answers (tensor parallel)"
train finetune finetune --tensor-model-parallel-size 2 --global-batch-size 8 --train-iters 100 \
  --lr 1e-3 --lr-warmup-fraction 0.01 --data-path "$WORK/data/qa" \
  --pretrained-checkpoint "$WORK/checkpoints/pretrain" --load "$WORK/checkpoints/finetune" \
  --save "$WORK/checkpoints/finetune"

$PY - "$WORK" <<'PYEOF'
import re, sys
work = sys.argv[1]
print("\nLM loss, first → last logged iteration (align loss alongside):")
for stage in ("prealign", "pretrain", "finetune"):
    text = open(f"{work}/logs/{stage}.log").read()
    rows = re.findall(r"lm loss: (\S+) \| align loss: (\S+)", text)
    (lm0, al0), (lm1, al1) = rows[0], rows[-1]
    print(f"  {stage:9s} lm {float(lm0):.3f} → {float(lm1):.3f}   align {float(al0):.3f} → {float(al1):.3f}")
print(f"TensorBoard: tensorboard --logdir {work}/tensorboard   checkpoints: {work}/checkpoints")
PYEOF
