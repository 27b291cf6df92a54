"""Megatron-LM flag names at the command line, typed dataclasses inside.

`parse_args(argv)` builds a `TrainingJob`: the model (a preset plus overrides), its layout over
devices, the optimizer and schedule, data, checkpoints and logging. Nothing else reads argv.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import List, Optional

from megatron_eve.config import (
    PRESETS,
    ConfigError,
    EVEModelConfig,
    ParallelConfig,
    RuntimeConfig,
    get_preset,
    replace,
)

STAGES = ("prealign", "pretrain", "finetune")

# Architecture flags (overrides of the preset, or checked against --use-checkpoint-args): flag → field.
ARCHITECTURE_FLAGS = {
    "--num-layers": ("language.num_layers", int, None),
    "--hidden-size": ("language.hidden_size", int, None),
    "--ffn-hidden-size": ("language.ffn_hidden_size", int, None),
    "--num-attention-heads": ("language.num_attention_heads", int, None),
    "--num-query-groups": ("language.num_query_groups", int, None),
    "--max-position-embeddings": ("language.max_position_embeddings", int, None),
    "--vocab-size": ("language.vocab_size", int, None),
    "--make-vocab-size-divisible-by": ("language.make_vocab_size_divisible_by", int, None),
    "--rotary-base": ("language.rotary_base", int, None),
    "--norm-epsilon": ("language.norm_epsilon", float, None),
    "--vision-hidden-size": ("vision.hidden_size", int, "PEL width (the release's mm_hidden_size)"),
    "--vision-num-attention-heads": ("vision.num_heads", int, "heads of the PEL's local and global attention"),
    "--teacher-image-size": ("vision.teacher_image_size", int, "side of the CLIP teacher's square (image_size_clip)"),
    "--aligner-hidden-size": ("aligner.hidden_size", int, "aligner width = the CLIP teacher's hidden size"),
    "--aligner-num-attention-heads": ("aligner.num_heads", int, "heads of the aligner's attention across taps"),
    "--aligner-tap-interval": ("aligner.tap_interval", int, "decoder layers between aligner taps "
                                                             "(default num-layers / 8)"),
}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


@dataclass
class OptimConfig:
    lr: float = 4e-5
    min_lr: float = 0.0
    vision_lr: Optional[float] = None  # PEL, projector and aligner (the reference's vision/projector lr)
    lr_decay_style: str = "cosine"
    lr_warmup_fraction: Optional[float] = None
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    initial_loss_scale: float = 2.0**32
    loss_scale: Optional[float] = None  # fp16 static scale; None = dynamic


@dataclass
class ScheduleConfig:
    stage: str = "pretrain"
    micro_batch_size: int = 1
    global_batch_size: int = 1
    seq_length: int = 4096
    train_iters: int = 1
    seed: int = 1234
    nan_action: str = "skip"  # or "stop"
    max_consecutive_nan_iterations: int = 5  # then stop without saving: weights or data are broken


@dataclass
class DataArgs:
    data_path: List[str] = field(default_factory=list)
    split: str = "969,30,1"
    tokenizer_model: Optional[str] = None
    num_workers: int = 2
    pack: bool = True
    packing_buffer_size: int = 10000
    data_cache_path: Optional[str] = None  # packing-plan cache (None: beside the data)


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    finetune: bool = False  # load model weights only (a new stage); iteration restarts at 0
    pretrained_checkpoint: Optional[str] = None  # weights-only start when --load has nothing yet
    no_load_optim: bool = False
    no_load_rng: bool = False
    keep_last: Optional[int] = None
    exit_signal_handler: bool = False
    exit_interval: Optional[int] = None
    exit_duration_in_mins: Optional[float] = None
    verify_checkpoint: bool = False  # check every file's CRC-32 before loading
    async_save: bool = False  # write in a background process; the next save / exit waits for it
    # The distributed optimizer's state in model space (gathered at save; loads at any TP / PP)
    # instead of each data-parallel rank's own shard (no gather; loads at the saved TP / PP only).
    dist_ckpt_optim_fully_reshardable: bool = False
    ckpt_fully_parallel_save: bool = True  # data-parallel replicas share the writing of the weights


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard_dir: Optional[str] = None
    eval_interval: Optional[int] = None
    eval_iters: int = 0
    peak_tflops: Optional[float] = None  # per device; looked up from the device name when None


@dataclass
class TrainingJob:
    model: EVEModelConfig
    parallel: ParallelConfig
    runtime: RuntimeConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    data: DataArgs
    checkpoint: CheckpointConfig
    logging: LoggingConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_eve.py",
        description="Train EVE (encoder-free vision-language model) on megatron-core. Launch with "
                    "torchrun; flags follow Megatron-LM's names.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("EVE")
    g.add_argument("--stage", choices=STAGES, default="pretrain",
                   help="prealign trains the PEL, projector and aligner only (LLM frozen); pretrain and "
                        "finetune train everything but the CLIP teacher")
    g.add_argument("--preset", choices=sorted(PRESETS), default="eve-7b", help="model preset")
    g.add_argument("--image-size", type=int, default=None, help="PEL resolution (672, or 1344 for HD)")
    g.add_argument("--vision-teacher-path", default=None,
                   help="local HF folder of the CLIP teacher (openai/clip-vit-large-patch14-336)")
    g.add_argument("--align-loss-weight", type=float, default=1.0, help="total = LM + w * align")
    g.add_argument("--disable-aligner", action="store_true", help="train without the patch aligning layer")
    g.add_argument("--vision-lr", type=float, default=None,
                   help="learning rate of PEL, projector and aligner (default: --lr)")

    g = p.add_argument_group("architecture (overrides of the preset; default: the preset's)")
    for flag, (_, kind, help_text) in ARCHITECTURE_FLAGS.items():
        g.add_argument(flag, type=kind, default=None, help=help_text)
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="build the model the checkpoint records (--load's latest, else --pretrained-checkpoint; "
                        "converted checkpoints included) instead of --preset; architecture flags given must agree")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved 1F1B: each pipeline rank holds num-layers / (PP x this) model chunks, "
                        "shrinking the pipeline bubble by that factor")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10,
                   help="how long a collective waits for its peers before the job fails")

    g = p.add_argument_group("precision and kernels")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32)
    g.add_argument("--loss-scale", type=float, default=None, help="static fp16 loss scale (default dynamic)")
    g.add_argument("--transformer-impl", choices=("auto", "transformer_engine", "torch", "local"), default="auto",
                   help="auto: Transformer Engine if installed with CUDA, else torch's fused attention kernels "
                        "on CUDA, else megatron-core's local modules")
    g.add_argument("--attention-backend", choices=("auto", "varlen", "flash", "flex", "sdpa"), default="auto",
                   help="core attention of --transformer-impl torch")
    g.add_argument("--packed-attention", choices=("auto", "thd", "mask"), default="auto",
                   help="packed samples kept apart by THD + cu_seqlens (TE / torch kernels) or a block mask")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--use-cpu-initialization", action="store_true")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, required=True)
    g.add_argument("--global-batch-size", type=int, required=True)
    g.add_argument("--seq-length", type=int, required=True, help="positions per (packed) sequence")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-samples", type=int, default=None, help="sequences; sets --train-iters")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--nan-action", choices=("skip", "stop"), default="skip",
                   help="a NaN/Inf loss or gradient skips the update (and is counted), or stops the run")
    g.add_argument("--max-consecutive-nan-iterations", type=int, default=5,
                   help="with --nan-action skip: this many non-finite iterations in a row stop the run "
                        "(exit 1) without saving; no interval checkpoint is written during such a streak")

    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--lr", type=float, required=True)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine", "inverse-square-root"),
                   default="cosine")
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: the training length")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", required=True,
                   help="preprocessed prefixes, optionally weighted: A B, or 0.7 A 0.3 B")
    g.add_argument("--split", default="969,30,1", help="train,valid,test weights")
    g.add_argument("--tokenizer-model", default=None,
                   help="tokenizer.model (or HF folder) the data was made with; checked against the data")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per rank")
    g.add_argument("--no-pack", action="store_true", help="one sample per row, padded to the longest")
    g.add_argument("--packing-buffer-size", type=int, default=10000, help="samples packed together")
    g.add_argument("--data-cache-path", default=None, metavar="DIR",
                   help="where packing plans are cached (default: PREFIX.plans/ beside each dataset)")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--finetune", action="store_true",
                   help="load model weights only (start a new stage): no optimizer, scheduler, RNG or iteration")
    g.add_argument("--pretrained-checkpoint", default=None,
                   help="start from these weights (e.g. the previous stage) when --load holds no checkpoint "
                        "yet; a rerun resumes from --load instead")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--verify-checkpoint", action="store_true",
                   help="check every file of the checkpoint to load against the CRC-32 sums recorded at save "
                        "(each rank reads its share) and refuse a damaged one")
    g.add_argument("--ckpt-keep-last", type=int, default=None, help="keep only the newest K checkpoints")
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints in a background process while training goes on; a checkpoint is "
                        "marked the latest once every rank has written it, and the next save or the exit waits")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="save the distributed optimizer's state in model space (gathered over data-parallel "
                        "ranks at every save), loadable at any TP / PP; by default each rank writes its own "
                        "shard, which loads at the saved TP / PP only (any data-parallel size)")
    g.add_argument("--ckpt-fully-parallel-save", action=argparse.BooleanOptionalAction, default=True,
                   help="spread the writing of data-parallel replicas (the weights) over the replicas")
    g.add_argument("--exit-signal-handler", action="store_true", help="on SIGTERM: save, then exit 0")
    g.add_argument("--exit-interval", type=int, default=None, help="save and exit at a multiple of this iteration")
    g.add_argument("--exit-duration-in-mins", type=float, default=None, help="save and exit after this long")

    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=0)
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device dense peak for MFU (default: looked up, e.g. H100 989)")
    return p


def parse_args(argv=None) -> TrainingJob:
    args = build_parser().parse_args(argv)
    return job_from_args(args)


def _base_model(args: argparse.Namespace, changes: dict) -> EVEModelConfig:
    """The preset, or with --use-checkpoint-args the model recorded by the checkpoint training will
    load first (flags given must agree with it)."""
    if not args.use_checkpoint_args:
        return get_preset(args.preset)
    from megatron_eve.training.checkpoint import checkpoint_to_load, recorded_model_config

    source = checkpoint_to_load(args.load, args.pretrained_checkpoint)
    if source is None:
        raise ConfigError("--use-checkpoint-args: neither --load nor --pretrained-checkpoint holds a checkpoint")
    recorded = recorded_model_config(source)
    flags = {field: flag for flag, (field, _, _) in ARCHITECTURE_FLAGS.items()}
    conflicts = []
    for key, value in changes.items():
        part, name = key.split(".")
        if getattr(getattr(recorded, part), name) != value:
            conflicts.append(f"{flags[key]} {value} (the checkpoint: {getattr(getattr(recorded, part), name)})")
    if conflicts:
        raise ConfigError(f"--use-checkpoint-args: {source} records another architecture than "
                          f"{', '.join(conflicts)}")
    return recorded


def job_from_args(args: argparse.Namespace) -> TrainingJob:
    changes = {field: getattr(args, _dest(flag)) for flag, (field, _, _) in ARCHITECTURE_FLAGS.items()
               if getattr(args, _dest(flag)) is not None}
    model = _base_model(args, changes)
    if args.image_size is not None:
        changes["vision.image_size"] = args.image_size
    changes["aligner.enabled"] = not args.disable_aligner and args.align_loss_weight > 0
    changes["aligner.loss_weight"] = args.align_loss_weight
    changes["aligner.teacher_path"] = args.vision_teacher_path
    model = replace(model, **changes)

    if (args.train_iters is None) == (args.train_samples is None):
        raise ConfigError("give exactly one of --train-iters and --train-samples")
    if args.train_samples is not None and args.global_batch_size < 1:
        raise ConfigError(f"--global-batch-size {args.global_batch_size} must be at least 1")
    train_iters = args.train_iters if args.train_iters is not None else args.train_samples // args.global_batch_size
    if args.recompute_granularity == "full" and args.recompute_method is None:
        raise ConfigError("--recompute-granularity full needs --recompute-method uniform or block")
    return TrainingJob(
        model=model,
        parallel=ParallelConfig(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                args.sequence_parallel, args.distributed_timeout_minutes,
                                args.num_layers_per_virtual_pipeline_stage),
        runtime=RuntimeConfig(
            transformer_impl=args.transformer_impl, attention_backend=args.attention_backend,
            packed_attention=args.packed_attention, bf16=args.bf16, fp16=args.fp16,
            recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
            recompute_num_layers=args.recompute_num_layers or (1 if args.recompute_granularity == "full" else None),
            use_cpu_initialization=args.use_cpu_initialization,
        ),
        optim=OptimConfig(
            lr=args.lr, min_lr=args.min_lr, vision_lr=args.vision_lr, lr_decay_style=args.lr_decay_style,
            lr_warmup_fraction=args.lr_warmup_fraction, lr_warmup_iters=args.lr_warmup_iters,
            lr_decay_iters=args.lr_decay_iters, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
            use_distributed_optimizer=args.use_distributed_optimizer,
            overlap_grad_reduce=args.overlap_grad_reduce, overlap_param_gather=args.overlap_param_gather,
            initial_loss_scale=args.initial_loss_scale, loss_scale=args.loss_scale,
        ),
        schedule=ScheduleConfig(
            stage=args.stage, micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
            seq_length=args.seq_length, train_iters=train_iters, seed=args.seed, nan_action=args.nan_action,
            max_consecutive_nan_iterations=args.max_consecutive_nan_iterations,
        ),
        data=DataArgs(
            data_path=args.data_path, split=args.split, tokenizer_model=args.tokenizer_model,
            num_workers=args.num_workers, pack=not args.no_pack, packing_buffer_size=args.packing_buffer_size,
            data_cache_path=args.data_cache_path,
        ),
        checkpoint=CheckpointConfig(
            save=args.save, load=args.load, save_interval=args.save_interval, finetune=args.finetune,
            pretrained_checkpoint=args.pretrained_checkpoint,
            no_load_optim=args.no_load_optim, no_load_rng=args.no_load_rng, keep_last=args.ckpt_keep_last,
            exit_signal_handler=args.exit_signal_handler, exit_interval=args.exit_interval,
            exit_duration_in_mins=args.exit_duration_in_mins, verify_checkpoint=args.verify_checkpoint,
            async_save=args.async_save, dist_ckpt_optim_fully_reshardable=args.dist_ckpt_optim_fully_reshardable,
            ckpt_fully_parallel_save=args.ckpt_fully_parallel_save,
        ),
        logging=LoggingConfig(
            log_interval=args.log_interval, tensorboard_dir=args.tensorboard_dir,
            eval_interval=args.eval_interval, eval_iters=args.eval_iters, peak_tflops=args.peak_tflops,
        ),
    )
