#!/usr/bin/env python3
"""Preprocess LLaVA-format image-text data into megatron_eve indexed datasets.

Input: a JSON list or JSON Lines of records {"id", "image" (optional, relative to --image-folder),
"conversations": [{"from": "human"|"gpt", "value": "...<image>..."}]}.
Output: PREFIX.bin / PREFIX.idx (megatron-core IndexedDataset, multimodal), PREFIX.meta.json
(template, geometry, tokenizer checksum, counts) and PREFIX.rejects.jsonl (skipped records with
their reason). Files appear only when complete. A run in which no record yields a sample writes no
dataset (one at PREFIX stays) and exits 1 naming where its rejects are listed. Files at PREFIX that
are not a complete dataset of this tool are replaced only with --overwrite. A run holds PREFIX.lock
while it writes: a second run on the same PREFIX is refused.

Examples:
  # captions for prealign / pretrain
  python tools/preprocess_data.py --input cap.json --image-folder imgs --template plain \\
      --tokenizer-model vicuna-7b-v1.5 --image-size 672 --output-prefix data/cap --workers 16
  # SFT, in 8 resumable partitions merged at the end
  python tools/preprocess_data.py --input llava_v1_5_mix665k.json --image-folder playground \\
      --template vicuna_v1 --tokenizer-model vicuna-7b-v1.5 --output-prefix data/sft \\
      --workers 16 --partitions 8
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eve.atomic import os_error_line  # noqa: E402
from megatron_eve.config import (  # noqa: E402
    ConfigError,
    EVEModelConfig,
    ParallelConfig,
    RuntimeConfig,
    VisionConfig,
    validate,
)
from megatron_eve.data.prefix_swap import BusyError  # noqa: E402
from megatron_eve.data.preprocess import OutputError, PreprocessJob, WorkerPoolError, run  # noqa: E402
from megatron_eve.data.records import RecordConfig  # noqa: E402
from megatron_eve.data.sources import InputError  # noqa: E402
from megatron_eve.data.templates import TEMPLATES  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input / output")
    io.add_argument("--input", action="append", required=True,
                    help="JSON list or JSON Lines file; repeat for several (processed in order)")
    io.add_argument("--image-folder", default="", help="root that record 'image' paths are relative to")
    io.add_argument("--allow-images-outside-folder", action="store_true",
                    help="accept absolute image paths and paths with '..' that leave --image-folder")
    io.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, .idx, .meta.json, .rejects.jsonl")
    io.add_argument("--overwrite", action="store_true",
                    help="replace files at PREFIX that are not a complete dataset of this tool (another "
                         "tool's, or an interrupted run's); without it they are refused")
    text = p.add_argument_group("text")
    text.add_argument("--tokenizer-model", required=True,
                      help="Llama SentencePiece tokenizer.model, or an HF folder holding one")
    text.add_argument("--template", choices=TEMPLATES, required=True,
                      help="plain: captions (prealign, pretrain); vicuna_v1: conversations (SFT)")
    text.add_argument("--max-length", type=int, default=4096,
                      help="longest sample in model positions: text + 1 + h(w+1) per image (default 4096)")
    text.add_argument("--over-length", choices=("drop", "truncate"), default="drop",
                      help="a longer sample is dropped, or truncated (never inside an image) (default drop)")
    img = p.add_argument_group("images")
    img.add_argument("--image-size", type=int, default=672,
                     help="the PEL's square: 672 (EVE-7B), 1344 (EVE-7B-HD), 224 (the tiny preset)")
    img.add_argument("--teacher-image-size", type=int, default=336, help="CLIP teacher view (default 336)")
    img.add_argument("--max-images", type=int, default=1, help="images per sample (EVE: 1)")
    img.add_argument("--image-codec", choices=("jpeg", "png"), default="jpeg",
                     help="storage of the resized crops: jpeg (compact) or png (lossless) (default jpeg)")
    img.add_argument("--jpeg-quality", type=int, default=95)
    run_group = p.add_argument_group("run")
    run_group.add_argument("--workers", type=int, default=1, help="worker processes")
    run_group.add_argument("--partitions", type=int, default=1,
                           help="split the input into N contiguous parts, each written on its own "
                                "(an interrupted run resumes at the first unfinished part), then merged")
    run_group.add_argument("--partition-index", type=int, default=None,
                           help="with --partitions: process only this part (e.g. one per machine); "
                                "merge by rerunning without it")
    run_group.add_argument("--keep-parts", action="store_true",
                           help="with --partitions: keep the parts' datasets after the merge (by default "
                                "removed once the merged dataset is complete: they are a second copy)")
    run_group.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def flag_problem(args) -> str:
    """The first flag with a value outside its range, as an error line ("" if none)."""
    for flag, value in (("--max-length", args.max_length), ("--max-images", args.max_images),
                        ("--workers", args.workers), ("--partitions", args.partitions)):
        if value < 1:
            return f"{flag} must be at least 1, got {value}"
    if not 1 <= args.jpeg_quality <= 100:
        return f"--jpeg-quality must be 1..100, got {args.jpeg_quality}"
    if args.partition_index is not None and not 0 <= args.partition_index < args.partitions:
        return f"--partition-index {args.partition_index} is outside 0..{args.partitions - 1}"
    # A typo here would reject every record with an image and keep the text-only ones as the dataset.
    if args.image_folder and not os.path.isdir(args.image_folder):
        return f"--image-folder {args.image_folder} is not a folder"
    return ""


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = flag_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    vision = VisionConfig(image_size=args.image_size, teacher_image_size=args.teacher_image_size)
    try:
        validate(EVEModelConfig(vision=vision), ParallelConfig(), RuntimeConfig())
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    job = PreprocessJob(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer_model=args.tokenizer_model,
        record=RecordConfig(
            template=args.template, vision=vision, image_folder=args.image_folder,
            allow_images_outside_folder=args.allow_images_outside_folder,
            max_length=args.max_length, over_length=args.over_length, max_images=args.max_images,
            image_codec=args.image_codec, jpeg_quality=args.jpeg_quality,
        ),
        workers=args.workers,
        partitions=args.partitions,
        partition_index=args.partition_index,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        keep_parts=args.keep_parts,
    )
    try:
        summary = run(job)
    except (InputError, OutputError, WorkerPoolError, BusyError) as error:  # NoSampleError too: nothing written
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the writers have removed their temporary files on the way out
        kept = " (its finished partitions are kept for a rerun)" if args.partitions > 1 else ""
        print(f"error: interrupted; {args.output_prefix} left as it was{kept}", file=sys.stderr)
        return 130
    except OSError as error:  # a file that cannot be read or written (full disk, permissions): named
        print(f"error: {os_error_line(error, args.output_prefix)}", file=sys.stderr)
        return 1
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
