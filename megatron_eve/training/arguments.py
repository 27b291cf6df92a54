"""Megatron-LM flag names at the command line, typed dataclasses inside.

Every flag is derived from a config field (megatron_eve/config, `option`), so its name, type, default
and help have one source; only --preset, --use-checkpoint-args (where the model starts from) are
flags of their own. `parse_args(argv)` builds a `TrainingJob`; nothing else reads argv.
"""

from __future__ import annotations

import argparse

from megatron_eve.config import (
    PRESETS,
    RUN_OPTIONS,
    AlignerConfig,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EVEModelConfig,
    LanguageModelConfig,
    LoggingConfig,
    OptimConfig,
    ParallelConfig,
    RuntimeConfig,
    ScheduleConfig,
    TrainingJob,
    VisionConfig,
    get_preset,
    replace,
)
from megatron_eve.config.options import add_flags, flag_names, flag_values, from_flags

MODEL_PARTS = {"language": LanguageModelConfig, "vision": VisionConfig, "aligner": AlignerConfig}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default when it says something (not for unset options or off switches)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:  # (not 0 or 0.0, which equal False)
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_eve.py",
        description="Train EVE (encoder-free vision-language model) on megatron-core. Launch with "
                    "torchrun; flags follow Megatron-LM's names.",
        formatter_class=_HelpFormatter,
        allow_abbrev=False,  # as Megatron-LM: a flag is its full name (--exit-sig is not --exit-signal-handler)
    )
    g = p.add_argument_group("model (a preset; the architecture flags below override it)")
    g.add_argument("--preset", choices=sorted(PRESETS), default="eve-7b", help="model preset")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="build the model the checkpoint records (--load's latest, else --pretrained-checkpoint; "
                        "converted checkpoints included) instead of --preset; architecture flags given must agree")
    add_flags(p.add_argument_group("language model"), LanguageModelConfig)
    add_flags(p.add_argument_group("patch embedding layer"), VisionConfig)
    add_flags(p.add_argument_group("patch aligning layer and its CLIP teacher"), AlignerConfig)
    add_flags(p.add_argument_group("parallelism"), ParallelConfig)
    add_flags(p.add_argument_group("precision and kernels"), RuntimeConfig)
    add_flags(p.add_argument_group("training"), ScheduleConfig)
    add_flags(p.add_argument_group("optimizer and learning-rate schedule"), OptimConfig)
    add_flags(p.add_argument_group("data"), DataConfig)
    add_flags(p.add_argument_group("checkpoints"), CheckpointConfig)
    add_flags(p.add_argument_group("logging and evaluation"), LoggingConfig)
    return p


def parse_args(argv=None) -> TrainingJob:
    return job_from_args(build_parser().parse_args(argv))


def model_flag_values(args: argparse.Namespace) -> dict:
    """Model fields set on the command line ("vision.image_size": 1344, ...), plus the run options
    that always come from flags (aligner on/off, its loss weight, the teacher's folder)."""
    return {f"{part}.{name}": value for part, cls in MODEL_PARTS.items()
            for name, value in flag_values(cls, args).items()}


def _base_model(args: argparse.Namespace, changes: dict) -> EVEModelConfig:
    """The preset, or with --use-checkpoint-args the model recorded by the checkpoint training will
    load first (architecture flags given must agree with it)."""
    if not args.use_checkpoint_args:
        return get_preset(args.preset)
    from megatron_eve.training.checkpoint_records import checkpoint_to_load, recorded_model_config

    source = checkpoint_to_load(args.load, args.pretrained_checkpoint)
    if source is None:
        raise ConfigError("--use-checkpoint-args: neither --load nor --pretrained-checkpoint holds a checkpoint")
    recorded = recorded_model_config(source, args.ckpt_step)
    flags = {}
    for part, cls in MODEL_PARTS.items():
        flags.update(flag_names(cls, f"{part}."))
    conflicts = []
    for key, value in changes.items():
        part, name = key.split(".")
        if key not in RUN_OPTIONS and getattr(getattr(recorded, part), name) != value:
            conflicts.append(f"{flags[key]} {value} (the checkpoint: {getattr(getattr(recorded, part), name)})")
    if conflicts:
        raise ConfigError(f"--use-checkpoint-args: {source} records another architecture than "
                          f"{', '.join(conflicts)}")
    return recorded


def job_from_args(args: argparse.Namespace) -> TrainingJob:
    changes = model_flag_values(args)
    model = _base_model(args, changes)
    # A zero loss weight means no aligner: the teacher is neither loaded nor run.
    changes["aligner.enabled"] = changes["aligner.enabled"] and changes["aligner.loss_weight"] > 0
    return TrainingJob(
        model=replace(model, **changes),
        parallel=from_flags(ParallelConfig, args),
        runtime=from_flags(RuntimeConfig, args),
        optim=from_flags(OptimConfig, args),
        schedule=from_flags(ScheduleConfig, args),
        data=from_flags(DataConfig, args),
        checkpoint=from_flags(CheckpointConfig, args),
        logging=from_flags(LoggingConfig, args),
    )
