"""Two processes (gloo) unless noted, the real trainer objects with the distributed optimizer:
optimizer formats, --async-save, resharding, kill -9 during a background save. Modes:

  formats ROOT   TP1/DP2: the default (data-parallel-sharded) format and the fully reshardable one,
                 sync and async; resume at TP1/DP2 (bitwise), then at TP2/DP1 (clear error / reshard);
                 the plain optimizer's format and the distributed one's into each other (refused).
                 Prints one JSON of observations.
  dp1 ROOT       one process, TP1/DP1: the DP2 default-format checkpoint of `formats` loads at DP1.
  hang ROOT      publishes iteration 1 (async), then starts the async save of iteration 2 whose writers
                 never finish (rank 0 writes its shard, rank 1 nothing), and trains on until killed.
  after ROOT     after `hang` was killed: what is marked latest loads and equals iteration 1's state;
                 saving again works.
tests/test_checkpoint.py asserts on the output."""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def setup(tp: int):
    from megatron.core import parallel_state

    from megatron_eve import distributed
    from megatron_eve.config import ParallelConfig

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    distributed.initialize(ParallelConfig(tensor_model_parallel_size=tp), seed=7)


def trainer(directory, tp=1, seed=0, steps=2, vision_lr=None, distributed=True, **checkpoint_options):
    """A model, DDP, distributed (or plain) optimizer (with Adam state from `steps` random-gradient steps)."""
    import torch

    from megatron_eve.config import (CheckpointConfig, DataConfig, LoggingConfig, OptimConfig, ParallelConfig,
                                     RuntimeConfig, ScheduleConfig, TrainingJob)
    from megatron_eve.model.build import build_model
    from megatron_eve.training.optim import build_optimizer, build_scheduler, wrap_model
    from tests.helpers import tiny_config

    cfg = tiny_config(changes={"aligner.enabled": False})
    torch.manual_seed(seed)
    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    model = build_model(cfg, parallel, RuntimeConfig(use_cpu_initialization=True), load_teacher=False)
    optim = OptimConfig(lr=1e-3, vision_lr=vision_lr, use_distributed_optimizer=distributed)
    job = TrainingJob(cfg, parallel, RuntimeConfig(), optim,
                      ScheduleConfig(train_iters=10), DataConfig(),
                      CheckpointConfig(save=directory, load=directory, **checkpoint_options), LoggingConfig())
    ddp = wrap_model(model, job)
    optimizer = build_optimizer(ddp, job)
    scheduler = build_scheduler(optimizer, job)
    for i in range(steps):
        step(ddp, optimizer, scheduler, 100 * seed + i)
    return job, model, ddp, optimizer, scheduler


def step(ddp, optimizer, scheduler, seed=12345):
    import torch

    generator = torch.Generator().manual_seed(seed)
    ddp.zero_grad_buffer()
    for buffer in ddp.buffers:
        buffer.grad_data.copy_(torch.randn(buffer.grad_data.shape, generator=generator) * 1e-2)
    optimizer.step()
    scheduler.step(increment=4)


def optimizer_state(optimizer):
    """This rank's fp32 main parameters and Adam moments, in order (cloned)."""
    out = []
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in sub.optimizer.param_groups:
            for p in group["params"]:
                out.append(p.detach().clone())
                out += [v.detach().clone() for _, v in sorted(sub.optimizer.state[p].items()) if hasattr(v, "shape")]
    return out


def weights(model):
    import torch

    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def equal(a, b):
    import torch

    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def all_ranks(flag: bool) -> bool:
    import torch
    import torch.distributed as dist

    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def common_state(directory):
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(directory)


def plain_tensors(directory):
    from megatron.core import dist_checkpointing

    return {k: v for k, v in dist_checkpointing.load_plain_tensors(directory).items() if hasattr(v, "shape")}


def formats(root):
    import torch.distributed as dist

    from megatron_eve.config import ConfigError
    from megatron_eve.training import checkpoint
    from megatron_eve.training.checkpoint_records import TRACKER, checkpoint_dir, latest_iteration
    from megatron_eve.training.checksums import CHECKSUMS

    out = {}
    setup(1)
    sync_dir, async_dir, full_dir = (os.path.join(root, name) for name in ("sync", "async", "full"))
    state = checkpoint.TrainState(iteration=3, consumed_samples=12)
    job, model, ddp, opt, sched = trainer(sync_dir, seed=1)
    saved_weights, saved_optimizer, saved_scheduler = weights(model), optimizer_state(opt), sched.state_dict()
    checkpoint.save(job, ddp, opt, sched, state)
    common = common_state(checkpoint_dir(sync_dir, 3))
    out["default_format"] = common["optimizer_format"]

    job.checkpoint.save, job.checkpoint.async_save = async_dir, True
    started = time.time()
    checkpoint.save(job, ddp, opt, sched, state)
    out["async_returned_unpublished"] = all_ranks(
        not os.path.exists(os.path.join(async_dir, TRACKER)))
    step(ddp, opt, sched)  # training goes on while the background process writes the captured state
    checkpoint.finalize_async_saves(blocking=True)
    out["async_seconds"] = time.time() - started
    directory = checkpoint_dir(async_dir, 3)
    out["async_published"] = latest_iteration(async_dir) == 3 and sorted(os.listdir(async_dir))
    out["async_verified"] = checkpoint.verify_checksums(directory)
    with open(os.path.join(directory, CHECKSUMS)) as handle:
        recorded = sorted(json.load(handle)["files"])
    out["checksums_cover_all"] = recorded == sorted(n for n in os.listdir(directory) if n != CHECKSUMS)

    job.checkpoint.save, job.checkpoint.async_save = full_dir, False
    job.checkpoint.dist_ckpt_optim_fully_reshardable = True
    _, model_f, ddp_f, opt_f, sched_f = trainer(full_dir, seed=1)  # the same state as `sync`
    checkpoint.save(job, ddp_f, opt_f, sched_f, state)
    out["reshardable_format"] = common_state(
        checkpoint_dir(full_dir, 3))["optimizer_format"]

    # Resume at the same layout (TP1/DP2): sync and async copies give back exactly the saved state.
    for name, directory in (("sync", sync_dir), ("async", async_dir), ("full", full_dir)):
        job2, model2, ddp2, opt2, sched2 = trainer(directory, seed=9, steps=0)
        resumed = checkpoint.load(job2, ddp2, opt2, sched2)
        out[f"resume_{name}"] = {
            "iteration": resumed.iteration, "consumed": resumed.consumed_samples,
            "weights": all_ranks(equal(weights(model2), saved_weights)),
            "optimizer": all_ranks(equal(optimizer_state(opt2), saved_optimizer)),
            "scheduler": sched2.state_dict() == saved_scheduler,
        }

    # Other parameter groups (the vision parameters at their own learning rate): refused in one line
    # before the checkpoint's tensors are read, with the groups read from either format.
    for name, directory in (("sync", sync_dir), ("full", full_dir)):
        job2, _, ddp2, opt2, sched2 = trainer(directory, seed=9, steps=0, vision_lr=5e-4)
        try:
            checkpoint.load(job2, ddp2, opt2, sched2)
            out[f"other_groups_{name}"] = "loaded"
        except ConfigError as error:
            out[f"other_groups_{name}"] = str(error)

    # The plain optimizer's state into the distributed one, and the distributed one's (either format)
    # into the plain one: refused in one line, not megatron-core's KeyError / "Could not find parameter group".
    plain_dir = os.path.join(root, "plain")
    job_p, _, ddp_p, opt_p, sched_p = trainer(plain_dir, seed=1, distributed=False)
    checkpoint.save(job_p, ddp_p, opt_p, sched_p, state)
    for name, directory, distributed in (("plain_into_distributed", plain_dir, True),
                                         ("full_into_plain", full_dir, False), ("sync_into_plain", sync_dir, False)):
        job2, _, ddp2, opt2, sched2 = trainer(directory, seed=9, steps=0, distributed=distributed)
        try:
            checkpoint.load(job2, ddp2, opt2, sched2)
            out[name] = "loaded"
        except ConfigError as error:
            out[name] = str(error)

    # TP2/DP1: the default format refuses (one line), weights-only still loads; the reshardable one loads.
    setup(2)
    job2, model2, ddp2, opt2, sched2 = trainer(sync_dir, tp=2, seed=9, steps=1)
    try:
        checkpoint.load(job2, ddp2, opt2, sched2)
        out["tp2_default"] = "loaded"
    except ConfigError as error:
        out["tp2_default"] = str(error)
    job2.checkpoint.no_load_optim = True
    out["tp2_default_no_load_optim"] = checkpoint.load(job2, ddp2, opt2, sched2).iteration
    job2.checkpoint.save, job2.checkpoint.no_load_optim = os.path.join(root, "tp2_weights"), False
    checkpoint.save(job2, ddp2, opt2, sched2, state)

    job3, model3, ddp3, opt3, sched3 = trainer(full_dir, tp=2, seed=9, steps=1)
    out["tp2_full"] = checkpoint.load(job3, ddp3, opt3, sched3).iteration
    job3.checkpoint.save, job3.checkpoint.dist_ckpt_optim_fully_reshardable = os.path.join(root, "tp2_full"), True
    checkpoint.save(job3, ddp3, opt3, sched3, state)
    dist.barrier()
    # Whole global tensors, read back from both layouts' checkpoints: bitwise the same.
    before = plain_tensors(checkpoint_dir(full_dir, 3))
    after = plain_tensors(checkpoint_dir(os.path.join(root, "tp2_full"), 3))
    out["tp2_full_tensors_equal"] = sorted(before) == sorted(after) and equal(before, after)
    out["tp2_full_optimizer_tensors"] = sum(k.startswith("optimizer.") for k in after)
    weights_before = {k: v for k, v in before.items() if not k.startswith("optimizer.")}
    weights_after = {k: v for k, v in plain_tensors(checkpoint_dir(os.path.join(root, "tp2_weights"), 3))
                     .items() if not k.startswith("optimizer.")}
    out["tp2_default_weights_equal"] = equal(weights_before, weights_after)
    if dist.get_rank() == 0:
        print(json.dumps(out, default=str), flush=True)


def dp1(root):
    from megatron_eve.training import checkpoint
    from megatron_eve.training.checkpoint_records import checkpoint_dir

    setup(1)
    job, model, ddp, opt, sched = trainer(os.path.join(root, "sync"), seed=9, steps=1)
    out = {"iteration": checkpoint.load(job, ddp, opt, sched).iteration}
    job.checkpoint.save, job.checkpoint.dist_ckpt_optim_fully_reshardable = os.path.join(root, "dp1_full"), True
    checkpoint.save(job, ddp, opt, sched, checkpoint.TrainState(iteration=3, consumed_samples=12))
    before = plain_tensors(checkpoint_dir(os.path.join(root, "full"), 3))
    after = plain_tensors(checkpoint_dir(os.path.join(root, "dp1_full"), 3))
    out["tensors_equal"] = sorted(before) == sorted(after) and equal(before, after)
    print(json.dumps(out), flush=True)


def hang(root):
    import torch
    import torch.distributed as dist

    from megatron_eve.training import checkpoint, checkpoint_writes

    setup(1)
    rank = dist.get_rank()
    job, model, ddp, opt, sched = trainer(root, seed=1, async_save=True)
    checkpoint.save(job, ddp, opt, sched, checkpoint.TrainState(iteration=1, consumed_samples=4))
    checkpoint.finalize_async_saves(blocking=True)
    torch.save({"weights": weights(model), "optimizer": optimizer_state(opt)}, os.path.join(root, f"ref{rank}.pt"))
    step(ddp, opt, sched)

    write = checkpoint_writes._write_then_hash

    def never_finishes(*args, **kwargs):  # the background writer, forked: killed mid-save
        if rank == 0:
            write(*args, **kwargs)
        Path(root, f"writing{rank}").touch()
        time.sleep(3600)

    checkpoint_writes._write_then_hash = never_finishes
    checkpoint.save(job, ddp, opt, sched, checkpoint.TrainState(iteration=2, consumed_samples=8))
    steps = 0
    while True:  # training goes on while the save is in flight, polling for its completion
        step(ddp, opt, sched)
        checkpoint.finalize_async_saves(blocking=False)
        steps += 1
        Path(root, f"steps{rank}").write_text(str(steps))
        time.sleep(0.05)


def after(root):
    import torch
    import torch.distributed as dist

    from megatron_eve.training import checkpoint
    from megatron_eve.training.checkpoint_records import latest_iteration

    setup(1)
    rank = dist.get_rank()
    out = {"marked": latest_iteration(root), "entries": sorted(os.listdir(root))}
    job, model, ddp, opt, sched = trainer(root, seed=9, steps=1, verify_checkpoint=True)
    resumed = checkpoint.load(job, ddp, opt, sched)
    reference = torch.load(os.path.join(root, f"ref{rank}.pt"))
    out["resumed"] = resumed.iteration
    out["weights"] = all_ranks(equal(weights(model), reference["weights"]))
    out["optimizer"] = all_ranks(equal(optimizer_state(opt), reference["optimizer"]))
    job.checkpoint.async_save = True
    checkpoint.save(job, ddp, opt, sched, checkpoint.TrainState(iteration=2, consumed_samples=8))
    checkpoint.finalize_async_saves(blocking=True)
    out["resaved"] = latest_iteration(root)
    out["entries_after"] = sorted(n for n in os.listdir(root) if n.startswith("iter_"))
    if rank == 0:
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    {"formats": formats, "dp1": dp1, "hang": hang, "after": after}[sys.argv[1]](sys.argv[2])
