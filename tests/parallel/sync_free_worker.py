"""One process: the trainer's per-micro-batch path (the loader's pinned, worker-planned batches →
MicroBatches → megatron-core's schedule: model inputs, forward with the PEL, aligner and CLIP
teacher, loss, backward into DDP's buffers) with torch's CUDA synchronisation check on, launched by
tests/gpu/test_gpu_sync.py. Writes JSON: for one and for three micro-batches a step, every place the
host waited for the device ({"file:line": count}). On the CPU (EVE_GPU_TIER_ON_CPU) the same steps
run without the check (there is nothing to wait for)."""

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
    from megatron_eve.training.loop import MicroBatches
    from megatron_eve.training.optim import wrap_model
    from megatron_eve.training.step import forward_step
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
    dataset = build_datasets(job.data, seed=3)["train"]
    batches = MicroBatches.over(dataset, job, align=True, teacher_params=0, num_workers=1)
    schedule = get_forward_backward_func()

    def step(micro_batches: int):
        ddp.zero_grad_buffer()
        return schedule(forward_step_func=lambda it, m: forward_step(1.0, it, m), data_iterator=batches,
                        model=[ddp], num_microbatches=micro_batches, seq_length=512, micro_batch_size=1,
                        forward_only=False)

    for _ in range(3):  # compiles (RoPE, LM loss) and first-shape work happen here
        step(2)
    waits = {}
    for micro_batches in (1, 3):
        if cuda:
            torch.cuda.synchronize()
            losses, places = host_waits(lambda: step(micro_batches))
        else:
            losses, places = step(micro_batches), {}
        assert len(losses) == micro_batches and all(float(m["align loss"]) > 0 for m in losses)
        waits[str(micro_batches)] = dict(places)
    batches.close()
    Path(args.out).write_text(json.dumps({"cuda": cuda, "waits": waits}))
    distributed.destroy()


if __name__ == "__main__":
    main()
