"""ScienceQA-IMG end to end, in the official layouts: LLaVA's llava_test_CQM-A.json → `questions
--benchmark scienceqa` → `answer` (a stand-in backend) → `score --kind choice` on ScienceQA's own
problems.json / pid_splits.json, beside a port of EVE's eval_science_qa.py (tests/llava_eval_ports.py).
Every expected number was worked out by hand from eval_science_qa.py's rules (comments)."""

import json

import pytest

from megatron_eve.eval.prompts import OPTION_SUFFIX
from megatron_eve.inference.generate import chat_prompt
from tests.eval_cli import answers_file, run
from tests.llava_eval_ports import science_qa

# pid: (subject, grade, hint, image, number of choices, answer index, the model's answer, right?)
PROBLEMS = {
    "1": ("natural science", "grade3", "", True, 2, 0, "A", True),
    "2": ("natural science", "grade8", "A hint.", True, 3, 2, "The answer is C.", True),
    "3": ("social science", "grade5", "A hint.", False, 2, 1, "A", False),
    "4": ("language science", "grade10", "", False, 4, 3, "D. four", True),
    "5": ("social science", "grade7", "", True, 2, 1, "C", False),  # C is not among 2 options
    "6": ("natural science", "grade2", "", False, 3, 0, "B", False),
}


@pytest.fixture
def sqa(tmp_path):
    """ScienceQA's data folder (problems.json with a train problem too, pid_splits.json) and LLaVA's
    llava_test_CQM-A.json for its test split."""
    problems = {pid: {"question": f"Question {pid}?", "choices": [f"c{k}" for k in range(n)], "answer": answer,
                      "hint": hint, "image": "image.png" if image else None, "subject": subject, "grade": grade,
                      "split": "test"} for pid, (subject, grade, hint, image, n, answer, _, _) in PROBLEMS.items()}
    problems["7"] = dict(problems["1"], split="train")
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"train": ["7"], "test": list(PROBLEMS)}))
    entries = []
    for pid, (_, _, hint, image, n, answer, _, _) in PROBLEMS.items():
        options = " ".join(f"({'ABCDE'[k]}) c{k}" for k in range(n))
        value = f"Context: {hint or 'N/A'}\nQuestion: Question {pid}?\nOptions: {options}"
        entry = {"id": pid, "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + value},
                                              {"from": "gpt", "value": "ABCDE"[answer]}]}
        if image:
            entry["image"] = f"{pid}/image.png"
        entries.append(entry)
    (tmp_path / "llava_test_CQM-A.json").write_text(json.dumps(entries, indent=2))
    (tmp_path / "images").mkdir()
    return tmp_path


@pytest.fixture
def backend(monkeypatch):
    """Answers each question with PROBLEMS' answer text; records the prompts and max_new_tokens."""
    import tools.generate

    class Backend:
        prompts, max_new_tokens = [], []

        def answer(self, requests, sampling):
            Backend.prompts += [r.prompt for r in requests]
            Backend.max_new_tokens.append(sampling.max_new_tokens)
            return [PROBLEMS[r.prompt.split("Question: Question ")[1].split("?")[0]][6] for r in requests]

    monkeypatch.setattr(tools.generate, "setup", lambda args: (Backend(), True))
    return Backend


def answer(sqa):
    code, out, err = run("questions", "--benchmark", "scienceqa", "--source", sqa / "llava_test_CQM-A.json",
                         "--question-file", sqa / "q.jsonl")
    assert code == 0 and "6 questions" in out, err
    code, _, err = run("answer", "--hf", "m", "--question-file", sqa / "q.jsonl", "--image-folder", sqa / "images",
                       "--answers-file", sqa / "a.jsonl", "--prompt-style", "option")
    assert code == 0, err
    return [json.loads(line) for line in (sqa / "a.jsonl").read_text().splitlines()]


def test_questions_are_asked_and_recorded_as_model_vqa_science_does(sqa, backend):
    rows = answer(sqa)
    questions = [json.loads(line) for line in (sqa / "q.jsonl").read_text().splitlines()]
    asked = f"Context: N/A\nQuestion: Question 1?\nOptions: (A) c0 (B) c1\n{OPTION_SUFFIX}"
    assert questions[0] == {"question_id": "1", "image": "1/image.png", "image_in_prompt": True, "text": asked}
    assert "image" not in questions[2] and "image_in_prompt" not in questions[2]
    # model_vqa_science.py: qs = the first turn less "<image>", stripped; "<image>\n" first when the entry has
    # an image; --single-pred-prompt's instruction on its own line. cur_prompt (the answer's "prompt") likewise.
    assert backend.prompts[0] == chat_prompt(asked, with_image=True) and "<image>\n" + asked in backend.prompts[0]
    assert "<image>" not in backend.prompts[2]
    assert rows[0]["prompt"] == "<image>\n" + asked and rows[0]["question_id"] == "1"
    assert rows[2]["prompt"] == f"Context: A hint.\nQuestion: Question 3?\nOptions: (A) c0 (B) c1\n{OPTION_SUFFIX}"
    # LLaVA's model_vqa_science.py generates up to 1024 new tokens (model_vqa_loader.py: 128)
    assert set(backend.max_new_tokens) == {1024}


@pytest.mark.parametrize("annotations", ["folder", "problems.json"])
def test_score_reads_scienceqas_own_files_as_eval_science_qa_py(sqa, backend, annotations):
    answer(sqa)
    path = sqa if annotations == "folder" else sqa / "problems.json"
    code, out, err = run("score", "--kind", "choice", "--answers-file", sqa / "a.jsonl", "--annotations", path)
    assert code == 0 and err == "", err
    result = json.loads(out)
    # Right: 1, 2, 4 of the 6 test problems (7 is train); with an image: 1, 2 right, 5 wrong.
    assert (result["accuracy"], result["img_accuracy"]) == (0.5, pytest.approx(2 / 3))
    official = science_qa(sqa, sqa / "a.jsonl")  # '<image>' in the prompt: it divides by zero without
    assert (result["accuracy"] * 100, result["img_accuracy"] * 100) == pytest.approx(official)
    # NAT 1, 2, 6; SOC 3, 5; LAN 4; TXT (a hint) 2, 3; IMG 1, 2, 5; NO (neither) 4, 6; G1-6 1, 3, 6; G7-12 2, 4, 5.
    assert result["breakdown"] == pytest.approx({"NAT": 2 / 3, "SOC": 0.0, "LAN": 1.0, "TXT": 0.5, "IMG": 2 / 3,
                                                 "NO": 0.5, "G1-6": 1 / 3, "G7-12": 2 / 3})
    assert (result["questions"], result["missing"], result["not_annotated"]) == (6, 0, 0)


def test_unanswered_and_failed_problems_are_wrong(sqa, backend):
    rows = answer(sqa)
    rows[0].update(text="", metadata={"error": "image not found"})  # problem 1: failed
    rows = [r for r in rows if r["question_id"] != "2"] + [{"question_id": "99", "prompt": "", "text": "A"}]
    code, out, err = run("score", "--kind", "choice", "--answers-file", answers_file(sqa, rows, "b.jsonl"),
                         "--annotations", sqa)
    assert code == 0, err
    result = json.loads(out)
    # Only 4 is right: 1/6; of the image problems (1 failed, 2 unanswered, 5 wrong) none. eval_science_qa.py
    # leaves 2 out of its IMG count (its stand-in prompt "Unknown" has no '<image>'): 0/2.
    assert (result["accuracy"], result["img_accuracy"]) == (pytest.approx(1 / 6), 0.0)
    assert (result["missing"], result["not_annotated"]) == (1, 1) and "have no answer" in err
    # A prompt without "<image>" for an image problem: eval_science_qa.py would not count it as IMG.
    rows[3]["prompt"] = rows[3]["prompt"].replace("<image>\n", "")  # problem 5
    code, _, err = run("score", "--kind", "choice", "--answers-file", answers_file(sqa, rows, "c.jsonl"),
                       "--annotations", sqa)
    assert code == 0 and "1 answers' prompts disagree with problems.json on having an image" in err, err


def test_llavas_question_list_is_not_answered_as_it_is(sqa, backend):
    code, out, err = run("answer", "--hf", "m", "--question-file", sqa / "llava_test_CQM-A.json", "--answers-file",
                         sqa / "a.jsonl")
    assert code == 1 and "questions --benchmark scienceqa --source" in err and err.count("\n") == 1, err
