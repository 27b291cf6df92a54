"""Writing HF folders a shard at a time: safetensors (default) or `.bin` shards like the EVE
release, with the index transformers expects, and the tokenizer files."""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Dict, Iterable, List, Tuple

import torch

from megatron_eve.atomic import give_default_mode, named_write_errors
from megatron_eve.config import ConfigError
from megatron_eve.data.tokenizer import BOS_ID, EOS_ID, resolve_tokenizer_model

# The names ShardWriter and copy_tokenizer give their files (an earlier export is recognised by them).
WEIGHT_NAME = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|pytorch_model(-\d{5}-of-\d{5})?\.bin"
                         r"|model\.safetensors\.index\.json|pytorch_model\.bin\.index\.json")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def is_written_name(name: str) -> bool:
    """Whether write_tensors or copy_tokenizer writes a file of this name."""
    return name in TOKENIZER_FILES or WEIGHT_NAME.fullmatch(name) is not None


class ShardWriter:
    """Collects tensors until a shard is full, writes it, and forgets it."""

    def __init__(self, folder: str, fmt: str = "safetensors", max_shard_bytes: int = 5 << 30):
        if fmt not in ("safetensors", "bin"):
            raise ValueError(f"unknown weight format {fmt!r}: choose safetensors or bin")
        self.folder, self.fmt, self.max_shard_bytes = folder, fmt, max_shard_bytes
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: List[List[str]] = []
        self.total_bytes = 0
        os.makedirs(folder, exist_ok=True)

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = os.path.join(self.folder, f"shard-{len(self.shards):05d}.tmp")
        with named_write_errors(path):  # a full disk: SafetensorError / torch's RuntimeError otherwise
            if self.fmt == "safetensors":
                from safetensors.torch import save_file

                save_file(self.pending, path, metadata={"format": "pt"})
                give_default_mode(path)  # save_file creates it 0600: unreadable to the export's other users
            else:
                torch.save(self.pending, path)
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Name the shards "...-0000k-of-0000N" and write the index (a lone shard gets no index)."""
        if self.pending:
            self._flush()
        count = len(self.shards)
        stem, ext = ("model", "safetensors") if self.fmt == "safetensors" else ("pytorch_model", "bin")
        weight_map = {}
        for index, keys in enumerate(self.shards):
            name = f"{stem}.{ext}" if count == 1 else f"{stem}-{index + 1:05d}-of-{count:05d}.{ext}"
            os.replace(os.path.join(self.folder, f"shard-{index:05d}.tmp"), os.path.join(self.folder, name))
            weight_map.update({key: name for key in keys})
        if count > 1:
            with open(os.path.join(self.folder, f"{stem}.{ext}.index.json"), "w") as handle:
                json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, handle, indent=2)


def write_tensors(folder: str, tensors: Iterable[Tuple[str, torch.Tensor]], fmt: str, max_shard_bytes: int,
                  progress: bool = True) -> None:
    from tqdm import tqdm

    writer = ShardWriter(folder, fmt, max_shard_bytes)
    for key, tensor in tqdm(tensors, desc="writing", unit="tensor", disable=not progress):
        writer.add(key, tensor)
    writer.close()


def check_tokenizer(source: str, vocab_size: int) -> str:
    """The tokenizer.model of `source` (a file or an HF folder), loaded to check that it is a
    SentencePiece model the export can generate with: ids no larger than the model's vocabulary
    (the unpadded one config.json states; fewer is fine: the rest are never produced) and EVE's
    BOS / EOS ids, which config.json and generation_config.json state. One line naming the file if not."""
    from megatron_eve.data.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer(source)
    except ConfigError:  # already one line naming --tokenizer-model and the file
        raise
    except Exception as error:  # noqa: BLE001 — sentencepiece raises RuntimeError, OSError, ...
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"--tokenizer-model {source}: not a SentencePiece tokenizer ({detail})") from None
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"--tokenizer-model {tokenizer.model_path} has {tokenizer.vocab_size} tokens, more than "
                          f"the model's vocabulary of {vocab_size}: not the tokenizer this checkpoint was trained with")
    if (tokenizer.bos_id, tokenizer.eos_id) != (BOS_ID, EOS_ID):
        raise ConfigError(f"--tokenizer-model {tokenizer.model_path}: its BOS / EOS ids are {tokenizer.bos_id} / "
                          f"{tokenizer.eos_id}, not EVE's {BOS_ID} / {EOS_ID}: not a Llama / Vicuna tokenizer")
    return tokenizer.model_path


def generation_config(model_vocab_size: int, tokenizer_vocab_size: int) -> dict:
    """generation_config.json: EVE's special ids, greedy. The ids of a vocabulary padded beyond the
    tokenizer's have no text: suppressed (as our HF backend suppresses them), written only when there are such."""
    config = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": 0, "do_sample": False}
    if model_vocab_size > tokenizer_vocab_size:
        config["suppress_tokens"] = list(range(tokenizer_vocab_size, model_vocab_size))
    return config


def copy_tokenizer(source: str, folder: str, model_max_length: int) -> None:
    """tokenizer.model plus the slow-Llama tokenizer settings EVE trains with (legacy, BOS added,
    pad = unk, model_max_length: the model's positions); an HF folder's own tokenizer files are
    copied as they are."""
    model = resolve_tokenizer_model(source)
    shutil.copyfile(model, os.path.join(folder, "tokenizer.model"))
    source_dir = source if os.path.isdir(source) else os.path.dirname(model)
    copied = False
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(source_dir, name)
        if os.path.isdir(source) and os.path.isfile(path):
            shutil.copyfile(path, os.path.join(folder, name))
            copied = True
    if not copied:
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as handle:
            json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True,
                       "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                       "pad_token": "<unk>", "padding_side": "right", "model_max_length": model_max_length}, handle,
                      indent=2)
        with open(os.path.join(folder, "special_tokens_map.json"), "w") as handle:
            json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}, handle,
                      indent=2)
