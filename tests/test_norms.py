"""--norm-kernel compiled (model/specs.py CompiledRMSNorm), compiled for the CPU here: transformers'
LlamaRMSNorm's outputs and gradients, in fp32 and bf16, over two token counts (the second one
recompiles with dynamic sizes, as a generation's growing sequence does)."""

from types import SimpleNamespace

import pytest
import torch

from megatron_eve.model.specs import CompiledRMSNorm

HIDDEN = 64


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_norm_is_llama_rms_norm(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    ours = CompiledRMSNorm(SimpleNamespace(sequence_parallel=False), HIDDEN, eps=1e-5).to(dtype)
    theirs = LlamaRMSNorm(HIDDEN, eps=1e-5).to(dtype)
    with torch.no_grad():
        weight = 1 + 0.1 * torch.randn(HIDDEN)
        ours.weight.copy_(weight)
        theirs.weight.copy_(weight)
    # fp32: rounding apart only; bf16: within one bf16 step of the largest value (the casts kept as
    # LlamaRMSNorm rounds).
    tolerance = 1e-6 if dtype == torch.float32 else 2**-8
    for tokens in (37, 45):
        x = 3 * torch.randn(tokens, 2, HIDDEN).to(dtype)
        grad = torch.randn(tokens, 2, HIDDEN).to(dtype)
        outputs, gradients = [], []
        for norm in (ours, theirs, exact := LlamaRMSNorm(HIDDEN, eps=1e-5).double()):
            if norm is exact:
                with torch.no_grad():
                    exact.weight.copy_(theirs.weight)
            norm.zero_grad()
            leaf = x.clone().to(norm.weight.dtype).requires_grad_()
            out = norm(leaf)
            out.backward(grad.to(out.dtype))
            outputs.append(out)
            gradients.append((leaf.grad, norm.weight.grad))
        assert outputs[0].dtype == dtype
        assert relative(outputs[0], outputs[1]) <= tolerance, (tokens, relative(outputs[0], outputs[1]))
        # Gradients: no further from fp64 than transformers' own in this dtype (bf16 sums may round
        # in another order), up to 2x and a rounding step.
        for name, ours_grad, their_grad, exact_grad in zip(("input", "weight"), *gradients):
            our_error, their_error = relative(ours_grad, exact_grad), relative(their_grad, exact_grad)
            assert our_error <= 2 * their_error + tolerance, (tokens, name, our_error, their_error)


def test_compiled_norm_keeps_its_casts_inside_a_compiled_layer():
    """Under --torch-compile-layers the norm is traced into its layer's graph: the layer is compiled
    keeping the casts too, so its bf16 outputs are LlamaRMSNorm's, bit for bit."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from megatron_eve.model.compile_layers import compile_layers

    torch.manual_seed(0)
    layer = torch.nn.Sequential(CompiledRMSNorm(SimpleNamespace(sequence_parallel=False), HIDDEN, eps=1e-5))
    theirs = LlamaRMSNorm(HIDDEN, eps=1e-5)
    with torch.no_grad():
        weight = 1 + 0.1 * torch.randn(HIDDEN)
        layer[0].weight.copy_(weight)
        theirs.weight.copy_(weight)
    layer, theirs = layer.bfloat16(), theirs.bfloat16()
    assert compile_layers([layer]) == 1
    x = 3 * torch.randn(37, 2, HIDDEN).bfloat16()
    with torch.no_grad():
        assert torch.equal(layer(x), theirs(x))
