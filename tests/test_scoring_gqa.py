"""GQA: the prediction rule, `score --kind gqa` and its predictions file, by LLaVA's
convert_gqa_for_eval.py + GQA's eval.py, on a testdev_balanced_questions.json fixture. Every
expected value was worked out by hand from those scripts' rules (the reasoning is in the comments),
never produced by the code under test; the CLI runs in-process (tests/test_scoring.py's `run`)."""

import json

import pytest

from megatron_eve.eval.scorers import gqa_prediction
from tests.eval_cli import answers_file, run


# (answer text, what convert_gqa_for_eval.py writes, the same leniently)
GQA_ITEMS = [
    ("Yes.", "yes", "yes"),
    ("No. ", "no. ", "no"),  # rstrip('.') first: the trailing space protects the period
    ("LEFT...", "left", "left"),
    ("white\n", "white\n", "white"),
    ("T-shirt.", "t-shirt", "t-shirt"),
    ("the table", "the table", "the table"),  # no article removal in GQA
    ("U.S.", "u.s", "u.s"),
]


@pytest.mark.parametrize("text,eve,lenient", GQA_ITEMS)
def test_gqa_prediction_rule(text, eve, lenient):
    assert gqa_prediction(text) == eve and gqa_prediction(text, lenient=True) == lenient


def gqa_questions(tmp_path):
    """testdev_balanced_questions.json's layout: {questionId: {...}}."""
    def q(answer, structural, balanced=True):
        return {"semantic": [], "entailed": [], "equivalent": [], "question": "Q?", "imageId": "n161313",
                "groups": {"global": None, "local": "x"}, "answer": answer, "semanticStr": "",
                "annotations": {"answer": {}, "question": {}, "fullAnswer": {}}, "types": {
                    "detailed": "d", "semantic": "attr", "structural": structural}, "fullAnswer": "",
                "isBalanced": balanced}

    data = {"201": q("yes", "verify"), "202": q("no", "logical"), "203": q("left", "query"),
            "204": q("white", "query"), "205": q("table", "query"), "206": q("t-shirt", "query"),
            "207": q("yes", "compare"), "208": q("no", "verify", balanced=False), "209": q("red", "query")}
    path = tmp_path / "testdev_balanced_questions.json"
    path.write_text(json.dumps(data))
    return path


def test_gqa_accuracy_binary_open_and_predictions_file(tmp_path):
    answers = [{"question_id": "201", "text": "Yes."}, {"question_id": "202", "text": "No. "},
               {"question_id": 203, "text": "LEFT..."}, {"question_id": "204", "text": "white\n"},
               {"question_id": "205", "text": "the table"}, {"question_id": "206", "text": "T-shirt."},
               {"question_id": "208", "text": "no"}, {"question_id": "209", "text": "Red"},
               {"question_id": "209", "text": "blue"}]  # 207 unanswered; 209 twice (the first counts)
    predictions = tmp_path / "testdev_balanced_predictions.json"
    code, out, err = run("score", "--kind", "gqa", "--answers-file", answers_file(tmp_path, answers),
                         "--annotations", gqa_questions(tmp_path), "--converted-output", predictions)
    assert code == 0, err
    result = json.loads(out)
    # Balanced: 201-207, 209 (208 is not). Right: 201, 203, 206, 209 → 4/8. Binary (not "query"):
    # 201, 202, 207 → 1/3. Open: 203, 204, 205, 206, 209 → 3/5.
    assert (result["accuracy"], result["binary"], result["open"]) == (0.5, pytest.approx(1 / 3), 0.6)
    assert (result["questions"], result["missing"], result["duplicates"], result["not_annotated"]) == (8, 1, 1, 1)
    # convert_gqa_for_eval.py's list: each answer's questionId as written, text.rstrip('.').lower().
    assert json.loads(predictions.read_text()) == [
        {"questionId": "201", "prediction": "yes"}, {"questionId": "202", "prediction": "no. "},
        {"questionId": 203, "prediction": "left"}, {"questionId": "204", "prediction": "white\n"},
        {"questionId": "205", "prediction": "the table"}, {"questionId": "206", "prediction": "t-shirt"},
        {"questionId": "208", "prediction": "no"}, {"questionId": "209", "prediction": "red"}]
    # Lenient: 202 and 204 right too: 6/8, binary 2/3, open 4/5.
    code, out, _ = run("score", "--kind", "gqa", "--answers-file", tmp_path / "answers.jsonl", "--annotations",
                       tmp_path / "testdev_balanced_questions.json", "--lenient")
    result = json.loads(out)
    assert (result["accuracy"], result["binary"], result["open"]) == (0.75, pytest.approx(2 / 3), 0.8)


def test_gqa_questions_are_the_balanced_ones_with_the_short_prompt(tmp_path):
    code, out, err = run("questions", "--benchmark", "gqa", "--source", gqa_questions(tmp_path), "--question-file",
                         tmp_path / "q.jsonl")
    assert code == 0 and out.startswith("8 questions"), err
    rows = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    # LLaVA's GQA question file: "<imageId>.jpg", the question and the short-answer instruction; 208 is
    # not balanced, so it is left out.
    assert [r["question_id"] for r in rows] == ["201", "202", "203", "204", "205", "206", "207", "209"]
    assert rows[0] == {"question_id": "201", "image": "n161313.jpg",
                       "text": "Q?\nAnswer the question using a single word or phrase."}


def test_bad_gqa_files_get_one_line(tmp_path):
    answers = answers_file(tmp_path, [{"question_id": "1", "text": "yes"}])
    for name, content, message in [("empty.json", {}, "not a GQA questions file"),
                                   ("list.json", [1], "not a GQA questions file"),
                                   ("no_answer.json", {"7": {"question": "Q?"}}, 'question 7 has no "answer"')]:
        (tmp_path / name).write_text(json.dumps(content))
        code, out, err = run("score", "--kind", "gqa", "--answers-file", answers, "--annotations", tmp_path / name)
        assert code == 1 and out == "" and err.startswith(f"error: {tmp_path / name}: {message}"), err
        assert err.count("\n") == 1, err
