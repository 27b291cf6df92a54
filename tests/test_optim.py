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
