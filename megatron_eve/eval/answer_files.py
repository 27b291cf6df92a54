"""Question, answer and annotation files (JSON Lines) as the evaluation reads and writes them.

Nothing lost to one bad line: a line that cannot be read becomes a problem "file:line: why",
reported as a warning, and reading goes on; a question that cannot be asked still gets its answer
line (empty text, metadata.error). An answer line is {"question_id", "prompt", "text",
"answer_id", "model_id", "metadata"}, as LLaVA's model_vqa*.py write them."""

from __future__ import annotations

import json
import os
import sys
import uuid
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from megatron_eve.eval.benchmarks.files import BenchmarkFileError
from megatron_eve.eval.prompts import with_suffix


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def report(problems: Sequence[str], limit: int = 20) -> None:
    """The first `limit` problems as warnings, then how many more there are."""
    for line in problems[:limit]:
        warn(line)
    if len(problems) > limit:
        warn(f"… and {len(problems) - limit} more")


def read_jsonl(path: str, required: Sequence[str] = (), numbered: bool = False) -> Tuple[List[dict], List[str]]:
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


def read_questions(path: str) -> Tuple[List[dict], List[str]]:
    """A question file's questions and problems (`read_jsonl`); a file that yields no question at all
    is refused (BenchmarkFileError) with what it is instead: empty, a JSON list or one JSON object
    (JSON, not JSON Lines), or lines that are no question."""
    questions, problems = read_jsonl(path, required=("question_id", "text"))
    if questions:
        return questions, problems
    with open(path, encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    data = None
    if text.lstrip()[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            pass
    if not text.strip():
        why = "empty"
    elif isinstance(data, list):
        why = (f"a JSON list of {len(data)} items, not JSON Lines (e.g. LLaVA's llava_test_CQM-A.json: `questions "
               f"--benchmark scienceqa --source` converts it): a question file has one {{\"question_id\", \"text\", "
               f"\"image\"}} object per line")
    elif isinstance(data, dict):
        why = "one JSON object, not JSON Lines: a question file has one question object per line"
    else:
        why = f"no line is a question ({problems[0]}, and {len(problems) - 1} more such lines)"
    raise BenchmarkFileError(f"{path}: {why}; nothing to answer")


def chunk(items: Sequence, count: int, index: int) -> Sequence:
    """Part `index` of `items` cut into `count` consecutive parts of ceil(len / count) (answering split
    over machines, as LLaVA's --num-chunks / --chunk-idx)."""
    size = -(-len(items) // count)
    return items[index * size : (index + 1) * size]


# ------------------------------------------------------------------------------------ answering

def askable(question: dict) -> bool:
    """Whether a question line can be asked: read whole, its text a string and its image, if it has
    one, a file name (an empty one is not "no image": the reference opens every line's image)."""
    image = question.get("image")
    return ("_error" not in question and isinstance(question.get("text"), str)
            and (image is None or (isinstance(image, str) and image != "")))


def unaskable_reason(question: dict) -> str:
    """Why `askable` refused a question: its answer line's metadata.error."""
    return question.get("_error") or "malformed question: 'text' must be a string and 'image' a file name"


def image_paths(question: dict, image_folder: str) -> List[str]:
    return [os.path.join(image_folder, question["image"])] if question.get("image") else []


IMAGE_IN_PROMPT = "image_in_prompt"  # a question row's flag: its answer's prompt starts with "<image>\n"


def answer_row(question: dict, suffix: str, model_id: str, text: str = "", error: Optional[str] = None) -> dict:
    """The answer line of `question`: its prompt as asked (`with_suffix`), the text ("" when it
    could not be answered) and metadata.error saying why not. The prompt is the question's text as
    LLaVA's model_vqa*.py write it: without the image placeholder, except for a question with an
    image and IMAGE_IN_PROMPT (ScienceQA: model_vqa_science.py writes "<image>\n" first, and
    eval_science_qa.py counts a question as IMG by it)."""
    prompt = with_suffix(question["text"], suffix) if isinstance(question.get("text"), str) else ""
    if prompt and question.get("image") and question.get(IMAGE_IN_PROMPT) is True:
        prompt = "<image>\n" + prompt
    return {"question_id": question["question_id"], "prompt": prompt, "text": "" if error else text,
            "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {"error": error} if error else {}}


# ------------------------------------------------------------------------------ reading answers

def usable_id(question_id) -> bool:
    return isinstance(question_id, (str, int, float)) and not isinstance(question_id, bool)


def _text(row: dict) -> str:
    return row["text"] if isinstance(row.get("text"), str) else ""


def failed(row: dict) -> bool:
    """Whether an answer line is one `answer` could not give (metadata.error): unanswered."""
    return isinstance(row.get("metadata"), dict) and bool(row["metadata"].get("error"))


def given_text(row: dict) -> Optional[str]:
    """An answer line's text; None when the question went unanswered (`failed`)."""
    return None if failed(row) else _text(row)


def first_answers(rows: Sequence[dict], key: Callable[[dict], object], problems: Optional[List[str]] = None,
                  value: Callable[[dict], object] = _text) -> Tuple[Dict[object, object], List[object]]:
    """{key(row): value(row)} (the text) keeping the first answer of each question, and the
    question_ids of the later duplicates; a row whose key is None, or whose question_id is not a
    string or a number, is skipped."""
    answers, duplicates = {}, []
    for row in rows:
        if not usable_id(row["question_id"]):
            if problems is not None:
                problems.append(f"question_id {json.dumps(row['question_id'])[:40]}: not a string or a number")
            continue
        k = key(row)
        if k is None:
            continue
        if k in answers:
            duplicates.append(row["question_id"])
            continue
        answers[k] = value(row)
    return answers, duplicates


def answer_pairs(rows: Sequence[dict]) -> List[Tuple[object, str]]:
    """(question_id, text) of each question's first answer, in answer-file order."""
    seen, pairs = set(), []
    for row in rows:
        qid = row["question_id"]
        if usable_id(qid) and str(qid) not in seen:
            seen.add(str(qid))
            pairs.append((qid, _text(row)))
    return pairs
