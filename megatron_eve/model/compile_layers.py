"""Regional torch.compile (--torch-compile-layers): each transformer layer of the decoder compiled
on its own, as torchtitan compiles its blocks. Inductor fuses a layer's elementwise work (norms,
residual adds, RoPE, SwiGLU, dtype casts) around the GEMMs and attention kernels, which it leaves
to cuBLAS and the attention library. A layer's graph is small: it compiles in seconds, and the
layers reuse it (their parameters are the graph's inputs).

Only what stands in the way of a whole-layer graph is changed here, nothing that changes numbers.

With gradient-accumulation fusion (the default on CUDA) a layer's graph splits at every linear: the
fused backward adds the weight gradient into the parameter's main grad, a tensor from outside the
linear's autograd function, which dynamo does not trace (a CPU run with the fusion forced on: 19
graph breaks, 18 graphs for 2 layers; the same main grads as eager, 1.3e-6 apart, which
tests/test_compile_layers.py checks). Its compiled regions are then the work between the linears.
`--no-gradient-accumulation-fusion` keeps each layer one graph at the cost of the unfused
accumulation; tools/bench_train.py measures both (compile-layers, compile-whole-layers).
"""

from __future__ import annotations

import functools
from typing import Iterable

import torch


def _tp_group_or_default(tp_group, is_expert: bool = False, check_initialized: bool = True):
    """megatron-core's get_tensor_model_parallel_group_if_none without its deprecation warning:
    RowParallelLinear passes tp_group=None on every call, and a warning call is a graph break
    (dynamo cannot trace warnings.warn with a warning class) that splits each layer in two."""
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized():
        return None
    if not parallel_state.is_initialized() or tp_group is not None:
        return tp_group
    if is_expert:
        return parallel_state.get_expert_tensor_parallel_group(check_initialized=check_initialized)
    return parallel_state.get_tensor_model_parallel_group(check_initialized=check_initialized)


@functools.lru_cache(maxsize=None)
def _quiet_group_lookup() -> None:
    from megatron.core.tensor_parallel import layers

    layers.get_tensor_model_parallel_group_if_none = _tp_group_or_default


def compile_layers(layers: Iterable[torch.nn.Module]) -> int:
    """Compile each layer's forward in place (nn.Module.compile; its parameters and state dict keys
    stay as they are). Shapes that vary from micro-batch to micro-batch (the packed samples' count
    in cu_seqlens, their longest length) become dynamic after their first change, as torch.compile
    does by default. Inductor keeps the eager code's casts (a bf16 rounding between two fused
    operations, as LlamaRMSNorm's arithmetic has), so the compiled layer rounds where the eager one
    does. Returns how many layers were compiled."""
    _quiet_group_lookup()
    count = 0
    for layer in layers:
        layer.compile(options={"emulate_precision_casts": True})
        count += 1
    return count
