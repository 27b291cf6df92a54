"""The answering backends without a model: the HF backend's prompt-length rule (the megatron
backend's, per request) and the streamed text of characters that span several byte tokens."""

import pytest

from megatron_eve.data.tokenizer import Tokenizer
from megatron_eve.inference.backends import HFBackend, MegatronBackend, Request
from megatron_eve.inference.generate import Prompt, PromptError, Sampling, chat_prompt
from tests.helpers import random_image, tiny_config


def test_hf_backend_refuses_a_prompt_too_long_for_the_model_alone(corpus, tmp_path):
    """A request too long gets the megatron backend's message in its place; the others are
    generated without it (no 15k-position row padding the batch). One that leaves fewer positions
    than max_new_tokens is answered, its new tokens cut to the positions left (its own in a batch)."""
    backend = HFBackend.__new__(HFBackend)  # everything but the model
    backend.tokenizer, backend.vision, backend.max_length = Tokenizer(corpus["tokenizer"]), tiny_config().vision, 300
    generated, budgets = [], []

    def generate(rows, images, sampling, row_budgets):
        generated.extend(rows)
        budgets.append(row_budgets)
        return ["fine"] * len(rows)
    backend._generate = generate
    image = tmp_path / "square.png"
    random_image(224, 224, seed=0).save(image)  # 1 + 8 * (8 + 1) = 73 positions at the tiny preset's 224 pixels
    requests = [Request(chat_prompt("word " * 400, False)), Request(chat_prompt("Hello?", False)),
                Request(chat_prompt("What is it?", True), [str(image)])]
    out = backend.answer(requests, Sampling(max_new_tokens=8))
    assert isinstance(out[0], PromptError) and out[1:] == ["fine", "fine"]
    assert str(out[0]).startswith("the prompt takes ") and str(out[0]).endswith("positions; the model allows 300")
    assert len(generated) == 2 and max(map(len, generated)) < 300  # the long one never reaches the model
    assert budgets == [[8, 8]]

    fits = backend.positions(generated[1], [random_image(224, 224, seed=0)])  # the image's placeholder counts 73
    out = backend.answer(requests[1:], Sampling(max_new_tokens=300 - fits + 1))
    assert out == ["fine", "fine"] and budgets[-1] == [300 - fits + 1, 300 - fits]
    out = backend.answer(requests[2:], Sampling(max_new_tokens=1000))
    assert out == ["fine"] and budgets[-1] == [300 - fits]
    backend.max_length = fits  # no position left to answer in: refused, with the same one line
    assert str(backend.answer(requests[2:], Sampling(max_new_tokens=1))[0]) == (
        f"the prompt takes {fits} positions; the model allows {fits}")


def test_hf_backend_cuts_each_row_at_its_budget_and_leaves_out_special_ids(corpus):
    """The batch runs to the largest budget; each row is cut at its own (as the megatron generator
    stops it), at </s>, and <unk> / <s> are not shown (batch_decode(skip_special_tokens=True))."""
    from tests.test_sampling import FakeHFModel, hf_backend

    tokenizer = Tokenizer(corpus["tokenizer"])
    words = [tokenizer.encode(w) for w in ("red", "square", "blue", "circle")]
    new = [words[0] + [0] + words[1] + words[2], words[2] + [1] + words[3] + [2] + words[0]]
    backend = hf_backend(corpus["tokenizer"], FakeHFModel(new))
    cut = len(words[0]) + 1 + len(words[1])
    texts = backend._generate([[1, 9, 9], [1, 9]], [], Sampling(max_new_tokens=50), [cut, 50])
    assert backend.model.calls[-1]["max_new_tokens"] == 50
    assert texts == [tokenizer.decode(words[0] + words[1]), tokenizer.decode(words[2] + words[3])]
    assert texts[0] == "red square" and " ⁇ " not in texts[1]


def streamed(tokenizer, ids):
    """The pieces MegatronBackend.stream sends for a generator that gives `ids` then </s>, and answer()'s text."""
    class Generator:
        def stream(self, prompts, sampling):
            for token in ids + [sampling.eos_id]:
                yield [token]

        def generate(self, prompts, sampling):
            return [ids + [sampling.eos_id] for _ in prompts]

    backend = MegatronBackend.__new__(MegatronBackend)  # everything but the model
    backend.tokenizer, backend.generator, backend.max_length = tokenizer, Generator(), 10_000
    backend.prepare = lambda request: Prompt([1])
    sampling = Sampling(max_new_tokens=len(ids) + 1)
    return list(backend.stream(Request("unused"), sampling)), backend.answer([Request("unused")], sampling)[0]


def test_answers_leave_out_unk_and_bos_streamed_or_not(corpus):
    """<unk> (id 0) decodes to " ⁇ " and <s> to nothing: answers leave out the special ids, as the
    reference's batch_decode(skip_special_tokens=True) does, and the streamed text is the answer."""
    tokenizer = Tokenizer(corpus["tokenizer"])
    red, square = tokenizer.encode("a red"), tokenizer.encode("square")
    for ids in (red + [0] + square, [0] + red + [1, 0] + square + [0], [0, 0]):
        pieces, text = streamed(tokenizer, ids)
        reference = tokenizer.sp.decode([i for i in ids if i > 2]).strip()  # the reference's decode
        assert text == reference and "".join(pieces) == text and "⁇" not in text
    assert streamed(tokenizer, red + [0] + square)[1] == "a red square"


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
