"""megatron-core DDP, optimizer and learning-rate schedule from the typed configs."""

from __future__ import annotations

import contextlib
import importlib
from typing import Dict, List

import torch

from megatron_eve.config import TrainingJob
from megatron_eve.training.pipeline_p2p import pair_two_rank_interleaving
from megatron_eve.training.stages import vision_name_patterns


def wrap_model(model, job: TrainingJob):
    """Float16Module for bf16 / fp16, then megatron-core's DistributedDataParallel."""
    return wrap_model_chunks([model], job)[0]


def wrap_model_chunks(chunks: List, job: TrainingJob) -> List:
    """Each model chunk (one, or one per virtual pipeline stage) in Float16Module for bf16 / fp16,
    then megatron-core's DistributedDataParallel; the schedule's hooks set on the first chunk's
    config, which is the one the schedules read."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    wrapped = []
    for index, model in enumerate(chunks):
        config = model.config
        if job.runtime.bf16 or job.runtime.fp16:
            model = Float16Module(config, model)
        wrapped.append(DistributedDataParallel(
            config,
            DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=job.optim.overlap_grad_reduce,
                overlap_param_gather=job.optim.overlap_param_gather,
                use_distributed_optimizer=job.optim.use_distributed_optimizer,
                bucket_size=None if not job.optim.overlap_grad_reduce else 40_000_000,
            ),
            model,
            # As Megatron-LM: later chunks reduce in one bucket, launched once their backward ends.
            disable_bucketing=index > 0,
        ))
    config = wrapped[0].config

    def per_chunk(method: str):
        hooks = [getattr(ddp, method) for ddp in wrapped]
        return hooks[0] if len(hooks) == 1 else hooks

    # Schedules call these to overlap gradient reduction with the last micro-batch's backward.
    config.no_sync_func = per_chunk("no_sync")
    if job.optim.overlap_grad_reduce:
        config.grad_sync_func = per_chunk("start_grad_sync")
    if job.optim.overlap_param_gather and job.optim.use_distributed_optimizer:
        config.param_sync_func = per_chunk("start_param_sync")
    config.finalize_model_grads_func = finalize_model_grads
    if len(wrapped) > 1:
        pair_two_rank_interleaving(config)
    return wrapped


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for amp_C.multi_tensor_l2norm (total norm only): stays on the device."""
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1).float(), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for amp_C.multi_tensor_scale: targets = sources * scale."""
    sources, targets = tensor_lists
    if sources is targets:
        torch._foreach_mul_(targets, scale)
    else:
        torch._foreach_copy_(targets, sources if scale == 1.0 else torch._foreach_mul(sources, scale))


def use_foreach_multi_tensor_ops() -> None:
    """Without Transformer Engine or apex, megatron-core's multi-tensor fallbacks loop over tensors
    in Python, and its gradient-norm fallback reads each gradient's norm to the host: one device
    synchronisation per parameter tensor, every step. torch's foreach kernels do the same arithmetic
    on the device (the clipping decision still reads the one total norm, as with apex)."""
    from megatron.core import utils

    for name in ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer"):
        module = importlib.import_module(name)
        if getattr(module, "l2_norm_impl", None) is utils.local_multi_tensor_l2_norm:
            module.l2_norm_impl = _foreach_l2_norm
        if module.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = _foreach_scale


def torch_adam_state_made(optimizer) -> None:
    """With torch's Adam (no apex / Transformer Engine, e.g. on CPU) megatron-core 0.19's
    DistributedOptimizer.state_dict() reads each parameter's "step", which a fresh optimizer has
    not made yet: make the state (zeros, step 0) the checkpoint then overwrites."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(sub, distrib_optimizer.DistributedOptimizer):
            for group in sub.optimizer.param_groups:
                for param in group["params"]:
                    state = sub.optimizer.state[param]
                    if not state:
                        state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                                     exp_avg_sq=torch.zeros_like(param))


@contextlib.contextmanager
def step_restored_from_param_groups(optimizer):
    """torch's Adam (no apex / Transformer Engine, e.g. on CPU) keeps a per-parameter "step" that
    megatron-core 0.19 restores from the checkpoint's param groups, then overwrites while copying
    each parameter's state: with the load template's value (data-parallel-sharded format), or
    failing to find it (fully reshardable: KeyError). A non-tensor entry is skipped there."""
    patched = [sub for sub in getattr(optimizer, "chained_optimizers", [optimizer])
               if hasattr(sub, "_set_main_param_and_optimizer_states")]
    for sub in patched:
        original = sub._set_main_param_and_optimizer_states
        sub._set_main_param_and_optimizer_states = (
            lambda model_param, tensors, original=original: original(model_param, {**tensors, "step": None}))
    try:
        yield
    finally:
        for sub in patched:
            del sub._set_main_param_and_optimizer_states  # the class's method again


def build_optimizer(ddp, job: TrainingJob):
    """AdamW (megatron-core, optionally distributed) over a DDP model or a list of chunks, with the
    vision parameters in their own group when --vision-lr differs from --lr."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.optimizer_config import ParamKey

    use_foreach_multi_tensor_ops()
    o, r = job.optim, job.runtime
    config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
        bf16=r.bf16, fp16=r.fp16, params_dtype=r.params_dtype, loss_scale=o.loss_scale,
        initial_loss_scale=o.initial_loss_scale, use_distributed_optimizer=o.use_distributed_optimizer,
        overlap_param_gather=o.overlap_param_gather,
    )
    overrides = None
    if o.vision_lr is not None and o.vision_lr != o.lr:
        ratio = o.vision_lr / o.lr
        overrides = {ParamKey(name=tuple(vision_name_patterns())): {"max_lr": o.vision_lr, "min_lr": o.min_lr * ratio}}
    return get_megatron_optimizer(config, ddp if isinstance(ddp, list) else [ddp], config_overrides=overrides)


# The schedule's settings as megatron-core's OptimizerParamScheduler stores them, and the flags that set each.
SCHEDULE_FLAGS = {
    "max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "--lr-warmup-fraction / --lr-warmup-iters",
    "lr_decay_steps": "--lr-decay-iters (default --train-iters) x --global-batch-size",
    "lr_decay_style": "--lr-decay-style", "start_wd": "--weight-decay", "end_wd": "--weight-decay",
    "wd_incr_steps": "--lr-decay-iters (default --train-iters) x --global-batch-size",
    "wd_incr_style": "(constant)",
}


def schedule_settings(job: TrainingJob) -> Dict[str, object]:
    """The learning-rate and weight-decay schedule of the flags, counted in samples (steps of
    global-batch-size), by megatron-core's names."""
    o, s = job.optim, job.schedule
    decay_steps = (o.lr_decay_iters or s.iterations) * s.global_batch_size
    if o.lr_warmup_fraction is not None:
        warmup_steps = int(o.lr_warmup_fraction * decay_steps)
    else:
        warmup_steps = o.lr_warmup_iters * s.global_batch_size
    return {"max_lr": o.lr, "min_lr": o.min_lr, "lr_warmup_steps": warmup_steps, "lr_decay_steps": decay_steps,
            "lr_decay_style": o.lr_decay_style, "start_wd": o.weight_decay, "end_wd": o.weight_decay,
            "wd_incr_steps": decay_steps, "wd_incr_style": "constant"}


def schedule_differences(job: TrainingJob, saved: Dict[str, object]) -> List[str]:
    """"what: checkpoint X, flags Y (flag)" for each schedule setting a checkpoint's scheduler state
    (`saved`, its state_dict) holds with another value than the flags give."""
    ours = schedule_settings(job)
    return [f"{name}: checkpoint {saved[name]}, flags {value} ({SCHEDULE_FLAGS[name]})"
            for name, value in ours.items() if name in saved and saved[name] != value]


def build_scheduler(optimizer, job: TrainingJob):
    """Megatron's OptimizerParamScheduler over the flags' schedule. On resume (load_state_dict) the
    checkpoint's values are kept unless --override-opt-param-scheduler; a difference without either
    flag is refused before training (checkpoint.check_schedule)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    override = job.optim.override_opt_param_scheduler
    return OptimizerParamScheduler(optimizer, init_lr=0.0, **schedule_settings(job),
                                   override_opt_param_scheduler=override,
                                   use_checkpoint_opt_param_scheduler=not override)
