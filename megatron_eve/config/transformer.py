"""The model configs as megatron-core's TransformerConfig."""

from __future__ import annotations

import torch

from megatron_eve.config.model import EVEModelConfig
from megatron_eve.config.runtime import ParallelConfig, RuntimeConfig
from megatron_eve.config.validate import validate


def transformer_config(
    model: EVEModelConfig, parallel: ParallelConfig, runtime: RuntimeConfig
):
    """megatron-core TransformerConfig for the decoder (Llama: RMSNorm, SwiGLU, RoPE, no bias)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_eve.model import wgrad_accumulation
    from megatron_eve.model.specs import resolve_transformer_impl

    validate(model, parallel, runtime)
    lm = model.language
    impl = resolve_transformer_impl(runtime.transformer_impl)
    fused = impl == "transformer_engine" or (impl == "torch" and torch.cuda.is_available())
    grad_accumulation_fusion = runtime.gradient_accumulation_fusion and wgrad_accumulation.available()
    if grad_accumulation_fusion:
        wgrad_accumulation.install()
    return TransformerConfig(
        num_layers=lm.num_layers,
        hidden_size=lm.hidden_size,
        ffn_hidden_size=lm.ffn_hidden_size,
        num_attention_heads=lm.num_attention_heads,
        num_query_groups=lm.num_query_groups,
        kv_channels=lm.hidden_size // lm.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=lm.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=lm.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_size(lm.num_layers),
        # Off without tensor parallelism, as Megatron-LM (config.validate.complete_job warns when it turns it off).
        sequence_parallel=parallel.sequence_parallel and parallel.tensor_model_parallel_size > 1,
        # Stages exchange [tokens + carried aligner features] whose length varies per micro-batch.
        variable_seq_lengths=True,
        # Dense model; megatron-core still rejects variable lengths with the default MoE dispatcher.
        moe_token_dispatcher_type="alltoall",
        pipeline_dtype=runtime.params_dtype,
        params_dtype=runtime.params_dtype,
        bf16=runtime.bf16,
        fp16=runtime.fp16,
        use_cpu_initialization=runtime.use_cpu_initialization,
        recompute_granularity=runtime.recompute_granularity,
        recompute_method=runtime.recompute_method,
        recompute_num_layers=runtime.recompute_num_layers,
        # Fused SwiGLU (megatron-core's own, compiled) on CUDA; megatron-core's fused RoPE needs
        # Transformer Engine (the torch impl fuses its own: model/attention.py).
        bias_activation_fusion=fused,
        apply_rope_fusion=runtime.apply_rope_fusion and impl == "transformer_engine",
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=grad_accumulation_fusion,
        # The torch impl is ours (model/lm_loss.py), not megatron-core's.
        cross_entropy_loss_fusion=runtime.lm_loss_fusion and not runtime.torch_cross_entropy,
        cross_entropy_fusion_impl="native" if runtime.torch_cross_entropy else runtime.cross_entropy_fusion_impl,
        persist_layer_norm=False,
    )
