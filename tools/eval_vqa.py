#!/usr/bin/env python3
"""Benchmark answer files the LLaVA / EVE way, and local scores.

answer: question jsonl ({"question_id", "image", "text"}) → answer jsonl ({"question_id",
        "prompt", "text", "answer_id", "model_id", "metadata"}), greedy, with EVE's prompt suffixes:
        --prompt-style short ("Answer the question using a single word or phrase.", VQAv2, GQA,
        VizWiz, TextVQA, POPE, MME, SEED), option ("Answer with the option's letter from the given
        choices directly.", ScienceQA, MMBench) or none (MM-Vet, LLaVA-Bench). Split over machines
        with --num-chunks / --chunk-idx. A question that cannot be answered (missing or damaged
        image, too long, a malformed line) gets an empty answer and metadata.error, and a line
        that is not JSON is reported as file:line; the others are still answered. The answer
        file is written under a temporary name and renamed into place when complete.
score:  an answer file against ground truth ({"question_id", "answers": [...]} or "answer"):
        --kind vqa (VQA accuracy, standard normalisation), pope (accuracy, precision, recall,
        F1, yes-ratio) or choice (option-letter accuracy). Every annotated question counts:
        one without an answer scores as wrong (and is counted); duplicate answers are flagged
        and the first is scored.

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

from megatron_eve.atomic import write_jsonl  # noqa: E402
from megatron_eve.eval.scorers import mean, multiple_choice_accuracy, pope_metrics, vqa_accuracy  # noqa: E402

SUFFIXES = {"short": "Answer the question using a single word or phrase.",
            "option": "Answer with the option's letter from the given choices directly.", "none": ""}


def read_jsonl(path, required=()):
    """JSON objects of a JSON Lines file → (rows, problems). A line that is not a JSON object, or
    lacks a required key, becomes a problem "file:line: why" (and, when it names a question_id, a
    row with "_error" so that the question is still accounted for); reading goes on."""
    rows, problems = [], []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(f"{where}: not JSON ({error.msg})")
                continue
            if not isinstance(row, dict):
                problems.append(f"{where}: not a JSON object")
                continue
            missing = [key for key in required if key not in row]
            if missing:
                problems.append(f"{where}: no {', '.join(missing)}")
                if "question_id" not in row:
                    continue
                row["_error"] = f"{where}: malformed question (no {', '.join(missing)})"
            rows.append(row)
    return rows, problems


def report(problems, limit: int = 20) -> None:
    for line in problems[:limit]:
        print(f"warning: {line}", file=sys.stderr)
    if len(problems) > limit:
        print(f"warning: … and {len(problems) - limit} more", file=sys.stderr)


def chunk(items, count, index):
    size = -(-len(items) // count)
    return items[index * size : (index + 1) * size]


def answer(args) -> int:
    from megatron_eve.inference.backends import Request
    from megatron_eve.inference.generate import PromptError, chat_prompt
    from tools.generate import sampling, setup

    questions, problems = read_jsonl(args.question_file, required=("question_id", "text"))
    questions = chunk(questions, args.num_chunks, args.chunk_idx)
    backend, writer = setup(args)
    if writer:
        report(problems)
    model_id = args.model_id or os.path.basename(os.path.normpath(args.load or args.hf))
    suffix = SUFFIXES[args.prompt_style]
    from tqdm import tqdm

    rows = []
    for start in tqdm(range(0, len(questions), args.batch_size), disable=not writer, desc="answering"):
        batch = questions[start : start + args.batch_size]
        usable = [i for i, q in enumerate(batch) if "_error" not in q and isinstance(q.get("text"), str)
                  and isinstance(q.get("image") or "", str)]
        requests = []
        for q in (batch[i] for i in usable):
            text = q["text"] + ("\n" + suffix if suffix else "")
            image = [os.path.join(args.image_folder, q["image"])] if q.get("image") else []
            requests.append(Request(chat_prompt(text, with_image=bool(image)), image))
        outputs = dict(zip(usable, backend.answer(requests, sampling(args)) if requests else []))
        for i, q in enumerate(batch):
            malformed = q.get("_error") or "malformed question: 'text' and 'image' must be strings"
            out = outputs.get(i, PromptError(malformed))
            error = str(out) if isinstance(out, PromptError) else None
            prompt = q["text"] + ("\n" + suffix if suffix else "") if isinstance(q.get("text"), str) else ""
            rows.append({"question_id": q["question_id"], "prompt": prompt,
                         "text": "" if error else out, "answer_id": uuid.uuid4().hex, "model_id": model_id,
                         "metadata": {"error": error} if error else {}})
    if writer:
        write_jsonl(args.answers_file, rows)
        failed = sum(1 for r in rows if r["metadata"].get("error"))
        skipped = f", {len(problems)} malformed lines (named above)" if problems else ""
        print(f"{len(rows) - failed} answered, {failed} could not be answered{skipped} → {args.answers_file}")
    return 0


def score(args) -> int:
    answer_rows, problems = read_jsonl(args.answers_file, required=("question_id", "text"))
    truth_rows, truth_problems = read_jsonl(args.annotations, required=("question_id",))
    report(problems + truth_problems)
    answers, duplicates = {}, []
    for row in answer_rows:
        if row["question_id"] in answers:
            duplicates.append(row["question_id"])
            continue
        answers[row["question_id"]] = row["text"] if isinstance(row.get("text"), str) else ""
    gold = lambda row: row.get("answers") or ([row["answer"]] if "answer" in row else None)  # noqa: E731
    truth = {row["question_id"]: gold(row) for row in truth_rows if gold(row)}
    if not truth:
        print(f"error: {args.annotations} holds no question with an answer", file=sys.stderr)
        return 1
    ids = list(truth)
    missing = [i for i in ids if i not in answers]
    if duplicates:
        print(f"warning: {len(duplicates)} duplicate answers (the first of each is scored), e.g. question_id "
              f"{', '.join(map(str, duplicates[:5]))}", file=sys.stderr)
    if missing:
        print(f"warning: {len(missing)} of {len(ids)} annotated questions have no answer and score as wrong, "
              f"e.g. question_id {', '.join(map(str, missing[:5]))}", file=sys.stderr)
    given = [answers.get(i, "") for i in ids]
    if args.kind == "vqa":
        result = {"accuracy": mean([vqa_accuracy(a, truth[i]) for a, i in zip(given, ids)])}
    elif args.kind == "pope":
        result = pope_metrics(given, [truth[i][0] for i in ids])
    else:
        result = {"accuracy": multiple_choice_accuracy(given, [truth[i][0] for i in ids])}
    result.update(questions=len(ids), answered=len(ids) - len(missing), missing=len(missing),
                  duplicates=len(duplicates), not_annotated=sum(1 for i in answers if i not in truth),
                  unreadable_lines=len(problems) + len(truth_problems))
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
