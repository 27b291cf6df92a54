"""Build this rank's stage of the EVE model from typed configs."""

from __future__ import annotations

from typing import List, Optional

from megatron_eve.config import EVEModelConfig, ParallelConfig, RuntimeConfig, transformer_config
from megatron_eve.model.compile_layers import compile_layers
from megatron_eve.model.eve import EVEModel
from megatron_eve.model.specs import resolve_transformer_impl
from megatron_eve.platform import current_device


def build_model(
    model: EVEModelConfig,
    parallel: ParallelConfig,
    runtime: RuntimeConfig,
    *,
    load_teacher: bool = True,
    parallel_output: bool = True,
    vp_stage: Optional[int] = None,
) -> EVEModel:
    """The stage this process holds (first / last stage from megatron-core's parallel state), on
    this process's device; with interleaving, its model chunk `vp_stage`. megatron-core layers
    take runtime.params_dtype; the trainer wraps the model in Float16Module for bf16 / fp16, which
    also casts the plain-torch vision modules."""
    from megatron.core import parallel_state

    config = transformer_config(model, parallel, runtime)
    impl = resolve_transformer_impl(runtime.transformer_impl)
    interleaved = vp_stage is not None
    stage = EVEModel(
        model,
        config,
        transformer_impl=impl,
        attention_backend=runtime.attention_backend,
        rope_fusion=runtime.apply_rope_fusion,
        norm_kernel=runtime.norm_kernel,
        torch_cross_entropy=runtime.torch_cross_entropy,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=not interleaved, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=not interleaved, vp_stage=vp_stage),
        parallel_output=parallel_output,
        load_teacher=load_teacher,
        vp_stage=vp_stage,
    )
    if runtime.torch_compile_layers:
        compile_layers(stage.decoder.layers)
    return stage.to(current_device())


def build_model_chunks(model: EVEModelConfig, parallel: ParallelConfig, runtime: RuntimeConfig, *,
                       load_teacher: bool = True) -> List[EVEModel]:
    """Every model chunk this process holds, in pipeline order: one, or under interleaved 1F1B
    one per virtual stage (chunk v holds layers v*PP*L + rank*L onwards, L layers per chunk)."""
    chunks = parallel.virtual_pipeline_size(model.language.num_layers)
    if chunks is None:
        return [build_model(model, parallel, runtime, load_teacher=load_teacher)]
    return [build_model(model, parallel, runtime, load_teacher=load_teacher, vp_stage=v) for v in range(chunks)]
