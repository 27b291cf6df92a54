"""The packing plans of a split, cached on disk beside the data (or under --data-cache-path).

Planning is the slow part of building a dataset (about 40 s per epoch at 33 M samples, on every
rank, every run), and its result depends only on the split's sample lengths and a few settings:
the PlanKey. So the plans are computed once, by global rank 0 while the other ranks wait at a
barrier (as megatron-core's dataset builders do), and read afterwards.

An entry is NAME.KEY.json (the key, counts, and per epoch its sequence count and the SHA-256 of its
arrays) plus NAME.KEY.eE.order.npy and NAME.KEY.eE.offsets.npy per epoch, each written atomically,
the header last. Epochs are independent (epoch e is shuffled by [seed, stream, e]), so a run that
needs more of them plans only the missing ones and one that needs fewer reads only the first few.
A read trusts nothing: arrays load without pickle, their digests, shapes and dtypes are checked,
and each epoch must hold every sample that fits exactly once in sequences no longer than
seq_length. Anything wrong is warned about (naming the file) and planned again; a place that cannot
be written means planning without a cache, with one warning naming it. The cache never fails a run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import numpy as np

from megatron_eve.atomic import replacing, write_text
from megatron_eve.data.packing import PackingPlan, epochs_needed, plan_epochs

logger = logging.getLogger(__name__)
FORMAT = "megatron_eve.plan_cache/1"
_unwritable_warned = set()  # directories already warned about, one line per run each


@dataclass(frozen=True)
class PlanKey:
    """Everything a split's plans depend on. Equal keys give bit-identical plans."""

    split: str
    first: int  # the split's sample range [first, last) in its prefix
    last: int
    lengths_sha256: str  # of the split's sample lengths (little-endian int64): the data's content
    seed: int  # --seed
    stream_seed: int  # from the prefix and split names
    seq_length: int
    pack: bool
    packing_buffer_size: int  # 0 without packing, where it plays no part

    @property
    def buffer_size(self) -> Optional[int]:
        return self.packing_buffer_size if self.pack else None

    def digest(self) -> str:
        return hashlib.sha256(json.dumps({"format": FORMAT, **asdict(self)}, sort_keys=True).encode()).hexdigest()


def lengths_sha256(lengths: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(lengths, dtype="<i8").data).hexdigest()


def cached_plans(lengths: np.ndarray, key: PlanKey, minimum: Optional[int], directory: str,
                 name: str) -> List[PackingPlan]:
    """The plans `plan_epochs` gives for `minimum`, read from DIRECTORY/NAME.* when there and sound;
    otherwise planned (by global rank 0 when distributed) and written there."""
    import torch.distributed as dist

    entry = os.path.join(directory, f"{name}.{key.digest()[:16]}")
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return _read_or_plan(entry, lengths, key, minimum, write=True)
    # Every rank builds every split's datasets, so every rank meets this barrier equally often.
    # Ranks that cannot read what rank 0 wrote (it could not write, or another file system) plan.
    plans = _read_or_plan(entry, lengths, key, minimum, write=True) if dist.get_rank() == 0 else None
    dist.barrier()
    return plans if plans is not None else _read_or_plan(entry, lengths, key, minimum, write=False)


def _read_or_plan(entry: str, lengths: np.ndarray, key: PlanKey, minimum: Optional[int],
                  write: bool) -> List[PackingPlan]:
    cached, header = _read(entry, lengths, key, minimum)
    plans = plan_epochs(lengths, key.seq_length, key.buffer_size, (key.seed, key.stream_seed), minimum, cached)
    logger.info("packing plans %s: %d epoch(s) read, %d planned", entry, len(cached), len(plans) - len(cached))
    if write and len(plans) > len(cached):
        try:
            _write(entry, plans, len(cached), header, key, lengths)
        except OSError as error:
            directory = os.path.dirname(entry) or "."
            if directory not in _unwritable_warned:
                _unwritable_warned.add(directory)
                logger.warning("packing-plan cache %s cannot be written (%s): planning without a cache "
                               "(--data-cache-path DIR puts it elsewhere)", directory, error.strerror or error)
    return plans


def _read(entry: str, lengths: np.ndarray, key: PlanKey, minimum: Optional[int]
          ) -> Tuple[List[PackingPlan], dict]:
    """The sound epochs the cache holds, as many as `minimum` needs, and the header (an empty one on
    a miss); a damaged file is warned about and it and the epochs after it are left out."""
    fits = int((lengths <= key.seq_length).sum())
    fresh = {"format": FORMAT, "key": asdict(key), "samples": len(lengths), "fits": fits,
             "too_long": len(lengths) - fits, "epochs": []}
    path = entry + ".json"
    if not os.path.exists(path):
        return [], fresh
    plans = []
    try:
        try:
            with open(path, encoding="utf-8") as handle:
                header = json.load(handle)
        except (OSError, ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"unreadable ({error})") from None
        if not isinstance(header, dict) or {k: header.get(k) for k in fresh if k != "epochs"} != {
                k: v for k, v in fresh.items() if k != "epochs"}:
            raise ValueError("its key or counts differ from this split's")
        epochs = header.get("epochs")
        if not isinstance(epochs, list) or not all(
                isinstance(e, dict) and isinstance(e.get("sequences"), int) for e in epochs):
            raise ValueError("no valid list of epochs")
        for index in range(epochs_needed([e["sequences"] for e in epochs], minimum)):
            path = f"{entry}.e{index}.order.npy"  # named in the warning when it is the damaged one
            order = _load(path, epochs[index].get("order_sha256"))
            path = f"{entry}.e{index}.offsets.npy"
            offsets = _load(path, epochs[index].get("offsets_sha256"))
            path = f"{entry}.e{index}.{{order,offsets}}.npy"
            plans.append(_checked(order, offsets, epochs[index]["sequences"], lengths, key, fits))
    except ValueError as error:
        logger.warning("packing-plan cache %s: %s; planning again", path, error)
    # What a write keeps: the header's entries of the epochs read and found sound.
    return plans, {**fresh, "epochs": epochs[: len(plans)] if plans else []}


def _load(path: str, sha256: Optional[str]) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)  # never unpickle what is read
    except Exception as error:  # noqa: BLE001 - whatever a damaged file raises, it is only a miss
        raise ValueError(f"unreadable ({type(error).__name__}: {error})") from None
    if array.dtype not in (np.int32, np.int64) or array.ndim != 1:
        raise ValueError(f"holds {array.dtype} [{array.shape}], not a 1-D int32/int64 array")
    if hashlib.sha256(np.ascontiguousarray(array).data).hexdigest() != sha256:
        raise ValueError("its content does not match the checksum in its header")
    return array


def _checked(order: np.ndarray, offsets: np.ndarray, sequences: int, lengths: np.ndarray, key: PlanKey,
             fits: int) -> PackingPlan:
    """An epoch's arrays as a plan, if they are one: every sample that fits exactly once, in
    non-empty sequences of at most seq_length positions (one sample each without packing)."""
    order, offsets = order.astype(np.int64), offsets.astype(np.int64)  # as planned; numpy indexes with int64
    if len(offsets) != sequences + 1 or sequences < 1 or offsets[0] != 0 or offsets[-1] != len(order):
        raise ValueError(f"offsets of {len(offsets)} items do not bound {sequences} sequences of {len(order)} samples")
    sizes = np.diff(offsets)
    if sizes.min() < 1 or (not key.pack and sizes.max() != 1):
        raise ValueError("a sequence is empty" if sizes.min() < 1 else "a sequence holds several samples unpacked")
    if len(order) != fits or order.min() < 0 or order.max() >= len(lengths):
        raise ValueError(f"{len(order)} samples in the plan, {fits} fit; or an index outside the split")
    fit = lengths <= key.seq_length
    seen = np.zeros(len(lengths), dtype=bool)
    seen[order] = True  # with len(order) == fits: all fitting samples seen means each exactly once
    if not np.array_equal(seen, fit):
        raise ValueError("a sample is planned twice, or one that fits is missing, or one that does not fit is in")
    if np.add.reduceat(lengths[order], offsets[:-1]).max() > key.seq_length:
        raise ValueError(f"a sequence is longer than seq-length {key.seq_length}")
    return PackingPlan(offsets, order, len(lengths) - fits)


def _write(entry: str, plans: List[PackingPlan], start: int, header: dict, key: PlanKey,
           lengths: np.ndarray) -> None:
    """Epochs from `start` on, then the header that lists them: a reader never sees a header whose
    epochs are not all in place."""
    dtype = np.int32 if len(lengths) < 2**31 else np.int64  # indices and offsets are < len(lengths)
    epochs = list(header["epochs"][:start])
    for index in range(start, len(plans)):
        digests = {}
        for part in ("order", "offsets"):
            array = getattr(plans[index], part).astype(dtype)
            with replacing(f"{entry}.e{index}.{part}.npy", "wb") as handle:
                np.save(handle, array, allow_pickle=False)
            digests[f"{part}_sha256"] = hashlib.sha256(array.data).hexdigest()
        epochs.append({"sequences": len(plans[index]), **digests})
    write_text(entry + ".json", json.dumps({**header, "epochs": epochs}, indent=1, sort_keys=True))
