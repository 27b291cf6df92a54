"""MME: the release folder as convert_answer_to_mme.py reads it, scored as its calculation.py (acc + acc+)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_eve.eval.benchmarks.files import BenchmarkFileError
from megatron_eve.eval.prompts import SHORT_SUFFIX
from megatron_eve.eval.scorers import MME_YES_NO, mme_label


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class MMEQuestion:
    category: str
    file: str  # the ground-truth .txt's name, one per image
    question: str
    answer: str  # "Yes" / "No"
    image: Optional[str]  # the image's path under the release folder, when found


def load_mme(root: str) -> List[MMEQuestion]:
    """MME_Benchmark_release_version as convert_answer_to_mme.py reads it: one folder per subtask;
    its questions are either beside the images (<image>.txt) or, when it has an images/ folder,
    in questions_answers_YN/; each line "question<TAB>answer", stripped."""
    if not os.path.isdir(root):
        raise BenchmarkFileError(f"{root}: not MME's release folder (not a directory)")
    questions = []
    for category in sorted(os.listdir(root)):
        folder = os.path.join(root, category)
        if not os.path.isdir(folder):
            continue
        if os.path.exists(os.path.join(folder, "images")):
            image_dir, qa_dir = os.path.join(folder, "images"), os.path.join(folder, "questions_answers_YN")
        else:
            image_dir = qa_dir = folder
        if not os.path.isdir(qa_dir):
            raise BenchmarkFileError(f"{qa_dir}: missing (MME keeps the questions of {category} there)")
        images = {os.path.splitext(name)[0]: name for name in os.listdir(image_dir)
                  if name.lower().endswith(IMAGE_EXTENSIONS)}
        for name in sorted(os.listdir(qa_dir)):
            if not name.endswith(".txt"):
                continue
            path = os.path.join(qa_dir, name)
            image = images.get(os.path.splitext(name)[0])
            image_path = os.path.relpath(os.path.join(image_dir, image), root) if image else None
            with open(path, encoding="utf-8", errors="replace") as handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    fields = line.strip().split("\t")
                    if len(fields) != 2 or fields[1].lower() not in ("yes", "no"):
                        raise BenchmarkFileError(f"{path}:{number}: not 'question<TAB>Yes|No'")
                    questions.append(MMEQuestion(category, name, fields[0], fields[1], image_path))
    if not questions:
        raise BenchmarkFileError(f"{root}: no MME questions found (expected <subtask>/*.txt)")
    return questions


def mme_answer_place(question_id) -> Tuple[str, str]:
    """(subtask, ground-truth file) of an answer, from its question_id "<subtask>/<image>" as
    convert_answer_to_mme.py splits it (the image's name up to its first "." plus ".txt")."""
    text = str(question_id)
    return text.split("/")[0], text.split("/")[-1].split(".")[0] + ".txt"


def score_mme(questions: Sequence[MMEQuestion], answers: Dict[Tuple[str, str, str], str],
              lenient: bool = False) -> dict:
    """answers: {(subtask, file, question): text}. Per subtask: acc, acc+ and their sum times 100;
    perception / cognition: the sums over the subtasks present (all 10 / 4 for the real score)."""
    subtasks: Dict[str, Dict[str, List[bool]]] = {}
    others: Dict[str, int] = {}
    for q in questions:
        text = answers.get((q.category, q.file, q.question))
        label = mme_label(text, lenient) if text is not None else "other"
        others[q.category] = others.get(q.category, 0) + (label == "other")
        subtasks.setdefault(q.category, {}).setdefault(q.file, []).append(label == q.answer.lower())
    result: Dict[str, dict] = {}
    for category, images in subtasks.items():
        per_question = [r for rights in images.values() for r in rights]
        acc = sum(per_question) / len(per_question)
        acc_plus = sum(all(rights) for rights in images.values()) / len(images)
        result[category] = {"acc": acc, "acc_plus": acc_plus, "score": (acc + acc_plus) * 100,
                            "questions": len(per_question), "images": len(images), "other": others[category]}
    return {"perception": sum(result[c]["score"] for c in MME_PERCEPTION if c in result),
            "cognition": sum(result[c]["score"] for c in MME_COGNITION if c in result),
            "subtasks": result,
            "subtasks_absent": [c for c in MME_PERCEPTION + MME_COGNITION if c not in result]}


MME_ANSWER_FILES = frozenset(f"{name}.txt" for name in MME_PERCEPTION + MME_COGNITION)


def mme_answer_files(answers: Dict[Tuple[str, str, str], str], questions: Sequence[MMEQuestion]
                     ) -> Dict[str, str]:
    """convert_answer_to_mme.py's output for MME's own calculation.py: {"<subtask>.txt": text} with
    "file<TAB>question<TAB>gold<TAB>answer" lines, in answer order; answers: as `score_mme` takes
    them (an answer to no MME question is left out)."""
    truth = {(q.category, q.file, q.question): q for q in questions}
    lines: Dict[str, List[str]] = {}
    for key, text in answers.items():
        if key in truth:
            lines.setdefault(key[0], []).append("\t".join((key[1], key[2], truth[key].answer, text)))
    return {f"{category}.txt": "".join(row + "\n" for row in rows) for category, rows in lines.items()}


def mme_questions(questions: Sequence[MMEQuestion]) -> List[dict]:
    """A question file for MME: question_id "<subtask>/<image>" (what convert_answer_to_mme.py
    splits), the image's path under the release folder, and the question with "Please answer yes
    or no." taken out and the short-answer instruction added; the converter puts that sentence back
    when it looks the question up. (LLaVA's llava_mme.jsonl is not public in a repository; this is
    the prompt lmms-eval uses to reproduce LLaVA-1.5's MME score.)"""
    rows = []
    for q in questions:
        if q.image is None:
            continue
        text = q.question.replace(MME_YES_NO, "").strip()
        rows.append({"question_id": f"{q.category}/{os.path.basename(q.image)}", "image": q.image,
                     "text": f"{text}\n{SHORT_SUFFIX}", "category": q.category})
    return rows
