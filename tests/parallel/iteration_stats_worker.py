"""Two gloo processes: IterationStats' one collective per iteration gives every rank the same flags,
losses counted once per data-parallel replica, work summed over replicas, and an interval mean
that leaves out the losses of a skipped (non-finite) iteration, also when that is known only after
the reduction. Rank 0 prints one JSON."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    from megatron_eve.training import iteration_stats
    from megatron_eve.training.iteration_stats import IterationStats
    from megatron_eve.training.metrics import BatchWork

    rank = dist.get_rank()
    calls = []
    real_all_reduce = dist.all_reduce

    def counted(tensor, *args, **kwargs):
        calls.append(str(tensor.device))
        return real_all_reduce(tensor, *args, **kwargs)

    iteration_stats.dist.all_reduce = counted

    def micro(lm, align):
        return {"lm loss": torch.tensor(lm), "align loss": torch.tensor(align)}

    ok = [torch.ones(4), torch.zeros(3)]
    work = BatchWork(real_tokens=10 * (rank + 1), positions=16, samples=2, images=1, flops=1e15)
    results = {}

    # Data parallel: both ranks count; rank r's micro-batch losses are (r+1, r+2) and (r+3, r+4).
    stats = IterationStats(torch.device("cpu"), counts_losses=True, counts_work=True)
    flags = stats.reduce([micro(rank + 1.0, rank + 2.0), micro(rank + 3.0, rank + 4.0)], ok, work,
                         sigterm=rank == 1)
    results["dp_flags"] = flags
    results["dp_last"] = stats.last_losses()
    bad_grad = [torch.ones(4), torch.tensor([1.0, float("nan")])] if rank == 1 else ok
    results["dp_nan_grad_flags"] = stats.reduce([micro(100.0, 100.0)], bad_grad, work)
    results["dp_inf_loss_flags"] = stats.reduce([micro(float("inf") if rank == 0 else 1.0, 0.0)], ok, work)
    # Launched, read later: a NaN loss on rank 1 only is every rank's device flag; finite losses whose
    # gradients turn out non-finite afterwards (their norm) are dropped from the interval.
    pending = stats.launch([micro(float("nan") if rank == 1 else 1.0, 0.0)], (), work)
    results["dp_pending_nan"] = {"nonfinite": float(pending.nonfinite), **pending.read()}
    pending = stats.launch([micro(50.0, 50.0)], (), work)
    results["dp_pending_ok"] = {"nonfinite": float(pending.nonfinite), **pending.read()}
    stats.drop_last_losses()
    interval = stats.read_interval()
    results["dp_interval"] = {"losses": interval.losses, "iterations": interval.iterations,
                              "real_tokens": interval.work.real_tokens, "samples": interval.work.samples,
                              "flops": interval.work.flops}
    results["dp_after_read"] = stats.read_interval().iterations

    # Tensor parallel: both ranks hold the same losses and batch; only rank 0 counts them.
    stats = IterationStats(torch.device("cpu"), counts_losses=rank == 0, counts_work=rank == 0)
    stats.reduce([micro(2.0, 0.5)], ok, work, over_time=rank == 0)
    interval = stats.read_interval()
    results["tp_interval"] = {"losses": interval.losses, "real_tokens": interval.work.real_tokens}

    # Evaluation keeps a NaN as it is.
    stats = IterationStats(torch.device("cpu"), counts_losses=True, counts_work=False,
                           drop_nonfinite_losses=False)
    stats.reduce([micro(float("nan"), 0.0)])
    results["eval_nan"] = stats.read_interval().losses["lm loss"]
    results["collectives"] = len(calls)
    results["collective_devices"] = sorted(set(calls))
    if rank == 0:
        print(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
