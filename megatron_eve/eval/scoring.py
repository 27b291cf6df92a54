"""An answer file scored against its ground truth (`eval_vqa.py score`), by --kind:

  ANNOTATION_KINDS (vqa, pope, choice): annotation jsonl rows {"question_id", ...}, each kind's
    reference answer and metric (scorers.py); POPE's coco_pope_<category>.json files name their
    category, and with the question file (each question's category) each category's questions are
    matched to its label file by order, as eval_pope.py does (its files each number from 1); POPE's
    top-level figures are the mean of the categories' (as LLaVA-1.5 / EVE report it), "pooled" all
    questions as one set; --kind vqa also takes TextVQA's own TextVQA_0.5.1_val.json, matched as
    eval_textvqa.py matches it; --kind choice ScienceQA's own problems.json (or its folder), its
    test split (pid_splits.json), as eval_science_qa.py scores it;
  BENCHMARK_KINDS (seed, gqa, mme): the benchmark's own files (benchmarks/), answers keyed as its
    scripts key them, and --converted-output: what LLaVA's converter writes for the benchmark's
    own tool.

Every annotated question counts: one without an answer, or whose answer failed (metadata.error),
scores as wrong (and is counted);
duplicate answers are flagged and the first is scored; lines that cannot be read are reported
(file:line) and counted. The result is one JSON object: the scores, then those counts."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from megatron_eve.atomic import recover_replaced, staged_directory, write_jsonl, write_text
from megatron_eve.eval.answer_files import (answer_pairs, first_answers, given_text, read_jsonl, report, usable_id,
                                            warn)
from megatron_eve.eval.benchmarks.files import BenchmarkFileError
from megatron_eve.eval.benchmarks.gqa import gqa_predictions, load_gqa, score_gqa
from megatron_eve.eval.benchmarks.mme import MME_ANSWER_FILES, load_mme, mme_answer_files, mme_answer_place, score_mme
from megatron_eve.eval.benchmarks.scienceqa import is_scienceqa, load_scienceqa, score_scienceqa
from megatron_eve.eval.benchmarks.seed import load_seed, score_seed, seed_key, seed_upload
from megatron_eve.eval.benchmarks.textvqa import load_textvqa, match_textvqa, score_textvqa
from megatron_eve.eval.outputs import check_output_file, check_output_folder, json_list_of, jsonl_of
from megatron_eve.eval.scorers import (mean, mme_question_candidates, multiple_choice_accuracy, pope_metrics,
                                       vqa_accuracy)


@dataclass(frozen=True)
class ScoreRun:
    answers_file: str
    annotations: Sequence[str]
    kind: str
    lenient: bool = False  # friendlier answer parsing than EVE's (reported as such)
    converted_output: Optional[str] = None  # BENCHMARK_KINDS only
    overwrite: bool = False  # replace a --converted-output we did not write
    question_file: Optional[str] = None  # pope: each question's category, matched to its label file by order


def score_answer_file(run: ScoreRun) -> dict:
    """The scores and counts of `run`; problems and coverage are printed as warnings. Raises
    BenchmarkFileError (a file that is not what the kind takes) and OutputRefused (a --converted-output
    that is an input, or that we did not write), the latter before any work."""
    if run.question_file and run.kind != "pope":
        raise BenchmarkFileError(f"--question-file is for --kind pope, not {run.kind}")
    if run.converted_output:
        _check_converted_output(run)
    answer_rows, problems = read_jsonl(run.answers_file, required=("question_id", "text"), numbered=True)
    if run.kind in BENCHMARK_KINDS:
        return _score_benchmark(run, answer_rows, problems, BENCHMARK_KINDS[run.kind])
    if run.kind == "choice" and any(is_scienceqa(path) for path in run.annotations):
        return _score_benchmark(run, answer_rows, problems, _score_scienceqa)
    textvqa = _textvqa_annotations(run)
    if textvqa is not None:
        return _score_textvqa(run, answer_rows, problems, textvqa)
    return _score_annotations(run, answer_rows, problems)


def _rules(lenient: bool) -> str:
    return "lenient (not EVE's)" if lenient else "EVE's"


def _warn_coverage(duplicates, missing, total) -> None:
    if duplicates:
        warn(f"{len(duplicates)} duplicate answers (the first of each is scored), e.g. question_id "
             f"{', '.join(map(str, duplicates[:5]))}")
    if missing:
        warn(f"{len(missing)} of {total} annotated questions have no answer and score as wrong, "
             f"e.g. question_id {', '.join(map(str, missing[:5]))}")


# ------------------------------------------------------------------- annotation jsonl: vqa, pope, choice

class BadAnnotation(ValueError):
    """An annotation row whose reference answer has the wrong type; reported as file:line, not scored."""


def _vqa_gold(row: dict):
    """VQA's answer list: strings, or VQAv2's [{"answer": ...}, ...]; or its one "answer"."""
    answers = row.get("answers")
    if answers in (None, []):
        if "answer" not in row:
            return None
        answers = [row["answer"]]
    elif isinstance(answers, list) and all(isinstance(a, dict) for a in answers):
        answers = [a.get("answer") for a in answers]  # VQAv2's annotation layout
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise BadAnnotation('"answers" must be a list of strings (or VQAv2\'s [{"answer": "..."}, ...]) or '
                            '"answer" a string')
    return answers


def _pope_gold(row: dict) -> Optional[str]:
    """POPE's "label" (or "answer")."""
    value = row.get("label", row.get("answer"))
    return value if isinstance(value, str) else None


def _choice_gold(row: dict) -> Optional[str]:
    """The option letter; ScienceQA's "answer" index into "choices" becomes its letter."""
    value = row.get("answer")
    if isinstance(value, int) and not isinstance(value, bool):
        return "ABCDE"[value] if 0 <= value < 5 else None
    return value if isinstance(value, str) else None


# The scores functions take each question's answer text, None where it went unanswered (no answer, or
# one that failed: metadata.error), which is wrong.

def _vqa_scores(given: List[Optional[str]], gold: list, truth: List[dict], lenient: bool) -> dict:
    return {"accuracy": mean([0.0 if text is None else vqa_accuracy(text, answers, lenient)
                              for text, answers in zip(given, gold)])}


POPE_HEADLINE = ("the mean of the categories' (splits') figures, as LLaVA-1.5 / EVE report POPE; pooled: all "
                 "questions as one set")


def _pope_scores(given: List[Optional[str]], gold: list, truth: List[dict], lenient: bool) -> dict:
    """eval_pope.py's figures per category (split); the top-level ones are their mean, as LLaVA-1.5 and
    EVE report POPE (LLaVA-1.5's F1 85.9 = the mean of its three splits'), when every question has a
    category; the figures of all questions as one set are kept under "pooled"."""
    pooled = pope_metrics(given, gold, lenient)
    categories = sorted({row["category"] for row in truth if row.get("category")})
    if not categories:
        return pooled
    per = {c: pope_metrics([text for text, row in zip(given, truth) if row.get("category") == c],
                           [label for label, row in zip(gold, truth) if row.get("category") == c], lenient)
           for c in categories}
    if not all(row.get("category") for row in truth):
        warn("some POPE questions have no category: the top-level figures are pooled, not the categories' mean")
        return dict(pooled, categories=per)
    result = {name: mean([figures[name] for figures in per.values()]) for name in pooled}
    result.update(headline=POPE_HEADLINE, pooled=pooled, categories=per)
    return result


def _choice_scores(given: List[Optional[str]], gold: list, truth: List[dict], lenient: bool) -> dict:
    counts = [len(row["choices"]) if isinstance(row.get("choices"), list) else None for row in truth]
    return {"accuracy": multiple_choice_accuracy(["" if text is None else text for text in given], gold, counts,
                                                 lenient)}


@dataclass(frozen=True)
class AnnotationKind:
    gold: Callable[[dict], object]  # an annotation row's reference answer(s); None: the row is not scored
    scores: Callable[[List[Optional[str]], list, List[dict], bool], dict]  # (answers, golds, rows, lenient)


ANNOTATION_KINDS: Dict[str, AnnotationKind] = {
    "vqa": AnnotationKind(_vqa_gold, _vqa_scores),  # TextVQA / VQAv2 accuracy
    "pope": AnnotationKind(_pope_gold, _pope_scores),  # per category and overall
    "choice": AnnotationKind(_choice_gold, _choice_scores),  # ScienceQA-style option letters
}


def _annotations(paths) -> Tuple[List[dict], List[str]]:
    """Ground-truth rows of one or more files, in order, and the lines that cannot be read. Each row
    keeps where it came from ("_where": file:line, "_file"), so POPE's per-category label files
    (coco_pope_<category>.json) name their category."""
    rows, problems = [], []
    for path in paths:
        found, bad = read_jsonl(path, required=("question_id",), numbered=True)
        problems += bad
        category = re.search(r"pope_(\w+?)\.jsonl?$", os.path.basename(path))
        for row in found:
            row.setdefault("category", category.group(1) if category else None)
            row.update(_where=f"{path}:{row.pop('_line')}", _file=path)
            rows.append(row)
    return rows, problems


def _truth_by_id(run: ScoreRun, rows: List[dict], problems: List[str]) -> Dict[object, dict]:
    """{question_id: its annotation row}, the first of each id (repeats are warned about). POPE's
    label files each number their questions from 1: when two of them share ids, the answers'
    categories must come from the question file (--question-file), as eval_pope.py takes them."""
    truth: Dict[object, dict] = {}
    repeated = []
    for row in rows:
        qid = row["question_id"]
        if not usable_id(qid):
            problems.append(f"{row['_where']}: question_id {json.dumps(qid)[:40]} is not a string or a number")
            continue
        if qid in truth:
            first = truth[qid]
            if run.kind == "pope" and first["_file"] != row["_file"]:
                raise BenchmarkFileError(
                    f"{first['_file']} and {row['_file']} both have question_id {qid}: POPE's label files each "
                    f"number their questions from 1; pass --question-file (the question file answered, e.g. "
                    f"llava_pope_test.jsonl) to match each category's answers to its labels by order, as "
                    f"eval_pope.py does")
            repeated.append(row["_where"])
            continue
        truth[qid] = row
    if repeated:
        warn(f"{len(repeated)} annotations repeat an earlier question_id (the first is scored), e.g. "
             f"{', '.join(repeated[:3])}")
    return truth


def _pope_truth_by_order(run: ScoreRun, rows: List[dict], problems: List[str]) -> Dict[object, dict]:
    """eval_pope.py's matching: each category's questions (the question file's "category"), in
    order, against that category's label file (coco_pope_<category>.json), in order. Matched by
    the question file's order rather than the answers', so that a missing answer cannot shift the
    labels of the others (LLaVA's answers come in question order: the same pairs)."""
    labels: Dict[str, List[dict]] = {}
    for row in rows:
        if not row["category"]:
            raise BenchmarkFileError(f"{row['_file']}: names no category: with --question-file POPE's label files "
                                     f"are matched by their name, coco_pope_<category>.json")
        labels.setdefault(row["category"], []).append(row)
    questions, bad = read_jsonl(run.question_file, required=("question_id",), numbered=True)
    problems += bad
    truth: Dict[object, dict] = {}
    asked: Counter = Counter()
    unlabelled, repeated, other_image = [], [], []
    for question in questions:
        category, qid = question.get("category"), question["question_id"]
        if not isinstance(category, str) or category not in labels:
            unlabelled.append(f"{run.question_file}:{question['_line']}")
            continue
        position = asked[category]
        asked[category] += 1
        if position >= len(labels[category]) or not usable_id(qid):
            continue
        if qid in truth:
            repeated.append(f"{run.question_file}:{question['_line']}")
            continue
        label = labels[category][position]
        if question.get("image") and label.get("image") and question["image"] != label["image"]:
            other_image.append(f"{run.question_file}:{question['_line']} ({question['image']}) and "
                               f"{label['_where']} ({label['image']})")
        truth[qid] = label
    for category, found in sorted(labels.items()):
        if asked[category] != len(found):
            warn(f"{found[0]['_file']} has {len(found)} labels for the {asked[category]} questions of category "
                 f"{category} in {run.question_file} (matched by order; the extra ones are left out)")
    if unlabelled:
        warn(f"{len(unlabelled)} questions of {run.question_file} have no label file for their category (not "
             f"scored), e.g. {', '.join(unlabelled[:3])}")
    if repeated:
        warn(f"{len(repeated)} questions repeat an earlier question_id (the first is scored), e.g. "
             f"{', '.join(repeated[:3])}")
    if other_image:
        warn(f"{len(other_image)} questions name another image than the label matched to them by order, e.g. "
             f"{other_image[0]}: is --question-file the question file these label files were made with?")
    return truth


def _score_annotations(run: ScoreRun, answer_rows, problems) -> dict:
    kind = ANNOTATION_KINDS[run.kind]
    truth_rows, truth_problems = _annotations(run.annotations)
    answers, duplicates = first_answers(answer_rows, lambda r: r["question_id"], problems, given_text)
    if run.question_file:
        truth_by_id = _pope_truth_by_order(run, truth_rows, truth_problems)
    else:
        truth_by_id = _truth_by_id(run, truth_rows, truth_problems)
    truth = {}
    for qid, row in truth_by_id.items():
        try:
            if kind.gold(row) is not None:
                truth[qid] = row
        except BadAnnotation as error:
            truth_problems.append(f"{row['_where']}: {error}")
    report(problems + truth_problems)
    if not truth:
        raise BenchmarkFileError(f"{', '.join(run.annotations)} hold no question with a usable answer for "
                                 f"--kind {run.kind}")
    ids = list(truth)
    missing = [i for i in ids if i not in answers]
    _warn_coverage(duplicates, missing, len(ids))
    failures = [i for i in ids if i in answers and answers[i] is None]
    if failures:
        warn(f"{len(failures)} answers could not be given (metadata.error) and score as wrong, e.g. question_id "
             f"{', '.join(map(str, failures[:5]))}")
    result = kind.scores([answers.get(i) for i in ids], [kind.gold(truth[i]) for i in ids],
                         [truth[i] for i in ids], run.lenient)
    result.update(questions=len(ids), answered=len(ids) - len(missing) - len(failures), missing=len(missing),
                  failed=len(failures), duplicates=len(duplicates),
                  not_annotated=sum(1 for i in answers if i not in truth),
                  unreadable_lines=len(problems) + len(truth_problems), rules=_rules(run.lenient))
    return result


# ------------------------------------------------------------------------------------- TextVQA

def _textvqa_annotations(run: ScoreRun):
    """The questions of TextVQA's own annotation file when --annotations is one, else None (jsonl)."""
    loaded = [(path, load_textvqa(path)) for path in run.annotations]
    found = [path for path, questions in loaded if questions is not None]
    if not found:
        return None
    if len(loaded) != 1:  # its answers are matched by prompt, the jsonl rows' by question_id
        raise BenchmarkFileError(f"{found[0]}: TextVQA's annotation file is scored on its own (one "
                                 f"--annotations path, not {len(loaded)})")
    if run.kind != "vqa":
        raise BenchmarkFileError(f"{found[0]}: TextVQA's annotation file; score it with --kind vqa")
    return loaded[0][1]


def _score_textvqa(run: ScoreRun, answer_rows, problems, questions) -> dict:
    """--kind vqa against TextVQA_0.5.1_val.json, each answer found as eval_textvqa.py finds it.
    Where that script stops (a prompt its prompt_processor cannot read, an answer with no
    annotation) the line is reported and left out, and the run goes on."""
    rows = [(f"{run.answers_file}:{row['_line']}", row) for row in answer_rows]
    match = match_textvqa(questions, rows)
    report(problems + match.unkeyed)
    missing = [q.question_id for q, text in zip(questions, match.given) if text is None]
    _warn_coverage(match.duplicates, missing, len(questions))
    if match.not_annotated:
        warn(f"{len(match.not_annotated)} answers match no annotation by (question_id = image id, the prompt's "
             f"question) and are not scored, e.g. {', '.join(match.not_annotated[:5])}")
    shared = len(questions) - len({q.key for q in questions})
    if shared:
        warn(f"{shared} annotations share (image id, question) with another; all are scored against the last "
             f"one's answers, as eval_textvqa.py does")
    result = score_textvqa(questions, match.given, run.lenient)
    result.update(questions=len(questions), answered=len(questions) - len(missing), missing=len(missing),
                  duplicates=len(match.duplicates), not_annotated=len(match.not_annotated),
                  unkeyed_answers=len(match.unkeyed), unreadable_lines=len(problems), rules=_rules(run.lenient))
    return result


# ------------------------------------------------------------ the benchmarks' own files: seed, gqa, mme

@dataclass
class _Keyed:
    """A benchmark's answers keyed as its scripts key them, and its scores."""
    scores: dict
    answers: Dict[object, Optional[str]]  # key → the first answer's text (ScienceQA: None, failed)
    duplicates: List[object]  # question_ids of the later answers
    ids: List[object]  # the keys of the questions that count
    name: Callable[[object], object] = lambda key: key  # a question in warnings


def _score_seed(path: str, answer_rows, problems, run: ScoreRun) -> _Keyed:
    """SEED-Bench.json; --converted-output: the upload jsonl."""
    questions = load_seed(path)
    answers, duplicates = first_answers(answer_rows, lambda r: seed_key(r["question_id"]), problems)
    scores = score_seed(questions, answers, run.lenient)
    if run.converted_output:
        write_jsonl(run.converted_output, seed_upload(questions, answers))
    return _Keyed(scores, answers, duplicates, [seed_key(q.question_id) for q in questions])


def _score_gqa(path: str, answer_rows, problems, run: ScoreRun) -> _Keyed:
    """GQA's questions json; --converted-output: the predictions json its eval.py reads."""
    questions = load_gqa(path)
    answers, duplicates = first_answers(answer_rows, lambda r: str(r["question_id"]), problems)
    scores = score_gqa(questions, answers, run.lenient)
    if run.converted_output:
        write_text(run.converted_output, json.dumps(gqa_predictions(answer_pairs(answer_rows))))
    return _Keyed(scores, answers, duplicates, [str(q) for q, v in questions.items() if v.get("isBalanced", True)])


def _score_scienceqa(path: str, answer_rows, problems, run: ScoreRun) -> _Keyed:
    """--kind choice against ScienceQA's problems.json (its folder, eval_science_qa.py's --base-dir),
    the test split of pid_splits.json; answers found by question_id (the problem id, as a string).
    eval_science_qa.py counts a problem as IMG by '<image>' in its answer's prompt (model_vqa_science.py
    writes it there); here by problems.json's image, the same for a complete answer file of LLaVA's
    or of ours, and the answers whose prompts say otherwise are counted in a warning."""
    questions = load_scienceqa(path)
    rows, duplicates = first_answers(answer_rows, lambda r: str(r["question_id"]), problems, lambda r: r)
    answers = {pid: given_text(row) for pid, row in rows.items()}
    scores = score_scienceqa(questions, answers, run.lenient)
    other = [p.pid for p in questions if p.pid in rows and p.image != ("<image>" in str(rows[p.pid].get("prompt")))]
    if other:
        warn(f"{len(other)} answers' prompts disagree with problems.json on having an image ('<image>' in the "
             f"prompt, by which eval_science_qa.py counts IMG-Accuracy), e.g. question_id {', '.join(other[:5])}")
    return _Keyed(scores, answers, duplicates, [p.pid for p in questions])


def _holds_mme_answers(folder) -> bool:
    """Whether `folder` holds only what --converted-output writes for MME (an earlier conversion)."""
    # Every name: the folder is replaced whole, and a "*.tmp" in it is not one of ours (we write in staging).
    return set(os.listdir(folder)) <= MME_ANSWER_FILES


def _write_mme_folder(folder: str, files: Dict[str, str]) -> None:
    """The whole folder built beside `folder` and swapped in: no <subtask>.txt of an earlier run
    stays for calculation.py to score with these."""
    with staged_directory(folder) as staging:
        for name, text in files.items():
            write_text(os.path.join(staging, name), text)


def _score_mme(path: str, answer_rows, problems, run: ScoreRun) -> _Keyed:
    """MME's release folder, each answer found by its prompt (convert_answer_to_mme.py's lookup);
    --converted-output: a folder of <subtask>.txt for MME's calculation.py."""
    questions = load_mme(path)
    truth = dict.fromkeys((q.category, q.file, q.question) for q in questions)

    def key(row):
        if not isinstance(row.get("prompt"), str):
            problems.append(f"{run.answers_file}: question_id {row['question_id']}: no prompt (MME finds the "
                            f"question by it)")
            return None
        category, name = mme_answer_place(row["question_id"])
        for question in mme_question_candidates(row["prompt"]):
            if (category, name, question) in truth:
                return category, name, question
        return ("not annotated", str(row["question_id"]), row["prompt"])

    answers, duplicates = first_answers(answer_rows, key, problems)
    scores = score_mme(questions, answers, run.lenient)
    if run.converted_output:
        _write_mme_folder(run.converted_output, mme_answer_files(answers, questions))
    return _Keyed(scores, answers, duplicates, list(truth), name=lambda key: "/".join(key[:2]))


# kind → (its one --annotations path, the answer rows, the problems so far, the run) → keyed scores
BENCHMARK_KINDS: Dict[str, Callable[[str, List[dict], List[str], ScoreRun], _Keyed]] = {
    "seed": _score_seed,  # SEED-Bench.json
    "gqa": _score_gqa,  # testdev_balanced_questions.json
    "mme": _score_mme,  # MME_Benchmark_release_version
}

KINDS = (*ANNOTATION_KINDS, *BENCHMARK_KINDS)  # the --kind choices

# kind → (whether an existing --converted-output is our own earlier one, what that is, whether it is a folder)
CONVERTED_OUTPUTS: Dict[str, Tuple[Callable[[str], bool], str, bool]] = {
    "seed": (jsonl_of(("question_id", "prediction")), "a SEED-Bench upload file", False),
    "gqa": (json_list_of(("questionId", "prediction")), "a GQA predictions file", False),
    "mme": (_holds_mme_answers, "MME answer files (<subtask>.txt)", True),
}


def _check_converted_output(run: ScoreRun) -> None:
    """Before any work: --converted-output never replaces an input, nor what we did not write
    (unless --overwrite)."""
    if run.kind not in CONVERTED_OUTPUTS:
        raise BenchmarkFileError(f"--converted-output is for --kind seed, gqa or mme, not {run.kind}")
    ours, what, folder = CONVERTED_OUTPUTS[run.kind]
    inputs = [("--answers-file", run.answers_file), ("--question-file", run.question_file)]
    inputs += [("--annotations", path) for path in run.annotations]
    if folder:
        recover_replaced(run.converted_output, legacy=False)  # a swap killed between its renames
        check_output_folder(run.converted_output, inputs, ours, run.overwrite, what, "--converted-output")
    else:
        check_output_file(run.converted_output, inputs, ours, run.overwrite, what, "--converted-output")


def _score_benchmark(run: ScoreRun, answer_rows, problems, keyer: Callable[..., _Keyed]) -> dict:
    """--kind seed / gqa / mme, and choice on ScienceQA's files: the benchmark's own ground truth,
    scored as EVE's scripts do (`keyer`: one of BENCHMARK_KINDS, or _score_scienceqa)."""
    if len(run.annotations) != 1:
        raise BenchmarkFileError(f"--kind {run.kind} takes one --annotations path, not {len(run.annotations)}")
    keyed = keyer(run.annotations[0], answer_rows, problems, run)
    report(problems)
    missing = [i for i in keyed.ids if i not in keyed.answers]
    _warn_coverage(keyed.duplicates, [keyed.name(m) for m in missing], len(keyed.ids))
    result = keyed.scores
    result.update(questions=len(keyed.ids), answered=len(keyed.ids) - len(missing), missing=len(missing),
                  duplicates=len(keyed.duplicates), not_annotated=len(set(keyed.answers) - set(keyed.ids)),
                  unreadable_lines=len(problems), rules=_rules(run.lenient))
    return result
