#!/usr/bin/env python3
"""A local web chat with an EVE model (Gradio, as the EVE reference's demo): upload an image, ask,
watch the answer stream in.

  python tools/app.py --load checkpoints/eve-7b-sft-672 --tokenizer-model vicuna-7b-v1.5
  # then open http://127.0.0.1:7860

It serves a megatron checkpoint (--load) in one process, TP = PP = 1 (an HF export answers through
tools/generate.py --hf). Listens on loopback unless --host says otherwise. The model is loaded once
and generates in one thread of its own, one answer at a time; Gradio's queue holds the other
requests, and its asynchronous server never lets a slow or idle client block anyone. Bad input
(an unreadable upload, an out-of-range sampling value, a prompt too long for the model) gets a
clear message in the chat, which never shows server paths.

API (gradio_client): Client(url).predict({"text": "...", "files": [handle_file(path)]}, max_new_tokens,
temperature, top_p, api_name="/chat") → the answer.
"""

import argparse
import math
import os
import queue
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eve.data.templates import VICUNA_SYSTEM  # noqa: E402
from megatron_eve.inference.generate import PromptError, Sampling, SamplingError, checked_sampling  # noqa: E402

_DONE = object()

# What the demo itself says in the chat (not the model) starts with one of NOTICES: the conversation
# sent to the model leaves those exchanges out by it. (A gr.ChatMessage with metadata would mark them
# in the history, but /chat would then answer API clients with that object instead of the text.)
WARNING = "⚠ "
ASK_A_QUESTION = "Please ask a question (an image alone is not a question)."
EMPTY_ANSWER = "(the model gave an empty answer)"
NOTICES = (WARNING, ASK_A_QUESTION, EMPTY_ANSWER)


def conversation_prompt(messages) -> str:
    """vicuna_v1 over the whole conversation, as the reference demo's get_prompt: the image (a user
    message with "image") at the start of the first question, or after the text of a later one."""
    text = VICUNA_SYSTEM + " "
    for index, message in enumerate(messages):
        content = message["content"]
        if message["role"] == "user":
            if message.get("image"):
                content = "<image>\n" + content if index == 0 else content + "\n<image>"
            text += f"USER: {content} "
        else:
            text += f"ASSISTANT: {content}</s>"
    return text + "ASSISTANT:"


class ModelThread:
    """Owns the backend: answers run here one at a time, their pieces handed back by queue. An
    answer nobody reads any more (the client went away: Gradio closes its generator) is cancelled:
    the model stops at its next step, or never starts it, and serves the next request."""

    def __init__(self, backend):
        self.backend = backend
        self.requests: "queue.Queue" = queue.Queue()
        threading.Thread(target=self._serve, name="eve-model", daemon=True).start()

    def _serve(self) -> None:
        from megatron_eve.platform import shim_this_thread

        shim_this_thread()
        while True:
            request, sampling, pieces, cancel = self.requests.get()
            try:
                if not cancel.is_set():
                    for piece in self.backend.stream(request, sampling, cancel=cancel):
                        if cancel.is_set():
                            break
                        pieces.put(piece)
            except PromptError as error:
                pieces.put(error)
            except Exception as error:  # noqa: BLE001 — one failed answer must not stop the demo
                pieces.put(PromptError(f"the model failed on this request ({type(error).__name__})"))
            pieces.put(_DONE)

    def stream(self, request, sampling: Sampling) -> Iterator:
        pieces: "queue.Queue" = queue.Queue()
        cancel = threading.Event()
        self.requests.put((request, sampling, pieces, cancel))
        try:
            while (piece := pieces.get()) is not _DONE:
                yield piece
        finally:  # finished, or closed by a consumer that went away
            cancel.set()


FIELD_NAMES = {"max_new_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p"}


def parse_sampling(max_new_tokens, temperature, top_p, limit: int, seed: int = 0) -> Sampling:
    """Sampling from what a client sent (the sliders, or anything through the API); the ranges are
    checked_sampling's, as for generate.py's flags."""
    def number(name, value, kind):
        try:
            parsed = kind(float(value)) if kind is int and not isinstance(value, bool) else kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, not {value!r}") from None
        if not math.isfinite(parsed):
            raise ValueError(f"{name} must be a finite number, not {value!r}")
        return parsed

    new = number("max_new_tokens", max_new_tokens, int)
    temp, p = number("temperature", temperature, float), number("top_p", top_p, float)
    return checked_sampling(new, temp, p, seed, limit=limit, names=FIELD_NAMES)  # a SamplingError is a ValueError


def _paths(content) -> List[str]:
    """Uploaded files inside a Gradio message content (a file dict, a (path, alt) tuple, or lists of
    those). Plain strings are text, never paths: typed text cannot name a server file."""
    if isinstance(content, dict):
        found = [content["path"]] if isinstance(content.get("path"), str) else []
        return found + [p for key in ("file", "files", "content") for p in _paths(content.get(key))]
    if isinstance(content, tuple):
        return [item for item in content if isinstance(item, str) and os.path.isfile(item)]
    if isinstance(content, list):
        return [p for item in content for p in _paths(item)]
    return []


def _uploaded(path: str) -> bool:
    """Whether `path` is one of Gradio's uploads (its cache folder): nothing else is ever opened."""
    cache = os.environ.get("GRADIO_TEMP_DIR") or os.path.join(tempfile.gettempdir(), "gradio")
    root = os.path.realpath(cache)
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def _text(content) -> Optional[str]:
    if isinstance(content, str):
        return content
    if isinstance(content, dict) and isinstance(content.get("text"), str):
        return content["text"]
    if isinstance(content, list):
        parts = [t for t in (_text(item) for item in content) if t]
        return " ".join(parts) if parts else None
    return None


def conversation(history):
    """The turns the model is given for a chat history: the exchanges it answered, the question an
    image came with carrying it as "image". An exchange answered by a notice (a bad value, an
    unreadable upload, ...) or not at all is left out whole: its question, its notice and its
    upload, so that a notice is never fed back and a failed upload does not fail every later turn.
    An image uploaded when the conversation has one starts it over, as in the reference demo."""
    exchanges = []  # (user contents, answer contents); an upload can be a user entry of its own
    for entry in history or []:
        is_user = entry.get("role") == "user"
        if not exchanges or (is_user and exchanges[-1][1]):
            exchanges.append(([], []))
        exchanges[-1][0 if is_user else 1].append(entry.get("content"))
    turns = []
    for questions, answers in exchanges:
        answer_texts = [t for t in map(_text, answers) if t]
        if not answer_texts or any(t.startswith(NOTICES) for t in answer_texts):
            continue
        uploads = _paths(questions)
        for text in [t for t in map(_text, questions) if t]:
            turns = with_question(turns, text, uploads[-1] if uploads else None)
            uploads = []  # the exchange's image goes with its first question
        turns += [{"role": "assistant", "content": text} for text in answer_texts]
    return turns


def with_question(turns, question: str, image: Optional[str]):
    """`turns` and the next question (with its upload, if any); a new image starts the conversation
    over when it has one already (the reference demo's add_text)."""
    if image is not None and any(turn.get("image") for turn in turns):
        turns = []
    return turns + [{"role": "user", "content": question, **({"image": image} if image else {})}]


def make_chat(model: ModelThread, max_length: int, seed: int = 0):
    def chat(message, history, max_new_tokens, temperature, top_p):
        message = message if isinstance(message, dict) else {"text": str(message or ""), "files": []}
        # The upload box hands over its files as paths (strings here are paths, not typed text).
        uploads = message.get("files") or []
        files = [f for f in uploads if isinstance(f, str)] + _paths([f for f in uploads if not isinstance(f, str)])
        question = (message.get("text") or "").strip()
        turns = with_question(conversation(history), question, files[-1] if files else None)
        image = next((turn["image"] for turn in turns if turn.get("image")), None)
        if image is not None and not _uploaded(image):
            yield f"{WARNING}images must be uploaded through the page"
            return
        if not question:
            yield ASK_A_QUESTION
            return
        try:
            sampling = parse_sampling(max_new_tokens, temperature, top_p, max_length, seed)
        except ValueError as error:
            yield f"{WARNING}{error}"
            return
        from megatron_eve.inference.backends import Request

        request = Request(conversation_prompt(turns), [image] if image else [], upright=True)
        answer = ""
        for piece in model.stream(request, sampling):
            if isinstance(piece, PromptError):
                yield f"{WARNING}{_without_paths(str(piece), request.image_paths)}"
                return
            answer += piece
            yield answer
        if not answer:
            yield EMPTY_ANSWER
    return chat


def _without_paths(text: str, paths: List[str]) -> str:
    """Server-side paths out of a message: each upload is named by its file name only."""
    for path in paths:
        text = text.replace(path, os.path.basename(path))
    return text


def build_demo(model: ModelThread, model_name: str, max_length: int, start: Optional[Sampling] = None):
    """start: the sliders' starting values (the command line's sampling flags) and the seed."""
    import gradio as gr

    def setting(*args, **kwargs):
        """A slider whose value reaches the chat function as sent (an API client may send anything):
        the chat validates it and answers with a message instead of a server error. (Set on the
        instance: a Slider subclass would make Gradio write a .pyi stub beside this file.)"""
        slider = gr.Slider(*args, **kwargs)
        slider.preprocess = lambda payload: payload
        return slider

    start = start or Sampling()
    return gr.ChatInterface(
        make_chat(model, max_length, start.seed),
        multimodal=True,
        textbox=gr.MultimodalTextbox(file_types=["image"], placeholder="Upload an image and ask about it"),
        additional_inputs=[
            setting(1, max_length, value=start.max_new_tokens, step=1, label="max new tokens"),
            setting(0.0, max(2.0, start.temperature), value=start.temperature, step=0.05,
                    label="temperature (0: greedy)"),
            setting(min(0.05, start.top_p), 1.0, value=start.top_p, step=0.05, label="top p"),
        ],
        title=f"EVE · {model_name}",
        api_name="chat",
    )


def main(argv=None) -> int:
    from megatron_eve.config import ConfigError
    from tools.generate import Parser, add_model_args, check_sampling_args, integer_in

    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, demo=True)  # --load in one process: no --hf, no TP / PP flags
    p.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    p.add_argument("--port", type=integer_in(1, 65535), default=7860, help="1 to 65535")
    p.add_argument("--max-queue", type=integer_in(1), default=32,
                   help="requests waiting at most; more are turned away")
    args = p.parse_args(argv)
    check_sampling_args(p, args)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls out of this machine
    from tools.generate import setup

    try:
        backend, _ = setup(args)
        # Only the model knows its length: the flag's value must fit it, as the slider's must.
        start = checked_sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed,
                                 limit=backend.max_length)
    except (ConfigError, SamplingError) as error:  # a flag, or a checkpoint that cannot be loaded: one line
        print(f"error: {error}", file=sys.stderr)
        return 1
    name = os.path.basename(os.path.normpath(args.load))
    demo = build_demo(ModelThread(backend), name, backend.max_length, start)
    demo.queue(default_concurrency_limit=1, max_size=args.max_queue)
    print(f"EVE chat on http://{args.host}:{args.port}", flush=True)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=False, show_error=False, quiet=True)
    except OSError as error:  # the port taken, the host not this machine's: Gradio's message, first line
        print(f"error: --host {args.host} --port {args.port}: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
