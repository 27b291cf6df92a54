#!/usr/bin/env python3
"""Checkpoint save cost of the distributed optimizer's two formats, sync and --async-save.

Launches itself under torchrun (--nproc-per-node ranks, data-parallel, gloo on CPU / NCCL on GPU)
with an EVE language model of the given size (aligner off, tiny vision side) and the distributed
optimizer after one Adam step, then saves it with each combination of

  format  dp_reshardable (the default: each data-parallel rank writes its own shard)
          fully_reshardable (--dist-ckpt-optim-fully-reshardable: gathered over data-parallel ranks)
  mode    sync, async (--async-save: a forked process writes, training goes on)

and prints per combination, the maximum over ranks of
  blocked   seconds until save() returns (training waits this long)
  total     seconds until the checkpoint is published (checksums, rename, marker)
  peak RSS  the training process's resident memory above its level before the save, sampled
            every 2 ms from /proc/self/status while saving (the forked writer's own pages are
            not counted: with fork they are shared copy-on-write with the trainer)
  size      bytes of the checkpoint directory.

  python tools/bench_checkpoint.py --hidden-size 1024 --num-layers 4 --ffn-hidden-size 4096   # CPU, 2 ranks
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COMBINATIONS = [("dp_reshardable", False), ("dp_reshardable", True),
                ("fully_reshardable", False), ("fully_reshardable", True)]


def rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """The highest RSS seen by a sampling thread while the block runs, above the level at entry."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self.base = interval, 0, 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def increase(self) -> int:
        return self.peak - self.base


def directory_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def worker(args) -> None:
    import gc

    import torch.distributed as dist

    from megatron_eve import distributed
    from megatron_eve.config import (CheckpointConfig, DataConfig, LoggingConfig, OptimConfig, ParallelConfig,
                                     RuntimeConfig, ScheduleConfig, TrainingJob, get_preset, replace)
    from megatron_eve.model.build import build_model
    from megatron_eve.training import checkpoint
    from megatron_eve.training.checkpoint_records import checkpoint_dir
    from megatron_eve.training.optim import build_optimizer, build_scheduler, wrap_model

    distributed.initialize(ParallelConfig(), seed=1)
    rank = dist.get_rank()
    cfg = replace(get_preset("tiny"), **{"aligner.enabled": False, "language.hidden_size": args.hidden_size,
                                    "language.num_layers": args.num_layers,
                                    "language.ffn_hidden_size": args.ffn_hidden_size,
                                    "language.num_attention_heads": args.num_attention_heads,
                                    "language.num_query_groups": args.num_attention_heads,
                                    "language.vocab_size": args.vocab_size})
    model = build_model(cfg, ParallelConfig(), RuntimeConfig(use_cpu_initialization=True), load_teacher=False)
    job = TrainingJob(cfg, ParallelConfig(), RuntimeConfig(), OptimConfig(lr=1e-4, use_distributed_optimizer=True),
                      ScheduleConfig(train_iters=10), DataConfig(), CheckpointConfig(), LoggingConfig())
    ddp = wrap_model(model, job)
    optimizer = build_optimizer(ddp, job)
    scheduler = build_scheduler(optimizer, job)
    for buffer in ddp.buffers:
        buffer.grad_data.normal_(0, 1e-3)
    optimizer.step()  # Adam's moments now exist
    parameters = sum(p.numel() for p in model.parameters())

    # Untimed: the first save pays one-off costs (imports, the first fork) that no later save does.
    for asynchronous in (False, True):
        job.checkpoint = CheckpointConfig(save=os.path.join(args.directory, "warm-up"), async_save=asynchronous)
        checkpoint.save(job, ddp, optimizer, scheduler, checkpoint.TrainState(iteration=0))
        checkpoint.finalize_async_saves(blocking=True)
    if rank == 0:
        shutil.rmtree(os.path.join(args.directory, "warm-up"), ignore_errors=True)

    results = []
    for index, (fmt, asynchronous) in enumerate(COMBINATIONS):
        root = os.path.join(args.directory, f"{fmt}-{'async' if asynchronous else 'sync'}")
        job.checkpoint = CheckpointConfig(save=root, async_save=asynchronous,
                                          dist_ckpt_optim_fully_reshardable=fmt == "fully_reshardable")
        gc.collect()
        dist.barrier()
        with PeakRss() as rss:
            start = time.perf_counter()
            checkpoint.save(job, ddp, optimizer, scheduler, checkpoint.TrainState(iteration=index + 1))
            blocked = time.perf_counter() - start
            checkpoint.finalize_async_saves(blocking=True)
            total = time.perf_counter() - start
        mine = {"blocked_s": blocked, "total_s": total, "peak_rss_increase_bytes": rss.increase}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            row = {"format": fmt, "mode": "async" if asynchronous else "sync",
                   **{k: max(part[k] for part in gathered) for k in mine},
                   "checkpoint_bytes": directory_bytes(checkpoint_dir(root, index + 1))}
            results.append(row)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
    if rank == 0:
        summary = {"ranks": dist.get_world_size(), "parameters": parameters,
                   "fp32_param_and_adam_bytes": parameters * 12, "results": results}
        print("RESULT " + json.dumps(summary), flush=True)
    distributed.destroy()


def report(summary) -> str:
    lines = [f"{summary['ranks']} data-parallel ranks, {summary['parameters'] / 1e6:.1f}M parameters "
             f"({summary['fp32_param_and_adam_bytes'] / 2**20:.0f} MiB fp32 params + Adam moments in all)",
             f"{'format':<18} {'mode':<6} {'blocked s':>10} {'total s':>9} {'peak RSS +MiB':>14} {'size MiB':>9}"]
    for r in summary["results"]:
        lines.append(f"{r['format']:<18} {r['mode']:<6} {r['blocked_s']:>10.2f} {r['total_s']:>9.2f} "
                     f"{r['peak_rss_increase_bytes'] / 2**20:>14.0f} {r['checkpoint_bytes'] / 2**20:>9.0f}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--nproc-per-node", type=int, default=2, help="data-parallel ranks")
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--ffn-hidden-size", type=int, default=4096)
    parser.add_argument("--num-attention-heads", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--directory", default=None, help="where to save (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from tools.torchrun_workers import run_workers

    with tempfile.TemporaryDirectory() as scratch:
        worker_args = ["--directory", args.directory or scratch]
        for flag in ("hidden_size", "num_layers", "ffn_hidden_size", "num_attention_heads", "vocab_size"):
            worker_args += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
        summary = run_workers(__file__, args.nproc_per_node, worker_args)
    print(report(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
