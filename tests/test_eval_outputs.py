"""What `eval_vqa.py` refuses before doing any work: an output that would replace one of its inputs,
or a file it did not write (without --overwrite), exits 2 with one line; a question file that
yields no question, and flags out of range, are refused before the model is loaded. The CLI runs
in-process (tests/eval_cli.py); `answer` gets a stand-in backend, never a model."""

import json
import os

import pytest

from megatron_eve.eval.xlsx import read_xlsx
from tests.eval_cli import answers_file, run
from tests.test_scoring_mmbench import JPG, PNG, mmbench_tsv

ANSWERS = [{"question_id": 1, "prompt": "Q?", "text": "yes", "answer_id": "a1", "model_id": "m", "metadata": {}},
           {"question_id": 2, "prompt": "Q?", "text": "no", "answer_id": "a2", "model_id": "m", "metadata": {}}]


@pytest.fixture
def backend(monkeypatch):
    """tools.generate.setup replaced: a backend that answers "yes", and a record of whether the
    model would have been loaded."""
    import tools.generate

    class Backend:
        loaded = False

        def answer(self, requests, sampling):
            return ["yes"] * len(requests)

    def setup(args):
        Backend.loaded = True
        return Backend(), True

    monkeypatch.setattr(tools.generate, "setup", setup)
    return Backend


def questions_file(tmp_path, count=2, name="q.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"question_id": i, "text": f"Question {i}?"}) + "\n"
                            for i in range(1, count + 1)))
    return path


def refused(result, *words):
    code, out, err = result
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, (code, err)
    assert all(word in err for word in words), err


def test_an_output_never_replaces_an_input(tmp_path, backend):
    answers = answers_file(tmp_path, ANSWERS, "a.jsonl")
    before = answers.read_text()
    refused(run("submit", "--benchmark", "mmvet", "--answers-file", answers, "--output-file", answers, "--overwrite"),
            "would replace the --answers-file input")
    gqa = tmp_path / "testdev_balanced_questions.json"
    gqa.write_text(json.dumps({"1": {"question": "Q?", "answer": "yes", "imageId": "i1"}}))
    refused(run("score", "--kind", "gqa", "--answers-file", answers, "--annotations", gqa, "--converted-output",
                answers), "--converted-output")
    refused(run("score", "--kind", "gqa", "--answers-file", answers, "--annotations", gqa, "--converted-output",
                gqa, "--overwrite"), "would replace the --annotations input")
    os.symlink(answers, tmp_path / "link.json")  # the same file under another name
    refused(run("submit", "--benchmark", "gqa", "--answers-file", answers, "--output-file", tmp_path / "link.json"),
            "would replace")
    assert answers.read_text() == before and json.loads(gqa.read_text())["1"]["answer"] == "yes"

    questions = questions_file(tmp_path)
    question_text = questions.read_text()
    refused(run("answer", "--hf", "unused", "--question-file", questions, "--answers-file", questions),
            "would replace the --question-file input")
    partial = questions_file(tmp_path, name="b.jsonl.partial")  # what answering into b.jsonl appends to
    refused(run("answer", "--hf", "unused", "--question-file", partial, "--answers-file", tmp_path / "b.jsonl"),
            "side file")
    assert questions.read_text() == question_text and not backend.loaded


def test_a_file_we_did_not_write_is_replaced_only_with_overwrite(tmp_path, backend):
    questions = questions_file(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    args = ("answer", "--hf", "unused", "--question-file", questions, "--answers-file", notes)
    refused(run(*args), "is not an answer file", "--overwrite")
    assert notes.read_text() == "my notes\n" and not backend.loaded
    code, _, err = run(*args, "--overwrite")
    assert code == 0 and [json.loads(line)["text"] for line in notes.read_text().splitlines()] == ["yes", "yes"], err
    code, _, err = run(*args)  # now our own answer file: replaced without asking
    assert code == 0, err

    # Each writer knows its own outputs: an earlier upload is replaced, anything else is refused.
    answers = answers_file(tmp_path, ANSWERS, "a.jsonl")
    upload = tmp_path / "mmvet.json"
    upload.write_text("keep")
    refused(run("submit", "--benchmark", "mmvet", "--answers-file", answers, "--output-file", upload),
            "is not an MM-Vet results file")
    upload.unlink()
    for _ in range(2):
        code, _, err = run("submit", "--benchmark", "mmvet", "--answers-file", answers, "--output-file", upload)
        assert code == 0 and json.loads(upload.read_text()) == {"v1_1": "yes", "v1_2": "no"}, err
    refused(run("questions", "--benchmark", "mmbench", "--source", mmbench_tsv(tmp_path), "--image-folder",
                tmp_path / "images", "--question-file", answers), "is not a question file")
    assert not (tmp_path / "images").exists()


def test_mmbench_images_never_replace_other_files(tmp_path):
    tsv = mmbench_tsv(tmp_path)  # images 0.png, 1.jpg, 2.png
    images = tmp_path / "myimgs"
    images.mkdir()
    (images / "1.jpg").write_bytes(b"my own photo")
    (images / "0.png").write_bytes(PNG)  # the same bytes: kept as it is
    args = ("questions", "--benchmark", "mmbench", "--source", tsv, "--question-file", tmp_path / "q.jsonl",
            "--image-folder", images)
    refused(run(*args), "1 other files", "1.jpg", "--overwrite")
    assert sorted(os.listdir(images)) == ["0.png", "1.jpg"] and (images / "1.jpg").read_bytes() == b"my own photo"
    assert not (tmp_path / "q.jsonl").exists()
    code, _, err = run(*args, "--overwrite")
    assert code == 0 and (images / "1.jpg").read_bytes() == JPG and (images / "2.png").read_bytes() == PNG, err
    code, _, err = run(*args)  # every image already there with its own bytes
    assert code == 0, err


def test_question_files_that_hold_no_question_are_refused_before_the_model(tmp_path, backend):
    answers = answers_file(tmp_path, ANSWERS, "a.jsonl")
    before = answers.read_text()
    sqa = tmp_path / "llava_test_CQM-A.json"  # LLaVA's ScienceQA questions: one JSON list
    sqa.write_text(json.dumps([{"id": "4", "image": "4/image.png", "conversations": [
        {"from": "human", "value": "<image>\nWhich of these states is farthest north?"}]}] * 3, indent=2))
    (tmp_path / "empty.jsonl").write_text("\n \n")
    (tmp_path / "lines.jsonl").write_text('{"id": 1}\n[1, 2]\n')
    for name, why in [("llava_test_CQM-A.json", "a JSON list of 3 items, not JSON Lines"), ("empty.jsonl", "empty"),
                      ("lines.jsonl", "no line is a question")]:
        code, out, err = run("answer", "--hf", "unused", "--question-file", tmp_path / name, "--answers-file", answers)
        assert code == 1 and out == "" and err.startswith(f"error: {tmp_path / name}: {why}"), err
        assert err.count("\n") == 1, err
    assert answers.read_text() == before and not backend.loaded


@pytest.mark.parametrize("flags, message", [
    (["--num-chunks", "0"], "argument --num-chunks: must be 1 or more, not 0"),
    (["--num-chunks", "2", "--chunk-idx", "2"], "--chunk-idx 2 is not below --num-chunks 2"),
    (["--chunk-idx", "-1"], "argument --chunk-idx: must be 0 or more, not -1"),
    (["--batch-size", "0"], "argument --batch-size: must be 1 or more, not 0"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be 1 or more, not -1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be 1 or more, not 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1], not 0.0"),
    (["--temperature", "inf"], "--temperature must be a finite number, not inf"),  # generate.py's check, shared
])
def test_answer_flags_out_of_range_are_one_line(tmp_path, backend, flags, message):
    questions = questions_file(tmp_path)
    refused(run("answer", "--hf", "unused", "--question-file", questions, "--answers-file", tmp_path / "a.jsonl",
                *flags), f"error: {message}")
    assert not backend.loaded


def test_a_missing_question_file_is_one_line(tmp_path, backend):
    code, out, err = run("answer", "--hf", "unused", "--question-file", tmp_path / "nowhere.jsonl", "--answers-file",
                         tmp_path / "a.jsonl")
    assert (code, out, err) == (1, "", f"error: {tmp_path / 'nowhere.jsonl'}: No such file or directory\n")
    assert not backend.loaded


@pytest.mark.parametrize("make, why", [(lambda path: None, "no such folder"),
                                       (lambda path: path.write_text(""), "a file, not a folder")])
def test_an_image_folder_that_is_not_one_is_one_line(tmp_path, backend, make, why):
    """Else every question with an image failed alone, and the run ended "0 answered" with exit code 0."""
    folder = tmp_path / "images"
    make(folder)
    code, out, err = run("answer", "--hf", "unused", "--question-file", questions_file(tmp_path), "--answers-file",
                         tmp_path / "a.jsonl", "--image-folder", folder)
    assert (code, out, err) == (1, "", f"error: --image-folder {folder}: {why}\n")
    assert not backend.loaded and not (tmp_path / "a.jsonl").exists()


def test_a_run_that_answers_nothing_fails_but_keeps_its_answer_file(tmp_path, backend):
    from megatron_eve.inference.generate import PromptError

    backend.answer = lambda self, requests, sampling: [PromptError("image x.png does not exist")] * len(requests)
    answers = tmp_path / "a.jsonl"
    code, out, err = run("answer", "--hf", "unused", "--question-file", questions_file(tmp_path, 3),
                         "--answers-file", answers)
    assert code == 1 and "0 answered, 3 could not be answered" in out, (code, out, err)
    assert err.endswith(f"\nerror: none of the 3 questions could be answered (see metadata.error in {answers})\n")
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["metadata"]["error"] for r in rows] == ["image x.png does not exist"] * 3
    backend.answer = lambda self, requests, sampling: [PromptError("too long")] + ["yes"] * (len(requests) - 1)
    code, out, err = run("answer", "--hf", "unused", "--question-file", questions_file(tmp_path, 3),
                         "--answers-file", answers)  # one answered: the run did its work
    assert code == 0 and "2 answered, 1 could not be answered" in out, (code, out, err)


def test_an_hf_path_that_is_not_an_export_folder_is_one_line(tmp_path):
    """The real setup (no stand-in): transformers took the missing folder for a Hub repo id."""
    code, out, err = run("answer", "--hf", tmp_path / "missing", "--question-file", questions_file(tmp_path),
                         "--answers-file", tmp_path / "a.jsonl")
    assert (code, out) == (1, "")
    missing = tmp_path / "missing"
    assert err == f"error: --hf {missing}: no such folder; pass an HF export folder (holding config.json)\n"
    assert not (tmp_path / "a.jsonl").exists()


def test_mmbench_upload_with_control_characters_and_numeric_predictions(tmp_path):
    tsv = mmbench_tsv(tmp_path)
    answers = answers_file(tmp_path, [{"question_id": 0, "text": "A\u0015"}, {"question_id": 1, "text": "007"},
                                      {"question_id": 2, "text": "1"}])
    out_file = tmp_path / "upload.xlsx"
    code, _, err = run("submit", "--benchmark", "mmbench", "--answers-file", answers, "--question-file", tsv,
                       "--output-file", out_file)
    assert code == 0, err
    assert "question 0: control characters taken out of its prediction" in err
    table = read_xlsx(out_file)
    prediction = table[0].index("prediction")
    # pandas holds the predictions as text: "007" is not the number 7
    assert [row[prediction] for row in table[1:]] == ["A", "007", "1"]
    assert [row[0] for row in table[1:]] == [0, 1, 2]  # the index column is still read as numbers


def test_mme_questions_without_an_image_are_named(tmp_path):
    root = tmp_path / "MME"
    (root / "count").mkdir(parents=True)
    yn = " Please answer yes or no."
    (root / "count" / "0001.txt").write_text(f"Two dogs?{yn}\tNo\nOne?{yn}\tNo\n")  # no image beside it
    (root / "count" / "0002.txt").write_text(f"Three?{yn}\tYes\n")
    (root / "count" / "0002.jpg").write_bytes(JPG)
    code, out, err = run("questions", "--benchmark", "mme", "--source", root, "--question-file", tmp_path / "q.jsonl")
    assert code == 0 and out.startswith("1 questions"), err
    assert "2 of 3 MME questions are left out" in err and "count/0001.txt" in err


def test_a_full_disk_while_answering_names_the_file_and_a_file_as_parent_folder_is_refused(tmp_path, backend,
                                                                                           monkeypatch):
    """A write error at the side file's flush carries no file name ("error: : No space left on device"
    before); an --answers-file whose folder is a file said "File exists"."""
    import errno

    import megatron_eve.eval.resume as resume

    syncs = []

    def fsync(fd):  # the header's sync succeeds, the first batch's finds the disk full
        syncs.append(fd)
        if len(syncs) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(resume.os, "fsync", fsync)
    answers = tmp_path / "a.jsonl"
    code, out, err = run("answer", "--hf", "unused", "--question-file", questions_file(tmp_path), "--answers-file",
                         answers)
    assert code == 1 and err.splitlines()[-1] == f"error: {answers}.partial: No space left on device", err
    assert "Traceback" not in err and not answers.exists()

    (tmp_path / "afile").write_text("mine")
    refused(run("answer", "--hf", "unused", "--question-file", questions_file(tmp_path), "--answers-file",
                tmp_path / "afile" / "a.jsonl"), f"{tmp_path / 'afile'} is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "mine"
