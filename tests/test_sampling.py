"""Sampling as transformers' generate() samples (EVE's own evaluation and our HF backend): temperature,
then top-k (50 unless told otherwise), then top-p, on the same logits the same distribution."""

import pytest
import torch

from megatron_eve.inference.generate import Generator, Sampling, SamplingError, checked_sampling, sampling_distribution


def transformers_distribution(logits, temperature, top_k, top_p):
    """What generate(do_sample=True, temperature, top_k, top_p) draws from: its warpers, in its order."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, dim=-1)


def logits_with_ties(seed=0, vocab=400):
    """Random logits; in row 1 eight tokens share the value ranked 48th to 55th (ties at the 50th)."""
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    order = logits[1].argsort(descending=True)
    logits[1, order[47:55]] = float(logits[1, order[47]])
    return logits


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 50, 1.0), (5.0, 50, 1.0), (3.0, 50, 0.95), (8.0, 50, 0.8), (0.7, 10, 0.9), (2.0, 0, 0.9),
    (5.0, 0, 1.0), (1.5, 1000, 0.5),
])
def test_the_sampled_distribution_is_transformers_generate(temperature, top_k, top_p):
    logits = logits_with_ties()
    ours = sampling_distribution(logits, Sampling(temperature=temperature, top_k=top_k, top_p=top_p))
    theirs = transformers_distribution(logits, temperature, top_k, top_p)
    assert torch.equal(ours > 0, theirs > 0)  # the same tokens kept
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    if top_k == 50 and top_p == 1.0:
        assert int((ours[1] > 0).sum()) == 55  # the ties at the 50th value kept, as TopKLogitsWarper keeps them
        assert int((ours[0] > 0).sum()) == 50


def test_the_generator_draws_only_from_the_top_k(monkeypatch):
    """Generator._choose (the megatron backend's sampler) never picks a token outside the top k."""
    from megatron.core import parallel_state

    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_world_size", lambda: 1)
    generator = Generator.__new__(Generator)  # everything but the model
    generator.vocab_size, generator.device = None, torch.device("cpu")
    logits = torch.randn(1, 400, generator=torch.Generator().manual_seed(1)).repeat(4000, 1)
    for top_k, top_p in ((5, 1.0), (50, 1.0), (50, 0.9)):
        sampling = Sampling(temperature=8.0, top_k=top_k, top_p=top_p)
        drawn = generator._choose(logits, sampling, torch.Generator().manual_seed(0), 4000)
        allowed = transformers_distribution(logits[:1], 8.0, top_k, top_p)[0] > 0
        assert bool(allowed[drawn].all()) and len(set(drawn.tolist())) > min(top_k, 20) // 2
    greedy = generator._choose(logits[:3], Sampling(temperature=0.0, top_k=1), None, 3)
    assert greedy.tolist() == [int(logits[0].argmax())] * 3


def test_top_k_is_checked_and_defaults_to_transformers_50():
    assert Sampling().top_k == 50
    assert checked_sampling(6, 0.5, 0.9, 3).top_k == 50  # the demo's call (no top_k): 50
    assert checked_sampling(6, 0.5, 0.9, 3, top_k=0).top_k == 0
    with pytest.raises(SamplingError, match=r"^--top-k must be 0 \(off\) or more, not -1$"):
        checked_sampling(6, 0.5, 0.9, top_k=-1)
    from tools.app import parse_sampling

    assert parse_sampling("6", "0.5", "0.9", 2048, seed=3).top_k == 50


def test_generate_and_eval_vqa_take_top_k(tmp_path, capsys):
    from tools.eval_vqa import main as eval_main
    from tools.generate import main, sampling

    from tests.test_inference_inputs import in_process, one_error_line

    assert in_process(main, "--hf", tmp_path / "unused", "--prompt", "Hi", "--temperature", "1",
                      "--top-k", "-2") == 2
    assert one_error_line(capsys.readouterr().err).startswith("error: --top-k must be 0 (off) or more, not -2 (see ")
    assert in_process(eval_main, "answer", "--hf", tmp_path / "unused", "--question-file", tmp_path / "q.jsonl",
                      "--answers-file", tmp_path / "a.jsonl", "--top-k", "-1") == 2
    assert "--top-k must be 0 (off) or more, not -1" in capsys.readouterr().err
    import argparse

    from tools.generate import add_model_args

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    assert sampling(parser.parse_args(["--temperature", "1"])).top_k == 50
    assert sampling(parser.parse_args(["--temperature", "1", "--top-k", "0"])).top_k == 0
    demo = argparse.ArgumentParser()
    add_model_args(demo, demo=True)  # the demo has no --top-k: 50
    assert sampling(demo.parse_args(["--load", "x", "--temperature", "1"])).top_k == 50


class FakeHFModel:
    """What HFBackend._generate calls: generate() records its arguments and gives `new` as new tokens."""

    def __init__(self, new, vocab_size=400):
        self.new, self.calls = new, []
        self.config = type("Config", (), {"vocab_size": vocab_size})()

    def generate(self, ids, **kwargs):
        self.calls.append(kwargs)
        longest = max(map(len, self.new))  # a row that ended is padded (pad_token_id), as generate() pads it
        new = torch.tensor([row + [0] * (longest - len(row)) for row in self.new])[:, : kwargs["max_new_tokens"]]
        return torch.cat([ids, new], dim=1)


def hf_backend(tokenizer, model):
    from megatron_eve.data.tokenizer import Tokenizer
    from megatron_eve.inference.backends import HFBackend

    backend = HFBackend.__new__(HFBackend)  # everything but the model
    backend.tokenizer, backend.model, backend.device = Tokenizer(tokenizer), model, torch.device("cpu")
    return backend


@pytest.mark.parametrize("top_k, passed", [(50, 50), (0, 0), (7, 7)])
def test_the_hf_backend_passes_top_k_to_generate(corpus, top_k, passed):
    """generate() takes an unset top_k for 50: it gets ours explicitly (0: its own "off")."""
    model = FakeHFModel([[5, 6, 7]])
    hf_backend(corpus["tokenizer"], model)._generate([[1, 9]], [], Sampling(3, 2.0, 0.9, top_k=top_k), [3])
    assert model.calls[-1]["top_k"] == passed and model.calls[-1]["temperature"] == 2.0
    hf_backend(corpus["tokenizer"], model)._generate([[1, 9]], [], Sampling(3, 0.0, top_k=top_k), [3])
    assert "top_k" not in model.calls[-1] and model.calls[-1]["do_sample"] is False  # greedy: as before
