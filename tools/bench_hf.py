"""The HF baseline of tools/bench_train.py (--baseline hf): the EVE reference's stack, HF EVE
(modeling_eve: LlamaForCausalLM with SDPA) in pure bf16 with torch's fused AdamW, on pad-to-longest
micro-batches of the same samples as ours, in random or length-grouped order."""

import numpy as np
import torch

from tools.bench_profile import peak_memory, timed_steps


def hf_order(samples, batch_size, grouped, rng):
    """Micro-batches of sample indices: random order, or length-grouped as HF Trainer's
    `group_by_length` / LLaVA's `group_by_modality_length` build them (modalities apart, megabatches of
    50 micro-batches sorted by length, longest first, megabatches shuffled)."""
    order = rng.permutation(len(samples))
    if not grouped:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    from megatron_eve.data.packing import group_by_length

    lengths = np.asarray([len(s["tokens"]) for s in samples])
    batches = []
    for with_image in (True, False):
        members = group_by_length([i for i in order if (samples[i]["image"] is not None) == with_image],
                                  lengths, batch_size)
        batches += [members[j : j + batch_size] for j in range(0, len(members), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def hf_micro_batch(members, model_cfg, device, dtype):
    """One padded HF micro-batch, on the device, and its work counted from its own samples."""
    from megatron_eve.data.images import compose_squares
    from megatron_eve.model.visual_layout import IMAGE_TOKEN_INDEX
    from megatron_eve.training.metrics import micro_batch_work

    vision = model_cfg.vision
    ids, label_rows, images, grids, runs = [], [], [], [], []
    for s in members:
        tokens, labels = s["tokens"].tolist(), s["labels"].tolist()
        run = tokens.count(IMAGE_TOKEN_INDEX)
        if s["image"] is not None:  # collapse the run back to one placeholder, as HF EVE takes it
            first = tokens.index(IMAGE_TOKEN_INDEX)
            tokens = tokens[:first + 1] + tokens[first + run:]
            images.append(torch.from_numpy(s["image"]).permute(2, 0, 1))
            grids.append(s["grid"])
        ids.append(tokens)
        label_rows.append(labels)
        runs.append(max(run - 1, 0))
    longest = max(map(len, ids))
    width = longest + max(runs)  # HF EVE pads each row to `longest` before it expands the placeholder
    batch = {
        "ids": torch.tensor([t + [0] * (longest - len(t)) for t in ids], device=device),
        "pixels": compose_squares(images, vision.image_size, vision.patch_size * 2, device, dtype) if images else None,
        "labels": torch.tensor([row + [-100] * (width - len(row)) for row in label_rows], device=device),
    }
    counted = {"sample_lengths": torch.tensor([len(s["tokens"]) for s in members]),
               "image_grid_hw": torch.tensor(grids, dtype=torch.long).view(-1, 2),
               "tokens": torch.empty(len(members), width), "num_samples": len(members)}
    return batch, micro_batch_work(counted, model_cfg, align=False)


def run_hf(args, model_cfg, samples, grouped, untimed_pass=None):
    """The reference's stack: HF EVE in pure bf16 with torch's fused AdamW (no fp32 master weights:
    cheaper per step than ours, which keeps fp32 main parameters and gradients). Its batches are
    built on the device before timing (ours are made inside the timed steps, as the trainer makes
    them); its FLOPs are counted from its own samples. With `untimed_pass` (default: on a GPU, as
    ours gets one there), the timed steps are first run once untimed, from the same first batch."""
    from megatron_eve.checkpoint.hf_config import hf_config
    from megatron_eve.hf.modeling_eve import EVEConfig, EVELlamaForCausalLM
    from megatron_eve.platform import current_device
    from megatron_eve.training.metrics import BatchWork

    device = current_device()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    config = hf_config(model_cfg, dtype)
    config.pop("auto_map")
    config["requires_cliploss"] = False
    config["attn_implementation"] = "sdpa"
    torch.manual_seed(0)
    model = EVELlamaForCausalLM(EVEConfig(**config)).to(device=device, dtype=dtype).train()
    model.gradient_checkpointing_enable() if args.hf_gradient_checkpointing else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=torch.cuda.is_available())
    order = hf_order(samples, args.hf_micro_batch_size, grouped, np.random.default_rng(0))
    batches = [hf_micro_batch([samples[i] for i in members], model_cfg, device, dtype) for members in order]
    cursor = 0

    def train_step():
        nonlocal cursor
        optimizer.zero_grad(set_to_none=True)
        step_work = BatchWork()
        # As many micro-batches as it takes to process the tokens one of our steps processes.
        while step_work.real_tokens < args._ours_tokens_per_step:
            batch, counted = batches[cursor % len(batches)]
            cursor += 1
            if batch["pixels"] is not None:
                embeds, mask = model.embed_with_images(batch["ids"], batch["pixels"])
            else:
                embeds, mask = model.get_input_embeddings()(batch["ids"]), (batch["ids"] != 0).long()
            model(inputs_embeds=embeds, attention_mask=mask, labels=batch["labels"]).loss.backward()
            step_work.add(counted)
        optimizer.step()
        return step_work

    if untimed_pass is None:
        untimed_pass = torch.cuda.is_available()
    if untimed_pass:
        # As ours (tools/bench_train.py): a process meets each padded shape slowly the first time (cuBLAS
        # heuristics, SDPA's kernel choice, the allocator growing), and a few warm-up steps meet only some
        # of the timed window's shapes. Ours is timed after an untimed run as long as its timed one; the
        # baseline too, over the same batches, or the speed-up would be flattered by its first encounters.
        timed_steps(train_step, args.warmup, args.steps)
        cursor = 0
    steps, seconds = timed_steps(train_step, args.warmup, args.steps)
    work = BatchWork()
    for step_work in steps:
        work.add(step_work)
    return work, seconds, peak_memory()
