"""Every check of an option combination, before any process group or module exists; each reports
all the problems it finds in one ConfigError.

`validate` covers the model, its layout and kernels (also used by the converters and preprocessing);
`validate_job` a whole training run: that plus batch sizes against the world size, lengths against
the model, the schedule and the checkpoint options.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import List, Optional

import torch

from megatron_eve.config.job import TrainingJob
from megatron_eve.config.model import ConfigError, EVEModelConfig
from megatron_eve.config.runtime import ParallelConfig, RuntimeConfig
from megatron_eve.ranks import is_rank_zero

logger = logging.getLogger(__name__)


def validate(model: EVEModelConfig, parallel: ParallelConfig, runtime: RuntimeConfig) -> None:
    """Raise ConfigError naming every problem of the model and its layout, before any module is built."""
    problems = model_problems(model, parallel, runtime)
    if problems:
        raise ConfigError("invalid EVE configuration:\n  - " + "\n  - ".join(problems))


def model_problems(model: EVEModelConfig, parallel: ParallelConfig, runtime: RuntimeConfig) -> List[str]:
    """Every problem of the model, its layout over devices and its kernels."""
    lm, vis, pal = model.language, model.vision, model.aligner
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    problems = []
    sizes = {"num_layers": lm.num_layers, "hidden_size": lm.hidden_size,
             "num_attention_heads": lm.num_attention_heads, "num_query_groups": lm.num_query_groups}
    too_small = [f"{name} must be >= 1, got {value}" for name, value in sizes.items() if value < 1]
    if too_small:  # the divisibility checks below divide by them
        return too_small
    if tp < 1 or pp < 1:
        problems.append(f"parallel sizes must be >= 1 (TP={tp}, PP={pp})")
    else:
        if lm.num_attention_heads % tp:
            problems.append(
                f"tensor-model-parallel-size {tp} does not divide num_attention_heads "
                f"{lm.num_attention_heads}"
            )
        if lm.num_query_groups % tp:
            problems.append(
                f"tensor-model-parallel-size {tp} does not divide num_query_groups "
                f"{lm.num_query_groups}"
            )
        if lm.num_layers % pp:
            problems.append(
                f"pipeline-model-parallel-size {pp} does not divide num_layers {lm.num_layers}"
            )
        problems += _interleaving_problems(lm.num_layers, parallel)
    if lm.num_attention_heads % lm.num_query_groups:
        problems.append(
            f"num_query_groups {lm.num_query_groups} does not divide num_attention_heads "
            f"{lm.num_attention_heads}"
        )
    if lm.hidden_size % lm.num_attention_heads:
        problems.append(
            f"num_attention_heads {lm.num_attention_heads} does not divide hidden_size "
            f"{lm.hidden_size}"
        )
    if runtime.bf16 and runtime.fp16:
        problems.append("choose one of bf16 and fp16")
    if runtime.recompute_granularity == "full" and runtime.recompute_method is None:
        problems.append("--recompute-granularity full needs --recompute-method uniform or block")
    if runtime.recompute_granularity == "selective" and runtime.recompute_num_layers is not None:
        problems.append("--recompute-num-layers is for --recompute-granularity full: selective recomputes in "
                        "every layer (megatron-core refuses a count)")
    if parallel.distributed_timeout_minutes < 1:
        problems.append(f"--distributed-timeout-minutes {parallel.distributed_timeout_minutes} must be >= 1")
    problems += _kernel_problems(runtime)

    if vis.hidden_size % vis.num_heads:
        problems.append(f"vision num_heads {vis.num_heads} does not divide {vis.hidden_size}")
    if vis.projector_type != "mlp2x_gelu":
        problems.append(f"projector_type {vis.projector_type!r} is not supported (mlp2x_gelu)")
    if vis.teacher_image_size % vis.patch_size:
        problems.append(
            f"teacher_image_size {vis.teacher_image_size} is not a multiple of the "
            f"{vis.patch_size}-px patch"
        )
    elif vis.image_size % vis.teacher_image_size:
        problems.append(
            f"image_size {vis.image_size} is not a multiple of teacher_image_size "
            f"{vis.teacher_image_size}"
        )
    elif (vis.image_size // vis.token_cell) % vis.teacher_grid:
        problems.append(
            f"image_size {vis.image_size} gives a token grid of {vis.image_size / vis.token_cell:g} "
            f"that is not a multiple of the teacher grid {vis.teacher_grid}"
        )

    if pal.enabled:
        if pal.tap_interval is None and lm.num_layers % 8:
            problems.append(
                f"the aligner taps every num_layers/8 layers, but num_layers {lm.num_layers} is not "
                "a multiple of 8: set --aligner-tap-interval"
            )
        elif pal.tap_interval is not None and (
            pal.tap_interval < 1 or lm.num_layers % pal.tap_interval
        ):
            problems.append(
                f"aligner.tap_interval {pal.tap_interval} must divide num_layers {lm.num_layers}"
            )
        if pal.hidden_size % pal.num_heads:
            problems.append(
                f"aligner num_heads {pal.num_heads} does not divide its width {pal.hidden_size}"
            )
        if (
            runtime.recompute_granularity == "full"
            and runtime.recompute_method == "uniform"
            and (runtime.recompute_num_layers or 1) > 1
            and not problems
        ):
            chunk = runtime.recompute_num_layers
            per_stage = lm.num_layers // pp
            # megatron-core only exposes a layer's output at the end of a uniform recompute chunk.
            inner_taps = [t for t in pal.taps(lm.num_layers) if 0 < t < lm.num_layers]
            # Position (1-based) of tapped layer t inside its stage; visible at a chunk end only.
            in_stage = {t: (t - 1) % per_stage + 1 for t in inner_taps}
            bad = [t for t, k in in_stage.items() if k % chunk and k != per_stage]
            if bad:
                problems.append(
                    f"uniform recompute in chunks of {chunk} layers hides the aligner taps after "
                    f"layers {bad}: use recompute_method block or a chunk that divides the taps"
                )
    return problems


def _interleaving_problems(num_layers: int, parallel: ParallelConfig) -> List[str]:
    per_stage, pp = parallel.num_layers_per_virtual_pipeline_stage, parallel.pipeline_model_parallel_size
    if per_stage is None:
        return []
    if per_stage < 1:
        return [f"--num-layers-per-virtual-pipeline-stage {per_stage} must be at least 1"]
    if pp < 2:
        return ["--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1"]
    if num_layers % (pp * per_stage):
        return [f"--num-layers-per-virtual-pipeline-stage {per_stage} x pipeline-model-parallel-size {pp} "
                f"does not divide num_layers {num_layers}"]
    if num_layers == pp * per_stage:
        return [f"--num-layers-per-virtual-pipeline-stage {per_stage} gives one chunk per pipeline stage "
                "(no interleaving): drop the flag or use fewer layers per virtual stage"]
    return []


def _kernel_problems(runtime: RuntimeConfig) -> List[str]:
    """Kernel choices that would run but compute the wrong thing, or crash mid-run."""
    from megatron_eve.model.specs import resolve_transformer_impl

    try:
        impl = resolve_transformer_impl(runtime.transformer_impl)
    except ConfigError as error:
        return [str(error)]
    problems = []
    if runtime.packed_attention == "mask" and impl == "transformer_engine":
        problems.append("--packed-attention mask with Transformer Engine: TE ignores the mask of a causal "
                        "layer, so packed samples would attend across their boundaries; use "
                        "--packed-attention thd (or auto)")
    if runtime.packed_attention == "thd" and impl == "local":
        problems.append("--packed-attention thd needs --transformer-impl transformer_engine or torch: the "
                        "local attention cannot take packed THD batches")
    if runtime.lm_loss_fusion and runtime.cross_entropy_fusion_impl == "te" and impl != "transformer_engine":
        problems.append("--cross-entropy-fusion-impl te needs Transformer Engine (--transformer-impl "
                        f"transformer_engine; here: {impl}): use --cross-entropy-fusion-impl native")
    if runtime.norm_kernel != "torch" and impl == "transformer_engine":
        problems.append(f"--norm-kernel {runtime.norm_kernel} applies to --transformer-impl torch or local "
                        "(Transformer Engine brings its own norm)")
    elif runtime.norm_kernel == "liger":
        if not torch.cuda.is_available():
            problems.append("--norm-kernel liger needs a CUDA device (liger-kernel's Triton kernels)")
        elif importlib.util.find_spec("liger_kernel") is None:
            problems.append("--norm-kernel liger needs the liger-kernel package: pip install liger-kernel")
    backend = runtime.attention_backend
    if backend != "auto" and impl != "torch":
        problems.append(f"--attention-backend {backend} only applies to --transformer-impl torch (here: {impl})")
    elif impl == "torch":
        from megatron_eve.model.attention import resolve_backend

        try:
            resolve_backend(backend, runtime.params_dtype)
        except ValueError as error:
            problems.append(str(error))
    return problems


def validate_job(job: TrainingJob, world_size: int) -> None:
    """Complete the run's options from the world size (complete_job), then raise ConfigError naming
    every problem of them."""
    complete_job(job, world_size)
    problems = job_problems(job, world_size)
    if problems:
        raise ConfigError("cannot start training:\n  - " + "\n  - ".join(problems))


def job_problems(job: TrainingJob, world_size: int) -> List[str]:
    """Every problem of a training run's options taken together (no file is read); the job as
    complete_job leaves it."""
    from megatron_eve.data.images import tokens_per_image

    problems = _non_positive(job)
    if problems:  # the checks below divide by these
        return problems
    tp, pp = job.parallel.tensor_model_parallel_size, job.parallel.pipeline_model_parallel_size
    s, model, seq = job.schedule, job.model, job.data.seq_length
    if world_size % (tp * pp):
        problems.append(f"tensor ({tp}) x pipeline ({pp}) parallel sizes do not divide the world size {world_size}")
    else:
        dp = world_size // (tp * pp)
        if s.global_batch_size % (s.micro_batch_size * dp):
            problems.append(f"--global-batch-size {s.global_batch_size} is not divisible by --micro-batch-size "
                            f"{s.micro_batch_size} x data-parallel size {dp}")
        elif job.parallel.num_layers_per_virtual_pipeline_stage and pp > 1 and (
                s.global_batch_size // (s.micro_batch_size * dp)) % pp:
            # megatron-core's interleaved schedule runs micro-batches in groups of PP per chunk.
            problems.append(f"interleaved pipelining needs a multiple of pipeline-model-parallel-size {pp} "
                            f"micro-batches per step; --global-batch-size {s.global_batch_size} / (--micro-batch-size "
                            f"{s.micro_batch_size} x data-parallel size {dp}) gives "
                            f"{s.global_batch_size // (s.micro_batch_size * dp)}")
    if job.optim.overlap_param_gather and not job.optim.use_distributed_optimizer:
        # As Megatron-LM's validate_args (megatron-core's plain DDP fails in its first forward).
        problems.append("--overlap-param-gather needs --use-distributed-optimizer")
    if (s.train_iters is None) == (s.train_samples is None):
        problems.append("give exactly one of --train-iters and --train-samples")
    elif s.global_batch_size is not None and s.iterations < 1:
        problems.append("nothing to train: --train-iters (or --train-samples / --global-batch-size) is 0")
    else:
        problems += _schedule_problems(job)
    grid = model.vision.image_size // model.vision.token_cell
    square = tokens_per_image(grid, grid)
    if seq < square:
        problems.append(f"--seq-length {seq} is below one square image's {square} tokens at "
                        f"{model.vision.image_size} px")
    if seq > model.language.max_position_embeddings:
        problems.append(f"--seq-length {seq} exceeds --max-position-embeddings "
                        f"{model.language.max_position_embeddings}")
    if job.parallel.sequence_parallel and seq % tp:
        problems.append(f"--seq-length {seq} must be divisible by TP {tp} for --sequence-parallel")
    if model.aligner.enabled and not model.aligner.teacher_path:
        problems.append("the aligner is on (EVE trains with it in every stage) but --vision-teacher-path is not "
                        "set: pass the CLIP teacher's local folder, or --disable-aligner")
    if job.optim.override_opt_param_scheduler and job.optim.use_checkpoint_opt_param_scheduler:
        problems.append("choose one of --override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler")
    ck = job.checkpoint
    if ck.exit_signal_handler and not ck.save:
        problems.append("--exit-signal-handler saves a checkpoint: it needs --save")
    if ck.save_interval and not ck.save:
        problems.append("--save-interval needs --save")
    if ck.finetune and not (ck.load or ck.pretrained_checkpoint):
        problems.append("--finetune starts from loaded weights: give --load (or --pretrained-checkpoint)")
    if ck.ckpt_format != "torch_dist":
        problems.append(f"--ckpt-format {ck.ckpt_format}: only torch_dist (megatron-core dist-checkpointing) is "
                        "read and written here")
    if ck.ckpt_step is not None and not (ck.load or ck.pretrained_checkpoint):
        problems.append("--ckpt-step names an iteration to load: give --load (or --pretrained-checkpoint)")
    try:
        job.data.blend
    except ValueError as error:
        problems.append(str(error))
    layout_problems = model_problems(model, job.parallel, job.runtime)
    if s.stage == "prealign" and not layout_problems:
        idle = _chunks_without_trainables_in_prealign(model, job.parallel)
        if idle:
            problems.append(f"stage prealign trains only the PEL and projector (first pipeline stage) and the "
                            f"aligner's taps: {', '.join(idle)} would have nothing to train; use fewer pipeline "
                            "stages")
    return problems + layout_problems


def _data_parallel_size(job: TrainingJob, world_size: int) -> Optional[int]:
    tp, pp = job.parallel.tensor_model_parallel_size, job.parallel.pipeline_model_parallel_size
    if tp < 1 or pp < 1 or world_size % (tp * pp):
        return None  # job_problems says why
    return world_size // (tp * pp)


def complete_job(job: TrainingJob, world_size: int) -> None:
    """What Megatron-LM's validate_args derives from the world size (arguments.py), set in the job: an
    unset --global-batch-size is --micro-batch-size x data-parallel size (a note), and sequence
    parallelism is off without tensor parallelism (a warning: it would change the numerics and nothing
    else). Flags that leave no data-parallel size are left for job_problems to name."""
    s, parallel = job.schedule, job.parallel
    dp = _data_parallel_size(job, world_size)
    if s.global_batch_size is None and dp is not None and s.micro_batch_size >= 1:
        s.global_batch_size = s.micro_batch_size * dp
        if is_rank_zero():
            print(f"setting global batch size to {s.global_batch_size} (--micro-batch-size {s.micro_batch_size} x "
                  f"data-parallel size {dp})", flush=True)
    if parallel.sequence_parallel and parallel.tensor_model_parallel_size == 1:
        parallel.sequence_parallel = False
        if is_rank_zero():
            logger.warning("warning: disabling --sequence-parallel because tensor model parallelism is disabled "
                           "(--tensor-model-parallel-size 1), as Megatron-LM does")


def _schedule_problems(job: TrainingJob) -> List[str]:
    """The learning-rate and weight-decay flags against the training length's unit (Megatron-LM's
    assertions in validate_args) and what megatron-core's OptimizerParamScheduler asserts once the
    model is built, each named by its flags. Exactly one of --train-iters / --train-samples is set."""
    o, s = job.optim, job.schedule
    problems = []
    if s.train_iters is not None:
        unit, other_unit = ("iters", "iterations"), ("samples", "samples")
        wrong = {"--lr-decay-samples": o.lr_decay_samples is not None, "--lr-warmup-samples": o.lr_warmup_samples != 0,
                 "--lr-wsd-decay-samples": o.lr_wsd_decay_samples is not None}
        warmup_flag, warmup, wsd = "--lr-warmup-iters", o.lr_warmup_iters, o.lr_wsd_decay_iters
    else:
        unit, other_unit = ("samples", "samples"), ("iters", "iterations")
        wrong = {"--lr-decay-iters": o.lr_decay_iters is not None, "--lr-warmup-iters": o.lr_warmup_iters != 0,
                 "--lr-wsd-decay-iters": o.lr_wsd_decay_iters is not None}
        warmup_flag, warmup, wsd = "--lr-warmup-samples", o.lr_warmup_samples, o.lr_wsd_decay_samples
    problems += [f"{flag} counts {other_unit[1]} but the run counts {unit[1]} (--train-{unit[0]}): give "
                 f"{flag.replace(other_unit[0], unit[0])}" for flag, given in wrong.items() if given]
    if o.lr_warmup_fraction is not None and warmup != 0:
        problems.append(f"can only specify one of --lr-warmup-fraction and {warmup_flag}")
    if o.lr_decay_style == "WSD" and wsd is None and not wrong[f"--lr-wsd-decay-{other_unit[0]}"]:
        problems.append(f"--lr-decay-style WSD needs the length of its final decay: --lr-wsd-decay-{unit[0]} "
                        f"(with --train-{unit[0]})")
    if o.min_lr < 0:
        problems.append(f"--min-lr {o.min_lr} must not be negative")
    elif o.min_lr > o.lr:
        problems.append(f"--min-lr {o.min_lr} is above --lr {o.lr}")
    if o.lr_warmup_init < 0 or o.lr_warmup_init > o.lr:
        problems.append(f"--lr-warmup-init {o.lr_warmup_init} must be between 0 and --lr {o.lr}")
    problems += _weight_decay_problems(job)
    if problems or s.global_batch_size is None:
        return problems
    from megatron_eve.training.optim import schedule_settings

    settings = schedule_settings(job)
    if settings["lr_warmup_steps"] >= settings["lr_decay_steps"]:
        problems.append(f"the learning-rate warm-up ({_warmup_words(job, settings['lr_warmup_steps'])}) must end "
                        f"before its decay does ({_decay_words(job, settings['lr_decay_steps'])})")
    return problems


def _warmup_words(job: TrainingJob, steps: float) -> str:
    """The warm-up's flags and its length in samples (the scheduler's steps), for a message."""
    o, s = job.optim, job.schedule
    if o.lr_warmup_fraction is not None:
        return f"--lr-warmup-fraction {o.lr_warmup_fraction} of the decay: {steps:.10g} samples"
    if s.train_iters is not None:
        return f"--lr-warmup-iters {o.lr_warmup_iters} x --global-batch-size {s.global_batch_size}: {steps} samples"
    return f"--lr-warmup-samples {o.lr_warmup_samples}"


def _decay_words(job: TrainingJob, steps: int) -> str:
    o, s = job.optim, job.schedule
    if s.train_iters is not None:
        flag, iters = ("--lr-decay-iters", o.lr_decay_iters) if o.lr_decay_iters is not None else (
            "--train-iters", s.train_iters)
        return f"{flag} {iters} x --global-batch-size {s.global_batch_size}: {steps} samples"
    if o.lr_decay_samples is not None:
        return f"--lr-decay-samples {steps}"
    return f"--train-samples {steps}"


def _weight_decay_problems(job: TrainingJob) -> List[str]:
    """Megatron-LM's rule (validate_args): constant weight decay is --weight-decay, an increasing one
    goes from --start-weight-decay to --end-weight-decay; megatron-core's scheduler asserts both are
    non-negative and that it does not decrease."""
    o = job.optim
    ends = {"--start-weight-decay": o.start_weight_decay, "--end-weight-decay": o.end_weight_decay}
    if o.weight_decay_incr_style == "constant":
        given = [flag for flag, value in ends.items() if value is not None]
        if given:
            return [f"{' and '.join(given)} {'need' if len(given) > 1 else 'needs'} --weight-decay-incr-style linear "
                    "or cosine (constant weight decay is --weight-decay)"]
        return [f"--weight-decay {o.weight_decay} must not be negative"] if o.weight_decay < 0 else []
    missing = [flag for flag, value in ends.items() if value is None]
    if missing:
        return [f"--weight-decay-incr-style {o.weight_decay_incr_style} needs {' and '.join(missing)}"]
    if o.start_weight_decay < 0:
        return [f"--start-weight-decay {o.start_weight_decay} must not be negative"]
    if o.end_weight_decay < o.start_weight_decay:
        return [f"--end-weight-decay {o.end_weight_decay} is below --start-weight-decay {o.start_weight_decay}: "
                "megatron-core's scheduler only increases weight decay"]
    return []


def _chunks_without_trainables_in_prealign(model: EVEModelConfig, parallel: ParallelConfig) -> List[str]:
    """Model chunks that hold no PEL, projector or aligner part: the PEL and projector sit on the
    first chunk, the aligner's projection of tap t on the chunk holding decoder layer t, its head on
    the last chunk. Chunk c (in layer order) is pipeline stage c % PP, virtual stage c // PP."""
    num_layers, pp = model.language.num_layers, parallel.pipeline_model_parallel_size
    virtual = parallel.virtual_pipeline_size(num_layers)
    count = pp * (virtual or 1)
    per_chunk = num_layers // count
    taps = model.aligner.taps(num_layers) if model.aligner.enabled else []
    idle = []
    for c in range(count):
        holds_tap = any(c * per_chunk < t <= (c + 1) * per_chunk for t in taps if 0 < t < num_layers)
        if not (c == 0 or (taps and (c == count - 1 or holds_tap))):
            idle.append(f"pipeline stage {c % pp}" + (f" (model chunk {c // pp})" if virtual else ""))
    return idle


def _non_positive(job: TrainingJob) -> List[str]:
    """Counts and intervals that must be at least 1 (0 would divide by zero, or loop forever)."""
    s, ck, log, data = job.schedule, job.checkpoint, job.logging, job.data
    at_least_one = {
        "--tensor-model-parallel-size": job.parallel.tensor_model_parallel_size,
        "--pipeline-model-parallel-size": job.parallel.pipeline_model_parallel_size,
        "--micro-batch-size": s.micro_batch_size,
        "--seq-length": data.seq_length, "--log-interval": log.log_interval,
        "--packing-buffer-size": data.packing_buffer_size,
        "--max-consecutive-nan-iterations": s.max_consecutive_nan_iterations,
    }
    o = job.optim
    optional = {"--global-batch-size": s.global_batch_size, "--save-interval": ck.save_interval,
                "--eval-interval": log.eval_interval, "--exit-interval": ck.exit_interval,
                "--ckpt-keep-last": ck.keep_last, "--lr-decay-iters": o.lr_decay_iters,
                "--lr-decay-samples": o.lr_decay_samples, "--lr-wsd-decay-iters": o.lr_wsd_decay_iters,
                "--lr-wsd-decay-samples": o.lr_wsd_decay_samples}
    problems = [f"{flag} {value} must be at least 1" for flag, value in at_least_one.items() if value < 1]
    problems += [f"{flag} {value} must be at least 1" for flag, value in optional.items()
                 if value is not None and value < 1]
    problems += [f"{flag} {value} must not be negative" for flag, value in
                 (("--num-workers", data.num_workers), ("--eval-iters", log.eval_iters),
                  ("--ckpt-step", ck.ckpt_step), ("--lr-warmup-iters", o.lr_warmup_iters),
                  ("--lr-warmup-samples", o.lr_warmup_samples)) if value is not None and value < 0]
    return problems
