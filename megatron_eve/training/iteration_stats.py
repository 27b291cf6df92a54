"""The scalars all ranks must agree on each iteration: one device tensor, one collective.

Each iteration the trainer needs to know whether any rank saw a non-finite loss or gradient (skip
the update), whether any rank must stop (SIGTERM, time limit), the LM and align losses (held by the
last pipeline stage) and the work done (tokens, samples, images, FLOPs over data-parallel
replicas). Every rank writes its share into one float64 vector on its own device, zero where
another rank counts a quantity, so that a single SUM all-reduce over the default group (NCCL on
GPU, gloo on CPU) yields each quantity exactly once. The host reads the three flags once per
iteration, since skipping the update depends on them; losses and work accumulate on the device
and are read once per log interval.
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

    def reduce(self, losses: Sequence[Dict[str, torch.Tensor]], grad_buffers: Sequence[torch.Tensor] = (),
               work: Optional[BatchWork] = None, sigterm: bool = False, over_time: bool = False) -> Dict[str, bool]:
        """One all-reduce of this iteration's vector; returns the flags (the one host read)."""
        host = [0.0] * SIZE
        host[SIGTERM], host[OVER_TIME] = float(sigterm), float(over_time)
        if self.counts_work and work is not None:
            host[WORK] = [float(getattr(work, name)) for name in _WORK]
        if self.counts_losses and losses:
            host[LOSS_COUNT] = float(len(losses))
        vector = torch.tensor(host, dtype=torch.float64).to(self.device, non_blocking=True)
        bad = nonfinite_count(grad_buffers, self.device)
        if losses:  # every rank holding losses checks them; only counts_losses ranks sum them
            stacked = torch.stack([torch.stack([m[k].detach().float().reshape(()) for k in LOSS_KEYS])
                                   for m in losses]).to(self.device)
            bad = bad + (~torch.isfinite(stacked).all()).to(torch.float64)
            if self.counts_losses:
                vector[LOSS_SUMS] += stacked.sum(0).to(torch.float64)
        vector[NONFINITE] += bad
        dist.all_reduce(vector)  # the default group: every rank of the job
        nonfinite, sigterm_any, over_time_any = vector[:3].tolist()
        self.total += torch.where(self._keep[nonfinite == 0], vector, 0.0)  # inf * 0 would be NaN
        self.iterations += 1
        self.last = vector
        return {"finite": nonfinite == 0, "sigterm": sigterm_any > 0, "over_time": over_time_any > 0}

    def last_losses(self) -> Dict[str, float]:
        """This iteration's mean losses (a host read: for messages on the rare paths)."""
        return _losses(self.last.tolist()) if self.last is not None else {k: float("nan") for k in LOSS_KEYS}

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
