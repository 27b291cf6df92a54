"""The scalars all ranks must agree on each iteration: one device tensor, one collective.

Each iteration the trainer needs to know whether any rank saw a non-finite loss or gradient (skip
the update), whether any rank must stop (SIGTERM, time limit), the LM and align losses (held by the
last pipeline stage) and the work done (tokens, samples, images, FLOPs over data-parallel
replicas). Every rank writes its share into one float64 vector on its own device, zero where
another rank counts a quantity, so that a single SUM all-reduce over the default group (NCCL on
GPU, gloo on CPU) yields each quantity exactly once. The host reads the three flags once per
iteration (the loop's decisions depend on them), from a copy made as soon as the all-reduce is done,
so a read after the optimizer step's own wait costs nothing; that copy holds the whole vector, so the
iteration's own losses come with the flags (TensorBoard's per-iteration values, no other host read).
Losses and work also accumulate on the device and are read once per log interval.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_eve.training.metrics import BatchWork

LOSS_KEYS = ("lm loss", "align loss")
_WORK = ("real_tokens", "positions", "samples", "images", "flops")
# Vector layout.
NONFINITE, SIGTERM, OVER_TIME = 0, 1, 2
LOSS_SUMS = slice(3, 3 + len(LOSS_KEYS))
LOSS_COUNT = 3 + len(LOSS_KEYS)  # micro-batches whose losses were summed
WORK = slice(LOSS_COUNT + 1, LOSS_COUNT + 1 + len(_WORK))
SIZE = WORK.stop


def nonfinite_count(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """How many of `tensors` hold a NaN or Inf, as a device scalar (no host sync).

    One fp32-accumulated sum per tensor reads a gradient buffer once without allocating a mask
    of its size; NaN and Inf survive a sum, and gradients whose sum overflows fp32 (3e38) are as
    broken as a NaN."""
    flags = [~torch.isfinite(t.sum(dtype=torch.float32)) for t in tensors if t.numel()]
    if not flags:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack(flags).sum().to(torch.float64)


class IterationStats:
    """Reduces one iteration's scalars; accumulates losses and work until `read_interval`.

    counts_losses: this rank contributes the losses (last pipeline stage, tensor-parallel rank 0:
      one rank per data-parallel replica). counts_work: this rank contributes the replica's work
      (first pipeline stage, tensor-parallel rank 0). drop_nonfinite_losses: leave the losses of a
    non-finite iteration out of the interval's mean (training skips that update; evaluation
    reports NaN as it is).
    """

    def __init__(self, device: torch.device, counts_losses: bool, counts_work: bool,
                 drop_nonfinite_losses: bool = True):
        self.device, self.counts_losses, self.counts_work = device, counts_losses, counts_work
        self.total = torch.zeros(SIZE, dtype=torch.float64, device=device)
        self.iterations = 0
        # Which entries a finite / non-finite iteration adds to the interval (work always counts;
        # the losses of a skipped update would only poison the mean).
        self._keep = {finite: torch.tensor([False] * 3 + [finite or not drop_nonfinite_losses] * (LOSS_COUNT - 2)
                                           + [True] * len(_WORK), device=device)
                      for finite in (True, False)}
        self.last: Optional[torch.Tensor] = None
        self.last_read: Optional[List[float]] = None  # the last iteration's reduced vector, as read with its flags

    def reduce(self, losses: Sequence[Dict[str, torch.Tensor]], grad_buffers: Sequence[torch.Tensor] = (),
               work: Optional[BatchWork] = None, sigterm: bool = False, over_time: bool = False) -> Dict[str, bool]:
        """One all-reduce of this iteration's vector; returns the flags (the one host read)."""
        return self.launch(losses, grad_buffers, work, sigterm, over_time).read()

    def launch(self, losses: Sequence[Dict[str, torch.Tensor]], grad_buffers: Sequence[torch.Tensor] = (),
               work: Optional[BatchWork] = None, sigterm: bool = False, over_time: bool = False) -> "PendingFlags":
        """The all-reduce of this iteration's vector, without waiting for it: the flags come with
        `PendingFlags.read`, the device's non-finite flag at once (`PendingFlags.nonfinite`)."""
        host = [0.0] * SIZE
        host[SIGTERM], host[OVER_TIME] = float(sigterm), float(over_time)
        if self.counts_work and work is not None:
            host[WORK] = [float(getattr(work, name)) for name in _WORK]
        if self.counts_losses and losses:
            host[LOSS_COUNT] = float(len(losses))
        # From pinned memory on CUDA: a pageable copy may make the driver wait for the stream first.
        vector = torch.tensor(host, dtype=torch.float64, pin_memory=self.device.type == "cuda").to(
            self.device, non_blocking=True)
        bad = nonfinite_count(grad_buffers, self.device)
        if losses:  # every rank holding losses checks them; only counts_losses ranks sum them
            stacked = torch.stack([torch.stack([m[k].detach().float().reshape(()) for k in LOSS_KEYS])
                                   for m in losses]).to(self.device)
            bad = bad + (~torch.isfinite(stacked).all()).to(torch.float64)
            if self.counts_losses:
                vector[LOSS_SUMS] += stacked.sum(0).to(torch.float64)
        vector[NONFINITE] += bad
        dist.all_reduce(vector)  # the default group: every rank of the job
        # inf * 0 would be NaN: entries left out are selected away, not multiplied.
        self.total += torch.where(self._kept(vector), vector, 0.0)
        self.iterations += 1
        self.last = vector
        self.last_read = None
        return PendingFlags(vector, self)

    def drop_last_losses(self) -> None:
        """The last iteration turned out non-finite after its losses were counted (its gradients'
        norm, known later): leave its losses out of the interval, as a non-finite flag would have."""
        if self.last is not None:
            self.total -= torch.where(self._kept(self.last) & ~self._keep[False], self.last, 0.0)

    def _kept(self, vector: torch.Tensor) -> torch.Tensor:
        """Which entries of a reduced vector the interval counts (on the device: no host read)."""
        return torch.where(vector[NONFINITE] == 0, self._keep[True], self._keep[False])

    def last_losses(self) -> Dict[str, float]:
        """This iteration's mean losses (a host read: for messages on the rare paths)."""
        return _losses(self.last.tolist()) if self.last is not None else {k: float("nan") for k in LOSS_KEYS}

    def read_losses(self) -> Dict[str, float]:
        """The last iteration's mean losses, from the copy its flags were read from (no host read:
        only after the flags' read; NaN where no rank counted losses)."""
        assert self.last_read is not None, "read the iteration's flags first"
        return _losses(self.last_read)

    def read_interval(self) -> "IntervalTotals":
        """Losses (mean over the interval's finite iterations) and summed work; starts a new interval."""
        values = self.total.tolist()
        self.total.zero_()
        iterations, self.iterations = self.iterations, 0
        work = BatchWork(*(int(v) for v in values[WORK][:4]), float(values[WORK][4]))
        return IntervalTotals(_losses(values), work, iterations)


class IntervalTotals:
    def __init__(self, losses: Dict[str, float], work: BatchWork, iterations: int):
        self.losses, self.work, self.iterations = losses, work, iterations


def _losses(values: List[float]) -> Dict[str, float]:
    count = values[LOSS_COUNT]
    sums = values[LOSS_SUMS]
    return {key: (sums[i] / count if count else float("nan")) for i, key in enumerate(LOSS_KEYS)}


class PendingFlags:
    """An iteration's reduced vector on its way to the host: copied into pinned memory right after the
    all-reduce, with an event behind the copy, so that `read` waits for that point of the stream only
    (not for the work queued after it, such as the optimizer step). The flags are what `read` returns;
    the whole vector (the iteration's losses) goes to the IterationStats' `last_read`."""

    def __init__(self, vector: torch.Tensor, stats: Optional[IterationStats] = None):
        self.nonfinite = (vector[NONFINITE] > 0).float()  # 1.0 where some rank saw one: on the device
        self._stats, self._vector = stats, vector
        if vector.device.type == "cuda":
            self._host = torch.empty(SIZE, dtype=vector.dtype, pin_memory=True)
            self._host.copy_(vector, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host, self._ready = vector.clone(), None

    def read(self) -> Dict[str, bool]:
        if self._ready is not None:
            self._ready.synchronize()
        values = self._host.tolist()
        if self._stats is not None and self._stats.last is self._vector:  # (not an older iteration's)
            self._stats.last_read = values
        nonfinite, sigterm_any, over_time_any = values[:3]
        return {"finite": nonfinite == 0, "sigterm": sigterm_any > 0, "over_time": over_time_any > 0}
