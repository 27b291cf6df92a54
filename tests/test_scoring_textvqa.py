"""TextVQA against its own TextVQA_0.5.1_val.json: eval_textvqa.py's prompt_processor, its lookup of
each answer by (question_id = image id, the prompt's question), m4c's accuracy, and one-line errors
for files that are not TextVQA's. Every expected value was worked out by hand from those scripts'
rules (the reasoning is in the comments), never produced by the code under test; the CLI runs
in-process (tests/test_scoring.py's `run`)."""

import json

import pytest

from megatron_eve.eval.scorers import textvqa_question
from tests.eval_cli import SHORT, answers_file, run


# (prompt, what eval_textvqa.py's prompt_processor returns; None where it stops the run)
TEXTVQA_PROMPTS = [
    # LLaVA's question file: question, OCR line, instruction: line 1, lower-cased
    ("What is the BRAND?\nReference OCR token: DAKOTA, digital\n" + SHORT[1:], "what is the brand?"),
    # the OCR line first: line 2
    ("Reference OCR token: simon, clancy\nWho is this by?\n" + SHORT[1:], "who is this by?"),
    # plain question + instruction: line 1, nothing stripped
    ("Is this a bottle? \n" + SHORT[1:], "is this a bottle? "),
    ("Is this a bottle?\n", "is this a bottle?"),  # 2 lines, the second empty
    # the OCR line first but only 2 lines: the 2-line rule takes line 1, the OCR line itself
    ("Reference OCR token: a, b\n" + SHORT[1:], "reference ocr token: a, b"),
    # BLIP-style: between "Question: " and the first " Short answer:", across lines too
    ("OCR tokens: 22, NIKE. Question: What Number? Short answer: ", "what number?"),
    ("OCR tokens: x. Question: Line one\nline two Short answer: y Short answer:", "line one\nline two"),
    ("OCR tokens: x. Question: What year?\nShort answer:", None),  # no " Short answer:": match is None
    ("What year?", None),  # one line: assert False
    ("Reference OCR token:1999\nWhat year?\n" + SHORT[1:], None),  # 3 lines, but no "token: " (space): assert
    ("What year?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n" + SHORT[1:],
     None),  # vizwiz style: 3 lines without an OCR line
    ("Q?\nReference OCR token: a\nmore\n" + SHORT[1:], None),  # 4 lines
]


@pytest.mark.parametrize("prompt,question", TEXTVQA_PROMPTS)
def test_textvqa_prompt_processor_rule(prompt, question):
    assert textvqa_question(prompt) == question


def textvqa_val(tmp_path, indent=None):
    """TextVQA_0.5.1_val.json's layout (the fields of each question as released)."""
    def q(qid, image_id, question, answers):
        assert len(answers) == 10
        return {"question": question, "image_id": image_id, "image_classes": ["Camera"],
                "flickr_original_url": f"https://farm2.staticflickr.com/{image_id}_o.jpg",
                "flickr_300k_url": f"https://farm2.staticflickr.com/{image_id}_z.jpg", "image_width": 1024,
                "image_height": 664, "answers": answers, "question_tokens": question.lower().split(),
                "question_id": qid, "set_name": "val"}

    data = [
        q(34602, "003a8ae2ef43b901", "what is the brand of this camera?",
          ["dakota"] * 3 + ["dakota digital"] * 4 + ["nous les gosses", "clos culombu", "kodak"]),
        q(34603, "003a8ae2ef43b901", "What Does The Small White Text Say?",
          ["copenhagen"] * 2 + ["since 1838"] * 4 + ["royal copenhagen"] * 4),
        q(34604, "0054c91397f2fe05", "what number is on the player's jersey?", ["22"] * 10),
        q(34605, "005635e119b9f32f", "who is this copyrighted by?",
          ["simon clancy"] + ["clancy"] * 4 + ["simon"] * 2 + ["unanswerable"] * 3),
        q(34606, "005635e119b9f32f", "what year?", ["1999"] * 10),
        q(34607, "00685bc495504d61", "is this a bottle?", ["yes"] * 10),
        # the same image and question twice (case aside): one key, the last one's answers count
        q(34608, "00685bc495504d61", "what color is the cap?", ["red"] * 10),
        q(34609, "00685bc495504d61", "What color is the cap?", ["blue"] * 10),
    ]
    path = tmp_path / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps({"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1",
                                "data": data}, indent=indent))
    return path


OCR = "\nReference OCR token: "


def test_textvqa_matches_answers_as_eve_does(tmp_path):
    def a(qid, prompt, text):
        return json.dumps({"question_id": qid, "prompt": prompt, "text": text, "answer_id": "x", "model_id": "m",
                           "metadata": {}})

    lines = [
        # 1: 34602. "dakota" is 3 of the 10 answers: m4c 0.9
        a("003a8ae2ef43b901", "what is the brand of this camera?" + OCR + "DAKOTA, digital" + SHORT, "Dakota"),
        # 2: 34603 (both sides lower-cased); "copenhagen" (period stripped) is 2 of 10: 0.6
        a("003a8ae2ef43b901", "WHAT DOES THE SMALL WHITE TEXT SAY?" + OCR + "COPENHAGEN, 1838" + SHORT, "Copenhagen."),
        # 3: 34604, BLIP-style prompt: 10 of 10: 1.0
        a("0054c91397f2fe05", "OCR tokens: 22, NIKE. Question: What number is on the player's jersey? Short answer: ",
          "22"),
        # 4: 34605, OCR line first: 1 of 10: 0.3
        a("005635e119b9f32f", "Reference OCR token: simon, clancy\nwho is this copyrighted by?" + SHORT, "Simon Clancy"),
        # 5-7: prompts the script stops on (so 34606 stays unanswered: 0)
        a("005635e119b9f32f", "what year?", "1999"),
        a("005635e119b9f32f", "Reference OCR token:1999\nwhat year?" + SHORT, "1999"),
        a("005635e119b9f32f", "OCR tokens: 1999. Question: what year?\nShort answer:", "1999"),
        # 8: 34607: 1.0; 9: the same key again: a duplicate, not scored
        a("00685bc495504d61", "Is this a bottle?" + SHORT, "Yes"),
        a("00685bc495504d61", "is this a bottle?" + SHORT, "no"),
        # 10, 11: 34608 and 34609, both against the last one's answers (blue): 1.0 and 0
        a("00685bc495504d61", "what color is the cap?" + SHORT, "Blue"),
        a("00685bc495504d61", "What color is the cap?" + SHORT, "red"),
        # 12-15: no annotation: TextVQA's question_id instead of the image id; an unknown image; a
        # 2-line prompt whose first line is the OCR line; a space the annotation does not have
        a(34602, "what is the brand of this camera?" + SHORT, "dakota"),
        a("ffffffffffffffff", "what is this?" + SHORT, "x"),
        a("003a8ae2ef43b901", "Reference OCR token: DAKOTA, digital" + SHORT, "dakota"),
        a("00685bc495504d61", "is this a bottle? " + SHORT, "yes"),
        '{"question_id": "0054c91397f2fe05", "text": ',  # 16: not JSON
        json.dumps({"question_id": "0054c91397f2fe05", "text": "22"}),  # 17: no prompt
    ]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(lines) + "\n")
    code, out, err = run("score", "--kind", "vqa", "--answers-file", answers, "--annotations", textvqa_val(tmp_path))
    assert code == 0, err
    result = json.loads(out)
    # (0.9 + 0.6 + 1.0 + 0.3 + 0 + 1.0 + 1.0 + 0) / 8 = 4.8 / 8
    assert result["accuracy"] == pytest.approx(0.6)
    assert (result["questions"], result["answered"], result["missing"], result["duplicates"], result["not_annotated"],
            result["unkeyed_answers"], result["unreadable_lines"]) == (8, 7, 1, 1, 4, 4, 1)
    for number in (5, 6, 7):
        assert f"{answers}:{number}: eval_textvqa.py's prompt_processor does not read this prompt" in err
    assert f"{answers}:16: not JSON" in err and f"{answers}:17: no prompt" in err
    assert "1 of 8 annotated questions have no answer and score as wrong, e.g. question_id 34606" in err
    assert "1 duplicate answers (the first of each is scored), e.g. question_id 00685bc495504d61" in err
    assert "4 answers match no annotation" in err and f"e.g. {answers}:12, {answers}:13, {answers}:14, {answers}:15" in err
    assert "1 annotations share (image id, question)" in err


def test_textvqa_question_file_by_image_id_end_to_end(tmp_path, monkeypatch):
    """LLaVA's question file (question_id = image id), answered by `answer`, scored against the
    annotation file (pretty-printed here: a JSON object over several lines loads too)."""
    import tools.generate

    replies = {"camera": "Dakota", "jersey": "22", "copyrighted": "simon clancy"}

    class Backend:
        def answer(self, requests, sampling):
            return [next(text for word, text in replies.items() if word in r.prompt) for r in requests]

    monkeypatch.setattr(tools.generate, "setup", lambda args: (Backend(), True))
    questions = tmp_path / "llava_textvqa_val_v051_ocr.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in [
        {"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg",
         "text": "what is the brand of this camera?" + OCR + "dakota, digital" + SHORT},
        # no instruction in the file: `answer` adds it, the prompt has 2 lines
        {"question_id": "0054c91397f2fe05", "image": "0054c91397f2fe05.jpg",
         "text": "what number is on the player's jersey?"},
        {"question_id": "005635e119b9f32f", "image": "005635e119b9f32f.jpg",
         "text": "who is this copyrighted by?" + OCR + "simon, clancy" + SHORT}]) + "\n")
    answers = tmp_path / "answers" / "textvqa.jsonl"
    code, _, err = run("answer", "--hf", "unused", "--model-id", "eve", "--question-file", questions,
                       "--image-folder", tmp_path, "--answers-file", answers)
    assert code == 0, err
    assert json.loads(answers.read_text().splitlines()[1])["prompt"] == "what number is on the player's jersey?" + SHORT
    code, out, err = run("score", "--kind", "vqa", "--answers-file", answers, "--annotations",
                         textvqa_val(tmp_path, indent=2))
    assert code == 0, err
    result = json.loads(out)
    # 0.9 + 1.0 + 0.3 over the 8 annotated questions, 5 of them unanswered
    assert result["accuracy"] == pytest.approx(2.2 / 8)
    assert (result["answered"], result["missing"], result["not_annotated"], result["unkeyed_answers"]) == (3, 5, 0, 0)


def test_bad_textvqa_files_get_one_line(tmp_path):
    answers = answers_file(tmp_path, [{"question_id": "a", "prompt": "q?" + SHORT, "text": "x"}])
    good = textvqa_val(tmp_path)
    entry = {"question": "q?", "image_id": "a", "question_id": 1, "answers": ["x"] * 10}
    cases = {
        "not_list.json": ({"dataset_name": "textvqa", "data": {"0": entry}}, '"data" is not a list'),
        "test.json": ({"dataset_name": "textvqa", "data": [{k: v for k, v in entry.items() if k != "answers"}]},
                      'data[0] has no "answers" list'),
        "nine.json": ({"dataset_name": "textvqa", "data": [dict(entry, answers=["x"] * 9)]},
                      "data[0] has 9 answers, not the 10"),
        "no_image.json": ({"dataset_name": "textvqa", "data": [entry, dict(entry, image_id=None)]},
                          'data[1] has no "image_id"'),
        "empty.json": ({"dataset_name": "textvqa", "data": []}, '"data" list is empty'),
        "not_object.json": ({"dataset_name": "textvqa", "data": [entry, "q?"]}, "data[1] is not an object"),
        "no_question.json": ({"dataset_name": "textvqa", "data": [dict(entry, question=7)]},
                             'data[0] has no "question"'),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(json.dumps(content))
        code, out, err = run("score", "--kind", "vqa", "--answers-file", answers, "--annotations", tmp_path / name)
        assert code == 1 and out == "" and err.startswith(f"error: {tmp_path / name}: ") and message in err, err
        assert err.count("\n") == 1, err
    for argv, message in [(("--kind", "pope", "--annotations", good), "score it with --kind vqa"),
                          (("--kind", "vqa", "--annotations", good, good), "scored on its own")]:
        code, out, err = run("score", "--answers-file", answers, *argv)
        assert code == 1 and out == "" and err.startswith(f"error: {good}: TextVQA's annotation file"), err
        assert message in err and err.count("\n") == 1, err


def test_jsonl_annotations_are_not_taken_for_textvqa_s_file(tmp_path):
    """Only a JSON object with "data" is TextVQA's file; a jsonl file whose first line does not parse
    (whether or not it starts with "{") is read as jsonl: that line reported, the rest scored."""
    answers = answers_file(tmp_path, [{"question_id": 2, "prompt": "q?" + SHORT, "text": "Blue"}])
    for first in ('{"question_id": 1, "answers": ["red"]', "not json"):
        (tmp_path / "gt.jsonl").write_text(first + "\n" + json.dumps({"question_id": 2, "answers": ["blue"]}) + "\n")
        code, out, err = run("score", "--kind", "vqa", "--answers-file", answers, "--annotations",
                             tmp_path / "gt.jsonl")
        assert code == 0, err
        result = json.loads(out)
        assert (result["accuracy"], result["questions"], result["unreadable_lines"]) == (1.0, 1, 1)
        assert f"{tmp_path / 'gt.jsonl'}:1: not JSON" in err


def test_textvqa_answer_whose_question_id_is_no_key(tmp_path):
    rows = [{"question_id": True, "prompt": "what year?" + SHORT, "text": "1999"},
            {"question_id": [1], "prompt": "what year?" + SHORT, "text": "1999"},
            {"question_id": "005635e119b9f32f", "prompt": "what year?" + SHORT, "text": "1999"}]
    code, out, err = run("score", "--kind", "vqa", "--answers-file", answers_file(tmp_path, rows), "--annotations",
                         textvqa_val(tmp_path))
    assert code == 0, err
    result = json.loads(out)
    # Lines 1 and 2 cannot be keyed (eval_textvqa.py needs a string or number); line 3 finds 34606: 1.0 of 8.
    assert (result["accuracy"], result["answered"], result["unkeyed_answers"]) == (1 / 8, 1, 2)
    assert "answers.jsonl:1: question_id true is not a string or a number" in err
