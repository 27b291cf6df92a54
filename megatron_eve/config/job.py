"""A training run's options besides the model and its layout: optimizer and schedule, checkpoints,
logging. Fields declared with `option` are command-line flags (options.py), Megatron-LM's names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron_eve.config.data import DataConfig
from megatron_eve.config.model import EVEModelConfig
from megatron_eve.config.options import option
from megatron_eve.config.runtime import ParallelConfig, RuntimeConfig

Stage = Literal["prealign", "pretrain", "finetune"]


@dataclass
class OptimConfig:
    lr: float = option(4e-5, required=True, help="peak learning rate")
    min_lr: float = option(0.0, help="learning rate at the end of the decay")
    vision_lr: Optional[float] = option(  # the reference's vision / projector lr
        None, help="learning rate of PEL, projector and aligner (default: --lr)")
    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root", "WSD"] = option(
        "linear", help="how the learning rate falls from --lr to --min-lr after the warm-up (WSD: --lr until the "
                       "last --lr-wsd-decay-iters / --lr-wsd-decay-samples of the decay, then --lr-wsd-decay-style)")
    lr_wsd_decay_style: Literal["exponential", "linear", "cosine", "minus_sqrt"] = option(
        "exponential", help="with --lr-decay-style WSD: the shape of its final decay")
    lr_warmup_init: float = option(0.0, help="learning rate the linear warm-up starts from")
    lr_warmup_fraction: Optional[float] = option(
        None, help="warm-up as a fraction of the decay length (replaces --lr-warmup-iters / --lr-warmup-samples)")
    lr_warmup_iters: int = option(0, help="warm-up iterations (with --train-iters and --lr-warmup-fraction unset)")
    lr_warmup_samples: int = option(0, help="warm-up samples (with --train-samples and --lr-warmup-fraction unset)")
    lr_decay_iters: Optional[int] = option(None, help="iterations to decay the learning rate over, with --train-iters "
                                                      "(default: --train-iters)")
    lr_decay_samples: Optional[int] = option(None, help="samples to decay the learning rate over, with "
                                                        "--train-samples (default: --train-samples)")
    lr_wsd_decay_iters: Optional[int] = option(None, help="with --lr-decay-style WSD and --train-iters: iterations of "
                                                          "its final decay")
    lr_wsd_decay_samples: Optional[int] = option(None, help="with --lr-decay-style WSD and --train-samples: samples "
                                                            "of its final decay")
    weight_decay: float = option(0.01, help="AdamW's decoupled weight decay (none on biases and norms), with "
                                            "--weight-decay-incr-style constant")
    start_weight_decay: Optional[float] = option(
        None, help="weight decay at the start, with --weight-decay-incr-style linear or cosine")
    end_weight_decay: Optional[float] = option(
        None, help="weight decay at the end of training, with --weight-decay-incr-style linear or cosine")
    weight_decay_incr_style: Literal["constant", "linear", "cosine"] = option(
        "constant", help="how weight decay goes from --start-weight-decay to --end-weight-decay over the training "
                         "(--train-iters / --train-samples); constant: --weight-decay throughout")
    clip_grad: float = option(1.0, help="gradient-norm clipping; 0 disables it")
    adam_beta1: float = option(0.9)
    adam_beta2: float = option(0.999)
    adam_eps: float = option(1e-8)
    use_distributed_optimizer: bool = option(False, help="shard optimizer state over data-parallel ranks")
    overlap_grad_reduce: bool = option(False, help="reduce gradients during the backward pass")
    overlap_param_gather: bool = option(False, help="with the distributed optimizer: gather updated "
                                                    "parameters during the next forward pass")
    initial_loss_scale: float = option(2.0**32, help="fp16: the dynamic loss scale's start")
    loss_scale: Optional[float] = option(None, help="static fp16 loss scale (default dynamic)")
    # A resumed run whose schedule flags differ from the checkpoint's is refused unless one of these says
    # which to follow (Megatron-LM's rule: it asserts).
    override_opt_param_scheduler: bool = option(
        False, aliases=("--override-opt_param-scheduler",),
        help="on resume, follow this run's learning-rate and weight-decay schedule flags (from the "
             "checkpoint's step) where they differ from the checkpoint's")
    use_checkpoint_opt_param_scheduler: bool = option(
        False, aliases=("--use-checkpoint-opt_param-scheduler",),
        help="on resume, keep the checkpoint's learning-rate and weight-decay schedule whatever the flags say")


@dataclass
class ScheduleConfig:
    stage: Stage = option("pretrain", help="prealign trains the PEL, projector and aligner only (LLM frozen); "
                                           "pretrain and finetune train everything but the CLIP teacher")
    micro_batch_size: int = option(1, required=True, help="sequences per micro-batch and data-parallel rank")
    # Unset at the command line: --micro-batch-size x data-parallel size, set once the world size is
    # known (config.validate.complete_job), as Megatron-LM's validate_args does.
    global_batch_size: Optional[int] = option(
        1, cli_default=None, help="sequences per optimizer step, all ranks together (default: --micro-batch-size x "
                                  "data-parallel size)")
    train_iters: Optional[int] = option(None, help="optimizer steps (or give --train-samples)")
    train_samples: Optional[int] = option(None, help="sequences to train on; sets the steps by "
                                                     "--global-batch-size")
    seed: int = option(1234, help="seeds weights, data order and packing")
    nan_action: Literal["skip", "stop"] = option(
        "skip", help="a NaN/Inf loss or gradient skips the update (and is counted), or stops the run")
    # then stop without saving: weights or data are broken
    max_consecutive_nan_iterations: int = option(
        5, help="with --nan-action skip: this many non-finite iterations in a row stop the run (exit 1) "
                "without saving; no interval checkpoint is written during such a streak")

    @property
    def iterations(self) -> int:
        """Optimizer steps of the run: --train-iters, or --train-samples in whole global batches."""
        if self.train_iters is not None:
            return self.train_iters
        if self.train_samples is not None and (self.global_batch_size or 0) > 0:  # (None: not known yet)
            return self.train_samples // self.global_batch_size
        return 0


@dataclass
class CheckpointConfig:
    save: Optional[str] = option(None, metavar="DIR", help="write checkpoints here")
    load: Optional[str] = option(None, metavar="DIR", help="resume from the latest checkpoint here")
    save_interval: Optional[int] = option(None, help="save every this many iterations (and at the end)")
    finetune: bool = option(False, help="load model weights only (start a new stage): no optimizer, scheduler, "
                                        "RNG or iteration")
    pretrained_checkpoint: Optional[str] = option(
        None, metavar="DIR", help="start from these weights (e.g. the previous stage) when --load holds no "
                                  "checkpoint yet; a rerun resumes from --load instead")
    ckpt_step: Optional[int] = option(
        None, metavar="N", help="load iteration N of the checkpoint training starts from (--load, else "
                                "--pretrained-checkpoint) instead of the one latest_checkpointed_iteration.txt names")
    # Megatron-LM's flag: we read and write megatron-core dist-checkpointing's torch_dist only
    # (config.validate refuses the others in one line rather than argparse's bare "invalid choice").
    ckpt_format: Literal["torch_dist", "torch", "zarr", "torch_dcp", "fsdp_dtensor"] = option(
        "torch_dist", help="checkpoint format: torch_dist (megatron-core dist-checkpointing), the only one supported")
    no_load_optim: bool = option(False, help="do not load the optimizer state")
    no_load_rng: bool = option(False, help="do not load the RNG state")
    keep_last: Optional[int] = option(None, flag="--ckpt-keep-last", help="keep only the newest K checkpoints")
    exit_signal_handler: bool = option(False, help="on SIGTERM: save, then exit 0")
    exit_interval: Optional[int] = option(None, help="save and exit at a multiple of this iteration")
    exit_duration_in_mins: Optional[float] = option(
        None, help="save and exit after this long (from the start: model building and checkpoint loading included)")
    verify_checkpoint: bool = option(
        False, help="check every file of the checkpoint to load against the CRC-32 sums recorded at save "
                    "(each rank reads its share) and refuse a damaged one")
    async_save: bool = option(
        False, help="write checkpoints in a background process while training goes on; a checkpoint is "
                    "marked the latest once every rank has written it, and the next save or the exit waits")
    # The distributed optimizer's state in model space (gathered at save; loads at any TP / PP)
    # instead of each data-parallel rank's own shard (no gather; loads at the saved TP / PP only).
    dist_ckpt_optim_fully_reshardable: bool = option(
        False, help="save the distributed optimizer's state in model space (gathered over data-parallel "
                    "ranks at every save), loadable at any TP / PP; by default each rank writes its own "
                    "shard, which loads at the saved TP / PP only (any data-parallel size)")
    ckpt_fully_parallel_save: bool = option(
        True, help="spread the writing of data-parallel replicas (the weights) over the replicas")


@dataclass
class LoggingConfig:
    log_interval: int = option(100, help="print the mean of the iterations since the last line every this many "
                                         "iterations")
    tensorboard_dir: Optional[str] = option(None, metavar="DIR")
    eval_interval: Optional[int] = option(None, help="evaluate on the valid split every this many iterations")
    eval_iters: int = option(100, help="global batches per evaluation (Megatron's default; 0: none)")
    peak_tflops: Optional[float] = option(
        None, help="per-device dense peak for MFU (default: looked up, e.g. H100 989)")
    tensorboard_log_interval: int = option(1, help="write that iteration's losses, learning rate, grad norm, "
                                                   "loss scale and batch size to TensorBoard every this many")


@dataclass
class TrainingJob:
    model: EVEModelConfig
    parallel: ParallelConfig
    runtime: RuntimeConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
