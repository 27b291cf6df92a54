#!/usr/bin/env python3
"""Make the synthetic shapes corpus of the CPU quick-start: images of coloured shapes, caption
records (plain template) and question-answer records (vicuna_v1), a Llama-style SentencePiece
tokenizer trained on them, and optionally a small random CLIP teacher for the tiny preset.

  python tools/make_synthetic_corpus.py --out runs/quickstart/corpus --captions 3000 --qa 3000
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eve.config import get_preset  # noqa: E402
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--captions", type=int, default=3000, help="caption records")
    parser.add_argument("--qa", type=int, default=3000, help="question-answer records")
    parser.add_argument("--held-out", type=int, default=200, help="question-answer records kept for evaluation")
    parser.add_argument("--text-only-fraction", type=float, default=0.1)
    parser.add_argument("--tokenizer-vocab", type=int, default=1000)
    parser.add_argument("--teacher-preset", default="tiny", help="also write a random teacher for this preset")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    os.makedirs(args.out, exist_ok=True)
    captions = make_corpus(args.out, args.captions, "caption", seed=args.seed + 1)
    qa = make_corpus(args.out, args.qa + args.held_out, "qa", seed=args.seed + 2,
                     text_only_fraction=args.text_only_fraction)
    records = json.load(open(qa))
    with open(os.path.join(args.out, "qa_train.json"), "w") as handle:
        json.dump(records[: args.qa], handle)
    with open(os.path.join(args.out, "qa_heldout.json"), "w") as handle:
        json.dump(records[args.qa :], handle)
    write_heldout_questions(records[args.qa :], args.out)
    texts = list(tokenizer_texts(json.load(open(captions)) + records[: args.qa]))
    train_tokenizer(texts * 2, os.path.join(args.out, "tokenizer"), args.tokenizer_vocab)
    if args.teacher_preset:
        save_random_teacher(os.path.join(args.out, "teacher"), args.teacher_preset, args.seed)
    print(f"corpus in {args.out}: {args.captions} captions, {args.qa} + {args.held_out} held-out Q&A records, "
          f"tokenizer.model ({args.tokenizer_vocab} pieces)" + (", teacher/" if args.teacher_preset else ""))


if __name__ == "__main__":
    main()
