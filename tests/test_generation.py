"""Generation, answer files, scorers and the chat demo."""

import json
import os
import subprocess
import sys

import pytest

from megatron_eve.eval.scorers import (
    choice_letter,
    multiple_choice_accuracy,
    normalize_vqa_answer,
    pope_metrics,
    vqa_accuracy,
)
from tests.helpers import ROOT, damaged_png, read_json, torchrun
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


def test_bf16_generation_follows_fp32(generations):
    run = generations["tp1"]
    assert run["bf16_dtype"] == "torch.bfloat16"
    assert run["bf16_logits_rel_error"] < 3e-2  # bf16 rounding of a random tiny model (fp32 = 0)
    for name in ("tp1", "tp2", "pp2"):
        texts = generations[name]["bf16_texts"]
        assert len(texts) == 4 and not any(t.startswith("the prompt") for t in texts)


@pytest.fixture(scope="module")
def export(model, tmp_path_factory):
    """The converted checkpoint exported back to an HF folder (fp32)."""
    folder = tmp_path_factory.mktemp("export") / "hf"
    out = subprocess.run([sys.executable, str(ROOT / "checkpoint_conversion" / "megatron_to_hf.py"), "--megatron",
                          model["load"], "--out", folder, "--dtype", "float32", "--tokenizer-model", model["tokenizer"],
                          "--no-progress"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return folder


def test_hf_backend_answers_a_batch_as_one_by_one(model, export):
    """Left-padded together (images of different sizes, a text-only prompt, a bad image among
    them), the HF export answers each request as it does alone."""
    from megatron_eve.inference.backends import HFBackend, Request
    from megatron_eve.inference.generate import PromptError, Sampling, chat_prompt

    backend = HFBackend(str(export))
    requests = [Request(chat_prompt("What is in the picture?", True), [model["images"][0]]),
                Request(chat_prompt("Describe the shape and its colour in detail, please.", True), [model["images"][1]]),
                Request(chat_prompt("What is two plus three?", False)),
                Request(chat_prompt("Where is it?", True), [str(model["root"] / "nowhere.png")]),
                Request(chat_prompt("Where is it?", True), [model["images"][2]])]
    sampling = Sampling(max_new_tokens=6)
    together = backend.answer(requests, sampling)
    alone = [backend.answer([r], sampling)[0] for r in requests]
    assert isinstance(together[3], PromptError) and "nowhere.png does not exist" in str(together[3])
    assert [str(t) for t in together] == [str(a) for a in alone]
    assert all(isinstance(t, str) and t for i, t in enumerate(together) if i != 3)


def test_answer_file_with_bad_questions(model, tmp_path):
    """Missing and damaged images, an over-long prompt, a line that is not JSON and a question
    without text each cost that question only; the file replaces an older one whole."""
    damaged_png(tmp_path / "damaged.png")
    questions = [
        {"question_id": 1, "image": os.path.basename(model["images"][0]), "text": "What colour is it?"},
        {"question_id": 2, "image": "missing.png", "text": "What is this?"},
        {"question_id": 3, "text": "word " * 3000},
        {"question_id": 4, "image": os.path.basename(model["images"][1]), "text": "Which shape?"},
        {"question_id": 5, "image": str(tmp_path / "damaged.png"), "text": "And this?"},
        {"question_id": 6, "image": "x.png"},
        {"question_id": 7, "image": "", "text": "What is this?"},  # not text-only: its image is missing
    ]
    path = tmp_path / "questions.jsonl"
    lines = [json.dumps(q) for q in questions]
    lines.insert(2, '{"question_id": 99, "text": "cut off')
    path.write_text("\n".join(lines))
    answers = tmp_path / "answers.jsonl"
    answers.write_text("an older answer file\n")
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_vqa.py"), "answer", "--load", model["load"],
                          "--tokenizer-model", model["tokenizer"], "--question-file", path, "--image-folder",
                          model["root"], "--answers-file", answers, "--max-new-tokens", "4", "--batch-size", "4",
                          "--overwrite"],  # the older file is not an answers file of ours
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{path}:3: not JSON" in out.stderr and f"{path}:7: no text" in out.stderr
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    for row in rows:
        assert set(row) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert row["model_id"] == "ckpt"
    assert rows[0]["prompt"].endswith("Answer the question using a single word or phrase.")
    assert "missing.png does not exist" in rows[1]["metadata"]["error"] and rows[1]["text"] == ""
    assert "positions; the model allows 2048" in rows[2]["metadata"]["error"]
    assert "SyntaxError" in rows[4]["metadata"]["error"] and "malformed question" in rows[5]["metadata"]["error"]
    assert "'image' a file name" in rows[6]["metadata"]["error"] and rows[6]["text"] == ""
    assert rows[0]["metadata"] == {} and rows[3]["metadata"] == {}
    assert "2 answered, 5 could not be answered, 2 malformed lines (named above)" in out.stdout
    assert sorted(os.listdir(tmp_path)) == sorted(["answers.jsonl", "questions.jsonl", "damaged.png"])

    truth = tmp_path / "truth.jsonl"
    truth.write_text("\n".join(json.dumps({"question_id": r["question_id"], "answers": [r["text"] or "x"]})
                               for r in rows[:4]))
    scored = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_vqa.py"), "score", "--answers-file", answers,
                             "--annotations", truth, "--kind", "vqa"], capture_output=True, text=True, timeout=120)
    result = json.loads(scored.stdout)
    assert result["questions"] == 4 and result["accuracy"] == pytest.approx(0.5)


def score(tmp_path, answers, truth, kind="vqa"):
    (tmp_path / "a.jsonl").write_text("\n".join(answers))
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(t) for t in truth))
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_vqa.py"), "score", "--answers-file",
                          tmp_path / "a.jsonl", "--annotations", tmp_path / "t.jsonl", "--kind", kind],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), out.stderr


def test_score_counts_missing_answers_and_flags_duplicates(tmp_path):
    truth = [{"question_id": i, "answers": ["yes"]} for i in range(8)]
    answers = [json.dumps({"question_id": 0, "text": "yes"}), json.dumps({"question_id": 1, "text": "Yes"}),
               json.dumps({"question_id": 1, "text": "no"}), '{"question_id": 2, "text": "ye', "[1, 2]"]
    result, errors = score(tmp_path, answers, truth)
    assert result["accuracy"] == pytest.approx(2 / 8)  # 2 of 8 answered right; unanswered count as wrong
    assert (result["questions"], result["answered"], result["missing"], result["duplicates"]) == (8, 2, 6, 1)
    assert result["unreadable_lines"] == 2
    assert "1 duplicate answers" in errors and "6 of 8 annotated questions have no answer" in errors
    assert f"{tmp_path / 'a.jsonl'}:4: not JSON" in errors and f"{tmp_path / 'a.jsonl'}:5: not a JSON object" in errors


def test_answer_files_are_replaced_whole(tmp_path, monkeypatch):
    from megatron_eve.atomic import write_jsonl

    path = tmp_path / "answers.jsonl"
    write_jsonl(str(path), [{"question_id": 1, "text": "old"}])

    def rows():
        yield {"question_id": 1, "text": "new"}
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        write_jsonl(str(path), rows())
    assert path.read_text() == '{"question_id": 1, "text": "old"}\n' and os.listdir(tmp_path) == ["answers.jsonl"]


def test_vqa_normalisation_and_accuracy():
    assert normalize_vqa_answer("Two dogs.") == "2 dogs"
    assert normalize_vqa_answer("It's the cat!") == "it 's cat"  # EvalAI's word_tokenize splits "'s"
    assert normalize_vqa_answer("It's the cat!", lenient=True) == "it's cat"
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
    # EVE's parser takes "A" only ("B." is not "B. ..." and "(C)" is no form it knows); lenient: A and (C).
    assert multiple_choice_accuracy(["A", "B.", "(C)"], ["A", "C", "C"]) == pytest.approx(1 / 3)
    assert multiple_choice_accuracy(["A", "B.", "(C)"], ["A", "C", "C"], lenient=True) == pytest.approx(2 / 3)


def test_generate_cli_megatron_and_hf_export_agree(model, export, tmp_path):
    """tools/generate.py answers from the megatron checkpoint and from its HF export alike."""
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


def near_limit_question(tokenizer_path, image, left: int):
    """A question whose chat prompt (with `image`) leaves the tiny model `left` positions."""
    from PIL import Image

    from megatron_eve.data.images import num_visual_tokens
    from megatron_eve.data.templates import tokenize_with_images
    from megatron_eve.data.tokenizer import Tokenizer
    from megatron_eve.inference.generate import chat_prompt
    from tests.helpers import tiny_config

    tokenizer, cfg = Tokenizer(tokenizer_path), tiny_config()
    with Image.open(image) as opened:
        image_positions = num_visual_tokens(*opened.size, cfg.vision)
    target = cfg.language.max_position_embeddings - left
    for words in range(target // 2, 0, -1):
        for filler in range(12):
            question = "word " * words + "a " * filler + "What is in the picture?"
            ids = tokenize_with_images(chat_prompt(question, True), tokenizer)
            positions = len(ids) - 1 + image_positions
            if positions == target:
                return question
            if positions > target:
                break
    raise AssertionError(f"no question of {target} positions")


def test_a_prompt_near_the_length_limit_is_answered_within_it(model, export, tmp_path):
    """A prompt that leaves fewer positions than --max-new-tokens is answered (LLaVA / EVE's scripts
    let generate() run on; their demo caps max_new_tokens at the positions left), with the new
    tokens left: the first tokens of an uncapped run's answer, the same from both backends, each
    row of a batch cut at its own budget."""
    from megatron_eve.inference.backends import HFBackend, Request
    from megatron_eve.inference.generate import Sampling, chat_prompt

    left, image = 3, model["images"][0]
    question = near_limit_question(model["tokenizer"], image, left)
    near = Request(chat_prompt(question, True), [image])
    short = Request(chat_prompt("What is two plus three?", False))
    sampling = Sampling(max_new_tokens=12)
    hf = HFBackend(str(export))
    texts = hf.answer([near, short], sampling)
    assert texts == [hf.answer([near], sampling)[0], hf.answer([short], sampling)[0]] and all(texts)

    hf.tokenizer.decode = lambda ids: " ".join(map(str, ids))  # the answers' token ids
    capped = hf.answer([near, short], sampling)
    hf.max_length = 10**6  # as if the model had positions to spare
    uncapped = hf.answer([near, short], sampling)
    assert len(capped[0].split()) == left and uncapped[0].split()[:left] == capped[0].split()
    assert len(uncapped[0].split()) > left and capped[1] == uncapped[1] and len(capped[1].split()) > left

    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "image": os.path.basename(image), "text": question}) + "\n"
                         + json.dumps({"question_id": 2, "text": "What is two plus three?"}) + "\n")
    answers = tmp_path / "answers.jsonl"
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_vqa.py"), "answer", "--load", model["load"],
                          "--tokenizer-model", model["tokenizer"], "--question-file", questions, "--image-folder",
                          model["root"], "--answers-file", answers, "--max-new-tokens", "12", "--batch-size", "2",
                          "--prompt-style", "none"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["metadata"] for r in rows] == [{}, {}]
    assert [r["text"] for r in rows] == texts  # the megatron backend answers as the HF export does


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
def test_a_tiny_temperature_samples_the_most_likely_tokens(temperature, monkeypatch):
    """logits / temperature overflowed to inf, and multinomial failed ("probability tensor contains
    either inf, nan or element < 0"): the limit of sampling is the most likely tokens, ties shared."""
    import torch
    from megatron.core import parallel_state

    from megatron_eve.inference.generate import Generator, Sampling, sampling_distribution

    logits = torch.randn(3, 400, generator=torch.Generator().manual_seed(0)) * 30
    logits[1, [5, 9]] = logits[1].max() + 1  # two tokens tied for the most likely
    probs = sampling_distribution(logits, Sampling(temperature=temperature))
    assert bool(torch.isfinite(probs).all())
    assert probs[0].tolist() == torch.nn.functional.one_hot(logits[0].argmax(), 400).float().tolist()
    assert probs[1, [5, 9]].tolist() == [0.5, 0.5] and float(probs[1].sum()) == 1.0

    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_world_size", lambda: 1)
    generator = Generator.__new__(Generator)  # everything but the model
    generator.vocab_size, generator.device = None, torch.device("cpu")
    drawn = generator._choose(logits[[0, 2]], Sampling(temperature=temperature), torch.Generator().manual_seed(0), 2)
    assert drawn.tolist() == logits[[0, 2]].argmax(dim=-1).tolist()


def test_both_backends_answer_a_tiny_temperature_as_greedy(model, export):
    """The megatron checkpoint (tools/generate.py) and the HF export (its generate(), whose own
    temperature warper divides plainly) sample at --temperature 1e-40 without failing: greedy's answer."""
    from megatron_eve.inference.backends import HFBackend, Request
    from megatron_eve.inference.generate import Sampling, chat_prompt

    backend = HFBackend(str(export))
    requests = [Request(chat_prompt("What is in the picture?", True), [model["images"][0]]),
                Request(chat_prompt("What is two plus three?", False))]
    greedy = backend.answer(requests, Sampling(max_new_tokens=6))
    for temperature in (1e-40, 1e-300):
        assert backend.answer(requests, Sampling(max_new_tokens=6, temperature=temperature, seed=3)) == greedy
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "generate.py"), "--load", model["load"],
                          "--tokenizer-model", model["tokenizer"], "--image", model["images"][0], "--prompt",
                          "What is in the picture?", "--max-new-tokens", "6", "--temperature", "1e-40"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == greedy[0]


def test_ctrl_c_while_generate_waits_for_a_question_is_one_line(export):
    """Interactive mode (no --prompt), interrupted while it waits on standard input: "interrupted"
    and exit code 130, not a traceback."""
    import signal

    child = subprocess.Popen([sys.executable, str(ROOT / "tools" / "generate.py"), "--hf", str(export),
                              "--max-new-tokens", "3"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        child.stdin.write("What is two plus three?\n")
        child.stdin.flush()
        assert child.stdout.readline()  # answered: now it waits for the next question
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130 and err.splitlines()[-1] == "interrupted" and "Traceback" not in err, err
