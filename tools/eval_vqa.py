#!/usr/bin/env python3
"""Benchmark answer files the LLaVA / EVE way, and local scores.

answer: question jsonl ({"question_id", "image", "text"}) → answer jsonl ({"question_id",
        "prompt", "text", "answer_id", "model_id", "metadata"}), greedy, with EVE's prompt suffixes:
        --prompt-style short ("Answer the question using a single word or phrase.", VQAv2, GQA,
        VizWiz, TextVQA, POPE, MME, SEED), option ("Answer with the option's letter from the given
        choices directly.", ScienceQA, MMBench) or none (MM-Vet, LLaVA-Bench). Split over machines
        with --num-chunks / --chunk-idx. A question that cannot be answered (missing image,
        too long) gets an empty answer and metadata.error; the others are still answered.
score:  an answer file against ground truth ({"question_id", "answers": [...]} or "answer"):
        --kind vqa (VQA accuracy, standard normalisation), pope (accuracy, precision, recall,
        F1, yes-ratio) or choice (option-letter accuracy).

  torchrun --nproc-per-node 2 tools/eval_vqa.py answer --load ckpt --tokenizer-model tok \\
      --tensor-model-parallel-size 2 --question-file q.jsonl --image-folder imgs --answers-file a.jsonl
  python tools/eval_vqa.py score --answers-file a.jsonl --annotations gt.jsonl --kind vqa
"""

import argparse
import json
import os
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eve.eval.scorers import mean, multiple_choice_accuracy, pope_metrics, vqa_accuracy  # noqa: E402

SUFFIXES = {"short": "Answer the question using a single word or phrase.",
            "option": "Answer with the option's letter from the given choices directly.", "none": ""}


def read_jsonl(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def chunk(items, count, index):
    size = -(-len(items) // count)
    return items[index * size : (index + 1) * size]


def answer(args) -> int:
    from megatron_eve.inference.backends import Request
    from megatron_eve.inference.generate import PromptError, chat_prompt
    from tools.generate import sampling, setup

    questions = chunk(read_jsonl(args.question_file), args.num_chunks, args.chunk_idx)
    backend, writer = setup(args)
    model_id = args.model_id or os.path.basename(os.path.normpath(args.load or args.hf))
    suffix = SUFFIXES[args.prompt_style]
    from tqdm import tqdm

    rows = []
    for start in tqdm(range(0, len(questions), args.batch_size), disable=not writer, desc="answering"):
        batch = questions[start : start + args.batch_size]
        requests = []
        for q in batch:
            text = q["text"] + ("\n" + suffix if suffix else "")
            image = [os.path.join(args.image_folder, q["image"])] if q.get("image") else []
            requests.append(Request(chat_prompt(text, with_image=bool(image)), image))
        for q, request, out in zip(batch, requests, backend.answer(requests, sampling(args))):
            error = str(out) if isinstance(out, PromptError) else None
            rows.append({"question_id": q["question_id"], "prompt": q["text"] + ("\n" + suffix if suffix else ""),
                         "text": "" if error else out, "answer_id": uuid.uuid4().hex, "model_id": model_id,
                         "metadata": {"error": error} if error else {}})
    if writer:
        os.makedirs(os.path.dirname(os.path.abspath(args.answers_file)), exist_ok=True)
        with open(args.answers_file, "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        failed = sum(1 for r in rows if r["metadata"].get("error"))
        print(f"{len(rows) - failed} answered, {failed} could not be answered → {args.answers_file}")
    return 0


def score(args) -> int:
    answers = {row["question_id"]: row["text"] for row in read_jsonl(args.answers_file)}
    truth = {row["question_id"]: row for row in read_jsonl(args.annotations)}
    ids = [i for i in answers if i in truth]
    if not ids:
        print("error: no question of the answer file has ground truth", file=sys.stderr)
        return 1
    gold = lambda row: row.get("answers") or [row["answer"]]  # noqa: E731
    if args.kind == "vqa":
        result = {"accuracy": mean([vqa_accuracy(answers[i], gold(truth[i])) for i in ids])}
    elif args.kind == "pope":
        result = pope_metrics([answers[i] for i in ids], [gold(truth[i])[0] for i in ids])
    else:
        result = {"accuracy": multiple_choice_accuracy([answers[i] for i in ids], [gold(truth[i])[0] for i in ids])}
    result["questions"] = len(ids)
    print(json.dumps(result))
    return 0


def main(argv=None) -> int:
    from tools.generate import add_model_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("answer", help="write an answer file")
    add_model_args(a)
    a.add_argument("--question-file", required=True)
    a.add_argument("--image-folder", default="")
    a.add_argument("--answers-file", required=True)
    a.add_argument("--model-id", default=None)
    a.add_argument("--prompt-style", choices=sorted(SUFFIXES), default="short")
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--num-chunks", type=int, default=1)
    a.add_argument("--chunk-idx", type=int, default=0)
    s = sub.add_parser("score", help="score an answer file")
    s.add_argument("--answers-file", required=True)
    s.add_argument("--annotations", required=True, help='jsonl: {"question_id", "answers": [...]} or "answer"')
    s.add_argument("--kind", choices=("vqa", "pope", "choice"), default="vqa")
    args = p.parse_args(argv)
    if args.command == "answer":
        return answer(args)
    return score(args)


if __name__ == "__main__":
    sys.exit(main())
