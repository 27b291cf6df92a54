"""ScienceQA-IMG: LLaVA's llava_test_CQM-A.json made a question file as model_vqa_science.py asks it
(--single-pred-prompt), and ScienceQA's own problems.json / pid_splits.json scored as EVE's
eval_science_qa.py scores them, with the ScienceQA paper's breakdowns."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from megatron_eve.eval.answer_files import IMAGE_IN_PROMPT
from megatron_eve.eval.benchmarks.files import BenchmarkFileError, load_json
from megatron_eve.eval.prompts import OPTION_SUFFIX
from megatron_eve.eval.scorers import SQA_OPTIONS, choice_letter, ratio, sqa_letter

PROBLEMS, SPLITS = "problems.json", "pid_splits.json"


def scienceqa_questions(path: str) -> List[dict]:
    """llava_test_CQM-A.json ([{"id", "image"?, "conversations": [{"value": "<image>\\n..."}, ...]}]) →
    question rows: the first turn less "<image>", stripped, then the option-letter instruction;
    an entry with an image gets it, and its answer's prompt starts with "<image>\\n" as
    model_vqa_science.py writes it (IMAGE_IN_PROMPT)."""
    data = load_json(path)
    if not isinstance(data, list):
        raise BenchmarkFileError(f'{path}: not LLaVA\'s ScienceQA question file (a JSON list of {{"id", '
                                 f'"conversations"}})')
    rows = []
    for number, entry in enumerate(data):
        try:
            qid, value = entry["id"], entry["conversations"][0]["value"]
        except (KeyError, IndexError, TypeError):
            raise BenchmarkFileError(f'{path}: [{number}] has no "id" or conversations[0].value') from None
        if not isinstance(value, str):
            raise BenchmarkFileError(f"{path}: [{number}]: conversations[0].value is not a string")
        row = {"question_id": qid, "text": value.replace("<image>", "").strip() + "\n" + OPTION_SUFFIX}
        if entry.get("image"):
            row.update(image=entry["image"], **{IMAGE_IN_PROMPT: True})
        rows.append(row)
    return rows


@dataclass(frozen=True)
class SqaProblem:
    pid: str
    answer: int  # the right choice's index
    choices: int  # how many
    image: bool
    hint: bool  # a text context
    subject: str  # "natural science", "social science", "language science"
    grade: str  # "grade1" .. "grade12"


def is_scienceqa(path: str) -> bool:
    """Whether an --annotations path is ScienceQA's data folder (eval_science_qa.py's --base-dir) or its
    problems.json."""
    return os.path.isfile(os.path.join(path, PROBLEMS)) if os.path.isdir(path) else os.path.basename(path) == PROBLEMS


def load_scienceqa(path: str, split: str = "test") -> List[SqaProblem]:
    """The problems of `split` (pid_splits.json beside problems.json), in the split's order."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    problems = load_json(os.path.join(folder, PROBLEMS))
    splits = load_json(os.path.join(folder, SPLITS))
    if not isinstance(problems, dict):
        raise BenchmarkFileError(f"{os.path.join(folder, PROBLEMS)}: not ScienceQA's problems (a JSON object)")
    if not isinstance(splits, dict) or not isinstance(splits.get(split), list):
        raise BenchmarkFileError(f'{os.path.join(folder, SPLITS)}: no "{split}" list of problem ids')
    out = []
    for pid in splits[split]:
        problem = problems.get(pid) if isinstance(pid, str) else None
        if not isinstance(problem, dict) or not isinstance(problem.get("choices"), list) \
                or not isinstance(problem.get("answer"), int):
            raise BenchmarkFileError(f"{os.path.join(folder, PROBLEMS)}: no problem {pid!r} with \"choices\" and an "
                                     f"\"answer\" index (pid_splits.json's {split} split names it)")
        out.append(SqaProblem(pid, problem["answer"], len(problem["choices"]), bool(problem.get("image")),
                              bool(problem.get("hint")), str(problem.get("subject", "")),
                              str(problem.get("grade", ""))))
    return out


def _right(text: Optional[str], problem: SqaProblem, lenient: bool) -> bool:
    """eval_science_qa.py's reading (`sqa_letter`: a letter among the problem's options), or the lenient one."""
    if text is None:
        return False
    letter = choice_letter(text) if lenient else sqa_letter(text, problem.choices)
    return letter is not None and letter in SQA_OPTIONS and SQA_OPTIONS.index(letter) == problem.answer


# The ScienceQA paper's columns (its evaluations.py): subject, context modality, grade.
BREAKDOWN: Dict[str, Callable[[SqaProblem], bool]] = {
    "NAT": lambda p: p.subject == "natural science",
    "SOC": lambda p: p.subject == "social science",
    "LAN": lambda p: p.subject == "language science",
    "TXT": lambda p: p.hint,
    "IMG": lambda p: p.image,
    "NO": lambda p: not p.hint and not p.image,
    "G1-6": lambda p: p.grade in {f"grade{g}" for g in range(1, 7)},
    "G7-12": lambda p: p.grade in {f"grade{g}" for g in range(7, 13)},
}


def score_scienceqa(problems: Sequence[SqaProblem], answers: Dict[str, Optional[str]], lenient: bool = False
                    ) -> dict:
    """answers: {problem id: text, None when unanswered}. Accuracy (0..1) over the split ("accuracy", what
    eval_science_qa.py prints as Accuracy), over its problems with an image ("img_accuracy", its
    IMG-Accuracy: the number EVE and LLaVA report as ScienceQA-IMG) and the paper's breakdowns; an
    unanswered problem is wrong."""
    right = [_right(answers.get(p.pid), p, lenient) for p in problems]

    def share(test: Callable[[SqaProblem], bool]) -> Optional[float]:
        chosen = [r for p, r in zip(problems, right) if test(p)]
        return ratio(sum(chosen), len(chosen))

    return {"accuracy": share(lambda p: True), "img_accuracy": share(BREAKDOWN["IMG"]),
            "breakdown": {name: share(test) for name, test in BREAKDOWN.items()}}
