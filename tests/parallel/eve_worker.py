"""Multi-process worker for layout-parity tests (launched by tests/test_parallel_parity.py).

reference: TP=1, PP=1 — initialise weights, save them (dist-checkpointing), run one step of the
           test micro-batches (--packed: and a packed one), save losses and gradients.
layout:    any TP / PP / SP, or interleaved PP (--vpp chunks per rank) — load those weights, run the
           same step, save losses and gradients.
Gradients are saved as a dist checkpoint of the model's sharded state dict, so they are compared in
one global layout whatever layout produced them.
"""

import argparse
import json
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_eve import distributed  # noqa: E402
from megatron_eve.config import OptimConfig, ParallelConfig, RuntimeConfig  # noqa: E402
from megatron_eve.model.build import build_model_chunks  # noqa: E402
from megatron_eve.training.loop import per_chunk  # noqa: E402
from megatron_eve.training.optim import wrap_model_chunks  # noqa: E402
from megatron_eve.training.step import forward_step  # noqa: E402
from tests.helpers import (  # noqa: E402
    collate, count_calls, fuse_weight_gradients, make_sample, micro_batches, tiny_config)

# A packed row: an image sample, a text-only one and a portrait image, one block-diagonal mask.
PACKED_SPECS = [((200, 100), 5, 12), (None, 3, 9), ((90, 180), 2, 7)]


def run_step(chunks, cfg, batches):
    """One training step's forward and backward through the trainer's own wrapping and iterators."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ddp = wrap_model_chunks(chunks, SimpleNamespace(runtime=RuntimeConfig(), optim=OptimConfig()))
    for chunk in ddp:
        chunk.train()
        chunk.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=partial(forward_step, cfg.aligner.loss_weight),
        data_iterator=per_chunk(iter(batches), len(ddp)),
        model=ddp,
        num_microbatches=len(batches),
        seq_length=batches[0]["input_ids"].shape[1],
        micro_batch_size=batches[0]["input_ids"].shape[0],
        forward_only=False,
    )
    return ddp, losses


def check_replicated_grads_agree(model):
    """Parameters replicated across TP ranks must get identical gradients on every rank."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return
    for name, param in model.named_parameters():
        if getattr(param, "tensor_model_parallel", False) or not param.requires_grad:
            continue
        grad = param.main_grad.clone()
        gathered = [torch.empty_like(grad) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, grad, group=group)
        for other in gathered[1:]:
            assert torch.allclose(gathered[0], other, rtol=1e-5, atol=1e-7), (
                f"replicated parameter {name} has different gradients on TP ranks"
            )


def save_gradients(ddp, directory):
    """Each chunk's gradients under its own entry (their dict keys count layers from 0 per chunk;
    the sharded keys inside are global, which is what the comparison reads)."""
    from megatron.core import dist_checkpointing

    for chunk in ddp:
        for param in chunk.module.parameters():
            if param.requires_grad:
                param.data.copy_(param.main_grad)
    Path(directory).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save({f"chunk{i}": c.module.sharded_state_dict() for i, c in enumerate(ddp)}, str(directory))


def compare_gradients(reference_dir, directory):
    """Per gradient tensor (whole, global): max |difference| / max |reference|, and max |reference|."""
    from megatron.core import dist_checkpointing

    reference = dist_checkpointing.load_plain_tensors(str(reference_dir))
    other = dist_checkpointing.load_plain_tensors(str(directory))
    if set(reference) != set(other):
        return {"key mismatch": sorted(set(reference) ^ set(other))}
    differences = {}
    for key, ref in reference.items():
        if torch.is_tensor(ref):
            scale = ref.abs().max()
            relative = (ref - other[key]).abs().max() / scale.clamp(min=1e-30)
            differences[key] = {"relative": float(relative), "reference_max": float(scale)}
    return differences


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["reference", "layout"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--vpp", type=int, default=None, help="model chunks per pipeline rank (interleaved 1F1B)")
    parser.add_argument("--packed", action="store_true", help="a fourth micro-batch: three samples packed in one row")
    parser.add_argument("--grad-accumulation-fusion", action="store_true",
                        help="megatron-core's linears accumulate weight gradients into the main grads with "
                             "megatron_eve's torch kernel (on by default on CUDA only), the token embedding "
                             "its rows; counts their calls")
    parser.add_argument("--torch-cross-entropy", action="store_true",
                        help="the LM loss of megatron_eve.model.lm_loss (--cross-entropy-fusion-impl torch) against "
                             "the reference's megatron-core loss; counts its calls")
    args = parser.parse_args()

    from megatron.core import dist_checkpointing, parallel_state

    # Vocab 1000 pads to 1024 at TP=1 and TP=2: the padded-vocab mask runs on a TP shard too.
    cfg = tiny_config(args.teacher, {"language.vocab_size": 1000})
    per_stage = cfg.language.num_layers // (args.pp * args.vpp) if args.vpp else None
    parallel = ParallelConfig(args.tp, args.pp, args.sp, num_layers_per_virtual_pipeline_stage=per_stage)
    distributed.initialize(parallel, seed=1234, virtual_pipeline_size=args.vpp)
    fused_calls = None
    if args.grad_accumulation_fusion:
        from megatron_eve.model import token_embedding

        fused_calls = fuse_weight_gradients()
        # Each call, and how often its most repeated row is looked up (CUDA sums a row's repeats serially).
        row_repeats, add_rows = [], token_embedding.add_rows_to_main_grad
        token_embedding.add_rows_to_main_grad = lambda main_grad, ids, grad: (
            row_repeats.append(int(ids.reshape(-1).bincount().max())), add_rows(main_grad, ids, grad))[1]
    if args.torch_cross_entropy:
        from megatron_eve.model import eve

        loss_calls = count_calls(eve, "vocab_parallel_lm_loss")
    runtime = RuntimeConfig(use_cpu_initialization=True, cross_entropy_loss_fusion=args.torch_cross_entropy,
                            cross_entropy_fusion_impl="torch")
    chunks = build_model_chunks(cfg, parallel, runtime)
    out = Path(args.out)
    if args.mode == "reference":
        (out / "weights").mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(chunks[0].sharded_state_dict(), str(out / "weights"))
    else:
        reference = out.parent / ("reference_packed" if args.packed else "reference")
        # One load for all chunks: dist-checkpointing checks the access pattern across ranks per call.
        state = dist_checkpointing.load({i: c.sharded_state_dict() for i, c in enumerate(chunks)},
                                        str(reference / "weights"))
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(state[i], strict=True)

    batches = micro_batches(cfg)
    if args.packed:
        samples = [make_sample(cfg, spec, 100 + i) for i, spec in enumerate(PACKED_SPECS)]
        batches.append(collate(samples, pack=True, pad_to=-(-sum(len(s["tokens"]) for s in samples) // 8) * 8))
    ddp, losses = run_step(chunks, cfg, batches)
    if fused_calls is not None:
        # Every megatron-core linear of this rank (4 per layer, the output layer), per micro-batch.
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        linears = sum(1 for chunk in chunks for module in chunk.modules()
                      if isinstance(module, (ColumnParallelLinear, RowParallelLinear))
                      and module.gradient_accumulation_fusion)
        assert linears and len(fused_calls) == linears * len(batches), (len(fused_calls), linears, len(batches))
        # The token embedding's rows go into its main grad too, once per micro-batch on the first stage.
        first_stage = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        assert len(row_repeats) == (len(batches) if first_stage else 0), (len(row_repeats), len(batches))
        # Image positions (and, on a TP shard, other shards' ids) look up rows of their own: no row is
        # repeated more often than the batch's most repeated token (the padding id) makes it.
        most_repeated = [int(b["input_ids"][b["input_ids"] >= 0].bincount().max()) for b in batches]
        assert all(r <= m for r, m in zip(row_repeats, most_repeated)), (row_repeats, most_repeated)
    if args.torch_cross_entropy and parallel_state.is_pipeline_last_stage():
        assert len(loss_calls) == len(batches), len(loss_calls)
    for chunk in ddp:
        check_replicated_grads_agree(chunk.module)
    save_gradients(ddp, out / "grads")
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        (out / "losses.json").write_text(json.dumps(
            [{k: float(v) for k, v in step.items()} for step in losses]
        ))
    if args.mode == "layout":
        differences = compare_gradients(reference / "grads", out / "grads")
        if dist.get_rank() == 0:
            (out / "grad_differences.json").write_text(json.dumps(differences, indent=1))
    distributed.destroy()


if __name__ == "__main__":  # required: dist-checkpointing's writer spawns processes
    main()
