"""The fused update paths on the device (CPU counterparts: tests/test_fused_updates.py).

- Gradient-accumulation fusion is available (the trainer fuses); the weight-gradient GEMM with
  bf16 operands accumulates into the fp32 main grad in place, through
  torch's mixed-dtype addmm (out_dtype=float32, out=main_grad), and is never further from the
  exact (fp64) sum than the unfused path (a bf16 gradient, rounded, then added): at EVE-7B's FFN
  shape, max |error| <= the unfused one's.
- torch's fused AdamW set by use_fused_torch_adam after a load that left one shared host step:
  the steps move to the device, one per parameter; the updates match torch's foreach AdamW on the
  same parameters within 1e-6 relative (fp32; the kernels differ in operation order only).
"""

import copy
from types import SimpleNamespace

import pytest
import torch

from megatron_eve.model import wgrad_accumulation
from megatron_eve.training.optim import use_fused_torch_adam

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
