"""Generation, answer files, scorers and the chat demo."""

import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from megatron_eve.eval.scorers import (
    choice_letter,
    multiple_choice_accuracy,
    normalize_vqa_answer,
    pope_metrics,
    vqa_accuracy,
)
from tests.helpers import ROOT, read_json, torchrun
from tests.hf_fixtures import converted_tiny_eve


@pytest.fixture(scope="module")
def model(tmp_path_factory, corpus):
    """A converted tiny random EVE checkpoint, the corpus tokenizer, and three images."""
    return converted_tiny_eve(tmp_path_factory.mktemp("generation"), corpus["tokenizer"])


@pytest.fixture(scope="module")
def generations(model):
    runs = {}
    for name, nproc, layout in (("tp1", 1, []), ("tp2", 2, ["--tp", "2"]), ("pp2", 2, ["--pp", "2"])):
        out = model["root"] / f"{name}.json"
        torchrun("generation_worker.py", nproc, ["--load", model["load"], "--tokenizer", model["tokenizer"],
                                                 "--images", *model["images"], "--out", out, *layout])
        runs[name] = read_json(out)
    return runs


def test_kv_cache_is_token_identical(generations):
    run = generations["tp1"]
    assert all(len(tokens) > 0 for tokens in run["cached"])
    assert run["cached"] == run["uncached"]


def test_batch_equals_one_by_one(generations):
    run = generations["tp1"]
    assert len(set(run["prompt_lengths"])) > 1  # rows of different lengths, left-padded together
    assert run["cached"] == run["single"]


def test_tensor_and_pipeline_parallel_generate_the_same_tokens(generations):
    assert generations["tp2"]["cached"] == generations["tp1"]["cached"]
    assert generations["pp2"]["cached"] == generations["tp1"]["cached"]


def test_answer_file_with_bad_questions(model, tmp_path):
    questions = [
        {"question_id": 1, "image": os.path.basename(model["images"][0]), "text": "What colour is it?"},
        {"question_id": 2, "image": "missing.png", "text": "What is this?"},
        {"question_id": 3, "text": "word " * 3000},
        {"question_id": 4, "image": os.path.basename(model["images"][1]), "text": "Which shape?"},
    ]
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(json.dumps(q) for q in questions))
    answers = tmp_path / "answers.jsonl"
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_vqa.py"), "answer", "--load", model["load"],
                          "--tokenizer-model", model["tokenizer"], "--question-file", path, "--image-folder",
                          model["root"], "--answers-file", answers, "--max-new-tokens", "4", "--batch-size", "4"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert set(row) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert row["model_id"] == "ckpt" and row["prompt"].endswith("Answer the question using a single word or phrase.")
    assert "missing.png does not exist" in rows[1]["metadata"]["error"] and rows[1]["text"] == ""
    assert "positions; the model allows 2048" in rows[2]["metadata"]["error"]
    assert rows[0]["metadata"] == {} and rows[3]["metadata"] == {}
    assert "2 answered, 2 could not be answered" in out.stdout

    truth = tmp_path / "truth.jsonl"
    truth.write_text("\n".join(json.dumps({"question_id": r["question_id"], "answers": [r["text"] or "x"]})
                               for r in rows))
    scored = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_vqa.py"), "score", "--answers-file", answers,
                             "--annotations", truth, "--kind", "vqa"], capture_output=True, text=True, timeout=120)
    result = json.loads(scored.stdout)
    assert result["questions"] == 4 and result["accuracy"] == pytest.approx(0.5)


def test_vqa_normalisation_and_accuracy():
    assert normalize_vqa_answer("Two dogs.") == "2 dogs"
    assert normalize_vqa_answer("It's the cat!") == "it's cat"
    assert normalize_vqa_answer("dont") == "don't"
    ten = ["red"] * 2 + ["dark red"] * 8
    assert vqa_accuracy("Red", ten) == pytest.approx(0.6)  # 2 of 10 annotators: min(1, n/3) averaged
    assert vqa_accuracy("dark red", ten) == 1.0
    assert vqa_accuracy("blue", ten) == 0.0
    assert vqa_accuracy("Yes", ["yes"]) == 1.0


def test_pope_metrics():
    metrics = pope_metrics(["Yes, there is.", "No.", "There is not a dog.", "yes"], ["yes", "no", "yes", "no"])
    assert metrics == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5}


def test_choice_letters():
    assert [choice_letter(t) for t in ["B", "(C) a cat", "A. dog", "The answer is D", "none"]] == ["B", "C", "A", "D", None]
    assert multiple_choice_accuracy(["A", "B.", "(C)"], ["A", "C", "C"]) == pytest.approx(2 / 3)


def test_chat_demo_streams_answers(model):
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "app.py"), "--load", model["load"],
                             "--tokenizer-model", model["tokenizer"], "--port", "0", "--max-new-tokens", "6"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        address = None
        deadline = time.time() + 120
        while time.time() < deadline and address is None:
            line = proc.stdout.readline()
            match = re.search(r"EVE chat on (http://127\.0\.0\.1:\d+)", line)
            address = match.group(1) if match else None
        assert address, "the demo did not start"
        health = json.loads(urllib.request.urlopen(address + "/api/health", timeout=30).read())
        assert health == {"status": "ok", "model": "ckpt"}
        assert b"<title>EVE chat</title>" in urllib.request.urlopen(address + "/", timeout=30).read()
        image = base64.b64encode(open(model["images"][0], "rb").read()).decode()
        body = json.dumps({"messages": [{"role": "user", "content": "What is it?"}], "image": image,
                           "max_new_tokens": 6}).encode()
        request = urllib.request.Request(address + "/api/chat", data=body, headers={"Content-Type": "application/json"})
        events = urllib.request.urlopen(request, timeout=120).read().decode().split("\n\n")
        data = [e[len("data: "):] for e in events if e.startswith("data: ")]
        assert data[-1] == "[DONE]" and all("text" in json.loads(d) for d in data[:-1])
        bad = urllib.request.Request(address + "/api/chat", data=b'{"messages": []}',
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(bad, timeout=30)
        assert error.value.code == 400
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_generate_cli_megatron_and_hf_export_agree(model, tmp_path):
    """tools/generate.py answers from the megatron checkpoint and from its HF export alike."""
    export = tmp_path / "export"
    out = subprocess.run([sys.executable, str(ROOT / "checkpoint_conversion" / "megatron_to_hf.py"), "--megatron",
                          model["load"], "--out", export, "--dtype", "float32", "--tokenizer-model", model["tokenizer"],
                          "--no-progress"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    answers = {}
    for name, source in (("megatron", ["--load", model["load"], "--tokenizer-model", model["tokenizer"]]),
                         ("hf", ["--hf", export])):
        run = subprocess.run([sys.executable, str(ROOT / "tools" / "generate.py"), *map(str, source), "--image",
                              model["images"][0], "--prompt", "What is in the picture?", "--max-new-tokens", "6"],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        answers[name] = run.stdout.strip().splitlines()[-1]
    assert answers["megatron"] == answers["hf"] and answers["megatron"]
    missing = subprocess.run([sys.executable, str(ROOT / "tools" / "generate.py"), "--hf", export, "--image",
                              tmp_path / "nowhere.png", "--prompt", "Hi"], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and "nowhere.png does not exist" in missing.stderr
