"""EVEModel on the real megatron-core stack (one process, gloo): HF parity, aligner gradients,
packing, inference. The checks run once in tests/parallel/model_checks_worker.py."""

import pytest

from tests.helpers import read_json, torchrun


@pytest.fixture(scope="module")
def checks(tmp_path_factory, teacher_path, corpus):
    from megatron_eve.data.preprocess import PreprocessJob, run
    from megatron_eve.data.records import RecordConfig
    from tests.helpers import tiny_config

    root = tmp_path_factory.mktemp("model_checks")
    run(PreprocessJob(inputs=[corpus["qa"]], output_prefix=str(root / "qa"), tokenizer_model=corpus["tokenizer"],
                      record=RecordConfig("vicuna_v1", tiny_config().vision, image_folder=corpus["root"]),
                      progress=False))
    torchrun("model_checks_worker.py", 1, ["--out", root / "checks.json", "--teacher", teacher_path,
                                           "--data", root / "qa"])
    return read_json(root / "checks.json")


def test_text_logits_equal_llama_for_causal_lm(checks):
    """fp32, tiny config, same weights: |Δlogit| ≤ 1e-5 (measured ~5e-7 on logits of scale ~1)."""
    assert checks["hf_missing_keys"] == [] and checks["hf_unexpected_keys"] == []
    assert checks["hf_logits_max_abs_diff"] <= 1e-5
    assert checks["hf_logits_scale"] > 0.1  # a real comparison, not of zeros
    assert abs(checks["hf_loss"] - checks["our_loss"]) <= 1e-5


def test_parameter_count_formula_matches_the_built_model(checks):
    built, formula = checks["parameter_count"]
    assert built == formula


def test_padded_vocab_rows_never_win(checks):
    assert checks["hf_logits_shape"] == [2, 40, 1024]  # 1000 padded to a multiple of 128
    assert checks["padded_vocab_logit_max"] < -1e30


def test_aligner_gradient_reaches_the_pel(checks):
    assert checks["align_images"] == 2.0
    for name in ("patch_embedding", "class_embedding", "projector", "first_layer"):
        assert checks[f"align_grad_{name}"] > 0, name
    assert checks["align_grad_output_layer"] == 0.0  # the LM head is not on the aligner's path


def test_teacher_is_frozen_and_not_saved(checks):
    assert not checks["teacher_requires_grad"]
    assert not checks["teacher_has_grad"]
    assert not checks["teacher_in_model_parameters"]
    assert not checks["teacher_in_state_dict"]
    assert not checks["teacher_changed"]


def test_packed_samples_equal_padded_samples(checks):
    """Per-token LM losses of each sample agree within 1e-5 (measured ~5e-7); align loss too."""
    assert checks["packed_per_sample_max_abs_diff"] <= 1e-5
    assert checks["packed_align_diff"] <= 1e-5
    assert checks["packed_align_images"] == [3.0, 3.0]
    padded, packed = checks["packed_total_loss"]
    assert abs(padded - packed) <= 1e-5


def test_inference_skips_the_aligner(checks):
    assert checks["inference_logits_shape"] == [3, 56, 1024]
    assert checks["inference_align"] == [0.0, 0.0]
    assert checks["inference_lm_finite"]
    assert "no vision teacher is loaded" in checks["train_without_teacher_error"]


def test_high_resolution_pools_onto_the_teacher_grid(checks):
    # 448-px PEL over a 112-px teacher: token grids twice the teacher's 8x8, pooled 2x2.
    assert checks["hd_grid"] == [[8, 16], [16, 16]]
    align_sum, images = checks["hd_align"]
    assert images == 2.0 and 0.0 < align_sum < 4.0


def test_inconsistent_batches_are_refused(checks):
    assert "differ from the batch's image_grid_hw" in checks["error_grid_mismatch"]
    assert "image-token positions but no images" in checks["error_placeholders_without_images"]
    assert "needs teacher_images on the last stage" in checks["error_missing_teacher_images"]


def test_data_pipeline_packing_preserves_per_sample_losses(checks):
    """Through preprocessing, the packed dataset, collation and the block-diagonal mask: each
    sample's summed LM loss equals its loss alone (tolerance 1e-4 on sums of ~100 tokens)."""
    assert checks["pipeline_samples_in_sequence"] >= 3 and checks["pipeline_has_mask"]
    packed, single = checks["pipeline_per_sample_losses"]
    assert len(packed) == len(single)
    for a, b in zip(packed, single):
        assert a > 0 and abs(a - b) <= 1e-4 * max(1.0, abs(b))
    align_packed, align_single, n_packed, n_single = checks["pipeline_align"]
    assert n_packed == n_single and abs(align_packed - align_single) <= 1e-5


def test_loader_feeds_the_model(checks):
    losses = checks["pipeline_loader_losses"]
    assert len(losses) == 2 and all(5.0 < loss < 10.0 for loss in losses)


def test_torch_attention_kernels_match_local_attention(checks):
    """SDPA on [s, b] with the block mask, and the THD path (cu_seqlens; its CPU fallback), give
    the local spec's per-token losses for the same weights (fp32, measured ~1e-6)."""
    assert checks["torch_attention_core"].startswith("TorchAttention")
    assert checks["torch_attention_mask_diff"] <= 1e-4
    assert checks["torch_attention_thd_diff"] <= 1e-4
    # RoPE over the packed row's flat positions (torch impl) = megatron-core's per-sample THD RoPE.
    assert checks["torch_attention_flat_rotary"] and checks["torch_attention_flat_rope_diff"] <= 1e-5
    assert checks["torch_attention_thd_rows"][0] == 1  # two packed rows flattened into one THD row
