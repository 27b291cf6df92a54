"""LLaVA JSON / JSONL + images → megatron_eve indexed datasets (the engine of
tools/preprocess_data.py).

Streams the input through a pool of worker processes with a bounded number of records in flight,
writes samples in input order, and never lets a bad record stop the run: each is skipped, counted
by reason and listed in PREFIX.rejects.jsonl. With partitions, each contiguous slice of the input
becomes its own complete dataset first (kept across interruptions, so a rerun resumes), and the
slices are merged in order, giving the same files as one unpartitioned run.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

from megatron_eve.data.indexed import dataset_complete, read_metadata
from megatron_eve.data.indexed_writer import SampleWriter
from megatron_eve.data.prefix_swap import SIDECAR_SUFFIX, prefix_lock
from megatron_eve.data.records import RecordConfig, Rejection, Sample, process_record, record_id
from megatron_eve.data.sources import Broken, InputError, count_records, iter_records, parse
from megatron_eve.data.tokenizer import Tokenizer

REJECTS_SUFFIX = ".rejects.jsonl"
# Where a run that yields no sample lists its rejects when a complete dataset (with its own list)
# is at the prefix; never ends in REJECTS_SUFFIX, so it is no other prefix's list.
FAILED_REJECTS_SUFFIX = ".rejects.failed-run.jsonl"


@dataclass
class PreprocessJob:
    inputs: List[str]
    output_prefix: str
    tokenizer_model: str
    record: RecordConfig
    workers: int = 1
    partitions: int = 1
    partition_index: Optional[int] = None  # process only this partition (no merge)
    chunk_size: int = 16  # records per worker task
    progress: bool = True
    overwrite: bool = False  # replace files at the prefix that are not a complete dataset of ours
    keep_parts: bool = False  # keep the partitions' datasets after their merge (else removed: a second copy)


@dataclass
class Summary:
    samples: int = 0
    images: int = 0
    tokens: int = 0
    image_bytes: int = 0
    teacher_bytes: int = 0
    rejected: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def add(self, other: "Summary") -> None:
        for name in ("samples", "images", "tokens", "image_bytes", "teacher_bytes", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.rejected.update(other.rejected)

    def line(self) -> str:
        rejected = sum(self.rejected.values())
        parts = [f"{self.samples} samples written", f"{self.images} images", f"{self.tokens} tokens",
                 f"{rejected} records rejected"]
        if self.images:
            parts.append(f"{(self.image_bytes + self.teacher_bytes) / self.images / 1024:.1f} KiB/image "
                         f"({self.image_bytes / self.images / 1024:.1f} PEL view + "
                         f"{self.teacher_bytes / self.images / 1024:.1f} teacher view)")
        if self.seconds:
            parts.append(f"{self.seconds:.1f} s ({self.images / self.seconds:.1f} images/s)")
        text = ", ".join(parts)
        if rejected:
            text += "\nrejected by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items()))
        return text


# ----------------------------------------------------------------------------------- workers
_WORKER: Dict = {}


def _die_with_parent(parent: int) -> None:
    """A spawn worker ends when the main process ends, however it ends (SIGKILL included): else each
    (~0.5 GB) lives on, adopted by init. Linux only; the parent may already be gone before prctl."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)


def _init_worker(tokenizer_model: str, record_config: RecordConfig, parent: Optional[int] = None) -> None:
    if parent is not None:  # a worker process (not the main one, with --workers 1)
        _die_with_parent(parent)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: no traceback
    _WORKER["tokenizer"] = Tokenizer(tokenizer_model)
    _WORKER["config"] = record_config


def _process_chunk(chunk: List[Tuple[int, object]]):
    out = []
    for index, raw in chunk:
        record = raw
        try:
            record = parse(raw)
            if isinstance(record, Broken):
                out.append(Rejection(f"#{index}", record.reason, record.detail))
                continue
            out.append(process_record(record, index, _WORKER["config"], _WORKER["tokenizer"]))
        except Exception as error:  # noqa: BLE001 — one record's unforeseen failure costs that record only
            out.append(Rejection(record_id(record, index), "unexpected_error", f"{type(error).__name__}: {error}"))
    return out


class WorkerPoolError(RuntimeError):
    """Preprocessing workers keep dying; the message says what to change."""


class OutputError(RuntimeError):
    """An output that cannot or may not be written; the message names it and says what to do."""


class NoSampleError(OutputError):
    """Every record was rejected: nothing is written at the prefix (a dataset there stays as it was)."""

    def __init__(self, prefix: str, rejected: Counter, rejects_path: str):
        self.rejected, self.rejects_path = Counter(rejected), rejects_path
        count = sum(self.rejected.values())
        why = (f"{count} records rejected (" + ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items()))
               + f"), listed in {rejects_path}") if count else "the input holds no record"
        super().__init__(f"no valid sample for {prefix}: {why}; nothing was written at {prefix}")


class _WorkerPool:
    """Worker processes that may die (the OS kills one when memory runs out): the chunks in flight
    are redone in a fresh pool, and the chunk that was being waited for is redone one record at a
    time, so that a record which kills a worker on its own is rejected ("worker_died") and every
    other record survives."""

    max_restarts = 8

    def __init__(self, workers: int, init_args):
        self.workers, self.init_args, self.restarts = workers, init_args, 0
        self.executor = self._start()

    def _start(self):
        from concurrent.futures import ProcessPoolExecutor

        # spawn: no inherited state (CUDA, threads) in workers. They are started by the calling (main) thread,
        # which PR_SET_PDEATHSIG follows (no max_tasks_per_child: the manager thread starts none).
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(*self.init_args, os.getpid()))

    def submit(self, chunk: List) -> List:
        return [chunk, self.executor.submit(_process_chunk, chunk)]

    def next_results(self, pending: deque) -> List:
        """The results of the oldest chunk in flight (removed from `pending`)."""
        from concurrent.futures.process import BrokenProcessPool

        chunk, future = pending.popleft()
        try:
            return future.result()
        except BrokenProcessPool:
            self._restart(pending)
        except Exception:  # noqa: BLE001 — a record that cannot be sent to a worker (nested too deep to pickle)
            pass
        out = []
        for index, raw in chunk:
            try:
                out += self.executor.submit(_process_chunk, [(index, raw)]).result()
            except BrokenProcessPool:
                out.append(Rejection(f"#{index}", "worker_died", "a preprocessing worker died on this record "
                                     "(killed by the operating system: out of memory?)"))
                self._restart(pending)
            except Exception as error:  # noqa: BLE001 — this record only
                out.append(Rejection(f"#{index}", "unexpected_error",
                                     f"cannot be sent to a worker: {type(error).__name__}: {error}"))
        return out

    def _restart(self, pending: deque) -> None:
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise WorkerPoolError(
                f"preprocessing workers died {self.restarts} times (killed by the operating system: out of "
                f"memory?); rerun with fewer --workers, or on a machine with more memory")
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.executor = self._start()
        for entry in pending:
            future = entry[1]
            if not (future.done() and not future.cancelled() and future.exception() is None):
                entry[1] = self.executor.submit(_process_chunk, entry[0])

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


def _ordered_results(chunks: Iterable[List], workers: int, init_args) -> Iterator:
    """Results of _process_chunk in input order, at most 4 x workers chunks in flight."""
    if workers <= 1:
        _init_worker(*init_args)
        for chunk in chunks:
            yield from _process_chunk(chunk)
        return
    pool = _WorkerPool(workers, init_args)
    try:
        pending = deque()
        for chunk in chunks:
            pending.append(pool.submit(chunk))
            if len(pending) >= 4 * workers:
                yield from pool.next_results(pending)
        while pending:
            yield from pool.next_results(pending)
    finally:
        pool.close()


def _chunks(records: Iterator, size: int) -> Iterator[List]:
    while chunk := list(islice(records, size)):
        yield chunk


# ------------------------------------------------------------------------------------ writing
def _metadata(job: PreprocessJob, tokenizer: Tokenizer) -> Dict:
    vision = job.record.vision
    return {
        "template": job.record.template,
        "image_size": vision.image_size,
        "teacher_image_size": vision.teacher_image_size,
        "patch_size": vision.patch_size,
        "conv_stride": vision.conv_stride,
        "image_codec": job.record.image_codec,
        "jpeg_quality": job.record.jpeg_quality if job.record.image_codec == "jpeg" else None,
        "max_length": job.record.max_length,
        "over_length": job.record.over_length,
        "max_images": job.record.max_images,
        "tokenizer_sha256": tokenizer.checksum,
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "inputs": [os.path.abspath(p) for p in job.inputs],
        # What a partition kept from an interrupted run must have been made from.
        "input_files": [_file_identity(p) for p in job.inputs],
        "image_folder": os.path.abspath(job.record.image_folder) if job.record.image_folder else "",
    }


def _file_identity(path: str) -> Dict:
    try:
        stat = os.stat(path)
    except OSError as error:
        raise InputError(f"cannot read input {path}: {error}") from None
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _reusable(prefix: str, metadata: Dict, records: List[int]) -> bool:
    """A partition left by an earlier run counts only if it is complete, with its whole rejects list
    (the merged list is made of them), and was made from the same input files (paths, sizes, times),
    options, tokenizer and record range."""
    if not dataset_complete(prefix):
        return False
    meta = read_metadata(prefix)
    if not (meta.get("records") == records and all(meta.get(k) == v for k, v in metadata.items())):
        return False
    return _rejects_listed(prefix, meta)


def _rejects_listed(prefix: str, meta: Dict) -> bool:
    """Whether PREFIX.rejects.jsonl lists as many records as the sidecar counts rejected."""
    try:
        with open(prefix + REJECTS_SUFFIX, "rb") as handle:
            lines = sum(1 for _ in handle)
    except OSError:
        return False
    rejected = meta.get("rejected", {})
    return isinstance(rejected, dict) and lines == sum(rejected.values())


def _write_slice(job: PreprocessJob, prefix: str, first: int, last: Optional[int], metadata: Dict,
                 total: Optional[int], extra: Optional[Dict] = None, allow_empty: bool = False) -> Summary:
    from tqdm import tqdm

    summary = Summary()
    start = time.time()
    records = islice(iter_records(job.inputs), first, last)
    results = _ordered_results(_chunks(records, job.chunk_size), job.workers,
                               (job.tokenizer_model, job.record))
    rejects_tmp = prefix + REJECTS_SUFFIX + ".tmp"
    # The rejects list is staged with the dataset and swapped in with it (the writer removes it on failure).
    with SampleWriter(prefix, metadata, companions=(REJECTS_SUFFIX,)) as writer:
        with open(rejects_tmp, "w") as rejects:
            for result in tqdm(results, total=total, desc=os.path.basename(prefix), unit="rec",
                               disable=not job.progress, mininterval=1.0):
                if isinstance(result, Sample):
                    writer.add(result)
                else:
                    summary.rejected[result.reason] += 1
                    rejects.write(json.dumps(asdict(result)) + "\n")
        summary.seconds = time.time() - start
        meta = _finish(writer, prefix, rejects_tmp, summary.rejected, extra or {}, allow_empty)
    _add_counts(summary, meta["counts"])
    return summary


def _finish(writer: SampleWriter, prefix: str, rejects_tmp: str, rejected: Counter, extra: Dict,
            allow_empty: bool) -> Dict:
    """The dataset and its rejects list put in place together; or, for a dataset without a sample where
    none is allowed, only the rejects list (never over a complete dataset's own list) and NoSampleError:
    the writer then aborts, so a good dataset at the prefix is never replaced by an empty one."""
    if writer.counts["samples"] == 0 and not allow_empty:
        kept = prefix + (FAILED_REJECTS_SUFFIX if dataset_complete(prefix) else REJECTS_SUFFIX)
        os.replace(rejects_tmp, kept)
        raise NoSampleError(prefix, rejected, kept)
    return writer.finalize({"rejected": dict(rejected), **extra})


def check_output(prefix: str, overwrite: bool, replaced: bool = True) -> None:
    """Before any work: the prefix's folder exists or can be made, and (where the run writes the
    prefix itself: `replaced`) files there that are not a complete dataset of ours are replaced
    only with overwrite; our own complete dataset is replaced atomically once the new one is done.
    The caller holds the prefix's lock: a replacement an earlier run left half swapped is finished here."""
    folder = os.path.dirname(os.path.abspath(prefix))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OutputError(f"--output-prefix {prefix}: {folder} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise OutputError(f"--output-prefix {prefix}: cannot create its folder {folder} "
                          f"({error.strerror or error})") from None
    if not replaced or overwrite or dataset_complete(prefix):
        return
    found = [suffix for suffix in (".bin", ".idx", SIDECAR_SUFFIX) if os.path.lexists(prefix + suffix)]
    if found:
        raise OutputError(f"{prefix}: found {', '.join(found)} but no complete dataset of this tool (another "
                          "tool's files, or an interrupted run's): pass --overwrite to replace them, or choose "
                          "another --output-prefix")


def _add_counts(summary: Summary, counts: Dict) -> None:
    summary.samples += counts["samples"]
    summary.images += counts["images"]
    summary.tokens += counts["tokens"]
    summary.image_bytes += counts["image_bytes"]
    summary.teacher_bytes += counts["teacher_bytes"]


def partition_prefix(prefix: str, index: int, partitions: int) -> str:
    return f"{prefix}_part{index:04d}of{partitions:04d}"


def run(job: PreprocessJob) -> Summary:
    """Preprocess the job's inputs. Raises NoSampleError (nothing written at the prefix) when no
    record yields a sample; with partition_index, an empty partition is a legal result. BusyError
    while another run writes the prefix (with partition_index: that partition)."""
    if job.partition_index is not None and job.partitions > 1:  # parts run side by side, one per machine
        written = partition_prefix(job.output_prefix, job.partition_index, job.partitions)
    else:
        written = job.output_prefix
    check_output(job.output_prefix, job.overwrite, replaced=False)  # its folder, for the lock file
    with prefix_lock(written):  # held for the whole run: two runs on one prefix wrote the same temporaries
        return _run(job)


def _run(job: PreprocessJob) -> Summary:
    check_output(job.output_prefix, job.overwrite, replaced=job.partition_index is None)
    try:
        tokenizer = Tokenizer(job.tokenizer_model)
    except RuntimeError as error:  # sentencepiece's "could not parse ModelProto"
        raise InputError(f"--tokenizer-model {job.tokenizer_model}: not a SentencePiece model ({error})") from None
    metadata = _metadata(job, tokenizer)
    if job.partitions <= 1:
        return _write_slice(job, job.output_prefix, 0, None, metadata, None)

    total = count_records(job.inputs)
    bounds = [total * k // job.partitions for k in range(job.partitions + 1)]
    indices = range(job.partitions) if job.partition_index is None else [job.partition_index]
    summary = Summary()
    for k in indices:
        prefix = partition_prefix(job.output_prefix, k, job.partitions)
        records = [bounds[k], bounds[k + 1]]
        with prefix_lock(prefix):
            if _reusable(prefix, metadata, records):  # finished by an earlier, interrupted run
                meta = read_metadata(prefix)
                done = Summary(rejected=Counter(meta.get("rejected", {})))
                _add_counts(done, meta["counts"])
                summary.add(done)
                continue
            # Empty parts are legal (more parts than records); an empty merge is not.
            part = _write_slice(job, prefix, bounds[k], bounds[k + 1], metadata, bounds[k + 1] - bounds[k],
                                {"records": records}, allow_empty=True)
        summary.add(part)
    if job.partition_index is None:
        parts = [partition_prefix(job.output_prefix, k, job.partitions) for k in range(job.partitions)]
        merge(parts, job.output_prefix)
        if not job.keep_parts:  # the merged dataset is complete: the parts are a second copy of it
            for prefix in parts:
                remove_dataset(prefix)
    return summary


def remove_dataset(prefix: str) -> None:
    """A dataset of ours at `prefix`, sidecar first: interrupted, what is left is incomplete (refused
    by name, redone by a rerun), never a complete-looking part with missing files."""
    for suffix in (SIDECAR_SUFFIX, ".bin", ".idx", REJECTS_SUFFIX):
        if os.path.isfile(prefix + suffix):
            os.remove(prefix + suffix)


def merge(prefixes: List[str], output_prefix: str) -> Dict:
    """Concatenate complete datasets (same template, geometry, tokenizer) in the given order."""
    metas = [read_metadata(p) for p in prefixes]
    keys = ("template", "image_size", "teacher_image_size", "patch_size", "conv_stride", "tokenizer_sha256")
    for prefix, meta in zip(prefixes[1:], metas[1:]):
        different = [k for k in keys if meta.get(k) != metas[0].get(k)]
        if different:
            raise ValueError(f"cannot merge {prefix} into {prefixes[0]}: they differ in {different}")
    base = {k: v for k, v in metas[0].items()
            if k not in ("counts", "rejected", "format", "records", "files", "companions")}
    rejected = Counter()
    for prefix, meta in zip(prefixes, metas):
        rejected.update(meta.get("rejected", {}))
        if not _rejects_listed(prefix, meta):  # else the merged list silently lacks its records
            count = sum(meta.get("rejected", {}).values())
            raise OutputError(f"{prefix}{REJECTS_SUFFIX}: missing, or not the {count} records its sidecar counts "
                              "rejected; rerun the partitioned preprocessing to redo that part")
    rejects_tmp = output_prefix + REJECTS_SUFFIX + ".tmp"
    with SampleWriter(output_prefix, base, companions=(REJECTS_SUFFIX,)) as writer:
        with open(rejects_tmp, "w") as out:
            for prefix in prefixes:
                writer.add_prefix(prefix)
                with open(prefix + REJECTS_SUFFIX) as handle:
                    for line in handle:
                        out.write(line)
        return _finish(writer, output_prefix, rejects_tmp, rejected,
                       {"merged_from": [os.path.basename(p) for p in prefixes]}, allow_empty=False)
