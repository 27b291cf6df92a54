#!/usr/bin/env python3
"""How long tensor-parallel ranks wait for their micro-batch: the TP feed with and without prefetch.

Launches itself under torchrun (--nproc-per-node ranks, one tensor-parallel group, gloo on CPU;
on GPU machines the micro-batches still travel over gloo, as in training). TP rank 0 "reads" a
synthetic collated micro-batch of about --mib MiB (uint8 crops, int64 tokens and labels, as the
loader makes) and sends it; the other ranks receive it. Between micro-batches every rank "computes"
(sleeps --compute-ms). For each mode

  sync      data.broadcast.GroupFeed on the TP group: each batch read and sent when asked for
            (what training did before prefetching)
  prefetch  data.broadcast.MicroBatchFeed: the next batch's read and transfer run on a thread of
            their own while the current one is computed

it prints the time `next()` takes per micro-batch on the receivers (the wait the training step
sees; mean / median / p90 / max over --batches micro-batches and all receiving ranks) and on the
reader, and the wall time per micro-batch (compute included).

  python tools/bench_broadcast.py --mib 8 --compute-ms 0 10 30 100
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_batch(mib: float, seq_length: int = 2048):
    """About `mib` MiB as the loader collates it: HWC uint8 crops viewed CHW, tokens, labels."""
    import torch

    rows = 2
    tokens = torch.randint(0, 32000, (rows, seq_length))
    crop_bytes = 3 * 448 * 448
    crops = max(1, round((mib * 2 ** 20 - 2 * tokens.numel() * 8) / crop_bytes))
    images = [torch.randint(0, 256, (448, 448, 3), dtype=torch.uint8).permute(2, 0, 1) for _ in range(crops)]
    return {"tokens": tokens, "labels": tokens.clone(), "images": images,
            "image_grid_hw": [(32, 32)] * crops, "max_seqlen": seq_length}


def summary(seconds):
    ms = sorted(1000 * s for s in seconds)
    return {"mean": statistics.fmean(ms), "median": statistics.median(ms),
            "p90": ms[min(len(ms) - 1, int(0.9 * len(ms)))], "max": ms[-1]}


def worker(args):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_eve import distributed
    from megatron_eve.config import ParallelConfig
    from megatron_eve.data.broadcast import GroupFeed, MicroBatchFeed

    world = int(os.environ["WORLD_SIZE"])
    distributed.initialize(ParallelConfig(world, 1))
    group, src = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_src_rank()
    reads = ps.get_tensor_model_parallel_rank() == 0
    batch = synthetic_batch(args.mib)
    results = []
    for compute_ms in args.compute_ms:
        for mode in ("sync", "prefetch"):
            if mode == "sync":
                feed = GroupFeed(group, src)

                def take():
                    return feed.send(lambda: batch) if reads else feed.receive()
            else:
                stream = MicroBatchFeed(group, src, (lambda: batch) if reads else None)

                def take():
                    return next(stream)
            for _ in range(args.warmup):
                take()
                time.sleep(compute_ms / 1000)
            dist.barrier()
            waits, started = [], time.perf_counter()
            for _ in range(args.batches):
                tick = time.perf_counter()
                take()
                waits.append(time.perf_counter() - tick)
                time.sleep(compute_ms / 1000)
            per_batch = (time.perf_counter() - started) / args.batches
            if mode == "prefetch":
                stream.close()
            everyone = [None] * world
            dist.all_gather_object(everyone, (reads, waits, per_batch))
            receivers = [w for r, ws, _ in everyone if not r for w in ws]
            reader = [w for r, ws, _ in everyone if r for w in ws]
            results.append({"mode": mode, "compute_ms": compute_ms, "receivers": summary(receivers),
                            "reader": summary(reader), "per_batch_ms": 1000 * max(p for _, _, p in everyone)})
    if dist.get_rank() == 0:
        wire = sum(t.numel() * t.element_size() for t in [batch["tokens"], batch["labels"], *batch["images"]])
        print("RESULT " + json.dumps({"ranks": world, "mib": wire / 2 ** 20, "batches": args.batches,
                                      "results": results}), flush=True)
    distributed.destroy()


def report(summary) -> str:
    lines = [f"{summary['ranks']} TP ranks over gloo, {summary['mib']:.1f} MiB micro-batches, "
             f"{summary['batches']} per mode; next() wait in ms",
             f"{'compute ms':>10} {'mode':<9} {'receivers: mean':>15} {'median':>7} {'p90':>7} {'max':>7} "
             f"{'reader: mean':>12} {'max':>7} {'ms/micro-batch':>15}"]
    for r in summary["results"]:
        w, s = r["receivers"], r["reader"]
        lines.append(f"{r['compute_ms']:>10g} {r['mode']:<9} {w['mean']:>15.2f} {w['median']:>7.2f} {w['p90']:>7.2f} "
                     f"{w['max']:>7.2f} {s['mean']:>12.2f} {s['max']:>7.2f} {r['per_batch_ms']:>15.1f}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--nproc-per-node", type=int, default=2, help="tensor-parallel ranks")
    parser.add_argument("--mib", type=float, default=8.0, help="size of one micro-batch")
    parser.add_argument("--compute-ms", type=float, nargs="+", default=[0.0, 10.0, 30.0, 100.0],
                        help="the fake compute between micro-batches (one run per value)")
    parser.add_argument("--batches", type=int, default=40, help="micro-batches measured per mode")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from tools.torchrun_workers import run_workers

    result = run_workers(__file__, args.nproc_per_node, ["--mib", args.mib, "--batches", args.batches,
                                                         "--warmup", args.warmup, "--compute-ms", *args.compute_ms])
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
