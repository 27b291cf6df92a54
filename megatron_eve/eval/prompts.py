"""The answer instructions EVE's evaluation appends to a question, each spelt out here and nowhere else.

`answer --prompt-style` picks one: short (VQAv2, GQA, TextVQA, POPE, MME), vizwiz (VizWiz: its own
sentence, then the short one), option (ScienceQA, MMBench, SEED), option-cn (MMBench-CN), none
(MM-Vet, LLaVA-Bench). The question files `questions` writes end with theirs (benchmarks/), and
MME's question lookup takes SHORT_SUFFIX off again (scorers.py).

A question whose text already ends with one of them (LLaVA's and EVE's question files carry
theirs) is asked as it is."""

from __future__ import annotations

SHORT_SUFFIX = "Answer the question using a single word or phrase."
VIZWIZ_SUFFIX = "When the provided information is insufficient, respond with 'Unanswerable'.\n" + SHORT_SUFFIX
OPTION_SUFFIX = "Answer with the option's letter from the given choices directly."
OPTION_SUFFIX_CN = "请直接回答选项字母。"

PROMPT_STYLES = {"short": SHORT_SUFFIX, "vizwiz": VIZWIZ_SUFFIX, "option": OPTION_SUFFIX,
                 "option-cn": OPTION_SUFFIX_CN, "none": ""}

# `answer --max-new-tokens` by prompt style, as LLaVA-1.5's scripts answer those benchmarks: model_vqa_loader.py
# (VQAv2, GQA, TextVQA, POPE, MME, VizWiz, SEED) 128; model_vqa_science.py (ScienceQA), model_vqa_mmbench.py
# (MMBench, -CN) and model_vqa.py (MM-Vet, LLaVA-Bench) 1024. SEED shares "option" with ScienceQA and MMBench:
# greedy, its exact-match score is the same under either (an answer still going after 128 tokens is no letter).
MAX_NEW_TOKENS = {"short": 128, "vizwiz": 128, "option": 1024, "option-cn": 1024, "none": 1024}


def with_suffix(text: str, suffix: str) -> str:
    """The question as asked: `suffix` on its own line, unless the text already ends with one of
    the known instructions (LLaVA's / EVE's question files carry theirs): never two."""
    if not suffix or any(text.rstrip().endswith(known) for known in PROMPT_STYLES.values() if known):
        return text
    return text + "\n" + suffix
