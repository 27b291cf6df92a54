"""The answer instructions EVE's evaluation scripts add to a question (`answer --prompt-style`):

  short: "Answer the question using a single word or phrase." (VQAv2, GQA, TextVQA, POPE, MME);
  vizwiz: "When the provided information is insufficient, respond with 'Unanswerable'." and the short one;
  option: "Answer with the option's letter from the given choices directly." (ScienceQA, MMBench, SEED);
  option-cn: MMBench-CN's; none: MM-Vet, LLaVA-Bench.

A question whose text already ends with one of them (LLaVA's and EVE's question files carry
theirs) is asked as it is."""

from __future__ import annotations

from megatron_eve.eval.benchmarks import OPTION_SUFFIX, OPTION_SUFFIX_CN
from megatron_eve.eval.scorers import SHORT_SUFFIX

VIZWIZ_SUFFIX = "When the provided information is insufficient, respond with 'Unanswerable'.\n" + SHORT_SUFFIX

PROMPT_STYLES = {"short": SHORT_SUFFIX, "vizwiz": VIZWIZ_SUFFIX, "option": OPTION_SUFFIX,
                 "option-cn": OPTION_SUFFIX_CN, "none": ""}


def with_suffix(text: str, suffix: str) -> str:
    """The question as asked: `suffix` on its own line, unless the text already ends with one of
    the known instructions (LLaVA's / EVE's question files carry theirs): never two."""
    if not suffix or any(text.rstrip().endswith(known) for known in PROMPT_STYLES.values() if known):
        return text
    return text + "\n" + suffix
