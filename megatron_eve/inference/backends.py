"""One answering interface over a megatron checkpoint (any TP / PP under torchrun) or an HF
export (plain transformers), used by tools/generate.py, tools/eval_vqa.py and tools/app.py."""

from __future__ import annotations

import codecs
import os
import threading
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Union

import torch

from megatron_eve.atomic import recover_replaced
from megatron_eve.config import ConfigError
from megatron_eve.data.records import to_rgb
from megatron_eve.data.tokenizer import Tokenizer
from megatron_eve.inference.generate import (MIN_TEMPERATURE, Generator, Prompt, PromptError, Sampling, below_row_max,
                                             build_prompt, check_placeholders, new_token_budget)


@dataclass
class Request:
    prompt: str  # the full template text, "<image>" where each image goes
    image_paths: Sequence[str] = ()
    # Turned upright by their EXIF orientation first: the reference demo's upload box (Gradio's
    # gr.Image) does so, while its training and evaluation open files as stored.
    upright: bool = False


def open_images(paths: Sequence[str], upright: bool = False):
    """8-bit RGB images (as preprocessing makes them; turned by EXIF orientation if `upright`); a
    file that is missing or damaged becomes a PromptError for its request alone."""
    from PIL import Image, ImageOps

    from megatron_eve.data.templates import TemplateError

    images = []
    for path in paths:
        if os.path.isdir(path):
            raise PromptError(f"image {path} is a folder, not an image file")
        if not os.path.isfile(path):
            raise PromptError(f"image {path} does not exist")
        try:
            with Image.open(path) as image:
                image.load()
                images.append(to_rgb(ImageOps.exif_transpose(image) if upright else image, path))
        except TemplateError as error:
            raise PromptError(str(error)) from None
        except Exception as error:  # noqa: BLE001 — Pillow raises OSError, SyntaxError, ValueError, ...
            raise PromptError(f"image {path} cannot be read: {type(error).__name__}: {error}") from None
    return images


def answer_ids(ids: List[int], tokenizer: Tokenizer, eos_id: int) -> List[int]:
    """The ids an answer shows: up to its </s>, without the tokenizer's special ids (<unk>, <s>,
    </s>), as the reference's batch_decode(skip_special_tokens=True) leaves them out."""
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    specials = _special_ids(tokenizer)
    return [i for i in ids if i not in specials]


def _special_ids(tokenizer: Tokenizer) -> set:
    return {i for i in (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) if i >= 0}


class MegatronBackend:
    def __init__(self, load: str, tokenizer_model: str, parallel, use_cache: bool = True,
                 transformer_impl: str = "auto", bf16: bool = False):
        from megatron_eve.inference.generate import load_model_for_inference

        recover_replaced(load, legacy=False)  # a conversion killed between its two renames left it aside
        if not os.path.isdir(load):  # else the "no latest_checkpointed_iteration.txt" of an existing folder
            raise ConfigError(f"--load {load}: no such checkpoint folder")
        self.tokenizer = Tokenizer(tokenizer_model)  # first: a bad file is refused before the model loads
        self.model, self.config = load_model_for_inference(load, parallel, transformer_impl, bf16=bf16)
        self.max_length = self.config.language.max_position_embeddings
        self.generator = Generator(self.model, use_cache=use_cache, vocab_size=self.tokenizer.vocab_size,
                                   max_length=self.max_length)  # each row stops where the positions end

    def prepare(self, request: Request) -> Prompt:
        images = open_images(request.image_paths, request.upright)
        return build_prompt(request.prompt, images, self.tokenizer, self.config.vision, self.max_length)

    def answer(self, requests: List[Request], sampling: Sampling) -> List[Union[str, PromptError]]:
        """Answers in order; a request that cannot be answered gets its PromptError instead."""
        prepared: List[Union[Prompt, PromptError]] = []
        for request in requests:
            try:
                prepared.append(self.prepare(request))  # refuses a prompt too long for the model
            except PromptError as error:
                prepared.append(error)
        good = [p for p in prepared if isinstance(p, Prompt)]
        outputs = iter(self.generator.generate(good, sampling)) if good else iter(())
        return [p if isinstance(p, PromptError) else self._text(next(outputs), sampling) for p in prepared]

    def stream(self, request: Request, sampling: Sampling, cancel: Optional[threading.Event] = None
               ) -> Iterator[str]:
        """Text deltas of one answer as it is generated (the same length limit and text as answer());
        stops between steps once `cancel` is set (nobody reads the answer any more)."""
        prompt = self.prepare(request)
        specials = _special_ids(self.tokenizer)
        ids: List[int] = []
        shown = ""
        for step in self.generator.stream([prompt], sampling):
            if step[0] is None or step[0] == sampling.eos_id or (cancel is not None and cancel.is_set()):
                break
            if step[0] in specials:  # <unk>, <s>: not shown, as answer() leaves them out
                continue
            ids.append(step[0])
            # The byte tokens of a character not yet complete decode to U+FFFD: held back until its
            # last byte comes (as transformers' TextIteratorStreamer holds back), so that no piece
            # sent has to be taken back.
            text = self.tokenizer.decode(ids[: len(ids) - self._pending_bytes(ids)])
            yield from _new_part(text, shown)
            shown = text
        yield from _new_part(self.tokenizer.decode(ids), shown)  # ended inside a character: as answer() gives it

    def _pending_bytes(self, ids: List[int]) -> int:
        """How many of the last tokens are bytes of a UTF-8 character whose other bytes have not come."""
        sp = self.tokenizer.sp
        tail = bytearray()
        for token in reversed(ids[-4:]):  # a UTF-8 character has at most 4 bytes
            if not (0 <= token < sp.get_piece_size() and sp.is_byte(token)):
                break
            tail.insert(0, int(sp.id_to_piece(token)[3:5], 16))  # "<0xE4>"
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        decoder.decode(bytes(tail), final=False)
        return len(decoder.getstate()[0])

    def _text(self, ids: List[int], sampling: Sampling) -> str:
        return self.tokenizer.decode(answer_ids(ids, self.tokenizer, sampling.eos_id)).strip()


def _new_part(text: str, shown: str) -> Iterator[str]:
    """What `text` adds to the `shown` text (nothing when decoding changed what was shown: a piece
    once sent cannot be taken back)."""
    if len(text) > len(shown) and text.startswith(shown):
        yield text[len(shown):]


class HFBackend:
    """An exported folder under transformers (its own modeling_eve.py); a batch of requests is
    answered together, left-padded (the padding masked, as EVE's own batched evaluation does)."""

    def __init__(self, folder: str, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM

        from megatron_eve.platform import current_device

        check_export_folder(folder)
        # The cheap reads first: a bad config.json or tokenizer is refused before the weights load.
        self.vision = self._vision_config(folder)
        self.tokenizer = Tokenizer(folder, flag="--hf")
        self.device = current_device()
        try:
            self.model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype)
        except (OSError, ValueError) as error:  # transformers' "Unrecognized model", a missing weight file, ...
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ConfigError(f"--hf {folder}: cannot be loaded as a model ({first_line})") from None
        self.model = self.model.to(self.device).eval()
        self.max_length = self.model.config.max_position_embeddings

    @staticmethod
    def _vision_config(folder: str):
        """The export's image geometry (as the converter reads it), for counting an image's positions."""
        from megatron_eve.checkpoint.hf_config import model_config, read_hf_config
        from megatron_eve.checkpoint.hf_eve import CheckpointFormatError

        try:
            return model_config(read_hf_config(folder)).vision
        except CheckpointFormatError as error:
            raise ConfigError(f"--hf {folder}: {error}") from None

    def positions(self, ids: List[int], images) -> int:
        """The positions a prompt takes once each image placeholder becomes its image's tokens."""
        from megatron_eve.data.images import num_visual_tokens
        from megatron_eve.model.visual_layout import IMAGE_TOKEN_INDEX

        return (len(ids) - ids.count(IMAGE_TOKEN_INDEX)
                + sum(num_visual_tokens(*image.size, self.vision) for image in images))

    def answer(self, requests: List[Request], sampling: Sampling) -> List[Union[str, PromptError]]:
        from megatron_eve.data.templates import tokenize_with_images

        out: List[Union[str, PromptError, None]] = [None] * len(requests)
        ready = []  # (index, ids, images, budget of new tokens) of the requests that can be answered
        for index, request in enumerate(requests):
            try:
                images = open_images(request.image_paths, request.upright)
                ids = tokenize_with_images(request.prompt, self.tokenizer)
                check_placeholders(ids, images)
                budget = new_token_budget(self.positions(ids, images), sampling.max_new_tokens, self.max_length)
                ready.append((index, ids, images, budget))
            except PromptError as error:
                out[index] = error
        if ready:
            texts = self._generate([ids for _, ids, _, _ in ready], [im for _, _, ims, _ in ready for im in ims],
                                   sampling, [budget for _, _, _, budget in ready])
            for (index, _, _, _), text in zip(ready, texts):
                out[index] = text
        return out

    def _generate(self, rows: List[List[int]], images, sampling: Sampling, budgets: List[int]) -> List[str]:
        """budgets: each row's new tokens at most (new_token_budget's); the batch runs to the largest, and
        each row is cut at its own, as the megatron generator stops it there."""
        longest = max(map(len, rows))
        ids = torch.tensor([[0] * (longest - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows], device=self.device)
        kwargs = dict(max_new_tokens=max(budgets), eos_token_id=sampling.eos_id, pad_token_id=0,
                      do_sample=sampling.temperature > 0, attention_mask=mask)
        if sampling.temperature > 0:
            from transformers import LogitsProcessorList

            torch.manual_seed(sampling.seed)
            # top_k explicitly: generate() would take an unset (None) top_k for its default 50; 0 turns it off.
            # The temperature as the megatron generator takes it (sampling_distribution): a tiny one is safe.
            kwargs.update(temperature=max(sampling.temperature, MIN_TEMPERATURE), top_p=sampling.top_p,
                          top_k=sampling.top_k, logits_processor=LogitsProcessorList([BelowRowMax()]))
        if self.model.config.vocab_size > self.tokenizer.vocab_size:  # vocabulary padding: never an answer
            kwargs["suppress_tokens"] = list(range(self.tokenizer.vocab_size, self.model.config.vocab_size))
        if images:
            pixels = self.model.process_images(images).to(self.device, self.model.dtype)
            new_tokens = self.model.generate(ids, images=pixels, **kwargs)  # from embeddings: new tokens only
        else:
            new_tokens = self.model.generate(ids, **kwargs)[:, longest:]
        return [self.tokenizer.decode(answer_ids(row[:budget], self.tokenizer, sampling.eos_id)).strip()
                for row, budget in zip(new_tokens.tolist(), budgets)]


class BelowRowMax:
    """A logits processor for generate(), which runs it after its suppress_tokens and before its
    temperature warper: each row less its largest score (below_row_max), so that dividing by a tiny
    temperature cannot overflow to +inf (multinomial's "probability tensor contains inf, nan")."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return below_row_max(scores)


def check_export_folder(folder: str) -> None:
    """--hf names a folder holding config.json: anything else would reach transformers, which takes
    a missing folder for a Hub repo id and a file or an empty folder for an unknown model. An export
    killed between its two renames (the old copy moved aside, the new one not yet in) is put back first."""
    recover_replaced(folder, legacy=False)
    if not os.path.isdir(folder):
        what = "a file" if os.path.exists(folder) else "no such folder"
        raise ConfigError(f"--hf {folder}: {what}; pass an HF export folder (holding config.json)")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ConfigError(f"--hf {folder}: no config.json in it (not an HF export folder)")


def make_backend(args, parallel=None):
    """--load (megatron, with --tokenizer-model) or --hf (an export), fp32 or --bf16."""
    bf16 = getattr(args, "bf16", False)
    if getattr(args, "hf", None):
        return HFBackend(args.hf, torch.bfloat16 if bf16 else torch.float32)
    return MegatronBackend(args.load, args.tokenizer_model, parallel, use_cache=not args.no_kv_cache,
                           transformer_impl=getattr(args, "transformer_impl", "auto"), bf16=bf16)
