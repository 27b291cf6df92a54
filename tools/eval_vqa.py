#!/usr/bin/env python3
"""Benchmark answer files the LLaVA / EVE way, local scores by the rules of EVE's evaluation code,
and the files the server-scored benchmarks take.

questions: a benchmark's own files → a question jsonl ({"question_id", "image", "text"}) with
        the prompt EVE asks: --benchmark mmbench (the TSV; images decoded into --image-folder;
        hint, question, "A. ..." options, --lang en / cn instruction), mme (the release folder),
        gqa (testdev_balanced_questions.json), seed (SEED-Bench.json, its image questions; question_id
        a number, as convert_seed_for_submission.py looks it up), scienceqa (LLaVA's
        llava_test_CQM-A.json: as model_vqa_science.py asks it, the option instruction built in, an
        image question's answer prompt starting "<image>\n" as eval_science_qa.py needs).
answer: question jsonl → answer jsonl ({"question_id", "prompt", "text", "answer_id",
        "model_id", "metadata"}), greedy, with EVE's prompt suffixes: --prompt-style short
        ("Answer the question using a single word or phrase.": VQAv2, GQA, TextVQA, POPE, MME),
        vizwiz ("When the provided information is insufficient, respond with 'Unanswerable'." and
        the short one), option ("Answer with the option's letter from the given choices
        directly.": ScienceQA, MMBench, SEED), option-cn (MMBench-CN) or none (MM-Vet,
        LLaVA-Bench). A question whose text already ends with one of these (LLaVA's and EVE's
        question files carry them) is asked as it is. --max-new-tokens defaults to LLaVA's for
        the style's benchmarks: 128 for short and vizwiz, 1024 for option, option-cn and none
        (SEED's 128 scores the same), cut to the positions a prompt leaves the model (a prompt that
        leaves none is too long). Sampling (--temperature > 0) keeps --top-k 50 tokens by default,
        as transformers' generate() does in LLaVA's scripts. Split over machines with --num-chunks /
        --chunk-idx. A question that cannot be answered (missing or damaged image, too long, a
        malformed line) gets an empty answer and metadata.error, and a line that is not JSON is
        reported as file:line; the others are still answered. Each finished answer is also appended
        to ANSWERS.partial: an interrupted run, rerun with the same question file and options,
        keeps those and answers the rest. The answer file is written under a temporary name and
        renamed into place when complete (and the .partial file removed).
score:  an answer file against ground truth, by the rules of EVE's evaluation code: --kind vqa
        (m4c / EvalAI accuracy, EvalAI's tokenisation first), pope (accuracy, precision, recall, F1,
        yes-ratio per category; the top-level figures are the categories' mean, as LLaVA-1.5 / EVE
        report POPE, "pooled" all questions as one set; POPE's own label files load), choice
        (ScienceQA's parser: a bare letter, "X. ...", or one "The answer is X."; --annotations
        ScienceQA's problems.json or its folder: the test split of pid_splits.json, accuracy,
        img_accuracy (ScienceQA-IMG) and the paper's breakdowns, as eval_science_qa.py), seed
        (SEED-Bench.json: the answer text equals the option letter; all / image / video / per
        question type), gqa (GQA's
        questions json: text.rstrip('.').lower() equals the answer; eval.py's accuracy, binary,
        open) or mme (the release folder: calculation.py's acc + acc+ per subtask, perception and
        cognition sums). --converted-output also writes what LLaVA's converter writes: SEED's upload
        jsonl, GQA's predictions json for its eval.py, MME's eval_tool answer folder (swapped in
        whole). POPE's label files each number their questions from 1: with --question-file
        (LLaVA's llava_pope_test.jsonl) each category's questions are matched to its label file by
        order, as eval_pope.py does. --lenient parses friendlier. Every annotated question counts:
        one without an answer, or whose answer failed (metadata.error), scores as wrong (POPE: the
        opposite of its label) and is counted; duplicate answers are flagged and
        the first is scored. --kind vqa also takes TextVQA's own TextVQA_0.5.1_val.json: answers
        are matched as eval_textvqa.py does, by (question_id = image id, the question read from the
        prompt); a prompt it cannot read, or an answer no annotation has, is reported (file:line)
        and not scored, instead of stopping.
submit: an answer file → the file a server (or grader) takes: --benchmark vqav2 (EvalAI; all
        questions of --question-file, "" when unanswered), vizwiz (EvalAI), mmbench (.xlsx in the
        TSV's columns plus "prediction"; .tsv / .csv by --output-file's extension), seed (upload
        jsonl), mmvet ({"v1_<id>": answer} for MM-Vet's grader), gqa (predictions for eval.py).

An output never replaces one of the command's inputs, nor a file or folder that is not this
command's own earlier output (unless --overwrite); such a run stops before any work, with exit code 2.

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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eve.atomic import OutputRefused, check_not_an_input, os_error_line, write_jsonl  # noqa: E402
from megatron_eve.config import ConfigError  # noqa: E402
from megatron_eve.eval.answer_files import (answer_row, askable, chunk, image_paths, read_questions,  # noqa: E402
                                            report, unaskable_reason)
from megatron_eve.eval.benchmarks.files import BenchmarkFileError  # noqa: E402
from megatron_eve.eval.outputs import ANSWER_FILE, QUESTION_FILE, check_output_file  # noqa: E402
from megatron_eve.eval.prompts import MAX_NEW_TOKENS, PROMPT_STYLES, with_suffix  # noqa: E402
from megatron_eve.eval.question_files import QUESTION_SOURCES  # noqa: E402
from megatron_eve.eval.resume import SideFile, read_side_file, run_header, side_file  # noqa: E402
from megatron_eve.eval.scoring import KINDS, ScoreRun, score_answer_file  # noqa: E402
from megatron_eve.eval.submissions import SUBMISSIONS, write_submission  # noqa: E402
from megatron_eve.ranks import is_rank_zero  # noqa: E402


def _resolved(path):
    return os.path.realpath(path) if path else None


def answer_options(args, model_id: str) -> dict:
    """What decides the answers (a side file of other options is not resumed): batch size and
    parallel layout give the same tokens, so they may change between runs."""
    return {"model": _resolved(args.load or args.hf), "tokenizer_model": _resolved(args.tokenizer_model),
            "model_id": model_id, "prompt_style": args.prompt_style, "image_folder": _resolved(args.image_folder),
            "num_chunks": args.num_chunks, "chunk_idx": args.chunk_idx, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed, "bf16": bool(args.bf16),
            "transformer_impl": getattr(args, "transformer_impl", None),
            # Sampled answers only (a greedy side file from before --top-k existed still resumes).
            **({"top_k": args.top_k} if args.temperature > 0 else {})}


def answer(args) -> int:
    from megatron_eve.inference.backends import Request
    from megatron_eve.inference.generate import PromptError, chat_prompt
    from tools.generate import sampling, setup

    # Everything that can refuse the run does so before the model is loaded.
    if args.image_folder and not os.path.isdir(args.image_folder):  # else: every image question fails, one by one
        what = "a file, not a folder" if os.path.exists(args.image_folder) else "no such folder"
        raise ConfigError(f"--image-folder {args.image_folder}: {what}")
    questions, problems = read_questions(args.question_file)
    questions = chunk(questions, args.num_chunks, args.chunk_idx)
    inputs = {"--question-file": args.question_file}
    check_output_file(args.answers_file, inputs, ANSWER_FILE, args.overwrite, "an answer file", "--answers-file")
    partial = side_file(args.answers_file)
    check_not_an_input(partial, inputs, "--answers-file's side file")
    model_id = args.model_id or os.path.basename(os.path.normpath(args.load or args.hf or ""))
    header = run_header(args.question_file, answer_options(args, model_id))
    # The writer (the HF process, or rank 0 of a launch: setup's printer) locks the side file now, so a
    # second run into the same answers file is refused before it loads a model; every rank reads it
    # before setup, whose process group waits for them all, and the writer rewrites it only after.
    side = SideFile(partial) if is_rank_zero() else None
    kept = 0  # answers in the side file (an earlier run's, and this one's)
    try:
        answers, good_length = read_side_file(partial, header, len(questions), args.overwrite)
        kept = len(answers)
        backend, writer = setup(args)
        if writer:
            report(problems)
            if answers:
                print(f"resuming: {len(answers)} of {len(questions)} answers kept from {partial}", flush=True)
        suffix = PROMPT_STYLES[args.prompt_style]
        from tqdm import tqdm

        todo = [i for i in range(len(questions)) if i not in answers]
        if side:
            side.start(header, good_length)
        for start in tqdm(range(0, len(todo), args.batch_size), disable=not writer, desc="answering"):
            positions = todo[start : start + args.batch_size]
            batch = [questions[i] for i in positions]
            usable = [i for i, q in enumerate(batch) if askable(q)]
            requests = []
            for q in (batch[i] for i in usable):
                images = image_paths(q, args.image_folder)
                requests.append(Request(chat_prompt(with_suffix(q["text"], suffix), with_image=bool(images)), images))
            outputs = dict(zip(usable, backend.answer(requests, sampling(args)) if requests else []))
            finished = []
            for i, (position, q) in enumerate(zip(positions, batch)):
                out = outputs.get(i, PromptError(unaskable_reason(q)))
                error = str(out) if isinstance(out, PromptError) else None
                answers[position] = answer_row(q, suffix, model_id, out, error)
                finished.append((position, answers[position]))
            if side:
                side.add(finished)
                kept += len(finished)
    except KeyboardInterrupt:  # Ctrl-C (on every rank of a launch): one line, from the writer
        if side:
            where = (f"{kept} of {len(questions)} answers kept in {partial}; run the same command to resume" if kept
                     else "no answer kept yet")
            print(f"interrupted: {where}", file=sys.stderr)
        return 130
    finally:
        if side:
            side.close()
    if writer:
        rows = [answers[i] for i in range(len(questions))]
        write_jsonl(args.answers_file, rows)
        side.finish()
        failed = sum(1 for r in rows if r["metadata"].get("error"))
        skipped = f", {len(problems)} malformed lines (named above)" if problems else ""
        print(f"{len(rows) - failed} answered, {failed} could not be answered{skipped} → {args.answers_file}")
        if rows and failed == len(rows):  # the file stays: its metadata.error says why, question by question
            print(f"error: none of the {len(rows)} questions could be answered (see metadata.error in "
                  f"{args.answers_file})", file=sys.stderr)
            return 1
    return 0


def score(args) -> int:
    run = ScoreRun(args.answers_file, args.annotations, args.kind, args.lenient, args.converted_output, args.overwrite,
                   args.question_file)
    print(json.dumps(score_answer_file(run)))
    return 0


def submit(args) -> int:
    """The upload / grader file of --benchmark, from an answer file (and the benchmark's questions)."""
    answered, empty = write_submission(args.benchmark, args.answers_file, args.question_file, args.output_file,
                                       args.overwrite)
    print(f"{args.benchmark}: {answered} answered, {empty} empty → {args.output_file}")
    return 0


def questions(args) -> int:
    """A question jsonl from a benchmark's own files, with the prompt EVE's scripts ask."""
    check_output_file(args.question_file, {"--source": args.source}, QUESTION_FILE, args.overwrite, "a question file",
                      "--question-file")
    out = QUESTION_SOURCES[args.benchmark](args.source, args.image_folder, args.lang, args.overwrite)
    write_jsonl(args.question_file, out)
    print(f"{len(out)} questions → {args.question_file}")
    return 0


def _check_answer_flags(p: argparse.ArgumentParser, args) -> None:
    from tools.generate import check_sampling_args

    if args.chunk_idx >= args.num_chunks:
        p.error(f"--chunk-idx {args.chunk_idx} is not below --num-chunks {args.num_chunks}")
    check_sampling_args(p, args)  # the same check as generate.py's and the demo's


def main(argv=None) -> int:
    from tools.generate import Parser, add_model_args, integer_in  # Parser: a command-line mistake is one line

    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("answer", help="write an answer file")
    add_model_args(a, max_new_tokens_help="1 or more; default: as LLaVA-1.5's scripts answer the benchmarks of "
                                          "--prompt-style: short, vizwiz 128 (model_vqa_loader.py); option, "
                                          "option-cn, none 1024 (model_vqa_science.py, model_vqa_mmbench.py, "
                                          "model_vqa.py)")
    a.add_argument("--question-file", required=True)
    a.add_argument("--image-folder", default="")
    a.add_argument("--answers-file", required=True)
    a.add_argument("--model-id", default=None)
    a.add_argument("--prompt-style", choices=sorted(PROMPT_STYLES), default="short")
    a.add_argument("--batch-size", type=integer_in(1), default=8)
    a.add_argument("--num-chunks", type=integer_in(1), default=1)
    a.add_argument("--chunk-idx", type=integer_in(0), default=0)
    a.add_argument("--overwrite", action="store_true",
                   help="replace an --answers-file that is not an answer file, or a side file (.partial) made "
                        "for other questions or options")
    s = sub.add_parser("score", help="score an answer file")
    s.add_argument("--answers-file", required=True)
    s.add_argument("--annotations", required=True, nargs="+",
                   help='jsonl: {"question_id", "answers": [...]} or "answer" (a letter, or an index into '
                        '"choices"), or POPE\'s label files {"question_id", "label", "category"}; POPE\'s '
                        'coco_pope_<category>.json files name their category; --kind vqa also takes TextVQA\'s '
                        'TextVQA_0.5.1_val.json (matched by image id and the prompt\'s question)')
    s.add_argument("--kind", choices=KINDS, default="vqa",
                   help="vqa: TextVQA / VQAv2 accuracy; pope: per category, their mean (as LLaVA-1.5 / EVE report "
                        "it) and pooled; choice: ScienceQA-style option letters (--annotations ScienceQA's "
                        "problems.json or its folder: the test split, as eval_science_qa.py); seed: --annotations "
                        "SEED-Bench.json; gqa: --annotations testdev_balanced_questions.json; mme: --annotations "
                        "MME_Benchmark_release_version")
    s.add_argument("--question-file", default=None,
                   help="pope: the question file answered (LLaVA's llava_pope_test.jsonl): each question's "
                        "category picks its label file, matched by order as eval_pope.py does")
    s.add_argument("--converted-output", default=None,
                   help="seed: the upload jsonl; gqa: the predictions json GQA's eval.py reads; mme: a folder "
                        "of <subtask>.txt for MME's calculation.py (as LLaVA's converters write them)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace a --converted-output that is not our own earlier one")
    s.add_argument("--lenient", action="store_true",
                   help="friendlier answer parsing than EVE's evaluation code (reported as such)")
    u = sub.add_parser("submit", help="write the file a benchmark server or grader takes")
    u.add_argument("--benchmark", required=True, choices=tuple(SUBMISSIONS))
    u.add_argument("--answers-file", required=True)
    u.add_argument("--question-file", default=None,
                   help="vqav2: the test question jsonl (LLaVA passes all of test2015); vizwiz: the test "
                        "question jsonl; mmbench: the TSV; seed: SEED-Bench.json")
    u.add_argument("--output-file", required=True,
                   help="mmbench: .xlsx, or .tsv / .csv for the same table")
    u.add_argument("--overwrite", action="store_true", help="replace an --output-file that is not our own earlier one")
    q = sub.add_parser("questions", help="write a question file from a benchmark's own files")
    q.add_argument("--benchmark", required=True, choices=tuple(QUESTION_SOURCES))
    q.add_argument("--source", required=True, help="mmbench: the TSV; mme: MME_Benchmark_release_version; "
                                                   "gqa: testdev_balanced_questions.json; seed: SEED-Bench.json; "
                                                   "scienceqa: LLaVA's llava_test_CQM-A.json")
    q.add_argument("--question-file", required=True)
    q.add_argument("--image-folder", default=None, help="mmbench: where the TSV's images are written")
    q.add_argument("--lang", choices=("en", "cn"), default="en", help="mmbench: the instruction's language")
    q.add_argument("--overwrite", action="store_true",
                   help="replace a --question-file, or --image-folder images, that are not our own earlier ones")
    args = p.parse_args(argv)
    if args.command == "answer":
        if args.max_new_tokens is None:
            args.max_new_tokens = MAX_NEW_TOKENS[args.prompt_style]
        _check_answer_flags(a, args)
    try:
        return {"answer": answer, "score": score, "submit": submit, "questions": questions}[args.command](args)
    except OutputRefused as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (BenchmarkFileError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        output = getattr(args, "answers_file", None) or getattr(args, "question_file", None)
        print(f"error: {os_error_line(error, output)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside answer's loop (which says what it kept): one line, from rank 0
        if is_rank_zero():
            print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
