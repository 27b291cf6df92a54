#!/usr/bin/env python3
"""Print an EVE preset's geometry and parameter counts, e.g. `python tools/model_info.py eve-7b`."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eve.config import PRESETS, get_preset, padded_vocab_size  # noqa: E402
from megatron_eve.data.images import num_visual_tokens  # noqa: E402
from megatron_eve.model.size import parameter_counts  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    args = parser.parse_args()
    model = get_preset(args.preset)
    lm, vision = model.language, model.vision
    vocab = padded_vocab_size(lm.vocab_size, lm.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
    print(f"preset {model.name}: {lm.num_layers} layers, hidden {lm.hidden_size}, FFN {lm.ffn_hidden_size}, "
          f"{lm.num_attention_heads} heads ({lm.num_query_groups} KV groups), vocab {lm.vocab_size} "
          f"(padded {vocab} at TP={args.tensor_model_parallel_size})")
    side = vision.image_size
    print(f"images: {side} px square canvas, teacher {vision.teacher_image_size} px; visual tokens: "
          f"square {num_visual_tokens(side, side, vision)}, 2:1 landscape "
          f"{num_visual_tokens(2 * side, side, vision)}, 1:2 portrait {num_visual_tokens(side, 2 * side, vision)}")
    if model.aligner.enabled:
        print(f"aligner taps (hidden-state indices): {model.aligner.taps(lm.num_layers)}")
    for name, count in parameter_counts(model, vocab).items():
        print(f"  {name:16s} {count:>15,d}  ({count / 1e6:,.1f} M)")


if __name__ == "__main__":
    main()
