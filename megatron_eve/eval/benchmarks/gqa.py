"""GQA: its questions json, scored as LLaVA's convert_gqa_for_eval.py + GQA's eval.py do (binary / open)."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from megatron_eve.eval.benchmarks.files import BenchmarkFileError, load_json
from megatron_eve.eval.prompts import SHORT_SUFFIX
from megatron_eve.eval.scorers import gqa_prediction, ratio


def load_gqa(path: str) -> Dict[str, dict]:
    """GQA's questions json ({questionId: {"question", "answer", "imageId", "isBalanced",
    "types": {"structural", ...}, ...}}), e.g. testdev_balanced_questions.json."""
    data = load_json(path)
    if not isinstance(data, dict) or not data:
        raise BenchmarkFileError(f"{path}: not a GQA questions file (a JSON object keyed by questionId)")
    for qid, question in data.items():
        if not isinstance(question, dict) or "answer" not in question:
            raise BenchmarkFileError(f'{path}: question {qid} has no "answer"')
    return data


def score_gqa(questions: Dict[str, dict], answers: Dict[str, str], lenient: bool = False) -> dict:
    """answers: {str(question_id): text}. eval.py's accuracy over the balanced questions: the
    converted prediction equals the answer; "open" questions are structural type "query", the
    others "binary". A question without an answer is wrong (eval.py refuses to run instead)."""
    scores: Dict[str, List[float]] = {"accuracy": [], "binary": [], "open": []}
    for qid, question in questions.items():
        if not question.get("isBalanced", True):
            continue
        text = answers.get(str(qid))
        score = float(text is not None and gqa_prediction(text, lenient) == question["answer"])
        scores["accuracy"].append(score)
        structural = (question.get("types") or {}).get("structural")
        scores["open" if structural == "query" else "binary"].append(score)
    return {name: ratio(int(sum(values)), len(values)) for name, values in scores.items()}


def gqa_questions(questions: Dict[str, dict]) -> List[dict]:
    """The balanced questions as LLaVA's GQA question file has them: "<imageId>.jpg" and the
    short-answer instruction."""
    return [{"question_id": qid, "image": f"{q.get('imageId', '')}.jpg",
             "text": f"{q.get('question', '')}\n{SHORT_SUFFIX}"}
            for qid, q in questions.items() if q.get("isBalanced", True)]


def gqa_predictions(answers: Sequence[Tuple[object, str]]) -> List[dict]:
    """convert_gqa_for_eval.py's output: [{"questionId", "prediction"}], one per answer, in order."""
    return [{"questionId": qid, "prediction": gqa_prediction(text)} for qid, text in answers]
