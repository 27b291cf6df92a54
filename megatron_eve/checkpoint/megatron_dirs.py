"""Megatron-LM's checkpoint directory layout for converter outputs, and small CLI helpers."""

from __future__ import annotations

import os
import re
from dataclasses import asdict
from typing import Callable, Iterable, Optional, Sequence, Tuple

import torch

from megatron_eve.atomic import (ASIDE_MARK, check_apart_from_inputs, check_output_dir, recover_replaced, staged_directory,
                                  write_text)
from megatron_eve.config import ConfigError, EVEModelConfig, ParallelConfig, RuntimeConfig, validate
from megatron_eve.training.checkpoint_records import TRACKER, checkpoint_dir


def parse_dtype(name: str) -> torch.dtype:
    dtypes = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
              "float32": torch.float32, "fp32": torch.float32}
    if name not in dtypes:
        raise ConfigError(f"--dtype {name!r} is not one of {', '.join(dtypes)}")
    return dtypes[name]


def finish_checkpoint(root: str, write: Callable[[str], None], plan: Sequence = (), progress: bool = True) -> str:
    """Write ROOT/iter_0000000 with `write`, then mark it latest (only once it is complete);
    progress: a bar counting the chunks written."""
    from tqdm import tqdm

    os.makedirs(root, exist_ok=True)
    directory = checkpoint_dir(root, 0)
    chunks = sum(len(t.chunks) for t in plan)
    with tqdm(total=chunks, desc="converting", unit="chunk", disable=not progress) as bar:
        for tensor in plan:  # count chunks as the writer makes them
            tensor.chunks = [(offsets, _counted(make, bar)) for offsets, make in tensor.chunks]
        write(directory)
    write_text(os.path.join(root, TRACKER), "0")
    return directory


def _counted(make, bar):
    def wrapped():
        out = make()
        bar.update(1)
        return out
    return wrapped


# What an interrupted conversion of ours leaves in its root (this version writes a new root beside
# it; earlier ones wrote iter_0000000 in place): anything else there may be someone's own.
CONVERSION_LEFTOVER = re.compile(r"iter_0000000(\.tmp|\.replaced|" + re.escape(ASIDE_MARK) + r"(\.\d+)?)"
                                 r"|" + re.escape(TRACKER) + r"\.tmp\d+")


def is_converted_root(root: str) -> bool:
    """A checkpoint root as our converters write it: iter_0000000 (made from HF weights) and the
    marker, nothing else (a training run's root has later iterations)."""
    names = {name for name in os.listdir(root) if CONVERSION_LEFTOVER.fullmatch(name) is None}
    if not names:
        return True  # nothing, or only what an interrupted conversion left
    if names != {"iter_0000000", TRACKER}:
        return False
    from megatron.core import dist_checkpointing

    try:
        return "converted_from" in dist_checkpointing.load_common_state_dict(checkpoint_dir(root, 0))
    except Exception:  # noqa: BLE001 — unreadable: not provably ours
        return False


def write_megatron(hf, model: EVEModelConfig, root: str, tensor_parallel: int, pipeline_parallel: int,
                   dtype: Optional[str],
                   need_vision: bool, extra: Iterable[Tuple[str, torch.Tensor]] = (),
                   overwrite: bool = False, progress: bool = True) -> Tuple[str, int]:
    """HF tensors (+ `extra` made ones) → a new ROOT holding iter_0000000 and the marker, after
    every check that can fail: the output is free (or our own earlier conversion, or `overwrite`),
    the model fits the target layout, no tensor is unknown, missing or of the wrong shape."""
    from megatron_eve.checkpoint.dcp_writer import write_checkpoint
    from megatron_eve.checkpoint.hf_eve import check_keys, check_padded_vocab, check_shapes, megatron_plan

    # First, whatever `overwrite` says: a --out that is, holds or lies inside --hf would delete it or write into it.
    check_apart_from_inputs(root, [("--hf", hf.folder)], "--out")
    recover_replaced(root, legacy=False)  # a conversion killed between its two renames
    check_output_dir(root, is_converted_root, overwrite, "an earlier conversion (a training run's checkpoints?)")
    validate(model, ParallelConfig(tensor_parallel, pipeline_parallel), RuntimeConfig())
    check_keys(hf, model, need_vision=need_vision)
    check_shapes(hf, model)
    padded = check_padded_vocab(model, tensor_parallel)
    # The source's own dtype unless asked otherwise: a bf16 release stays bf16, fp32 is not rounded.
    stored = parse_dtype(dtype) if dtype else hf.dtype("model.embed_tokens.weight")
    plan = megatron_plan(hf, model, padded, stored, extra=extra)
    common = {"converted_from": os.path.abspath(hf.folder), "model_config": asdict(model)}
    # A whole new root, written beside --out and swapped in: an old root's other iterations never
    # outlive it next to a marker that names the new one.
    with staged_directory(root) as staging:
        finish_checkpoint(staging, lambda d: write_checkpoint(d, plan, common), plan, progress)
    return checkpoint_dir(root, 0), len(plan)
