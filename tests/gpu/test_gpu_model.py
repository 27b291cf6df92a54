"""The EVE model's fp32 forward on the GPU equals the CPU forward on the same weights.

Tolerance: fp32 on both sides with TF32 off; kernels differ (cuBLAS / SDPA / fused SwiGLU vs CPU
BLAS / the local path), so outputs agree to rounding: max |logit difference| <= 1e-4 x max |logit|,
per-token LM losses and align losses within 1e-4 relative.
"""

import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, child_environment

pytestmark = pytest.mark.gpu


def forward(tmp_path, teacher, name: str, cuda: bool, impl: str, *extra: str) -> subprocess.Popen:
    """The forward worker started: the CPU and GPU runs go side by side (64 s one after the other on
    an H100 machine, mostly imports), the second loading the weights the first writes."""
    cmd = [sys.executable, str(ROOT / "tests" / "parallel" / "forward_worker.py"), "--weights",
           str(tmp_path / "weights"), "--teacher", teacher, "--out", str(tmp_path / f"{name}.pt"),
           "--transformer-impl", impl, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_environment(cuda), cwd=ROOT)


def result(tmp_path, name: str, proc: subprocess.Popen):
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    return torch.load(tmp_path / f"{name}.pt", weights_only=True)


def test_fp32_forward_on_gpu_equals_cpu(tmp_path, device, on_gpu, teacher_path):
    cpu_run = forward(tmp_path, teacher_path, "cpu", cuda=False, impl="local")
    gpu_run = forward(tmp_path, teacher_path, "gpu", on_gpu, "auto", "--wait-for-weights")  # torch kernels on CUDA
    try:
        cpu = result(tmp_path, "cpu", cpu_run)
    finally:
        if cpu_run.returncode != 0:
            gpu_run.kill()  # it would wait for weights that never come
    gpu = result(tmp_path, "gpu", gpu_run)
    assert len(cpu["logits"]) == len(gpu["logits"]) == 4
    for ours, theirs in zip(gpu["logits"], cpu["logits"]):
        assert float((ours - theirs).abs().max()) <= 1e-4 * float(theirs.abs().max())
    for ours, theirs in zip(gpu["lm_loss"], cpu["lm_loss"]):
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    for ours, theirs in zip(gpu["align"], cpu["align"]):
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    assert any(float(a[1]) > 0 for a in cpu["align"])  # images were aligned against the teacher


def test_bf16_aligner_cells_are_pooled_in_fp32_and_rounded_once(device):
    """Each aligner cell of bf16 hidden states is the fp32 mean of its tokens rounded once, as the
    reference's average pooling gives. (CUDA's bf16 index_add rounds after every token it adds, in
    the order its atomics land; the CPU's accumulates in fp32, so only the device shows it.)"""
    from megatron_eve.model.visual_layout import VisualLayout
    from tests.test_visual_layout import GRIDS, LAYOUT, reference_cells, tokens_with_images

    input_ids = tokens_with_images(GRIDS, LAYOUT)
    torch.manual_seed(0)
    hidden = torch.randn(input_ids.shape[1], input_ids.shape[0], 256).to(torch.bfloat16)
    layout = VisualLayout.build(input_ids, torch.tensor(GRIDS), 2)
    expected = reference_cells(hidden.float(), input_ids, GRIDS, 2).to(torch.bfloat16)
    assert torch.equal(layout.to(device).cells(hidden.to(device)).cpu(), expected)
