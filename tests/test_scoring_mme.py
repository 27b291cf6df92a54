"""MME: the answer and question-lookup rules, `score --kind mme` (acc + acc+ per subtask, the eval_tool
answer folder, never written into a foreign folder) and `questions --benchmark mme`, by LLaVA's
convert_answer_to_mme.py + MME's calculation.py, on a release-folder fixture in both of MME's
layouts. Every expected value was worked out by hand from those scripts' rules (the reasoning is in
the comments), never produced by the code under test; the CLI runs in-process
(tests/test_scoring.py's `run`)."""

import json

import pytest

from megatron_eve.eval.prompts import with_suffix
from megatron_eve.eval.scorers import mme_label, mme_question_candidates
from tests.eval_cli import SHORT, answers_file, run


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
    (folder / "draft.tmp").write_text("keep me too")  # a user's, whatever its name: the folder is replaced whole
    args = ["score", "--kind", "mme", "--answers-file", answers_file(tmp_path, answers),
            "--annotations", mme_release(tmp_path), "--converted-output", folder]
    code, _, err = run(*args)
    assert code == 2 and "holds files that are not MME answer files" in err and "--overwrite" in err
    assert sorted(p.name for p in folder.iterdir()) == ["draft.tmp"]
    (folder / "notes.txt").write_text("keep me")
    code, _, err = run(*args)
    assert code == 2 and sorted(p.name for p in folder.iterdir()) == ["draft.tmp", "notes.txt"]
    code, _, err = run(*args, "--overwrite")  # the user said so: the folder is replaced
    assert code == 0, err
    assert sorted(p.name for p in folder.iterdir()) == ["existence.txt"]
    code, _, err = run(*args)  # an earlier conversion is ours to replace
    assert code == 0, err


def test_mme_converted_output_keeps_no_subtask_of_an_earlier_run(tmp_path):
    """calculation.py scores every <subtask>.txt in the folder: one left from an earlier run (here
    artwork, not answered this time) would be scored with this run's answers."""
    root = mme_release(tmp_path)
    folder = tmp_path / "eval_tool_answers"
    first = [{"question_id": "artwork/10002.jpg",
              "prompt": "Is this artwork created by Gentile da Fabriano?" + SHORT, "text": "Yes"},
             {"question_id": "existence/000000006040.jpg", "prompt": "Is there a train in this image?" + SHORT,
              "text": "Yes"}]
    code, _, err = run("score", "--kind", "mme", "--answers-file", answers_file(tmp_path, first), "--annotations",
                       root, "--converted-output", folder)
    assert code == 0 and sorted(p.name for p in folder.iterdir()) == ["artwork.txt", "existence.txt"], err
    code, _, err = run("score", "--kind", "mme", "--answers-file", answers_file(tmp_path, first[1:], "second.jsonl"),
                       "--annotations", root, "--converted-output", folder)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("eval_tool")) == ["eval_tool_answers"]
    assert sorted(p.name for p in folder.iterdir()) == ["existence.txt"]


def test_mme_converted_output_never_replaces_an_input(tmp_path):
    root = mme_release(tmp_path)
    answers = answers_file(tmp_path, [{"question_id": "existence/000000006040.jpg",
                                       "prompt": "Is there a train in this image?" + SHORT, "text": "Yes"}])
    for folder in (root, tmp_path):  # the release folder; a folder holding the answers file
        code, out, err = run("score", "--kind", "mme", "--answers-file", answers, "--annotations", root,
                             "--converted-output", folder, "--overwrite")
        assert code == 2 and out == "" and "would replace the" in err and err.count("\n") == 1, err
    assert answers.is_file() and (root / "existence").is_dir()


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


def test_mme_release_folder_oddities(tmp_path):
    root = mme_release(tmp_path)
    (root / "readme.txt").write_text("not a subtask")  # a file beside the subtask folders: skipped
    with open(root / "existence" / "000000006040.txt", "a") as handle:
        handle.write("\n   \n")  # blank lines: skipped
    (root / "count").mkdir()
    (root / "count" / "0001.txt").write_text("Are there two dogs? Please answer yes or no.\tNo\n")  # no image beside it
    code, out, err = run("questions", "--benchmark", "mme", "--source", root, "--question-file", tmp_path / "q.jsonl")
    # The 12 questions with an image; count's has none to ask about and is left out.
    assert code == 0 and out.startswith("12 questions"), err
    rows = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and "count" not in {r["category"] for r in rows}
    # It is still scored: its one question answered right is acc 1 + acc+ 1; the other 12 are unanswered.
    answers = [{"question_id": "count/0001.png", "prompt": "Are there two dogs?" + SHORT, "text": "No"}]
    code, out, err = run("score", "--kind", "mme", "--answers-file", answers_file(tmp_path, answers),
                         "--annotations", root)
    result = json.loads(out)
    assert result["subtasks"]["count"]["score"] == pytest.approx(200.0), err
    assert (result["questions"], result["answered"], result["missing"]) == (13, 1, 12)


def test_bad_mme_folders_get_one_line(tmp_path):
    answers = answers_file(tmp_path, [{"question_id": "existence/a.jpg", "prompt": "Q?" + SHORT, "text": "Yes"}])
    bad_line = tmp_path / "bad_line"
    (bad_line / "existence").mkdir(parents=True)
    (bad_line / "existence" / "a.txt").write_text("Is it? Please answer yes or no.\tYes\n"
                                                  "Is it? Please answer.\tMaybe\n")
    no_yn = tmp_path / "no_yn"
    (no_yn / "artwork" / "images").mkdir(parents=True)
    empty = tmp_path / "empty"
    (empty / "existence").mkdir(parents=True)
    (empty / "existence" / "a.jpg").write_bytes(b"jpg")
    for root, message in [
            (bad_line, f"{bad_line / 'existence' / 'a.txt'}:2: not 'question<TAB>Yes|No'"),
            (no_yn, f"{no_yn / 'artwork' / 'questions_answers_YN'}: missing (MME keeps the questions of artwork "
                    f"there)"),
            (empty, f"{empty}: no MME questions found")]:
        code, out, err = run("score", "--kind", "mme", "--answers-file", answers, "--annotations", root)
        assert code == 1 and out == "" and err.startswith(f"error: {message}") and err.count("\n") == 1, err
