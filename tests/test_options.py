"""Command-line flags are derived from the config fields: defaults come from the dataclasses, every
option field has a flag that sets exactly it, names follow Megatron-LM, and every problem of a run's
options is reported together in one error."""

import dataclasses
import re
import typing

import pytest

from megatron_eve.config import (AlignerConfig, CheckpointConfig, ConfigError, DataConfig, LanguageModelConfig,
                                 LoggingConfig, OptimConfig, ParallelConfig, RuntimeConfig, ScheduleConfig,
                                 VisionConfig, get_preset, validate_job)
from megatron_eve.config.options import flag_of, flagged_fields
from megatron_eve.training.arguments import MODEL_PARTS, build_parser, parse_args

REQUIRED = ["--micro-batch-size", "2", "--global-batch-size", "8", "--seq-length", "2048", "--lr", "1e-3",
            "--data-path", "corpus"]
SECTIONS = {"parallel": ParallelConfig, "runtime": RuntimeConfig, "optim": OptimConfig,
            "schedule": ScheduleConfig, "data": DataConfig, "checkpoint": CheckpointConfig, "logging": LoggingConfig}


def test_unset_flags_take_the_dataclass_defaults():
    job = parse_args(REQUIRED + ["--train-iters", "5"])
    assert job.parallel == ParallelConfig() and job.runtime == RuntimeConfig()
    assert job.optim == OptimConfig(lr=1e-3)
    assert job.schedule == ScheduleConfig(micro_batch_size=2, global_batch_size=8, train_iters=5)
    assert job.data == DataConfig(data_path=["corpus"], seq_length=2048)
    assert job.checkpoint == CheckpointConfig() and job.logging == LoggingConfig()
    assert job.model == get_preset("eve-7b")


def _other_value(field: dataclasses.Field, kind, default):
    """A command-line value for `field` that differs from its default, and the value it parses to."""
    kind = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind
    if typing.get_origin(kind) is typing.Literal:
        value = next(c for c in reversed(typing.get_args(kind)) if c != default)
        return [value], value
    if typing.get_origin(kind) is list:
        return ["a", "b"], ["a", "b"]
    if kind is bool:
        return [], not default
    if kind is int:
        return [str((default or 0) + 3)], (default or 0) + 3
    if kind is float:
        return ["0.125"], 0.125
    return ["somewhere"], "somewhere"


def _cases():
    for section, cls in [*SECTIONS.items(), *MODEL_PARTS.items()]:
        hints = typing.get_type_hints(cls)
        for field in flagged_fields(cls):
            yield pytest.param(section, cls, field, hints[field.name], id=flag_of(field))


@pytest.mark.parametrize("section, cls, field, kind", list(_cases()))
def test_each_flag_sets_its_field_and_nothing_else(section, cls, field, kind):
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    if section in MODEL_PARTS and field.name != "enabled":
        default = getattr(getattr(get_preset("eve-7b"), section), field.name)
    values, expected = _other_value(field, kind, default)
    flag = flag_of(field)
    if flag == "--ckpt-fully-parallel-save":
        flag = "--no-ckpt-fully-parallel-save"  # on by default: the switch turns it off
    argv = REQUIRED + ["--train-iters", "5"]
    if flag in argv:  # a required flag: replace its value
        i = argv.index(flag)
        argv[i + 1:i + 2] = values
    else:
        argv += [flag, *values]
    job, base = parse_args(argv), parse_args(REQUIRED + ["--train-iters", "5"])
    if section in MODEL_PARTS:
        got, before = getattr(job.model, section), getattr(base.model, section)
    else:
        got, before = getattr(job, section), getattr(base, section)
    assert getattr(got, field.name) == expected
    assert dataclasses.replace(got, **{field.name: getattr(before, field.name)}) == before  # nothing else moved


MEGATRON_LM_FLAGS = """--tensor-model-parallel-size --pipeline-model-parallel-size --num-layers-per-virtual-pipeline-stage
--sequence-parallel --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather --micro-batch-size
--global-batch-size --seq-length --train-iters --train-samples --lr --min-lr --lr-decay-style --lr-warmup-fraction
--lr-warmup-iters --lr-decay-iters --lr-warmup-samples --lr-decay-samples --lr-warmup-init --lr-wsd-decay-style
--lr-wsd-decay-iters --lr-wsd-decay-samples --start-weight-decay --end-weight-decay --weight-decay-incr-style
--weight-decay --clip-grad --adam-beta1 --adam-beta2 --adam-eps --bf16 --fp16
--initial-loss-scale --loss-scale --recompute-granularity --recompute-method --recompute-num-layers --data-path
--split --num-workers --data-cache-path --tokenizer-model --save --load --save-interval --finetune
--pretrained-checkpoint --no-load-optim --no-load-rng --exit-signal-handler --exit-interval --exit-duration-in-mins
--async-save --ckpt-fully-parallel-save --dist-ckpt-optim-fully-reshardable --log-interval --tensorboard-dir
--eval-interval --eval-iters --num-layers --hidden-size --ffn-hidden-size --num-attention-heads --num-query-groups
--max-position-embeddings --make-vocab-size-divisible-by --rotary-base --norm-epsilon --init-method-std --vocab-size
--distributed-timeout-minutes --use-cpu-initialization --transformer-impl --seed --use-checkpoint-args
--no-gradient-accumulation-fusion --cross-entropy-loss-fusion --cross-entropy-fusion-impl --no-rope-fusion""".split()


def test_the_lm_loss_fusion_is_on_with_cuda_unless_a_flag_says(monkeypatch):
    """--cross-entropy-loss-fusion unset: this package's fused LM loss with CUDA (measured faster on an
    H100), megatron-core's unfused fp32 loss on the CPU; either flag overrides."""
    import torch

    base = REQUIRED + ["--train-iters", "5"]
    assert parse_args(base).runtime.cross_entropy_loss_fusion is None
    assert parse_args(base + ["--no-cross-entropy-loss-fusion"]).runtime.cross_entropy_loss_fusion is False
    assert parse_args(base + ["--cross-entropy-loss-fusion"]).runtime.cross_entropy_loss_fusion is True
    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        assert RuntimeConfig().lm_loss_fusion is cuda and RuntimeConfig().torch_cross_entropy is cuda
        assert not RuntimeConfig(cross_entropy_loss_fusion=False).torch_cross_entropy
        native = RuntimeConfig(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="native")
        assert native.lm_loss_fusion and not native.torch_cross_entropy


def test_flags_keep_megatron_lm_names():
    known = {s for action in build_parser()._actions for s in action.option_strings}
    assert not [flag for flag in MEGATRON_LM_FLAGS if flag not in known]


def test_model_flags_without_a_value_keep_the_preset():
    hd = parse_args(REQUIRED + ["--train-iters", "1", "--preset", "eve-7b-hd"]).model
    assert hd.vision.image_size == 1344 == get_preset("eve-7b-hd").vision.image_size
    tiny = parse_args(REQUIRED + ["--train-iters", "1", "--preset", "tiny", "--num-layers", "16"]).model
    assert tiny.language.num_layers == 16 and tiny.language.hidden_size == get_preset("tiny").language.hidden_size


def test_a_zero_align_weight_turns_the_aligner_off():
    assert not parse_args(REQUIRED + ["--train-iters", "1", "--align-loss-weight", "0"]).model.aligner.enabled
    assert not parse_args(REQUIRED + ["--train-iters", "1", "--disable-aligner"]).model.aligner.enabled
    assert parse_args(REQUIRED + ["--train-iters", "1"]).model.aligner.enabled


def test_every_problem_of_a_run_is_reported_in_one_error():
    job = parse_args(REQUIRED + ["--train-iters", "5", "--train-samples", "80", "--global-batch-size", "6",
                                 "--recompute-granularity", "full", "--finetune", "--save-interval", "10",
                                 "--data-path", "0.5", "a", "b", "--vision-teacher-path", "clip"])
    with pytest.raises(ConfigError) as caught:
        validate_job(job, world_size=2)
    message = str(caught.value)
    for part in ("give exactly one of --train-iters and --train-samples",
                 "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2",
                 "--recompute-granularity full needs --recompute-method",
                 "--finetune starts from loaded weights", "--save-interval needs --save",
                 "weights and prefixes must alternate"):
        assert part in message
    assert message.startswith("cannot start training:") and message.count("\n  - ") == 6


def test_help_shows_each_flags_default():
    """--help prints every flag's default that says something (not an unset option or an off switch)."""
    parser = build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
            assert "%(default)" in formatter._get_help_string(action), action.option_strings
    text = " ".join(parser.format_help().split())
    for shown in ("--lr-decay-style {constant,linear,cosine,inverse-square-root,WSD}",
                  "then --lr-wsd-decay-style) (default: linear)", "(default: exponential)",
                  "with --weight-decay-incr-style constant (default: 0.01)",
                  "learning rate the linear warm-up starts from (default: 0.0)",
                  "(default: --micro-batch-size x data-parallel size)",
                  "--weight-decay-incr-style {constant,linear,cosine}"):
        assert shown in text, shown


def test_defaults_are_megatron_lms():
    """Megatron-LM's defaults: a linear decay, weight decay 0.01 (constant), the warm-up from 0, and
    --global-batch-size left to --micro-batch-size x data-parallel size."""
    job = parse_args([a for a in REQUIRED if a not in ("--global-batch-size", "8")] + ["--train-iters", "5"])
    o = job.optim
    assert (o.lr_decay_style, o.weight_decay, o.weight_decay_incr_style, o.lr_warmup_init) == ("linear", 0.01,
                                                                                                "constant", 0.0)
    assert (o.start_weight_decay, o.end_weight_decay, o.lr_wsd_decay_style) == (None, None, "exponential")
    assert (o.lr_warmup_samples, o.lr_decay_samples, o.lr_wsd_decay_iters, o.lr_wsd_decay_samples) == (0, None, None,
                                                                                                       None)
    assert job.schedule.global_batch_size is None


def test_an_unset_global_batch_size_is_micro_batch_size_times_data_parallel_size(capsys, monkeypatch):
    """As Megatron-LM's validate_args: set once the world size is known (the checks before work), with
    a note on rank 0."""
    argv = [a for a in REQUIRED if a not in ("--global-batch-size", "8")] + ["--train-samples", "100",
                                                                              "--vision-teacher-path", "clip"]
    job = parse_args(argv + ["--tensor-model-parallel-size", "2"])
    validate_job(job, world_size=8)
    assert job.schedule.global_batch_size == 2 * 4 and job.schedule.iterations == 12
    assert capsys.readouterr().out == "setting global batch size to 8 (--micro-batch-size 2 x data-parallel size 4)\n"
    monkeypatch.setenv("RANK", "1")  # the other ranks say nothing
    job = parse_args(argv)
    validate_job(job, world_size=2)
    assert job.schedule.global_batch_size == 4 and capsys.readouterr().out == ""
    # No data-parallel size from the flags and the world size: that is the problem named, nothing else.
    with pytest.raises(ConfigError) as caught:
        validate_job(parse_args(argv + ["--tensor-model-parallel-size", "4"]), world_size=2)
    assert str(caught.value).count("\n  - ") == 1 and "do not divide the world size 2" in str(caught.value)


def test_sequence_parallel_without_tensor_parallelism_is_turned_off_with_a_warning(caplog):
    """As Megatron-LM (it would change the numerics and nothing else): one warning line, not a refusal."""
    argv = REQUIRED + ["--train-iters", "5", "--vision-teacher-path", "clip", "--sequence-parallel"]
    job = parse_args(argv)
    with caplog.at_level("WARNING"):
        validate_job(job, world_size=2)
    assert not job.parallel.sequence_parallel
    assert [r.getMessage() for r in caplog.records] == [
        "warning: disabling --sequence-parallel because tensor model parallelism is disabled "
        "(--tensor-model-parallel-size 1), as Megatron-LM does"]
    caplog.clear()
    job = parse_args(argv + ["--tensor-model-parallel-size", "2"])
    validate_job(job, world_size=2)
    assert job.parallel.sequence_parallel and not caplog.records


@pytest.mark.parametrize("extra, message", [
    # Megatron-LM's validate_args: one warm-up, and lengths in the training length's unit.
    (["--train-iters", "10", "--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "2"],
     "can only specify one of --lr-warmup-fraction and --lr-warmup-iters"),
    (["--train-samples", "80", "--lr-warmup-fraction", "0.1", "--lr-warmup-samples", "3"],
     "can only specify one of --lr-warmup-fraction and --lr-warmup-samples"),
    (["--train-samples", "80", "--lr-decay-iters", "5"],
     "--lr-decay-iters counts iterations but the run counts samples (--train-samples): give --lr-decay-samples"),
    (["--train-samples", "80", "--lr-warmup-iters", "1"],
     "--lr-warmup-iters counts iterations but the run counts samples (--train-samples): give --lr-warmup-samples"),
    (["--train-iters", "10", "--lr-decay-samples", "40"],
     "--lr-decay-samples counts samples but the run counts iterations (--train-iters): give --lr-decay-iters"),
    (["--train-iters", "10", "--lr-warmup-samples", "8"],
     "--lr-warmup-samples counts samples but the run counts iterations (--train-iters): give --lr-warmup-iters"),
    (["--train-iters", "10", "--lr-decay-style", "WSD"],
     "--lr-decay-style WSD needs the length of its final decay: --lr-wsd-decay-iters (with --train-iters)"),
    (["--train-samples", "80", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "2"],
     "--lr-wsd-decay-iters counts iterations but the run counts samples"),
    # Weight decay: constant is --weight-decay; an increasing one needs both ends.
    (["--train-iters", "10", "--start-weight-decay", "0.1"],
     "--start-weight-decay needs --weight-decay-incr-style linear or cosine (constant weight decay is --weight-decay)"),
    (["--train-iters", "10", "--weight-decay-incr-style", "linear", "--start-weight-decay", "0"],
     "--weight-decay-incr-style linear needs --end-weight-decay"),
    (["--train-iters", "10", "--weight-decay-incr-style", "cosine", "--start-weight-decay", "0.1",
      "--end-weight-decay", "0.05"], "--end-weight-decay 0.05 is below --start-weight-decay 0.1"),
    # What megatron-core's OptimizerParamScheduler asserts once the model is built.
    (["--train-iters", "10", "--min-lr", "2e-3"], "--min-lr 0.002 is above --lr 0.001"),
    (["--train-iters", "10", "--lr-warmup-init", "2e-3"], "--lr-warmup-init 0.002 must be between 0 and --lr 0.001"),
    (["--train-iters", "10", "--lr-warmup-iters", "10"],
     "the learning-rate warm-up (--lr-warmup-iters 10 x --global-batch-size 8: 80 samples) must end before its "
     "decay does (--train-iters 10 x --global-batch-size 8: 80 samples)"),
    (["--train-iters", "10", "--lr-decay-iters", "4", "--lr-warmup-fraction", "1"],
     "(--lr-warmup-fraction 1.0 of the decay: 32 samples) must end before its decay does (--lr-decay-iters 4 x"),
    (["--train-samples", "80", "--lr-warmup-samples", "80"],
     "(--lr-warmup-samples 80) must end before its decay does (--train-samples 80)"),
    (["--train-samples", "80", "--lr-decay-samples", "0"], "--lr-decay-samples 0 must be at least 1"),
    # Each failed in megatron-core after the model was built.
    (["--train-iters", "10", "--overlap-param-gather"], "--overlap-param-gather needs --use-distributed-optimizer"),
    (["--train-iters", "10", "--recompute-granularity", "selective", "--recompute-num-layers", "2"],
     "--recompute-num-layers is for --recompute-granularity full"),
])
def test_schedule_flags_megatron_lm_or_megatron_core_would_assert_on_are_refused_before_work(extra, message):
    job = parse_args(REQUIRED + ["--vision-teacher-path", "clip", *extra])
    with pytest.raises(ConfigError) as caught:
        validate_job(job, world_size=1)
    assert message in str(caught.value) and str(caught.value).count("\n  - ") == 1


@pytest.mark.parametrize("extra", [
    ["--train-iters", "10", "--lr-warmup-iters", "9", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "1"],
    ["--train-samples", "80", "--lr-warmup-samples", "79", "--lr-decay-samples", "80"],
    ["--train-samples", "80", "--lr-decay-style", "WSD", "--lr-wsd-decay-samples", "8", "--lr-warmup-fraction", "0.1"],
    ["--train-iters", "10", "--weight-decay-incr-style", "linear", "--start-weight-decay", "0",
     "--end-weight-decay", "0.1", "--min-lr", "1e-3", "--lr-warmup-init", "1e-3"],
])
def test_schedule_flags_megatron_lm_accepts_pass(extra):
    validate_job(parse_args(REQUIRED + ["--vision-teacher-path", "clip", *extra]), world_size=1)


def test_train_samples_set_the_steps():
    job = parse_args(REQUIRED + ["--train-samples", "100", "--vision-teacher-path", "clip"])
    assert job.schedule.iterations == 12  # whole global batches of 8
    validate_job(job, world_size=4)


def test_model_fields_without_flags_are_fixed_by_eve():
    """The PEL's patch, its 2x2 window and the projector are EVE's design, not options."""
    unflagged = {f"{part}.{f.name}" for part, cls in MODEL_PARTS.items() for f in dataclasses.fields(cls)
                 if f not in flagged_fields(cls)}
    assert unflagged == {"vision.patch_size", "vision.conv_stride", "vision.projector_type",
                         "aligner.teacher_select_layer"}
    assert LanguageModelConfig().num_layers == 32 and VisionConfig().image_size == 672  # eve-7b's values
    assert AlignerConfig().hidden_size == 1024


@pytest.mark.parametrize("extra, idle", [
    (["--preset", "tiny", "--pipeline-model-parallel-size", "2", "--disable-aligner"], ["pipeline stage 1"]),
    # eve-7b taps every 4 of 32 layers: 16 stages of 2 layers leave every other stage without a tap.
    (["--pipeline-model-parallel-size", "16"], [f"pipeline stage {c}" for c in range(2, 15, 2)]),
    (["--preset", "tiny", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2",
      "--disable-aligner"], ["pipeline stage 1 (model chunk 0)", "pipeline stage 0 (model chunk 1)",
                             "pipeline stage 1 (model chunk 1)"]),
])
def test_prealign_refuses_pipeline_stages_with_nothing_to_train(extra, idle):
    argv = REQUIRED + ["--train-iters", "1", "--stage", "prealign", "--vision-teacher-path", "clip",
                       "--seq-length", "1024", "--global-batch-size", "32", *extra]
    world = 16 if "16" in extra else 2
    with pytest.raises(ConfigError) as caught:
        validate_job(parse_args(argv), world)
    (listed,) = re.findall(r"stage prealign trains only .*? taps: (.*) would have nothing to train", str(caught.value))
    assert listed.split(", ") == idle
    validate_job(parse_args([a if a != "prealign" else "pretrain" for a in argv]), world)  # all train in pretrain


@pytest.mark.parametrize("script", ["eve7b_prealign.sh", "eve7b_pretrain.sh", "eve7b_finetune.sh",
                                    "eve7b_finetune_hd.sh"])
def test_example_launch_scripts_pass_every_check(script, tmp_path):
    """The EVE-7B stage scripts, run with a torchrun that only records its arguments: their flags
    parse and pass every combination check at the scripts' default 4 nodes x 8 GPUs; one hardware
    queue per GPU, as sequence parallelism's overlap wants."""
    import json
    import os
    import subprocess

    from tests.helpers import ROOT

    recorder = tmp_path / "torchrun"
    recorder.write_text("#!/usr/bin/env python3\nimport json, os, sys\n"
                        "json.dump([os.environ.get('CUDA_DEVICE_MAX_CONNECTIONS')] + sys.argv[1:], "
                        "open(os.environ['ARGS_OUT'], 'w'))\n")
    recorder.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "ARGS_OUT": str(tmp_path / "args.json")}
    env.pop("CUDA_DEVICE_MAX_CONNECTIONS", None)  # the scripts keep a value the caller set
    subprocess.run(["bash", str(ROOT / "examples" / script)], env=env, check=True, timeout=60)
    queues, *argv = json.loads((tmp_path / "args.json").read_text())
    assert queues == "1"
    argv = argv[argv.index(str(ROOT / "pretrain_eve.py")) + 1:]
    validate_job(parse_args(argv), world_size=4 * 8)


@pytest.mark.parametrize("abbreviated", [["--exit-signal", "SIGUSR1"], ["--exit-sig"], ["--train-it", "5"]])
def test_flags_are_never_abbreviated(abbreviated, capsys):
    """allow_abbrev=False, as Megatron-LM's parser: a prefix of a flag is no flag."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(REQUIRED + abbreviated)
    assert f"unrecognized arguments: {abbreviated[0]}" in capsys.readouterr().err
    assert build_parser().parse_args(REQUIRED + ["--exit-signal-handler"]).exit_signal_handler


def test_logging_intervals_default_as_megatron_lm():
    logging = parse_args(REQUIRED).logging
    assert (logging.log_interval, logging.tensorboard_log_interval) == (100, 1)
    assert parse_args(REQUIRED + ["--tensorboard-log-interval", "5"]).logging.tensorboard_log_interval == 5

