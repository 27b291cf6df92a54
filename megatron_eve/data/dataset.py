"""Datasets of packed sequences over preprocessed prefixes, with Megatron's blends and splits.

`--data-path 0.7 A 0.3 B --split 98,2,0`: each prefix's samples are split into contiguous
train / valid / test ranges; within a split, samples are shuffled and packed per epoch (seeded by
seed, prefix, split and epoch, so every rank and every resumed run builds the same plan, which is
cached beside the data: plan_cache.py); the prefixes' sequences are interleaved by megatron-core's
blending helper in proportion to the weights. A dataset item is one packed sequence, ready for
collation.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_eve.config import ConfigError, DataConfig
from megatron_eve.data.images import tokens_per_image
from megatron_eve.data.indexed import DatasetFormatError, IndexedSamples
from megatron_eve.data.packing import PackingPlan
from megatron_eve.data.plan_cache import PlanKey, cached_plans, lengths_sha256
from megatron_eve.model.visual_layout import IGNORE_INDEX, IMAGE_TOKEN_INDEX

logger = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")
PLANS_SUFFIX = ".plans"  # PREFIX.plans/: the packing-plan cache beside the data, by default
NAMED_LEFT_OUT = 20  # unusable samples named one by one; later ones are counted ...
NAMED_LEFT_OUT_EVERY = 1000  # ... in a line every this many
DAMAGED_MINIMUM = 100  # this many unusable samples, over half of those read: the dataset is damaged


@dataclass(frozen=True)
class StageReads:
    """What this pipeline stage reads (derived per rank, not an option): the first needs pixels, the
    last the teacher's views (when it trains the aligner); middle stages only tokens and image grids."""

    pixels: bool = True
    teacher: bool = True


def split_ranges(count: int, split: str) -> List[Tuple[int, int]]:
    """Megatron's split rule: contiguous [start, end) per train / valid / test."""
    try:
        weights = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"--split {split!r}: give three non-negative weights, e.g. 98,2,0") from None
    weights += [0.0] * (3 - len(weights))
    if len(weights) != 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--split {split!r}: give three non-negative weights, e.g. 98,2,0")
    total = sum(weights)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w / total * count)))
    bounds = [min(b, count) for b in bounds]
    bounds[-1] = count
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


class PackedSequences:
    """One prefix's split as packed sequences, epoch after epoch until `minimum` are planned."""

    def __init__(self, samples: IndexedSamples, first: int, last: int, config: DataConfig, seed: int,
                 split: str, minimum: Optional[int] = None, reads: StageReads = StageReads()):
        self.samples, self.config, self.reads = samples, config, reads
        self.left_out: Dict[int, str] = {}  # sample index -> why it could not be used (_read)
        self.samples_read = 0  # samples this process tried to read, for the share of them left out
        self.sample_ids = np.arange(first, last, dtype=np.int64)
        lengths = samples.lengths[first:last]
        stream = int.from_bytes(hashlib.sha256(f"{samples.prefix}|{split}".encode()).digest()[:4], "little")
        key = PlanKey(split, first, last, lengths_sha256(lengths), seed, stream, config.seq_length,
                      config.pack, config.packing_buffer_size if config.pack else 0)
        self.plans: List[PackingPlan] = cached_plans(
            lengths, key, minimum, config.data_cache_path or samples.prefix + PLANS_SUFFIX,
            f"{os.path.basename(samples.prefix)}.{split}")
        self.epoch_starts = [0]
        for plan in self.plans:
            self.epoch_starts.append(self.epoch_starts[-1] + len(plan))
        # From the lengths, not a plan: no plan is made when no sample fits.
        self.too_long = int((lengths > config.seq_length).sum())
        if self.too_long:
            logger.warning("%s (%s): %d samples longer than seq-length %d are left out", samples.prefix,
                           split, self.too_long, config.seq_length)

    def __len__(self) -> int:
        return self.epoch_starts[-1]

    def sample_indices(self, index: int) -> np.ndarray:
        epoch = int(np.searchsorted(self.epoch_starts, index, side="right")) - 1
        return self.sample_ids[self.plans[epoch].sequence(index - self.epoch_starts[epoch])]

    def __getitem__(self, index: int) -> Dict:
        samples = [sample for i in self.sample_indices(index) if (sample := self._read(int(i))) is not None]
        # A row whose every sample was left out is padding alone (one position when rows are not padded).
        pad_to = self.config.seq_length if self.config.pack else (None if samples else 1)
        return assemble_sequence(samples, pad_to)

    def _read(self, index: int) -> Optional[Dict]:
        """One sample, checked; one that cannot be read or does not hold together (bytes damaged
        after preprocessing: a bad disk, a partial copy) costs itself only: it is left out of its
        sequence, named once (the first NAMED_LEFT_OUT of them) and counted, instead of stopping the
        run. A dataset most of whose samples are unusable is damaged as a whole: an error."""
        if index in self.left_out:  # known from an earlier epoch: not read (nor warned) again
            return None
        self.samples_read += 1
        sample = None
        try:
            sample = self.samples.get(index, self.reads.pixels, self.reads.teacher)
            problem = sample_problem(sample, self.samples.metadata.get("tokenizer_vocab_size"))
        except Exception as error:  # noqa: BLE001 — damaged bytes raise many kinds (Pillow, numpy, ours)
            problem = f"{type(error).__name__}: {error}"
        if not problem:
            return sample
        self.left_out[index] = problem
        count = len(self.left_out)
        if count >= DAMAGED_MINIMUM and count * 2 > self.samples_read:
            raise DatasetFormatError(
                f"{self.samples.prefix}: {count} of the {self.samples_read} samples read could not be used (the last, "
                f"sample {index}: {problem}): the dataset is damaged; preprocess it again")
        if count <= NAMED_LEFT_OUT:
            name = f" ({sample['id']})" if sample and sample.get("id") else ""
            logger.warning("%s: sample %d%s left out of its sequence: %s (%d left out so far by this process%s)",
                           self.samples.prefix, index, name, problem, count,
                           "; later ones are counted, not named" if count == NAMED_LEFT_OUT else "")
        elif count % NAMED_LEFT_OUT_EVERY == 0:
            logger.warning("%s: %d samples left out so far by this process (the last, sample %d: %s)",
                           self.samples.prefix, count, index, problem)
        return None


def sample_problem(sample: Dict, vocab_size: Optional[int] = None) -> str:
    """What makes a stored sample unusable ("" if nothing): labels not aligned with the tokens, ids
    outside the tokenizer's vocabulary, or image-token positions that are not its images'
    1 + h(w + 1) each (the model would fail on the whole micro-batch)."""
    tokens, labels = sample["tokens"], sample["labels"]
    if len(tokens) != len(labels):
        return f"{len(tokens)} tokens but {len(labels)} labels"
    if vocab_size:
        text, supervised = tokens[tokens != IMAGE_TOKEN_INDEX], labels[labels != IGNORE_INDEX]
        outside = [int(ids.max() if ids.max() >= vocab_size else ids.min())
                   for ids in (text, supervised) if len(ids) and (ids.max() >= vocab_size or ids.min() < 0)]
        if outside:
            return f"token id {outside[0]} outside the tokenizer's {vocab_size}"
    positions = int((tokens == IMAGE_TOKEN_INDEX).sum())
    needed = sum(tokens_per_image(h, w) for h, w in sample["image_grids"])
    if positions != needed:
        return f"{positions} image-token positions but its {len(sample['image_grids'])} images need {needed}"
    if "teacher_images" in sample and len(sample["teacher_images"]) != len(sample["image_grids"]):
        return f"{len(sample['image_grids'])} images but {len(sample['teacher_images'])} teacher views"
    return ""


def assemble_sequence(samples: List[Dict], pad_to: Optional[int]) -> Dict:
    """Samples → one row: tokens, labels shifted per sample (Megatron convention: the target of
    position i, never crossing into the next sample), position ids restarting at 0, segment ids,
    and the images in order."""
    tokens, labels, positions, segments = [], [], [], []
    row = {"images": [], "teacher_images": [], "image_grids": []}
    for segment, sample in enumerate(samples):
        n = len(sample["tokens"])
        tokens.append(sample["tokens"])
        shifted = np.full(n, IGNORE_INDEX, dtype=np.int64)
        shifted[:-1] = sample["labels"][1:]
        labels.append(shifted)
        positions.append(np.arange(n))
        segments.append(np.full(n, segment))
        row["image_grids"] += sample["image_grids"]
        row["images"] += sample.get("images", [])
        row["teacher_images"] += sample.get("teacher_images", [])
    used = sum(len(t) for t in tokens)
    if pad_to is not None and pad_to > used:
        pad = pad_to - used
        tokens.append(np.zeros(pad, dtype=np.int64))
        labels.append(np.full(pad, IGNORE_INDEX, dtype=np.int64))
        positions.append(np.arange(pad))
        segments.append(np.full(pad, len(samples)))  # padding is a segment of its own
    row.update(
        tokens=np.concatenate(tokens).astype(np.int64),
        labels=np.concatenate(labels).astype(np.int64),
        position_ids=np.concatenate(positions).astype(np.int64),
        segment_ids=np.concatenate(segments).astype(np.int64),
        real_tokens=used,
        num_samples=len(samples),
        sample_lengths=[len(t) for t in tokens[: len(samples)]],
    )
    return row


class BlendedSequences:
    """Sequences of several prefixes interleaved by weight (megatron-core's blending helper)."""

    def __init__(self, datasets: List[PackedSequences], weights: List[float], size: Optional[int]):
        """size None: every sequence of every dataset once, interleaved by their sizes."""
        from megatron.core.datasets import helpers

        self.datasets = datasets
        if size is None:
            sizes = np.asarray([len(d) for d in datasets], dtype=np.int64)
            self.dataset_index = np.zeros(int(sizes.sum()), dtype=np.int16)
            self.dataset_sample_index = np.zeros(int(sizes.sum()), dtype=np.int64)
            helpers.build_exhaustive_blending_indices(self.dataset_index, self.dataset_sample_index,
                                                      sizes, len(datasets))
        else:
            weights = np.asarray(weights, dtype=np.float64)
            self.dataset_index = np.zeros(size, dtype=np.int16)
            self.dataset_sample_index = np.zeros(size, dtype=np.int64)
            helpers.build_blending_indices(self.dataset_index, self.dataset_sample_index,
                                           weights / weights.sum(), len(datasets), size, False)
        for d, dataset in enumerate(datasets):
            needed = int((self.dataset_index == d).sum())
            if needed > len(dataset):
                raise ValueError(f"blend asks {needed} sequences of {dataset.samples.prefix}, which has {len(dataset)}")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def locate(self, index: int) -> Tuple[PackedSequences, int]:
        return self.datasets[self.dataset_index[index]], int(self.dataset_sample_index[index])

    def __getitem__(self, index: int) -> Dict:
        dataset, inner = self.locate(index)
        return dataset[inner]


def build_datasets(config: DataConfig, seed: int, sizes: Sequence[Optional[int]] = (None, None, None),
                   reads: StageReads = StageReads()) -> Dict[str, Optional[BlendedSequences]]:
    """train / valid / test datasets of `sizes` sequences (None: one epoch of every prefix), shuffled
    and packed by `seed` (the run's --seed)."""
    sources = [(w, IndexedSamples(prefix)) for w, prefix in config.blend]
    _check_compatible([s for _, s in sources])
    out = {}
    for split_index, (name, size) in enumerate(zip(SPLITS, sizes)):
        ranges = [split_ranges(len(s), config.split)[split_index] for _, s in sources]
        if all(last == first for first, last in ranges):
            out[name] = None
            continue
        weights = [w if not math.isnan(w) else float(s.lengths[first:last].sum())
                   for (w, s), (first, last) in zip(sources, ranges)]
        total_weight = sum(weights)
        # Megatron's surplus keeps rounding in the blend from running a dataset dry.
        minimum = [None if size is None else int(math.ceil(size * w / total_weight * 1.005)) + 1
                   for w in weights]
        parts = [PackedSequences(s, first, last, config, seed, name, m, reads)
                 for (_, s), (first, last), m in zip(sources, ranges, minimum)]
        if name == "train":
            _check_sequences_left(parts, weights, config.seq_length)
        keep = [i for i, p in enumerate(parts) if len(p) and weights[i] > 0]
        if not keep:
            out[name] = None
            continue
        out[name] = BlendedSequences([parts[i] for i in keep], [weights[i] for i in keep], size)
    return out


def _check_sequences_left(parts: List[PackedSequences], weights: List[float], seq_length: int) -> None:
    """A weighted dataset whose training samples are all longer than a sequence would silently leave
    the blend: refused, naming it."""
    for part, weight in zip(parts, weights):
        if weight > 0 and not len(part) and part.too_long:
            raise ConfigError(f"{part.samples.prefix}: all {part.too_long} of its training samples are longer than "
                              f"--seq-length {seq_length}, so it would be left out of the blend: raise "
                              "--seq-length, or give it weight 0")


def _check_compatible(sources: List[IndexedSamples]) -> None:
    keys = ("image_size", "teacher_image_size", "patch_size", "conv_stride", "tokenizer_sha256")
    first = sources[0]
    for other in sources[1:]:
        different = [k for k in keys if other.metadata.get(k) != first.metadata.get(k)]
        if different:
            raise ValueError(f"{other.prefix} and {first.prefix} cannot be blended: they differ in {different}")
