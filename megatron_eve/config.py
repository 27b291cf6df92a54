"""Typed configuration of the EVE model and of how it is laid out over devices.

Configs are plain dataclasses built once at the edge (CLI, tests, converters); nothing reads global
arguments. `validate()` gives clear errors before any module is built, and `transformer_config()`
turns the dataclasses into megatron-core's `TransformerConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional

import torch

TransformerImpl = Literal["auto", "transformer_engine", "torch", "local"]


class ConfigError(ValueError):
    """A configuration that cannot work, reported before anything heavy is built."""


@dataclass
class LanguageModelConfig:
    """The Vicuna / Llama decoder (eve.md §1: Vicuna-7B-v1.5)."""

    num_layers: int = 32
    hidden_size: int = 4096
    ffn_hidden_size: int = 11008
    num_attention_heads: int = 32
    num_query_groups: int = 32  # = heads: Vicuna-7B is plain multi-head attention
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    norm_epsilon: float = 1e-5
    rotary_base: int = 10000
    init_method_std: float = 0.02
    # Megatron pads the vocabulary so each TP rank holds an equal, aligned slice.
    make_vocab_size_divisible_by: int = 128


@dataclass
class VisionConfig:
    """The Patch Embedding Layer (PEL) and projector (eve.md §1, §3)."""

    hidden_size: int = 1024  # mm_hidden_size
    num_heads: int = 8  # local and global attention heads
    patch_size: int = 14  # patch_stride
    conv_stride: int = 2  # 2x2 local attention window
    image_size: int = 672  # side of the padded square the PEL sees (1344 for HD)
    teacher_image_size: int = 336  # image_size_clip: the CLIP teacher's square
    projector_type: str = "mlp2x_gelu"

    @property
    def token_cell(self) -> int:
        """Pixels per visual token side (28 for EVE): one conv patch times the 2x2 window."""
        return self.patch_size * self.conv_stride

    @property
    def teacher_grid(self) -> int:
        """CLIP patches per side of the teacher square (24 at 336 px)."""
        return self.teacher_image_size // self.patch_size

    @property
    def align_pool(self) -> int:
        """Pooling from the PEL token grid to the teacher grid: 1 at 672 px, 2 at 1344 px."""
        return (self.image_size // self.token_cell) // self.teacher_grid


@dataclass
class AlignerConfig:
    """The Patch Aligning Layer (PAL) and its frozen CLIP teacher (eve.md §1)."""

    enabled: bool = True
    # Decoder depth between taps; None means num_layers / 8, i.e. 9 taps (EVE: every 4 of 32).
    tap_interval: Optional[int] = None
    num_heads: int = 8  # heads of the parameter-free attention across taps
    hidden_size: int = 1024  # teacher width (CLIP ViT-L/14: 1024)
    loss_weight: float = 1.0
    teacher_path: Optional[str] = None  # local HF folder with a CLIPVisionModel
    teacher_select_layer: int = -2  # penultimate layer, patch tokens (mm_vision_select_layer)

    def taps(self, num_layers: int) -> List[int]:
        """Hidden-state indices tapped, in the reference's order: num_layers first, 0 last.

        Index 0 is the embedding output (after splicing), i in 1..L-1 the output of decoder layer
        i, and L the final-norm output — the HF `output_hidden_states` convention EVE uses.
        """
        interval = self.tap_interval if self.tap_interval is not None else num_layers // 8
        return list(range(num_layers, -1, -interval))


@dataclass
class EVEModelConfig:
    name: str = "eve-7b"
    language: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    aligner: AlignerConfig = field(default_factory=AlignerConfig)


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    distributed_timeout_minutes: int = 10  # how long a collective may wait for its peers
    # Interleaved 1F1B: each pipeline rank holds several chunks of this many decoder layers.
    num_layers_per_virtual_pipeline_stage: Optional[int] = None

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

    transformer_impl: TransformerImpl = "auto"
    attention_backend: str = "auto"  # with transformer_impl "torch": varlen, flash, flex or sdpa
    packed_attention: Literal["auto", "thd", "mask"] = "auto"  # how packed samples are kept apart
    bf16: bool = False
    fp16: bool = False
    recompute_granularity: Optional[Literal["full", "selective"]] = None
    recompute_method: Optional[Literal["uniform", "block"]] = None
    recompute_num_layers: Optional[int] = None
    use_cpu_initialization: bool = False

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


def _vicuna_7b() -> LanguageModelConfig:
    return LanguageModelConfig()


def _preset_eve_7b() -> EVEModelConfig:
    return EVEModelConfig(name="eve-7b", language=_vicuna_7b(), vision=VisionConfig(image_size=672))


def _preset_eve_7b_hd() -> EVEModelConfig:
    return EVEModelConfig(
        name="eve-7b-hd", language=_vicuna_7b(), vision=VisionConfig(image_size=1344)
    )


def _preset_tiny() -> EVEModelConfig:
    """A seconds-per-step model for CPU tests and the quick-start.

    8 layers keep EVE's 9-tap aligner rule (every num_layers/8); 224-px images over a 112-px
    teacher keep the 672/336 geometry (ratio 2, 28-px token cells): 1 + 8*9 = 73 tokens per square.
    """
    return EVEModelConfig(
        name="tiny",
        language=LanguageModelConfig(
            num_layers=8,
            hidden_size=128,
            ffn_hidden_size=352,
            num_attention_heads=4,
            num_query_groups=4,
            vocab_size=1024,
            max_position_embeddings=2048,
        ),
        vision=VisionConfig(hidden_size=64, num_heads=8, image_size=224, teacher_image_size=112),
        aligner=AlignerConfig(hidden_size=64, num_heads=8),
    )


PRESETS: Dict[str, callable] = {
    "eve-7b": _preset_eve_7b,
    "eve-7b-hd": _preset_eve_7b_hd,
    "tiny": _preset_tiny,
}


def get_preset(name: str) -> EVEModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def replace(config, **changes):
    """dataclasses.replace that also reaches one level into nested configs ('vision.image_size')."""
    nested: Dict[str, Dict[str, object]] = {}
    flat = {}
    for key, value in changes.items():
        if "." in key:
            head, tail = key.split(".", 1)
            nested.setdefault(head, {})[tail] = value
        else:
            flat[key] = value
    for head, sub in nested.items():
        flat[head] = replace(getattr(config, head), **sub)
    return dataclasses.replace(config, **flat)


def model_config_from_dict(values: Dict) -> EVEModelConfig:
    """Inverse of dataclasses.asdict for EVEModelConfig (as stored in checkpoints)."""
    return EVEModelConfig(
        name=values.get("name", "eve"),
        language=LanguageModelConfig(**values["language"]),
        vision=VisionConfig(**values["vision"]),
        aligner=AlignerConfig(**values["aligner"]),
    )


# Fields that only steer a run (resolution of this stage, whether / how strongly to align, where the
# teacher lives, how weights were initialised): everything else decides the weights' shapes or values.
RUN_OPTIONS = ("name", "language.init_method_std", "vision.image_size", "aligner.enabled",
               "aligner.loss_weight", "aligner.teacher_path")


ALIGNER_GEOMETRY = ("vision.teacher_image_size",)  # only shapes anything when the aligner runs


def architecture(model: EVEModelConfig) -> Dict[str, object]:
    """The architecture fields of a model config, flat ("language.hidden_size": 4096, ...); the
    aligner's (and the teacher's) only when the aligner is enabled."""
    flat = {}
    for part in ("language", "vision", "aligner"):
        for key, value in dataclasses.asdict(getattr(model, part)).items():
            flat[f"{part}.{key}"] = value
    flat["aligner.tap_interval"] = model.language.num_layers // 8 if model.aligner.tap_interval is None \
        else model.aligner.tap_interval  # None means the default interval: compare what it means
    return {key: value for key, value in flat.items() if key not in RUN_OPTIONS and (
        model.aligner.enabled or not (key.startswith("aligner.") or key in ALIGNER_GEOMETRY))}


def architecture_differences(ours: EVEModelConfig, recorded: EVEModelConfig) -> List[str]:
    """"field: ours vs recorded" for each architecture field both configs state and differ on."""
    a, b = architecture(ours), architecture(recorded)
    return [f"{key}: {a[key]} vs {b[key]}" for key in a if key in b and a[key] != b[key]]


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron's rule: round up to a multiple of divisible_by * TP."""
    multiple = divisible_by * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def _interleaving_problems(num_layers: int, parallel: ParallelConfig) -> List[str]:
    per_stage, pp = parallel.num_layers_per_virtual_pipeline_stage, parallel.pipeline_model_parallel_size
    if per_stage is None:
        return []
    if per_stage < 1:
        return [f"--num-layers-per-virtual-pipeline-stage {per_stage} must be at least 1"]
    if pp < 2:
        return ["--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1"]
    if num_layers % (pp * per_stage):
        return [f"--num-layers-per-virtual-pipeline-stage {per_stage} x pipeline-model-parallel-size {pp} "
                f"does not divide num_layers {num_layers}"]
    if num_layers == pp * per_stage:
        return [f"--num-layers-per-virtual-pipeline-stage {per_stage} gives one chunk per pipeline stage "
                "(no interleaving): drop the flag or use fewer layers per virtual stage"]
    return []


def validate(model: EVEModelConfig, parallel: ParallelConfig, runtime: RuntimeConfig) -> None:
    """Raise ConfigError naming every problem found, before any module is built."""
    lm, vis, pal = model.language, model.vision, model.aligner
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    problems = []
    if tp < 1 or pp < 1:
        problems.append(f"parallel sizes must be >= 1 (TP={tp}, PP={pp})")
    else:
        if lm.num_attention_heads % tp:
            problems.append(
                f"tensor-model-parallel-size {tp} does not divide num_attention_heads "
                f"{lm.num_attention_heads}"
            )
        if lm.num_query_groups % tp:
            problems.append(
                f"tensor-model-parallel-size {tp} does not divide num_query_groups "
                f"{lm.num_query_groups}"
            )
        if lm.num_layers % pp:
            problems.append(
                f"pipeline-model-parallel-size {pp} does not divide num_layers {lm.num_layers}"
            )
        problems += _interleaving_problems(lm.num_layers, parallel)
    if lm.num_attention_heads % lm.num_query_groups:
        problems.append(
            f"num_query_groups {lm.num_query_groups} does not divide num_attention_heads "
            f"{lm.num_attention_heads}"
        )
    if lm.hidden_size % lm.num_attention_heads:
        problems.append(
            f"num_attention_heads {lm.num_attention_heads} does not divide hidden_size "
            f"{lm.hidden_size}"
        )
    if parallel.sequence_parallel and tp == 1:
        problems.append("sequence-parallel needs tensor-model-parallel-size > 1")
    if runtime.bf16 and runtime.fp16:
        problems.append("choose one of bf16 and fp16")
    if parallel.distributed_timeout_minutes < 1:
        problems.append(f"--distributed-timeout-minutes {parallel.distributed_timeout_minutes} must be >= 1")
    problems += _kernel_problems(runtime)

    if vis.hidden_size % vis.num_heads:
        problems.append(f"vision num_heads {vis.num_heads} does not divide {vis.hidden_size}")
    if vis.projector_type != "mlp2x_gelu":
        problems.append(f"projector_type {vis.projector_type!r} is not supported (mlp2x_gelu)")
    if vis.teacher_image_size % vis.patch_size:
        problems.append(
            f"teacher_image_size {vis.teacher_image_size} is not a multiple of the "
            f"{vis.patch_size}-px patch"
        )
    elif vis.image_size % vis.teacher_image_size:
        problems.append(
            f"image_size {vis.image_size} is not a multiple of teacher_image_size "
            f"{vis.teacher_image_size}"
        )
    elif (vis.image_size // vis.token_cell) % vis.teacher_grid:
        problems.append(
            f"image_size {vis.image_size} gives a token grid of {vis.image_size / vis.token_cell:g} "
            f"that is not a multiple of the teacher grid {vis.teacher_grid}"
        )

    if pal.enabled:
        if pal.tap_interval is None and lm.num_layers % 8:
            problems.append(
                f"the aligner taps every num_layers/8 layers, but num_layers {lm.num_layers} is not "
                "a multiple of 8: set aligner.tap_interval"
            )
        elif pal.tap_interval is not None and (
            pal.tap_interval < 1 or lm.num_layers % pal.tap_interval
        ):
            problems.append(
                f"aligner.tap_interval {pal.tap_interval} must divide num_layers {lm.num_layers}"
            )
        if pal.hidden_size % pal.num_heads:
            problems.append(
                f"aligner num_heads {pal.num_heads} does not divide its width {pal.hidden_size}"
            )
        if (
            runtime.recompute_granularity == "full"
            and runtime.recompute_method == "uniform"
            and (runtime.recompute_num_layers or 1) > 1
            and not problems
        ):
            chunk = runtime.recompute_num_layers
            per_stage = lm.num_layers // pp
            # megatron-core only exposes a layer's output at the end of a uniform recompute chunk.
            inner_taps = [t for t in pal.taps(lm.num_layers) if 0 < t < lm.num_layers]
            # Position (1-based) of tapped layer t inside its stage; visible at a chunk end only.
            in_stage = {t: (t - 1) % per_stage + 1 for t in inner_taps}
            bad = [t for t, k in in_stage.items() if k % chunk and k != per_stage]
            if bad:
                problems.append(
                    f"uniform recompute in chunks of {chunk} layers hides the aligner taps after "
                    f"layers {bad}: use recompute_method block or a chunk that divides the taps"
                )
    if problems:
        raise ConfigError("invalid EVE configuration:\n  - " + "\n  - ".join(problems))


def _kernel_problems(runtime: RuntimeConfig) -> List[str]:
    """Kernel choices that would run but compute the wrong thing, or crash mid-run."""
    from megatron_eve.model.specs import resolve_transformer_impl

    try:
        impl = resolve_transformer_impl(runtime.transformer_impl)
    except ConfigError as error:
        return [str(error)]
    problems = []
    if runtime.packed_attention == "mask" and impl == "transformer_engine":
        problems.append("--packed-attention mask with Transformer Engine: TE ignores the mask of a causal "
                        "layer, so packed samples would attend across their boundaries; use "
                        "--packed-attention thd (or auto)")
    if runtime.packed_attention == "thd" and impl == "local":
        problems.append("--packed-attention thd needs --transformer-impl transformer_engine or torch: the "
                        "local attention cannot take packed THD batches")
    backend = runtime.attention_backend
    if backend != "auto" and impl != "torch":
        problems.append(f"--attention-backend {backend} only applies to --transformer-impl torch (here: {impl})")
    elif impl == "torch":
        from megatron_eve.model.attention import resolve_backend

        try:
            resolve_backend(backend, runtime.params_dtype)
        except ValueError as error:
            problems.append(str(error))
    return problems


def transformer_config(
    model: EVEModelConfig, parallel: ParallelConfig, runtime: RuntimeConfig
):
    """megatron-core TransformerConfig for the decoder (Llama: RMSNorm, SwiGLU, RoPE, no bias)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_eve.model.specs import resolve_transformer_impl

    validate(model, parallel, runtime)
    lm = model.language
    impl = resolve_transformer_impl(runtime.transformer_impl)
    fused = impl == "transformer_engine" or (impl == "torch" and torch.cuda.is_available())
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
        sequence_parallel=parallel.sequence_parallel,
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
        # Fused SwiGLU (megatron-core's own, compiled) on CUDA; fused RoPE needs Transformer Engine.
        bias_activation_fusion=fused,
        apply_rope_fusion=impl == "transformer_engine",
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
