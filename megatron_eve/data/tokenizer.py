"""The Llama / Vicuna SentencePiece tokenizer, with the reference's (legacy) text semantics.

EVE tokenizes with transformers' slow LlamaTokenizer (legacy=True): special-token strings in the
text ("<s>", "</s>", "<unk>") are split out first, and every remaining chunk is encoded on its
own, so each chunk gets SentencePiece's dummy "▁" prefix ("</s>USER" → "</s> ▁USER").
`encode` reproduces that with sentencepiece alone.
"""

from __future__ import annotations

import hashlib
import os
import re
from functools import cached_property
from typing import Iterable, List

from megatron_eve.config import ConfigError

BOS_ID, EOS_ID, UNK_ID = 1, 2, 0


class TokenizerError(ConfigError, OSError):
    """A tokenizer model that is missing, unreadable or not SentencePiece: one line naming it. Also an
    OSError: preprocess_data and training's checks report unreadable inputs by that type."""


class Tokenizer:
    def __init__(self, path: str, flag: str = "--tokenizer-model"):
        """`flag`: what gave `path` (the tools' --tokenizer-model, or --hf), named by a TokenizerError."""
        import sentencepiece as spm

        try:
            self.model_path = resolve_tokenizer_model(path)
        except FileNotFoundError:
            where = "a folder without tokenizer.model" if os.path.isdir(path) else "no such file or folder"
            raise TokenizerError(f"{flag} {path}: {where} (pass a SentencePiece tokenizer.model, or a Hugging "
                                 "Face folder holding one)") from None
        try:  # sentencepiece reports an unreadable file as PERMISSION_DENIED, without saying which
            with open(self.model_path, "rb") as handle:
                handle.read(1)
        except OSError as error:
            raise TokenizerError(f"{flag} {self.model_path}: cannot be read ({error.strerror or error})") from None
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.model_path)
        except RuntimeError as error:  # "could not parse ModelProto", "unk is not defined." (an empty file), ...
            raise TokenizerError(f"{flag} {self.model_path}: not a SentencePiece model ({error})") from None
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.pad_id = self.unk_id  # EVE: pad_token = unk_token (id 0)
        specials = {self.sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id, self.unk_id) if i >= 0}
        self._specials = specials
        self._split = re.compile("(" + "|".join(map(re.escape, specials)) + ")")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @cached_property
    def checksum(self) -> str:
        with open(self.model_path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()

    def encode(self, text: str, bos: bool = False) -> List[int]:
        """Slow-LlamaTokenizer(legacy=True) semantics: specials split out, chunks encoded alone."""
        ids = [self.bos_id] if bos else []
        for chunk in self._split.split(text):
            if chunk in self._specials:
                ids.append(self._specials[chunk])
            elif chunk:
                ids.extend(self.sp.encode(chunk))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids if i >= 0])


def resolve_tokenizer_model(path: str) -> str:
    """A tokenizer.model file, or an HF folder holding one."""
    candidate = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else path
    if not os.path.isfile(candidate):
        raise FileNotFoundError(
            f"no SentencePiece tokenizer at {path!r}: pass a tokenizer.model file or a Hugging Face "
            "folder that contains one"
        )
    return candidate


def train_tokenizer(texts: Iterable[str], model_prefix: str, vocab_size: int) -> str:
    """Train a Llama-style SentencePiece BPE model (byte fallback, digits split, no text
    normalisation, ids unk 0 / bos 1 / eos 2) — for tests and the quick-start corpus."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,  # a small corpus may support fewer pieces: vocab_size is a ceiling
        minloglevel=2,
    )
    return model_prefix + ".model"
