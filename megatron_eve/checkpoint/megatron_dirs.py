"""Megatron-LM's checkpoint directory layout for converter outputs, and small CLI helpers."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch

from megatron_eve.training.checkpoint import TRACKER, checkpoint_dir


def parse_dtype(name: str) -> torch.dtype:
    dtypes = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
              "float32": torch.float32, "fp32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}: choose one of {', '.join(dtypes)}")
    return dtypes[name]


def finish_checkpoint(root: str, write: Callable[[str], None], plan: Sequence = ()) -> str:
    """Write ROOT/iter_0000000 with `write`, then mark it latest (only once it is complete)."""
    from tqdm import tqdm

    os.makedirs(root, exist_ok=True)
    directory = checkpoint_dir(root, 0)
    chunks = sum(len(t.chunks) for t in plan)
    with tqdm(total=chunks, desc="converting", unit="chunk") as bar:
        for tensor in plan:  # count chunks as the writer makes them
            tensor.chunks = [(offsets, _counted(make, bar)) for offsets, make in tensor.chunks]
        write(directory)
    marker = os.path.join(root, TRACKER)
    with open(marker + ".tmp", "w") as handle:
        handle.write("0")
    os.replace(marker + ".tmp", marker)
    return directory


def _counted(make, bar):
    def wrapped():
        out = make()
        bar.update(1)
        return out
    return wrapped
