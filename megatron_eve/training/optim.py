"""megatron-core DDP, optimizer and learning-rate schedule from the typed configs."""

from __future__ import annotations

import contextlib
import importlib
import math
import weakref
from typing import Dict, List, Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from megatron_eve.config import OptimConfig, TrainingJob
from megatron_eve.training.pipeline_p2p import exchange_shapes_on_host, pair_two_rank_interleaving
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
    if config.pipeline_model_parallel_size > 1:
        exchange_shapes_on_host()
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


# Main parameter -> a weak reference to the fused torch AdamW that steps it (registered by
# use_fused_torch_adam). Weak both ways: the optimizer holds its parameters, so a strong value would
# keep each key, and with it every main parameter and optimizer state, alive for the process's life.
_FUSED_ADAM_OF = WeakIdKeyDictionary()


def optimizer_parts(optimizer) -> List:
    """The optimizers inside a megatron-core optimizer: a ChainedOptimizer's parts, or itself."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _fused_adam_of_exactly(parameters: List[torch.Tensor]) -> Optional[torch.optim.Optimizer]:
    """The registered fused torch AdamW whose parameters are exactly `parameters`, else None."""
    registered = _FUSED_ADAM_OF.get(parameters[0]) if parameters else None
    adam = registered() if registered is not None else None
    if adam is None or not all(group.get("fused") for group in adam.param_groups):
        return None
    stepped = {id(p) for group in adam.param_groups for p in group["params"]}
    return adam if stepped == {id(p) for p in parameters} else None


def _clip_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron-core's clip_grad_by_total_norm_fp32 scales every gradient in a pass of its own (~100
    kernels reading and writing all fp32 gradients: 3.3 ms of a 199 ms step on an H100). When a fused
    torch AdamW steps exactly these parameters next, the scale goes into its pass instead: torch's
    fused kernel divides each gradient by the optimizer's `grad_scale` as it reads it and writes it
    back scaled, so the gradients' second read and those launches go. Same clip coefficient as
    megatron-core, from the same total norm. An AdamW armed by arm_update_skip also learns here
    whether the norm is finite: a NaN or Inf anywhere in the gradients makes the norm so."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    parameters = list(parameters)
    adam = None if use_decoupled_grad or isinstance(total_norm, torch.Tensor) else _fused_adam_of_exactly(parameters)
    if adam is not None and adam.found_inf is not None:
        adam.norm_checked = True
        if not math.isfinite(total_norm):  # (an Inf norm would make the clip coefficient 0)
            adam.found_inf, adam.grad_scale = torch.ones_like(adam.found_inf), None
            return None
    if adam is None or not math.isfinite(total_norm):  # unarmed: megatron-core's own arithmetic
        return clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad)
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    adam.grad_scale = (torch.full((), 1.0 / clip_coeff, dtype=torch.float32, device=parameters[0].device)
                       if clip_coeff < 1.0 else None)


def _check_armed(adam, args, kwargs) -> None:
    # (An AdamW without parameters, e.g. a distributed optimizer's empty shard, is not clipped: nothing to check.)
    if adam.found_inf is not None and not adam.norm_checked and any(g["params"] for g in adam.param_groups):
        raise RuntimeError("an AdamW armed to skip a non-finite update on the device stepped without its "
                           "gradients' norm being checked (megatron-core clipped it some other way)")


def _forget_step_inputs(adam, args, kwargs) -> None:
    adam.grad_scale = adam.found_inf = None  # one step's clip and skip only
    adam.norm_checked = False


def clip_inside_fused_adam() -> None:
    """megatron-core's optimizers clip through _clip_by_total_norm (it falls back to megatron-core's own
    clipping for any optimizer use_fused_torch_adam did not register)."""
    importlib.import_module("megatron.core.optimizer.optimizer").clip_grad_by_total_norm_fp32 = _clip_by_total_norm


def skips_updates_on_the_device(optimizer) -> bool:
    """Whether optimizer.step() can leave the weights alone by itself when the step's losses or
    gradients are not finite, so that no host read has to decide before it: every part is a
    torch AdamW taking torch's fused kernel (it skips on the device, given a found_inf flag, and
    restores its step counts), clips (the total norm it computes then tells whether every gradient
    is finite: _clip_by_total_norm) and has no loss scaler (fp16 finds its overflows itself)."""
    parts = [part for part in optimizer_parts(optimizer) if not getattr(part, "is_stub_optimizer", False)]
    return bool(parts) and not has_loss_scaler(optimizer) and all(
        part.config.clip_grad > 0.0 and not part.config.use_precision_aware_optimizer
        and isinstance(getattr(part, "optimizer", None), (torch.optim.Adam, torch.optim.AdamW))
        and hasattr(part.optimizer, "found_inf")
        and all(group.get("fused") for group in part.optimizer.param_groups) for part in parts)


def arm_update_skip(optimizer, nonfinite: torch.Tensor) -> None:
    """The next optimizer.step() skips its update on the device when `nonfinite` (a float32 device
    flag: some rank's loss) is 1 or the gradients' norm is not finite (skips_updates_on_the_device
    must hold)."""
    for adam in _torch_adams(optimizer):
        adam.found_inf, adam.norm_checked = nonfinite.to(torch.float32).reshape(()), False


def torch_adam_state_made(optimizer) -> None:
    """torch's Adam (no apex / Transformer Engine, e.g. on CPU) makes a parameter's state at its first
    update, and megatron-core 0.19 needs it before: DistributedOptimizer.state_dict() reads each
    parameter's "step" (a save, or a load's template), and a save writes only the state there is,
    so one before any update (fp16's first steps overflow and are skipped) would lack the tensors
    its resume reads. Made as that first update would (zeros, step 0); a checkpoint overwrites it."""
    for adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            for param in group["params"]:
                state = adam.state[param]
                if not state:
                    state.update(step=torch.zeros((), device=param.device), exp_avg=torch.zeros_like(param),
                                 exp_avg_sq=torch.zeros_like(param))


def _torch_adams(optimizer) -> List[torch.optim.Optimizer]:
    """The torch Adam / AdamW instances inside a megatron-core (chained) optimizer."""
    inner = [getattr(sub, "optimizer", None) for sub in optimizer_parts(optimizer)]
    return [o for o in inner if isinstance(o, (torch.optim.Adam, torch.optim.AdamW))]


def use_fused_torch_adam(optimizer, fused: bool = True) -> None:
    """Without Transformer Engine or apex (their fused Adam), megatron-core builds torch's AdamW with
    its default multi-tensor implementation: about a dozen kernels over every tensor group, each
    step (12% of GPU kernel time in a profile of the torch spec). torch's fused AdamW does the same
    update in one pass (CUDA and CPU). Set after the build, and again after a checkpoint load, which
    restores the saving run's param groups; its step counters live on the parameters' device as
    float32, one per parameter (a load may leave one shared host tensor). Gradient clipping then
    happens inside its step (_clip_by_total_norm). fused=False: back to foreach (benchmarks compare
    the two)."""
    for adam in _torch_adams(optimizer):
        params = [p for group in adam.param_groups for p in group["params"]]
        if not all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params):
            continue
        for group in adam.param_groups:
            group.update(fused=fused, foreach=not fused)
        if fused and not hasattr(adam, "grad_scale"):
            adam.grad_scale = adam.found_inf = None
            adam.norm_checked = False
            adam.register_step_pre_hook(_check_armed)
            adam.register_step_post_hook(_forget_step_inputs)
        for param in params:
            if fused:
                _FUSED_ADAM_OF[param] = weakref.ref(adam)
            state = adam.state.get(param)
            if state and "step" in state:
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(param.device, copy=True)


def zero_steps_restored(state_dict) -> None:
    """megatron-core 0.19 saves a plain (not distributed) optimizer's steps once, as a common step,
    and leaves one of 0 out (a checkpoint saved before the first update: fp16's skipped steps);
    torch's Adam refuses a parameter state without its step: each such state gets its 0 back."""
    if not isinstance(state_dict, dict):
        return
    state = state_dict.get("state")
    if isinstance(state, dict) and "param_groups" in state_dict and "common_step" not in state:
        for param_state in state.values():
            if isinstance(param_state, dict) and param_state and "step" not in param_state:
                param_state["step"] = torch.zeros(())
    for value in state_dict.values():  # a chained optimizer's parts, a mixed-precision wrapper's "optimizer"
        zero_steps_restored(value)


@contextlib.contextmanager
def torch_adam_loading(optimizer):
    """Around megatron-core's optimizer load, for torch's Adam (no apex / Transformer Engine):
    its per-parameter "step", which megatron-core 0.19 restores from the checkpoint's param groups,
    it then overwrites while copying each parameter's state: with the load template's value
    (data-parallel-sharded format), or failing to find it (fully reshardable: KeyError); a
    non-tensor entry is skipped there. After the load, the fused implementation again
    (use_fused_torch_adam)."""
    patched = [sub for sub in optimizer_parts(optimizer)
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
    use_fused_torch_adam(optimizer)  # the loaded param groups are the saving run's


def vision_rates(optim: OptimConfig) -> Optional[Dict[str, float]]:
    """max_lr / min_lr of the vision parameters' own param groups (min_lr scaled as max_lr is);
    None when --vision-lr is unset or equals --lr: they train in the base groups."""
    if optim.vision_lr is None or optim.vision_lr == optim.lr:
        return None
    return {"max_lr": optim.vision_lr, "min_lr": optim.min_lr * (optim.vision_lr / optim.lr)}


def param_group_overrides(config, optim: OptimConfig) -> Dict:
    """megatron-core's standard overrides (no weight decay on biases and 1-D parameters: norms)
    plus the vision parameters' learning rates. Overrides given to get_megatron_optimizer replace
    its standard ones, so they are merged here (a parameter matching both gets both)."""
    from megatron.core.optimizer import get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamKey

    overrides = get_standard_config_overrides(config)
    rates = vision_rates(optim)
    if rates is not None:
        overrides[ParamKey(name=tuple(vision_name_patterns()))] = rates
    return overrides


def build_optimizer(ddp, job: TrainingJob):
    """AdamW (megatron-core, optionally distributed) over a DDP model or a list of chunks, with the
    vision parameters in their own groups when --vision-lr differs from --lr."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    use_foreach_multi_tensor_ops()
    clip_inside_fused_adam()
    o, r = job.optim, job.runtime
    config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
        bf16=r.bf16, fp16=r.fp16, params_dtype=r.params_dtype, loss_scale=o.loss_scale,
        initial_loss_scale=o.initial_loss_scale, use_distributed_optimizer=o.use_distributed_optimizer,
        overlap_param_gather=o.overlap_param_gather,
    )
    chunks = ddp if isinstance(ddp, list) else [ddp]
    optimizer = get_megatron_optimizer(config, chunks, config_overrides=param_group_overrides(config, o))
    use_fused_torch_adam(optimizer)
    if has_loss_scaler(optimizer):
        # fp16: megatron-core's schedule scales each micro-batch's loss by the optimizer's loss scale
        # through this hook (Megatron-LM's training.py sets it), and the step unscales the gradients:
        # without it the gradients reached AdamW divided by the scale (2^32: no update at all).
        for chunk in chunks:
            chunk.config.grad_scale_func = optimizer.scale_loss
    return optimizer


def has_loss_scaler(optimizer) -> bool:
    """fp16's loss scaling: its step finds the scaled gradients' overflows itself, skips that update
    and lowers the scale (an overflow is a skipped iteration, not a non-finite one)."""
    return any(getattr(part, "grad_scaler", None) is not None for part in optimizer_parts(optimizer))


def schedule_flags(job: TrainingJob) -> Dict[str, str]:
    """The flags that set each schedule setting megatron-core's OptimizerParamScheduler stores, for
    messages: iteration-based or sample-based as the run is, constant weight decay or not."""
    o, s = job.optim, job.schedule
    if s.train_iters is not None:
        decay = "--lr-decay-iters (default --train-iters) x --global-batch-size"
        warmup, wd_steps = "--lr-warmup-fraction / --lr-warmup-iters", "--train-iters x --global-batch-size"
    else:
        decay = "--lr-decay-samples (default --train-samples)"
        warmup, wd_steps = "--lr-warmup-fraction / --lr-warmup-samples", "--train-samples"
    constant = o.weight_decay_incr_style == "constant"
    return {"max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": warmup, "lr_decay_steps": decay,
            "lr_decay_style": "--lr-decay-style",
            "start_wd": "--weight-decay" if constant else "--start-weight-decay",
            "end_wd": "--weight-decay" if constant else "--end-weight-decay",
            "wd_incr_steps": wd_steps, "wd_incr_style": "--weight-decay-incr-style"}


def schedule_settings(job: TrainingJob) -> Dict[str, object]:
    """The learning-rate and weight-decay schedule of the flags, counted in samples (steps of
    global-batch-size), by megatron-core's names (OptimizerParamScheduler's arguments) and exactly as
    Megatron-LM's get_optimizer_param_scheduler computes them: iteration-based lengths times
    --global-batch-size with --train-iters, sample counts as given with --train-samples (the decay
    over --train-samples itself, not its whole global batches); the warm-up fraction's steps kept as
    a float; weight decay over the training length."""
    o, s = job.optim, job.schedule
    gbs = s.global_batch_size
    if s.train_iters is not None:
        decay_steps = (o.lr_decay_iters if o.lr_decay_iters is not None else s.train_iters) * gbs
        wd_steps = s.train_iters * gbs
        wsd_steps = None if o.lr_wsd_decay_iters is None else o.lr_wsd_decay_iters * gbs
        warmup_steps = o.lr_warmup_iters * gbs
    else:
        decay_steps = o.lr_decay_samples if o.lr_decay_samples is not None else s.train_samples
        wd_steps = s.train_samples
        wsd_steps = o.lr_wsd_decay_samples
        warmup_steps = o.lr_warmup_samples
    if o.lr_warmup_fraction is not None:
        warmup_steps = o.lr_warmup_fraction * decay_steps
    if o.weight_decay_incr_style == "constant":
        start_wd = end_wd = o.weight_decay
    else:
        start_wd, end_wd = o.start_weight_decay, o.end_weight_decay
    return {"init_lr": o.lr_warmup_init, "max_lr": o.lr, "min_lr": o.min_lr, "lr_warmup_steps": warmup_steps,
            "lr_decay_steps": decay_steps, "lr_decay_style": o.lr_decay_style, "start_wd": start_wd, "end_wd": end_wd,
            "wd_incr_steps": wd_steps, "wd_incr_style": o.weight_decay_incr_style,
            "wsd_decay_steps": wsd_steps, "lr_wsd_decay_style": o.lr_wsd_decay_style}


def _earlier_settings(job: TrainingJob) -> Dict[str, object]:
    """Settings of the same flags as earlier versions computed them, which their checkpoints hold:
    with --train-samples and no decay length, the decay over the whole global batches of
    --train-samples (and the warm-up fraction of that)."""
    o, s = job.optim, job.schedule
    if s.train_iters is not None or o.lr_decay_samples is not None:
        return {}
    decay_steps = s.iterations * s.global_batch_size
    earlier = {"lr_decay_steps": decay_steps}
    if o.lr_warmup_fraction is not None:
        earlier["lr_warmup_steps"] = o.lr_warmup_fraction * decay_steps
    return earlier


def _same_setting(name: str, saved, ours, settings: Dict[str, object], saved_state: Dict[str, object],
                  earlier: Dict[str, object]) -> bool:
    """Whether the checkpoint's value of schedule setting `name` gives this run's schedule (or the one
    an earlier version computed from the same flags: megatron-core then goes on with the checkpoint's)."""
    for value in (ours, earlier.get(name, ours)):
        if saved == value:
            return True
        if name == "lr_warmup_steps" and isinstance(saved, int) and isinstance(value, float) and saved == int(value):
            # Saved before the warm-up fraction's steps were kept as a float (Megatron-LM's): int() of ours.
            return True
    # Constant weight decay never reads wd_incr_steps (megatron-core returns end_wd): a longer run with
    # a fixed --lr-decay-iters, or a checkpoint saved when it was the decay length, changes nothing. An
    # increasing weight decay reads it: compared then.
    return (name == "wd_incr_steps" and settings["wd_incr_style"] == "constant"
            and saved_state.get("wd_incr_style", "constant") == "constant")


def schedule_differences(job: TrainingJob, saved: Dict[str, object]) -> List[str]:
    """"what: checkpoint X, flags Y (flag)" for each schedule setting a checkpoint's scheduler state
    (`saved`, its state_dict) holds with another value than the flags give. (megatron-core's state
    holds neither --lr-warmup-init nor the WSD settings: this run's apply.)"""
    ours, earlier, flags = schedule_settings(job), _earlier_settings(job), schedule_flags(job)
    return [f"{name}: checkpoint {saved[name]}, flags {value} ({flags[name]})" for name, value in ours.items()
            if name in saved and name in flags and not _same_setting(name, saved[name], value, ours, saved, earlier)]


def build_scheduler(optimizer, job: TrainingJob):
    """Megatron's OptimizerParamScheduler over the flags' schedule. On resume (load_state_dict) the
    checkpoint's values are kept unless --override-opt-param-scheduler; a difference without either
    flag is refused before training (checkpoint_records.check_schedule)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    override = job.optim.override_opt_param_scheduler
    return OptimizerParamScheduler(optimizer, **schedule_settings(job),
                                   override_opt_param_scheduler=override,
                                   use_checkpoint_opt_param_scheduler=not override)
