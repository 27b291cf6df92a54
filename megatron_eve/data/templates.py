"""Conversation templates → token ids and labels, exactly as EVE builds them (eve.md §4).

`plain` (prealign / pretrain captions): "<image>" + caption + "\\n"; BOS and the image are masked.
`vicuna_v1` (SFT): system + " USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>";
the instruction of every round is masked by the reference's round arithmetic (LLaVA-1.5's
preprocess_v1), so masks match the reference token for token, quirks included.

Images appear as one IMAGE_TOKEN_INDEX placeholder per image here; the preprocessing step expands
each into its 1 + h(w+1) positions once the image size is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

from megatron_eve.data.tokenizer import Tokenizer
from megatron_eve.model.visual_layout import IGNORE_INDEX, IMAGE_TOKEN_INDEX

IMAGE_PLACEHOLDER = "<image>"
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = {"human": "USER", "gpt": "ASSISTANT"}
TEMPLATES = ("plain", "vicuna_v1")


class TemplateError(ValueError):
    """A record the template cannot express; `reason` is a short machine-readable category."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class Tokenized:
    tokens: List[int]  # BOS first, IMAGE_TOKEN_INDEX once per image
    labels: List[int]  # same length; IGNORE_INDEX where no loss


def tokenize_with_images(prompt: str, tokenizer: Tokenizer) -> List[int]:
    """The reference's tokenizer_image_token: chunks around "<image>" encoded separately, one BOS."""
    chunks = prompt.split(IMAGE_PLACEHOLDER)
    ids = tokenizer.encode(chunks[0], bos=True)
    for chunk in chunks[1:]:
        ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(tokenizer.encode(chunk))
    return ids


def _turns(conversations: Sequence[Dict]) -> List[Dict[str, str]]:
    if not conversations:
        raise TemplateError("empty_conversation", "the record has no conversation turns")
    turns = []
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise TemplateError("malformed_turn", f"turn {index} lacks a string 'value'")
        if turn.get("from") not in ROLES:
            raise TemplateError("unknown_role", f"turn {index} is from {turn.get('from')!r}")
        turns.append({"from": turn["from"], "value": turn["value"]})
    return turns


def _move_image_to_front(turns: List[Dict[str, str]], num_images: int) -> None:
    """The reference's preprocess_multimodal: a turn holding <image> becomes "<image>\\n" + text.
    With several images (beyond EVE, which allows one) placeholders stay where they are."""
    if num_images != 1:
        return
    for turn in turns:
        if IMAGE_PLACEHOLDER in turn["value"]:
            text = turn["value"].replace(IMAGE_PLACEHOLDER, "").strip()
            turn["value"] = (IMAGE_PLACEHOLDER + "\n" + text).strip()


def plain(conversations: Sequence[Dict], tokenizer: Tokenizer, num_images: int) -> Tokenized:
    turns = _turns(conversations)
    if len(turns) != 2 or IMAGE_PLACEHOLDER not in turns[0]["value"]:
        raise TemplateError(
            "bad_plain_record", "the plain template needs 2 turns with <image> in the first"
        )
    _move_image_to_front(turns, num_images)
    tokens = tokenize_with_images(IMAGE_PLACEHOLDER + turns[1]["value"] + "\n", tokenizer)
    masked = len(tokenize_with_images(IMAGE_PLACEHOLDER, tokenizer))  # BOS + image
    return Tokenized(tokens, [IGNORE_INDEX] * masked + tokens[masked:])


def vicuna_v1(conversations: Sequence[Dict], tokenizer: Tokenizer, num_images: int) -> Tokenized:
    turns = _turns(conversations)
    _move_image_to_front(turns, num_images)
    if turns[0]["from"] != "human":  # the reference drops a leading assistant turn
        turns = turns[1:]
    if not turns:
        raise TemplateError("empty_conversation", "no turns left after the leading gpt turn")
    prompt = VICUNA_SYSTEM + " "
    for index, turn in enumerate(turns):
        role = ROLES[turn["from"]]
        if role != ("USER", "ASSISTANT")[index % 2]:
            raise TemplateError("roles_not_alternating", f"turn {index} is a second {role} turn")
        if turn["value"]:
            prompt += role + ": " + turn["value"] + (" " if index % 2 == 0 else "</s>")
        else:
            prompt += role + ":"

    tokens = tokenize_with_images(prompt, tokenizer)
    labels = list(tokens)
    separator = " ASSISTANT: "
    labels[0] = IGNORE_INDEX
    position = 1
    for round_text in prompt.split("</s>"):
        if round_text == "":
            break
        parts = round_text.split(separator)
        if len(parts) != 2:
            break
        # len(tok(round)) counts BOS in place of the round's </s>; the instruction's trailing
        # "▁" merges into the answer's first piece in the full text, hence the - 2.
        round_len = len(tokenize_with_images(round_text, tokenizer))
        instruction_len = len(tokenize_with_images(parts[0] + separator, tokenizer)) - 2
        end = min(position + instruction_len, len(labels))
        labels[position:end] = [IGNORE_INDEX] * max(end - position, 0)
        position += round_len
    labels[position:] = [IGNORE_INDEX] * max(len(labels) - position, 0)
    non_pad = sum(1 for t in tokens if t != tokenizer.pad_id)
    if position != non_pad:
        raise TemplateError(
            "tokenization_mismatch",
            f"round arithmetic covers {position} tokens of {non_pad} (the reference masks the "
            "whole sample and prints 'tokenization mismatch')",
        )
    return Tokenized(tokens, labels)


def apply_template(name: str, conversations: Sequence[Dict], tokenizer: Tokenizer, num_images: int) -> Tokenized:
    if name == "plain":
        return plain(conversations, tokenizer, num_images)
    if name == "vicuna_v1":
        return vicuna_v1(conversations, tokenizer, num_images)
    raise ValueError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}")
