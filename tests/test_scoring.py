"""tools/eval_vqa.py score by the rules of EVE's own evaluation code (m4c / EvalAI for VQA-style,
eval_pope.py, eval_science_qa.py). Every expected number below was worked out by hand from those
rules (the reasoning is in the comments), not produced by the scorer under test."""

import json

import pytest

from tests.eval_cli import answers_file, run
from tests.llava_eval_ports import eval_pope


def score(tmp_path, answers, annotations, kind, *extra):
    """`score --kind kind` of (question_id, text) answers against {file name: annotation rows}."""
    (tmp_path / "answers.jsonl").write_text("\n".join(json.dumps({"question_id": i, "text": t}) for i, t in answers))
    paths = []
    for name, rows in annotations.items():
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows))
        paths.append(str(tmp_path / name))
    code, out, err = run("score", "--answers-file", tmp_path / "answers.jsonl", "--annotations", *paths,
                         "--kind", kind, *extra)
    assert code == 0, err
    return json.loads(out)


# (prediction, the 10 reference answers, EVE's score, lenient score)
VQA_CASES = [
    # "what's" → tokenised "what 's"; "whats" → contraction table → "what's": different words.
    ("whats", ["what's"] * 10, 0.0, 1.0),
    # EVE deletes the comma ("redblue"); the lenient processor turns it into a space ("red blue").
    ("red,blue", ["red blue"] * 10, 0.0, 1.0),
    # EVE: commas deleted first → "5000-6000" → "-" becomes a space → "5000 6000". Lenient: the
    # digit-comma rule fires, so every punctuation mark is deleted → "50006000".
    ("5,000-6,000", ["5000 6000"] * 10, 1.0, 0.0),
    # "?" is deleted by the tokeniser; "Two" → "2", the period stripped.
    ("yes?", ["yes"] * 10, 1.0, 1.0),
    ("Two dogs.", ["2 dogs"] * 10, 1.0, 1.0),
    # 2 of 10 annotators say "red": for each of those 2, 1 of the other 9 matches (1/3); for each of
    # the other 8, 2 match (2/3): (2/3 + 16/3) / 10 = 0.6.
    ("Red", ["red"] * 2 + ["dark red"] * 8, 0.6, 0.6),
    # Whitespace and case: "  Dark  RED\n" → "dark red"; the 8 "dark red" annotators see 7 matches
    # among the others (1 each), the 2 "red" ones see 8 (1 each): 1.0.
    ("  Dark  RED\n", ["red"] * 2 + ["dark red"] * 8, 1.0, 1.0),
]


@pytest.mark.parametrize("lenient", [False, True], ids=["eve", "lenient"])
def test_vqa_accuracy_follows_eve(tmp_path, lenient):
    answers = [(i, case[0]) for i, case in enumerate(VQA_CASES)]
    truth = [{"question_id": i, "answers": case[1]} for i, case in enumerate(VQA_CASES)]
    truth.append({"question_id": 99, "answers": ["cat"] * 10})  # never answered: scores 0
    result = score(tmp_path, answers, {"truth.jsonl": truth}, "vqa", *(["--lenient"] if lenient else []))
    column = 3 if lenient else 2
    assert result["accuracy"] == pytest.approx(sum(case[column] for case in VQA_CASES) / (len(VQA_CASES) + 1))
    assert result["missing"] == 1 and result["rules"] == ("lenient (not EVE's)" if lenient else "EVE's")


def test_pope_per_category_with_its_own_label_files(tmp_path):
    random = [  # label, answer, EVE's reading
        (1, "no", "No\n", "yes"),  # split on " " only: the word is "No\n", not "No"
        (2, "yes", "Yes, there is a dog.", "yes"),
        (3, "no", "No, there is not.", "no"),  # first sentence, commas deleted: "No there is not"
        (4, "no", "There is\nno dog", "yes"),  # words: "There", "is\nno", "dog"
    ]
    popular = [
        (5, "yes", "No\xa0dog", "yes"),  # a no-break space does not split words
        (6, "no", "not sure", "no"),
    ]
    annotations = {f"coco_pope_{name}.json": [{"question_id": q, "image": f"{q}.jpg", "text": "Is there a dog?",
                                               "label": label} for q, label, _, _ in rows]
                   for name, rows in (("random", random), ("popular", popular))}
    answers = [(q, text) for q, _, text, _ in random + popular]
    result = score(tmp_path, answers, annotations, "pope")
    # random: predictions yes, yes, no, yes vs labels no, yes, no, no → TP 1, FP 2, TN 1, FN 0.
    assert result["categories"]["random"] == pytest.approx(
        {"accuracy": 0.5, "precision": 1 / 3, "recall": 1.0, "f1": 0.5, "yes_ratio": 0.75})
    # popular: yes / yes and no / no → everything right.
    assert result["categories"]["popular"] == pytest.approx(
        {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 0.5})
    # The headline, as LLaVA-1.5 / EVE report POPE: the mean of the categories' figures.
    assert {k: result[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")} == pytest.approx(
        {"accuracy": 0.75, "precision": 2 / 3, "recall": 1.0, "f1": 0.75, "yes_ratio": 0.625})
    # pooled: TP 2, FP 2, TN 2, FN 0 → accuracy 4/6, precision 1/2, recall 1, F1 2/3.
    assert result["pooled"] == pytest.approx(
        {"accuracy": 4 / 6, "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "yes_ratio": 4 / 6})
    # Lenient (whitespace splits): q1 and q4 become "no" (right), q5 becomes "no" (wrong): random 4/4,
    # popular 1/2 (mean 0.75); pooled 5/6.
    lenient = score(tmp_path, answers, annotations, "pope", "--lenient")
    assert lenient["accuracy"] == pytest.approx(0.75) and lenient["pooled"]["accuracy"] == pytest.approx(5 / 6)


def pope_files(tmp_path, labels):
    """coco_pope_<category>.json label files (each numbered from 1) and the question file naming each
    question's category (llava_pope_test.jsonl, numbered once): {category: [label, ...]} → paths."""
    paths, questions = [], []
    for category, rows in labels.items():
        path = tmp_path / f"coco_pope_{category}.json"
        path.write_text("".join(json.dumps({"question_id": i, "image": f"{category}{i}.jpg", "label": label}) + "\n"
                                for i, label in enumerate(rows, 1)))
        paths.append(path)
        questions += [{"question_id": len(questions) + i, "image": f"{category}{i}.jpg", "category": category,
                       "text": "Is there a dog?"} for i in range(1, len(rows) + 1)]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return paths, tmp_path / "q.jsonl"


def score_pope(tmp_path, labels, rows, *extra):
    paths, questions = pope_files(tmp_path, labels)
    code, out, err = run("score", "--kind", "pope", "--answers-file", answers_file(tmp_path, rows), "--annotations",
                         *paths, "--question-file", questions, *extra)
    assert code == 0, err
    return json.loads(out), err


def test_pope_unanswered_and_failed_questions_are_wrong(tmp_path):
    """An unanswered question (no answer line, or one that failed: empty text and metadata.error) is
    wrong: the opposite of its label. eval_pope.py would read the empty text as "yes"."""
    labels = {"random": ["yes", "no", "yes", "no"], "adversarial": ["yes", "no"]}
    rows = [  # question 1 (random, "yes") has no answer line
        {"question_id": 2, "text": "", "metadata": {"error": "image not found"}},  # random, "no": an FP
        {"question_id": 3, "text": "Yes", "metadata": {}},  # TP
        {"question_id": 4, "text": "No", "metadata": {}},  # TN
        {"question_id": 5, "text": "Yes"}, {"question_id": 6, "text": "No"},  # adversarial: both right
    ]
    result, err = score_pope(tmp_path, labels, rows)
    # random: q1 an FN (read "no"), q2 an FP (read "yes"), q3 TP, q4 TN → everything 1/2, yes-ratio 2/4.
    assert result["categories"]["random"] == pytest.approx(
        {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5})
    # pooled: TP 2, FP 1, TN 2, FN 1.
    assert result["pooled"] == pytest.approx(
        {"accuracy": 4 / 6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 0.5})
    assert result["f1"] == pytest.approx(0.75) and result["accuracy"] == pytest.approx(0.75)
    assert (result["questions"], result["answered"], result["missing"], result["failed"]) == (6, 4, 1, 1)
    assert "1 of 6 annotated questions have no answer" in err and "1 answers could not be given" in err
    # Lenient parsing does not make them right either.
    assert score_pope(tmp_path, labels, rows, "--lenient")[0]["pooled"]["accuracy"] == pytest.approx(4 / 6)


def test_pope_headline_is_the_mean_of_the_splits_as_eval_pope_py_per_split(tmp_path):
    """LLaVA-1.5 and EVE report POPE as the mean of eval_pope.py's figures over the three splits
    (LLaVA-1.5's F1 85.9 = (87.18 + 86.29 + 84.50) / 3); the splits differ in size here, so the
    pooled figures differ."""
    labels = {"adversarial": ["yes", "no"] * 4, "popular": ["yes", "no", "no"], "random": ["yes", "no", "yes"]}
    texts = {"adversarial": ["Yes", "Yes.", "No, not", "yes", "No", "There is no dog.", "Yes", "no\n"],
             "popular": ["Yes", "No", "Yes, there is."], "random": ["no", "No.", "Yes"]}
    rows, qid = [], 0
    for category in labels:
        for text in texts[category]:
            qid += 1
            rows.append({"question_id": qid, "text": text})
    result, _ = score_pope(tmp_path, labels, rows)
    official, start = {}, 0
    for category, category_labels in labels.items():
        official[category] = eval_pope(rows[start:start + len(category_labels)], category_labels)
        start += len(category_labels)
    for index, name in enumerate(("f1", "accuracy", "precision", "recall", "yes_ratio")):
        assert result[name] == pytest.approx(sum(f[index] for f in official.values()) / 3), name
        for category, figures in official.items():
            assert result["categories"][category][name] == pytest.approx(figures[index]), (category, name)
    assert result["f1"] != pytest.approx(result["pooled"]["f1"]) and "mean" in result["headline"]


SQA_CASES = [  # answer text, gold letter, number of choices, EVE right?, lenient right?
    ("B", "B", 3, True, True),
    ("C. a cat", "C", 3, True, True),
    ("The answer is A.", "A", 2, True, True),
    ("The answer is A", "A", 2, False, True),  # EVE's pattern needs a character after the letter
    ("A", "B", 3, False, False),
    ("A dog", "A", 3, False, True),  # an article is not an option (lenient reads it as A)
    ("(B)", "B", 3, False, True),
    ("The answer is B. The answer is C.", "B", 3, False, True),  # two matches: not exactly one
    ("D", "C", 3, False, False),  # D is not among 3 options
    (None, "A", 2, False, False),  # unanswered: wrong, still counted
]


@pytest.mark.parametrize("lenient", [False, True], ids=["eve", "lenient"])
def test_science_qa_parser_follows_eve(tmp_path, lenient):
    answers = [(i, case[0]) for i, case in enumerate(SQA_CASES) if case[0] is not None]
    # Gold as ScienceQA stores it: an index into the choices.
    truth = [{"question_id": i, "answer": "ABCDE".index(case[1]), "choices": [f"c{k}" for k in range(case[2])]}
             for i, case in enumerate(SQA_CASES)]
    result = score(tmp_path, answers, {"problems.jsonl": truth}, "choice", *(["--lenient"] if lenient else []))
    right = sum(case[4 if lenient else 3] for case in SQA_CASES)
    assert (right, result["questions"], result["missing"]) == ((7 if lenient else 3), 10, 1)
    assert result["accuracy"] == pytest.approx(right / 10)


def test_pope_label_files_numbered_alike_are_matched_per_category_by_order(tmp_path):
    """POPE's coco_pope_<category>.json files each number their questions from 1. LLaVA's
    eval_pope.py takes each answer's category from the question file and pairs that category's
    answers with its label file's labels by order."""
    labels = {"random": ["yes", "no", "yes"], "adversarial": ["no", "no", "yes"]}
    for category, rows in labels.items():
        (tmp_path / f"coco_pope_{category}.json").write_text("\n".join(
            json.dumps({"question_id": i, "image": f"{category}{i}.jpg", "text": "Is there a dog?", "label": label})
            for i, label in enumerate(rows, 1)))
    # llava_pope_test.jsonl numbers all questions once; here the categories take turns
    order = [("random", 1), ("adversarial", 1), ("random", 2), ("adversarial", 2), ("random", 3), ("adversarial", 3)]
    (tmp_path / "llava_pope_test.jsonl").write_text("\n".join(
        json.dumps({"question_id": qid, "image": f"{category}{i}.jpg", "text": "Is there a dog?",
                    "category": category}) for qid, (category, i) in enumerate(order, 1)))
    texts = ["Yes", "no", "yes", "No", "No", "yes"]
    (tmp_path / "answers.jsonl").write_text("\n".join(json.dumps({"question_id": qid, "text": text})
                                                      for qid, text in enumerate(texts, 1)))
    args = ["score", "--kind", "pope", "--answers-file", tmp_path / "answers.jsonl", "--annotations",
            tmp_path / "coco_pope_random.json", tmp_path / "coco_pope_adversarial.json"]
    code, out, err = run(*args)  # which category is question 1 of the answers? Only the question file says.
    assert code == 1 and out == "" and "both have question_id 1" in err and "--question-file" in err, err
    code, out, err = run(*args, "--question-file", tmp_path / "llava_pope_test.jsonl")
    assert code == 0, err
    result = json.loads(out)
    # random: questions 1, 3, 5 → labels yes, no, yes; read yes, yes, no → TP 1, FP 1, FN 1.
    assert result["categories"]["random"] == pytest.approx(
        {"accuracy": 1 / 3, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 2 / 3})
    # adversarial: questions 2, 4, 6 → labels no, no, yes; read no, no, yes → all right.
    assert result["categories"]["adversarial"] == pytest.approx(
        {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 1 / 3})
    # headline: the two categories' mean (accuracy (1/3 + 1) / 2, F1 (1/2 + 1) / 2);
    # pooled: TP 2, FP 1, TN 2, FN 1 → accuracy 4/6, F1 2/3.
    assert result["accuracy"] == pytest.approx(2 / 3) and result["f1"] == pytest.approx(0.75)
    assert result["pooled"]["accuracy"] == pytest.approx(4 / 6) and result["pooled"]["f1"] == pytest.approx(2 / 3)
    assert result["questions"] == 6 and result["missing"] == 0 and err == ""

    # Within one label file a repeated question_id is flagged; the first is scored.
    (tmp_path / "coco_pope_random.json").write_text('{"question_id": 1, "label": "yes"}\n'
                                                   '{"question_id": 1, "label": "no"}\n')
    code, out, err = run("score", "--kind", "pope", "--answers-file", tmp_path / "answers.jsonl", "--annotations",
                         tmp_path / "coco_pope_random.json")
    assert code == 0 and "1 annotations repeat an earlier question_id" in err and "coco_pope_random.json:2" in err
    assert json.loads(out)["questions"] == 1 and json.loads(out)["accuracy"] == 1.0


def test_vqa_annotations_in_vqav2_layout_and_of_the_wrong_type(tmp_path):
    """VQAv2's annotations hold [{"answer", "answer_confidence", "answer_id"}, ...]; a row whose
    "answers" is a string is reported (file:line), not split into characters and scored 0."""
    vqav2 = [{"answer": a, "answer_confidence": "yes", "answer_id": i}
             for i, a in enumerate(["yes"] * 9 + ["no"], 1)]
    (tmp_path / "answers.jsonl").write_text("\n".join(json.dumps({"question_id": i, "text": "yes"}) for i in (1, 2)))
    (tmp_path / "truth.jsonl").write_text(json.dumps({"question_id": 1, "answers": vqav2}) + "\n"
                                          + json.dumps({"question_id": 2, "answers": "yes"}) + "\n")
    code, out, err = run("score", "--kind", "vqa", "--answers-file", tmp_path / "answers.jsonl", "--annotations",
                         tmp_path / "truth.jsonl")
    assert code == 0, err
    result = json.loads(out)
    assert result["accuracy"] == 1.0 and result["questions"] == 1 and result["unreadable_lines"] == 1
    assert f'{tmp_path / "truth.jsonl"}:2: "answers" must be a list of strings' in err
