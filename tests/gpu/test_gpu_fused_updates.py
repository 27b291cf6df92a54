"""The fused update paths on the device (CPU counterparts: tests/test_fused_updates.py).

- Gradient-accumulation fusion is available (the trainer fuses); the weight-gradient GEMM with
  bf16 operands accumulates into the fp32 main grad in place, through
  torch's mixed-dtype addmm (out_dtype=float32, out=main_grad), and is never further from the
  exact (fp64) sum than the unfused path (a bf16 gradient, rounded, then added): at EVE-7B's FFN
  shape, max |error| <= the unfused one's.
- The token embedding's rows added into its fp32 main grad (model/token_embedding.py) at EVE-7B's
  vocabulary and width over one packed row: within fp32 rounding of the fp64 sums, and the same bits
  on a second run (on CUDA, index_put_ with accumulate sorts the ids: deterministic).
- torch's fused AdamW set by use_fused_torch_adam after a load that left one shared host step:
  the steps move to the device, one per parameter; the updates match torch's foreach AdamW on the
  same parameters within 1e-6 relative (fp32; the kernels differ in operation order only).
- Gradient clipping inside the fused AdamW's step (its grad_scale) against a separate scaling pass.
- The LM loss of --cross-entropy-fusion-impl torch (model/lm_loss.py, Triton kernels from
  torch.compile here) at EVE-7B's shape against torch's cross-entropy in fp64, as on the CPU
  (tests/test_lm_loss.py), and what its forward keeps for the backward pass.
"""

import copy
from types import SimpleNamespace

import pytest
import torch

from megatron_eve.model import wgrad_accumulation
from megatron_eve.model.lm_loss import vocab_parallel_lm_loss
from megatron_eve.training.optim import _clip_by_total_norm, use_fused_torch_adam
from tests.test_lm_loss import loss_and_grad_errors

pytestmark = pytest.mark.gpu


def test_bf16_wgrad_accumulates_into_the_fp32_main_grad(device, on_gpu):
    assert wgrad_accumulation.available() == on_gpu  # so training runs fuse on this GPU
    generator = torch.Generator(device=device).manual_seed(0)
    tokens, inputs, outputs = 4096, 4096, 11008 // 8  # a slice of EVE-7B's fc1, over one packed row
    total_input = torch.randn(tokens, inputs, device=device, generator=generator).bfloat16()
    grad_output = torch.randn(tokens, outputs, device=device, generator=generator).bfloat16()
    main_grad = torch.randn(outputs, inputs, device=device, generator=generator)
    exact = main_grad.double() + grad_output.double().t() @ total_input.double()
    unfused = main_grad + (grad_output.t() @ total_input).float()
    storage = main_grad.data_ptr()
    wgrad_accumulation.wgrad_gemm_accum_fp32(total_input, grad_output, main_grad)
    assert main_grad.data_ptr() == storage and main_grad.dtype == torch.float32
    fused_error = float((main_grad.double() - exact).abs().max())
    unfused_error = float((unfused.double() - exact).abs().max())
    assert fused_error <= unfused_error, (fused_error, unfused_error)


def test_embedding_rows_add_into_the_main_grad_on_the_device(device, on_gpu):
    from megatron_eve.model.token_embedding import add_rows_to_main_grad

    generator = torch.Generator(device=device).manual_seed(0)
    vocab, hidden, tokens = 32000, 4096, 4096
    ids = torch.randint(0, 2000, (1, tokens), device=device, generator=generator)  # frequent tokens repeat
    grad_output = torch.randn(1, tokens, hidden, device=device, generator=generator).bfloat16()
    start = torch.randn(vocab, hidden, device=device, generator=generator)
    exact = start.double().index_add(0, ids.view(-1), grad_output.double().view(-1, hidden))
    runs = [start.clone(), start.clone()]
    for main_grad in runs:
        add_rows_to_main_grad(main_grad, ids, grad_output)
    assert torch.equal(runs[0], runs[1]) or not on_gpu  # the CPU's index_put_ adds in thread order
    error = float((runs[0].double() - exact).abs().max())
    assert error < 1e-5, error


def test_fused_adam_on_the_device_after_a_load(device):
    generator = torch.Generator(device=device).manual_seed(0)
    shapes = ((1024, 64), (4096,), (3, 5, 7))
    values = [torch.randn(s, device=device, generator=generator) for s in shapes]
    grads = [[torch.randn(s, device=device, generator=generator) for s in shapes] for _ in range(4)]
    adams = [torch.optim.AdamW([torch.nn.Parameter(v.clone()) for v in values], lr=1e-2, weight_decay=0.1,
                               foreach=True) for _ in range(2)]

    def run(adam, steps):
        params = adam.param_groups[0]["params"]
        for step_grads in steps:
            for param, grad in zip(params, step_grads):
                param.grad = grad.clone()
            adam.step()
        return params

    saving, loading = adams
    with torch.no_grad():
        for ours, theirs in zip(run(loading, []), run(saving, grads[:2])):
            ours.copy_(theirs)
    state = copy.deepcopy(saving.state_dict())
    shared = torch.tensor(2.0)  # what megatron-core's load leaves without TE / apex
    for entry in state["state"].values():
        entry["step"] = shared
    loading.load_state_dict(state)
    use_fused_torch_adam(SimpleNamespace(optimizer=loading))
    steps = [loading.state[p]["step"] for p in loading.param_groups[0]["params"]]
    params_device = values[0].device
    assert all(s.device == params_device and s.dtype == torch.float32 for s in steps)
    assert len({s.data_ptr() for s in steps}) == len(steps)
    for ours, theirs in zip(run(loading, grads[2:]), run(saving, grads[2:])):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_clip_inside_the_fused_adam_step_on_the_device(device):
    """The clip coefficient handed to torch's fused AdamW as its grad_scale (training.optim's
    _clip_by_total_norm) acts as megatron-core's separate scaling pass: the same parameters as foreach
    AdamW given the pre-scaled gradients (1e-6), the gradients left scaled, the grad_scale gone after the step."""
    generator = torch.Generator(device=device).manual_seed(0)
    shapes = ((1024, 64), (4096,), (3, 5, 7))
    values = [torch.randn(s, device=device, generator=generator) for s in shapes]
    grads = [10 * torch.randn(s, device=device, generator=generator) for s in shapes]
    fused, reference = (torch.optim.AdamW([torch.nn.Parameter(v.clone()) for v in values], lr=1e-2, foreach=True)
                        for _ in range(2))
    use_fused_torch_adam(SimpleNamespace(optimizer=fused))
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    clip_coeff = 1.0 / (norm + 1e-6)
    ours, theirs = fused.param_groups[0]["params"], reference.param_groups[0]["params"]
    for mine, other, grad in zip(ours, theirs, grads):
        mine.grad, other.grad = grad.clone(), grad * clip_coeff
    _clip_by_total_norm(ours, 1.0, norm)
    fused.step()
    reference.step()
    assert fused.grad_scale is None
    for mine, other in zip(ours, theirs):
        torch.testing.assert_close(mine, other, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mine.grad, other.grad, rtol=1e-6, atol=1e-6)


def test_lm_loss_on_the_device(device, on_gpu):
    """One packed row of 4096 tokens over a 32000-column vocabulary shard (bf16 logits), the last 10
    columns padding: losses within 1e-5 of fp64, each gradient entry within one bf16 rounding step,
    none in the padding. The forward keeps per-token values only beside the logits (megatron-core's
    loss keeps an fp32 softmax: twice the logits' bytes): under 1% of the logits' bytes."""
    tokens, columns = (4096, 32000) if on_gpu else (256, 2000)  # on the CPU: the tier's own check
    generator = torch.Generator(device=device).manual_seed(0)
    logits = (3 * torch.randn(tokens, 1, columns, device=device, generator=generator)).bfloat16()
    labels = torch.randint(0, columns - 10, (1, tokens), device=device, generator=generator)
    grad = torch.rand(1, tokens, device=device, generator=generator)
    loss_error, grad_steps, padded_grad = loss_and_grad_errors(logits, labels, columns - 10, grad)
    assert loss_error <= 1e-5 and grad_steps <= 1.0 and padded_grad == 0.0, (loss_error, grad_steps, padded_grad)
    if on_gpu:
        logits.requires_grad_()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = vocab_parallel_lm_loss(logits, labels, columns - 10, None)
        kept = torch.cuda.memory_allocated() - before
        assert kept <= logits.numel() * logits.element_size() // 100, (kept, loss.shape)
