"""EVE samples in megatron-core's IndexedDataset (multimodal mode): PREFIX.bin / PREFIX.idx, plus a
JSON sidecar PREFIX.meta.json (template, image geometry, tokenizer checksum, counts).

One document per sample, its items in this order (int32 items; the mode says what each is):
  TOKENS   tokens, placeholders expanded (IMAGE_TOKEN_INDEX on every visual position)
  LABELS   labels aligned with TOKENS (unshifted), IGNORE_INDEX where no loss
  IMAGE    one per image: the encoded PEL-view crop, bytes packed into int32 behind a pad count
  TEACHER  one per image: the encoded teacher-view crop, same packing
  ID       the record's id, UTF-8, same packing
The TOKENS item's length is the sample's length in the model, so packing reads only the .idx.

Writing is atomic: everything goes to *.tmp names, under an exclusive lock on PREFIX.lock held while
a run writes the prefix. Once the new files are complete, the new sidecar is staged (PREFIX.meta.json.tmp,
recording their sizes): the commit. Then the old sidecar is removed and the files renamed in, the sidecar
last, so no mix of old and new files ever reads as complete; a swap killed between its renames is
finished by the next reader or writer (finish_swap) from the staged files. The sidecar records the
sizes of .bin and .idx; a reader refuses a prefix without a sidecar, or whose files have other sizes
(truncated or replaced), or whose counts differ from the index, or whose index does not describe its
.bin (check_index: one of the same size from another run, or damaged).
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import glob
import io
import json
import os
import struct
import time
from typing import Dict, Iterator, Optional, Sequence

import numpy as np

from megatron_eve.atomic import replacing
from megatron_eve.data.records import Sample, decode_image

TOKENS, IMAGE, LABELS, TEACHER, ID = 0, 1, 2, 3, 4
FORMAT = "megatron_eve.indexed/1"
SIDECAR_SUFFIX = ".meta.json"
LOCK_SUFFIX = ".lock"


class DatasetFormatError(ValueError):
    """Files that are not a complete megatron_eve indexed dataset."""


class BusyError(RuntimeError):
    """Another live run is writing the prefix (it holds PREFIX.lock)."""


def pack_bytes(data: bytes) -> np.ndarray:
    """Bytes → int32 item: [pad count, payload padded to a multiple of 4] (Megatron's convention)."""
    pad = (-len(data)) % 4
    payload = np.frombuffer(data + b"\0" * pad, dtype=np.int32)
    return np.concatenate([np.asarray([pad], dtype=np.int32), payload])


def unpack_bytes(item: np.ndarray) -> bytes:
    pad = int(item[0])
    raw = item[1:].tobytes()
    return raw[: len(raw) - pad]


def _builder_class():
    from megatron.core.datasets import indexed_dataset as mcore

    class _CompactIndexWriter(mcore._IndexWriter):
        def _sequence_pointers(self, sequence_lengths):
            # megatron-core builds a Python list here; numpy keeps a 100M-item index in RAM.
            lengths = np.asarray(sequence_lengths, dtype=np.int64)
            pointers = np.zeros_like(lengths)
            np.cumsum(lengths[:-1] * np.dtype(self.dtype).itemsize, out=pointers[1:])
            return pointers

    class CompactBuilder(mcore.IndexedDatasetBuilder):
        """IndexedDatasetBuilder with its per-item lists kept as typed arrays (13 bytes/item)."""

        def __init__(self, bin_path: str):
            super().__init__(bin_path, dtype=np.int32, multimodal=True)
            self.sequence_lengths = array.array("i")
            self.document_indices = array.array("q", [0])
            self.sequence_modes = array.array("b")

        def add_array(self, item: np.ndarray, mode: int) -> None:
            item = np.ascontiguousarray(item, dtype=np.int32)
            self.data_file.write(item.tobytes())
            self.sequence_lengths.append(item.size)
            self.sequence_modes.append(mode)

        def add_index(self, path_prefix: str, meta: Dict) -> None:
            index = _index_reader(path_prefix)
            check_index(path_prefix, index, meta)  # a damaged part would damage the merged dataset
            offset = len(self.sequence_lengths)
            self.sequence_lengths.frombytes(index.sequence_lengths.astype(np.int32).tobytes())
            self.document_indices.frombytes((index.document_indices[1:] + offset).astype(np.int64).tobytes())
            self.sequence_modes.frombytes(index.sequence_modes.astype(np.int8).tobytes())
            del index
            with open(mcore.get_bin_path(path_prefix), "rb") as source:
                while chunk := source.read(64 << 20):
                    self.data_file.write(chunk)

        def finalize(self, idx_path: str) -> None:
            self.data_file.close()
            with _CompactIndexWriter(idx_path, self.dtype) as writer:
                writer.write(self.sequence_lengths, self.sequence_modes, self.document_indices)

    return CompactBuilder


# ------------------------------------------------------------------------------ the writer's lock
_HELD: Dict[str, list] = {}  # real path of a prefix -> [lock fd, depth]: the prefixes this process holds


def _try_lock(path: str) -> Optional[int]:
    """An fd holding an exclusive flock on `path` (created if absent), or None if another holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as error:
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return fd  # a file system without flock: unlocked, as before locks were taken
            os.close(fd)
            raise
        # The run that held it removes the file before unlocking: then lock the file now at `path`.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def prefix_lock(prefix: str) -> Iterator[None]:
    """Exclusive right to write PREFIX's files (re-entrant within a process); BusyError, in one line,
    while another live run holds it. The kernel releases it when its holder dies, however it dies."""
    key = os.path.realpath(prefix)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    path = prefix + LOCK_SUFFIX
    fd = _try_lock(path)
    if fd is None:
        raise BusyError(f"another run is writing {prefix} (it holds {path}): wait for it to end, "
                        "or choose another --output-prefix")
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.remove(path)  # while still locked: a run waiting on this file retries on a new one
        os.close(fd)


def _staged(prefix: str, suffix: str) -> str:
    return f"{prefix}{suffix}.tmp"


def _fsync(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _swap_in(prefix: str, suffixes: Sequence[str]) -> None:
    """Rename the staged files still at their .tmp names into place, the sidecar last (it marks
    completeness). Only under the prefix's lock, once the staged sidecar is complete."""
    for suffix in (*suffixes, SIDECAR_SUFFIX):
        if suffix == SIDECAR_SUFFIX or os.path.isfile(_staged(prefix, suffix)):
            os.replace(_staged(prefix, suffix), prefix + suffix)


def _roll_forward(prefix: str) -> bool:
    """Under the prefix's lock: finish a replacement killed between its renames. Only when the final
    sidecar is gone (removed after the commit) and the staged one is complete, and every file it
    records is, at its staged or its final name, of the size recorded: then the renames left are done."""
    sidecar = _staged(prefix, SIDECAR_SUFFIX)
    if os.path.isfile(prefix + SIDECAR_SUFFIX) or not os.path.isfile(sidecar):
        return False
    try:
        with open(sidecar, encoding="utf-8") as handle:
            meta = json.load(handle)
        files = {**meta["files"], **meta.get("companions", {})}
    except (OSError, ValueError, TypeError, KeyError):
        return False
    for suffix, size in files.items():
        path = _staged(prefix, suffix) if os.path.isfile(_staged(prefix, suffix)) else prefix + suffix
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return False
    _swap_in(prefix, list(files))
    return True


def finish_swap(prefix: str, wait: float = 10.0) -> bool:
    """A reader's part: complete the swap of a replacement that was killed between its renames, once
    no live run holds the prefix (a live one finishes its own swap: up to `wait` s for its sidecar)."""
    key = os.path.realpath(prefix)
    if key in _HELD:  # this process is the writer
        return _roll_forward(prefix)
    deadline = time.monotonic() + wait
    while True:
        try:
            with prefix_lock(prefix):
                return _roll_forward(prefix)
        except BusyError:
            if os.path.isfile(prefix + SIDECAR_SUFFIX) or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        except OSError:  # a folder this reader may not write: the dataset reads as incomplete
            return False


class SampleWriter:
    """Writes samples to PREFIX.{bin,idx,meta.json} atomically, holding the prefix's lock. Use as a
    context manager: on an exception before the commit the temporary files are removed and nothing
    that looks complete is left; after it, the swap is finished. `companions`: suffixes of files the
    caller writes at PREFIX{suffix}.tmp (the rejects list), swapped in with the dataset."""

    def __init__(self, prefix: str, metadata: Dict, companions: Sequence[str] = ()):
        self.prefix = prefix
        self.metadata = dict(metadata)
        self.companions = tuple(companions)
        self.committed = False
        directory = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(directory, exist_ok=True)
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(prefix_lock(prefix))
        try:
            _roll_forward(prefix)  # an earlier run's committed swap first: its staged files are the dataset
            self._tmp = {suffix: _staged(prefix, suffix)
                         for suffix in (".bin", ".idx", SIDECAR_SUFFIX, *self.companions)}
            # A staged sidecar left by a killed run (or its partial write) never describes files of this run.
            for path in [self._tmp[SIDECAR_SUFFIX], *glob.glob(glob.escape(self._tmp[SIDECAR_SUFFIX]) + ".tmp*")]:
                if os.path.isfile(path):
                    os.remove(path)
            self._builder = _builder_class()(self._tmp[".bin"])
        except BaseException:
            self._lock.close()
            raise
        self.counts = {"samples": 0, "images": 0, "tokens": 0, "supervised_tokens": 0,
                       "image_bytes": 0, "teacher_bytes": 0}

    def add(self, sample: Sample) -> None:
        b = self._builder
        b.add_array(sample.tokens, TOKENS)
        b.add_array(sample.labels, LABELS)
        for data in sample.images:
            b.add_array(pack_bytes(data), IMAGE)
        for data in sample.teacher_images:
            b.add_array(pack_bytes(data), TEACHER)
        b.add_array(pack_bytes(sample.id.encode("utf-8")), ID)
        b.end_document()
        c = self.counts
        c["samples"] += 1
        c["images"] += len(sample.images)
        c["tokens"] += int(sample.tokens.size)
        c["supervised_tokens"] += int((sample.labels >= 0).sum())
        c["image_bytes"] += sum(map(len, sample.images))
        c["teacher_bytes"] += sum(map(len, sample.teacher_images))

    def add_prefix(self, prefix: str) -> None:
        """Append a complete dataset written by another SampleWriter (partition merge)."""
        meta = read_metadata(prefix)
        self._builder.add_index(prefix, meta)
        for key in self.counts:
            self.counts[key] += meta["counts"][key]

    def finalize(self, extra: Optional[Dict] = None) -> Dict:
        self._builder.finalize(self._tmp[".idx"])
        staged = (".bin", ".idx", *self.companions)
        for suffix in staged:
            _fsync(self._tmp[suffix])  # complete on disk before the commit says so
        files = {suffix: os.path.getsize(self._tmp[suffix]) for suffix in (".bin", ".idx")}
        metadata = {"format": FORMAT, **self.metadata, **(extra or {}), "counts": self.counts, "files": files}
        if self.companions:
            metadata["companions"] = {suffix: os.path.getsize(self._tmp[suffix]) for suffix in self.companions}
        with replacing(self._tmp[SIDECAR_SUFFIX]) as handle:  # the commit: whole or absent
            json.dump(metadata, handle, indent=1, sort_keys=True)
        self.committed = True
        # The old dataset stops reading as complete before any of its files is replaced; the new one is
        # complete at the staged names, so a kill from here on is finished by the next reader (finish_swap).
        if os.path.exists(self.prefix + SIDECAR_SUFFIX):
            os.remove(self.prefix + SIDECAR_SUFFIX)
        _swap_in(self.prefix, staged)
        self._lock.close()
        return metadata

    def abort(self) -> None:
        """Before the commit, delete the temporary files: a close whose flush fails again (the disk that
        failed the write is still full) must not keep them, or they keep the disk full. After it, finish
        the swap (the new dataset is complete); what cannot be renamed now is left to finish_swap."""
        try:
            if not self._builder.data_file.closed:
                with contextlib.suppress(OSError):
                    self._builder.data_file.close()  # the file is closed even when its last flush fails
            if self.committed and not os.path.exists(self.prefix + SIDECAR_SUFFIX):
                with contextlib.suppress(OSError):
                    _roll_forward(self.prefix)
                return
            # The staged sidecar first: what a second kill leaves never claims to be complete.
            for path in sorted(self._tmp.values(), key=lambda p: p != self._tmp[SIDECAR_SUFFIX]):
                if os.path.exists(path):
                    os.remove(path)
        finally:
            self._lock.close()

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is not None:
            self.abort()
        self._lock.close()
        return False


def read_metadata(prefix: str) -> Dict:
    path = prefix + SIDECAR_SUFFIX
    if not os.path.isfile(path) and os.path.isfile(_staged(prefix, SIDECAR_SUFFIX)):
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
        index = _index_reader(prefix)
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


def _index_reader(prefix: str):
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
