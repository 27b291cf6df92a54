"""One process: the trainer's per-micro-batch path (the loader's pinned, worker-planned batches →
MicroBatches → megatron-core's schedule: model inputs, forward with the PEL, aligner and CLIP
teacher, loss, backward into DDP's buffers), then the update (training/update.py: the all-ranks flags
and megatron-core's optimizer step), with torch's CUDA synchronisation check on, launched by
tests/gpu/test_gpu_sync.py. Writes JSON: for one and for three micro-batches a step, every place the
host waited for the device ({"file:line": count}) in the micro-batches and in the update. On the CPU
(EVE_GPU_TIER_ON_CPU) the same steps run without the check (there is nothing to wait for)."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="a preprocessed captions dataset (prefix)")
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_eve import distributed
    from megatron_eve.config import DataConfig, OptimConfig, ParallelConfig, RuntimeConfig, ScheduleConfig, TrainingJob
    from megatron_eve.data.dataset import build_datasets
    from megatron_eve.model.build import build_model
    from megatron_eve.platform import current_device
    from megatron_eve.training.iteration_stats import IterationStats
    from megatron_eve.training.loop import MicroBatches
    from megatron_eve.training.optim import build_optimizer, wrap_model
    from megatron_eve.training.step import forward_step
    from megatron_eve.training.update import reduce_and_update
    from tests.helpers import tiny_config
    from tools.bench_profile import host_waits

    cuda = torch.cuda.is_available()
    distributed.initialize(ParallelConfig(), seed=1234)
    cfg = tiny_config(args.teacher)
    runtime = RuntimeConfig(bf16=cuda)
    job = TrainingJob(cfg, ParallelConfig(), runtime, OptimConfig(lr=1e-5), ScheduleConfig(train_iters=1),
                      DataConfig(data_path=[args.data], seq_length=512, split="100,0,0", packing_buffer_size=100),
                      None, None)
    ddp = wrap_model(build_model(cfg, ParallelConfig(), runtime), job)
    optimizer = build_optimizer(ddp, job)
    stats = IterationStats(current_device(), counts_losses=True, counts_work=True)
    dataset = build_datasets(job.data, seed=3)["train"]
    batches = MicroBatches.over(dataset, job, align=True, teacher_params=0, num_workers=1)
    schedule = get_forward_backward_func()

    def micro_batches_of_a_step(count: int):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        return schedule(forward_step_func=lambda it, m: forward_step(1.0, it, m), data_iterator=batches,
                        model=[ddp], num_microbatches=count, seq_length=512, micro_batch_size=1, forward_only=False)

    def update(losses):
        return reduce_and_update(optimizer, stats, losses, [b.grad_data for b in ddp.buffers])

    def checked(fn, *args):
        return host_waits(lambda: fn(*args)) if cuda else (fn(*args), {})

    for _ in range(3):  # compiles (RoPE, LM loss) and first-shape work happen here
        update(micro_batches_of_a_step(2))
    waits, update_waits = {}, {}
    for count in (1, 3):
        if cuda:
            torch.cuda.synchronize()
        losses, places = checked(micro_batches_of_a_step, count)
        assert len(losses) == count and all(float(m["align loss"]) > 0 for m in losses)
        result, update_places = checked(update, losses)
        assert result.finite and result.updated
        waits[str(count)], update_waits[str(count)] = dict(places), dict(update_places)
    batches.close()
    Path(args.out).write_text(json.dumps({"cuda": cuda, "waits": waits, "update_waits": update_waits}))
    distributed.destroy()


if __name__ == "__main__":
    main()
