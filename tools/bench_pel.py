#!/usr/bin/env python3
"""PEL benchmark: the flat path (all crops in a fixed number of kernels) vs the per-shape path
(one pass per distinct crop shape), on LLaVA-like micro-batches of crops, forward + backward.

Crops are made as the loader makes them (uint8 HWC arrays → normalised [3, H, W] views): random
aspect ratios, the long side image_size px, the short side whole 28-px token cells, so nearly every
image has its own shape. Prints, measured in this run on each device: milliseconds per micro-batch
of each path and their ratio (flat / per-shape), the flat path also given its plan already on the
device (as the loader ships it) instead of building and moving it itself, the host time to build
the flat plan, the two ways of patchifying (one gather vs a reshape per crop), and on CUDA the
kernels launched per step.

  python tools/bench_pel.py                                   # EVE-7B PEL width, CPU and CUDA
  python tools/bench_pel.py --devices cpu --images 8 --hidden 256 --steps 2 --json pel.json
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from megatron_eve.config import VisionConfig, get_preset  # noqa: E402
from megatron_eve.data.images import image_layout, normalise_crops  # noqa: E402
from megatron_eve.model.patch_embedding import FlatPlan, PatchEmbeddingLayer  # noqa: E402


def crop_shapes(count, vision, rng):
    """(height, width) px of LLaVA-like crops: aspect ratios log-uniform in [1/3, 3]."""
    shapes = []
    for _ in range(count):
        ratio = float(np.exp(rng.uniform(np.log(1 / 3), np.log(3))))
        width, height = (1000, max(1, round(1000 / ratio))) if ratio >= 1 else (max(1, round(1000 * ratio)), 1000)
        layout = image_layout(width, height, vision)
        shapes.append((layout.height, layout.width))
    return shapes


def loader_crops(shapes, device, dtype, rng):
    """As the loader supplies them: HWC uint8 arrays viewed as [3, H, W], normalised on `device`."""
    arrays = [torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).permute(2, 0, 1) for h, w in shapes]
    return normalise_crops(arrays, device, dtype)


def timed(fns, device, steps, warmup):
    """{name: median seconds of fn()} over `steps` rounds after `warmup`; the functions take turns
    within a round, so drifting load (a shared host, GPU clocks) hits them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def cuda_kernels(fn):
    """Kernels (and device copies / memsets) one call of fn() launches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(event.count for event in prof.key_averages() if event.device_type.name == "CUDA")


def per_crop_patches(crops, patch, stride):
    """The alternative patchify: one reshape/permute copy per crop into the plan's patch order."""
    rows = []
    for crop in crops:
        height, width = crop.shape[1] // (patch * stride), crop.shape[2] // (patch * stride)
        cells = crop.permute(1, 2, 0).reshape(height, stride, patch, width, stride, patch, 3)
        rows.append(cells.permute(0, 3, 1, 4, 2, 5, 6).reshape(-1, patch * patch * 3))
    return torch.cat(rows)


def gathered_patches(crops, plan, patch):
    """The flat path's patchify: one buffer of all HWC pixels, one gather of pixel-row runs."""
    pixels = torch.cat([crop.permute(1, 2, 0).reshape(-1) for crop in crops]).view(-1, 3 * patch)
    return pixels.index_select(0, plan.pixel_runs().view(-1)).view(-1, patch * patch * 3)


def bench_device(device, args, vision, shapes_per_batch):
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(args.seed)
    pel = PatchEmbeddingLayer(vision).to(device, dtype)
    rng = np.random.default_rng(args.seed)
    batches = [loader_crops(shapes, device, dtype, rng) for shapes in shapes_per_batch]
    p, s = vision.patch_size, vision.conv_stride
    # As the loader ships them: built ahead on the host, on the device before the step.
    plans = [FlatPlan.of(shapes, p, s).to(device) for shapes in shapes_per_batch]

    def step(flat, crops_list, plans_list=None):
        def run():
            for crops, plan in zip(crops_list, plans_list or [None] * len(crops_list)):
                tokens, _ = pel(crops, plan=plan, flat=flat)
                if not args.forward_only:
                    tokens.float().square().mean().backward()
        return run

    grad = torch.no_grad if args.forward_only else torch.enable_grad
    with grad():
        paths = timed({"per_shape": step(False, batches), "flat": step(True, batches),
                       "flat_loader_plan": step(True, batches, plans)}, device, args.steps, args.warmup)
    plan_build = timed({"plan": lambda: [FlatPlan.of(shapes, p, s) for shapes in shapes_per_batch]},
                       torch.device("cpu"), args.steps, 1)
    for crops, plan in zip(batches, plans):
        assert torch.equal(gathered_patches(crops, plan, p), per_crop_patches(crops, p, s))
    patchify = timed({"gather": lambda: [gathered_patches(c, plan, p) for c, plan in zip(batches, plans)],
                      "per_crop": lambda: [per_crop_patches(c, p, s) for c in batches]},
                     device, args.steps, args.warmup)
    ms = lambda seconds: seconds / len(batches) * 1e3  # noqa: E731  per micro-batch
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "per_shape_ms": ms(paths["per_shape"]),
        "flat_ms": ms(paths["flat"]),
        "flat_over_per_shape": paths["flat"] / paths["per_shape"],
        "flat_loader_plan_ms": ms(paths["flat_loader_plan"]),
        "plan_build_ms": ms(plan_build["plan"]),
        "patchify_gather_ms": ms(patchify["gather"]),
        "patchify_per_crop_ms": ms(patchify["per_crop"]),
    }
    if device.type == "cuda":
        with grad():
            result["per_shape_kernels"] = cuda_kernels(step(False, batches[:1]))
            result["flat_kernels"] = cuda_kernels(step(True, batches[:1]))
            result["flat_loader_plan_kernels"] = cuda_kernels(step(True, batches[:1], plans[:1]))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = get_preset("eve-7b").vision
    parser.add_argument("--images", type=int, default=24, help="crops per micro-batch (LLaVA-like: 16-32)")
    parser.add_argument("--batches", type=int, default=2, help="distinct micro-batches per timed step")
    parser.add_argument("--hidden", type=int, default=preset.hidden_size, help="PEL width (eve-7b preset)")
    parser.add_argument("--heads", type=int, default=preset.num_heads, help="PEL heads (eve-7b preset)")
    parser.add_argument("--image-size", type=int, default=preset.image_size, help="long side of a crop, px")
    parser.add_argument("--devices", default="cpu,cuda", help="comma list; cuda is skipped when absent")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--forward-only", action="store_true", help="time the forward pass alone")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    vision = VisionConfig(hidden_size=args.hidden, num_heads=args.heads, image_size=args.image_size,
                          teacher_image_size=args.image_size // 2)
    rng = np.random.default_rng(args.seed)
    shapes_per_batch = [crop_shapes(args.images, vision, rng) for _ in range(args.batches)]
    distinct = statistics.mean(len(set(shapes)) for shapes in shapes_per_batch)
    print(f"PEL width {args.hidden}, {args.heads} heads; {args.images} crops per micro-batch, "
          f"{distinct:.1f} distinct shapes on average; {'forward' if args.forward_only else 'forward + backward'}")
    report = {"config": vars(args), "distinct_shapes": distinct, "results": []}
    for name in args.devices.split(","):
        if name == "cuda" and not torch.cuda.is_available():
            print("cuda: not available, skipped")
            continue
        result = bench_device(torch.device(name), args, vision, shapes_per_batch)
        report["results"].append(result)
        print(f"{result['device']} ({result['dtype']}): per-shape {result['per_shape_ms']:.1f} ms, flat "
              f"{result['flat_ms']:.1f} ms per micro-batch → flat/per-shape {result['flat_over_per_shape']:.2f}; "
              f"flat with the loader's plan {result['flat_loader_plan_ms']:.1f} ms; "
              f"plan build {result['plan_build_ms']:.2f} ms (host); patchify gather "
              f"{result['patchify_gather_ms']:.2f} ms vs per-crop {result['patchify_per_crop_ms']:.2f} ms")
        if "flat_kernels" in result:
            print(f"  CUDA kernels per micro-batch: per-shape {result['per_shape_kernels']}, "
                  f"flat {result['flat_kernels']}, flat with the loader's plan {result['flat_loader_plan_kernels']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
