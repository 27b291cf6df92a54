"""SEED-Bench, GQA and MME scoring, the question builders and the submission files of
tools/eval_vqa.py, against the rules of LLaVA-1.5's / EVE's own scripts (convert_seed_for_submission.py,
convert_gqa_for_eval.py + GQA's eval.py, convert_answer_to_mme.py + MME's calculation.py,
convert_vqav2/vizwiz/mmbench_for_submission.py, convert_mmvet_for_eval.py, eval_textvqa.py). The benchmark files
are small fixtures in the benchmarks' real formats; every expected value was worked out by hand
from those scripts' rules (the reasoning is in the comments), never produced by the code under test.
Runs the CLI in-process, so the whole file takes well under a second."""

import base64
import io
import json
from contextlib import redirect_stderr, redirect_stdout

import pytest

from megatron_eve.eval.scorers import (gqa_prediction, mme_label, mme_question_candidates, seed_correct,
                                      textvqa_question)
from megatron_eve.eval.xlsx import read_xlsx
from tools.eval_vqa import main, with_suffix


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def answers_file(tmp_path, rows, name="answers.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# ----------------------------------------------------------------------------------- SEED-Bench

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
    assert rows[0] == {"question_id": "101", "image": "SEED-Bench-image/101.jpg", "category": "Scene Understanding",
                       "text": "Question 101?\nA. one\nB. two\nC. three\nD. four\n"
                               "Answer with the option's letter from the given choices directly."}


# ------------------------------------------------------------------------------------------- GQA

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


# ------------------------------------------------------------------------------------------- MME

# (answer text, calculation.py's reading, the lenient reading)
MME_ITEMS = [
    ("Yes", "yes", "yes"),
    ("No, there is not.", "no", "no"),  # first 4 characters "no, "
    ("eyes open", "yes", "other"),  # "eyes" holds "yes"
    ("   no", "other", "no"),  # "   n": no "no" in the first 4 characters
    ("The answer is yes", "other", "yes"),  # nothing is searched past the 4th character
    ("snow", "no", "other"),
    ("nope", "no", "other"),
    ("(no)", "no", "no"),
    ("YES", "yes", "yes"),
    ("no yes", "no", "no"),  # "no y": "yes" is not there, "no" is
    ("nyes", "yes", "other"),  # "yes" wins over "no" when both are in the first 4
    ("", "other", "other"),
]


@pytest.mark.parametrize("text,eve,lenient", MME_ITEMS)
def test_mme_label_rule(text, eve, lenient):
    assert mme_label(text) == eve and mme_label(text, lenient=True) == lenient


def test_mme_question_lookup_follows_the_converter():
    # The short-answer suffix is removed and the rest stripped; "Please answer yes or no." is added
    # with one space, and with two when that is not found.
    assert mme_question_candidates("Is it red?\nAnswer the question using a single word or phrase.") == [
        "Is it red? Please answer yes or no.", "Is it red?  Please answer yes or no."]
    # Already there: used as it is (not stripped when there is no suffix to remove).
    assert mme_question_candidates("Is it red? Please answer yes or no. ") == ["Is it red? Please answer yes or no. "]


def mme_release(tmp_path):
    """MME_Benchmark_release_version's two layouts: questions beside the images (existence,
    code_reasoning) or images/ + questions_answers_YN/ (artwork), "question<TAB>Yes|No" lines; some
    of MME's questions have two spaces before "Please answer yes or no."."""
    root = tmp_path / "MME_Benchmark_release_version"
    yn = " Please answer yes or no."
    files = {
        "existence/000000006040": [("Is there a train in this image?" + yn, "Yes"),
                                   ("Is there a bed in this image?" + yn, "No")],
        "existence/000000006041": [("Is there a dog in this image?" + yn, "Yes"),
                                   ("Is there a cat in this image?" + yn, "No")],
        "existence/000000006042": [("Is there a car in this image?" + yn, "Yes"),
                                   ("Is there a boat in this image?" + yn, "No")],
        "artwork/10002": [("Is this artwork created by Gentile da Fabriano? " + yn, "Yes"),
                          ("Is this artwork created by Jan van Eyck? " + yn, "No")],
        "artwork/10003": [("Is this artwork displayed in musée du louvre?" + yn, "Yes"),
                          ("Is this artwork displayed in national gallery?" + yn, "No")],
        "code_reasoning/0001": [("Is the output of the code 3?" + yn, "Yes"),
                                ("Is the output of the code 4?" + yn, "No")],
    }
    for stem, lines in files.items():
        category, name = stem.split("/")
        if category == "artwork":
            (root / category / "images").mkdir(parents=True, exist_ok=True)
            (root / category / "questions_answers_YN").mkdir(exist_ok=True)
            (root / category / "images" / f"{name}.jpg").write_bytes(b"jpg")
            txt = root / category / "questions_answers_YN" / f"{name}.txt"
        else:
            (root / category).mkdir(parents=True, exist_ok=True)
            (root / category / f"{name}{'.png' if category == 'code_reasoning' else '.jpg'}").write_bytes(b"img")
            txt = root / category / f"{name}.txt"
        txt.write_text("".join(f"{q}\t{a}\n" for q, a in lines))
    return root


SHORT = "\nAnswer the question using a single word or phrase."


def test_mme_acc_and_acc_plus_per_subtask(tmp_path):
    def a(qid, question, text):
        return {"question_id": qid, "prompt": question, "text": text}

    answers = [
        a("existence/000000006040.jpg", "Is there a train in this image?" + SHORT, "Yes"),  # yes = Yes
        a("existence/000000006040.jpg", "Is there a bed in this image?" + SHORT, "No, there is not."),  # no = No
        a("existence/000000006041.jpg", "Is there a dog in this image?" + SHORT, "eyes open"),  # yes = Yes
        a("existence/000000006041.jpg", "Is there a cat in this image?" + SHORT, "   no"),  # other ≠ No
        a("existence/000000006042.jpg", "Is there a car in this image?" + SHORT, "The answer is yes"),  # other
        a("existence/000000006042.jpg", "Is there a boat in this image?" + SHORT, "snow"),  # no = No
        # found with two spaces before "Please answer yes or no."
        a("artwork/10002.jpg", "Is this artwork created by Gentile da Fabriano?" + SHORT, "Yes"),
        a("artwork/10002.jpg", "Is this artwork created by Jan van Eyck?" + SHORT, "nope"),  # no = No
        # the prompt carries "Please answer yes or no." already (no suffix): looked up as it is
        a("artwork/10003.jpg", "Is this artwork displayed in musée du louvre? Please answer yes or no.", "YES"),
        # artwork/10003's second question unanswered: wrong
        a("code_reasoning/0001.png", "Is the output of the code 3?" + SHORT, "Yes, the output is 3."),
        a("code_reasoning/0001.png", "Is the output of the code 4?" + SHORT, "(no)"),
        a("code_reasoning/0001.png", "Is the output of the code 3?" + SHORT, "No"),  # duplicate: not scored
        a("code_reasoning/0001.png", "Is the sky green?" + SHORT, "No"),  # not an MME question
    ]
    converted = tmp_path / "eval_tool_answers"
    code, out, err = run("score", "--kind", "mme", "--answers-file", answers_file(tmp_path, answers),
                         "--annotations", mme_release(tmp_path), "--converted-output", converted)
    assert code == 0, err
    result = json.loads(out)
    subtasks = result["subtasks"]
    # existence: 4 of 6 right (6040 both, 6041 first, 6042 second); only image 6040 wholly right:
    # (4/6 + 1/3) * 100 = 100. Two "other" answers.
    assert subtasks["existence"]["acc"] == pytest.approx(4 / 6)
    assert subtasks["existence"]["acc_plus"] == pytest.approx(1 / 3)
    assert subtasks["existence"]["score"] == pytest.approx(100.0) and subtasks["existence"]["other"] == 2
    # artwork: 3 of 4 right, image 10002 wholly right of 2: (0.75 + 0.5) * 100 = 125.
    assert (subtasks["artwork"]["acc"], subtasks["artwork"]["acc_plus"]) == (0.75, 0.5)
    # code_reasoning: both right: 200. Perception = 100 + 125, cognition = 200.
    assert subtasks["code_reasoning"]["score"] == pytest.approx(200.0)
    assert result["perception"] == pytest.approx(225.0) and result["cognition"] == pytest.approx(200.0)
    assert "count" in result["subtasks_absent"] and len(result["subtasks_absent"]) == 11
    assert (result["questions"], result["answered"], result["missing"], result["duplicates"],
            result["not_annotated"]) == (12, 11, 1, 1, 1)
    # convert_answer_to_mme.py's file for calculation.py: file, question as in MME, gold, answer.
    assert (converted / "artwork.txt").read_text().splitlines()[0] == (
        "10002.txt\tIs this artwork created by Gentile da Fabriano?  Please answer yes or no.\tYes\tYes")


def test_mme_converted_output_never_writes_into_a_foreign_folder(tmp_path):
    answers = [{"question_id": "existence/000000006040.jpg", "prompt": "Is there a train in this image?" + SHORT,
                "text": "Yes"}]
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    args = ["score", "--kind", "mme", "--answers-file", answers_file(tmp_path, answers),
            "--annotations", mme_release(tmp_path), "--converted-output", folder]
    code, _, err = run(*args)
    assert code == 1 and "holds files that are not MME answer files" in err and "--overwrite" in err
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    code, _, err = run(*args, "--overwrite")
    assert code == 0, err
    assert (folder / "notes.txt").read_text() == "keep me" and (folder / "existence.txt").is_file()
    (folder / "notes.txt").unlink()
    code, _, err = run(*args)  # an earlier conversion is ours to replace
    assert code == 0, err


def test_mme_questions_round_trip(tmp_path):
    root = mme_release(tmp_path)
    code, _, err = run("questions", "--benchmark", "mme", "--source", root, "--question-file", tmp_path / "q.jsonl")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert rows[0] == {"question_id": "artwork/10002.jpg", "image": "artwork/images/10002.jpg",
                       "category": "artwork",
                       "text": "Is this artwork created by Gentile da Fabriano?" + SHORT}
    # Answered as `answer` writes it (prompt = the question, its instruction already there), every
    # one is found again; all "Yes": each subtask has acc 1/2 and acc+ 0.
    answers = [{"question_id": r["question_id"], "prompt": with_suffix(r["text"], "x"), "text": "Yes"} for r in rows]
    code, out, err = run("score", "--kind", "mme", "--answers-file", answers_file(tmp_path, answers),
                         "--annotations", root)
    result = json.loads(out)
    assert result["missing"] == 0 and result["not_annotated"] == 0, err
    assert result["perception"] == pytest.approx(100.0) and result["cognition"] == pytest.approx(50.0)


# --------------------------------------------------------------------------------------- TextVQA

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


# ---------------------------------------------------------------------------------- submissions

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


PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 8
JPG = b"\xff\xd8\xff\xe0" + b"\x00" * 8


def mmbench_tsv(tmp_path):
    """mmbench_dev_20230712.tsv's columns; pandas reads "None", "NA" and empty cells as NaN."""
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
              "l2-category", "comment", "split"]
    png, jpg = base64.b64encode(PNG).decode(), base64.b64encode(JPG).decode()
    rows = [
        ["0", "What is the color of the car?", "", "red", "blue", "", "", "A", "color", png, "src", "l2", "", "dev"],
        # B is "None": NaN to pandas, so the options end after A (C and D are never shown)
        ["1", "Which animal is largest?", "The picture shows a zoo.", "cat", "None", "dog", "elephant", "A", "zoo",
         jpg, "src", "l2", "", "dev"],
        ["2", "How many?", "nan", "1", "2", "3", "NA", "C", "count", png, "src", "l2", "", "dev"],
    ]
    path = tmp_path / "mmbench_dev_20230712.tsv"
    path.write_text("\n".join("\t".join(r) for r in [header] + rows) + "\n")
    return path


def test_mmbench_questions(tmp_path):
    tsv = mmbench_tsv(tmp_path)
    code, _, err = run("questions", "--benchmark", "mmbench", "--source", tsv, "--question-file", tmp_path / "q.jsonl",
                       "--image-folder", tmp_path / "images")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    suffix = "\nAnswer with the option's letter from the given choices directly."
    assert [r["text"] for r in rows] == [
        "What is the color of the car?\nA. red\nB. blue" + suffix,
        "The picture shows a zoo.\nWhich animal is largest?\nA. cat" + suffix,
        "How many?\nA. 1\nB. 2\nC. 3" + suffix]
    assert [r["question_id"] for r in rows] == [0, 1, 2] and [r["image"] for r in rows] == ["0.png", "1.jpg", "2.png"]
    assert (tmp_path / "images" / "1.jpg").read_bytes() == JPG
    code, _, _ = run("questions", "--benchmark", "mmbench", "--source", tsv, "--question-file", tmp_path / "cn.jsonl",
                     "--image-folder", tmp_path / "images", "--lang", "cn")
    assert json.loads((tmp_path / "cn.jsonl").read_text().splitlines()[2])["text"] == "How many?\nA. 1\nB. 2\nC. 3\n请直接回答选项字母。"


def test_mmbench_upload_table(tmp_path):
    tsv = mmbench_tsv(tmp_path)
    answers = answers_file(tmp_path, [{"question_id": 0, "text": "A"}, {"question_id": 1, "text": "The answer is A."},
                                      {"question_id": 0, "text": "B"}])
    code, _, err = run("submit", "--benchmark", "mmbench", "--answers-file", answers, "--question-file", tsv,
                       "--output-file", tmp_path / "upload" / "merge.xlsx")
    assert code == 0, err
    # hint, category, image, source, l2-category, comment dropped; "prediction" the 7th column; the
    # answer text untouched; NaN cells and the unanswered row empty; "index" numbers as pandas reads it.
    assert read_xlsx(tmp_path / "upload" / "merge.xlsx") == [
        ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"],
        [0, "What is the color of the car?", "red", "blue", None, None, "A", "A", "dev"],
        [1, "Which animal is largest?", "cat", None, "dog", "elephant", "The answer is A.", "A", "dev"],
        [2, "How many?", "1", "2", "3", None, None, "C", "dev"]]
    assert "1 duplicate answers" in err and "1 of 3 questions have no answer" in err
    code, _, _ = run("submit", "--benchmark", "mmbench", "--answers-file", answers, "--question-file", tsv,
                     "--output-file", tmp_path / "merge.tsv")
    assert (tmp_path / "merge.tsv").read_text().splitlines()[2] == (
        "1\tWhich animal is largest?\tcat\t\tdog\telephant\tThe answer is A.\tA\tdev")


# ------------------------------------------------------------------------------- prompts, errors

def test_prompt_suffix_is_added_once():
    option = "Answer with the option's letter from the given choices directly."
    short = "Answer the question using a single word or phrase."
    assert with_suffix("What is it?", short) == "What is it?\n" + short
    assert with_suffix("Which?\nA. x\n" + option, short) == "Which?\nA. x\n" + option  # LLaVA's files carry it
    assert with_suffix("Who?", "") == "Who?"


def test_bad_benchmark_files_get_one_line(tmp_path):
    answers = answers_file(tmp_path, [{"question_id": 1, "text": "A"}])
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{\"1\": ")
    for kind, annotations, message in [
            ("seed", tmp_path / "list.json", f"error: {tmp_path / 'list.json'}: not SEED-Bench's question file"),
            ("gqa", tmp_path / "broken.json", f"error: {tmp_path / 'broken.json'}: not JSON"),
            ("mme", tmp_path / "list.json", f"error: {tmp_path / 'list.json'}: not MME's release folder"),
            ("gqa", tmp_path / "absent.json", f"error: {tmp_path / 'absent.json'}: cannot be read")]:
        code, out, err = run("score", "--kind", kind, "--answers-file", answers, "--annotations", annotations)
        assert code == 1 and out == "" and err.startswith(message) and err.count("\n") == 1, err
    code, _, err = run("submit", "--benchmark", "vqav2", "--answers-file", answers, "--output-file", tmp_path / "x")
    assert code == 1 and "needs --question-file" in err
