"""The answering backends without a model: the HF backend's prompt-length rule (the megatron
backend's, per request) and the streamed text of characters that span several byte tokens."""

import pytest

from megatron_eve.data.tokenizer import Tokenizer
from megatron_eve.inference.backends import HFBackend, MegatronBackend, Request
from megatron_eve.inference.generate import PromptError, Sampling, chat_prompt
from tests.helpers import random_image, tiny_config


def test_hf_backend_refuses_a_prompt_too_long_for_the_model_alone(corpus, tmp_path):
    """A request too long gets the megatron backend's message in its place; the others are
    generated without it (no 15k-position row padding the batch)."""
    backend = HFBackend.__new__(HFBackend)  # everything but the model
    backend.tokenizer, backend.vision, backend.max_length = Tokenizer(corpus["tokenizer"]), tiny_config().vision, 300
    generated = []
    backend._generate = lambda rows, images, sampling: generated.extend(rows) or ["fine"] * len(rows)
    image = tmp_path / "square.png"
    random_image(224, 224, seed=0).save(image)  # 1 + 8 * (8 + 1) = 73 positions at the tiny preset's 224 pixels
    requests = [Request(chat_prompt("word " * 400, False)), Request(chat_prompt("Hello?", False)),
                Request(chat_prompt("What is it?", True), [str(image)])]
    out = backend.answer(requests, Sampling(max_new_tokens=8))
    assert isinstance(out[0], PromptError) and out[1:] == ["fine", "fine"]
    assert str(out[0]).startswith("the prompt takes ") and str(out[0]).endswith("positions; the model allows 300")
    assert len(generated) == 2 and max(map(len, generated)) < 300  # the long one never reaches the model

    fits = backend.positions(generated[1], [random_image(224, 224, seed=0)])  # the image's placeholder counts 73
    out = backend.answer(requests[2:], Sampling(max_new_tokens=300 - fits + 1))
    assert str(out[0]) == f"prompt of {fits} positions + {301 - fits} new tokens exceeds the model's 300"


@pytest.mark.parametrize("text", ["héllo 😀 wörld 你好", "ünïcödé…", "😀😀"])
def test_streamed_text_holds_back_a_character_until_its_last_byte(corpus, text):
    """Byte-fallback tokens decode to U+FFFD until a character's bytes are complete: none is
    streamed, and the pieces add up to the answer."""
    tokenizer = Tokenizer(corpus["tokenizer"])
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and len(ids) > len(text.split())  # byte tokens are in there

    class Generator:
        def stream(self, prompts, sampling):
            for token in ids + [sampling.eos_id]:
                yield [token]

    backend = MegatronBackend.__new__(MegatronBackend)  # everything but the model
    backend.tokenizer, backend.generator, backend.max_length = tokenizer, Generator(), 10_000
    backend.prepare = lambda request: type("Prompt", (), {"tokens": [1]})()
    pieces = list(backend.stream(Request("unused"), Sampling(max_new_tokens=len(ids) + 1)))
    assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)
