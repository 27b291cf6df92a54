"""Single-process model checks on the real megatron-core stack (launched by tests/test_model.py).

Writes one JSON of measured values; the test asserts on them.
  hf_parity:      text-only logits / loss vs transformers' LlamaForCausalLM with the same weights
  align_gradient: the aligner's loss reaches the PEL; the teacher gets no gradient, stays unchanged
  packing:        samples packed in one row (block-diagonal mask) = the same samples padded
  data_pipeline:  preprocessed data, packed, gives the same per-sample losses as unpacked
  inference:      eval mode skips the aligner (no teacher needed) and returns logits
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from megatron_eve import distributed  # noqa: E402
from megatron_eve.checkpoint.llama_layout import hf_llama_to_local  # noqa: E402
from megatron_eve.config import ParallelConfig, RuntimeConfig  # noqa: E402
from megatron_eve.model.build import build_model  # noqa: E402
from megatron_eve.model.eve import eve_loss  # noqa: E402
from megatron_eve.model.size import parameter_counts  # noqa: E402
from tests.helpers import collate, make_sample, micro_batches, tiny_config  # noqa: E402

RUNTIME = RuntimeConfig(use_cpu_initialization=True)


def hf_parity(results):
    """Vocab 1000 (padded to 1024 inside) also exercises the padded-vocab mask."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = tiny_config(changes={"language.vocab_size": 1000, "aligner.enabled": False})
    lm = cfg.language
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.ffn_hidden_size,
        num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_attention_heads,
        num_key_value_heads=lm.num_query_groups, max_position_embeddings=lm.max_position_embeddings,
        rms_norm_eps=lm.norm_epsilon, rope_theta=lm.rotary_base, tie_word_embeddings=False,
        attn_implementation="eager",
    )).eval()
    model = build_model(cfg, ParallelConfig(), RUNTIME).eval()
    missing, unexpected = model.load_state_dict(
        hf_llama_to_local(hf.state_dict(), lm, model.padded_vocab_size), strict=False
    )
    results["hf_missing_keys"] = [k for k in missing if not k.startswith(("vision_", "aligner"))]
    results["hf_unexpected_keys"] = list(unexpected)
    tokens = torch.randint(3, lm.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        ours = model(tokens)
        labels = torch.cat([tokens[:, 1:], torch.full((2, 1), -100)], dim=1)
        lm_loss, _, _ = model(tokens, labels=labels)
        hf_loss = hf(tokens, labels=tokens).loss
    results["hf_logits_shape"] = list(ours.shape)
    results["hf_logits_max_abs_diff"] = float((ours[..., : lm.vocab_size] - ref).abs().max())
    results["hf_logits_scale"] = float(ref.abs().max())
    results["padded_vocab_logit_max"] = float(ours[..., lm.vocab_size:].max())
    results["hf_loss"] = float(hf_loss)
    results["our_loss"] = float(lm_loss.sum() / (labels >= 0).sum())


def align_gradient(results, teacher):
    cfg = tiny_config(teacher)
    model = build_model(cfg, ParallelConfig(), RUNTIME).train()
    batch = micro_batches(cfg)[0]
    teacher_before = {k: v.clone() for k, v in model.teacher.model.state_dict().items()}
    _, align_sum, align_images = model(
        batch["input_ids"], labels=batch["labels"], images=batch["images"],
        image_grid_hw=batch["image_grid_hw"], teacher_images=batch["teacher_images"],
    )
    (align_sum / align_images).backward()  # the aligner's loss alone
    grad_norm = lambda p: 0.0 if p.grad is None else float(p.grad.norm())  # noqa: E731
    results["align_images"] = float(align_images)
    results["align_grad_patch_embedding"] = grad_norm(model.vision_model.patch_embedding.weight)
    results["align_grad_class_embedding"] = grad_norm(model.vision_model.class_embedding)
    results["align_grad_projector"] = grad_norm(model.vision_projection[0].weight)
    results["align_grad_first_layer"] = grad_norm(model.decoder.layers[0].mlp.linear_fc1.weight)
    results["align_grad_output_layer"] = grad_norm(model.output_layer.weight)
    counts = parameter_counts(cfg, model.padded_vocab_size)
    results["parameter_count"] = [sum(p.numel() for p in model.parameters()), counts["total"]]
    teacher_params = list(model.teacher.model.parameters())
    results["teacher_requires_grad"] = any(p.requires_grad for p in teacher_params)
    results["teacher_has_grad"] = any(p.grad is not None for p in teacher_params)
    results["teacher_in_model_parameters"] = any(
        p is q for p in model.parameters() for q in teacher_params
    )
    results["teacher_in_state_dict"] = any(k.startswith("teacher") for k in model.sharded_state_dict())
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    results["teacher_changed"] = any(
        not torch.equal(teacher_before[k], v) for k, v in model.teacher.model.state_dict().items()
    )


def packing(results, teacher):
    """The same samples padded (one row each) and packed (one row, block-diagonal mask)."""
    cfg = tiny_config(teacher)
    model = build_model(cfg, ParallelConfig(), RUNTIME).train()
    specs = [((200, 100), 5, 12), (None, 0, 20), ((90, 180), 3, 9), ((160, 160), 2, 6)]
    samples = [make_sample(cfg, spec, seed=i) for i, spec in enumerate(specs)]
    padded, packed = collate(samples), collate(samples, pack=True, pad_to=None)
    keys = ("images", "image_grid_hw", "teacher_images")
    with torch.no_grad():
        lm_pad, align_pad, n_pad = model(padded["input_ids"], labels=padded["labels"],
                                         **{k: padded[k] for k in keys})
        lm_pack, align_pack, n_pack = model(packed["input_ids"], labels=packed["labels"],
                                            attention_mask=packed["attention_mask"],
                                            **{k: packed[k] for k in keys})
    lengths = [len(s["tokens"]) for s in samples]
    per_sample_packed = torch.split(lm_pack[0, : sum(lengths)], lengths)
    results["packed_per_sample_max_abs_diff"] = max(
        float((lm_pad[i, :n] - per_sample_packed[i]).abs().max()) for i, n in enumerate(lengths)
    )
    results["packed_align_diff"] = float((align_pad - align_pack).abs())
    results["packed_align_images"] = [float(n_pad), float(n_pack)]
    total_pad, _, _ = eve_loss(lm_pad, align_pad, n_pad, padded["labels"], 1.0)
    total_pack, _, _ = eve_loss(lm_pack, align_pack, n_pack, packed["labels"], 1.0)
    results["packed_total_loss"] = [float(total_pad), float(total_pack)]


def high_resolution(results, teacher):
    """HD geometry (PEL image 4x the teacher's): tokens pool 2x2 onto the teacher grid."""
    cfg = tiny_config(teacher, {"vision.image_size": 448})
    model = build_model(cfg, ParallelConfig(), RUNTIME).train()
    batch = collate([make_sample(cfg, spec, seed=i) for i, spec in
                     enumerate([((200, 100), 3, 5), ((112, 112), 2, 4)])])
    with torch.no_grad():
        _, align_sum, align_images = model(batch["input_ids"], labels=batch["labels"], images=batch["images"],
                                           image_grid_hw=batch["image_grid_hw"], teacher_images=batch["teacher_images"])
    results["hd_grid"] = batch["image_grid_hw"].tolist()
    results["hd_align"] = [float(align_sum), float(align_images)]


def input_errors(results, teacher):
    """Batches whose parts disagree are refused with a message naming the disagreement."""
    cfg = tiny_config(teacher)
    model = build_model(cfg, ParallelConfig(), RUNTIME).train()
    batch = micro_batches(cfg)[0]
    cases = {
        "grid_mismatch": dict(images=batch["images"], image_grid_hw=batch["image_grid_hw"].flip(1)),
        "placeholders_without_images": dict(),
        "missing_teacher_images": dict(images=batch["images"], image_grid_hw=batch["image_grid_hw"]),
    }
    for name, kwargs in cases.items():
        try:
            model(batch["input_ids"], labels=batch["labels"], **kwargs)
            results[f"error_{name}"] = None
        except Exception as error:  # noqa: BLE001 - the message is what is checked
            results[f"error_{name}"] = str(error)


def data_pipeline(results, teacher, prefix):
    """Preprocessed data → packed and unpadded micro-batches → the model: per-sample losses of
    the packed row equal those of the same samples one per row."""
    from megatron_eve.config import DataConfig
    from megatron_eve.data.dataset import assemble_sequence, build_datasets
    from megatron_eve.data.indexed import IndexedSamples
    from megatron_eve.data.loader import build_loader, collate, model_inputs

    cfg = tiny_config(teacher)
    model = build_model(cfg, ParallelConfig(), RUNTIME).train()
    config = DataConfig(data_path=[prefix], seq_length=640, split="1,0,0")
    packed = build_datasets(config, seed=3)["train"]
    # A packed sequence with several samples, and those samples one per row.
    index = next(i for i in range(len(packed)) if len(packed.locate(i)[0].sample_indices(packed.locate(i)[1])) >= 3)
    dataset, inner = packed.locate(index)
    samples = IndexedSamples(prefix)
    members = [samples.get(int(i)) for i in dataset.sample_indices(inner)]
    packed_batch = model_inputs(collate([packed[index]]), cfg.vision, "cpu")
    single_batch = model_inputs(collate([assemble_sequence([m], None) for m in members]), cfg.vision, "cpu")
    with torch.no_grad():
        lm_packed, align_packed, n_packed = model(**packed_batch)
        lm_single, align_single, n_single = model(**single_batch)
    segments = collate([packed[index]])["segment_ids"][0]
    per_sample_packed = [float(lm_packed[0][segments == k].sum()) for k in range(len(members))]
    per_sample_single = [float(row.sum()) for row in lm_single]
    results["pipeline_samples_in_sequence"] = len(members)
    results["pipeline_has_mask"] = "attention_mask" in packed_batch
    results["pipeline_per_sample_losses"] = [per_sample_packed, per_sample_single]
    results["pipeline_align"] = [float(align_packed), float(align_single), float(n_packed), float(n_single)]
    # The loader end to end: two micro-batches of two packed rows each.
    loader = build_loader(packed, 2, num_workers=0)
    totals = []
    with torch.no_grad():
        for _, batch in zip(range(2), loader):
            lm, align, images = model(**model_inputs(batch, cfg.vision, "cpu"))
            totals.append(float(eve_loss(lm, align, images, batch["labels"], 1.0)[0]))
    results["pipeline_loader_losses"] = totals


def inference(results):
    """No teacher loaded: eval mode must not need it; logits come back for every position."""
    cfg = tiny_config(None)
    model = build_model(cfg, ParallelConfig(), RUNTIME).eval()
    batch = micro_batches(cfg)[0]
    with torch.no_grad():
        logits = model(batch["input_ids"], images=batch["images"])
        lm_loss, align_sum, align_images = model(
            batch["input_ids"], labels=batch["labels"], images=batch["images"]
        )
    results["inference_logits_shape"] = list(logits.shape)
    results["inference_align"] = [float(align_sum), float(align_images)]
    results["inference_lm_finite"] = bool(torch.isfinite(lm_loss).all())
    model.train()
    try:
        model(batch["input_ids"], labels=batch["labels"], images=batch["images"],
              image_grid_hw=batch["image_grid_hw"], teacher_images=batch["teacher_images"])
        results["train_without_teacher_error"] = None
    except Exception as error:  # noqa: BLE001 - the message is what is checked
        results["train_without_teacher_error"] = str(error)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--data", required=True, help="a preprocessed prefix at the tiny geometry")
    args = parser.parse_args()
    distributed.initialize(ParallelConfig(), seed=1234)
    results = {}
    hf_parity(results)
    align_gradient(results, args.teacher)
    packing(results, args.teacher)
    high_resolution(results, args.teacher)
    input_errors(results, args.teacher)
    data_pipeline(results, args.teacher, args.data)
    torch_attention(results, args.data)
    inference(results)
    Path(args.out).write_text(json.dumps(results, indent=1))
    distributed.destroy()


def torch_attention(results, prefix):
    """transformer_impl "torch": the same weights give the same per-token losses as megatron-core's
    local attention, with packed samples as THD + cu_seqlens and as a block mask."""
    from megatron_eve.config import DataConfig
    from megatron_eve.data.dataset import build_datasets
    from megatron_eve.data.loader import collate, model_inputs

    cfg = tiny_config(None, {"aligner.enabled": False})
    torch.manual_seed(5)
    local = build_model(cfg, ParallelConfig(), RuntimeConfig(use_cpu_initialization=True, transformer_impl="local"))
    fused = build_model(cfg, ParallelConfig(), RuntimeConfig(use_cpu_initialization=True, transformer_impl="torch"))
    fused.load_state_dict(local.state_dict())
    packed = build_datasets(DataConfig(data_path=[prefix], seq_length=640, split="1,0,0"), seed=3)["train"]
    batch = collate([packed[0], packed[1]])
    with torch.no_grad():
        reference = local.eval()(**model_inputs(batch, cfg.vision, "cpu"))[0]
        masked = fused.eval()(**model_inputs(batch, cfg.vision, "cpu"))[0]
        thd_inputs = model_inputs(batch, cfg.vision, "cpu", thd=True)
        thd = fused(**thd_inputs)[0].view_as(reference)
        results["torch_attention_flat_rotary"] = fused.flat_rotary and not local.flat_rotary
        fused.flat_rotary = False  # megatron-core's per-sample THD RoPE, the reference for flat RoPE
        per_sample_rope = fused(**model_inputs(batch, cfg.vision, "cpu", thd=True))[0].view_as(reference)
    results["torch_attention_flat_rope_diff"] = float((thd - per_sample_rope).abs().max())
    results["torch_attention_core"] = type(fused.decoder.layers[0].self_attention.core_attention).__name__
    results["torch_attention_mask_diff"] = float((masked - reference).abs().max())
    results["torch_attention_thd_diff"] = float((thd - reference).abs().max())
    results["torch_attention_thd_rows"] = list(thd_inputs["input_ids"].shape)


if __name__ == "__main__":
    main()
