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
score:  an answer file against ground truth, by the rules of EVE's evaluation code: --kind vqa
        (m4c / EvalAI accuracy, EvalAI's tokenisation first), pope (accuracy, precision, recall, F1,
        yes-ratio, per category and overall; POPE's own label files load) or choice (ScienceQA's
        parser: a bare letter, "X. ...", or one "The answer is X."). --lenient parses friendlier. Every annotated question counts:
        one without an answer scores as wrong (and is counted); duplicate answers are flagged
        and the first is scored.

  torchrun --nproc-per-node 2 tools/eval_vqa.py answer --load ckpt --tokenizer-model tok \\
      --tensor-model-parallel-size 2 --question-file q.jsonl --image-folder imgs --answers-file a.jsonl
  python tools/eval_vqa.py score --answers-file a.jsonl --annotations gt.jsonl --kind vqa
"""

import argparse
import json
import os
import re
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


def _annotations(paths):
    """Ground truth from one or more files → ({question_id: row}, problems). Each row keeps where it
    came from, so POPE's per-category label files (coco_pope_<category>.json) name their category."""
    truth, problems = {}, []
    for path in paths:
        rows, bad = read_jsonl(path, required=("question_id",))
        problems += bad
        category = re.search(r"pope_(\w+?)\.jsonl?$", os.path.basename(path))
        for row in rows:
            row.setdefault("category", category.group(1) if category else None)
            truth[row["question_id"]] = row
    return truth, problems


def _gold(row, kind):
    """The reference answer(s) of one annotation row: VQA's answer list, POPE's "label", or the
    option letter (a ScienceQA "answer" index into "choices" becomes its letter)."""
    if kind == "vqa":
        return row.get("answers") or ([row["answer"]] if "answer" in row else None)
    value = row.get("label", row.get("answer")) if kind == "pope" else row.get("answer")
    if kind == "choice" and isinstance(value, int) and not isinstance(value, bool):
        return "ABCDE"[value] if 0 <= value < 5 else None
    return value if isinstance(value, str) else None


def score(args) -> int:
    answer_rows, problems = read_jsonl(args.answers_file, required=("question_id", "text"))
    truth_rows, truth_problems = _annotations(args.annotations)
    report(problems + truth_problems)
    answers, duplicates = {}, []
    for row in answer_rows:
        if row["question_id"] in answers:
            duplicates.append(row["question_id"])
            continue
        answers[row["question_id"]] = row["text"] if isinstance(row.get("text"), str) else ""
    truth = {i: row for i, row in truth_rows.items() if _gold(row, args.kind) is not None}
    if not truth:
        print(f"error: {', '.join(args.annotations)} hold no question with a usable answer for --kind {args.kind}",
              file=sys.stderr)
        return 1
    ids = list(truth)
    missing = [i for i in ids if i not in answers]
    if duplicates:
        print(f"warning: {len(duplicates)} duplicate answers (the first of each is scored), e.g. question_id "
              f"{', '.join(map(str, duplicates[:5]))}", file=sys.stderr)
    if missing:
        print(f"warning: {len(missing)} of {len(ids)} annotated questions have no answer and score as wrong, "
              f"e.g. question_id {', '.join(map(str, missing[:5]))}", file=sys.stderr)
    given = {i: answers.get(i, "") for i in ids}
    gold = {i: _gold(truth[i], args.kind) for i in ids}
    if args.kind == "vqa":
        result = {"accuracy": mean([vqa_accuracy(given[i], gold[i], args.lenient) for i in ids])}
    elif args.kind == "pope":
        result = pope_metrics([given[i] for i in ids], [gold[i] for i in ids], args.lenient)
        categories = sorted({truth[i]["category"] for i in ids if truth[i].get("category")})
        if categories:  # EVE reports each POPE split on its own
            result["categories"] = {c: pope_metrics([given[i] for i in ids if truth[i]["category"] == c],
                                                    [gold[i] for i in ids if truth[i]["category"] == c], args.lenient)
                                    for c in categories}
    else:
        counts = [len(truth[i]["choices"]) if isinstance(truth[i].get("choices"), list) else None for i in ids]
        result = {"accuracy": multiple_choice_accuracy([given[i] for i in ids], [gold[i] for i in ids], counts,
                                                       args.lenient)}
    result.update(questions=len(ids), answered=len(ids) - len(missing), missing=len(missing),
                  duplicates=len(duplicates), not_annotated=sum(1 for i in answers if i not in truth),
                  unreadable_lines=len(problems) + len(truth_problems),
                  rules="lenient (not EVE's)" if args.lenient else "EVE's")
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
    s.add_argument("--annotations", required=True, nargs="+",
                   help='jsonl: {"question_id", "answers": [...]} or "answer" (a letter, or an index into '
                        '"choices"), or POPE\'s label files {"question_id", "label", "category"}; POPE\'s '
                        'coco_pope_<category>.json files name their category')
    s.add_argument("--kind", choices=("vqa", "pope", "choice"), default="vqa",
                   help="vqa: TextVQA / VQAv2 accuracy; pope: per category and overall; choice: ScienceQA-style "
                        "option letters")
    s.add_argument("--lenient", action="store_true",
                   help="friendlier answer parsing than EVE's evaluation code (reported as such)")
    args = p.parse_args(argv)
    if args.command == "answer":
        return answer(args)
    return score(args)


if __name__ == "__main__":
    sys.exit(main())
