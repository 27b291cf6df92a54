"""One process, the real trainer objects: checkpoints move between layer specs (a module with
`_extra_state`, as Transformer Engine's are, on one side only), a replaced checkpoint is never
deleted before its replacement is in place, and iter_* directories without a marker are not
overwritten. Prints one JSON of observations; tests/test_checkpoint.py asserts on it."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(root: str):
    import torch

    from megatron_eve import distributed
    from megatron_eve.config import (CheckpointConfig, ConfigError, DataConfig, LoggingConfig, OptimConfig,
                                     ParallelConfig, RuntimeConfig, ScheduleConfig, TrainingJob)
    from megatron_eve.model.build import build_model
    from megatron_eve.training import checkpoint
    from megatron_eve.training.checkpoint_records import TRACKER, CheckpointLoadError, checkpoint_dir, latest_iteration
    from megatron_eve.training.optim import (_torch_adams, build_optimizer, build_scheduler, use_fused_torch_adam,
                                             wrap_model)
    from tests.helpers import tiny_config

    class ExtraState(torch.nn.Module):
        """Stands in for a Transformer Engine module: no parameters, non-tensor `_extra_state`."""

        def __init__(self, value):
            super().__init__()
            self.value, self.loaded = value, None

        def get_extra_state(self):
            return {"fp8_meta": self.value}

        def set_extra_state(self, state):
            self.loaded = state

    distributed.initialize(ParallelConfig(), seed=7)
    cfg = tiny_config(changes={"aligner.enabled": False})

    def trainer(directory, extra_state=None, seed=0):
        torch.manual_seed(seed)
        model = build_model(cfg, ParallelConfig(), RuntimeConfig(use_cpu_initialization=True), load_teacher=False)
        if extra_state is not None:
            model.te_probe = ExtraState(extra_state)
        job = TrainingJob(cfg, ParallelConfig(), RuntimeConfig(), OptimConfig(lr=1e-3), ScheduleConfig(train_iters=1),
                          DataConfig(), CheckpointConfig(save=directory, load=directory), LoggingConfig())
        ddp = wrap_model(model, job)
        optimizer = build_optimizer(ddp, job)
        ddp.zero_grad_buffer()
        optimizer.step()  # zero gradients: the weights stay, Adam's state comes to exist
        return job, model, ddp, optimizer, build_scheduler(optimizer, job)

    def weights(model):
        return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()

    out = {}
    plain_dir, te_dir = os.path.join(root, "plain"), os.path.join(root, "te")
    job, plain, ddp, opt, sched = trainer(plain_dir, seed=1)
    use_fused_torch_adam(opt, fused=False)  # saved by a run on torch's foreach AdamW
    checkpoint.save(job, ddp, opt, sched, checkpoint.TrainState(iteration=1, consumed_samples=4))
    saved_plain = weights(plain)

    # plain → a model with _extra_state: weights load, the extra state is left alone; the loaded
    # optimizer runs fused again, a step counter of its own per parameter.
    job, te, ddp, opt, sched = trainer(plain_dir, extra_state=1, seed=2)
    state = checkpoint.load(job, ddp, opt, sched)
    adams = _torch_adams(opt)
    steps = [adam.state[p]["step"] for adam in adams for g in adam.param_groups for p in g["params"]]
    out["plain_to_te"] = {"iteration": state.iteration, "weights_equal": same(weights(te), saved_plain),
                          "extra_state_loaded": te.te_probe.loaded,
                          "fused_after_load": bool(adams) and all(g["fused"] and not g["foreach"]
                                                                  for adam in adams for g in adam.param_groups),
                          "own_steps": len({id(s) for s in steps}) == len(steps) > 0}
    job.checkpoint.save = te_dir
    checkpoint.save(job, ddp, opt, sched, checkpoint.TrainState(iteration=2, consumed_samples=8))

    # _extra_state → plain, and → another model with _extra_state (which gets it back).
    job, plain2, ddp, opt, sched = trainer(te_dir, seed=3)
    state = checkpoint.load(job, ddp, opt, sched)
    out["te_to_plain"] = {"iteration": state.iteration, "weights_equal": same(weights(plain2), saved_plain)}
    job, te2, ddp, opt, sched = trainer(te_dir, extra_state=5, seed=4)
    checkpoint.load(job, ddp, opt, sched)
    out["te_to_te"] = {"extra_state_loaded": te2.te_probe.loaded}

    # A damaged file: one line naming the checkpoint, not a traceback from deep inside.
    shard = next(p for p in sorted(os.listdir(checkpoint_dir(te_dir, 2))) if p.endswith(".distcp"))
    path = os.path.join(checkpoint_dir(te_dir, 2), shard)
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 3)
    try:
        checkpoint.load(job, ddp, opt, sched)
        out["damaged"] = "loaded"
    except CheckpointLoadError as error:
        out["damaged"] = str(error)

    # Saving over an existing iteration moves the old copy aside until the new one is in place.
    job, plain3, ddp, opt, sched = trainer(plain_dir, seed=5)
    checkpoint.save(job, ddp, opt, sched, checkpoint.TrainState(iteration=1, consumed_samples=4))
    out["resaved_entries"] = sorted(os.listdir(plain_dir))
    final = checkpoint_dir(plain_dir, 1)
    os.replace(final, final + ".replaced")  # as if killed between the two renames
    out["recovered_iteration"] = latest_iteration(plain_dir)
    out["recovered_entries"] = sorted(os.listdir(plain_dir))

    # iter_* without a marker: refuse to start over them.
    os.remove(os.path.join(plain_dir, TRACKER))
    try:
        checkpoint.load(job, ddp, opt, sched)
        out["unmarked"] = "started from scratch"
    except ConfigError as error:
        out["unmarked"] = str(error)
    distributed.destroy()
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
