"""Configuration errors are clear and raised before anything is built."""

import pytest
import torch

from megatron_eve.config import (
    ConfigError,
    ParallelConfig,
    RuntimeConfig,
    get_preset,
    padded_vocab_size,
    replace,
    validate,
)
from megatron_eve.model.specs import resolve_transformer_impl


def check(model, tp=1, pp=1, sp=False, **runtime):
    validate(model, ParallelConfig(tp, pp, sp), RuntimeConfig(**runtime))


@pytest.mark.parametrize("name", ["eve-7b", "eve-7b-hd", "tiny"])
def test_presets_are_valid(name):
    model = get_preset(name)
    check(model, tp=2, pp=2)
    check(model, tp=4, pp=4, sp=True)


def test_preset_geometry():
    assert get_preset("eve-7b").vision.align_pool == 1
    assert get_preset("eve-7b-hd").vision.align_pool == 2
    assert get_preset("eve-7b").language.num_layers == 32
    assert get_preset("eve-7b").aligner.taps(32) == [32, 28, 24, 20, 16, 12, 8, 4, 0]


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'eve-13b'; known presets: eve-7b, eve-7b-hd, tiny"):
        get_preset("eve-13b")


def test_tp_must_divide_heads():
    with pytest.raises(ConfigError, match="tensor-model-parallel-size 3 does not divide num_attention_heads 32"):
        check(get_preset("eve-7b"), tp=3)


def test_pp_must_divide_layers():
    with pytest.raises(ConfigError, match="pipeline-model-parallel-size 3 does not divide num_layers 32"):
        check(get_preset("eve-7b"), pp=3)


def test_all_problems_are_listed_together():
    with pytest.raises(ConfigError) as error:
        check(get_preset("eve-7b"), tp=3, pp=5)
    assert "num_attention_heads" in str(error.value) and "num_layers 32" in str(error.value)


def test_sequence_parallel_without_tp_is_off_not_refused():
    """As Megatron-LM: sequence parallelism without tensor parallelism is turned off (the training
    checks warn: tests/test_options.py), not refused; megatron-core's config never gets it."""
    from megatron_eve.config.transformer import transformer_config
    from tests.helpers import tiny_config

    check(get_preset("tiny"), sp=True)
    runtime = RuntimeConfig(use_cpu_initialization=True)
    assert not transformer_config(tiny_config(), ParallelConfig(1, 1, True), runtime).sequence_parallel
    assert transformer_config(tiny_config(), ParallelConfig(2, 1, True), runtime).sequence_parallel


def test_taps_need_layers_divisible_by_8_or_an_interval():
    model = replace(get_preset("tiny"), **{"language.num_layers": 6})
    with pytest.raises(ConfigError, match="num_layers 6 is not a multiple of 8: set --aligner-tap-interval"):
        check(model)
    check(replace(model, **{"aligner.tap_interval": 2}))
    check(replace(model, **{"aligner.enabled": False}))


def test_image_sizes_must_fit_the_teacher_grid():
    with pytest.raises(ConfigError, match="image_size 700 is not a multiple of teacher_image_size 336"):
        check(replace(get_preset("eve-7b"), **{"vision.image_size": 700}))
    with pytest.raises(ConfigError, match="token grid of 18 that is not a multiple of the teacher grid 36"):
        check(replace(get_preset("eve-7b"), **{"vision.image_size": 504, "vision.teacher_image_size": 504}))


def test_uniform_recompute_must_not_hide_taps():
    model = get_preset("eve-7b")  # taps after layers 4, 8, ... 28
    check(model, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=4)
    with pytest.raises(ConfigError, match="hides the aligner taps after layers"):
        check(model, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=3)


def test_transformer_impl_choice():
    assert resolve_transformer_impl("local") == "local"
    # auto: TE when installed with CUDA, torch's kernels on CUDA without TE, local on CPU.
    assert resolve_transformer_impl("auto") in ("local", "torch", "transformer_engine")
    if not torch.cuda.is_available():
        assert resolve_transformer_impl("auto") == "local"
    with pytest.raises(ConfigError, match="unknown transformer_impl 'fast'"):
        resolve_transformer_impl("fast")


def test_transformer_engine_without_te_or_cuda_is_a_clear_error():
    from megatron_eve.model.specs import transformer_engine_available

    if transformer_engine_available():
        pytest.skip("Transformer Engine and CUDA are present here")
    with pytest.raises(ConfigError, match="needs Transformer Engine's PyTorch extension and a CUDA device"):
        resolve_transformer_impl("transformer_engine")


def test_vocab_padding_follows_megatron():
    assert padded_vocab_size(32000, 128, 1) == 32000
    assert padded_vocab_size(32000, 128, 4) == 32256
    assert padded_vocab_size(1000, 128, 2) == 1024


@pytest.fixture
def gpu_kernels(monkeypatch):
    """Pretend Transformer Engine and every torch attention kernel are usable (validation only)."""
    from megatron_eve.model import attention, specs

    monkeypatch.setattr(specs, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(attention, "available_backends", lambda: ("varlen", "flash", "flex", "sdpa"))
    attention.resolve_backend.cache_clear()
    yield
    attention.resolve_backend.cache_clear()


def test_packed_mask_with_transformer_engine_is_refused(gpu_kernels):
    with pytest.raises(ConfigError, match="TE ignores the mask of a causal layer"):
        check(get_preset("tiny"), transformer_impl="transformer_engine", packed_attention="mask", bf16=True)
    check(get_preset("tiny"), transformer_impl="transformer_engine", packed_attention="thd", bf16=True)
    check(get_preset("tiny"), transformer_impl="torch", packed_attention="mask", bf16=True)


def test_thd_with_the_local_impl_is_refused():
    with pytest.raises(ConfigError, match="--packed-attention thd needs --transformer-impl transformer_engine or torch"):
        check(get_preset("tiny"), transformer_impl="local", packed_attention="thd")
    check(get_preset("tiny"), transformer_impl="torch", packed_attention="thd")


def test_fp32_with_flash_kernels_is_refused_and_auto_falls_back(gpu_kernels):
    from megatron_eve.model.attention import resolve_backend

    for backend in ("varlen", "flash"):
        with pytest.raises(ConfigError, match=f"attention backend '{backend}' takes fp16 / bf16 tensors"):
            check(get_preset("tiny"), transformer_impl="torch", attention_backend=backend)
        check(get_preset("tiny"), transformer_impl="torch", attention_backend=backend, bf16=True)
    check(get_preset("tiny"), transformer_impl="torch", attention_backend="auto")  # fp32: no error
    assert resolve_backend("auto", torch.float32) == "flex"
    assert resolve_backend("auto", torch.bfloat16) == "varlen"
    assert resolve_backend("auto", torch.float16) == "varlen"


def test_attention_backend_needs_the_torch_impl(gpu_kernels):
    with pytest.raises(ConfigError, match="--attention-backend flex only applies to --transformer-impl torch"):
        check(get_preset("tiny"), transformer_impl="transformer_engine", attention_backend="flex", bf16=True)


def test_norm_kernels_need_their_device_package_and_not_transformer_engine(gpu_kernels, monkeypatch):
    import importlib

    validation = importlib.import_module("megatron_eve.config.validate")

    monkeypatch.setattr(validation.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--norm-kernel liger needs a CUDA device"):
        check(get_preset("tiny"), transformer_impl="local", norm_kernel="liger")
    monkeypatch.setattr(validation.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(validation.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="--norm-kernel liger needs the liger-kernel package: pip install liger"):
        check(get_preset("tiny"), transformer_impl="torch", norm_kernel="liger", bf16=True)
    for kernel in ("liger", "compiled"):
        with pytest.raises(ConfigError, match=f"--norm-kernel {kernel} applies to --transformer-impl torch or local"):
            check(get_preset("tiny"), transformer_impl="transformer_engine", norm_kernel=kernel, bf16=True)
    monkeypatch.setattr(validation.importlib.util, "find_spec", lambda name: object())
    check(get_preset("tiny"), transformer_impl="torch", norm_kernel="liger", bf16=True)
    monkeypatch.setattr(validation.torch.cuda, "is_available", lambda: False)
    check(get_preset("tiny"), transformer_impl="local", norm_kernel="compiled")  # inductor compiles for the CPU too


def test_norm_kernels_take_the_spec_and_keep_the_state_dict_keys(monkeypatch):
    from megatron.core.transformer import transformer_block

    from megatron_eve.config.transformer import transformer_config
    from megatron_eve.model.specs import CompiledRMSNorm, LigerRMSNorm, RMSNorm, decoder_block_spec
    from tests.helpers import tiny_config

    monkeypatch.setattr(transformer_block, "get_num_layers_to_build", lambda config, vp_stage=None: 2)
    config = transformer_config(tiny_config(), ParallelConfig(), RuntimeConfig(use_cpu_initialization=True))
    for kernel, norm in (("torch", RMSNorm), ("liger", LigerRMSNorm), ("compiled", CompiledRMSNorm)):
        spec = decoder_block_spec(config, "local", norm_kernel=kernel)
        assert spec.layer_norm is norm
        assert {s.submodules.input_layernorm for s in spec.layer_specs} == {norm}
        assert {s.submodules.pre_mlp_layernorm for s in spec.layer_specs} == {norm}
        assert list(norm(config, 16).state_dict()) == ["weight"]


def test_unavailable_attention_backend_is_refused_before_work():
    if torch.cuda.is_available():
        pytest.skip("CUDA kernels are available here")
    with pytest.raises(ConfigError, match="attention backend 'varlen' is not available here"):
        check(get_preset("tiny"), transformer_impl="torch", attention_backend="varlen", bf16=True)


def test_distributed_timeout_must_be_positive():
    with pytest.raises(ConfigError, match="--distributed-timeout-minutes 0 must be >= 1"):
        validate(get_preset("tiny"), ParallelConfig(distributed_timeout_minutes=0), RuntimeConfig())


def test_transformer_engine_cross_entropy_needs_transformer_engine():
    runtime = RuntimeConfig(transformer_impl="local", cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="te")
    with pytest.raises(ConfigError, match="--cross-entropy-fusion-impl te needs Transformer Engine"):
        validate(get_preset("tiny"), ParallelConfig(), runtime)
    validate(get_preset("tiny"), ParallelConfig(), RuntimeConfig(transformer_impl="local", cross_entropy_loss_fusion=True))


def test_more_ranks_on_a_node_than_gpus_is_one_line_before_the_process_group(monkeypatch):
    """torchrun --nproc-per-node 2 on a one-GPU machine: rank 1 is told why, instead of CUDA's
    "invalid device ordinal" from set_device (and no process group is started)."""
    import torch.distributed as dist

    from megatron_eve import distributed

    monkeypatch.setattr(distributed, "has_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device reached"))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)  # as in a fresh process, whatever ran before
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: pytest.fail("process group started"))
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="local rank 1 has no GPU of its own: this node shows 1 .*--nproc-per-node"):
        distributed.initialize(ParallelConfig())
