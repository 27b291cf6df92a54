"""Process-group setup: torch.distributed + megatron-core's parallel state + seeds. Launched by
torchrun, which sets RANK / WORLD_SIZE / MASTER_ADDR / LOCAL_RANK.

On GPU machines every group gets two backends, "cpu:gloo,cuda:nccl": our own collectives keep
their tensors on the GPU (NCCL), while the CPU-side collectives that megatron-core's
dist-checkpointing and object exchanges may issue still find a backend (gloo). On CPU, gloo alone.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from megatron_eve.config import ConfigError, ParallelConfig
from megatron_eve.platform import apply_cpu_shim, distributed_backend, has_cuda


def initialize(parallel: ParallelConfig, seed: int = 1234, virtual_pipeline_size: Optional[int] = None) -> None:
    """Join the process group and build TP / PP / DP groups; idempotent within a process.
    parallel.distributed_timeout_minutes bounds every collective (a hung peer fails the job);
    virtual_pipeline_size (parallel.virtual_pipeline_size(num_layers)) selects interleaved 1F1B."""
    timeout = timedelta(minutes=parallel.distributed_timeout_minutes)
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python tool.py`: a one-process group
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port))
        if has_cuda():
            local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
            if local_rank >= gpus:  # else CUDA's "invalid device ordinal" deep in set_device
                raise ConfigError(f"local rank {local_rank} has no GPU of its own: this node shows {gpus} "
                                  f"(CUDA_VISIBLE_DEVICES); start at most {gpus} processes per node "
                                  "(torchrun --nproc-per-node)")
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=distributed_backend(), timeout=timeout)
    apply_cpu_shim()
    world = dist.get_world_size()
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if world % (tp * pp):
        raise ConfigError(
            f"tensor ({tp}) x pipeline ({pp}) parallel sizes do not divide the world size {world}"
        )
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=virtual_pipeline_size,
            distributed_timeout_minutes=parallel.distributed_timeout_minutes,
        )
    set_seed(seed)


def set_seed(seed: int) -> None:
    """Megatron's convention: one seed per pipeline stage, shared by TP ranks (replicated modules
    start equal), and a tracked TP-rank-specific stream for tensor-parallel regions."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed, force_reset_rng=True)


def destroy() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
