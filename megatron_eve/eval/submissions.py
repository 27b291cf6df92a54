"""Files for the benchmarks scored on a server (or by another tool), as LLaVA-1.5's / EVE's
scripts/convert_*_for_submission.py and convert_*_for_eval.py write them:

  VQAv2 test-dev (EvalAI): [{"question_id", "answer"}] for every question of the test question file
    (LLaVA passes all of test2015), the answer through EvalAI's processor, "" when unanswered;
  VizWiz (EvalAI): [{"image", "answer"}] for every question of the test file, EvalAI's processor
    applied (it lower-cases, so "Unanswerable" becomes "unanswerable"; nothing else is special);
  MM-Vet (its GPT-4 grader): {"v1_<question_id>": answer text};
  SEED-Bench (the leaderboard) and GQA (its eval.py), MMBench (.xlsx, the server): see benchmarks/.

SUBMISSIONS maps each benchmark to its writer; `write_submission` is `eval_vqa.py submit`."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from megatron_eve.atomic import write_jsonl, write_text
from megatron_eve.eval.answer_files import answer_pairs, read_jsonl, report, warn
from megatron_eve.eval.benchmarks.files import BenchmarkFileError
from megatron_eve.eval.benchmarks.gqa import gqa_predictions
from megatron_eve.eval.benchmarks.mmbench import mmbench_table, read_mmbench
from megatron_eve.eval.benchmarks.seed import load_seed, seed_key, seed_upload
from megatron_eve.eval.outputs import check_output_file, json_list_of, json_object_keyed, jsonl_of, table_with
from megatron_eve.eval.scorers import normalize_vqa_answer
from megatron_eve.eval.xlsx import write_xlsx


def vqav2_submission(questions: Sequence[dict], answers: Dict[str, str]) -> List[dict]:
    """answers: {str(question_id): text}; one entry per question, in the question file's order."""
    return [{"question_id": q["question_id"],
             "answer": normalize_vqa_answer(answers[str(q["question_id"])]) if str(q["question_id"]) in answers
             else ""} for q in questions]


def vizwiz_submission(questions: Sequence[dict], answers: Dict[str, str]) -> List[dict]:
    """answers: {str(question_id): text}; one entry per question, keyed by its image. (LLaVA's
    script stops at an unanswered question; here it gets "".)"""
    return [{"image": q.get("image"), "answer": normalize_vqa_answer(answers.get(str(q["question_id"]), ""))}
            for q in questions]


def mmvet_results(answers: Sequence[Tuple[object, str]]) -> Dict[str, str]:
    """convert_mmvet_for_eval.py: {"v1_<question_id>": text}, the text untouched."""
    return {f"v1_{qid}": text for qid, text in answers}


# ------------------------------------------------------------------------- `eval_vqa.py submit`

Written = Tuple[List[str], Dict[str, str]]  # the questions the file holds, and the answers given, by str(id)


def _read_question_jsonl(path: str) -> List[dict]:
    rows, problems = read_jsonl(path, required=("question_id",))
    report(problems)
    if not rows:
        raise BenchmarkFileError(f"{path}: holds no questions (JSON lines with a question_id)")
    return rows


def _by_id(pairs: Sequence[Tuple[object, str]]) -> Dict[str, str]:
    return {str(qid): text for qid, text in pairs}


def _evalai(build: Callable[[Sequence[dict], Dict[str, str]], List[dict]]):
    """VQAv2's / VizWiz's writer: every question of the test question jsonl, through `build`."""
    def write(question_file: str, pairs: Sequence[Tuple[object, str]], out: str) -> Written:
        questions = _read_question_jsonl(question_file)
        answers = _by_id(pairs)
        write_text(out, json.dumps(build(questions, answers)))
        return [str(q["question_id"]) for q in questions], answers
    return write


def _delimited(rows, delimiter) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    writer.writerows([["" if cell is None else cell for cell in row] for row in rows])
    return buffer.getvalue()


def _write_mmbench(question_file: str, pairs: Sequence[Tuple[object, str]], out: str) -> Written:
    """The TSV's rows with the predictions (`mmbench_table`): .xlsx, or .tsv / .csv by `out`'s extension."""
    answers = _by_id(pairs)
    header, rows = read_mmbench(question_file)
    columns, table = mmbench_table(header, rows, answers)
    if out.lower().endswith((".tsv", ".csv")):
        delimiter = "\t" if out.lower().endswith(".tsv") else ","
        write_text(out, _delimited([columns] + table, delimiter))
    else:
        # pandas held the predictions as text: "007" stays "007"
        for index, column in write_xlsx(out, columns, table, text_columns=("prediction",)):
            warn(f"{out}: question {rows[index].get('index')}: control characters taken out of its {column} "
                 f"(a workbook cannot hold them)")
    return [str(r.get("index")) for r in rows], answers


def _write_seed(question_file: str, pairs: Sequence[Tuple[object, str]], out: str) -> Written:
    questions = load_seed(question_file)
    keyed = {seed_key(qid): text for qid, text in pairs}
    write_jsonl(out, seed_upload(questions, keyed))
    return [str(seed_key(q.question_id)) for q in questions], {str(k): v for k, v in keyed.items()}


def _write_mmvet(question_file: Optional[str], pairs: Sequence[Tuple[object, str]], out: str) -> Written:
    write_text(out, json.dumps(mmvet_results(pairs), indent=2))
    answers = _by_id(pairs)
    return list(answers), answers  # no question file: the answered questions


def _write_gqa(question_file: Optional[str], pairs: Sequence[Tuple[object, str]], out: str) -> Written:
    write_text(out, json.dumps(gqa_predictions(pairs)))
    answers = _by_id(pairs)
    return list(answers), answers  # no question file: the answered questions


@dataclass(frozen=True)
class Submission:
    # (question file, each question's first (question_id, text), output file) → what was written
    write: Callable[[Optional[str], Sequence[Tuple[object, str]], str], Written]
    needs_questions: bool  # every question of the benchmark's --question-file goes into the upload
    ours: Callable[[str], bool]  # whether an existing output file is one this writer wrote
    what: str  # that file, in a refusal


# benchmark → its upload / grader file; "submit --benchmark" choices, in this order
SUBMISSIONS: Dict[str, Submission] = {
    "vqav2": Submission(_evalai(vqav2_submission), True, json_list_of(("question_id", "answer")),
                        "a VQAv2 upload file"),
    "vizwiz": Submission(_evalai(vizwiz_submission), True, json_list_of(("image", "answer")), "a VizWiz upload file"),
    "mmbench": Submission(_write_mmbench, True, table_with(("index", "prediction")), "an MMBench upload table"),
    "seed": Submission(_write_seed, True, jsonl_of(("question_id", "prediction")), "a SEED-Bench upload file"),
    "mmvet": Submission(_write_mmvet, False, json_object_keyed("v1_"), "an MM-Vet results file"),
    "gqa": Submission(_write_gqa, False, json_list_of(("questionId", "prediction")), "a GQA predictions file"),
}


def write_submission(benchmark: str, answers_file: str, question_file: Optional[str], out: str,
                     overwrite: bool = False) -> Tuple[int, int]:
    """The upload / grader file of `benchmark` from an answer file (the first answer of each
    question), warnings for duplicates, unanswered questions (written empty) and answers to no
    question (left out); (answered, empty) questions. `out` never replaces an input, nor a file
    this benchmark's writer did not write unless `overwrite` (OutputRefused)."""
    submission = SUBMISSIONS[benchmark]
    if submission.needs_questions and not question_file:
        raise BenchmarkFileError(f"--benchmark {benchmark} needs --question-file (the benchmark's "
                                 f"questions: every one of them goes into the upload)")
    check_output_file(out, {"--answers-file": answers_file, "--question-file": question_file}, submission.ours,
                      overwrite, submission.what, "--output-file")
    answer_rows, problems = read_jsonl(answers_file, required=("question_id", "text"))
    report(problems)
    pairs = answer_pairs(answer_rows)
    duplicates = len(answer_rows) - len(pairs)
    ids, answers = submission.write(question_file, pairs, out)
    unanswered = sum(1 for i in ids if i not in answers)
    extra = len(set(answers) - set(ids))
    if duplicates:
        warn(f"{duplicates} duplicate answers (the first of each is used)")
    if unanswered:
        warn(f"{unanswered} of {len(ids)} questions have no answer (written empty)")
    if extra:
        warn(f"{extra} answers are for questions not in {question_file} (left out)")
    return len(ids) - unanswered, unanswered
