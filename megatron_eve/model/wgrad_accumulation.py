"""The weight-gradient GEMM fused with its accumulation into the fp32 main gradient, in torch.

megatron-core's own linear layers (all of them on the local and torch specs, the output layer on
any) fuse this with apex's CUDA extension `fused_weight_gradient_mlp_cuda` and refuse
gradient-accumulation fusion without it. Unfused, each backward writes a bf16 weight gradient and
DDP's hook adds it into the fp32 main grad: one more pass over every weight gradient per
micro-batch (the largest elementwise cost in a GPU profile of the torch spec) and a bf16 rounding
of each micro-batch's gradient. torch's `addmm` writes bf16 x bf16 products into an fp32 output on
CUDA, so the accumulation happens inside the GEMM (beta = 1), as apex's kernel does.
"""

from __future__ import annotations

import functools
import sys

import torch


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """main_grad [out, in] += grad_output[tokens, out]^T @ total_input[tokens, in] (apex's signature)."""
    if total_input.dtype == main_grad.dtype:
        main_grad.addmm_(grad_output.t(), total_input)
    elif main_grad.is_cuda:
        torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=main_grad.dtype, out=main_grad)
    else:  # mixed precision off CUDA (no mixed-dtype GEMM here): products in the main grad's dtype
        main_grad.addmm_(grad_output.t().to(main_grad.dtype), total_input.to(main_grad.dtype))


# Half-precision main grads (--no-grad-reduce-in-fp32 style): same dtype on both sides.
wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32


@functools.cache
def available() -> bool:
    """Whether megatron-core's linears fuse: on CUDA, with apex's extension or with this module
    (checked once with a small mixed-dtype accumulation: a torch without it keeps the unfused path).
    Off the GPU the fused path would also oblige every caller that runs backward to wrap the model
    in DDP (which makes the main grads); tests and tools that differentiate a bare model do not."""
    if not torch.cuda.is_available():
        return False
    operand = torch.ones(16, 16, device="cuda", dtype=torch.bfloat16)
    main_grad = torch.ones(16, 16, device="cuda")
    try:
        wgrad_gemm_accum_fp32(operand, operand, main_grad)
    except (RuntimeError, TypeError):
        return False
    return bool((main_grad == 17).all())


def install() -> None:
    """Serve megatron-core's linears with this module where apex's extension is absent."""
    from megatron.core.tensor_parallel import layers

    if not layers._grad_accum_fusion_available:  # apex's extension is absent
        layers.fused_weight_gradient_mlp_cuda = sys.modules[__name__]
        layers._grad_accum_fusion_available = True
