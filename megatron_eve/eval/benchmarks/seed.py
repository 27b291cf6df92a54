"""SEED-Bench: SEED-Bench.json read, scored and converted for upload as LLaVA's convert_seed_for_submission.py does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

from megatron_eve.eval.benchmarks.files import BenchmarkFileError, load_json
from megatron_eve.eval.prompts import OPTION_SUFFIX
from megatron_eve.eval.scorers import ratio, seed_correct


@dataclass
class SeedQuestion:
    question_id: object  # as SEED-Bench.json has it (a string there)
    answer: str
    data_type: str  # "image" or "video"
    type_name: str
    raw: dict


def seed_key(question_id) -> object:
    """convert_seed_for_submission.py looks a question up under int(question_id) when that parses,
    else under the id itself; answer files are keyed the same way here, so "101669" and 101669 meet."""
    try:
        return int(question_id)
    except (TypeError, ValueError):
        return question_id


def load_seed(path: str) -> List[SeedQuestion]:
    """SEED-Bench.json: {"question_type": {name: id}, "questions": [{"question_id", "answer",
    "data_type", "question_type_id", "question", "choice_a".."choice_d", "data_id", ...}]}."""
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise BenchmarkFileError(f'{path}: not SEED-Bench\'s question file (no "questions" list)')
    names = {type_id: name for name, type_id in (data.get("question_type") or {}).items()}
    questions = []
    for number, row in enumerate(data["questions"]):
        missing = [k for k in ("question_id", "answer", "data_type", "question_type_id")
                   if not isinstance(row, dict) or k not in row]
        if missing:
            raise BenchmarkFileError(f'{path}: questions[{number}] has no {", ".join(missing)}')
        type_id = row["question_type_id"]
        questions.append(SeedQuestion(row["question_id"], str(row["answer"]), str(row["data_type"]),
                                      str(names.get(type_id, type_id)), row))
    return questions


def score_seed(questions: Sequence[SeedQuestion], answers: Dict[object, str], lenient: bool = False) -> dict:
    """answers: {seed_key(question_id): text}. Accuracy (0..1) over all questions, the image ones,
    the video ones, and per question type; a question without an answer is wrong."""
    right = [seed_key(q.question_id) in answers and seed_correct(answers[seed_key(q.question_id)], q.answer, lenient)
             for q in questions]
    by_type: Dict[str, List[bool]] = {}
    for q, correct in zip(questions, right):
        by_type.setdefault(q.type_name, []).append(correct)

    def share(selected: Iterable[int]) -> Optional[float]:
        chosen = list(selected)
        return ratio(sum(right[i] for i in chosen), len(chosen))

    return {"accuracy": share(range(len(questions))),
            "image_accuracy": share(i for i, q in enumerate(questions) if q.data_type == "image"),
            "video_accuracy": share(i for i, q in enumerate(questions) if q.data_type == "video"),
            "question_types": {name: sum(v) / len(v) for name, v in sorted(by_type.items())}}


def seed_questions(questions: Sequence[SeedQuestion], image_prefix: str = "SEED-Bench-image") -> List[dict]:
    """The image questions as LLaVA's / EVE's seed question file has them: the question id a number
    (`seed_key`: convert_seed_for_submission.py looks answers up by int(question_id)), the question,
    the four options as "A. ..." lines, and the option-letter instruction; the image under `image_prefix`."""
    rows = []
    for q in questions:
        if q.data_type != "image":
            continue
        options = "".join(f"\n{letter}. {q.raw.get('choice_' + letter.lower(), '')}" for letter in "ABCD")
        rows.append({"question_id": seed_key(q.question_id), "image": f"{image_prefix}/{q.raw.get('data_id', '')}",
                     "text": f"{q.raw.get('question', '')}{options}\n{OPTION_SUFFIX}",
                     "category": q.type_name})
    return rows


def seed_upload(questions: Sequence[SeedQuestion], answers: Dict[object, str]) -> List[dict]:
    """The upload jsonl convert_seed_for_submission.py writes: one {"question_id", "prediction"} per
    question of SEED-Bench.json, in its order, the prediction the answer text untouched; a
    question without an answer gets "" (the script stops there instead)."""
    return [{"question_id": q.question_id, "prediction": answers.get(seed_key(q.question_id), "")}
            for q in questions]
