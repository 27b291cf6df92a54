"""The packing plans of a split, cached on disk beside the data (or under --data-cache-path).

Planning is the slow part of building a dataset (about 40 s per epoch at 33 M samples, on every
rank, every run), and its result depends only on the split's sample lengths and a few settings:
the PlanKey. So the plans are computed once, by global rank 0 while the other ranks wait at a
barrier (as megatron-core's dataset builders do), and read afterwards.

An entry is NAME.KEY.json (the key, counts, and its chunks: per chunk its first epoch, each epoch's
sequence count and the SHA-256 of its arrays) plus per chunk NAME.KEY.eF-L.order.npy and
NAME.KEY.eF-L.offsets.npy: epochs F..L, their orders and their offsets concatenated (every epoch
holds each fitting sample once, so epoch e's order is the e-th slice of `fits` items; its offsets
follow from the sequence counts). A write adds one chunk per MAX_CHUNK_ITEMS items of new epochs,
each file written atomically, the header last, so a small dataset repeated for tens of thousands
of epochs is a few files, not two per epoch for every rank to open at every start. A chunk's name
fixes its content (epochs are planned deterministically), so concurrent writers only ever replace
a file by an identical one. Epochs are independent (epoch e is shuffled by [seed, stream, e]), so
a run that needs more of them plans only the missing ones and one that needs fewer reads only the
chunks that hold the first few.
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
FORMAT = "megatron_eve.plan_cache/2"  # /1 (two files per epoch) is not read: its entries are planned again
MAX_CHUNK_ITEMS = 1 << 24  # order + offsets items per chunk file (64 MiB as int32), one epoch at least
_unwritable_warned = set()  # directories already warned about, one line per run each


@dataclass(frozen=True)
class PlanKey:
    """Everything a split's plans depend on. Equal keys give bit-identical plans."""

    split: str
    first: int  # the split's sample range [first, last) in its prefix
    last: int
    lengths_sha256: str  # of the split's sample lengths (little-endian int64): the data's content
    seed: int  # --seed
    stream_seed: int  # the split's shuffle stream (dataset.content_stream: from its content)
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
    a miss); a damaged file is warned about and its chunk and those after it are left out."""
    fits = int((lengths <= key.seq_length).sum())
    fresh = {"format": FORMAT, "key": asdict(key), "samples": len(lengths), "fits": fits,
             "too_long": len(lengths) - fits, "chunks": []}
    path = entry + ".json"
    if not os.path.exists(path):
        return [], fresh
    plans, chunks = [], []
    try:
        header = _header(path, fresh)
        for chunk in header["chunks"]:
            if plans and (minimum is None or sum(len(p) for p in plans) >= minimum):
                break  # enough epochs read
            if chunk["first"] != len(plans):
                raise ValueError(f"a chunk starts at epoch {chunk['first']}, not {len(plans)}")
            arrays = []
            for part in ("order", "offsets"):
                path = _chunk_path(entry, chunk, part)  # named in the warning when it is the damaged one
                arrays.append(_load(path, chunk.get(f"{part}_sha256")))
            path = _chunk_path(entry, chunk, "{order,offsets}")
            plans += _epochs(*arrays, chunk["sequences"], lengths, key, fits)
            chunks.append(chunk)
    except ValueError as error:
        logger.warning("packing-plan cache %s: %s; planning again", path, error)
    # What a write keeps: the header's entries of the chunks read and found sound.
    return plans[: epochs_needed([len(p) for p in plans], minimum)], {**fresh, "chunks": chunks}


def _header(path: str, fresh: dict) -> dict:
    """The header at `path`, if it is one for this key and these counts."""
    try:
        with open(path, encoding="utf-8") as handle:
            header = json.load(handle)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"unreadable ({error})") from None
    if not isinstance(header, dict) or {k: header.get(k) for k in fresh if k != "chunks"} != {
            k: v for k, v in fresh.items() if k != "chunks"}:
        raise ValueError("its key or counts differ from this split's")
    chunks = header.get("chunks")
    if not isinstance(chunks, list) or not all(_is_chunk(c) for c in chunks):
        raise ValueError("no valid list of chunks")
    return header


def _is_chunk(chunk) -> bool:
    return (isinstance(chunk, dict) and isinstance(chunk.get("first"), int) and isinstance(chunk.get("sequences"), list)
            and len(chunk["sequences"]) > 0 and all(isinstance(n, int) and n > 0 for n in chunk["sequences"]))


def _chunk_path(entry: str, chunk: dict, part: str) -> str:
    return f"{entry}.e{chunk['first']}-{chunk['first'] + len(chunk['sequences']) - 1}.{part}.npy"


def _epochs(order: np.ndarray, offsets: np.ndarray, sequences: List[int], lengths: np.ndarray, key: PlanKey,
            fits: int) -> List[PackingPlan]:
    """A chunk's arrays as its epochs' plans, each checked (`_checked`)."""
    if len(order) != fits * len(sequences) or len(offsets) != sum(sequences) + len(sequences):
        raise ValueError(f"{len(order)} and {len(offsets)} items do not hold {len(sequences)} epochs of {fits} "
                         "samples")
    bounds = np.cumsum([0] + [n + 1 for n in sequences])
    return [_checked(order[e * fits: (e + 1) * fits], offsets[bounds[e]: bounds[e + 1]], n, lengths, key, fits)
            for e, n in enumerate(sequences)]


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
    """Epochs from `start` on, in chunks, then the header that lists them: a reader never sees a
    header whose chunks are not all in place."""
    dtype = np.int32 if len(lengths) < 2**31 else np.int64  # indices and offsets are < len(lengths)
    chunks = list(header["chunks"])
    for first, last in _chunk_bounds([len(p.order) + len(p) + 1 for p in plans], start):
        chunk = {"first": first, "sequences": [len(p) for p in plans[first:last]]}
        for part in ("order", "offsets"):
            array = np.concatenate([getattr(p, part) for p in plans[first:last]]).astype(dtype)
            with replacing(_chunk_path(entry, chunk, part), "wb") as handle:
                np.save(handle, array, allow_pickle=False)
            chunk[f"{part}_sha256"] = hashlib.sha256(array.data).hexdigest()
        chunks.append(chunk)
    write_text(entry + ".json", json.dumps({**header, "chunks": chunks}, indent=1, sort_keys=True))


def _chunk_bounds(items: List[int], start: int) -> List[Tuple[int, int]]:
    """[first, last) epoch ranges from `start` on, each of at most MAX_CHUNK_ITEMS items (at least
    one epoch)."""
    bounds, first, size = [], start, 0
    for epoch in range(start, len(items)):
        if epoch > first and size + items[epoch] > MAX_CHUNK_ITEMS:
            bounds.append((first, epoch))
            first, size = epoch, 0
        size += items[epoch]
    if first < len(items):
        bounds.append((first, len(items)))
    return bounds
