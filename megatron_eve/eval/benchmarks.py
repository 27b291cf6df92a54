"""The benchmarks' own files (SEED-Bench.json, GQA's questions json, MME's release folder, MMBench's
TSV), read as the reference's evaluation scripts read them, and the scores EVE / LLaVA-1.5 compute
from them:

  SEED-Bench: LLaVA's scripts/convert_seed_for_submission.py: every question of SEED-Bench.json
    counts (an unanswered one is wrong), accuracy per question type, over the image questions,
    the video questions and all;
  GQA: LLaVA's scripts/convert_gqa_for_eval.py, then GQA's eval.py: exact match over the balanced
    questions, also split into "binary" (structural type verify / logical / compare / choose) and
    "open" (query);
  MME: LLaVA's convert_answer_to_mme.py, then MME's eval_tool/calculation.py: per subtask, acc
    (per question) + acc+ (per image: all its questions right), times 100; perception and
    cognition are the sums over their subtasks;
  TextVQA: LLaVA's eval_textvqa.py over TextVQA's own TextVQA_0.5.1_val.json: an answer line is
    matched to the annotation filed under (its question_id, which is the image id in LLaVA's
    question file, and the question prompt_processor reads from its prompt), then m4c's accuracy.

Loaders raise BenchmarkFileError, whose message names the file and what is wrong with it."""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from megatron_eve.eval.scorers import (MME_YES_NO, SHORT_SUFFIX, gqa_prediction, mme_label, seed_correct,
                                      textvqa_question, vqa_accuracy)

# The answer instructions EVE's / LLaVA-1.5's question files end with (and SHORT_SUFFIX).
OPTION_SUFFIX = "Answer with the option's letter from the given choices directly."
OPTION_SUFFIX_CN = "请直接回答选项字母。"


class BenchmarkFileError(ValueError):
    """A benchmark file that cannot be read as its benchmark writes it; the message names it."""


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except OSError as error:
        raise BenchmarkFileError(f"{path}: cannot be read ({error.strerror or error})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BenchmarkFileError(f"{path}: not JSON ({error})") from None


def _ratio(right: int, total: int) -> Optional[float]:
    return right / total if total else None


# ----------------------------------------------------------------------------------- SEED-Bench

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
    data = _load_json(path)
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
        return _ratio(sum(right[i] for i in chosen), len(chosen))

    return {"accuracy": share(range(len(questions))),
            "image_accuracy": share(i for i, q in enumerate(questions) if q.data_type == "image"),
            "video_accuracy": share(i for i, q in enumerate(questions) if q.data_type == "video"),
            "question_types": {name: sum(v) / len(v) for name, v in sorted(by_type.items())}}


def seed_questions(questions: Sequence[SeedQuestion], image_prefix: str = "SEED-Bench-image") -> List[dict]:
    """The image questions as LLaVA's / EVE's seed question file has them: the question, the four
    options as "A. ..." lines, and the option-letter instruction; the image under `image_prefix`."""
    rows = []
    for q in questions:
        if q.data_type != "image":
            continue
        options = "".join(f"\n{letter}. {q.raw.get('choice_' + letter.lower(), '')}" for letter in "ABCD")
        rows.append({"question_id": q.question_id, "image": f"{image_prefix}/{q.raw.get('data_id', '')}",
                     "text": f"{q.raw.get('question', '')}{options}\n{OPTION_SUFFIX}",
                     "category": q.type_name})
    return rows


def seed_upload(questions: Sequence[SeedQuestion], answers: Dict[object, str]) -> List[dict]:
    """The upload jsonl convert_seed_for_submission.py writes: one {"question_id", "prediction"} per
    question of SEED-Bench.json, in its order, the prediction the answer text untouched; a
    question without an answer gets "" (the script stops there instead)."""
    return [{"question_id": q.question_id, "prediction": answers.get(seed_key(q.question_id), "")}
            for q in questions]


# ------------------------------------------------------------------------------------------- GQA

def load_gqa(path: str) -> Dict[str, dict]:
    """GQA's questions json ({questionId: {"question", "answer", "imageId", "isBalanced",
    "types": {"structural", ...}, ...}}), e.g. testdev_balanced_questions.json."""
    data = _load_json(path)
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
    return {name: _ratio(int(sum(values)), len(values)) for name, values in scores.items()}


def gqa_questions(questions: Dict[str, dict]) -> List[dict]:
    """The balanced questions as LLaVA's GQA question file has them: "<imageId>.jpg" and the
    short-answer instruction."""
    return [{"question_id": qid, "image": f"{q.get('imageId', '')}.jpg",
             "text": f"{q.get('question', '')}\n{SHORT_SUFFIX}"}
            for qid, q in questions.items() if q.get("isBalanced", True)]


def gqa_predictions(answers: Sequence[Tuple[object, str]]) -> List[dict]:
    """convert_gqa_for_eval.py's output: [{"questionId", "prediction"}], one per answer, in order."""
    return [{"questionId": qid, "prediction": gqa_prediction(text)} for qid, text in answers]


# ------------------------------------------------------------------------------------------- MME

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


# --------------------------------------------------------------------------------------- TextVQA

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


# --------------------------------------------------------------------------------------- MMBench

MMBENCH_OPTIONS = ("A", "B", "C", "D")
# pandas.read_table's default missing-value strings (pandas 2): LLaVA reads the TSV with it, so a
# cell holding one of these is NaN there, and an option that is NaN ends the option list.
PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
             "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
# The columns convert_mmbench_for_submission.py drops before adding "prediction" as the 7th.
MMBENCH_DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")


def mmbench_missing(value: Optional[str]) -> bool:
    """model_vqa_mmbench.py's is_none on a cell pandas read: NaN (see PANDAS_NA), or "nan" / "none"
    in any case."""
    return value is None or value in PANDAS_NA or value.lower() in ("nan", "none")


def read_mmbench(path: str) -> Tuple[List[str], List[Dict[str, str]]]:
    """MMBench's TSV (mmbench_dev_20230712.tsv ...): its columns and rows (cells as text); it must
    have index, question and A / B; images are base64 in "image"."""
    csv.field_size_limit(sys.maxsize)  # a base64 image is longer than csv's default limit
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t")
            header = next(reader, None)
            # a short line's missing cells are empty, as pandas makes them NaN
            rows = [dict(zip(header, cells + [""] * (len(header) - len(cells)))) for cells in reader if cells
                    ] if header else []
    except OSError as error:
        raise BenchmarkFileError(f"{path}: cannot be read ({error.strerror or error})") from None
    except (csv.Error, UnicodeDecodeError) as error:
        raise BenchmarkFileError(f"{path}: not a TSV file ({error})") from None
    missing = [c for c in ("index", "question", "A", "B") if not header or c not in header]
    if missing:
        raise BenchmarkFileError(f"{path}: not an MMBench TSV (no column {', '.join(missing)})")
    return header, rows


def mmbench_prompt(row: Dict[str, str], lang: str = "en") -> Tuple[str, List[str]]:
    """The question model_vqa_mmbench.py asks (EVE runs it with --single-pred-prompt): the hint
    (when present) on its own line before the question, then "A. ..." for each option up to the
    first missing one, then the option-letter instruction (in Chinese for --lang cn)."""
    options = []
    for letter in MMBENCH_OPTIONS:
        value = row.get(letter)
        if mmbench_missing(value):
            break
        options.append(value)
    question = row["question"]
    if not mmbench_missing(row.get("hint")):
        question = row["hint"] + "\n" + question
    for letter, option in zip(MMBENCH_OPTIONS, options):
        question += f"\n{letter}. {option}"
    return question + "\n" + (OPTION_SUFFIX_CN if lang == "cn" else OPTION_SUFFIX), list(MMBENCH_OPTIONS[:len(options)])


def mmbench_table(header: Sequence[str], rows: Sequence[Dict[str, str]], answers: Dict[str, str]
                  ) -> Tuple[List[str], List[List[Optional[str]]]]:
    """The table convert_mmbench_for_submission.py uploads: the TSV's columns less hint, category,
    source, image, comment and l2-category, with "prediction" (the answer text, untouched) inserted
    as the 7th column; answers: {str(index): text}; a row without an answer gets an empty cell,
    as do the TSV's missing (NaN) cells."""
    columns = [c for c in header if c not in MMBENCH_DROPPED]
    columns.insert(min(6, len(columns)), "prediction")
    table = []
    for row in rows:
        cells = {c: (None if row.get(c) is None or row.get(c) in PANDAS_NA else row[c]) for c in header}
        cells["prediction"] = answers.get(str(row.get("index")))
        table.append([cells.get(c) for c in columns])
    return columns, table
