"""The fast RMSNorms on the device: liger-kernel's (--norm-kernel liger, model/specs.py LigerRMSNorm)
and HF LlamaRMSNorm's arithmetic compiled by torch.compile (--norm-kernel compiled, CompiledRMSNorm).

At EVE-7B's width over one packed row (4096 tokens x 4096, bf16, the weight bf16 as under Float16Module):
- the output within two bf16 rounding steps of HF LlamaRMSNorm's arithmetic (inverse RMS in fp32, the
  normalised input cast to bf16, then times the weight);
- in a pre-norm residual block, x + norm(x) @ W^T (the norm's output feeding one linear, as in a
  decoder layer), the gradients of x, the norm weight and W no further from the block's fp64 autograd
  than those through torch's RMSNorm (the default) are, up to 2x and one bf16 step.
"""

from types import SimpleNamespace

import pytest
import torch

from megatron_eve.model.specs import CompiledRMSNorm, LigerRMSNorm, RMSNorm

pytestmark = pytest.mark.gpu
EPS = 1e-5


def llama_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """HF LlamaRMSNorm's order of operations."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + EPS)).to(x.dtype)


def block_gradients(x, norm_weight, linear_weight, grad, norm):
    x, norm_weight, linear_weight = (t.detach().clone().requires_grad_() for t in (x, norm_weight, linear_weight))
    out = x + norm(x, norm_weight) @ linear_weight.t()
    (out.float() * grad).sum().backward()
    return [t.grad.float() for t in (x, norm_weight, linear_weight)]


def module_norm(cls):
    """The module's own forward, its weight the block's leaf tensor (so its gradient lands there)."""
    def apply(x, weight):
        return cls.forward(SimpleNamespace(weight=weight, eps=EPS, normalized_shape=(x.shape[-1],)), x)

    return apply


@pytest.mark.parametrize("kernel", ["liger", "compiled"])
def test_fast_rms_norms_match_llama_and_their_gradients_in_a_block(device, on_gpu, kernel):
    if not on_gpu:
        pytest.skip("the GPU kernels (the CPU's compiled norm: tests/test_norms.py)")
    if kernel == "liger":
        pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (gpu_check.sh carries its wheel)")
    fast = {"liger": LigerRMSNorm, "compiled": CompiledRMSNorm}[kernel]
    generator = torch.Generator(device=device).manual_seed(0)
    tokens, hidden = 4096, 4096
    x = torch.randn(tokens, 1, hidden, device=device, generator=generator).bfloat16()
    norm_weight = (1 + 0.1 * torch.randn(hidden, device=device, generator=generator)).bfloat16()
    linear_weight = (torch.randn(hidden, hidden, device=device, generator=generator) / hidden**0.5).bfloat16()
    grad = torch.randn(tokens, 1, hidden, device=device, generator=generator)

    with torch.no_grad():
        ours, reference = module_norm(fast)(x, norm_weight), llama_rms_norm(x, norm_weight)
    steps = ((ours.float() - reference.float()).abs() / reference.float().abs().clamp_min(1e-3)).max()
    assert float(steps) <= 2 * 2**-8, float(steps)

    exact = block_gradients(x.double(), norm_weight.double(), linear_weight.double(), grad.double(), llama_rms_norm)
    fast_grads = block_gradients(x, norm_weight, linear_weight, grad, module_norm(fast))
    torch_grads = block_gradients(x, norm_weight, linear_weight, grad, module_norm(RMSNorm))
    for name, e, ours, theirs in zip(("x", "norm weight", "linear weight"), exact, fast_grads, torch_grads):
        scale = float(e.abs().max())
        our_error, their_error = (float((g.double() - e).abs().max()) / scale for g in (ours, theirs))
        assert our_error <= 2 * their_error + 2**-8, (name, our_error, their_error)
