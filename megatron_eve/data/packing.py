"""Packing samples into fixed-length sequences.

Samples are taken in a shuffled order, a buffer at a time; inside a buffer, best-fit decreasing
puts each sample (longest first) into the open sequence with the least room that still fits it.
The plan is a CSR pair: sequence k holds samples order[offsets[k]:offsets[k + 1]].
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np


@dataclass
class PackingPlan:
    offsets: np.ndarray  # int64 [num_sequences + 1]
    order: np.ndarray  # int64 sample indices, grouped by sequence
    too_long: int = 0  # samples longer than a sequence, left out

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sequence(self, index: int) -> np.ndarray:
        return self.order[self.offsets[index] : self.offsets[index + 1]]


def _best_fit_decreasing(lengths: np.ndarray, capacity: int) -> Tuple[np.ndarray, int]:
    """Bin id per item; bins numbered in creation order."""
    order = np.argsort(-lengths, kind="stable")
    free = []  # sorted (room, bin) of bins that can still take the shortest item
    shortest = int(lengths.min())
    bins = np.empty(len(lengths), dtype=np.int64)
    count = 0
    for item in order:
        length = int(lengths[item])
        slot = bisect_left(free, (length, -1))
        if slot < len(free):
            room, target = free.pop(slot)
            room -= length
        else:
            target, room = count, capacity - length
            count += 1
        bins[item] = target
        if room >= shortest:
            insort(free, (room, target))
    return bins, count


def pack(lengths: np.ndarray, capacity: int, buffer_size: int, rng: np.random.Generator) -> PackingPlan:
    """Plan sequences of at most `capacity` positions over samples with these lengths."""
    lengths = np.asarray(lengths, dtype=np.int64)
    fits = np.nonzero(lengths <= capacity)[0]
    shuffled = fits[rng.permutation(len(fits))]
    sequences = []
    for start in range(0, len(shuffled), buffer_size):
        chunk = shuffled[start : start + buffer_size]
        bins, count = _best_fit_decreasing(lengths[chunk], capacity)
        grouped = np.argsort(bins, kind="stable")
        bounds = np.searchsorted(bins[grouped], np.arange(count + 1))
        sequences.extend(chunk[grouped[bounds[k] : bounds[k + 1]]] for k in range(count))
    # Best fit opens sequences longest-first; shuffle so lengths do not trend within an epoch.
    sequences = [sequences[k] for k in rng.permutation(len(sequences))]
    return _plan(sequences, too_long=len(lengths) - len(fits))


def one_per_sequence(lengths: np.ndarray, capacity: int, rng: np.random.Generator) -> PackingPlan:
    """No packing: every sample is its own sequence (padded to the longest of its micro-batch)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    fits = np.nonzero(lengths <= capacity)[0]
    return _plan([np.asarray([i]) for i in fits[rng.permutation(len(fits))]], len(lengths) - len(fits))


def plan_epochs(lengths: np.ndarray, capacity: int, buffer_size: Optional[int], seed: Sequence[int],
                minimum: Optional[int], plans: Sequence[PackingPlan] = ()) -> List[PackingPlan]:
    """Epoch after epoch of plans until `minimum` sequences are planned (None: one epoch); epoch e
    is shuffled by default_rng([*seed, e]), so any epoch can be planned alone. `plans` are epochs
    already planned (read from a cache): they are kept and continued. buffer_size None: no packing.
    An empty epoch (no sample fits) ends the list."""
    plans = list(plans)
    total = sum(len(p) for p in plans)
    while not plans or (minimum is not None and total < minimum):
        rng = np.random.default_rng([*seed, len(plans)])
        plan = (pack(lengths, capacity, buffer_size, rng) if buffer_size is not None
                else one_per_sequence(lengths, capacity, rng))
        if len(plan) == 0:
            break
        plans.append(plan)
        total += len(plan)
    return plans


def epochs_needed(sizes: Sequence[int], minimum: Optional[int]) -> int:
    """How many of epochs with these sequence counts `plan_epochs` keeps for `minimum`."""
    total = 0
    for count, size in enumerate(sizes, 1):
        total += size
        if minimum is None or total >= minimum:
            return count
    return len(sizes)


def _plan(sequences, too_long: int) -> PackingPlan:
    sizes = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    order = np.concatenate(sequences).astype(np.int64) if sequences else np.zeros(0, dtype=np.int64)
    return PackingPlan(offsets, order, too_long)


def efficiency(plan: PackingPlan, lengths: np.ndarray, capacity: int) -> float:
    """Real positions / capacity of the planned sequences."""
    if len(plan) == 0:
        return 0.0
    return float(np.asarray(lengths)[plan.order].sum()) / (len(plan) * capacity)


def group_by_length(order: np.ndarray, lengths: np.ndarray, batch_size: int, megabatch: int = 50) -> np.ndarray:
    """`order` (sample indices) regrouped as HF Trainer's group_by_length sampler (and LLaVA's SFT)
    does: megabatches of `megabatch` micro-batches, each sorted longest first — what a padded
    baseline gets instead of packing."""
    order = np.asarray(order)
    size = megabatch * batch_size
    chunks = [order[i : i + size] for i in range(0, len(order), size)]
    return np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks]) if chunks else order
