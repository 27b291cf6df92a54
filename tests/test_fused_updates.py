"""The fused update paths used where Transformer Engine and apex are absent (the GPU image, CPU):
the weight-gradient GEMM accumulating into the fp32 main grad (megatron_eve.model.wgrad_accumulation,
for apex's fused_weight_gradient_mlp_cuda), the token embedding's rows added into its main grad
(megatron_eve.model.token_embedding) and torch's fused AdamW under megatron-core's optimizer.
Their training parity: tests/test_parallel_parity.py (tp2_sp_fusions) and every training test
(fused AdamW is the optimizer on CPU too); on CUDA: tests/gpu/test_gpu_fused_updates.py. Gradient
clipping inside the fused AdamW's step against megatron-core's own clipping. And megatron-core's fused
cross-entropy (--cross-entropy-loss-fusion) as the model uses it."""

import copy
import gc
import importlib.util
import json
import sys
import weakref
from types import SimpleNamespace

import pytest
import torch

from megatron_eve.model import wgrad_accumulation
from megatron_eve.training.optim import use_fused_torch_adam
from tests.helpers import child_report, count_calls, micro_batches, tiny_config


def wgrad_operands(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens, inputs, outputs = 96, 40, 24
    total_input = torch.randn(tokens, inputs, generator=generator).to(dtype)
    grad_output = torch.randn(tokens, outputs, generator=generator).to(dtype)
    main_grad = torch.randn(outputs, inputs, generator=generator)
    exact = main_grad.double() + grad_output.double().t() @ total_input.double()
    return total_input, grad_output, main_grad, exact


def test_wgrad_kernel_accumulates_into_the_main_grad_in_place():
    total_input, grad_output, main_grad, exact = wgrad_operands(torch.float32)
    storage = main_grad.data_ptr()
    wgrad_accumulation.wgrad_gemm_accum_fp32(total_input, grad_output, main_grad)
    assert main_grad.data_ptr() == storage and main_grad.dtype == torch.float32
    torch.testing.assert_close(main_grad.double(), exact, rtol=1e-5, atol=1e-5)


def test_wgrad_kernel_with_bf16_operands_beats_the_unfused_rounding():
    """Unfused, the layer's bf16 weight gradient is rounded to bf16 before DDP adds it into the fp32
    main grad; fused, the products accumulate in fp32: never further from the exact sum."""
    total_input, grad_output, main_grad, exact = wgrad_operands(torch.bfloat16)
    unfused = main_grad + (grad_output.t() @ total_input).float()
    wgrad_accumulation.wgrad_gemm_accum_fp32(total_input, grad_output, main_grad)
    fused_error = float((main_grad.double() - exact).abs().max())
    unfused_error = float((unfused.double() - exact).abs().max())
    assert main_grad.dtype == torch.float32
    assert fused_error <= unfused_error and fused_error < 1e-4, (fused_error, unfused_error)


def test_wgrad_fusion_is_enabled_on_cuda_only_and_on_request(monkeypatch):
    """megatron-core's linears get the torch kernel when fusion is on (Megatron-LM's default) and
    apex's extension is absent: where the kernel is available (CUDA: tests/gpu checks that it is);
    off on the CPU (where a bare model's backward, without DDP's main grads, must keep working) and
    with --no-gradient-accumulation-fusion."""
    from megatron.core.tensor_parallel import layers

    from megatron_eve.config import ParallelConfig, RuntimeConfig, get_preset, transformer_config

    def fusion(**runtime):
        return transformer_config(get_preset("tiny"), ParallelConfig(),
                                  RuntimeConfig(transformer_impl="local", **runtime)).gradient_accumulation_fusion

    apex = importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None
    # install() rebinds these two module globals; the monkeypatch puts them back after the test.
    monkeypatch.setattr(layers, "_grad_accum_fusion_available", apex)
    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda", getattr(layers, "fused_weight_gradient_mlp_cuda", None),
                        raising=False)
    assert not wgrad_accumulation.available() and not fusion()  # no CUDA here
    monkeypatch.setattr(wgrad_accumulation, "available", lambda: True)  # as on a GPU
    assert not fusion(gradient_accumulation_fusion=False)
    assert fusion() and layers._grad_accum_fusion_available
    if not apex:
        assert layers.fused_weight_gradient_mlp_cuda is wgrad_accumulation


def test_embedding_rows_add_into_the_main_grad():
    """The token embedding's fused backward (model/token_embedding.py): repeated ids add up, and bf16
    rows summed into the fp32 main grad are never further from the exact sum than megatron-core's
    path (F.embedding's dense bf16 weight gradient, then DDP's add). Through the model, at TP=2 with
    SP: tests/test_parallel_parity.py (tp2_sp_fusions)."""
    from megatron_eve.model.token_embedding import add_rows_to_main_grad

    generator = torch.Generator().manual_seed(0)
    vocab, hidden, tokens = 50, 16, 300  # every row looked up about 6 times
    ids = torch.randint(0, vocab, (1, tokens), generator=generator)
    grad_output = torch.randn(1, tokens, hidden, generator=generator).bfloat16()
    main_grad = torch.randn(vocab, hidden, generator=generator)
    exact = main_grad.double().index_add(0, ids.view(-1), grad_output.double().view(-1, hidden))
    weight = torch.zeros(vocab, hidden, dtype=torch.bfloat16, requires_grad=True)
    torch.nn.functional.embedding(ids, weight).backward(grad_output)
    unfused = main_grad + weight.grad.float()
    storage = main_grad.data_ptr()
    add_rows_to_main_grad(main_grad, ids, grad_output)
    assert main_grad.data_ptr() == storage and main_grad.dtype == torch.float32
    fused_error = float((main_grad.double() - exact).abs().max())
    unfused_error = float((unfused.double() - exact).abs().max())
    assert fused_error < 1e-5 < unfused_error, (fused_error, unfused_error)


def adam_pair(seed=0):
    """Two torch AdamWs over equal parameters, as megatron-core builds them without TE / apex."""
    generator = torch.Generator().manual_seed(seed)
    shapes = ((7, 3), (11,), (2, 5, 4))
    values = [torch.randn(shape, generator=generator) for shape in shapes]
    grads = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(3)]
    pair = []
    for _ in range(2):
        params = [torch.nn.Parameter(v.clone()) for v in values]
        pair.append(torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 3e-3}],
                                      lr=1e-2, weight_decay=0.1))
    return pair, grads


def run(adam, grads):
    params = [p for group in adam.param_groups for p in group["params"]]
    for step_grads in grads:
        for param, grad in zip(params, step_grads):
            param.grad = grad.clone()
        adam.step()
    return params


def test_fused_adam_takes_torchs_fused_kernel_and_matches_foreach(monkeypatch):
    (foreach, fused), grads = adam_pair()
    use_fused_torch_adam(SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=fused)]))
    assert all(g["fused"] and not g["foreach"] for g in fused.param_groups)
    calls = []
    kernel = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: (calls.append(1), kernel(*a, **k))[1])
    for ours, theirs in zip(run(fused, grads), run(foreach, grads)):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert calls  # the fused kernel did the updates
    assert all(float(fused.state[p]["step"]) == 3 for g in fused.param_groups for p in g["params"])


def test_an_armed_adam_refuses_an_unchecked_norm_unless_it_holds_nothing():
    """arm_update_skip's AdamW steps only once _clip_by_total_norm has checked the gradients' norm (a
    NaN or Inf update would pass otherwise); one without parameters (a distributed optimizer's empty
    shard, which megatron-core does not clip) steps as a no-op."""
    from megatron_eve.training.optim import arm_update_skip

    (_, fused), grads = adam_pair()
    optimizer = SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=fused)])
    use_fused_torch_adam(optimizer)
    params = [p for group in fused.param_groups for p in group["params"]]
    for param, grad in zip(params, grads[0]):
        param.grad = grad.clone()
    arm_update_skip(optimizer, torch.zeros(()))
    with pytest.raises(RuntimeError, match="without its gradients' norm being checked"):
        fused.step()
    for group in fused.param_groups:
        group["params"] = []
    arm_update_skip(optimizer, torch.zeros(()))
    fused.step()
    assert fused.found_inf is None and not fused.norm_checked  # one step's inputs only


def test_fused_adam_survives_a_state_load_made_by_a_foreach_run():
    """A checkpoint's param groups are the saving run's (foreach), and megatron-core restores every
    parameter's step from one shared host tensor: after the load the groups are fused again and
    each parameter counts its own steps (a shared counter would advance once per parameter)."""
    (saving, loading), grads = adam_pair()
    with torch.no_grad():
        for ours, theirs in zip(run(loading, []), run(saving, grads[:2])):
            ours.copy_(theirs)  # the weights a checkpoint restores beside the optimizer state
    state = copy.deepcopy(saving.state_dict())  # (its entries are the optimizer's own dicts)
    shared = torch.tensor(2.0)
    for entry in state["state"].values():
        entry["step"] = shared
    loading.load_state_dict(state)
    use_fused_torch_adam(SimpleNamespace(optimizer=loading))
    assert all(g["fused"] for g in loading.param_groups)
    steps = [loading.state[p]["step"] for g in loading.param_groups for p in g["params"]]
    assert len({s.data_ptr() for s in steps}) == len(steps)
    assert all(s.dtype == torch.float32 and float(s) == 2 for s in steps)
    for ours, theirs in zip(run(loading, grads[2:]), run(saving, grads[2:])):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_a_registered_fused_adam_is_freed_with_its_parameters():
    """The registry that lets clipping find the fused AdamW of its parameters holds neither: a
    benchmark's or test's second optimizer must not find the first one's main parameters and states
    still on the device (on an H100 the bench's later runs ran out of memory this way)."""
    from megatron_eve.training import optim

    params = [torch.nn.Parameter(torch.ones(4))]
    adam = torch.optim.AdamW(params, lr=0.1)
    use_fused_torch_adam(SimpleNamespace(optimizer=adam))
    assert optim._fused_adam_of_exactly(params) is adam
    params[0].grad = torch.ones(4)
    adam.step()  # with its state
    gone = weakref.ref(adam), weakref.ref(params[0])
    del adam, params
    gc.collect()
    assert [ref() for ref in gone] == [None, None]


def test_other_optimizers_are_left_alone():
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    use_fused_torch_adam(SimpleNamespace(optimizer=sgd))
    assert not sgd.param_groups[0].get("fused")


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    """The megatron-core checks below, in a process of their own (megatron-core's groups)."""
    return child_report("tests.test_fused_updates", tmp_path_factory.mktemp("fused") / "report.json")


def test_fused_cross_entropy_reaches_the_model(child):
    """--cross-entropy-fusion-impl native: the model's LM loss goes through megatron-core's fused kernel
    (its calls counted) and equals the unfused loss (fp32, per token: <= 5e-6); the output layer's gradient
    differs by the kernel's bf16 rounding of the logits' gradient only (<= 2^-8 of its largest
    entry, and not zero: it is the fused path)."""
    report = child["cross_entropy"]
    assert report["fused_calls"] == 1
    assert report["lm_loss_max_abs_diff"] <= 5e-6  # losses ~7: a few fp32 ulps
    assert 0 < report["output_grad_relative_diff"] <= 2 ** -8, report


def test_gradient_clipping_inside_the_fused_adam_step(child):
    """megatron-core's optimizer (plain and distributed), three steps, the first two clipped (gradients
    ~10 per entry, norm ~1.4e4 against --clip-grad 1), the third not: with the clip coefficient handed to
    torch's fused AdamW as its grad_scale, the same grad norms and parameters as with megatron-core's
    own clipping pass (fp32: <= 1e-6 of the largest parameter); the grad_scale each step's AdamW saw is
    1 / the clip coefficient when clipping, None otherwise (and always None with megatron-core's pass)."""
    for name, run in child["clipping"].items():
        assert run["folded_grad_scales"][2] is None and run["megatron_grad_scales"] == [None] * 3, (name, run)
        for scale, norm in zip(run["folded_grad_scales"][:2], run["grad_norms"][:2]):
            assert norm > 100 and scale == pytest.approx((norm + 1e-6) / 1.0, rel=1e-6), (name, run)
        assert run["grad_norm_max_relative_diff"] <= 1e-6 and run["param_max_relative_diff"] <= 1e-6, (name, run)


def test_a_non_finite_step_is_skipped_on_the_device(child):
    """Fused AdamW with clipping (the defaults), plain and distributed: the update goes through
    reduce_and_update's device path (no pass of its own over the gradient buffers); a step with a
    non-finite loss, one with a NaN gradient and one with an Inf gradient but finite losses (their
    norms NaN and Inf) leave the parameters and the AdamW state as they were: the run ends bitwise
    where a run of only the two finite steps ends, every step count 2; the interval's mean loss
    leaves the three skipped steps out."""
    for name, run in child["device_skip"].items():
        assert run["device_path"] and run["grad_buffer_passes"] == 0, (name, run)
        assert run["finite"] == [True, False, False, False, True], (name, run)
        assert run["reference_finite"] == [True, True], (name, run)
        assert run["param_max_abs_diff"] == 0.0 and run["steps"] == [2.0], (name, run)
        assert run["moved"], (name, run)  # the two finite steps did change the weights
        assert run["interval_lm_loss"] == 2.0, (name, run)  # (1 + 3) / 2: neither inf, 100 nor 200 counted


def fused_cross_entropy_report(cfg, parallel) -> dict:
    from megatron.core.models.common.language_module import language_module

    from megatron_eve.config import RuntimeConfig
    from megatron_eve.model.build import build_model

    model = build_model(cfg, parallel, RuntimeConfig(use_cpu_initialization=True, cross_entropy_loss_fusion=True,
                                                     cross_entropy_fusion_impl="native"), load_teacher=False)
    calls = count_calls(language_module, "fused_vocab_parallel_cross_entropy")
    batch = {k: v for k, v in micro_batches(cfg)[0].items() if k != "teacher_images"}
    results = []
    for fusion in (True, False):
        model.config.cross_entropy_loss_fusion = fusion
        model.zero_grad()
        lm_loss = model(**batch)[0]
        lm_loss.sum().backward()
        results.append((lm_loss.detach(), model.output_layer.weight.grad.clone()))
    (ours, our_grad), (theirs, their_grad) = results
    return {"fused_calls": len(calls), "lm_loss_max_abs_diff": float((ours - theirs).abs().max()),
            "output_grad_relative_diff": float((our_grad - their_grad).abs().max() / their_grad.abs().max())}


def clipped_steps(cfg, parallel, distributed_optimizer: bool, folded: bool):
    """Three optimizer steps of megatron-core's optimizer over the tiny model, gradients set directly:
    (parameters, grad norms, the grad_scale the fused AdamW saw at each step)."""
    from megatron_eve.config import OptimConfig, RuntimeConfig
    from megatron_eve.model.build import build_model
    from megatron_eve.training import optim

    torch.manual_seed(0)
    job = SimpleNamespace(optim=OptimConfig(lr=1e-2, clip_grad=1.0, use_distributed_optimizer=distributed_optimizer),
                          runtime=RuntimeConfig(use_cpu_initialization=True))
    ddp = optim.wrap_model(build_model(cfg, parallel, job.runtime, load_teacher=False), job)
    optimizer = optim.build_optimizer(ddp, job)
    if not folded:
        optim._FUSED_ADAM_OF.clear()  # megatron-core's own clipping pass
    (adam,) = optim._torch_adams(optimizer)
    seen = []
    adam.register_step_pre_hook(lambda opt, args, kwargs: seen.append(
        None if opt.grad_scale is None else float(opt.grad_scale)))
    generator, norms = torch.Generator().manual_seed(1), []
    for size in (10.0, 10.0, 1e-4):
        for param in ddp.parameters():
            param.main_grad.copy_(size * torch.randn(param.shape, generator=generator))
        success, norm, _ = optimizer.step()
        assert success
        norms.append(norm)
    return [p.detach().clone() for p in ddp.parameters()], norms, seen


def clipping_report(cfg, parallel) -> dict:
    report = {}
    for distributed_optimizer in (False, True):
        (folded, folded_norms, folded_seen), (theirs, norms, their_seen) = (
            clipped_steps(cfg, parallel, distributed_optimizer, folded) for folded in (True, False))
        scale = max(float(p.abs().max()) for p in theirs)
        report["distributed" if distributed_optimizer else "plain"] = {
            "folded_grad_scales": folded_seen, "megatron_grad_scales": their_seen, "grad_norms": norms,
            "grad_norm_max_relative_diff": max(abs(a - b) / b for a, b in zip(folded_norms, norms)),
            "param_max_relative_diff": max(float((a - b).abs().max()) for a, b in zip(folded, theirs)) / scale}
    return report


def updates_through_the_trainer(cfg, parallel, distributed_optimizer: bool, steps):
    """megatron-core's optimizer over the tiny model, each step through the trainer's reduce_and_update
    with gradients set directly; steps: (seed of its gradients, its lm loss, a value put in one gradient
    entry or None)."""
    from megatron_eve.config import OptimConfig, RuntimeConfig
    from megatron_eve.model.build import build_model
    from megatron_eve.training import iteration_stats, optim
    from megatron_eve.training.update import reduce_and_update

    torch.manual_seed(0)
    job = SimpleNamespace(optim=OptimConfig(lr=1e-2, clip_grad=1.0, use_distributed_optimizer=distributed_optimizer),
                          runtime=RuntimeConfig(use_cpu_initialization=True))
    ddp = optim.wrap_model(build_model(cfg, parallel, job.runtime, load_teacher=False), job)
    optimizer = optim.build_optimizer(ddp, job)
    start = [p.detach().clone() for p in ddp.parameters()]
    stats = iteration_stats.IterationStats(torch.device("cpu"), counts_losses=True, counts_work=False)
    passes, real_count = [], iteration_stats.nonfinite_count
    iteration_stats.nonfinite_count = lambda tensors, device: (passes.extend(tensors), real_count(tensors, device))[1]
    finite = []
    try:
        for seed, loss, broken_entry in steps:
            generator = torch.Generator().manual_seed(seed)
            for param in ddp.parameters():
                param.main_grad.copy_(10.0 * torch.randn(param.shape, generator=generator))
            if broken_entry is not None:
                next(ddp.parameters()).main_grad.view(-1)[0] = broken_entry
            losses = [{"lm loss": torch.tensor(loss), "align loss": torch.tensor(0.0)}]
            finite.append(reduce_and_update(optimizer, stats, losses, [b.grad_data for b in ddp.buffers]).finite)
    finally:
        iteration_stats.nonfinite_count = real_count
    (adam,) = optim._torch_adams(optimizer)
    return {"params": [p.detach().clone() for p in ddp.parameters()], "start": start, "finite": finite,
            "steps": sorted({float(state["step"]) for state in adam.state.values()}),
            "device_path": optim.skips_updates_on_the_device(optimizer), "grad_buffer_passes": len(passes),
            "interval_lm_loss": stats.read_interval().losses["lm loss"]}


def device_skip_report(cfg, parallel) -> dict:
    report = {}
    for distributed_optimizer in (False, True):
        run = updates_through_the_trainer(cfg, parallel, distributed_optimizer,
                                          [(1, 1.0, None), (2, float("inf"), None), (3, 100.0, float("nan")),
                                           (5, 200.0, float("-inf")), (4, 3.0, None)])
        reference = updates_through_the_trainer(cfg, parallel, distributed_optimizer, [(1, 1.0, None), (4, 3.0, None)])
        report["distributed" if distributed_optimizer else "plain"] = {
            **{k: run[k] for k in ("finite", "steps", "device_path", "grad_buffer_passes", "interval_lm_loss")},
            "reference_finite": reference["finite"],
            "param_max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(run["params"], reference["params"])),
            "moved": any(not torch.equal(a, b) for a, b in zip(run["params"], run["start"]))}
    return report


def main(report_path: str):
    from megatron_eve import distributed
    from megatron_eve.config import ParallelConfig

    parallel = ParallelConfig()
    distributed.initialize(parallel)
    cfg = tiny_config(changes={"aligner.enabled": False})
    report = {"cross_entropy": fused_cross_entropy_report(cfg, parallel), "clipping": clipping_report(cfg, parallel),
              "device_skip": device_skip_report(cfg, parallel)}
    with open(report_path, "w") as out:
        json.dump(report, out)
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
