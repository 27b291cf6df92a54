#!/usr/bin/env python3
"""Benchmark answer files the LLaVA / EVE way, local scores by the rules of EVE's evaluation code,
and the files the server-scored benchmarks take.

questions: a benchmark's own files → a question jsonl ({"question_id", "image", "text"}) with
        the prompt EVE asks: --benchmark mmbench (the TSV; images decoded into --image-folder;
        hint, question, "A. ..." options, --lang en / cn instruction), mme (the release folder),
        gqa (testdev_balanced_questions.json), seed (SEED-Bench.json, its image questions).
answer: question jsonl → answer jsonl ({"question_id", "prompt", "text", "answer_id",
        "model_id", "metadata"}), greedy, with EVE's prompt suffixes: --prompt-style short
        ("Answer the question using a single word or phrase.": VQAv2, GQA, TextVQA, POPE, MME),
        vizwiz ("When the provided information is insufficient, respond with 'Unanswerable'." and
        the short one), option ("Answer with the option's letter from the given choices
        directly.": ScienceQA, MMBench, SEED), option-cn (MMBench-CN) or none (MM-Vet,
        LLaVA-Bench). A question whose text already ends with one of these (LLaVA's and EVE's
        question files carry them) is asked as it is. Split over machines with --num-chunks /
        --chunk-idx. A question that cannot be answered (missing or damaged image, too long, a
        malformed line) gets an empty answer and metadata.error, and a line that is not JSON is
        reported as file:line; the others are still answered. The answer file is written under a
        temporary name and renamed into place when complete.
score:  an answer file against ground truth, by the rules of EVE's evaluation code: --kind vqa
        (m4c / EvalAI accuracy, EvalAI's tokenisation first), pope (accuracy, precision, recall, F1,
        yes-ratio, per category and overall; POPE's own label files load), choice (ScienceQA's
        parser: a bare letter, "X. ...", or one "The answer is X."), seed (SEED-Bench.json: the
        answer text equals the option letter; all / image / video / per question type), gqa (GQA's
        questions json: text.rstrip('.').lower() equals the answer; eval.py's accuracy, binary,
        open) or mme (the release folder: calculation.py's acc + acc+ per subtask, perception and
        cognition sums). --converted-output also writes what LLaVA's converter writes: SEED's upload
        jsonl, GQA's predictions json for its eval.py, MME's eval_tool answer folder. --lenient
        parses friendlier. Every annotated question counts: one without an answer scores as wrong
        (and is counted); duplicate answers are flagged and the first is scored. --kind vqa also
        takes TextVQA's own TextVQA_0.5.1_val.json: answers are matched as eval_textvqa.py does, by
        (question_id = image id, the question read from the prompt); a prompt it cannot read, or an
        answer no annotation has, is reported (file:line) and not scored, instead of stopping.
submit: an answer file → the file a server (or grader) takes: --benchmark vqav2 (EvalAI; all
        questions of --question-file, "" when unanswered), vizwiz (EvalAI), mmbench (.xlsx in the
        TSV's columns plus "prediction"; .tsv / .csv by --output-file's extension), seed (upload
        jsonl), mmvet ({"v1_<id>": answer} for MM-Vet's grader), gqa (predictions for eval.py).

  python tools/eval_vqa.py questions --benchmark mmbench --source mmbench_dev_20230712.tsv \\
      --question-file mmbench.jsonl --image-folder mmbench_images
  torchrun --nproc-per-node 2 tools/eval_vqa.py answer --load ckpt --tokenizer-model tok \\
      --tensor-model-parallel-size 2 --question-file q.jsonl --image-folder imgs --answers-file a.jsonl
  python tools/eval_vqa.py score --answers-file a.jsonl --annotations gt.jsonl --kind vqa
  python tools/eval_vqa.py submit --benchmark mmbench --answers-file a.jsonl \\
      --question-file mmbench_dev_20230712.tsv --output-file upload/mmbench.xlsx
"""

import argparse
import json
import os
import re
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eve.atomic import check_output_dir, entries, write_bytes, write_jsonl, write_text  # noqa: E402
from megatron_eve.config import ConfigError  # noqa: E402
from megatron_eve.eval import benchmarks as bench  # noqa: E402
from megatron_eve.eval import submissions  # noqa: E402
from megatron_eve.eval.scorers import (mean, mme_question_candidates, multiple_choice_accuracy,  # noqa: E402
                                       pope_metrics, vqa_accuracy)
from megatron_eve.eval.xlsx import write_xlsx  # noqa: E402

SUFFIXES = {"short": bench.SHORT_SUFFIX,
            "vizwiz": "When the provided information is insufficient, respond with 'Unanswerable'.\n" + bench.SHORT_SUFFIX,
            "option": bench.OPTION_SUFFIX, "option-cn": bench.OPTION_SUFFIX_CN, "none": ""}


def with_suffix(text: str, suffix: str) -> str:
    """The question as asked: `suffix` on its own line, unless the text already ends with one of
    the known instructions (LLaVA's / EVE's question files carry theirs): never two."""
    if not suffix or any(text.rstrip().endswith(known) for known in SUFFIXES.values() if known):
        return text
    return text + "\n" + suffix


def read_jsonl(path, required=(), numbered=False):
    """JSON objects of a JSON Lines file → (rows, problems). A line that is not a JSON object, or
    lacks a required key, becomes a problem "file:line: why" (and, when it names a question_id, a
    row with "_error" so that the question is still accounted for); reading goes on. `numbered`:
    each row keeps its line number under "_line", for problems found later."""
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
            if numbered:
                row["_line"] = number
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
            text = with_suffix(q["text"], suffix)
            image = [os.path.join(args.image_folder, q["image"])] if q.get("image") else []
            requests.append(Request(chat_prompt(text, with_image=bool(image)), image))
        outputs = dict(zip(usable, backend.answer(requests, sampling(args)) if requests else []))
        for i, q in enumerate(batch):
            malformed = q.get("_error") or "malformed question: 'text' and 'image' must be strings"
            out = outputs.get(i, PromptError(malformed))
            error = str(out) if isinstance(out, PromptError) else None
            prompt = with_suffix(q["text"], suffix) if isinstance(q.get("text"), str) else ""
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


def _first_answers(rows, key, problems=None):
    """{key(row): text} keeping the first answer of each question, and the question_ids of the
    later duplicates; a row whose key is None, or whose question_id is not a string or a number,
    is skipped."""
    answers, duplicates = {}, []
    for row in rows:
        if not isinstance(row["question_id"], (str, int, float)) or isinstance(row["question_id"], bool):
            if problems is not None:
                problems.append(f"question_id {json.dumps(row['question_id'])[:40]}: not a string or a number")
            continue
        k = key(row)
        if k is None:
            continue
        if k in answers:
            duplicates.append(row["question_id"])
            continue
        answers[k] = row["text"] if isinstance(row.get("text"), str) else ""
    return answers, duplicates


def _warn_coverage(duplicates, missing, total) -> None:
    if duplicates:
        print(f"warning: {len(duplicates)} duplicate answers (the first of each is scored), e.g. question_id "
              f"{', '.join(map(str, duplicates[:5]))}", file=sys.stderr)
    if missing:
        print(f"warning: {len(missing)} of {total} annotated questions have no answer and score as wrong, "
              f"e.g. question_id {', '.join(map(str, missing[:5]))}", file=sys.stderr)


def _one_annotation(args) -> str:
    if len(args.annotations) != 1:
        raise bench.BenchmarkFileError(f"--kind {args.kind} takes one --annotations path, not "
                                       f"{len(args.annotations)}")
    return args.annotations[0]


def score_benchmark(args, answer_rows, problems) -> int:
    """--kind seed / gqa / mme: the benchmark's own ground truth, scored as EVE's scripts do."""
    path = _one_annotation(args)
    if args.kind == "seed":
        questions = bench.load_seed(path)
        answers, duplicates = _first_answers(answer_rows, lambda r: bench.seed_key(r["question_id"]), problems)
        ids = [bench.seed_key(q.question_id) for q in questions]
        result = bench.score_seed(questions, answers, args.lenient)
        if args.converted_output:
            write_jsonl(args.converted_output, bench.seed_upload(questions, answers))
    elif args.kind == "gqa":
        questions = bench.load_gqa(path)
        answers, duplicates = _first_answers(answer_rows, lambda r: str(r["question_id"]), problems)
        ids = [str(q) for q, v in questions.items() if v.get("isBalanced", True)]
        result = bench.score_gqa(questions, answers, args.lenient)
        if args.converted_output:
            write_text(args.converted_output, json.dumps(bench.gqa_predictions(_answer_pairs(answer_rows))))
    else:
        if args.converted_output:  # before the work: a folder of someone else's files is not ours to write into
            check_output_dir(args.converted_output, _holds_mme_answers, args.overwrite,
                             "MME answer files (<subtask>.txt)")
        questions = bench.load_mme(path)
        truth = {(q.category, q.file, q.question): q for q in questions}

        def key(row):
            if not isinstance(row.get("prompt"), str):
                problems.append(f"{args.answers_file}: question_id {row['question_id']}: no prompt (MME finds "
                                f"the question by it)")
                return None
            category, name = bench.mme_answer_place(row["question_id"])
            for question in mme_question_candidates(row["prompt"]):
                if (category, name, question) in truth:
                    return category, name, question
            return ("not annotated", str(row["question_id"]), row["prompt"])

        answers, duplicates = _first_answers(answer_rows, key, problems)
        ids = list(truth)
        result = bench.score_mme(questions, answers, args.lenient)
        if args.converted_output:
            _write_mme_answers(args.converted_output, answers, truth)
    report(problems)
    missing = [i for i in ids if i not in answers]
    _warn_coverage(duplicates, [m if args.kind != "mme" else "/".join(m[:2]) for m in missing], len(ids))
    result.update(questions=len(ids), answered=len(ids) - len(missing), missing=len(missing),
                  duplicates=len(duplicates), not_annotated=len(set(answers) - set(ids)),
                  unreadable_lines=len(problems), rules="lenient (not EVE's)" if args.lenient else "EVE's")
    print(json.dumps(result))
    return 0


def _holds_mme_answers(folder) -> bool:
    """Whether `folder` holds only what _write_mme_answers writes (an earlier conversion)."""
    subtasks = {f"{name}.txt" for name in bench.MME_PERCEPTION + bench.MME_COGNITION}
    return entries(folder) <= subtasks


def _write_mme_answers(folder, answers, truth) -> None:
    """convert_answer_to_mme.py's output, for MME's own calculation.py: <subtask>.txt with
    "file<TAB>question<TAB>gold<TAB>answer" lines, in answer-file order."""
    lines = {}
    for key, text in answers.items():
        if key in truth:
            lines.setdefault(key[0], []).append("\t".join((key[1], key[2], truth[key].answer, text)))
    for category, rows in lines.items():
        write_text(os.path.join(folder, f"{category}.txt"), "".join(row + "\n" for row in rows))


def _textvqa_annotations(args):
    """The questions of TextVQA's own annotation file when --annotations is one, else None (jsonl)."""
    loaded = [(path, bench.load_textvqa(path)) for path in args.annotations]
    found = [path for path, questions in loaded if questions is not None]
    if not found:
        return None
    if len(loaded) != 1:  # its answers are matched by prompt, the jsonl rows' by question_id
        raise bench.BenchmarkFileError(f"{found[0]}: TextVQA's annotation file is scored on its own (one "
                                       f"--annotations path, not {len(loaded)})")
    if args.kind != "vqa":
        raise bench.BenchmarkFileError(f"{found[0]}: TextVQA's annotation file; score it with --kind vqa")
    return loaded[0][1]


def score_textvqa(args, answer_rows, problems, questions) -> int:
    """--kind vqa against TextVQA_0.5.1_val.json, each answer found as eval_textvqa.py finds it.
    Where that script stops (a prompt its prompt_processor cannot read, an answer with no
    annotation) the line is reported and left out, and the run goes on."""
    rows = [(f"{args.answers_file}:{row['_line']}", row) for row in answer_rows]
    match = bench.match_textvqa(questions, rows)
    report(problems + match.unkeyed)
    missing = [q.question_id for q, text in zip(questions, match.given) if text is None]
    _warn_coverage(match.duplicates, missing, len(questions))
    if match.not_annotated:
        print(f"warning: {len(match.not_annotated)} answers match no annotation by (question_id = image id, the "
              f"prompt's question) and are not scored, e.g. {', '.join(match.not_annotated[:5])}", file=sys.stderr)
    shared = len(questions) - len({q.key for q in questions})
    if shared:
        print(f"warning: {shared} annotations share (image id, question) with another; all are scored against "
              f"the last one's answers, as eval_textvqa.py does", file=sys.stderr)
    result = bench.score_textvqa(questions, match.given, args.lenient)
    result.update(questions=len(questions), answered=len(questions) - len(missing), missing=len(missing),
                  duplicates=len(match.duplicates), not_annotated=len(match.not_annotated),
                  unkeyed_answers=len(match.unkeyed), unreadable_lines=len(problems),
                  rules="lenient (not EVE's)" if args.lenient else "EVE's")
    print(json.dumps(result))
    return 0


def score(args) -> int:
    answer_rows, problems = read_jsonl(args.answers_file, required=("question_id", "text"), numbered=True)
    if args.kind in ("seed", "gqa", "mme"):
        return score_benchmark(args, answer_rows, problems)
    if args.converted_output:
        raise bench.BenchmarkFileError(f"--converted-output is for --kind seed, gqa or mme, not {args.kind}")
    textvqa = _textvqa_annotations(args)
    if textvqa is not None:
        return score_textvqa(args, answer_rows, problems, textvqa)
    truth_rows, truth_problems = _annotations(args.annotations)
    answers, duplicates = _first_answers(answer_rows, lambda r: r["question_id"], problems)
    report(problems + truth_problems)
    truth = {i: row for i, row in truth_rows.items() if _gold(row, args.kind) is not None}
    if not truth:
        print(f"error: {', '.join(args.annotations)} hold no question with a usable answer for --kind {args.kind}",
              file=sys.stderr)
        return 1
    ids = list(truth)
    missing = [i for i in ids if i not in answers]
    _warn_coverage(duplicates, missing, len(ids))
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


def _answer_pairs(rows):
    """(question_id, text) of each question's first answer, in answer-file order."""
    seen, pairs = set(), []
    for row in rows:
        qid = row["question_id"]
        if isinstance(qid, (str, int, float)) and not isinstance(qid, bool) and str(qid) not in seen:
            seen.add(str(qid))
            pairs.append((qid, row["text"] if isinstance(row.get("text"), str) else ""))
    return pairs


def _read_question_jsonl(path):
    rows, problems = read_jsonl(path, required=("question_id",))
    report(problems)
    if not rows:
        raise bench.BenchmarkFileError(f"{path}: holds no questions (JSON lines with a question_id)")
    return rows


def submit(args) -> int:
    """The upload / grader file of --benchmark, from an answer file (and the benchmark's questions)."""
    answer_rows, problems = read_jsonl(args.answers_file, required=("question_id", "text"))
    report(problems)
    pairs = _answer_pairs(answer_rows)
    answers = {str(qid): text for qid, text in pairs}
    duplicates = len(answer_rows) - len(pairs)
    needs_questions = args.benchmark in ("vqav2", "vizwiz", "mmbench", "seed")
    if needs_questions and not args.question_file:
        raise bench.BenchmarkFileError(f"--benchmark {args.benchmark} needs --question-file (the benchmark's "
                                       f"questions: every one of them goes into the upload)")
    out = args.output_file
    if args.benchmark in ("vqav2", "vizwiz"):
        questions = _read_question_jsonl(args.question_file)
        build = submissions.vqav2_submission if args.benchmark == "vqav2" else submissions.vizwiz_submission
        write_text(out, json.dumps(build(questions, answers)))
        ids = [str(q["question_id"]) for q in questions]
    elif args.benchmark == "mmbench":
        header, rows = bench.read_mmbench(args.question_file)
        columns, table = bench.mmbench_table(header, rows, answers)
        if out.lower().endswith((".tsv", ".csv")):
            delimiter = "\t" if out.lower().endswith(".tsv") else ","
            write_text(out, _delimited([columns] + table, delimiter))
        else:
            write_xlsx(out, columns, table)
        ids = [str(r.get("index")) for r in rows]
    elif args.benchmark == "seed":
        questions = bench.load_seed(args.question_file)
        keyed = {bench.seed_key(qid): text for qid, text in pairs}
        write_jsonl(out, bench.seed_upload(questions, keyed))
        ids = [str(bench.seed_key(q.question_id)) for q in questions]
        answers = {str(k): v for k, v in keyed.items()}
    elif args.benchmark == "mmvet":
        write_text(out, json.dumps(submissions.mmvet_results(pairs), indent=2))
        ids = list(answers)
    else:
        write_text(out, json.dumps(bench.gqa_predictions(pairs)))
        ids = list(answers)
    unanswered = sum(1 for i in ids if i not in answers)
    extra = len(set(answers) - set(ids))
    if duplicates:
        print(f"warning: {duplicates} duplicate answers (the first of each is used)", file=sys.stderr)
    if unanswered:
        print(f"warning: {unanswered} of {len(ids)} questions have no answer (written empty)", file=sys.stderr)
    if extra:
        print(f"warning: {extra} answers are for questions not in {args.question_file} (left out)", file=sys.stderr)
    print(f"{args.benchmark}: {len(ids) - unanswered} answered, {unanswered} empty → {out}")
    return 0


def _delimited(rows, delimiter) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    writer.writerows([["" if cell is None else cell for cell in row] for row in rows])
    return buffer.getvalue()


def questions(args) -> int:
    """A question jsonl from a benchmark's own files, with the prompt EVE's scripts ask."""
    if args.benchmark == "mmbench":
        if not args.image_folder:
            raise bench.BenchmarkFileError("--benchmark mmbench needs --image-folder (the TSV's images are "
                                           "written there)")
        _, rows = bench.read_mmbench(args.source)
        out, problems = [], []
        for number, row in enumerate(rows, 2):
            if not row["index"] or os.path.basename(row["index"]) != row["index"] or row["index"] in (".", ".."):
                problems.append(f"{args.source}:{number}: index {row['index']!r} cannot name an image file")
                continue
            image = _save_base64_image(row.get("image"), args.image_folder, row["index"])
            if image is None:
                problems.append(f"{args.source}:{number}: index {row['index']}: the image is not base64")
                continue
            text, letters = bench.mmbench_prompt(row, args.lang)
            out.append({"question_id": bench.seed_key(row["index"]), "image": image, "text": text,
                        "option_char": letters, "category": row.get("category")})
        report(problems)
    elif args.benchmark == "mme":
        out = bench.mme_questions(bench.load_mme(args.source))
    elif args.benchmark == "gqa":
        out = bench.gqa_questions(bench.load_gqa(args.source))
    else:
        out = bench.seed_questions(bench.load_seed(args.source))
    write_jsonl(args.question_file, out)
    print(f"{len(out)} questions → {args.question_file}")
    return 0


def _save_base64_image(data, folder, index):
    """Decode one of MMBench's base64 images into `folder` as <index>.<png|jpg>; its name, or None."""
    import base64
    import binascii

    try:
        raw = base64.b64decode(data or "", validate=False)
    except (binascii.Error, ValueError):
        return None
    if not raw:
        return None
    name = f"{index}.png" if raw.startswith(b"\x89PNG") else f"{index}.jpg"
    write_bytes(os.path.join(folder, name), raw)
    return name


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
                        'coco_pope_<category>.json files name their category; --kind vqa also takes TextVQA\'s '
                        'TextVQA_0.5.1_val.json (matched by image id and the prompt\'s question)')
    s.add_argument("--kind", choices=("vqa", "pope", "choice", "seed", "gqa", "mme"), default="vqa",
                   help="vqa: TextVQA / VQAv2 accuracy; pope: per category and overall; choice: ScienceQA-style "
                        "option letters; seed: --annotations SEED-Bench.json; gqa: --annotations "
                        "testdev_balanced_questions.json; mme: --annotations MME_Benchmark_release_version")
    s.add_argument("--converted-output", default=None,
                   help="seed: the upload jsonl; gqa: the predictions json GQA's eval.py reads; mme: a folder "
                        "of <subtask>.txt for MME's calculation.py (as LLaVA's converters write them)")
    s.add_argument("--overwrite", action="store_true",
                   help="mme: write --converted-output into a folder that holds other files")
    s.add_argument("--lenient", action="store_true",
                   help="friendlier answer parsing than EVE's evaluation code (reported as such)")
    u = sub.add_parser("submit", help="write the file a benchmark server or grader takes")
    u.add_argument("--benchmark", required=True, choices=("vqav2", "vizwiz", "mmbench", "seed", "mmvet", "gqa"))
    u.add_argument("--answers-file", required=True)
    u.add_argument("--question-file", default=None,
                   help="vqav2: the test question jsonl (LLaVA passes all of test2015); vizwiz: the test "
                        "question jsonl; mmbench: the TSV; seed: SEED-Bench.json")
    u.add_argument("--output-file", required=True,
                   help="mmbench: .xlsx, or .tsv / .csv for the same table")
    q = sub.add_parser("questions", help="write a question file from a benchmark's own files")
    q.add_argument("--benchmark", required=True, choices=("mmbench", "mme", "gqa", "seed"))
    q.add_argument("--source", required=True, help="mmbench: the TSV; mme: MME_Benchmark_release_version; "
                                                   "gqa: testdev_balanced_questions.json; seed: SEED-Bench.json")
    q.add_argument("--question-file", required=True)
    q.add_argument("--image-folder", default=None, help="mmbench: where the TSV's images are written")
    q.add_argument("--lang", choices=("en", "cn"), default="en", help="mmbench: the instruction's language")
    args = p.parse_args(argv)
    if args.command == "answer":
        return answer(args)
    try:
        return {"score": score, "submit": submit, "questions": questions}[args.command](args)
    except (bench.BenchmarkFileError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"error: {error.filename or ''}: {error.strerror or error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
