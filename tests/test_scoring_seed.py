"""SEED-Bench: the per-answer rule, `score --kind seed` (per type, image, video; the upload jsonl) and
`questions --benchmark seed`, by LLaVA's convert_seed_for_submission.py, on a SEED-Bench.json
fixture. Every expected value was worked out by hand from those scripts' rules (the reasoning is in
the comments), never produced by the code under test; the CLI runs in-process
(tests/test_scoring.py's `run`)."""

import json

import pytest

from megatron_eve.eval.scorers import seed_correct
from tests.eval_cli import answers_file, run
from tests.llava_eval_ports import seed_accuracy


# (text as the model wrote it, the option letter, EVE right?, lenient right?)
SEED_ITEMS = [
    ("A", "A", True, True),
    ("B.", "B", False, True),  # exact match: nothing is stripped
    (" C", "C", False, True),
    ("d", "D", False, False),  # case matters, also to the lenient reader
    ("C) three", "C", False, True),
    ("The answer is A", "A", False, True),
    ("", "A", False, False),
]


@pytest.mark.parametrize("text,letter,eve,lenient", SEED_ITEMS)
def test_seed_item_rule(text, letter, eve, lenient):
    assert seed_correct(text, letter) is eve
    assert seed_correct(text, letter, lenient=True) is lenient


def seed_bench(tmp_path):
    """SEED-Bench.json as released: question ids are strings, types named in "question_type"."""
    def q(qid, answer, data_type, type_id):
        return {"answer": answer, "choice_a": "one", "choice_b": "two", "choice_c": "three", "choice_d": "four",
                "data_id": f"{qid}.jpg" if data_type == "image" else f"v{qid}.mp4", "data_type": data_type,
                "question": f"Question {qid}?", "question_id": qid, "question_type_id": type_id}

    data = {"question_type": {"Scene Understanding": 1, "Instance Counting": 3, "Action Recognition": 10},
            "questions": [q("101", "A", "image", 1), q("102", "B", "image", 1), q("103", "C", "image", 1),
                          q("104", "D", "image", 1), q("105", "A", "image", 3), q("106", "B", "image", 3),
                          q("107", "C", "image", 3), q("108", "B", "image", 3), q("109", "A", "video", 10),
                          q("110", "B", "video", 10)]}
    path = tmp_path / "SEED-Bench.json"
    path.write_text(json.dumps(data))
    return path


SEED_ANSWERS = [
    {"question_id": "101", "text": "A"},  # right
    {"question_id": "102", "text": "B."},  # wrong (lenient right)
    {"question_id": "103", "text": " C"},  # wrong (lenient right)
    {"question_id": "104", "text": "d"},  # wrong, both
    {"question_id": 105, "text": "A"},  # an int id: the script looks up int(question_id): right
    # 106 unanswered: wrong, still counted
    {"question_id": "107", "text": "C) three"},  # wrong (lenient right)
    {"question_id": "108", "text": "B"},  # right; the later duplicate "A" is not scored
    {"question_id": "108", "text": "A"},
    {"question_id": "109", "text": "The answer is A"},  # wrong (lenient right)
    {"question_id": "110", "text": "B"},  # right
    {"question_id": "999", "text": "A"},  # not a SEED question
]


def test_seed_scores_per_type_image_video_and_upload(tmp_path):
    upload = tmp_path / "upload" / "seed.jsonl"
    code, out, err = run("score", "--kind", "seed", "--answers-file", answers_file(tmp_path, SEED_ANSWERS),
                         "--annotations", seed_bench(tmp_path), "--converted-output", upload)
    assert code == 0, err
    result = json.loads(out)
    # Scene Understanding 101-104: 1 of 4; Instance Counting 105-108: 105 and 108 of 4; Action
    # Recognition 109-110: 110 of 2. Image 3 of 8, video 1 of 2, all 4 of 10.
    assert result["question_types"] == {"Action Recognition": 0.5, "Instance Counting": 0.5,
                                        "Scene Understanding": 0.25}
    assert (result["image_accuracy"], result["video_accuracy"], result["accuracy"]) == (0.375, 0.5, 0.4)
    assert (result["questions"], result["answered"], result["missing"], result["duplicates"],
            result["not_annotated"]) == (10, 9, 1, 1, 1)
    assert "1 of 10 annotated questions have no answer" in err and "1 duplicate answers" in err
    # The upload file: every question of SEED-Bench.json in its order, the text untouched, "" unanswered.
    rows = [json.loads(line) for line in upload.read_text().splitlines()]
    assert rows == [{"question_id": "101", "prediction": "A"}, {"question_id": "102", "prediction": "B."},
                    {"question_id": "103", "prediction": " C"}, {"question_id": "104", "prediction": "d"},
                    {"question_id": "105", "prediction": "A"}, {"question_id": "106", "prediction": ""},
                    {"question_id": "107", "prediction": "C) three"}, {"question_id": "108", "prediction": "B"},
                    {"question_id": "109", "prediction": "The answer is A"}, {"question_id": "110", "prediction": "B"}]

    # Lenient: 102, 103, 107, 109 become right as well: 3/4, 3/4, 2/2; all 8/10.
    code, out, _ = run("score", "--kind", "seed", "--answers-file", tmp_path / "answers.jsonl", "--annotations",
                       tmp_path / "SEED-Bench.json", "--lenient")
    result = json.loads(out)
    assert result["accuracy"] == 0.8 and result["rules"] == "lenient (not EVE's)"
    assert result["question_types"]["Scene Understanding"] == 0.75


def test_seed_questions_are_the_image_questions_with_the_option_prompt(tmp_path):
    code, out, err = run("questions", "--benchmark", "seed", "--source", seed_bench(tmp_path), "--question-file",
                         tmp_path / "q.jsonl")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert len(rows) == 8  # the two video questions need extracted frames
    # question_id a number: convert_seed_for_submission.py looks answers up by int(question_id)
    assert rows[0] == {"question_id": 101, "image": "SEED-Bench-image/101.jpg", "category": "Scene Understanding",
                       "text": "Question 101?\nA. one\nB. two\nC. three\nD. four\n"
                               "Answer with the option's letter from the given choices directly."}


def test_our_seed_answer_file_scores_the_same_under_llavas_converter(tmp_path, monkeypatch):
    """questions → answer (interrupted, then resumed) → score: the question file's integer ids go
    through answering and resuming, and LLaVA's convert_seed_for_submission.py, which looks answers
    up by int(question_id), finds every one of them: its accuracy is ours. String ids (older files)
    still score the same here."""
    import tools.generate

    class Backend:
        batches = 0
        stop_after = 1

        def answer(self, requests, sampling):
            if Backend.stop_after is not None and Backend.batches >= Backend.stop_after:
                raise KeyboardInterrupt("interrupted")
            Backend.batches += 1
            # 101 → "A", 102 → "B.", 103 → "C", 104 → "D", 105 → "A", 106 → "B.", 107 → "C", 108 → "D"
            return ["ABCD"[(int(r.prompt.split("Question ")[1].split("?")[0]) - 101) % 4] + (
                "." if "Question 102" in r.prompt or "Question 106" in r.prompt else "") for r in requests]

    monkeypatch.setattr(tools.generate, "setup", lambda args: (Backend(), True))
    bench = seed_bench(tmp_path)
    assert run("questions", "--benchmark", "seed", "--source", bench, "--question-file", tmp_path / "q.jsonl")[0] == 0
    answer = ("answer", "--hf", "m", "--question-file", tmp_path / "q.jsonl", "--answers-file", tmp_path / "a.jsonl",
              "--batch-size", "3", "--prompt-style", "option")
    assert run(*answer)[0] == 130  # Ctrl-C: one line, the answers so far kept
    Backend.stop_after = None
    code, out, err = run(*answer)
    assert code == 0 and "resuming: 3 of 8 answers kept" in out, err
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == list(range(101, 109))
    ours = json.loads(run("score", "--kind", "seed", "--answers-file", tmp_path / "a.jsonl", "--annotations",
                          bench)[1])
    # Right: 101 A, 103 C, 104 D, 105 A, 107 C (102 and 106 "B." are not "B", 108 "D" is not "B"; the
    # two video questions are not asked): 5 of 10, 5 of the 8 image questions.
    assert ours["accuracy"] == 0.5 and ours["image_accuracy"] == 0.625
    assert seed_accuracy(bench, tmp_path / "a.jsonl") == pytest.approx(50.0)
    assert seed_accuracy(bench, tmp_path / "a.jsonl", "image") == pytest.approx(62.5)
    strings = answers_file(tmp_path, [dict(r, question_id=str(r["question_id"])) for r in rows], "old.jsonl")
    old = json.loads(run("score", "--kind", "seed", "--answers-file", strings, "--annotations", bench)[1])
    assert old["accuracy"] == 0.5 and seed_accuracy(bench, strings) == 0  # the converter finds none of these


def test_seed_ids_that_are_not_numbers_and_questions_without_fields(tmp_path):
    # An id that int() does not parse is looked up as it is ("a1" only; 1 is not "a1").
    question = {"question_id": "a1", "answer": "A", "data_type": "image", "question_type_id": 1}
    (tmp_path / "seed.json").write_text(json.dumps({"question_type": {"Scene": 1}, "questions": [question]}))
    answers = answers_file(tmp_path, [{"question_id": "a1", "text": "A"}, {"question_id": 1, "text": "B"}])
    code, out, err = run("score", "--kind", "seed", "--answers-file", answers, "--annotations", tmp_path / "seed.json")
    assert code == 0, err
    result = json.loads(out)
    assert (result["accuracy"], result["answered"], result["not_annotated"]) == (1.0, 1, 1)
    # A question without its answer / data_type / question_type_id: one line naming the file and what is missing.
    (tmp_path / "bad.json").write_text(json.dumps({"questions": [question, {"question_id": "a2", "answer": "B"}]}))
    code, out, err = run("score", "--kind", "seed", "--answers-file", answers, "--annotations", tmp_path / "bad.json")
    assert code == 1 and out == "" and err == (
        f"error: {tmp_path / 'bad.json'}: questions[1] has no data_type, question_type_id\n")
