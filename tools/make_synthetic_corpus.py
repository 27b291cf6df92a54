#!/usr/bin/env python3
"""Make the synthetic shapes corpus of the CPU quick-start: images of coloured shapes, caption
records (plain template) and question-answer records (vicuna_v1), a Llama-style SentencePiece
tokenizer trained on them, and optionally a small random CLIP teacher for the tiny preset.

  python tools/make_synthetic_corpus.py --out runs/quickstart/corpus --captions 3000 --qa 3000

The corpus is built in a staging folder beside --out and put in place whole, replacing an earlier
corpus of this tool; a non-empty folder that is not one is refused without --overwrite.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eve.atomic import check_output_dir, entries, staged_directory  # noqa: E402
from megatron_eve.config import ConfigError, get_preset  # noqa: E402
from megatron_eve.data.synthetic import make_corpus, tokenizer_texts  # noqa: E402
from megatron_eve.data.tokenizer import train_tokenizer  # noqa: E402


def save_random_teacher(path: str, preset: str, seed: int) -> None:
    """A randomly initialised CLIPVisionModel shaped like the preset's teacher (an HF folder)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = get_preset(preset)
    torch.manual_seed(seed)
    width = model.aligner.hidden_size
    CLIPVisionModel(CLIPVisionConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=4, num_attention_heads=4,
        image_size=model.vision.teacher_image_size, patch_size=model.vision.patch_size,
    )).save_pretrained(path)


def write_heldout_questions(records, folder: str) -> None:
    """Each held-out image record's first question as a benchmark: questions in LLaVA's jsonl
    ({"question_id", "image", "text"}) and ground truth ({"question_id", "answers"})."""
    with open(os.path.join(folder, "heldout_questions.jsonl"), "w") as questions, \
            open(os.path.join(folder, "heldout_answers.jsonl"), "w") as answers:
        for record in records:
            if "image" not in record:
                continue
            question, answer = record["conversations"][0]["value"], record["conversations"][1]["value"]
            qid = record["id"]
            questions.write(json.dumps({"question_id": qid, "image": record["image"],
                                        "text": question.replace("<image>", "").strip()}) + "\n")
            answers.write(json.dumps({"question_id": qid, "answers": [answer]}) + "\n")


# Written last into a corpus of this tool: a folder holding it is ours to replace.
MARKER = "synthetic_corpus.json"
OUR_NAMES = {"caption.json", "qa.json", "qa_train.json", "qa_heldout.json", "heldout_questions.jsonl",
             "heldout_answers.jsonl", "images", "tokenizer.model", "tokenizer.vocab", "teacher", MARKER}


def is_our_corpus(folder: str) -> bool:
    """A corpus of this tool: its marker, or (made before the marker) only our names, with the
    files no user folder would hold together."""
    names = entries(folder) or set()
    return MARKER in names or (names <= OUR_NAMES and {"tokenizer.model", "qa_train.json", "qa_heldout.json"} <= names)


def build(args, folder: str) -> int:
    """The whole corpus, written into `folder`, the marker last; returns the tokenizer's pieces."""
    captions = make_corpus(folder, args.captions, "caption", seed=args.seed + 1)
    qa = make_corpus(folder, args.qa + args.held_out, "qa", seed=args.seed + 2,
                     text_only_fraction=args.text_only_fraction)
    records = json.load(open(qa))
    with open(os.path.join(folder, "qa_train.json"), "w") as handle:
        json.dump(records[: args.qa], handle)
    with open(os.path.join(folder, "qa_heldout.json"), "w") as handle:
        json.dump(records[args.qa :], handle)
    write_heldout_questions(records[args.qa :], folder)
    texts = list(tokenizer_texts(json.load(open(captions)) + records[: args.qa]))
    try:
        train_tokenizer(texts * 2, os.path.join(folder, "tokenizer"), args.tokenizer_vocab)
    except RuntimeError as error:  # sentencepiece's message ends with the reason, after its source location
        raise ConfigError(f"--tokenizer-vocab {args.tokenizer_vocab}: no tokenizer can be trained "
                          f"({str(error).split('] ')[-1]})") from None
    if args.teacher_preset:
        save_random_teacher(os.path.join(folder, "teacher"), args.teacher_preset, args.seed)
    with open(os.path.join(folder, MARKER), "w") as handle:
        json.dump({k: v for k, v in vars(args).items() if k not in ("out", "overwrite")}, handle, indent=1)
    import sentencepiece

    # --tokenizer-vocab is a ceiling: a small corpus supports fewer pieces.
    return sentencepiece.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model")).vocab_size()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even if it holds files that are not a corpus of this tool")
    parser.add_argument("--captions", type=int, default=3000, help="caption records")
    parser.add_argument("--qa", type=int, default=3000, help="question-answer records")
    parser.add_argument("--held-out", type=int, default=200, help="question-answer records kept for evaluation")
    parser.add_argument("--text-only-fraction", type=float, default=0.1)
    parser.add_argument("--tokenizer-vocab", type=int, default=1000)
    parser.add_argument("--teacher-preset", default="tiny", help="also write a random teacher for this preset")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for flag, value in (("--captions", args.captions), ("--qa", args.qa), ("--held-out", args.held_out)):
        if value < 0:
            parser.error(f"{flag} must not be negative, got {value}")
    if not 0 <= args.text_only_fraction <= 1:
        parser.error(f"--text-only-fraction must be in [0, 1], got {args.text_only_fraction}")

    try:  # also refuses an --out that is a file
        check_output_dir(args.out, is_our_corpus, args.overwrite, "a corpus of this tool")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        with staged_directory(args.out) as staging:  # swapped in whole once built; removed if the build fails
            pieces = build(args, staging)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"corpus in {args.out}: {args.captions} captions, {args.qa} + {args.held_out} held-out Q&A records, "
          f"tokenizer.model ({pieces} pieces)" + (", teacher/" if args.teacher_preset else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
