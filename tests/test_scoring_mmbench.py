"""MMBench: `questions --benchmark mmbench` (model_vqa_mmbench.py's prompt, the TSV's base64 images
written out) and `submit --benchmark mmbench` (convert_mmbench_for_submission.py's table: .xlsx,
.tsv), on an mmbench_dev_20230712.tsv fixture. Every expected value was worked out by hand from
those scripts' rules (the reasoning is in the comments), never produced by the code under test; the
CLI runs in-process (tests/test_scoring.py's `run`)."""

import base64
import json

from megatron_eve.eval.xlsx import read_xlsx
from tests.eval_cli import answers_file, run


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


def test_bad_mmbench_tsvs_get_one_line(tmp_path):
    answers = answers_file(tmp_path, [{"question_id": 0, "text": "A"}])
    (tmp_path / "columns.tsv").write_text("index\tquestion\thint\n0\tWhat?\t\n")
    (tmp_path / "latin1.tsv").write_bytes("index\tquestion\tA\tB\n0\tCaf\xe9?\tx\ty\n".encode("latin-1"))
    for name, message in [("columns.tsv", "not an MMBench TSV (no column A, B)"), ("latin1.tsv", "not a TSV file"),
                          ("absent.tsv", "cannot be read")]:
        for argv in (("submit", "--benchmark", "mmbench", "--answers-file", answers, "--output-file",
                      tmp_path / "x.xlsx", "--question-file", tmp_path / name),
                     ("questions", "--benchmark", "mmbench", "--image-folder", tmp_path / "images", "--question-file",
                      tmp_path / "q.jsonl", "--source", tmp_path / name)):
            code, out, err = run(*argv)
            assert code == 1 and out == "" and err.startswith(f"error: {tmp_path / name}: {message}"), err
            assert err.count("\n") == 1, err
    assert not (tmp_path / "x.xlsx").exists() and not (tmp_path / "q.jsonl").exists()
