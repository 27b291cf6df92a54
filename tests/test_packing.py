"""Packing, splits, blends and the resumable data-parallel sampler."""

import contextlib
import re
import logging
import math

import numpy as np
import pytest

from megatron_eve.config import parse_data_path
from megatron_eve.data.dataset import BlendedSequences, split_ranges, split_shares
from megatron_eve.data.loader import MicroBatchSampler
from megatron_eve.data.packing import efficiency, one_per_sequence, pack


def llava_like_lengths(n, seed=0):
    """Text lengths spread like LLaVA-mix-665K, ~85% of samples with one 672-px image."""
    rng = np.random.default_rng(seed)
    text = np.clip(rng.lognormal(4.8, 0.9, n).astype(int), 16, 2500)
    image = np.where(rng.random(n) < 0.85, rng.choice([601, 576, 526, 451, 376, 301], n), 0)
    return text + image


def test_every_sample_once_and_capacity_respected():
    lengths = llava_like_lengths(20000)
    lengths[:3] = 5000  # longer than a sequence: left out and counted
    plan = pack(lengths, 4096, 2000, np.random.default_rng(0))
    assert plan.too_long == 3
    assert sorted(plan.order.tolist()) == list(range(3, 20000))
    assert max(lengths[plan.sequence(k)].sum() for k in range(len(plan))) <= 4096


def test_packing_efficiency_target():
    lengths = llava_like_lengths(20000)
    packed = pack(lengths, 4096, 10000, np.random.default_rng(0))
    assert efficiency(packed, lengths, 4096) >= 0.98
    padded = one_per_sequence(lengths, 4096, np.random.default_rng(0))
    assert len(padded) == len(lengths)


def test_packing_is_deterministic_by_seed():
    lengths = llava_like_lengths(3000)
    a = pack(lengths, 2048, 500, np.random.default_rng(7))
    b = pack(lengths, 2048, 500, np.random.default_rng(7))
    c = pack(lengths, 2048, 500, np.random.default_rng(8))
    assert np.array_equal(a.order, b.order) and np.array_equal(a.offsets, b.offsets)
    assert not np.array_equal(a.order, c.order)


def test_split_ranges_follow_megatron():
    assert split_ranges(1000, "98,2,0") == [(0, 980), (980, 1000), (1000, 1000)]
    assert split_ranges(10, "969,30,1") == [(0, 10), (10, 10), (10, 10)]
    assert split_ranges(100, "1") == [(0, 100), (100, 100), (100, 100)]
    assert split_ranges(5, "1,1,1") == [(0, 2), (2, 3), (3, 5)]  # cumulative bookends rounded, not each share
    with pytest.raises(ValueError, match="three non-negative weights"):
        split_ranges(10, "1,2,3,4")


def megatron_core_split(count, split):
    """The ranges megatron-core gives (None: a split of weight 0), with its own functions."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    # BlendedMegatronDatasetBuilder._build_megatron_dataset_splits: beg / end = int(round(bookend * float(n)))
    return [None if b is None else (int(round(b[0] * float(count))), int(round(b[1] * float(count))))
            for b in matrix]


@pytest.mark.parametrize("split", ["98,2,0", "969,30,1", "1,1,1", "10,90,0", "0.7,0.2,0.1", "33,33,34", "1",
                                   "99,1", "0,1,0", "949,50,1", "2,1,1"])
def test_split_ranges_are_megatron_cores(split):
    for count in [*range(0, 60), 99, 101, 997, 1001, 12345, 665298, 33_000_001]:
        ours, theirs = split_ranges(count, split), megatron_core_split(count, split)
        for (first, last), expected in zip(ours, theirs):
            assert (first, last) == expected if expected is not None else first == last, (count, split, ours, theirs)
        assert ours[0][0] == 0 and ours[-1][1] == count and all(a[1] == b[0] for a, b in zip(ours, ours[1:]))


def test_data_path_forms():
    assert parse_data_path(["0.7", "a", "0.3", "b"]) == [(0.7, "a"), (0.3, "b")]
    unweighted = parse_data_path(["a", "b"])
    assert [p for _, p in unweighted] == ["a", "b"] and all(math.isnan(w) for w, _ in unweighted)
    with pytest.raises(ValueError, match="alternate"):
        parse_data_path(["0.7", "a", "0.3"])
    # Weights a blend cannot use, each named (float() takes "nan" and "inf"; 1e308 twice sums to inf).
    for values, named in ((["inf", "a", "1", "b"], "weight 'inf' of a is not a number >= 0"),
                          (["nan", "a", "1", "b"], "weight 'nan' of a is not a number >= 0"),
                          (["1", "a", "x", "b"], "weight 'x' of b is not a number >= 0"),
                          (["1e308", "a", "1e308", "b"], "of a finite sum")):
        with pytest.raises(ValueError, match=re.escape(f"--data-path {' '.join(values)}: ") + ".*" + re.escape(named)):
            parse_data_path(values)
    for split in ("nan,2,0", "inf,2,0", "1e308,1e308,0"):
        with pytest.raises(ValueError, match=re.escape(f"--split {split!r}: give three non-negative weights")):
            split_shares(split)


class FakeSequences:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def test_blend_proportions():
    parts = [FakeSequences(10000), FakeSequences(10000), FakeSequences(10000)]
    blend = BlendedSequences(parts, [0.6, 0.3, 0.1], 5000)
    shares = np.bincount(blend.dataset_index, minlength=3) / 5000
    assert np.allclose(shares, [0.6, 0.3, 0.1], atol=0.002)
    # Within a dataset, its sequences are taken in order without repeats.
    picked = blend.dataset_sample_index[blend.dataset_index == 2]
    assert np.array_equal(picked, np.arange(len(picked)))
    exhaustive = BlendedSequences([FakeSequences(30), FakeSequences(70)], [1, 1], None)
    assert np.bincount(exhaustive.dataset_index).tolist() == [30, 70]


def test_sampler_ranks_are_disjoint_and_resume_is_exact():
    full = {r: list(MicroBatchSampler(100, 0, 2, r, 4)) for r in range(4)}
    seen = [i for r in range(4) for batch in full[r] for i in batch]
    assert sorted(seen) == list(range(96))  # the last partial global batch is dropped
    # Resuming after 3 global batches (3 x 2 x 4 = 24 sequences) yields the rest, unchanged.
    for r in range(4):
        assert list(MicroBatchSampler(100, 24, 2, r, 4)) == full[r][3:]
    with pytest.raises(ValueError, match="consumed 200"):
        MicroBatchSampler(100, 200, 2, 0, 1)


def test_group_by_length_sorts_each_megabatch_longest_first():
    from megatron_eve.data.packing import group_by_length

    lengths = np.array([5, 9, 1, 7, 3, 8])
    # Megabatches of 1 x 2 samples: [0, 1], [2, 3], [4, 5], each longest first.
    assert group_by_length(np.arange(6), lengths, batch_size=2, megabatch=1).tolist() == [1, 0, 3, 2, 5, 4]
    assert group_by_length([4, 2, 0], lengths, batch_size=2).tolist() == [0, 4, 2]  # one megabatch


def write_lengths(prefix, lengths):
    from megatron_eve.data.indexed_writer import SampleWriter
    from megatron_eve.data.records import Sample

    with SampleWriter(str(prefix), {"template": "plain"}) as writer:
        for i, length in enumerate(lengths):
            tokens = np.arange(3, 3 + length, dtype=np.int32)
            writer.add(Sample(f"s{i}", tokens, tokens.copy()))
        writer.finalize()
    return str(prefix)


@contextlib.contextmanager
def dataset_warnings():
    """The messages megatron_eve.data.dataset logs inside the block (whatever pytest's logging setup)."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("megatron_eve.data.dataset")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def test_a_weighted_dataset_with_no_sequence_left_is_an_error(tmp_path):
    from megatron_eve.config import ConfigError, DataConfig
    from megatron_eve.data.dataset import build_datasets

    short = write_lengths(tmp_path / "short", [50] * 10 + [200] * 2)
    long = write_lengths(tmp_path / "long", [150] * 3)  # every sample longer than a sequence

    def build(data_path):
        config = DataConfig(data_path=data_path, split="100,0,0", seq_length=105,
                            data_cache_path=str(tmp_path / "plans"))
        return build_datasets(config, seed=1)

    with dataset_warnings() as warned:
        with pytest.raises(ConfigError, match=f"^{long}: all 3 of its training samples are longer than "
                                              "--seq-length 105"):
            build(["0.5", short, "0.5", long])
        with pytest.raises(ConfigError, match=f"^{long}: all 3"):
            build([short, long])  # weighted by size
    # Once each, though both builds (as check_blend and build_datasets at start-up) met them.
    assert warned.count(f"{long} (train): 3 samples longer than seq-length 105 are left out") == 1
    assert warned.count(f"{short} (train): 2 samples longer than seq-length 105 are left out") == 1
    # Weight 0 leaves it out on purpose.
    train = build(["1", short, "0", long])["train"]
    assert [d.samples.prefix for d in train.datasets] == [short]


def test_a_sample_that_cannot_be_read_costs_itself_only(tmp_path):
    """Bytes damaged after preprocessing (an image that no longer decodes, labels cut short, image
    tokens without their image): each such sample is left out of its sequence, named and counted;
    the others train."""
    import io
    from PIL import Image

    from megatron_eve.config import DataConfig
    from megatron_eve.data.dataset import build_datasets
    from megatron_eve.data.indexed_writer import SampleWriter
    from megatron_eve.data.records import Sample
    from megatron_eve.model.visual_layout import IMAGE_TOKEN_INDEX

    def png(height, width):
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, format="PNG")
        return buffer.getvalue()

    def text(length):
        tokens = np.arange(3, 3 + length, dtype=np.int32)
        return tokens, tokens.copy()

    image_tokens = np.full(1 + 2 * 3, IMAGE_TOKEN_INDEX, dtype=np.int32)  # a 2 x 2 grid of 14 x 2 cells
    with_image = np.concatenate([[1], image_tokens, np.arange(3, 20)]).astype(np.int32)
    image_labels = np.where(with_image == IMAGE_TOKEN_INDEX, -100, with_image).astype(np.int32)
    prefix = str(tmp_path / "d")
    meta = {"template": "plain", "patch_size": 14, "conv_stride": 2, "image_size": 56, "teacher_image_size": 56,
            "tokenizer_vocab_size": 1000}
    with SampleWriter(prefix, meta) as writer:
        writer.add(Sample("good-0", *text(30)))
        writer.add(Sample("damaged-image", with_image, image_labels, [b"\x89PNG garbage"], [png(56, 56)]))
        writer.add(Sample("good-1", with_image, image_labels, [png(56, 56)], [png(56, 56)]))
        writer.add(Sample("cut-labels", text(30)[0], text(27)[1]))
        writer.add(Sample("image-tokens-without-image", with_image, image_labels))
        writer.add(Sample("good-2", *text(25)))
        writer.add(Sample("id-past-the-vocabulary", np.asarray([1, 5000, 7], dtype=np.int32),
                          np.asarray([-100, 5000, 7], dtype=np.int32)))
        writer.finalize()

    with dataset_warnings() as warned:
        config = DataConfig(data_path=[prefix], split="100,0,0", seq_length=64, data_cache_path=str(tmp_path / "plans"))
        train = build_datasets(config, seed=1)["train"]
        rows = [train[i] for i in range(len(train))]
    assert sum(row["real_tokens"] for row in rows) == 30 + len(with_image) + 25
    assert sum(len(row["images"]) for row in rows) == 1 and all(len(row["tokens"]) == 64 for row in rows)
    messages = [message for message in warned if "left out of its sequence" in message]
    assert len(messages) == 4, messages
    assert any("sample 1 " in m and "UnidentifiedImageError" in m for m in messages)
    assert any("(cut-labels)" in m and "30 tokens but 27 labels" in m for m in messages)
    assert any("(image-tokens-without-image)" in m and "7 image-token positions but its 0 images need 0" in m
               for m in messages)
    assert any("(id-past-the-vocabulary)" in m and "token id 5000 outside the tokenizer's 1000" in m for m in messages)
    assert "(4 left out so far by this process)" in messages[-1]

    # The next epoch neither reads nor names them again.
    with dataset_warnings() as warned:
        again = [train[i] for i in range(len(train))]
    assert not [message for message in warned if "left out" in message]
    assert sum(row["real_tokens"] for row in again) == sum(row["real_tokens"] for row in rows)


def _text_dataset(prefix, good, cut):
    """`good` usable text samples, then `cut` whose labels were cut short (unusable), interleaved."""
    from megatron_eve.data.indexed_writer import SampleWriter
    from megatron_eve.data.records import Sample

    tokens = np.arange(3, 13, dtype=np.int32)
    meta = {"template": "plain", "patch_size": 14, "conv_stride": 2, "image_size": 56, "teacher_image_size": 56,
            "tokenizer_vocab_size": 1000}
    with SampleWriter(prefix, meta) as writer:
        for i in range(good + cut):
            damaged = cut and i % ((good + cut) // cut) == 0
            writer.add(Sample(f"s{i}", tokens, tokens[:-2] if damaged else tokens.copy()))
        writer.finalize()


def test_unusable_samples_are_named_up_to_a_cap_and_a_damaged_dataset_is_an_error(tmp_path):
    """Thirty unusable samples among 300: the first twenty named, the rest counted, training goes on.
    A dataset whose samples are all unusable (a .bin overwritten, say) is one error naming it, not a
    warning per sample and a run trained on padding."""
    from megatron_eve.config import DataConfig
    from megatron_eve.data.dataset import NAMED_LEFT_OUT, build_datasets
    from megatron_eve.data.indexed import DatasetFormatError

    def rows(prefix):
        config = DataConfig(data_path=[prefix], split="100,0,0", seq_length=64, data_cache_path=prefix + ".plans")
        train = build_datasets(config, seed=1)["train"]
        return [train[i] for i in range(len(train))]

    some = str(tmp_path / "some")
    _text_dataset(some, good=300, cut=30)
    with dataset_warnings() as warned:
        rows(some)
    named = [message for message in warned if "left out of its sequence" in message]
    assert len(named) == NAMED_LEFT_OUT and "later ones are counted, not named" in named[-1]

    damaged = str(tmp_path / "damaged")  # the first ten read all unusable
    _text_dataset(damaged, good=0, cut=150)
    with dataset_warnings(), pytest.raises(DatasetFormatError, match=r"10 of the 10 samples read .* the dataset is damaged"):
        rows(damaged)
    small = str(tmp_path / "small")  # fewer samples than that, every one unusable
    _text_dataset(small, good=0, cut=6)
    with dataset_warnings(), pytest.raises(DatasetFormatError, match=r"6 of the 6 samples read .* the dataset is damaged"):
        rows(small)


def test_a_weighted_dataset_without_samples_in_a_split_leaves_that_split(tmp_path):
    """A 3-sample dataset in a weighted blend has none in the valid split under 98,2,0, and none in
    train under 10,90,0: it leaves that split's blend with a warning, the other's weight
    re-normalised, instead of a blend asking the other for more sequences than it has."""
    from megatron_eve.config import DataConfig
    from megatron_eve.data.dataset import build_datasets

    big = write_lengths(tmp_path / "big", [40] * 200)
    tiny = write_lengths(tmp_path / "tiny", [40] * 3)

    def build(split, sizes):
        config = DataConfig(data_path=["0.5", big, "0.5", tiny], split=split, seq_length=100,
                            data_cache_path=str(tmp_path / "plans"))
        return build_datasets(config, seed=1, sizes=sizes)

    with dataset_warnings() as warned:
        data = build("98,2,0", (40, 32, None))
    assert [d.samples.prefix for d in data["train"].datasets] == [big, tiny] and len(data["train"]) == 40
    assert [d.samples.prefix for d in data["valid"].datasets] == [big] and len(data["valid"]) == 32
    assert data["test"] is None
    assert warned == [f"{tiny}: --split 98,2,0 gives its 3 samples none in valid: left out of the valid blend, "
                      "the other datasets' weights re-normalised"]
    with dataset_warnings() as warned:
        data = build("10,90,0", (40, None, None))
    assert [d.samples.prefix for d in data["train"].datasets] == [big] and len(data["train"]) == 40
    assert [d.samples.prefix for d in data["valid"].datasets] == [big, tiny]
    assert len(warned) == 1 and warned[0].startswith(f"{tiny}: --split 10,90,0 gives its 3 samples none in train")


def test_no_dataset_with_training_samples_is_one_error_naming_them(tmp_path):
    from megatron_eve.config import ConfigError, DataConfig
    from megatron_eve.data.dataset import build_datasets, check_blend

    a = write_lengths(tmp_path / "a", [40] * 3)
    b = write_lengths(tmp_path / "b", [40] * 2)
    config = DataConfig(data_path=["0.5", a, "0.5", b], split="10,90,0", seq_length=100,
                        data_cache_path=str(tmp_path / "plans"))
    with dataset_warnings(), pytest.raises(ConfigError) as error:
        build_datasets(config, seed=1, sizes=(8, None, None))
    with dataset_warnings(), pytest.raises(ConfigError) as before_the_model:
        check_blend(config)  # the same, from the indexes alone
    assert str(before_the_model.value) == str(error.value)
    assert str(error.value) == (f"--data-path: no dataset has a training sample: {a} (--split 10,90,0 gives its "
                                f"3 samples none in train); {b} (--split 10,90,0 gives its 2 samples none in train)")


def test_an_empty_dataset_is_left_out_of_the_blend(tmp_path, monkeypatch):
    """An empty dataset (preprocess_data --partitions writes one for an empty partition) is never
    mmapped: it leaves the blend with a warning naming it (given by global rank 0 only); every
    dataset empty is one error naming them."""
    import torch.distributed as dist

    from megatron_eve.config import ConfigError, DataConfig
    from megatron_eve.data.dataset import build_datasets
    from megatron_eve.data.indexed import IndexedSamples

    empty = write_lengths(tmp_path / "part0000of0002", [])
    other_empty = write_lengths(tmp_path / "part0001of0002", [])
    good = write_lengths(tmp_path / "good", [40] * 50)
    assert len(IndexedSamples(empty)) == 0 and IndexedSamples(empty).lengths.tolist() == []

    def build(data_path):
        config = DataConfig(data_path=data_path, split="98,2,0", seq_length=100, data_cache_path=str(tmp_path / "c"))
        return build_datasets(config, seed=1, sizes=(20, 4, None))

    for name, value in (("is_initialized", True), ("get_world_size", 2), ("get_rank", 1), ("barrier", None)):
        monkeypatch.setattr(dist, name, lambda *a, _value=value, **k: _value)  # rank 1 of 2, as it sees the group
    with dataset_warnings() as warned:
        data = build(["0.3", empty, "0.7", good])
    assert [d.samples.prefix for d in data["train"].datasets] == [good] and not warned  # rank 1: silent
    monkeypatch.setattr(dist, "get_rank", lambda *a: 0)
    with dataset_warnings() as warned:
        data = build([empty, good])
    assert [d.samples.prefix for d in data["train"].datasets] == [good] and len(data["train"]) == 20
    assert warned == [f"{empty}: an empty dataset (0 samples): left out of the blend"]
    with dataset_warnings(), pytest.raises(ConfigError, match=f"^--data-path: every dataset is empty "
                                                              f"\\(0 samples\\): {empty}, {other_empty}$"):
        build(["0.5", empty, "0.5", other_empty])


def test_the_epochs_training_takes_of_each_dataset_are_said(tmp_path, caplog, monkeypatch):
    """The stage scripts give --train-samples; the reference trains one epoch: each dataset's line
    says how many epochs of it that is (by its share of the blend), so a dataset of another size
    than the script assumed shows at start-up."""
    import logging

    from megatron_eve.config import DataConfig
    from megatron_eve.data.dataset import build_datasets

    monkeypatch.setenv("RANK", "0")
    big = write_lengths(tmp_path / "big", [40] * 200)  # two samples a 100-position sequence: 100 an epoch
    small = write_lengths(tmp_path / "small", [40] * 20)
    config = DataConfig(data_path=["0.75", big, "0.25", small], split="100,0,0", seq_length=100,
                        data_cache_path=str(tmp_path / "plans"))
    with caplog.at_level(logging.INFO, logger="megatron_eve.data.dataset"):
        build_datasets(config, seed=1, sizes=(200, None, None))
    said = [r.getMessage() for r in caplog.records if "epochs of its train split" in r.getMessage()]
    assert said == [f"{big}: training takes 1.50 epochs of its train split (100 packed sequences an epoch)",
                    f"{small}: training takes 5.00 epochs of its train split (10 packed sequences an epoch)"]


def test_a_damaged_image_leaves_its_sample_out_on_every_pipeline_stage(tmp_path):
    """A crop whose header is whole but whose pixels are damaged: the first stage (which keeps
    pixels), a middle one (grids only) and the last (teacher views) must all leave its sample out,
    or their rows of one micro-batch differ (a pipeline that failed, or trained on another row's labels)."""
    import io

    from PIL import Image

    from megatron_eve.config import DataConfig
    from megatron_eve.data.dataset import StageReads, build_datasets
    from megatron_eve.data.indexed_writer import SampleWriter
    from megatron_eve.data.records import Sample
    from megatron_eve.model.visual_layout import IMAGE_TOKEN_INDEX

    def png(damaged=False):
        buffer = io.BytesIO()
        Image.fromarray(np.random.RandomState(0).randint(0, 255, (56, 56, 3), dtype=np.uint8)).save(buffer, "PNG")
        data = bytearray(buffer.getvalue())
        if damaged:
            data[len(data) // 2] ^= 0xFF  # inside the pixel data: the header still gives the size
        return bytes(data)

    tokens = np.concatenate([[1], np.full(1 + 2 * 3, IMAGE_TOKEN_INDEX), np.arange(3, 20)]).astype(np.int32)
    labels = np.where(tokens == IMAGE_TOKEN_INDEX, -100, tokens).astype(np.int32)
    prefix = str(tmp_path / "d")
    meta = {"template": "plain", "patch_size": 14, "conv_stride": 2, "image_size": 56, "teacher_image_size": 56,
            "tokenizer_vocab_size": 1000}
    with SampleWriter(prefix, meta) as writer:
        for i in range(12):
            writer.add(Sample(f"s{i}", tokens, labels, [png(damaged=i == 3)], [png(damaged=i == 7)]))
        writer.finalize()
    config = DataConfig(data_path=[prefix], split="100,0,0", seq_length=64, data_cache_path=str(tmp_path / "plans"))
    stages = {"first": StageReads(pixels=True, teacher=False), "middle": StageReads(pixels=False, teacher=False),
              "last": StageReads(pixels=False, teacher=True)}
    with dataset_warnings():
        rows = {name: [row for row in build_datasets(config, 1, reads=reads)["train"]] for name, reads in stages.items()}
    for name, stage_rows in rows.items():
        assert [r["num_samples"] for r in stage_rows] == [r["num_samples"] for r in rows["first"]], name
        assert all(np.array_equal(a["labels"], b["labels"]) for a, b in zip(stage_rows, rows["first"])), name
    assert sum(r["num_samples"] for r in rows["first"]) == 10  # samples 3 and 7 left out everywhere
    assert all(r["images"] for r in rows["first"]) and not any(r["images"] for r in rows["middle"])


def test_an_unweighted_blend_weighs_the_tokens_that_fit(tmp_path):
    """Without weights a dataset counts by its tokens; those of samples longer than --seq-length are
    left out of every sequence, so counting them would read the few samples that fit epochs over."""
    from megatron_eve.config import DataConfig
    from megatron_eve.data.dataset import build_datasets

    fits = write_lengths(tmp_path / "fits", [40] * 100)  # 4,000 tokens that fit 100-position sequences
    mostly_long = write_lengths(tmp_path / "long", [40] * 20 + [200] * 50)  # 800 that fit, 10,000 that do not
    config = DataConfig(data_path=[fits, mostly_long], split="100,0,0", seq_length=100,
                        data_cache_path=str(tmp_path / "plans"))
    with dataset_warnings():
        train = build_datasets(config, seed=1, sizes=(120, None, None))["train"]
    assert [int((train.dataset_index == d).sum()) for d in range(2)] == [100, 20]  # 4,000 : 800
