"""The packing-plan cache: identical plans read back, misses on any key change, damaged files
warned about and planned again, no cache where none can be written, and rank 0 planning for all.

Also a torchrun worker (`python -m tests.test_plan_cache PREFIX OUT` under torchrun, gloo)."""

import dataclasses
import hashlib
import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from megatron_eve.config import DataConfig
from megatron_eve.data import packing, plan_cache
from megatron_eve.data.dataset import PackedSequences, build_datasets, content_stream
from megatron_eve.data.indexed import IndexedSamples
from megatron_eve.data.indexed_writer import SampleWriter
from megatron_eve.data.records import Sample

SEQ = 1024
CONFIG = DataConfig(seq_length=SEQ, split="9,1,0", packing_buffer_size=300)
SEED = 5
MINIMUM = 1200  # three epochs of the train split's ~587 sequences


def write_prefix(prefix, count=1800, seed=0, long=3):
    """Token-only samples of 20..700 positions, `long` of them longer than SEQ."""
    lengths = np.random.default_rng(seed).integers(20, 700, count)
    lengths[:long] = SEQ + 1
    with SampleWriter(str(prefix), {"template": "plain"}) as writer:
        for i, n in enumerate(lengths):
            tokens = np.arange(n, dtype=np.int32) % 300
            writer.add(Sample(f"s{i}", tokens, tokens.copy()))
        writer.finalize()
    return str(prefix)


@pytest.fixture
def prefix(tmp_path):
    return write_prefix(tmp_path / "data")


def train_split(prefix, config=CONFIG, minimum=MINIMUM, seed=SEED):
    samples = IndexedSamples(prefix)
    return PackedSequences(samples, 0, int(len(samples) * 0.9), config, seed, "train", minimum)


def planned_without_cache(prefix, config=CONFIG, minimum=MINIMUM, seed=SEED):
    """The plans as dataset.py made them before the cache (its loop, verbatim; the stream from the
    split's content)."""
    samples = IndexedSamples(prefix)
    last = int(len(samples) * 0.9)
    lengths = samples.lengths[:last]
    stream = content_stream(plan_cache.lengths_sha256(lengths), "train", 0, last, len(samples))
    plans = []
    while True:
        rng = np.random.default_rng([seed, stream, len(plans)])
        plan = (packing.pack(lengths, config.seq_length, config.packing_buffer_size, rng) if config.pack
                else packing.one_per_sequence(lengths, config.seq_length, rng))
        if len(plan) == 0:
            break
        plans.append(plan)
        if minimum is None or sum(len(p) for p in plans) >= minimum:
            break
    return plans


def assert_identical(plans, expected):
    assert len(plans) == len(expected)
    for a, b in zip(plans, expected):
        assert a.order.dtype == b.order.dtype == np.int64 and a.offsets.dtype == b.offsets.dtype == np.int64
        assert np.array_equal(a.order, b.order) and np.array_equal(a.offsets, b.offsets)
        assert a.too_long == b.too_long


@pytest.fixture
def planned(monkeypatch):
    """Counts the epochs actually planned (calls of pack / one_per_sequence)."""
    calls = []
    for name in ("pack", "one_per_sequence"):
        real = getattr(packing, name)
        monkeypatch.setattr(packing, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    return calls


def cache_files(prefix):
    folder = prefix + ".plans"
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == plan_cache.__name__ and r.levelno >= logging.WARNING]


# ------------------------------------------------------------------------------------- hits and misses
def test_cache_hit_gives_the_identical_plans(prefix, planned, caplog):
    expected = planned_without_cache(prefix)
    planned.clear()
    first = train_split(prefix)
    assert len(first.plans) == 3 and len(planned) == 3 and first.too_long == 3
    assert_identical(first.plans, expected)
    files = cache_files(prefix)
    assert len(files) == 3 and sum(f.endswith(".json") for f in files) == 1  # a header, one chunk of 2 arrays
    second = train_split(prefix)
    assert len(planned) == 3  # read, not planned
    assert_identical(second.plans, expected)
    assert second.epoch_starts == first.epoch_starts and second.too_long == 3
    # Fewer epochs needed: the first ones are read; more: only the missing ones are planned.
    assert len(train_split(prefix, minimum=10).plans) == 1 and len(planned) == 3
    more = train_split(prefix, minimum=2000)
    assert len(more.plans) == 4 and len(planned) == 4
    assert_identical(more.plans, planned_without_cache(prefix, minimum=2000))
    assert len(cache_files(prefix)) == 5  # the missing epoch added as a chunk of its own
    assert_identical(train_split(prefix, minimum=2000).plans, more.plans) and len(planned) == 4
    assert not warnings_of(caplog)


@pytest.mark.parametrize("change", ["seed", "seq_length", "packing_buffer_size", "pack"])
def test_a_changed_setting_misses(prefix, planned, change):
    train_split(prefix)
    before = cache_files(prefix)
    value = {"seed": 6, "seq_length": SEQ + 64, "packing_buffer_size": 200, "pack": False}[change]
    config = CONFIG if change == "seed" else dataclasses.replace(CONFIG, **{change: value})
    seed = value if change == "seed" else SEED
    planned.clear()
    changed = train_split(prefix, config, seed=seed)
    assert len(planned) == len(changed.plans) >= 1  # planned, not read
    assert_identical(changed.plans, planned_without_cache(prefix, config, seed=seed))
    assert set(before) < set(cache_files(prefix))  # an entry of its own beside the first


def test_buffer_size_plays_no_part_without_packing(prefix, planned):
    unpacked = dataclasses.replace(CONFIG, pack=False)
    train_split(prefix, unpacked, minimum=None)
    planned.clear()
    train_split(prefix, dataclasses.replace(unpacked, packing_buffer_size=7), minimum=None)
    assert not planned


def test_changed_data_misses(tmp_path, planned):
    prefix = write_prefix(tmp_path / "data")
    train_split(prefix)
    write_prefix(tmp_path / "data", seed=1)  # same prefix and sample count, other lengths
    planned.clear()
    again = train_split(prefix)
    assert len(planned) == 3
    assert_identical(again.plans, planned_without_cache(prefix))


def test_many_epochs_are_a_few_files(tmp_path, planned, monkeypatch, caplog):
    """A small dataset in a long blend: thousands of epochs in a bounded number of files (not two
    per epoch, which every rank would open at every start), read back identical."""
    small = write_prefix(tmp_path / "small", count=10, long=0)
    expected = planned_without_cache(small, minimum=3000)
    assert len(expected) >= 1000
    assert_identical(train_split(small, minimum=3000).plans, expected)
    assert len(cache_files(small)) == 3
    planned.clear()
    assert_identical(train_split(small, minimum=3000).plans, expected) and not planned
    # Chunks bounded by MAX_CHUNK_ITEMS: more files, the same plans; a damaged chunk costs itself and the later ones.
    monkeypatch.setattr(plan_cache, "MAX_CHUNK_ITEMS", 1000)
    other = dataclasses.replace(CONFIG, packing_buffer_size=299)  # another entry, planned anew
    want = planned_without_cache(small, other, minimum=3000)
    assert_identical(train_split(small, other, minimum=3000).plans, want)
    chunks = sorted(f for f in cache_files(small) if f.endswith(".order.npy") and ".e0-" not in f)
    assert len(chunks) > 3
    os.remove(os.path.join(small + ".plans", chunks[1]))
    planned.clear()
    assert_identical(train_split(small, other, minimum=3000).plans, want)
    assert 0 < len(planned) < len(want) and "planning again" in warnings_of(caplog)[-1]


def test_the_order_does_not_depend_on_how_the_path_is_spelled(tmp_path, monkeypatch):
    """Absolute, relative and doubled-slash spellings of a prefix, and a copy of it in another
    folder, give the same plans and the same blend order: a resubmitted job resumes where it was."""
    import shutil

    prefix = write_prefix(tmp_path / "data" / "set", count=300)
    (tmp_path / "copy").mkdir()
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copy(prefix + suffix, tmp_path / "copy" / ("other" + suffix))
    monkeypatch.chdir(tmp_path)
    orders = []
    for spelling in (prefix, "data/set", "./data/set", str(tmp_path) + "//data/set", str(tmp_path / "copy" / "other")):
        data = build_datasets(dataclasses.replace(CONFIG, data_path=[spelling]), SEED, sizes=(400, 20, None))
        orders.append([[data[s].locate(i)[0].sample_indices(data[s].locate(i)[1]).tolist()
                        for i in range(len(data[s]))] for s in ("train", "valid")])
    assert all(order == orders[0] for order in orders[1:])


# ------------------------------------------------------------------------------------- damage
def _header(prefix):
    (name,) = [f for f in cache_files(prefix) if f.endswith(".json")]
    return os.path.join(prefix + ".plans", name)


def _chunk(prefix, part):
    """The path of the one chunk's (epochs 0-2) array."""
    return _header(prefix).replace(".json", f".e0-2.{part}.npy")


def _rewrite_chunk(prefix, part, array, sequences=None):
    """Replace the chunk's array and put its checksum in the header (damage a checksum cannot see)."""
    path = _header(prefix)
    header = json.load(open(path))
    np.save(_chunk(prefix, part), array)
    (chunk,) = header["chunks"]
    chunk[f"{part}_sha256"] = hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()
    chunk["sequences"] = sequences or chunk["sequences"]
    json.dump(header, open(path, "w"))
    return _chunk(prefix, "{order,offsets}")


def _truncate(prefix):
    path = _chunk(prefix, "order")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return path


def _flip_a_byte(prefix):
    path = _chunk(prefix, "offsets")
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x10
    open(path, "wb").write(bytes(data))
    return path


def _pickled(prefix):
    path = _chunk(prefix, "order")
    np.save(path, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    return path


def _not_json(prefix):
    path = _header(prefix)
    open(path, "w").write('{"chunks": [')
    return path


def _another_key(prefix):
    path = _header(prefix)
    header = json.load(open(path))
    header["key"]["seed"] += 1
    json.dump(header, open(path, "w"))
    return path


def _sample_twice(prefix):
    order = np.load(_chunk(prefix, "order"))
    order[1] = order[0]
    return _rewrite_chunk(prefix, "order", order)


def _merged_sequences(prefix):
    """Two sequences of epoch 1 merged into one longer than seq_length (a consistent, checksummed
    file)."""
    samples = IndexedSamples(prefix)
    lengths = samples.lengths[: int(len(samples) * 0.9)]
    (chunk,) = json.load(open(_header(prefix)))["chunks"]
    order, offsets = np.load(_chunk(prefix, "order")), np.load(_chunk(prefix, "offsets"))
    start = chunk["sequences"][0] + 1  # epoch 1's offsets follow epoch 0's
    fits = len(order) // 3
    epoch = offsets[start: start + chunk["sequences"][1] + 1].astype(np.int64)
    sums = np.add.reduceat(lengths[order[fits: 2 * fits]], epoch[:-1])
    k = int(np.argmax(sums[:-1] + sums[1:]))
    assert sums[k] + sums[k + 1] > SEQ
    sequences = [chunk["sequences"][0], chunk["sequences"][1] - 1, chunk["sequences"][2]]
    return _rewrite_chunk(prefix, "offsets", np.delete(offsets, start + k + 1), sequences)


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte, _pickled, _not_json, _another_key, _sample_twice,
                                    _merged_sequences])
def test_damaged_cache_is_warned_about_and_planned_again(prefix, planned, caplog, damage):
    expected = planned_without_cache(prefix)
    train_split(prefix)
    path = damage(prefix)
    planned.clear()
    caplog.clear()
    again = train_split(prefix)
    assert_identical(again.plans, expected)
    (warning,) = warnings_of(caplog)
    assert path in warning and "planning again" in warning, warning
    assert planned  # at least the damaged epoch and those after it
    # The rebuilt cache replaced the damaged files: the next run reads it, silently.
    planned.clear()
    caplog.clear()
    assert_identical(train_split(prefix).plans, expected)
    assert not planned and not warnings_of(caplog)


# ------------------------------------------------------------------------------------- where
def test_unwritable_default_place_means_no_cache(prefix, planned, caplog):
    open(prefix + ".plans", "w").close()  # a file where the folder would go: unwritable, even for root
    datasets = build_datasets(dataclasses.replace(CONFIG, data_path=[prefix]), SEED)
    assert len(datasets["train"]) and len(datasets["valid"])
    (warning,) = warnings_of(caplog)  # one line for the place, not one per split
    assert f"{prefix}.plans cannot be written" in warning and "planning without a cache" in warning
    assert_identical(datasets["train"].datasets[0].plans, planned_without_cache(prefix, minimum=None))


def test_readable_but_unwritable_cache_is_still_read(prefix, planned, caplog, monkeypatch):
    train_split(prefix, minimum=10)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(plan_cache, "replacing", refuse)
    monkeypatch.setattr(plan_cache, "write_text", refuse)
    planned.clear()
    more = train_split(prefix)  # epoch 0 read, epochs 1 and 2 planned, nothing written
    assert len(planned) == 2
    assert_identical(more.plans, planned_without_cache(prefix))
    (warning,) = warnings_of(caplog)
    assert "cannot be written (Permission denied)" in warning


def test_data_cache_path_holds_the_cache(prefix, tmp_path, planned):
    elsewhere = str(tmp_path / "cache")
    config = dataclasses.replace(CONFIG, data_cache_path=elsewhere)
    train_split(prefix, config)
    assert not cache_files(prefix) and len(os.listdir(elsewhere)) == 3
    assert all(name.startswith("data.train.") for name in os.listdir(elsewhere))
    planned.clear()
    again = train_split(prefix, config)
    assert not planned
    assert_identical(again.plans, planned_without_cache(prefix))


def test_data_cache_path_flag():
    from megatron_eve.training.arguments import build_parser

    argv = ["--micro-batch-size", "1", "--global-batch-size", "1", "--seq-length", "8", "--lr", "1",
            "--data-path", "x"]
    parser = build_parser()
    assert parser.parse_args(argv).data_cache_path is None
    assert parser.parse_args(argv + ["--data-cache-path", "/c"]).data_cache_path == "/c"


def test_bench_data_times_the_plan_cache(tmp_path):
    from tests.helpers import ROOT

    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_data.py"), "--plan-cache", "--plan-samples",
                          "20000", "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    for label in ("no cache", "first run, cache empty (plan, write)", "later run, cache filled (read, check)"):
        assert re.search(rf"{re.escape(label)}: +[\d.]+ s", out.stdout), out.stdout
    assert re.search(r"cache on disk: [\d.]+ MiB in 3 files .* plans identical", out.stdout), out.stdout


# ------------------------------------------------------------------------------------- ranks
class FakeGroup:
    """torch.distributed as a rank of a two-rank group sees it; barriers counted."""

    def __init__(self, monkeypatch, rank):
        import torch.distributed as dist

        self.rank, self.barriers = rank, 0
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
        monkeypatch.setattr(dist, "get_rank", lambda *a: self.rank)
        monkeypatch.setattr(dist, "barrier", self.barrier)

    def barrier(self, *args, **kwargs):
        self.barriers += 1


def test_rank_zero_plans_and_writes_the_others_read(prefix, planned, monkeypatch):
    group = FakeGroup(monkeypatch, rank=1)
    expected = planned_without_cache(prefix)
    planned.clear()
    # Rank 1 alone, before rank 0 wrote (say another file system): it plans, and never writes.
    assert_identical(train_split(prefix).plans, expected)
    assert group.barriers == 1 and len(planned) == 3 and not cache_files(prefix)
    group.rank = 0
    assert_identical(train_split(prefix).plans, expected)
    assert group.barriers == 2 and len(planned) == 6 and cache_files(prefix)
    group.rank = 1
    assert_identical(train_split(prefix).plans, expected)
    assert group.barriers == 3 and len(planned) == 6  # read what rank 0 wrote


def test_two_ranks_under_torchrun(prefix, tmp_path):
    """gloo, two processes: rank 0 plans and writes, rank 1 waits and reads; with an unwritable
    cache both plan; every rank gets the same plans, and no barrier is left waiting."""
    from tests.helpers import ROOT, child_environment, free_port

    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "tests.test_plan_cache", prefix, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=child_environment(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    expected = _digest(planned_without_cache(prefix))
    assert [r["cached"]["planned"] for r in ranks] == [3, 0]
    assert [r["unwritable"]["planned"] for r in ranks] == [3, 3]
    for r in ranks:
        assert r["cached"]["digest"] == r["unwritable"]["digest"] == expected
        assert r["blend"] == ranks[0]["blend"]


def _digest(plans):
    h = hashlib.sha256()
    for p in plans:
        h.update(p.order.tobytes() + p.offsets.tobytes() + str(p.too_long).encode())
    return h.hexdigest()


def _worker(prefix, out):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    calls = []
    real = packing.pack
    packing.pack = lambda *a, **k: calls.append(1) or real(*a, **k)
    result = {}
    blocked = os.path.join(out, "blocked")
    open(blocked, "w").close()  # a file: the cache folder cannot be made there
    for name, config in (("cached", CONFIG), ("unwritable", dataclasses.replace(CONFIG, data_cache_path=blocked))):
        calls.clear()
        plans = train_split(prefix, config).plans
        result[name] = {"planned": len(calls), "digest": _digest(plans)}
    # Whole blends (train and valid splits, one barrier each): every rank gets the same sequences.
    data = build_datasets(dataclasses.replace(CONFIG, data_path=[prefix]), SEED, sizes=(500, 50, None))
    result["blend"] = [data["train"].locate(i)[1] for i in range(0, 500, 7)]
    (open(os.path.join(out, f"rank{rank}.json"), "w")).write(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
