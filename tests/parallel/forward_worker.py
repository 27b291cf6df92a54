"""One process: the tiny EVE model's fp32 outputs on this machine's device (CPU when CUDA is
hidden), on weights created by the first run and loaded by the next (the two may run side by side:
the next one, given --wait-for-weights, waits for the first's marker); launched by
tests/gpu/test_gpu_model.py. Saves eval-mode logits and training-mode losses (LM per token, align)
of padded and packed micro-batches with images, to compare across devices."""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", required=True, help="dist checkpoint: written if absent, else loaded")
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--transformer-impl", default="auto")
    parser.add_argument("--wait-for-weights", action="store_true",
                        help="load the weights another run is writing, once its marker (WEIGHTS.ready) exists")
    args = parser.parse_args()

    import torch
    from megatron.core import dist_checkpointing

    from megatron_eve import distributed
    from megatron_eve.config import ParallelConfig, RuntimeConfig
    from megatron_eve.model.build import build_model
    from megatron_eve.platform import current_device
    from tests.helpers import collate, make_sample, micro_batches, tiny_config

    # Full fp32 on the GPU too: no TF32 in matmuls or the PEL's convolution.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    distributed.initialize(ParallelConfig(), seed=1234)
    cfg = tiny_config(args.teacher)
    model = build_model(cfg, ParallelConfig(), RuntimeConfig(transformer_impl=args.transformer_impl,
                                                             use_cpu_initialization=True))
    weights = Path(args.weights)
    ready = weights.with_name(weights.name + ".ready")
    deadline = time.time() + 240
    while args.wait_for_weights and not ready.exists():
        if time.time() > deadline:
            raise SystemExit(f"no {ready} after 240 s")
        time.sleep(0.2)
    if weights.exists():
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(weights)), strict=True)
    else:
        weights.mkdir(parents=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(weights))
        ready.touch()

    device = current_device()
    batches = micro_batches(cfg)
    samples = [make_sample(cfg, spec, 100 + i) for i, spec in
               enumerate([((200, 100), 5, 12), (None, 3, 20), ((90, 180), 2, 9)])]
    batches.append(collate(samples, pack=True))  # one row, block-diagonal mask
    results = {"logits": [], "lm_loss": [], "align": []}
    for batch in batches:
        inputs = {k: (v.to(device) if k != "image_grid_hw" else v) for k, v in batch.items()}
        with torch.no_grad():
            model.eval()
            text = {k: v for k, v in inputs.items() if k not in ("labels", "teacher_images")}
            results["logits"].append(model(**text).float().cpu())
            model.train()
            lm_loss, align_sum, images = model(**inputs)
        results["lm_loss"].append(lm_loss.float().cpu())
        results["align"].append(torch.stack([align_sum.float(), images.float()]).cpu())
    torch.save(results, args.out)
    distributed.destroy()


if __name__ == "__main__":  # dist-checkpointing's writer spawns processes
    main()
