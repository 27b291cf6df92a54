#!/usr/bin/env python3
"""Data-pipeline benchmark on a synthetic stream shaped like LLaVA-mix-665K.

Prints, measured in this run:
  1. packing efficiency (real tokens / capacity) of packed sequences vs pad-to-longest micro-batches
     over the same stream of sample lengths;
  2. preprocessing throughput (images/s per worker) and bytes per stored image, JPEG vs PNG;
  3. loader throughput (samples/s and sequences/s per worker) at 672 px, decoding both views;
or, with --plan-cache, only the packing plan's time at 33 M samples: without a cache, with an empty
one (plan and write), with a filled one (read and check), and the cache's size on disk.

The images are photo-like (smooth colour fields, texture noise, shapes; COCO-sized JPEG sources),
so storage and decode costs resemble real data. Pad-to-longest is reported in random order and
length-grouped (HF's group_by_length). Examples:
  python tools/bench_data.py --images 400 --workers 1
  python tools/bench_data.py --lengths-from data/llava_mix665k   # packing on a real dataset's lengths
  python tools/bench_data.py --plan-cache    # packing-plan time at 33 M samples, without / with the cache
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

SOURCE_SIZES = ((640, 480), (480, 640), (640, 427), (500, 375), (640, 640), (612, 612), (800, 533))


def photo_like(size, rng):
    """A smooth random colour field with texture noise and a few shapes."""
    from PIL import Image, ImageDraw

    width, height = size
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    field += rng.normal(0, 12, field.shape)
    image = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    pen = ImageDraw.Draw(image)
    for _ in range(rng.integers(2, 6)):
        x, y = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(10, min(width, height) // 4))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (pen.ellipse if rng.random() < 0.5 else pen.rectangle)((x - r, y - r, x + r, y + r), fill=colour)
    return image


def llava_like_records(root, count, rng, vocabulary):
    """~85% single-image conversations with 1-4 rounds, lognormal text lengths; 15% text only."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    words = lambda n: " ".join(rng.choice(vocabulary, n))  # noqa: E731
    records = []
    for index in range(count):
        rounds = int(rng.integers(1, 5))
        turns = []
        for r in range(rounds):
            question = words(int(np.clip(rng.lognormal(2.4, 0.6), 3, 80))) + "?"
            answer = words(int(np.clip(rng.lognormal(2.8, 1.0), 1, 400))) + "."
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        record = {"id": str(index), "conversations": turns}
        if rng.random() < 0.85:
            name = f"images/{index:06d}.jpg"
            photo_like(SOURCE_SIZES[int(rng.integers(len(SOURCE_SIZES)))], rng).save(
                os.path.join(root, name), quality=90)
            record["image"] = name
            turns[0]["value"] = "<image>\n" + turns[0]["value"]
        records.append(record)
    path = os.path.join(root, "records.json")
    with open(path, "w") as handle:
        json.dump(records, handle)
    return path


def pad_to_longest(lengths, micro_batch, grouped, rng):
    """Real tokens / positions of pad-to-longest micro-batches in random order, or length-grouped as
    HF Trainer's group_by_length (and LLaVA's SFT) builds them: megabatches of 50 micro-batches,
    each sorted longest first."""
    from megatron_eve.data.packing import group_by_length

    order = rng.permutation(len(lengths))
    if grouped:
        order = group_by_length(order, lengths, micro_batch)
    order = lengths[order]
    batches = [order[i : i + micro_batch] for i in range(0, len(order), micro_batch)]
    return lengths.sum() / sum(len(b) * b.max() for b in batches)


def packing_report(lengths, seq_length, micro_batch, buffer):
    from megatron_eve.data.packing import efficiency, pack

    rng = np.random.default_rng(0)
    t = time.time()
    plan = pack(lengths, seq_length, buffer, rng)
    pack_seconds = time.time() - t
    packed = efficiency(plan, lengths, seq_length)
    fits = lengths[lengths <= seq_length]
    padded = pad_to_longest(fits, micro_batch, False, np.random.default_rng(0))
    grouped = pad_to_longest(fits, micro_batch, True, np.random.default_rng(0))
    return packed, padded, grouped, len(plan), pack_seconds / len(lengths) * 1e6


def print_packing(lengths, what, args):
    packed, padded, grouped, sequences, us = packing_report(lengths, args.seq_length, args.micro_batch_size,
                                                            args.packing_buffer_size)
    print(f"  {len(lengths)} sample lengths {what} (mean {lengths.mean():.0f}, max {lengths.max()} positions)")
    print(f"  packed:          {100 * packed:6.2f}% real tokens in {sequences} sequences "
          f"({us:.2f} us/sample to plan)")
    print(f"  pad-to-longest:  {100 * padded:6.2f}% real tokens")
    print(f"  pad-to-longest, length-grouped: {100 * grouped:6.2f}% real tokens")
    print(f"  compute saved by packing: {100 * (1 - padded / packed):.1f}% of pad-to-longest's positions, "
          f"{100 * (1 - grouped / packed):.1f}% of length-grouped's")


def llava_like_lengths(count, seed=0):
    """Sample lengths mixed like LLaVA-mix-665K (as tests/test_packing.py draws them): lognormal
    text, ~85% of samples with one 672-px image's tokens."""
    rng = np.random.default_rng(seed)
    text = np.clip(rng.lognormal(4.8, 0.9, count).astype(np.int64), 16, 2500)
    return text + np.where(rng.random(count) < 0.85, rng.choice([601, 576, 526, 451, 376, 301], count), 0)


def plan_cache_report(lengths, what, args):
    """One epoch's plan as PackedSequences gets it: planned with no cache, then a first run with an
    empty cache (plan, write), then a later run (read, check); the plans must be identical."""
    from megatron_eve.data.packing import plan_epochs
    from megatron_eve.data.plan_cache import PlanKey, cached_plans, lengths_sha256

    print(f"\n== packing plan of {len(lengths):,} sample lengths {what} (mean {lengths.mean():.0f}), "
          f"seq-length {args.seq_length}, buffer {args.packing_buffer_size}, one epoch")
    root = args.workdir or tempfile.mkdtemp(prefix="bench_plan_cache_")
    directory = os.path.join(root, "plan_cache")
    shutil.rmtree(directory, ignore_errors=True)  # a cold first run, even in a kept --workdir

    def cached():
        key = PlanKey("train", 0, len(lengths), lengths_sha256(lengths), 1234, 0, args.seq_length, True,
                      args.packing_buffer_size)
        return cached_plans(lengths, key, None, directory, "bench.train")

    timed = []
    for label, build in (("no cache", lambda: plan_epochs(lengths, args.seq_length, args.packing_buffer_size,
                                                           (1234, 0), None)),
                         ("first run, cache empty (plan, write)", cached),
                         ("later run, cache filled (read, check)", cached)):
        start = time.time()
        plans = build()
        timed.append((label, time.time() - start, plans))
    reference = timed[0][2]
    for _, _, plans in timed[1:]:
        if not all(np.array_equal(a.order, b.order) and np.array_equal(a.offsets, b.offsets)
                   for a, b in zip(reference, plans)) or len(plans) != len(reference):
            raise SystemExit("the cached plan differs from the planned one")
    for label, seconds, _ in timed:
        print(f"  {label + ':':40s} {seconds:7.2f} s")
    files = os.listdir(directory)
    size = sum(os.path.getsize(os.path.join(directory, name)) for name in files)
    print(f"  cache on disk: {size / 2**20:.1f} MiB in {len(files)} files ({len(reference[0]):,} sequences), "
          f"plans identical with and without it")
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="records in the preprocessed stream")
    parser.add_argument("--length-samples", type=int, default=665_000,
                        help="sample lengths drawn for the packing comparison (LLaVA-mix-665K size)")
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=4, help="pad-to-longest micro-batch (EVE SFT: 4)")
    parser.add_argument("--packing-buffer-size", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=1, help="preprocessing / loader workers")
    parser.add_argument("--loader-batches", type=int, default=0, help="micro-batches to time (0: all)")
    parser.add_argument("--workdir", default=None, help="keep files here (default: a temporary folder)")
    parser.add_argument("--lengths-from", default=None, metavar="PREFIX",
                        help="a preprocessed dataset (PREFIX.idx): compare packing on its real sample lengths, "
                             "all of them, and skip the synthetic stream")
    parser.add_argument("--plan-cache", action="store_true",
                        help="only time the packing plan without / with its cache, on --plan-samples LLaVA-like "
                             "lengths (or all of --lengths-from's)")
    parser.add_argument("--plan-samples", type=int, default=33_000_000, help="sample lengths for --plan-cache")
    args = parser.parse_args()
    lengths = None
    if args.lengths_from:
        from megatron_eve.data.indexed import DatasetFormatError, IndexedSamples

        try:
            lengths = np.asarray(IndexedSamples(args.lengths_from).lengths)
        except (DatasetFormatError, OSError) as error:
            parser.exit(1, f"error: --lengths-from {error}\n")
    if args.plan_cache:
        if lengths is not None:
            plan_cache_report(lengths, f"of {args.lengths_from}", args)
        else:
            plan_cache_report(llava_like_lengths(args.plan_samples), "drawn LLaVA-like", args)
        return
    if lengths is not None:
        print(f"\n== packing into seq-length {args.seq_length} vs pad-to-longest "
              f"(micro-batch {args.micro_batch_size})")
        print_packing(lengths, f"of {args.lengths_from}", args)
        return

    from megatron_eve.config import DataConfig, VisionConfig
    from megatron_eve.data.dataset import build_datasets
    from megatron_eve.data.loader import build_loader
    from megatron_eve.data.preprocess import PreprocessJob, run
    from megatron_eve.data.records import RecordConfig
    from megatron_eve.data.tokenizer import train_tokenizer

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_data_")
    rng = np.random.default_rng(0)
    vocabulary = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), int(rng.integers(2, 9))))
                           for _ in range(3000)])
    t = time.time()
    records = llava_like_records(workdir, args.images, rng, vocabulary)
    tokenizer = train_tokenizer((" ".join(rng.choice(vocabulary, 30)) for _ in range(20000)),
                                os.path.join(workdir, "tokenizer"), 4000)
    print(f"synthetic stream: {args.images} records in {time.time() - t:.1f} s under {workdir}")

    vision = VisionConfig(image_size=672)
    print("\n== preprocessing (tools/preprocess_data.py engine), "
          f"{args.workers} worker{'s' if args.workers > 1 else ''}")
    prefixes = {}
    for codec in ("jpeg", "png"):
        prefix = os.path.join(workdir, f"stream_{codec}")
        summary = run(PreprocessJob(
            inputs=[records], output_prefix=prefix, tokenizer_model=tokenizer,
            record=RecordConfig("vicuna_v1", vision, image_folder=workdir, max_length=args.seq_length,
                                image_codec=codec),
            workers=args.workers, progress=False))
        prefixes[codec] = prefix
        per_image = (summary.image_bytes + summary.teacher_bytes) / max(summary.images, 1)
        print(f"  {codec:4s}: {summary.images / summary.seconds / args.workers:6.1f} images/s per worker, "
              f"{per_image / 1024:6.1f} KiB/image ({summary.image_bytes / max(summary.images, 1) / 1024:.1f} "
              f"PEL view + {summary.teacher_bytes / max(summary.images, 1) / 1024:.1f} teacher view); "
              f"33M images: {per_image * 33e6 / 1e12:.2f} TB")

    print(f"\n== packing into seq-length {args.seq_length} vs pad-to-longest (micro-batch {args.micro_batch_size})")
    from megatron_eve.data.indexed import IndexedSamples

    measured = IndexedSamples(prefixes["jpeg"]).lengths
    draws = np.random.default_rng(1).choice(measured, args.length_samples)
    print_packing(draws, "drawn from the preprocessed stream", args)

    print(f"\n== loader at 672 px (PEL and teacher views decoded), DataLoader with {args.workers} worker(s)")
    for codec, prefix in prefixes.items():
        data = build_datasets(DataConfig(data_path=[prefix], seq_length=args.seq_length, split="1,0,0"),
                              seed=1234)["train"]
        loader = build_loader(data, 1, num_workers=args.workers)
        iterator = iter(loader)
        next(iterator)  # worker start-up is not throughput
        samples = sequences = 0
        start = time.time()
        for batch in iterator:
            samples += int(batch["num_samples"])
            sequences += 1
            if args.loader_batches and sequences >= args.loader_batches:
                break
        seconds = time.time() - start
        print(f"  {codec:4s}: {samples / seconds / args.workers:7.1f} samples/s per worker "
              f"({sequences / seconds / args.workers:.1f} packed sequences/s per worker)")


if __name__ == "__main__":
    main()
