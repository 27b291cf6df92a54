"""Datasets of packed sequences over preprocessed prefixes, with Megatron's blends and splits.

`--data-path 0.7 A 0.3 B --split 98,2,0`: each prefix's samples are split into contiguous
train / valid / test ranges; within a split, samples are shuffled and packed per epoch (seeded by
seed, the split's content and name, and epoch, so every rank and every resumed run builds the same
plan, which is cached beside the data: plan_cache.py); the prefixes' sequences are interleaved by
megatron-core's blending helper in proportion to the weights. A prefix with no usable sample in a
split (an empty dataset, a split range too small to hold one) is left out of that split's blend
with a warning, the others' weights re-normalised. A dataset item is one packed sequence, ready
for collation.
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
from megatron_eve.ranks import is_rank_zero

logger = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")
PLANS_SUFFIX = ".plans"  # PREFIX.plans/: the packing-plan cache beside the data, by default
NAMED_LEFT_OUT = 20  # unusable samples named one by one; later ones are counted ...
NAMED_LEFT_OUT_EVERY = 1000  # ... in a line every this many
DAMAGED_MINIMUM = 100  # this many unusable samples, over half of those read: the dataset is damaged
ALL_UNUSABLE_MINIMUM = 10  # ... as it is when the first this many read are all unusable (a small dataset)


@dataclass(frozen=True)
class StageReads:
    """What this pipeline stage keeps of a sample's images (derived per rank, not an option): the
    first the pixels, the last the teacher's views (when the run trains the aligner); middle stages
    only tokens and image grids. Every stage decodes every view some stage keeps (teacher views when
    the run aligns): whether a damaged image leaves its sample out must not depend on the stage, or
    the stages of one micro-batch would build different rows."""

    pixels: bool = True
    teacher: bool = True
    aligned: bool = True  # whether the run trains the aligner: the teacher's views are read by its last stage


def split_shares(split: str) -> List[float]:
    """--split's train / valid / test weights, normalised as megatron-core does (numpy's sum: Python's
    rounds differently since 3.12)."""
    try:
        weights = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"--split {split!r}: give three non-negative weights, e.g. 98,2,0") from None
    weights += [0.0] * (3 - len(weights))
    if len(weights) != 3 or not all(0 <= w < math.inf for w in weights) or not 0 < sum(weights) < math.inf:
        raise ValueError(f"--split {split!r}: give three non-negative weights, e.g. 98,2,0")
    array = np.asarray(weights, dtype=np.float64)
    return (array / np.sum(array)).tolist()


def split_ranges(count: int, split: str) -> List[Tuple[int, int]]:
    """Megatron's split rule: contiguous [start, end) per train / valid / test, computed as
    megatron-core does (cumulative bookends summed left to right, each rounded), so a prefix splits
    here exactly as it does in Megatron-LM."""
    bookends = [0.0]
    for share in split_shares(split):
        bookends.append(bookends[-1] + share)
    ranges = []
    for begin, end in zip(bookends[:-1], bookends[1:]):
        first = int(round(begin * float(count)))
        # A split of weight 0 is None in megatron-core: no samples.
        ranges.append((first, int(round(end * float(count))) if end > begin else first))
    return ranges


def content_stream(lengths_digest: str, split: str, first: int, last: int, count: int) -> int:
    """The shuffle stream of a prefix's split, from its content (lengths, range, size) and the
    split's name, never from how its path is spelled: a job resubmitted with another spelling
    of --data-path (relative, absolute, a copy elsewhere) resumes in the same order."""
    text = f"{lengths_digest}|{split}|{first}|{last}|{count}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


class PackedSequences:
    """One prefix's split as packed sequences, epoch after epoch until `minimum` are planned."""

    def __init__(self, samples: IndexedSamples, first: int, last: int, config: DataConfig, seed: int,
                 split: str, minimum: Optional[int] = None, reads: StageReads = StageReads()):
        self.samples, self.config, self.reads = samples, config, reads
        self.left_out: Dict[int, str] = {}  # sample index -> why it could not be used (_read)
        self.samples_read = 0  # samples this process tried to read, for the share of them left out
        self.sample_ids = np.arange(first, last, dtype=np.int64)
        lengths = samples.lengths[first:last]
        digest = lengths_sha256(lengths)
        stream = content_stream(digest, split, first, last, len(samples))
        key = PlanKey(split, first, last, digest, seed, stream, config.seq_length,
                      config.pack, config.packing_buffer_size if config.pack else 0)
        self.plans: List[PackingPlan] = cached_plans(
            lengths, key, minimum, config.data_cache_path or samples.prefix + PLANS_SUFFIX,
            f"{os.path.basename(samples.prefix)}.{split}")
        self.epoch_starts = [0]
        for plan in self.plans:
            self.epoch_starts.append(self.epoch_starts[-1] + len(plan))
        # From the lengths, not a plan: no plan is made when no sample fits.
        self.too_long = int((lengths > config.seq_length).sum())

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
            sample = self.samples.get(index, pixels=True, teacher=self.reads.aligned)
            problem = sample_problem(sample, self.samples.metadata.get("tokenizer_vocab_size"))
            if not self.reads.pixels:
                del sample["images"]  # decoded to decide alike on every stage; the grids are what is kept
            if not self.reads.teacher:
                sample.pop("teacher_images", None)
        except Exception as error:  # noqa: BLE001 — damaged bytes raise many kinds (Pillow, numpy, ours)
            problem = f"{type(error).__name__}: {error}"
        if not problem:
            return sample
        self.left_out[index] = problem
        count = len(self.left_out)
        if (count >= DAMAGED_MINIMUM and count * 2 > self.samples_read) or count == self.samples_read >= min(
                ALL_UNUSABLE_MINIMUM, len(self.sample_ids)):
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
    sources = _blend_sources(config)
    out = {}
    for split_index, (name, size) in enumerate(zip(SPLITS, sizes)):
        ranges = [split_ranges(len(s), config.split)[split_index] for _, s in sources]
        if not split_shares(config.split)[split_index]:  # no split asked for: no warning about its datasets
            out[name] = None
            continue
        used = _in_split(sources, ranges, name, config)
        if not used:
            out[name] = None
            continue
        # Unweighted: by the tokens a dataset can give, those of its samples that fit --seq-length.
        weights = [w if not math.isnan(w) else float(_fitting_tokens(s.lengths[first:last], config.seq_length))
                   for (w, s), (first, last) in ((sources[i], ranges[i]) for i in used)]
        total_weight = sum(weights)  # over the datasets in this split only: the weights re-normalised
        # Megatron's surplus keeps rounding in the blend from running a dataset dry.
        minimum = [None if size is None else int(math.ceil(size * w / total_weight * 1.005)) + 1
                   for w in weights]
        parts = [PackedSequences(sources[i][1], *ranges[i], config, seed, name, m, reads)
                 for i, m in zip(used, minimum)]
        if name == "train" and size is not None and is_rank_zero():
            for part, weight in zip(parts, weights):  # the reference trains one epoch: is that what was asked?
                epoch = len(part.plans[0]) if part.plans else 0
                logger.info("%s: training takes %.2f epochs of its train split (%d packed sequences an epoch)",
                            part.samples.prefix, size * weight / total_weight / max(epoch, 1), epoch)
        out[name] = BlendedSequences(parts, weights, size)
    return out


def _fitting_tokens(lengths: np.ndarray, seq_length: int) -> int:
    return int(lengths[lengths <= seq_length].sum())


def check_blend(config: DataConfig) -> None:
    """The blend's errors build_datasets would raise (every dataset empty, datasets that cannot be
    blended, no dataset left in the training split, a weighted one whose training samples are all
    too long), from the indexes alone: for a check before any model is built."""
    sources = _blend_sources(config)
    if split_shares(config.split)[0]:
        _in_split(sources, [split_ranges(len(s), config.split)[0] for _, s in sources], "train", config)


def _blend_sources(config: DataConfig) -> List[Tuple[float, IndexedSamples]]:
    """(weight, samples) of every non-empty dataset of --data-path, checked to blend together."""
    sources = _non_empty([(w, IndexedSamples(prefix)) for w, prefix in config.blend])
    _check_compatible([s for _, s in sources])
    return sources


_dropped_warned = set()  # (prefix, split) already warned about, one line per run each


def _warn_once(prefix: str, split: str, message: str, *args) -> None:
    """A warning every rank would give alike: logged by global rank 0, once per prefix and split."""
    if (prefix, split) not in _dropped_warned and is_rank_zero():
        _dropped_warned.add((prefix, split))
        logger.warning(message, *args)


def _non_empty(sources: List[Tuple[float, IndexedSamples]]) -> List[Tuple[float, IndexedSamples]]:
    """The datasets that hold samples; an empty one (preprocess_data --partitions writes one for an
    empty partition) is left out of every split with a warning, and all of them empty is an error."""
    empty = [s.prefix for _, s in sources if not len(s)]
    if len(empty) == len(sources):
        raise ConfigError(f"--data-path: every dataset is empty (0 samples): {', '.join(empty)}")
    for prefix in empty:
        _warn_once(prefix, "all", "%s: an empty dataset (0 samples): left out of the blend", prefix)
    return [(w, s) for w, s in sources if len(s)]


def _in_split(sources: List[Tuple[float, IndexedSamples]], ranges: List[Tuple[int, int]], split: str,
              config: DataConfig) -> List[int]:
    """The indices of the datasets in this split's blend: those of weight > 0 (NaN: by size) with a
    sample that fits in a sequence in their range. Decided before any weight is normalised, so the
    blend never asks a dataset for sequences it does not have: a weighted dataset without such a
    sample leaves the split's blend with a warning naming it; in the training split, every sample
    too long, or no dataset left, is an error."""
    used, dropped = [], []
    for index, ((weight, samples), (first, last)) in enumerate(zip(sources, ranges)):
        if weight == 0:  # left out on purpose
            continue
        too_long = int((samples.lengths[first:last] > config.seq_length).sum())
        if too_long:  # once: check_blend (before the model) and build_datasets both get here
            _warn_once(samples.prefix, f"{split} too long", "%s (%s): %d samples longer than seq-length %d are "
                       "left out", samples.prefix, split, too_long, config.seq_length)
        if too_long < last - first:
            used.append(index)
        elif too_long and split == "train":
            raise ConfigError(f"{samples.prefix}: all {too_long} of its training samples are longer than "
                              f"--seq-length {config.seq_length}, so it would be left out of the blend: raise "
                              "--seq-length, or give it weight 0")
        else:
            why = (f"all {too_long} of its {split} samples are longer than --seq-length {config.seq_length}"
                   if too_long else f"--split {config.split} gives its {len(samples)} samples none in {split}")
            dropped.append(f"{samples.prefix} ({why})")
            _warn_once(samples.prefix, split, "%s: %s: left out of the %s blend, the other datasets' weights "
                       "re-normalised", samples.prefix, why, split)
    if split == "train" and dropped and not used:
        raise ConfigError(f"--data-path: no dataset has a training sample: {'; '.join(dropped)}")
    return used


def _check_compatible(sources: List[IndexedSamples]) -> None:
    keys = ("image_size", "teacher_image_size", "patch_size", "conv_stride", "tokenizer_sha256")
    first = sources[0]
    for other in sources[1:]:
        different = [k for k in keys if other.metadata.get(k) != first.metadata.get(k)]
        if different:
            raise ValueError(f"{other.prefix} and {first.prefix} cannot be blended: they differ in {different}")
