"""How the model is laid out over devices and how it computes: parallel sizes, kernels, precision,
recompute. Fields declared with `option` are also command-line flags (options.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from megatron_eve.config.options import option

TransformerImpl = Literal["auto", "transformer_engine", "torch", "local"]


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = option(1, help="tensor-parallel ranks per layer")
    pipeline_model_parallel_size: int = option(1, help="pipeline stages")
    sequence_parallel: bool = option(False, help="with TP: shard norms and dropout along the sequence")
    distributed_timeout_minutes: int = option(
        10, help="how long a collective waits for its peers before the job fails")
    # Interleaved 1F1B: each pipeline rank holds several chunks of this many decoder layers.
    num_layers_per_virtual_pipeline_stage: Optional[int] = option(
        None, help="interleaved 1F1B: each pipeline rank holds num-layers / (PP x this) model chunks, "
                   "shrinking the pipeline bubble by that factor")

    def virtual_pipeline_size(self, num_layers: int) -> Optional[int]:
        """Model chunks per pipeline rank (megatron-core's virtual_pipeline_model_parallel_size),
        None without interleaving."""
        per_stage = self.num_layers_per_virtual_pipeline_stage
        if per_stage is None:
            return None
        return num_layers // (self.pipeline_model_parallel_size * per_stage)


@dataclass
class RuntimeConfig:
    """How the model computes: kernels, precision, recompute."""

    transformer_impl: TransformerImpl = option(
        "auto", help="auto: Transformer Engine if installed with CUDA, else torch's fused attention kernels "
                     "on CUDA, else megatron-core's local modules")
    attention_backend: Literal["auto", "varlen", "flash", "flex", "sdpa", "aten-flash"] = option(
        "auto", help="core attention of --transformer-impl torch (aten-flash: varlen's flash kernels called "
                     "directly, without its custom-op wrapper's host work; 0.99x varlen's tokens/s on an H100)")
    norm_kernel: Literal["torch", "liger", "compiled"] = option(
        "torch", help="the RMSNorms of --transformer-impl torch / local: torch's fused kernel, liger-kernel's "
                      "Triton kernels (needs CUDA and the liger-kernel package) or HF LlamaRMSNorm's arithmetic "
                      "compiled by torch.compile (liger and compiled cast as LlamaRMSNorm does: the normalised "
                      "input back to bf16 before the weight multiplies it)")
    packed_attention: Literal["auto", "thd", "mask"] = option(
        "auto", help="packed samples kept apart by THD + cu_seqlens (TE / torch kernels) or a block mask")
    bf16: bool = option(False, help="bf16 weights and activations (fp32 master weights in the optimizer)")
    fp16: bool = option(False, help="fp16 weights and activations, with loss scaling")
    recompute_granularity: Optional[Literal["full", "selective"]] = option(
        None, help="recompute activations in the backward pass instead of keeping them")
    recompute_method: Optional[Literal["uniform", "block"]] = option(
        None, help="with full recompute: layers in uniform chunks, or the first N layers of each stage")
    recompute_num_layers: Optional[int] = option(
        None, help="layers per recompute chunk (uniform) or recomputed layers per stage (block); "
                   "default 1 with full recompute")
    use_cpu_initialization: bool = option(False, help="initialise weights on the CPU, then move them")
    apply_rope_fusion: bool = option(
        True, flag="--no-rope-fusion", negate=True,
        help="apply RoPE unfused (fused by default: Transformer Engine's kernel, or with --transformer-impl "
             "torch on CUDA one compiled kernel for q and one for k)")
    cross_entropy_loss_fusion: Optional[bool] = option(
        None, help="a fused cross-entropy for the LM loss (--cross-entropy-fusion-impl says which; default: on with "
                   "CUDA, off on the CPU, where megatron-core's unfused loss is the fp32 reference); native's and "
                   "te's logits gradient comes out in the logits' dtype (bf16), so keep those off for fp32 runs")
    cross_entropy_fusion_impl: Literal["native", "te", "torch"] = option(
        "torch", help="the fused cross-entropy: this package's (torch: one torch-compiled kernel each way over the "
                      "logits as they are, the softmax recomputed in the backward pass, not kept in fp32; 1.05x "
                      "tokens/s at 4 layers on an H100), megatron-core's compiled kernels over fp32 logits (native: "
                      "no faster than unfused there) or Transformer Engine's (te)")
    torch_compile_layers: bool = option(
        False, help="compile each decoder layer with torch.compile (regional compile, as torchtitan does): "
                    "inductor fuses a layer's norms, residual adds, RoPE and activations around its GEMMs; "
                    "the first micro-batches take longer while it compiles. With gradient-accumulation fusion "
                    "(on by default on CUDA) each layer's graph splits at its linears")
    gradient_accumulation_fusion: bool = option(
        True, flag="--no-gradient-accumulation-fusion", negate=True,
        help="do not fuse the weight-gradient GEMM with its accumulation into the fp32 main grads (on by "
             "default on CUDA: apex's fused_weight_gradient_mlp_cuda, else torch's addmm with an fp32 output), "
             "nor add the token embedding's looked-up rows straight into its main grad")

    def __post_init__(self):
        if self.recompute_granularity == "full" and self.recompute_num_layers is None:
            self.recompute_num_layers = 1  # megatron-core needs a count with full recompute

    @property
    def lm_loss_fusion(self) -> bool:
        """Whether the LM loss is a fused one: as asked, else wherever CUDA is."""
        if self.cross_entropy_loss_fusion is not None:
            return self.cross_entropy_loss_fusion
        return torch.cuda.is_available()

    @property
    def torch_cross_entropy(self) -> bool:
        """Whether the LM loss is model/lm_loss.py's (else megatron-core's, fused or not)."""
        return self.lm_loss_fusion and self.cross_entropy_fusion_impl == "torch"

    def uses_thd(self) -> bool:
        """Whether packed samples go to attention as THD + cu_seqlens (else a block mask)."""
        if self.packed_attention != "auto":
            return self.packed_attention == "thd"
        from megatron_eve.model.specs import resolve_transformer_impl

        return torch.cuda.is_available() and resolve_transformer_impl(self.transformer_impl) != "local"

    @property
    def params_dtype(self) -> torch.dtype:
        if self.bf16:
            return torch.bfloat16
        if self.fp16:
            return torch.float16
        return torch.float32
