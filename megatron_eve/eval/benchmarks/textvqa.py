"""TextVQA: TextVQA_0.5.1_val.json, answers found as eval_textvqa.py finds them, m4c's accuracy."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_eve.eval.benchmarks.files import BenchmarkFileError
from megatron_eve.eval.scorers import textvqa_question, vqa_accuracy


@dataclass
class TextVQAQuestion:
    question_id: object  # TextVQA's own id: named in reports, never matched on
    image_id: object
    question: str
    answers: List[str]  # the 10 annotators' answers

    @property
    def key(self) -> Tuple[object, str]:
        """What eval_textvqa.py files the annotation under."""
        return self.image_id, self.question.lower()


def _json_with_data(path: str) -> Optional[dict]:
    """The JSON object in `path` when it has a "data" key (TextVQA's layout), else None; a jsonl
    file is told apart by its first line alone, so a large one is not parsed twice. An unreadable
    file raises OSError, as the jsonl reader would."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        first = handle.readline()
        try:
            head = json.loads(first)
        except json.JSONDecodeError:
            if not first.lstrip().startswith("{"):
                return None
            handle.seek(0)
            try:  # one object over several lines (pretty-printed)
                head = json.load(handle)
            except json.JSONDecodeError:
                return None
    return head if isinstance(head, dict) and "data" in head else None


def load_textvqa(path: str) -> Optional[List[TextVQAQuestion]]:
    """TextVQA's own annotation file (TextVQA_0.5.1_val.json: {"dataset_name": "textvqa", "data":
    [{"question", "image_id", "answers": [10 strings], "question_id", ...}]}), or None when `path`
    is not a JSON object with a "data" key (a jsonl annotation file, read as such elsewhere)."""
    data = _json_with_data(path)
    if data is None:
        return None
    if not isinstance(data["data"], list):
        raise BenchmarkFileError(f'{path}: not TextVQA\'s annotation file ("data" is not a list)')
    if not data["data"]:
        raise BenchmarkFileError(f'{path}: TextVQA\'s "data" list is empty')
    questions = []
    for number, row in enumerate(data["data"]):
        where = f"{path}: data[{number}]"
        if not isinstance(row, dict):
            raise BenchmarkFileError(f"{where} is not an object")
        image_id = row.get("image_id")
        if not isinstance(image_id, (str, int)) or isinstance(image_id, bool):
            raise BenchmarkFileError(f'{where} has no "image_id"')
        if not isinstance(row.get("question"), str):
            raise BenchmarkFileError(f'{where} has no "question"')
        answers = row.get("answers")
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise BenchmarkFileError(f'{where} has no "answers" list (the test split\'s are not public: EvalAI '
                                     f"scores it)")
        if len(answers) != 10:  # m4c's evaluator asserts 10
            raise BenchmarkFileError(f"{where} has {len(answers)} answers, not the 10 m4c's evaluator takes")
        questions.append(TextVQAQuestion(row.get("question_id", f"data[{number}]"), image_id, row["question"],
                                         answers))
    return questions


@dataclass
class TextVQAMatch:
    given: List[Optional[str]]  # per annotation, in file order: the answer text scored (None: unanswered)
    duplicates: List[object]  # question_ids of the answer lines beyond their key's annotations (not scored)
    not_annotated: List[str]  # "file:line" of answers whose (question_id, question) no annotation has
    unkeyed: List[str]  # "file:line: why" of answers eval_textvqa.py cannot key (it stops the run there)


def match_textvqa(questions: Sequence[TextVQAQuestion], answers: Sequence[Tuple[str, dict]]) -> TextVQAMatch:
    """eval_textvqa.py's lookup of each answer line ("file:line", row): the annotation filed under
    (row["question_id"], textvqa_question(row["prompt"])), compared exactly ("12" is not 12).
    Annotations sharing a key are one dict entry there; here such a key takes as many answers as it
    has annotations, in order, and any further line is a duplicate."""
    slots: Dict[Tuple[object, str], List[int]] = {}
    for index, question in enumerate(questions):
        slots.setdefault(question.key, []).append(index)
    used: Dict[Tuple[object, str], int] = {}
    match = TextVQAMatch([None] * len(questions), [], [], [])
    for where, row in answers:
        qid, prompt = row.get("question_id"), row.get("prompt")
        if not isinstance(qid, (str, int, float)) or isinstance(qid, bool):
            match.unkeyed.append(f"{where}: question_id {json.dumps(qid)[:40]} is not a string or a number")
            continue
        if not isinstance(prompt, str):
            match.unkeyed.append(f"{where}: no prompt (eval_textvqa.py finds the question by it)")
            continue
        question = textvqa_question(prompt)
        if question is None:
            match.unkeyed.append(f"{where}: eval_textvqa.py's prompt_processor does not read this prompt (not "
                                 f"'OCR tokens: … Question: … Short answer:', 3 lines with 'Reference OCR token: ', "
                                 f"or 2 lines); not scored")
            continue
        key = (qid, question)
        if key not in slots:
            match.not_annotated.append(where)
        elif used.get(key, 0) == len(slots[key]):
            match.duplicates.append(qid)
        else:
            match.given[slots[key][used.get(key, 0)]] = row["text"] if isinstance(row.get("text"), str) else ""
            used[key] = used.get(key, 0) + 1
    return match


def score_textvqa(questions: Sequence[TextVQAQuestion], given: Sequence[Optional[str]], lenient: bool = False
                  ) -> dict:
    """m4c's accuracy over every annotation (an unanswered one scores 0), each against the answers
    of the last annotation with its key, which is what eval_textvqa.py's dict holds."""
    gold = {q.key: q.answers for q in questions}
    scores = [0.0 if text is None else vqa_accuracy(text, gold[q.key], lenient) for q, text in zip(questions, given)]
    return {"accuracy": sum(scores) / len(scores)}
