"""megatron-core's multi-tensor fallbacks (no TE / apex) replaced by torch's foreach kernels."""

import torch

from megatron_eve.platform import apply_cpu_shim
from megatron_eve.training.optim import _foreach_l2_norm, _foreach_scale, use_foreach_multi_tensor_ops


def tensors(seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in ((7, 3), (11,), (2, 5, 4), (1,))]


def test_foreach_ops_match_megatron_core_fallbacks():
    from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale

    apply_cpu_shim()  # the local l2 norm makes its result on "cuda"
    grads = tensors(0)
    ours, _ = _foreach_l2_norm(2048, None, [grads], False)
    theirs, _ = local_multi_tensor_l2_norm(2048, None, [grads], False)
    assert ours.shape == (1,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs.to(ours.device), rtol=1e-6, atol=0)

    for scale in (1.0, 0.25):
        targets, expected = [torch.zeros_like(t, dtype=torch.float64) for t in grads], tensors(1)
        _foreach_scale(2048, None, [grads, targets], scale)
        local_multi_tensor_scale(2048, None, [grads, expected], scale)
        for a, b in zip(targets, expected):
            assert a.dtype == torch.float64 and torch.equal(a, b.double())
    in_place, expected = tensors(2), tensors(2)
    _foreach_scale(2048, None, [in_place, in_place], 0.5)
    assert all(torch.equal(a, b * 0.5) for a, b in zip(in_place, expected))


def test_the_optimizer_uses_them_without_te_or_apex():
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as megatron_optimizer
    from megatron.core.utils import local_multi_tensor_l2_norm

    fell_back = clip_grads.l2_norm_impl in (local_multi_tensor_l2_norm, _foreach_l2_norm)
    use_foreach_multi_tensor_ops()
    if fell_back:  # neither Transformer Engine nor apex here (CI)
        assert clip_grads.l2_norm_impl is _foreach_l2_norm
        assert clip_grads.multi_tensor_scale_impl is _foreach_scale
        assert megatron_optimizer.multi_tensor_scale_impl is _foreach_scale


def test_schedule_differences_against_megatron_cores_saved_scheduler():
    """A resumed run's schedule flags are compared with the scheduler state megatron-core saves:
    same flags, nothing; a longer run or another lr, each named with the flags that set it; the
    choice of which to follow reaches megatron-core's scheduler."""
    from megatron_eve.training.arguments import parse_args
    from megatron_eve.training.optim import build_scheduler, schedule_differences

    argv = ["--micro-batch-size", "1", "--global-batch-size", "4", "--seq-length", "1024", "--lr", "1e-3",
            "--data-path", "x", "--train-iters", "4", "--lr-warmup-fraction", "0.25"]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.0)
    saved = build_scheduler(optimizer, parse_args(argv)).state_dict()
    assert schedule_differences(parse_args(argv), saved) == []
    longer = schedule_differences(parse_args(argv[:-4] + ["--train-iters", "6", "--lr-warmup-fraction", "0.25"]),
                                  saved)
    # (wd_incr_steps changes too, but constant weight decay never reads it: not a difference)
    assert [d.split(":")[0] for d in longer] == ["lr_warmup_steps", "lr_decay_steps"]
    assert "lr_decay_steps: checkpoint 16, flags 24 (--lr-decay-iters (default --train-iters)" in longer[1]
    (lr,) = schedule_differences(parse_args(argv + ["--lr", "2e-3"]), saved)
    assert lr == "max_lr: checkpoint 0.001, flags 0.002 (--lr)"

    for flag, follows_flags in (("--override-opt-param-scheduler", True),
                                ("--use-checkpoint-opt_param-scheduler", False)):  # Megatron-LM's spelling too
        scheduler = build_scheduler(optimizer, parse_args(argv + ["--lr", "2e-3", flag]))
        scheduler.load_state_dict(saved)
        assert scheduler.max_lr == (2e-3 if follows_flags else 1e-3)


def test_schedule_settings_are_megatron_lms_and_accept_checkpoints_of_the_int_warm_up():
    """As Megatron-LM's get_optimizer_param_scheduler: the warm-up fraction's steps stay a float
    (0.1 x 32 = 3.2, not 3) and weight decay runs over --train-iters x --global-batch-size (or
    --train-samples), not the decay length. A checkpoint saved when the warm-up was int() of that
    float resumes (megatron-core keeps its 3, as Megatron-LM would with that value); another warm-up
    is still refused."""
    from megatron_eve.training.arguments import parse_args
    from megatron_eve.training.optim import build_scheduler, schedule_differences, schedule_settings

    argv = ["--micro-batch-size", "1", "--global-batch-size", "4", "--seq-length", "1024", "--lr", "2e-3",
            "--data-path", "x", "--train-iters", "8", "--lr-decay-iters", "10", "--lr-warmup-fraction", "0.08"]
    settings = schedule_settings(parse_args(argv))
    assert settings["lr_warmup_steps"] == 0.08 * 40 and settings["lr_decay_steps"] == 40
    assert settings["wd_incr_steps"] == 32
    samples = parse_args(argv[:-6] + ["--train-samples", "30"])  # 7 whole global batches
    assert schedule_settings(samples)["wd_incr_steps"] == 30
    assert schedule_settings(parse_args(argv[:-2] + ["--lr-warmup-iters", "2"]))["lr_warmup_steps"] == 8

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.0)
    old = {**build_scheduler(optimizer, parse_args(argv)).state_dict(), "lr_warmup_steps": 3, "wd_incr_steps": 40}
    assert schedule_differences(parse_args(argv), old) == []
    scheduler = build_scheduler(optimizer, parse_args(argv))
    scheduler.load_state_dict(old)
    assert scheduler.lr_warmup_steps == 3  # the checkpoint's schedule goes on
    (warmup,) = schedule_differences(parse_args(argv[:-1] + ["0.2"]), old)
    assert warmup == "lr_warmup_steps: checkpoint 3, flags 8.0 (--lr-warmup-fraction / --lr-warmup-iters)"


def test_vision_learning_rate_keeps_megatron_cores_weight_decay_rules():
    """--vision-lr adds the vision parameters' own bounds to megatron-core's standard overrides
    instead of replacing them (overrides given to get_megatron_optimizer replace its standard ones:
    biases and norms then got weight decay): a vision norm weight matches both, a decoder norm only
    the no-weight-decay rule, a vision matrix only the vision bounds."""
    from megatron.core.optimizer import OptimizerConfig, get_standard_config_overrides
    from megatron.core.optimizer_param_scheduler import combine_param_group_overrides

    from megatron_eve.config import OptimConfig
    from megatron_eve.training.optim import param_group_overrides, vision_rates

    config = OptimizerConfig(optimizer="adam", lr=1e-3, min_lr=1e-5, weight_decay=0.1)
    assert param_group_overrides(config, OptimConfig(lr=1e-3)).keys() == get_standard_config_overrides(config).keys()
    optim = OptimConfig(lr=1e-3, min_lr=1e-5, vision_lr=2e-4)
    assert vision_rates(optim) == {"max_lr": 2e-4, "min_lr": 1e-5 * 0.2} and vision_rates(OptimConfig(lr=1e-3)) is None
    overrides = param_group_overrides(config, optim)

    def override(name, shape):
        found = [value for key, value in overrides.items() if key.matches(torch.nn.Parameter(torch.zeros(shape)), name)]
        return combine_param_group_overrides(found) if found else {}

    assert override("module.vision_model.pre_norm.weight", (8,)) == {"wd_mult": 0.0, **vision_rates(optim)}
    assert override("module.decoder.layers.0.input_layernorm.weight", (8,)) == {"wd_mult": 0.0}
    assert override("module.vision_model.patch_embedding.weight", (8, 3, 14, 14)) == vision_rates(optim)
    assert override("module.decoder.layers.0.mlp.linear_fc1.weight", (16, 8)) == {}


SCHEDULE = ["--micro-batch-size", "1", "--global-batch-size", "4", "--seq-length", "1024", "--lr", "2e-3",
            "--data-path", "x"]


def test_a_sample_based_schedule_is_megatron_lms_and_earlier_checkpoints_of_it_resume():
    """--train-samples, as Megatron-LM's get_optimizer_param_scheduler: the decay over --train-samples
    itself (30, not its 7 whole global batches' 28) unless --lr-decay-samples, the warm-up a fraction
    of that or --lr-warmup-samples, weight decay over --train-samples. A checkpoint saved when the
    decay was the whole global batches (and the warm-up fraction of those, a float or its int) goes
    on with its schedule; another decay length is refused."""
    from megatron_eve.training.arguments import parse_args
    from megatron_eve.training.optim import build_scheduler, schedule_differences, schedule_settings

    samples = SCHEDULE + ["--train-samples", "30"]
    flags = parse_args(samples + ["--lr-warmup-fraction", "0.1"])
    settings = schedule_settings(flags)
    assert (settings["lr_decay_steps"], settings["lr_warmup_steps"], settings["wd_incr_steps"]) == (30, 0.1 * 30, 30)
    settings = schedule_settings(parse_args(samples + ["--lr-decay-samples", "20", "--lr-warmup-samples", "5"]))
    assert (settings["lr_decay_steps"], settings["lr_warmup_steps"], settings["wd_incr_steps"]) == (20, 5, 30)

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.0)
    saved = build_scheduler(optimizer, flags).state_dict()
    assert schedule_differences(flags, saved) == []
    for warmup in (0.1 * 28, 2):
        earlier = {**saved, "lr_decay_steps": 28, "lr_warmup_steps": warmup}
        assert schedule_differences(flags, earlier) == []
        scheduler = build_scheduler(optimizer, flags)
        scheduler.load_state_dict(earlier)
        assert (scheduler.lr_decay_steps, scheduler.lr_warmup_steps) == (28, warmup)  # its schedule goes on
    (decay,) = schedule_differences(flags, {**saved, "lr_decay_steps": 24})
    assert decay == "lr_decay_steps: checkpoint 24, flags 30 (--lr-decay-samples (default --train-samples))"
    # (an earlier --lr-decay-iters 7 with --train-samples is --lr-decay-samples 28 now: the same steps)
    assert schedule_differences(parse_args(samples + ["--lr-decay-samples", "28"]), {**saved, "lr_decay_steps": 28,
                                                                                       "lr_warmup_steps": 0}) == []


def test_the_warm_up_start_and_an_increasing_weight_decay_reach_megatron_cores_scheduler():
    """--lr-warmup-init, --start-weight-decay / --end-weight-decay over --train-iters x
    --global-batch-size with --weight-decay-incr-style, as Megatron-LM passes them. An increasing
    weight decay reads wd_incr_steps, so a resume compares it (constant weight decay does not)."""
    from megatron_eve.training.arguments import parse_args
    from megatron_eve.training.optim import build_scheduler, schedule_differences

    wd = ["--weight-decay-incr-style", "linear", "--start-weight-decay", "0.0", "--end-weight-decay", "0.1"]
    argv = SCHEDULE + ["--train-iters", "10", "--lr-decay-iters", "10", "--lr-warmup-iters", "2",
                       "--lr-warmup-init", "1e-4"]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.0)
    scheduler = build_scheduler(optimizer, parse_args(argv + wd))
    assert (scheduler.init_lr, scheduler.start_wd, scheduler.end_wd, scheduler.wd_incr_steps,
            scheduler.wd_incr_style) == (1e-4, 0.0, 0.1, 40, "linear")
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (1e-4, 0.0)
    scheduler.step(increment=4)  # one iteration: half the warm-up, a tenth of the weight decay's rise
    assert abs(group["lr"] - (1e-4 + (2e-3 - 1e-4) / 2)) < 1e-15 and abs(group["weight_decay"] - 0.01) < 1e-15

    saved = scheduler.state_dict()
    longer = argv[:argv.index("--train-iters") + 1] + ["12"] + argv[argv.index("--train-iters") + 2:]
    (steps,) = schedule_differences(parse_args(longer + wd), saved)
    assert steps == "wd_incr_steps: checkpoint 40, flags 48 (--train-iters x --global-batch-size)"
    (end,) = schedule_differences(parse_args(argv + wd[:-1] + ["0.2"]), saved)
    assert end == "end_wd: checkpoint 0.1, flags 0.2 (--end-weight-decay)"
    constant = build_scheduler(optimizer, parse_args(argv)).state_dict()
    assert constant["wd_incr_style"] == "constant" and constant["start_wd"] == constant["end_wd"] == 0.01
    assert schedule_differences(parse_args(longer), constant) == []  # never read: not a difference
    assert [d.split(":")[0] for d in schedule_differences(parse_args(longer + wd), constant)] == [
        "start_wd", "end_wd", "wd_incr_steps", "wd_incr_style"]


def test_wsd_reaches_megatron_cores_scheduler():
    """--lr-decay-style WSD: --lr until the last --lr-wsd-decay-iters (x --global-batch-size) or
    --lr-wsd-decay-samples of the decay, then --lr-wsd-decay-style down to --min-lr."""
    from megatron_eve.training.arguments import parse_args
    from megatron_eve.training.optim import build_scheduler, schedule_settings

    argv = SCHEDULE + ["--train-iters", "10", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "2",
                       "--lr-wsd-decay-style", "linear"]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.0)
    scheduler = build_scheduler(optimizer, parse_args(argv))
    assert (scheduler.wsd_decay_steps, scheduler.lr_wsd_decay_style) == (8, "linear")
    rates = []
    for _ in range(10):
        scheduler.step(increment=4)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == [2e-3] * 8 + [1e-3, 0.0]
    samples = schedule_settings(parse_args(SCHEDULE + ["--train-samples", "40", "--lr-decay-style", "WSD",
                                                       "--lr-wsd-decay-samples", "6"]))
    assert (samples["wsd_decay_steps"], samples["lr_wsd_decay_style"]) == (6, "exponential")
