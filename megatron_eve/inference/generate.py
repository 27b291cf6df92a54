"""Text generation with the megatron EVE model: a KV cache (megatron-core's static inference
context), greedy or temperature / top-k / top-p sampling (transformers' generate() warpers, in its
order), stop at </s> or where the model's positions end, any TP / PP.

Prompts of a batch are left-padded; an explicit mask hides the padding from every query, and since
RoPE scores depend only on relative positions, a padded row gives the same tokens as alone.
Every stage runs the same loop; the last pipeline stage picks the tokens and broadcasts them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist

from megatron_eve.config import VisionConfig
from megatron_eve.data.images import preprocess_image, token_grid, tokens_per_image
from megatron_eve.data.templates import VICUNA_SYSTEM, tokenize_with_images
from megatron_eve.data.tokenizer import Tokenizer
from megatron_eve.model.visual_layout import IMAGE_TOKEN_INDEX
from megatron_eve.platform import current_device


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    eos_id: int = 2
    seed: int = 0
    # 0: off. transformers' generate() keeps the 50 most likely tokens unless told otherwise (its
    # GenerationConfig default), so EVE's own sampling (generate(do_sample=True, temperature, top_p)) does.
    top_k: int = 50


class SamplingError(ValueError):
    """A sampling value out of range; the message names it as the caller asked for it."""


FLAG_NAMES = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p",
              "top_k": "--top-k"}


def checked_sampling(max_new_tokens: int, temperature: float, top_p: float, seed: int = 0,
                     limit: Optional[int] = None, names=FLAG_NAMES, top_k: int = 50) -> Sampling:
    """The one range check of generate.py, eval_vqa.py and the demo (names: the flags, or the demo's
    fields). Out of range, sampling fails late (top_p 0 keeps no token: torch.multinomial's error) or
    not at all (a negative temperature inverts the distribution): refused here with SamplingError."""
    if not (1 <= max_new_tokens and (limit is None or max_new_tokens <= limit)):
        bounds = "1 or more" if limit is None else f"between 1 and {limit}"
        raise SamplingError(f"{names['max_new_tokens']} must be {bounds}, not {max_new_tokens}")
    if not math.isfinite(temperature):
        raise SamplingError(f"{names['temperature']} must be a finite number, not {temperature}")
    if temperature < 0:
        raise SamplingError(f"{names['temperature']} must be 0 (greedy) or more, not {temperature}")
    if not 0 < top_p <= 1:
        raise SamplingError(f"{names['top_p']} must be in (0, 1], not {top_p}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise SamplingError(f"{names.get('top_k', 'top_k')} must be 0 (off) or more, not {top_k}")
    return Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, top_k=top_k)


def new_token_budget(positions: int, max_new_tokens: int, max_length: Optional[int]) -> int:
    """The new tokens a prompt of `positions` may have: max_new_tokens, cut to the model's positions
    left (as LLaVA / EVE's demo worker caps them; their scripts let generate() run on). The one
    length rule of every backend: a prompt must leave a position to answer in, else PromptError."""
    if max_length is not None and positions >= max_length:
        raise PromptError(f"the prompt takes {positions} positions; the model allows {max_length}")
    return max_new_tokens if max_length is None else min(max_new_tokens, max_length - positions)


def check_placeholders(ids: List[int], images) -> None:
    """One "<image>" placeholder per image, else PromptError."""
    if ids.count(IMAGE_TOKEN_INDEX) != len(images):
        raise PromptError(f"the prompt has {ids.count(IMAGE_TOKEN_INDEX)} <image> placeholders for "
                          f"{len(images)} images")


# Below float32's smallest normal number a temperature rounds to 0 (0 / 0 = nan) or loses its precision.
# Far above it the distribution is already the argmax's: a token 1e-30 below the best gets e^-8e7 = 0.
MIN_TEMPERATURE = torch.finfo(torch.float32).tiny


def below_row_max(scores: torch.Tensor) -> torch.Tensor:
    """Float32 scores less each row's largest. Softmax, top-k and top-p are shift-invariant (the
    same distribution), and divided by any positive temperature they stay <= 0: no +inf (whose
    softmax is nan) however small it is; transformers' plain logits / temperature overflows (logits
    of ~30: below ~1e-37)."""
    scores = scores.float()
    return scores - scores.amax(dim=-1, keepdim=True)


def sampling_distribution(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The probabilities [b, V] a sampled token is drawn from: transformers' generate() warpers in
    its order, as they compute them (ties at a boundary fall alike): temperature, then top-k
    (TopKLogitsWarper: every token as likely as the k-th is kept), then top-p (TopPLogitsWarper:
    the least likely tokens whose mass is at most 1 - top_p dropped, the most likely always kept).
    The temperature divides below_row_max's scores: safe for any positive finite one."""
    scores = below_row_max(logits) / max(sampling.temperature, MIN_TEMPERATURE)
    if sampling.top_k > 0:
        kth = torch.topk(scores, min(sampling.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if sampling.top_p < 1.0:
        ascending, order = torch.sort(scores, descending=False)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - sampling.top_p
        drop[..., -1:] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
    return torch.softmax(scores, dim=-1)


@dataclass
class Prompt:
    tokens: List[int]  # IMAGE_TOKEN_INDEX expanded to each image's run
    images: List[torch.Tensor] = field(default_factory=list)  # [4, S, S] each


class PromptError(ValueError):
    """A prompt that cannot be answered (bad image, too long); the message says why."""


def chat_prompt(question: str, with_image: bool) -> str:
    """The vicuna_v1 prompt EVE was fine-tuned with, ending where the assistant speaks."""
    text = ("<image>\n" + question) if with_image else question
    return f"{VICUNA_SYSTEM} USER: {text} ASSISTANT:"


def build_prompt(text: str, images, tokenizer: Tokenizer, vision: VisionConfig, max_length: int) -> Prompt:
    """Text with one "<image>" per PIL image → a Prompt with expanded image runs."""
    ids = tokenize_with_images(text, tokenizer)
    check_placeholders(ids, images)
    tokens, pixels, image = [], [], 0
    for token in ids:
        if token == IMAGE_TOKEN_INDEX:
            width, height = images[image].size
            tokens += [IMAGE_TOKEN_INDEX] * tokens_per_image(*token_grid(width, height, vision))
            pixels.append(preprocess_image(images[image], vision)[0])
            image += 1
        else:
            tokens.append(token)
    new_token_budget(len(tokens), 1, max_length)  # refused here when it leaves no position to answer in
    return Prompt(tokens, pixels)


def _stage_flags():
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()


class Generator:
    """Generates with one model stage per rank (build it with parallel_output=False)."""

    def __init__(self, model, use_cache: bool = True, vocab_size: Optional[int] = None,
                 max_length: Optional[int] = None):
        """vocab_size: the tokenizer's; ids beyond it (vocabulary padding) are never produced.
        max_length: the model's positions; a row stops where they end (None: after max_new_tokens)."""
        self.model = model.eval()
        self.use_cache = use_cache
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.device = current_device()

    @torch.no_grad()
    def generate(self, prompts: List[Prompt], sampling: Sampling) -> List[List[int]]:
        """New tokens for each prompt (the final </s> included when produced): at most
        sampling.max_new_tokens, and no more than the model's positions leave it."""
        out: List[List[int]] = [[] for _ in prompts]
        for step_tokens in self.stream(prompts, sampling):
            for row, token in enumerate(step_tokens):
                if token is not None:
                    out[row].append(token)
        return out

    @torch.no_grad()
    def stream(self, prompts: List[Prompt], sampling: Sampling) -> Iterator[List[Optional[int]]]:
        """Yields, per step, each row's new token (None once a row has finished: after its </s>, or
        its budget of new tokens, new_token_budget, its own in a batch)."""
        from megatron.core.inference.contexts import StaticInferenceContext

        batch, longest = len(prompts), max(len(p.tokens) for p in prompts)
        budgets = [new_token_budget(len(p.tokens), sampling.max_new_tokens, self.max_length) for p in prompts]
        budget, steps = torch.tensor(budgets), max(budgets)
        total = longest + steps
        tokens = torch.zeros(batch, total, dtype=torch.long)
        valid = torch.zeros(batch, total, dtype=torch.bool)
        for row, prompt in enumerate(prompts):  # left padding
            tokens[row, longest - len(prompt.tokens) : longest] = torch.tensor(prompt.tokens)
            valid[row, longest - len(prompt.tokens) : longest] = True
        images = [image for prompt in prompts for image in prompt.images]
        images = torch.stack(images) if images else None
        context = StaticInferenceContext(batch, total) if self.use_cache else None
        generator = torch.Generator().manual_seed(sampling.seed)
        done = torch.zeros(batch, dtype=torch.bool)
        length = longest
        for step in range(steps):
            start = context.sequence_len_offset if context is not None else 0
            step_ids = tokens[:, start:length]
            keys = valid[:, :length]
            causal = torch.ones(length - start, length, dtype=torch.bool).tril(diagonal=start)
            mask = ~(causal[None] & keys[:, None, :])  # True = masked
            logits = self._forward(step_ids, mask[:, None], images if start == 0 else None, context)
            if context is not None:
                context.sequence_len_offset = length
            chosen = self._choose(logits, sampling, generator, batch)
            chosen = torch.where(done, torch.zeros_like(chosen), chosen)
            tokens[:, length], valid[:, length] = chosen, True
            length += 1
            yield [None if done[row] else int(chosen[row]) for row in range(batch)]
            done |= (chosen == sampling.eos_id) | (budget <= step + 1)
            if bool(done.all()):
                break

    def _forward(self, ids, mask, images, context) -> Optional[torch.Tensor]:
        """Last-position logits [b, V] on the last stage (None elsewhere), through the schedule."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        captured = {}
        batch = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                 "images": None if images is None else images.to(self.device), "inference_context": context}

        def forward_step(data_iterator, model):
            logits = model(**next(data_iterator))

            def keep(output):
                captured["logits"] = output[:, -1].float()
                return output.new_zeros(()), {}
            return logits, keep

        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=[self.model],
                                    num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=ids.shape[0],
                                    forward_only=True)
        return captured.get("logits")

    def _choose(self, logits, sampling: Sampling, generator, batch: int) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        chosen = torch.zeros(batch, dtype=torch.long, device=self.device)
        if logits is not None:
            if self.vocab_size is not None:
                logits = logits[:, : self.vocab_size]
            if sampling.temperature <= 0:
                chosen = logits.argmax(dim=-1)
            else:
                probs = sampling_distribution(logits, sampling).cpu()
                chosen = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(self.device)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(chosen, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        return chosen.cpu()


def load_model_for_inference(root: str, parallel, transformer_impl: str = "auto", iteration: Optional[int] = None,
                             bf16: bool = False):
    """The EVE stage of this rank from a megatron checkpoint (its recorded configuration),
    weights only, gathering logits over TP for generation. → (model, EVEModelConfig). With bf16
    the loaded stage is wrapped in megatron-core's Float16Module, as training runs it."""
    from megatron.core import dist_checkpointing

    from megatron_eve.config import ConfigError, RuntimeConfig, model_config_from_dict
    from megatron_eve.model.build import build_model
    from megatron_eve.training.checkpoint_records import checkpoint_dir, latest_iteration, reading

    iteration = iteration if iteration is not None else latest_iteration(root)
    if iteration is None:
        raise ConfigError(f"{root}: no latest_checkpointed_iteration.txt")
    directory = checkpoint_dir(root, iteration)
    with reading(directory):  # a truncated or damaged file: one line naming the checkpoint
        common = dist_checkpointing.load_common_state_dict(directory)
    if "model_config" not in common:
        raise ConfigError(f"{directory} does not record its model configuration")
    cfg = model_config_from_dict(common["model_config"])
    cfg.aligner.teacher_path = None  # inference never needs the teacher
    model = build_model(cfg, parallel, RuntimeConfig(transformer_impl=transformer_impl), load_teacher=False,
                        parallel_output=False)
    sharded = model.sharded_state_dict()
    with reading(directory):
        available = set(dist_checkpointing.load_tensors_metadata(directory))
    present = {k: v for k, v in sharded.items() if getattr(v, "key", k) in available}
    missing = [k for k in set(sharded) - set(present) if "_extra_state" not in k and not k.startswith("aligner.")]
    if missing:
        raise ConfigError(f"{directory} lacks model tensors: {', '.join(sorted(missing))}")
    with reading(directory):
        loaded = dist_checkpointing.load(present, directory)
    model.load_state_dict(loaded, strict=False)
    if bf16:
        import dataclasses

        from megatron.core.transformer.module import Float16Module

        half = dataclasses.replace(model.config, bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
        model = Float16Module(half, model)  # its config (bf16 between pipeline stages too) drives the schedule
    return model.eval(), cfg
