"""EVE samples in megatron-core's IndexedDataset (multimodal mode): PREFIX.bin / PREFIX.idx, plus a
JSON sidecar PREFIX.meta.json (template, image geometry, tokenizer checksum, counts).

One document per sample, its items in this order (int32 items; the mode says what each is):
  TOKENS   tokens, placeholders expanded (IMAGE_TOKEN_INDEX on every visual position)
  LABELS   labels aligned with TOKENS (unshifted), IGNORE_INDEX where no loss
  IMAGE    one per image: the encoded PEL-view crop, bytes packed into int32 behind a pad count
  TEACHER  one per image: the encoded teacher-view crop, same packing
  ID       the record's id, UTF-8, same packing
The TOKENS item's length is the sample's length in the model, so packing reads only the .idx.

This module reads the format; megatron_eve.data.indexed_writer writes it, atomically
(megatron_eve.data.prefix_swap: no mix of old and new files ever reads as complete). The sidecar
records the sizes of .bin and .idx; a reader refuses a prefix without a sidecar, or whose files have
other sizes (truncated or replaced), or whose counts differ from the index, or whose index does not
describe its .bin (check_index: one of the same size from another run, or damaged); it finishes a
replacement killed between its renames (finish_swap) first.
"""

from __future__ import annotations

import glob
import io
import json
import os
import struct
from typing import Dict

import numpy as np

from megatron_eve.data.prefix_swap import SIDECAR_SUFFIX, finish_swap, staged_name
from megatron_eve.data.records import decode_image

TOKENS, IMAGE, LABELS, TEACHER, ID = 0, 1, 2, 3, 4
FORMAT = "megatron_eve.indexed/1"


class DatasetFormatError(ValueError):
    """Files that are not a complete megatron_eve indexed dataset."""


def pack_bytes(data: bytes) -> np.ndarray:
    """Bytes → int32 item: [pad count, payload padded to a multiple of 4] (Megatron's convention)."""
    pad = (-len(data)) % 4
    payload = np.frombuffer(data + b"\0" * pad, dtype=np.int32)
    return np.concatenate([np.asarray([pad], dtype=np.int32), payload])


def unpack_bytes(item: np.ndarray) -> bytes:
    pad = int(item[0])
    raw = item[1:].tobytes()
    return raw[: len(raw) - pad]


def read_metadata(prefix: str) -> Dict:
    path = prefix + SIDECAR_SUFFIX
    if not os.path.isfile(path) and os.path.isfile(staged_name(prefix, SIDECAR_SUFFIX)):
        finish_swap(prefix)  # a replacement killed between its renames: its complete staged files go in
    if not os.path.isfile(path):
        if not glob.glob(glob.escape(prefix) + ".*"):  # not even an interrupted run's .bin.tmp
            raise DatasetFormatError(f"{prefix}: no dataset there (no {prefix}.bin / .idx / {SIDECAR_SUFFIX}); "
                                     "make one with tools/preprocess_data.py --output-prefix")
        raise DatasetFormatError(
            f"{prefix}: no {SIDECAR_SUFFIX} sidecar; the dataset is incomplete (an interrupted "
            "preprocessing run?) or not made by tools/preprocess_data.py"
        )
    try:
        with open(path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:
        raise DatasetFormatError(f"{path} is not a readable sidecar ({error}); preprocess the data again") from None
    if not isinstance(meta, dict):
        raise DatasetFormatError(f"{path}: a JSON {type(meta).__name__}, not a sidecar object; "
                                 "preprocess the data again")
    if meta.get("format") != FORMAT:
        raise DatasetFormatError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    files, counts = meta.get("files", {}), meta.get("counts")
    if not isinstance(files, dict) or not isinstance(counts, dict) or not isinstance(counts.get("samples"), int):
        raise DatasetFormatError(f"{path}: no valid 'files' and 'counts' entries; preprocess the data again")
    for suffix, size in files.items():
        if not os.path.isfile(prefix + suffix):
            raise DatasetFormatError(f"{prefix}{suffix} is missing")
        actual = os.path.getsize(prefix + suffix)
        if actual != size:
            raise DatasetFormatError(f"{prefix}{suffix} holds {actual} bytes but its sidecar says {size}: "
                                     "truncated, or replaced by another run; preprocess it again")
    return meta


def dataset_complete(prefix: str) -> bool:
    try:
        read_metadata(prefix)
    except DatasetFormatError:
        return False
    return os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")


class IndexedSamples:
    """Random access to the samples of one preprocessed prefix."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.metadata = read_metadata(prefix)
        index = index_reader(prefix)
        check_index(prefix, index, self.metadata)
        if self.metadata["counts"]["samples"] == 0:
            # An empty dataset (an empty partition) has an empty .bin, which cannot be mmapped:
            # only its index is read, to check that it agrees.
            self.dataset = None
        else:
            del index  # IndexedDataset maps the file again: one mapping kept, not two
            self.dataset = _indexed_dataset(prefix)
            index = self.dataset.index
        starts = index.document_indices[:-1]
        self._starts = starts
        self._ends = index.document_indices[1:]
        # Length of each sample in the model = length of its TOKENS item.
        self.lengths = index.sequence_lengths[starts].astype(np.int64)

    def __len__(self) -> int:
        return len(self._starts)

    def get(self, index: int, pixels: bool = True, teacher: bool = True) -> Dict:
        """id, tokens / labels (int32), image_grids [(h, w)], and the decoded uint8 HWC crops asked
        for (images: PEL view, teacher_images: teacher view)."""
        start, end = int(self._starts[index]), int(self._ends[index])
        items, modes = self.dataset[start:end]
        if len(items) < 2 or modes[0] != TOKENS or modes[1] != LABELS:
            raise DatasetFormatError(f"{self.prefix}: sample {index} does not start with tokens, labels")
        images = [unpack_bytes(item) for item, mode in zip(items, modes) if mode == IMAGE]
        teachers = [unpack_bytes(item) for item, mode in zip(items, modes) if mode == TEACHER]
        cell = self.metadata["patch_size"] * self.metadata["conv_stride"]
        out = {"tokens": np.asarray(items[0]), "labels": np.asarray(items[1]),
               "id": unpack_bytes(items[-1]).decode("utf-8") if modes[-1] == ID else None}
        if pixels:
            out["images"] = [decode_image(data) for data in images]
            out["image_grids"] = [(im.shape[0] // cell, im.shape[1] // cell) for im in out["images"]]
        else:
            out["image_grids"] = [_grid_from_header(data, cell) for data in images]
        if teacher:
            out["teacher_images"] = [decode_image(data) for data in teachers]
        return out


_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count


def index_reader(prefix: str):
    """megatron-core's reader of PREFIX.idx, once its header and size say that it can read it: its own
    checks are asserts (a traceback, then noise from __del__ on the half-built reader)."""
    from megatron.core.datasets import indexed_dataset as mcore

    path = mcore.get_idx_path(prefix)

    def refuse(why: str):
        return DatasetFormatError(f"{path}: not a readable megatron index ({why}); preprocess it again")

    try:
        with open(path, "rb") as handle:
            header = handle.read(_HEADER.size)
        size = os.path.getsize(path)
    except OSError as error:
        raise refuse(error.strerror or error) from None
    if len(header) < _HEADER.size:
        raise refuse(f"{len(header)} bytes, shorter than its header")
    magic, version, code, sequences, documents = _HEADER.unpack(header)
    if magic != mcore._INDEX_HEADER or version != 1:
        raise refuse("bad header")
    if code != mcore.DType.code_from_dtype(np.int32):
        # Our items are int32: another dtype reads the .bin as something it is not.
        names = {d.value: d.name for d in mcore.DType}
        raise refuse(f"dtype {names.get(code, f'code {code}')}, not the int32 of tools/preprocess_data.py")
    # lengths (int32), pointers (int64) and modes (int8) per sequence, an int64 per document index
    expected = _HEADER.size + sequences * (4 + 8 + 1) + documents * 8
    if size != expected:
        raise refuse(f"{size} bytes, but its header's {sequences} sequences and {documents} document "
                     f"indices take {expected}")
    try:
        return mcore._IndexReader(path, multimodal=True)
    except (AssertionError, ValueError, OSError) as error:  # changed since the header was read
        raise refuse(error) from None


def _indexed_dataset(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    # Its __del__ deletes both attributes: set beforehand, a failed __init__ leaves no AttributeError noise.
    dataset = IndexedDataset.__new__(IndexedDataset)
    dataset.bin_reader = dataset.index = None
    try:
        dataset.__init__(prefix, multimodal=True)
    except (AssertionError, ValueError, OSError) as error:
        raise DatasetFormatError(f"{prefix}.idx: not a readable megatron index ({error}); preprocess it again") \
            from None
    return dataset


_CHUNK = 1 << 22  # sequences per step of the pointer check: bounded temporaries on 100M-item indexes


def check_index(prefix: str, index, meta: Dict) -> None:
    """Refuse an index that does not describe its .bin (one from another preprocessing of the same size,
    a damaged one): megatron-core reads it as it is, and a wrong one trains on empty rows. Vectorised:
    this runs at every start-up on every rank."""
    path, bin_path = prefix + ".idx", prefix + ".bin"

    def refuse(why: str):
        return DatasetFormatError(f"{path}: {why}; not the index of {bin_path} (another preprocessing's, or "
                                  "damaged); preprocess it again")

    lengths, pointers, modes = index.sequence_lengths, index.sequence_pointers, index.sequence_modes
    documents = index.document_indices
    itemsize = np.dtype(np.int32).itemsize
    if lengths.size and int(lengths.min()) < 0:
        raise refuse("negative sequence lengths")
    end = 0  # byte offset in the .bin where the next sequence starts
    for first in range(0, lengths.size, _CHUNK):
        sizes = lengths[first:first + _CHUNK].astype(np.int64) * itemsize
        ends = np.cumsum(sizes) + end
        if pointers[first] != end or not np.array_equal(pointers[first + 1:first + sizes.size], ends[:-1]):
            raise refuse("its sequence pointers are not where its sequence lengths put them")
        end = int(ends[-1])
    bin_size = os.path.getsize(bin_path)
    if end != bin_size:
        raise refuse(f"its sequences end at byte {end} of a {bin_size}-byte .bin")
    # Every sample is TOKENS, LABELS, its IMAGE / TEACHER items, ID: 3 sequences or more each.
    if (documents.size == 0 or documents[0] != 0 or documents[-1] != lengths.size
            or (documents.size > 1 and int(np.diff(documents).min()) < 3)):
        raise refuse("its document indices do not split its sequences into samples")
    counts = np.bincount(modes.view(np.uint8), minlength=ID + 1)
    if counts.size > ID + 1:
        raise refuse(f"sequence modes other than {TOKENS}..{ID}")
    starts = documents[:-1]
    if (np.any(modes[starts] != TOKENS) or np.any(modes[starts + 1] != LABELS)
            or np.any(modes[documents[1:] - 1] != ID) or not counts[TOKENS] == counts[LABELS] == starts.size):
        raise refuse("its samples are not made of tokens, labels, images, ids")
    recorded = meta["counts"]
    # What the index says of the sidecar's counts; an encoded crop takes 4 bytes an item behind its pad count.
    tokens = int(lengths[starts].sum(dtype=np.int64))
    found = {"samples": (starts.size, starts.size), "tokens": (tokens, tokens), "images": (counts[IMAGE],) * 2}
    for key, mode in (("image_bytes", IMAGE), ("teacher_bytes", TEACHER)):
        most = 4 * (int(lengths[modes == mode].sum(dtype=np.int64)) - int(counts[mode]))
        found[key] = (most - 3 * int(counts[mode]), most)
    for key, (low, high) in found.items():
        value = recorded.get(key)
        if isinstance(value, int) and not low <= value <= high:
            held = f"{low}" if low == high else f"{low}..{high}"
            raise refuse(f"it holds {held} {key.replace('_', ' ')} but its sidecar says {value}")


def _grid_from_header(data: bytes, cell: int):
    """(h, w) token grid from an encoded crop's header, without decoding its pixels."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    return height // cell, width // cell
