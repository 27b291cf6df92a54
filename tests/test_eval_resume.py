"""An interrupted `eval_vqa.py answer` keeps what it finished: each answer is appended to
ANSWERS.partial as it is done, and a rerun with the same question file and options answers only the
rest and writes the same answers file as an uninterrupted run. A side file of another run is not
resumed (nor silently thrown away). The CLI runs in-process with a stand-in backend."""

import json
import os

import pytest

from tests.eval_cli import run


@pytest.fixture
def backend(monkeypatch):
    """A backend whose answer is a function of the question, that records what it was asked and
    can be made to stop (as a killed run does) after some batches."""
    import tools.generate

    class Backend:
        asked = []
        stop_after = None  # batches

        def answer(self, requests, sampling):
            if Backend.stop_after is not None and len(Backend.asked) >= Backend.stop_after:
                raise KeyboardInterrupt("interrupted")
            Backend.asked.append([r.prompt.split("USER: ")[1].split("?")[0] for r in requests])
            return [f"answer {r.prompt.split('Question ')[1].split('?')[0]} ({sampling.max_new_tokens})"
                    for r in requests]

    monkeypatch.setattr(tools.generate, "setup", lambda args: (Backend(), True))
    return Backend


def without_ids(path):
    """An answers file's rows less their answer_id (a fresh uuid per answer)."""
    return [{k: v for k, v in json.loads(line).items() if k != "answer_id"} for line in path.read_text().splitlines()]


def answer(questions, answers, *flags):
    try:
        return run("answer", "--hf", "model", "--question-file", questions, "--answers-file", answers,
                   "--batch-size", "2", "--max-new-tokens", "4", *flags)
    except KeyboardInterrupt:  # escaping, it would stop pytest itself
        pytest.fail("Ctrl-C escaped eval_vqa.py answer (a traceback)")


@pytest.fixture
def questions(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"question_id": i, "text": f"Question {i}?"}) + "\n" for i in range(1, 6)))
    return path


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, backend, questions):
    code, _, err = answer(questions, tmp_path / "full.jsonl")
    assert code == 0 and len(backend.asked) == 3, err

    backend.asked.clear()
    backend.stop_after = 2  # interrupted (Ctrl-C) while asking its third batch: one line, not a traceback
    answers = tmp_path / "a.jsonl"
    partial = tmp_path / "a.jsonl.partial"
    code, _, err = answer(questions, answers)
    assert code == 130 and "Traceback" not in err, err  # the line after tqdm's bar
    assert err.splitlines()[-1] == f"interrupted: 4 of 5 answers kept in {partial}; run the same command to resume"
    assert not answers.exists() and len(partial.read_text().splitlines()) == 1 + 4  # its header, 4 answers
    with open(partial, "a") as handle:
        handle.write('{"position": 4, "row": {"question_id"')  # a line torn by the kill

    backend.asked.clear()
    backend.stop_after = None
    code, out, err = answer(questions, answers)
    assert code == 0 and "resuming: 4 of 5 answers kept" in out, err
    assert backend.asked == [["Question 5"]]  # only the rest
    assert without_ids(answers) == without_ids(tmp_path / "full.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "full.jsonl", "q.jsonl"]


def test_a_side_file_of_another_run_is_not_resumed(tmp_path, backend, questions):
    answers = tmp_path / "a.jsonl"
    backend.stop_after = 1
    assert answer(questions, answers)[0] == 130
    backend.stop_after = None
    partial = tmp_path / "a.jsonl.partial"
    kept = partial.read_text()

    code, out, err = answer(questions, answers, "--max-new-tokens", "5")  # other answers: not these
    assert code == 2 and out == "" and "another max_new_tokens" in err and err.count("\n") == 1, err
    questions.write_text(questions.read_text() + json.dumps({"question_id": 6, "text": "Question 6?"}) + "\n")
    code, _, err = answer(questions, answers)  # the question file changed
    assert code == 2 and "another question_file_sha256" in err, err
    assert partial.read_text() == kept and not answers.exists()

    backend.asked.clear()
    code, out, err = answer(questions, answers, "--overwrite")  # start over
    assert code == 0 and "resuming" not in out and sum(map(len, backend.asked)) == 6, err
    assert not partial.exists() and len(answers.read_text().splitlines()) == 6


def test_a_foreign_side_file_is_not_replaced(tmp_path, backend, questions):
    (tmp_path / "a.jsonl.partial").write_text("my notes\n")
    code, _, err = answer(questions, tmp_path / "a.jsonl")
    assert code == 2 and "is not a side file of ours" in err and "--overwrite" in err, err
    assert (tmp_path / "a.jsonl.partial").read_text() == "my notes\n" and not backend.asked


def test_an_interrupt_before_any_answer_or_on_another_rank_is_one_line_or_none(tmp_path, backend, questions,
                                                                               monkeypatch):
    """Ctrl-C before the first answer (the model loading) keeps nothing; under torchrun only the writer
    (rank 0) speaks, every rank exits 130."""
    import tools.generate

    backend.stop_after = 0
    code, _, err = answer(questions, tmp_path / "a.jsonl")
    assert code == 130 and err.splitlines()[-1] == "interrupted: no answer kept yet", err
    assert len((tmp_path / "a.jsonl.partial").read_text().splitlines()) == 1  # its header alone

    def loading(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(tools.generate, "setup", loading)
    monkeypatch.setenv("RANK", "1")
    assert answer(questions, tmp_path / "b.jsonl") == (130, "", "")
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl.partial", "q.jsonl"]


def test_a_torn_last_line_is_cut_before_appending(tmp_path):
    from megatron_eve.eval.resume import SideFile, read_side_file

    header = {"format": "megatron_eve partial answers v1", "question_file": "q", "question_file_sha256": "0",
              "options": {}}
    path = tmp_path / "a.jsonl.partial"
    path.write_text(json.dumps(header) + "\n" + json.dumps({"position": 0, "row": {"question_id": 1}}) + "\n"
                    + '{"position": 1, "ro')
    kept, good = read_side_file(str(path), header, 3, overwrite=False)
    assert kept == {0: {"question_id": 1}}
    side = SideFile(str(path))
    side.start(header, good)
    side.add([(1, {"question_id": 2})])
    side.close()
    assert read_side_file(str(path), header, 3, overwrite=False)[0] == {0: {"question_id": 1}, 1: {"question_id": 2}}


def test_a_second_run_into_the_same_answers_file_is_refused_before_the_model(tmp_path, monkeypatch, questions):
    """The writer locks the side file before setup (model loading): a run while another holds it is
    refused without loading anything, and leaves the other's side file as it was."""
    import tools.generate
    from megatron_eve.eval.resume import SideFile

    def setup(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(tools.generate, "setup", setup)
    holder = SideFile(str(tmp_path / "a.jsonl.partial"))
    try:
        code, _, err = answer(questions, tmp_path / "a.jsonl")
    finally:
        holder.close()
    assert code == 2 and "another run is answering into this answers file" in err, err
    assert not (tmp_path / "a.jsonl.partial").exists()  # the holder never started: nothing of it left


@pytest.mark.parametrize("flags, tokens", [
    ([], 128),  # --prompt-style short: LLaVA's model_vqa_loader.py (VQAv2, GQA, TextVQA, POPE, MME, SEED)
    (["--prompt-style", "vizwiz"], 128),
    (["--prompt-style", "option"], 1024),  # model_vqa_science.py, model_vqa_mmbench.py
    (["--prompt-style", "option-cn"], 1024),
    (["--prompt-style", "none"], 1024),  # model_vqa.py (MM-Vet, LLaVA-Bench)
    (["--prompt-style", "option", "--max-new-tokens", "7"], 7),  # the flag still decides
])
def test_max_new_tokens_follows_the_prompt_styles_benchmarks(tmp_path, backend, questions, flags, tokens):
    code, _, err = run("answer", "--hf", "model", "--question-file", questions, "--answers-file", tmp_path / "a.jsonl",
                       *flags)
    assert code == 0, err
    rows = without_ids(tmp_path / "a.jsonl")
    assert {row["text"].split("(")[1] for row in rows} == {f"{tokens})"}
    code, out, _ = run("answer", "--help")
    assert code == 0 and "model_vqa_loader.py" in out and "1024" in " ".join(out.split())


FULL_DISK = """
import json, resource, signal, sys
import tools.generate
from tests.eval_cli import run

class Backend:
    def answer(self, requests, sampling):
        return ["a long enough answer to fill the side file " * 2 for _ in requests]

tools.generate.setup = lambda args: (Backend(), True)
if len(sys.argv) > 3:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), resource.RLIM_INFINITY))
print(json.dumps(run("answer", "--hf", "model", "--question-file", sys.argv[1], "--answers-file", sys.argv[2],
                     "--batch-size", "2", "--max-new-tokens", "4")))
"""


def test_a_full_disk_under_the_side_file_names_the_side_file_and_the_run_resumes(tmp_path):
    """The side file's write fails (here at a file-size limit): the error names ANSWERS.partial, not
    the answers file, nor is it replaced by closing's second failing flush; a rerun resumes."""
    import os
    import subprocess
    import sys

    questions, answers = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "text": f"Question {i}?"}) + "\n" for i in range(20)))

    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def answer(*limit):
        out = subprocess.run([sys.executable, "-c", FULL_DISK, str(questions), str(answers), *map(str, limit)],
                             capture_output=True, text=True, timeout=300, cwd=repository)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.splitlines()[-1])

    code, _, err = answer(2000)
    assert code == 1 and err.splitlines()[-1] == f"error: {answers}.partial: File too large", err
    assert "Traceback" not in err
    assert not answers.exists() and 0 < os.path.getsize(f"{answers}.partial") <= 2000
    code, out, err = answer()
    assert code == 0 and "resuming: " in out and " of 20 answers kept" in out, err
    assert len(answers.read_text().splitlines()) == 20 and not os.path.exists(f"{answers}.partial")
