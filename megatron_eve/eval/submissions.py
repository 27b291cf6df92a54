"""Files for the benchmarks scored on a server (or by another tool), as LLaVA-1.5's / EVE's
scripts/convert_*_for_submission.py and convert_*_for_eval.py write them:

  VQAv2 test-dev (EvalAI): [{"question_id", "answer"}] for every question of the test question file
    (LLaVA passes all of test2015), the answer through EvalAI's processor, "" when unanswered;
  VizWiz (EvalAI): [{"image", "answer"}] for every question of the test file, EvalAI's processor
    applied (it lower-cases, so "Unanswerable" becomes "unanswerable"; nothing else is special);
  MM-Vet (its GPT-4 grader): {"v1_<question_id>": answer text};
  SEED-Bench (the leaderboard) and GQA (its eval.py), MMBench (.xlsx, the server): see benchmarks.py."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from megatron_eve.eval.scorers import normalize_vqa_answer


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
