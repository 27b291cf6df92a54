"""Typed configuration: every option of the model, its layout and a training run, in one place.

model.py (decoder, PEL, aligner, presets), runtime.py (parallel sizes, kernels, precision),
data.py, job.py (optimizer, schedule, checkpoints, logging), validate.py (every combination check,
all problems in one error), options.py (command-line flags derived from the fields),
transformer.py (megatron-core's TransformerConfig).
"""

from megatron_eve.config.data import DataConfig, parse_data_path
from megatron_eve.config.job import (CheckpointConfig, LoggingConfig, OptimConfig, ScheduleConfig, Stage,
                                     TrainingJob)
from megatron_eve.config.model import (ALIGNER_GEOMETRY, PRESETS, RUN_OPTIONS, AlignerConfig, ConfigError,
                                       EVEModelConfig, LanguageModelConfig, VisionConfig, architecture,
                                       architecture_differences, get_preset, model_config_from_dict,
                                       padded_vocab_size, replace)
from megatron_eve.config.runtime import ParallelConfig, RuntimeConfig, TransformerImpl
from megatron_eve.config.transformer import transformer_config
from megatron_eve.config.validate import complete_job, job_problems, model_problems, validate, validate_job

__all__ = [
    "ALIGNER_GEOMETRY", "PRESETS", "RUN_OPTIONS", "AlignerConfig", "CheckpointConfig", "ConfigError", "DataConfig",
    "EVEModelConfig", "LanguageModelConfig", "LoggingConfig", "OptimConfig", "ParallelConfig", "RuntimeConfig",
    "ScheduleConfig", "Stage", "TrainingJob", "TransformerImpl", "VisionConfig", "architecture",
    "architecture_differences", "complete_job", "get_preset", "job_problems", "model_config_from_dict",
    "model_problems", "padded_vocab_size", "parse_data_path", "replace", "transformer_config", "validate",
    "validate_job",
]
