"""The data options: what to read (Megatron-LM's --data-path blend and --split), how to pack it and
how many loader workers read it. The one data config; the loader's per-rank placement (data-parallel
rank, samples consumed) is derived at run time, not an option."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from megatron_eve.config.options import option


@dataclass
class DataConfig:
    data_path: List[str] = option(default_factory=list, required=True,
                                  help="preprocessed prefixes, optionally weighted: A B, or 0.7 A 0.3 B")
    split: str = option("969,30,1", help="train,valid,test weights")  # Megatron's default
    seq_length: int = option(4096, required=True, help="positions per (packed) sequence")
    tokenizer_model: Optional[str] = option(
        None, help="tokenizer.model (or HF folder) the data was made with; checked against the data")
    num_workers: int = option(2, help="DataLoader workers per rank")
    pack: bool = option(True, flag="--no-pack", negate=True,
                        help="one sample per row, padded to the longest (default: packed sequences)")
    packing_buffer_size: int = option(10000, help="samples packed together")
    data_cache_path: Optional[str] = option(
        None, metavar="DIR", help="where packing plans are cached (default: PREFIX.plans/ beside each dataset)")

    @property
    def blend(self) -> List[Tuple[float, str]]:
        """(weight, prefix) pairs; ValueError naming --data-path when malformed."""
        return parse_data_path(self.data_path)


def parse_data_path(values: Sequence[str]) -> List[Tuple[float, str]]:
    """Megatron's --data-path: "A B" (weights by size: NaN here) or "0.7 A 0.3 B"."""
    values = list(values)
    if not values:
        raise ValueError("--data-path needs at least one dataset prefix")
    try:
        float(values[0])
        weighted = True
    except ValueError:
        weighted = False
    if not weighted:
        return [(float("nan"), path) for path in values]
    if len(values) % 2:
        raise ValueError(f"--data-path {' '.join(values)}: weights and prefixes must alternate")
    pairs = []
    for i in range(0, len(values), 2):
        try:
            weight = float(values[i])
        except ValueError:
            weight = float("nan")
        if not math.isfinite(weight) or weight < 0:  # "nan" / "inf" parse as floats: no weight a blend can use
            raise ValueError(f"--data-path {' '.join(values)}: weight {values[i]!r} of {values[i + 1]} is not a "
                             f"number >= 0")
        pairs.append((weight, values[i + 1]))
    total = sum(w for w, _ in pairs)
    if not 0 < total < math.inf:
        raise ValueError(f"--data-path {' '.join(values)}: weights must be >= 0, not all 0, and of a finite sum")
    return pairs
