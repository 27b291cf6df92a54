"""A .idx that does not describe its .bin, or that megatron-core cannot read, is one DatasetFormatError
naming it when the dataset is opened (before training), not a run on empty rows or a traceback."""

import gc
import json
import os
import re
import shutil
import struct
import sys

import numpy as np
import pytest

from megatron_eve.data.indexed import TOKENS, DatasetFormatError, IndexedSamples
from megatron_eve.data.indexed_writer import SampleWriter
from megatron_eve.data.records import Sample

HEADER = 34  # magic 9, version 8, dtype code 1, sequence count 8, document count 8


def write(prefix, samples=6, image=b"\xff\xd8 an encoded crop"):
    with SampleWriter(str(prefix), {"template": "plain", "patch_size": 14, "conv_stride": 2}) as writer:
        for i in range(samples):
            tokens = np.arange(3, 13 + i, dtype=np.int32)
            writer.add(Sample(f"s{i}", tokens, tokens.copy(), [image] if i % 2 else [], [image] if i % 2 else []))
        writer.finalize()
    return str(prefix)


def layout(prefix):
    """(sequence count, document count, offsets of lengths / pointers / document indices / modes)."""
    with open(prefix + ".idx", "rb") as handle:
        sequences, documents = struct.unpack("<QQ", handle.read(HEADER)[18:])
    pointers = HEADER + 4 * sequences
    indices = pointers + 8 * sequences
    return sequences, documents, {"lengths": HEADER, "pointers": pointers, "indices": indices,
                                  "modes": indices + 8 * documents}


def patch(prefix, offset, data):
    """Overwrite bytes of the .idx in place: its size, which the sidecar checks, stays."""
    with open(prefix + ".idx", "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


@pytest.fixture
def unraisable(monkeypatch):
    """Exceptions Python ignores (as in a __del__), collected."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    yield seen
    gc.collect()


def refused(prefix, match, unraisable):
    with pytest.raises(DatasetFormatError) as error:
        IndexedSamples(prefix)
    gc.collect()
    message = str(error.value)
    assert message.startswith(f"{prefix}.idx") and "\n" not in message and message.endswith("preprocess it again")
    assert match in message, message
    assert not unraisable, [str(u.exc_value) for u in unraisable]  # no "Exception ignored in __del__"
    return message


def test_a_good_dataset_opens(tmp_path):
    samples = IndexedSamples(write(tmp_path / "d"))
    assert len(samples) == 6 and samples.lengths.tolist() == [10 + i for i in range(6)]
    assert samples.get(2)["id"] == "s2"
    empty = IndexedSamples(write(tmp_path / "empty", samples=0))
    assert len(empty) == 0 and empty.dataset is None


def test_an_index_from_another_preprocessing_of_the_same_size(tmp_path, corpus, unraisable):
    """The reviewer's repro: the png preprocessing's .idx next to the jpeg one's .bin and sidecar."""
    from megatron_eve.data.preprocess import PreprocessJob, run
    from megatron_eve.data.records import RecordConfig
    from tests.helpers import tiny_config

    prefixes = {}
    for codec in ("jpeg", "png"):
        prefixes[codec] = str(tmp_path / codec)
        record = RecordConfig("plain", tiny_config().vision, image_folder=corpus["root"], image_codec=codec)
        run(PreprocessJob([corpus["captions"]], prefixes[codec], corpus["tokenizer"], record, progress=False))
    IndexedSamples(prefixes["jpeg"])
    assert os.path.getsize(prefixes["png"] + ".idx") == os.path.getsize(prefixes["jpeg"] + ".idx")
    shutil.copy(prefixes["png"] + ".idx", prefixes["jpeg"] + ".idx")  # same size: the sidecar's check passes
    refused(prefixes["jpeg"], "not the index of", unraisable)


def test_a_swapped_index_is_refused_before_training(tmp_path, unraisable):
    """check_blend (preflight's look at the blend) refuses it, so check_job does."""
    from megatron_eve.config import DataConfig
    from megatron_eve.data.dataset import check_blend

    a = write(tmp_path / "a", image=b"a short crop")
    b = write(tmp_path / "b", image=b"a crop of the same item count")  # same sequences, other lengths
    shutil.copy(b + ".idx", a + ".idx")
    config = DataConfig(data_path=[a], split="100,0,0", seq_length=64, data_cache_path=str(tmp_path / "plans"))
    with pytest.raises(DatasetFormatError, match=f"^{a}.idx: .*sequences end at byte"):
        check_blend(config)


def test_another_dtype(tmp_path, unraisable):
    prefix = write(tmp_path / "d")
    patch(prefix, 17, bytes([8]))  # uint16: the .bin read as twice the items, each garbage
    refused(prefix, "dtype uint16, not the int32", unraisable)
    patch(prefix, 17, bytes([99]))
    refused(prefix, "dtype code 99", unraisable)


def test_a_bad_magic(tmp_path, unraisable):
    prefix = write(tmp_path / "d")
    patch(prefix, 0, b"X")
    refused(prefix, "not a readable megatron index (bad header)", unraisable)


def test_a_sequence_count_one_more(tmp_path, unraisable):
    prefix = write(tmp_path / "d")
    sequences, _, _ = layout(prefix)
    patch(prefix, 18, struct.pack("<Q", sequences + 1))
    refused(prefix, "not a readable megatron index", unraisable)


@pytest.mark.parametrize("index, value", [(3, 2), (0, 1), (-1, 10 ** 6), (2, -5)])
def test_a_corrupt_document_index(tmp_path, unraisable, index, value):
    prefix = write(tmp_path / "d")
    _, documents, at = layout(prefix)
    patch(prefix, at["indices"] + 8 * (index % documents), struct.pack("<q", value))
    refused(prefix, "document indices", unraisable)


@pytest.mark.parametrize("sequence, by", [(1, 4), (7, -4), (0, 8)])
def test_a_pointer_off(tmp_path, unraisable, sequence, by):
    prefix = write(tmp_path / "d")
    _, _, at = layout(prefix)
    offset = at["pointers"] + 8 * sequence
    with open(prefix + ".idx", "rb") as handle:
        handle.seek(offset)
        (pointer,) = struct.unpack("<q", handle.read(8))
    patch(prefix, offset, struct.pack("<q", pointer + by))
    refused(prefix, "sequence pointers", unraisable)


def test_a_length_off(tmp_path, unraisable):
    """Lengths and pointers changed together (a consistent-looking index) still end off the .bin's end."""
    prefix = write(tmp_path / "d")
    sequences, _, at = layout(prefix)
    patch(prefix, at["lengths"] + 4 * (sequences - 1), struct.pack("<i", 100))
    refused(prefix, "sequences end at byte", unraisable)


def test_a_mode_not_ours(tmp_path, unraisable):
    prefix = write(tmp_path / "d")
    _, _, at = layout(prefix)
    patch(prefix, at["modes"] + 2, bytes([9]))
    refused(prefix, "sequence modes other than", unraisable)
    patch(prefix, at["modes"] + 2, bytes([TOKENS]))  # ours, but where the first sample has its id
    refused(prefix, "not made of tokens, labels", unraisable)


@pytest.mark.parametrize("key, change", [("tokens", 1), ("images", -1), ("image_bytes", 4 * 3), ("samples", 1)])
def test_sidecar_counts_that_disagree(tmp_path, unraisable, key, change):
    """Image bytes are known to 3 bytes an image (the pad counts are in the .bin): 12 more than 3 images hold."""
    prefix = write(tmp_path / "d")
    with open(prefix + ".meta.json") as handle:
        meta = json.load(handle)
    meta["counts"][key] += change
    with open(prefix + ".meta.json", "w") as handle:
        json.dump(meta, handle)
    refused(prefix, "but its sidecar says", unraisable)


def test_the_pointer_check_across_chunks(tmp_path, monkeypatch, unraisable):
    """Large indexes are checked a chunk of sequences at a time: a pointer off at a chunk's start is found."""
    from megatron_eve.data import indexed

    monkeypatch.setattr(indexed, "_CHUNK", 4)
    prefix = write(tmp_path / "d")
    IndexedSamples(prefix)
    _, _, at = layout(prefix)
    with open(prefix + ".idx", "rb") as handle:
        handle.seek(at["pointers"] + 8 * 8)
        (pointer,) = struct.unpack("<q", handle.read(8))
    patch(prefix, at["pointers"] + 8 * 8, struct.pack("<q", pointer + 4))
    refused(prefix, "sequence pointers", unraisable)


def test_megatron_cores_failure_is_one_error_without_del_noise(tmp_path, unraisable):
    """Were IndexedDataset to fail after the checks (the file replaced meanwhile), its half-built
    object's __del__ would print an ignored AttributeError after the traceback."""
    from megatron_eve.data.indexed import _indexed_dataset

    prefix = write(tmp_path / "d")
    patch(prefix, 0, b"X")
    with pytest.raises(DatasetFormatError, match=f"^{prefix}.idx: not a readable megatron index .*again$"):
        _indexed_dataset(prefix)
    gc.collect()
    assert not unraisable


def test_a_damaged_part_is_not_merged(tmp_path):
    part = write(tmp_path / "part")
    patch(part, 17, bytes([8]))
    with SampleWriter(str(tmp_path / "merged"), {"template": "plain"}) as writer:
        with pytest.raises(DatasetFormatError, match=f"^{part}.idx: .*dtype uint16"):
            writer.add_prefix(part)


def test_preflight_refuses_a_damaged_index_in_one_line(data, tmp_path):
    """pretrain_eve.py's check before work (reviewer's repro B: the dtype byte flipped): one refusal naming
    the .idx, no model built, no iterations at loss 0."""
    from megatron_eve.config import ConfigError
    from megatron_eve.training.arguments import parse_args
    from megatron_eve.training.loop import check_job
    from tests.helpers import base_args

    copy = str(tmp_path / "captions")
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copy(data["captions"] + suffix, copy + suffix)
    patch(copy, 17, bytes([8]))
    args = base_args(data, "pretrain")
    args[args.index("--data-path") + 1] = copy
    with pytest.raises(ConfigError, match=re.escape(f"\n  - {copy}.idx: not a readable megatron index (dtype uint16")):
        check_job(parse_args(args + ["--train-iters", "3"]), 1)
