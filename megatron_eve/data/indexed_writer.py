"""Writing EVE samples as an indexed dataset (the format: megatron_eve.data.indexed): SampleWriter
stages PREFIX.bin / .idx and the sidecar under the prefix's lock and swaps them in
(megatron_eve.data.prefix_swap), so a run killed at any point leaves the old dataset or the new one."""

from __future__ import annotations

import array
import contextlib
import glob
import json
import os
from typing import Dict, Optional, Sequence

import numpy as np

from megatron_eve.atomic import replacing
from megatron_eve.data.indexed import (FORMAT, ID, IMAGE, LABELS, TEACHER, TOKENS, check_index, index_reader,
                                       pack_bytes, read_metadata)
from megatron_eve.data.prefix_swap import SIDECAR_SUFFIX, fsync_file, prefix_lock, roll_forward, staged_name, swap_in
from megatron_eve.data.records import Sample


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
            index = index_reader(path_prefix)
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
            roll_forward(prefix)  # an earlier run's committed swap first: its staged files are the dataset
            self._tmp = {suffix: staged_name(prefix, suffix)
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
            fsync_file(self._tmp[suffix])  # complete on disk before the commit says so
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
        swap_in(self.prefix, staged)
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
                    roll_forward(self.prefix)
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
