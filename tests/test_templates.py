"""Token ids and loss masks of the plain and vicuna_v1 templates (eve.md §4)."""

import pytest

from megatron_eve.data.templates import (
    VICUNA_SYSTEM,
    TemplateError,
    apply_template,
    tokenize_with_images,
)
from megatron_eve.data.tokenizer import Tokenizer
from megatron_eve.model.visual_layout import IGNORE_INDEX, IMAGE_TOKEN_INDEX


@pytest.fixture(scope="module")
def tok(corpus):
    return Tokenizer(corpus["tokenizer"])


def spans(labels):
    """Contiguous runs of supervised positions, as (start, end)."""
    runs, start = [], None
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_legacy_chunking(tok):
    """Specials split the text and every chunk gets its own dummy prefix ("</s>USER" → "</s> ▁USER")."""
    ids = tok.encode("It is red.</s>USER: Where?")
    eos = ids.index(tok.eos_id)
    assert ids[:eos] == tok.sp.encode("It is red.")
    assert ids[eos + 1 :] == tok.sp.encode("USER: Where?")
    assert tok.sp.id_to_piece(ids[eos + 1]).startswith("▁")
    assert tok.encode("", bos=True) == [tok.bos_id]


def test_image_chunks_as_the_reference(tok):
    ids = tokenize_with_images("USER: <image>\nWhat", tok)
    assert ids == [tok.bos_id] + tok.sp.encode("USER: ") + [IMAGE_TOKEN_INDEX] + tok.sp.encode("\nWhat")


def test_plain_template(tok):
    conv = [{"from": "human", "value": "<image>\nDescribe the picture."},
            {"from": "gpt", "value": "A red circle in the center of the picture."}]
    out = apply_template("plain", conv, tok, 1)
    assert out.tokens == [tok.bos_id, IMAGE_TOKEN_INDEX] + tok.sp.encode("A red circle in the center of the picture.\n")
    assert out.labels[:2] == [IGNORE_INDEX, IGNORE_INDEX] and out.labels[2:] == out.tokens[2:]
    assert "</s>" not in tok.sp.id_to_piece(out.tokens[-1])  # no EOS in the plain template


def test_vicuna_multi_turn_masks_instructions_and_supervises_answers(tok):
    conv = [{"from": "human", "value": "What color is the shape?\n<image>"},
            {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Where is the shape?"},
            {"from": "gpt", "value": "In the top left."},
            {"from": "human", "value": "What shape is in the picture?"},
            {"from": "gpt", "value": "A circle."}]
    out = apply_template("vicuna_v1", conv, tok, 1)
    prompt = (VICUNA_SYSTEM + " USER: <image>\nWhat color is the shape? ASSISTANT: Red.</s>"
              "USER: Where is the shape? ASSISTANT: In the top left.</s>"
              "USER: What shape is in the picture? ASSISTANT: A circle.</s>")
    assert out.tokens == tokenize_with_images(prompt, tok)  # <image> moved to the turn's start
    runs = spans(out.labels)
    assert len(runs) == 3
    for (start, end), answer in zip(runs, ["Red.", "In the top left.", "A circle."]):
        assert out.tokens[end - 1] == tok.eos_id  # every answer ends with a supervised </s>
        assert tok.decode(out.tokens[start : end - 1]).strip() == answer
        assert out.labels[start:end] == out.tokens[start:end]
    first_answer = runs[0][0]
    assert "What color is the shape?" in tok.decode([t for t in out.tokens[:first_answer] if t >= 0])
    assert out.labels[0] == IGNORE_INDEX and IMAGE_TOKEN_INDEX not in out.labels


def test_vicuna_text_only_and_leading_gpt_turn(tok):
    conv = [{"from": "gpt", "value": "Hello."}, {"from": "human", "value": "What is 2 plus 3?"},
            {"from": "gpt", "value": "5."}]
    out = apply_template("vicuna_v1", conv, tok, 0)
    assert IMAGE_TOKEN_INDEX not in out.tokens
    (start, end), = spans(out.labels)
    assert tok.decode(out.tokens[start : end - 1]).strip() == "5."
    assert "Hello" not in tok.decode(out.tokens)


@pytest.mark.parametrize("conv, reason", [
    ([], "empty_conversation"),
    ([{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Hi"}], "unknown_role"),
    ([{"from": "human", "value": "Hi"}, {"from": "human", "value": "Hi"}], "roles_not_alternating"),
    ([{"from": "human", "value": 3}], "malformed_turn"),
])
def test_vicuna_errors(tok, conv, reason):
    with pytest.raises(TemplateError) as error:
        apply_template("vicuna_v1", conv, tok, 0)
    assert error.value.reason == reason


def test_plain_needs_two_turns_with_an_image(tok):
    with pytest.raises(TemplateError) as error:
        apply_template("plain", [{"from": "human", "value": "no image"}, {"from": "gpt", "value": "x"}], tok, 0)
    assert error.value.reason == "bad_plain_record"
