"""`submit` for the server- and grader-scored benchmarks without files of their own here: VQAv2 and
VizWiz (EvalAI, LLaVA's convert_vqav2/vizwiz_for_submission.py) and MM-Vet
(convert_mmvet_for_eval.py). Every expected value was worked out by hand from those scripts' rules
(the reasoning is in the comments), never produced by the code under test; the CLI runs in-process
(tests/test_scoring.py's `run`)."""

import json

from tests.eval_cli import answers_file, run


def test_vqav2_submission_processes_and_fills_every_question(tmp_path):
    questions = tmp_path / "llava_vqav2_mscoco_test2015.jsonl"
    questions.write_text("\n".join(json.dumps({"question_id": i, "image": f"COCO_test2015_{i:012d}.jpg",
                                               "text": "Q?", "category": "default"}) for i in (1, 2, 3, 4)))
    answers = answers_file(tmp_path, [{"question_id": 1, "text": "Two dogs."}, {"question_id": 2, "text": "What's up?"},
                                      {"question_id": 3, "text": "Red,Blue"}])
    out_file = tmp_path / "answers_upload" / "test-dev.json"
    code, out, err = run("submit", "--benchmark", "vqav2", "--answers-file", answers, "--question-file", questions,
                         "--output-file", out_file)
    assert code == 0, err
    # EvalAI's processor: "two" → "2", the period stripped; "?" deleted and "'s" split off; the
    # comma deleted; question 4 unanswered → "".
    assert json.loads(out_file.read_text()) == [{"question_id": 1, "answer": "2 dogs"},
                                                {"question_id": 2, "answer": "what 's up"},
                                                {"question_id": 3, "answer": "redblue"},
                                                {"question_id": 4, "answer": ""}]
    assert "1 of 4 questions have no answer" in err


def test_vizwiz_and_mmvet_files(tmp_path):
    questions = tmp_path / "llava_test.jsonl"
    questions.write_text("\n".join(json.dumps({"question_id": i, "image": f"VizWiz_test_{i:08d}.jpg", "text": "Q?"})
                                   for i in range(3)))
    answers = answers_file(tmp_path, [{"question_id": 0, "text": "Unanswerable"},
                                      {"question_id": 1, "text": "A can of soup."}])
    code, _, err = run("submit", "--benchmark", "vizwiz", "--answers-file", answers, "--question-file", questions,
                       "--output-file", tmp_path / "vizwiz.json")
    assert code == 0, err
    # lower-cased; "a" is an article and goes, the period is stripped; unanswered → "".
    assert json.loads((tmp_path / "vizwiz.json").read_text()) == [
        {"image": "VizWiz_test_00000000.jpg", "answer": "unanswerable"},
        {"image": "VizWiz_test_00000001.jpg", "answer": "can of soup"},
        {"image": "VizWiz_test_00000002.jpg", "answer": ""}]

    answers = answers_file(tmp_path, [{"question_id": 0, "text": "The man is\nironing."}, {"question_id": 1, "text": ""}],
                           "mmvet.jsonl")
    code, _, err = run("submit", "--benchmark", "mmvet", "--answers-file", answers, "--output-file",
                       tmp_path / "mmvet.json")
    assert code == 0, err
    assert json.loads((tmp_path / "mmvet.json").read_text()) == {"v1_0": "The man is\nironing.", "v1_1": ""}
