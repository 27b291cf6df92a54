#!/usr/bin/env bash
# EVE on a laptop-sized CPU machine, end to end in about 10 minutes on 2 cores:
# a synthetic corpus of coloured shapes (captions and Q&A) → a SentencePiece tokenizer →
# indexed datasets → prealign (TP=2) → pretrain (PP=2) → finetune (TP=2), 2 processes each,
# with TensorBoard logs → questions about held-out images answered and scored.
# Run from anywhere: bash examples/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-runs/quickstart}
CAPTIONS=${CAPTIONS:-2000}
QA=${QA:-2000}

if [ ! -x .venv/bin/python ]; then  # first run: the install of README.md
  PYTHON=$(bash tools/find_python312.sh)
  "$PYTHON" -m venv .venv
  .venv/bin/pip install --upgrade pip
  .venv/bin/pip install torch==2.13.0 -e ".[dev]"
fi
PY=.venv/bin/python
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
mkdir -p "$WORK/logs"

echo "== 1/6 synthetic corpus, tokenizer and a small random CLIP teacher"
$PY tools/make_synthetic_corpus.py --out "$WORK/corpus" --captions "$CAPTIONS" --qa "$QA"

echo "== 2/6 preprocessing (tiny geometry: 224-px PEL view, 112-px teacher view)"
for pair in "caption.json:plain:captions" "qa_train.json:vicuna_v1:qa"; do
  IFS=: read -r input template name <<< "$pair"
  $PY tools/preprocess_data.py --input "$WORK/corpus/$input" --image-folder "$WORK/corpus" \
    --template "$template" --tokenizer-model "$WORK/corpus/tokenizer.model" \
    --image-size 224 --teacher-image-size 112 --max-length 256 \
    --output-prefix "$WORK/data/$name" --workers 2 --no-progress
done

COMMON=(--preset tiny --micro-batch-size 4 --seq-length 256 --split 98,2,0 --num-workers 1
        --tokenizer-model "$WORK/corpus/tokenizer.model" --vision-teacher-path "$WORK/corpus/teacher"
        --lr-decay-style cosine --weight-decay 0.0 --log-interval 25 --eval-interval 100 --eval-iters 1
        --seed 1234)
train() {  # stage, log name, extra flags...
  local stage=$1 name=$2; shift 2
  echo "== $stage"
  $PY -m torch.distributed.run --nproc-per-node 2 --master-port "${MASTER_PORT:-29500}" pretrain_eve.py \
    --stage "$stage" "${COMMON[@]}" --tensorboard-dir "$WORK/tensorboard/$name" "$@" 2>&1 \
    | tee "$WORK/logs/$name.log" | grep -E "iteration +[0-9]+/|validation|error|Error" || true
  test "${PIPESTATUS[0]}" -eq 0
}

echo "== 3/6 prealign: PEL, projector and aligner learn; the language model is frozen"
train prealign prealign --tensor-model-parallel-size 2 --global-batch-size 8 --train-iters 30 \
  --lr 2e-3 --lr-warmup-fraction 0.03 --data-path "$WORK/data/captions" \
  --load "$WORK/checkpoints/prealign" --save "$WORK/checkpoints/prealign"

echo "== 4/6 pretrain: everything learns (2 pipeline stages)"
train pretrain pretrain --pipeline-model-parallel-size 2 --global-batch-size 8 --train-iters 300 \
  --lr 3e-3 --lr-warmup-fraction 0.02 --data-path "$WORK/data/captions" \
  --pretrained-checkpoint "$WORK/checkpoints/prealign" --load "$WORK/checkpoints/pretrain" \
  --save "$WORK/checkpoints/pretrain"

echo "== 5/6 finetune on questions and answers (tensor parallel)"
train finetune finetune --tensor-model-parallel-size 2 --global-batch-size 8 --train-iters 250 \
  --lr 2e-3 --lr-warmup-fraction 0.02 --data-path "$WORK/data/qa" \
  --pretrained-checkpoint "$WORK/checkpoints/pretrain" --load "$WORK/checkpoints/finetune" \
  --save "$WORK/checkpoints/finetune"

echo "== 6/6 answering questions about held-out images (greedy, KV cache)"
$PY tools/eval_vqa.py answer --load "$WORK/checkpoints/finetune" --tokenizer-model "$WORK/corpus/tokenizer.model" \
  --question-file "$WORK/corpus/heldout_questions.jsonl" --image-folder "$WORK/corpus" --prompt-style none \
  --answers-file "$WORK/answers.jsonl" --max-new-tokens 16 --batch-size 16 2>&1 | grep -v answering || true
$PY tools/eval_vqa.py score --answers-file "$WORK/answers.jsonl" --annotations "$WORK/corpus/heldout_answers.jsonl" \
  --kind vqa > "$WORK/score.json"

$PY - "$WORK" <<'PYEOF'
import re, sys
work = sys.argv[1]
print("\nLM loss, first → last logged iteration (align loss alongside):")
for stage in ("prealign", "pretrain", "finetune"):
    text = open(f"{work}/logs/{stage}.log").read()
    rows = re.findall(r"lm loss: (\S+) \| align loss: (\S+)", text)
    (lm0, al0), (lm1, al1) = rows[0], rows[-1]
    print(f"  {stage:9s} lm {float(lm0):.3f} → {float(lm1):.3f}   align {float(al0):.3f} → {float(al1):.3f}")
import json
score = json.load(open(f"{work}/score.json"))
print(f"held-out questions (colour / shape / place; chance about 23%): {100 * score['accuracy']:.1f}% of "
      f"{score['questions']} answered right")
for row in [json.loads(line) for line in open(f"{work}/answers.jsonl")][:3]:
    print(f"  {row['prompt']!r} → {row['text']!r}")
print(f"TensorBoard: tensorboard --logdir {work}/tensorboard   checkpoints: {work}/checkpoints")
PYEOF
