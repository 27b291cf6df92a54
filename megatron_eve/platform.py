"""Device and backend choice, and the CPU-compatibility shim for megatron-core.

megatron-core is written for CUDA: several of its calls hard-code the CUDA device, stream or RNG.
On a machine without CUDA (our CI, laptops) `apply_cpu_shim()` redirects exactly those calls to the
CPU so the real megatron-core stack (parallel_state, TransformerBlock, schedules, DDP, optimizers,
dist-checkpointing) runs over gloo. With CUDA present the shim does nothing: one code path.

Every patch below names the megatron-core call that needs it (checked against megatron-core 0.19).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

_SHIM_APPLIED = False


def has_cuda() -> bool:
    return torch.cuda.is_available()


def distributed_backend() -> str:
    """NCCL for CUDA tensors plus gloo for CPU ones on GPU machines (see distributed.py)."""
    return "cpu:gloo,cuda:nccl" if has_cuda() else "gloo"


def current_device() -> torch.device:
    """The device this process computes on (after the shim, megatron-core agrees with it)."""
    if has_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _names_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int device index means a CUDA ordinal in torch's conventions.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites tensor creation and moves that name CUDA into CPU ones.

    Needed by: pipeline_parallel/schedules.py (`total_num_tokens = torch.zeros(..., device="cuda")`),
    optimizer/distrib_optimizer.py and optimizer/clip_grads.py (buffers made on "cuda"),
    distributed/param_and_grad_buffer.py (`.cuda()` on buckets), tensor_parallel/layers.py
    (`device=torch.cuda.current_device()` weights when not use_cpu_initialization).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _names_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _names_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        out = func(*args, **kwargs)
        # optimizer/clip_grads.py and the Float16/Distributed optimizers assert
        # `param.type() == 'torch.cuda.FloatTensor'`: report the CUDA type name for bare .type().
        if (
            func is torch.Tensor.type
            and len(args) == 1
            and not kwargs
            and isinstance(out, str)
            and out.startswith("torch.")
            and not out.startswith("torch.cuda.")
        ):
            out = "torch.cuda." + out[len("torch."):]
        return out


class _NoStream:
    """Stand-in for torch.cuda streams and events on CPU (everything is synchronous there)."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return None

    def synchronize(self):
        pass

    def query(self):
        return True


def apply_cpu_shim() -> None:
    """Patch megatron-core's CUDA-only calls to run on CPU. Idempotent; a no-op when CUDA exists.

    Call it in every process after `import megatron.core` is possible and before building models.
    """
    global _SHIM_APPLIED
    if _SHIM_APPLIED or has_cuda():
        return
    _SHIM_APPLIED = True

    # rotary_pos_embedding.py get_emb, tensor_parallel/mappings.py, tensor_parallel/layers.py and
    # pipeline_parallel/p2p_communication.py place tensors on torch.cuda.current_device().
    torch.cuda.current_device = lambda: "cpu"
    # p2p_communication.py and the timers call torch.cuda.synchronize().
    torch.cuda.synchronize = lambda *args, **kwargs: None
    # distributed/param_and_grad_buffer.py calls torch.cuda.current_stream() unconditionally;
    # the DDP overlap path and optimizer param gather create streams / stream contexts.
    torch.cuda.current_stream = lambda *args, **kwargs: _NoStream()
    torch.cuda.default_stream = lambda *args, **kwargs: _NoStream()
    torch.cuda.Stream = _NoStream
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    # training utilities and the optimizers free cached blocks with torch.cuda.empty_cache().
    torch.cuda.empty_cache = lambda: None

    # tensor_parallel/random.py: model_parallel_cuda_manual_seed and CudaRNGStatesTracker.fork()
    # read and write the CUDA RNG; on CPU the default generator plays its part.
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    # torch.manual_seed() itself calls torch.cuda.manual_seed_all: it must not recurse into it.
    torch.cuda.manual_seed_all = lambda seed: None
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(
        new_state
    )
    # Its fork() then warns at every use that the CPU generator changed inside the CUDA one's context:
    # here they are one generator, so it always has (68 lines in a short training log).
    logging.getLogger(mcore_random.__name__).addFilter(
        lambda record: record.getMessage() != "CPU RNG state changed within GPU RNG context")

    # transformer/utils.py get_default_causal_mask builds its mask with device="cuda" inside an
    # lru_cache, before any TorchFunctionMode sees it (DotProductAttention with mask=None).
    from megatron.core.transformer import utils as mcore_transformer_utils

    mcore_transformer_utils.get_default_causal_mask = lambda sq: torch.triu(
        torch.ones(sq, sq, dtype=torch.bool), diagonal=1
    )

    # Everything else that names "cuda" (see _CudaToCpu). The mode stays entered for the life of
    # the process; it is thread-local: a thread that runs the model calls shim_this_thread().
    _CudaToCpu().__enter__()


def shim_this_thread() -> None:
    """Enter the CPU shim's tensor-creation mode in the calling thread too (torch function modes are
    thread-local); a no-op with CUDA or before apply_cpu_shim()."""
    if _SHIM_APPLIED and not has_cuda():
        _CudaToCpu().__enter__()
