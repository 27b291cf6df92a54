"""Shared test helpers: tiny configs, a tiny CLIP teacher on disk, synthetic micro-batches, and a
torchrun launcher for multi-process (gloo) tests."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_eve.config import EVEModelConfig, get_preset, replace
from megatron_eve.data.images import preprocess_image, token_grid, tokens_per_image
from megatron_eve.model.visual_layout import IGNORE_INDEX, IMAGE_TOKEN_INDEX

ROOT = Path(__file__).resolve().parents[1]
BOS = 1


def tiny_config(teacher_path: Optional[str] = None, changes: Optional[Dict] = None) -> EVEModelConfig:
    """The tiny preset; `changes` uses dotted names, e.g. {"language.vocab_size": 1000}."""
    cfg = get_preset("tiny")
    if teacher_path is not None:
        cfg.aligner.teacher_path = teacher_path
    return replace(cfg, **changes) if changes else cfg


def save_tiny_teacher(path: str, cfg: EVEModelConfig, layers: int = 3, seed: int = 0) -> str:
    """A random CLIPVisionModel shaped like the config's teacher, saved as an HF folder."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    model = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=cfg.aligner.hidden_size,
            intermediate_size=2 * cfg.aligner.hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=4,
            image_size=cfg.vision.teacher_image_size,
            patch_size=cfg.vision.patch_size,
        )
    )
    model.save_pretrained(path)
    return path


def random_image(width: int, height: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# A sample: (image size (w, h) or None, text tokens before the image, text tokens after it).
SampleSpec = Tuple[Optional[Tuple[int, int]], int, int]


def make_sample(cfg: EVEModelConfig, spec: SampleSpec, seed: int) -> Dict:
    size, before, after = spec
    rng = np.random.default_rng(seed)
    vocab = cfg.language.vocab_size
    text = lambda n: rng.integers(3, vocab, n).tolist()  # noqa: E731
    tokens = [BOS] + text(before)
    sample = {"image": None, "teacher": None, "grid": None}
    if size is not None:
        grid = token_grid(*size, cfg.vision)
        tokens += [IMAGE_TOKEN_INDEX] * tokens_per_image(*grid)
        sample["image"], sample["teacher"] = preprocess_image(random_image(*size, seed), cfg.vision)
        sample["grid"] = grid
    tokens += text(after)
    # Megatron convention: labels[i] is the target of position i; image tokens are never targets.
    labels = tokens[1:] + [IGNORE_INDEX]
    labels = [IGNORE_INDEX if t < 0 else t for t in labels]
    sample["tokens"], sample["labels"] = tokens, labels
    return sample


def collate(samples: List[Dict], pack: bool = False, pad_to: Optional[int] = None) -> Dict:
    """Pad to the longest (one row per sample), or pack all samples into one row with a
    block-diagonal causal mask (True = masked)."""
    with_images = [s for s in samples if s["image"] is not None]
    batch = {}
    if pack:
        lengths = [len(s["tokens"]) for s in samples]
        total = pad_to or sum(lengths)
        tokens = sum((s["tokens"] for s in samples), [])
        labels = sum((s["labels"] for s in samples), [])
        tokens += [0] * (total - len(tokens))
        labels += [IGNORE_INDEX] * (total - len(labels))
        mask = torch.ones(total, total, dtype=torch.bool)
        start = 0
        for length in lengths + ([total - sum(lengths)] if total > sum(lengths) else []):
            mask[start : start + length, start : start + length] = torch.triu(
                torch.ones(length, length, dtype=torch.bool), diagonal=1
            )
            start += length
        batch["input_ids"] = torch.tensor([tokens])
        batch["labels"] = torch.tensor([labels])
        batch["attention_mask"] = mask[None, None]
    else:
        length = pad_to or max(len(s["tokens"]) for s in samples)
        batch["input_ids"] = torch.tensor([s["tokens"] + [0] * (length - len(s["tokens"])) for s in samples])
        batch["labels"] = torch.tensor(
            [s["labels"] + [IGNORE_INDEX] * (length - len(s["labels"])) for s in samples]
        )
    if with_images:
        batch["images"] = torch.stack([s["image"] for s in with_images])
        batch["teacher_images"] = torch.stack([s["teacher"] for s in with_images])
        batch["image_grid_hw"] = torch.tensor([s["grid"] for s in with_images])
    return batch


# Micro-batches with landscape, portrait and square images, a text-only sample, and a text-only
# micro-batch (nothing to align: under PP no aligner features travel with it).
MICRO_BATCH_SPECS: List[List[SampleSpec]] = [
    [((200, 100), 5, 12), ((90, 180), 3, 9), (None, 0, 20)],
    [((160, 160), 4, 8), ((300, 140), 6, 5), ((120, 260), 2, 14)],
    [(None, 10, 30), (None, 4, 12), (None, 0, 25)],
]


def micro_batches(cfg: EVEModelConfig, seed: int = 0, multiple_of: int = 8) -> List[Dict]:
    """MICRO_BATCH_SPECS as padded micro-batches (length a multiple of `multiple_of`, so
    sequence parallelism can split them)."""
    batches = []
    for b, specs in enumerate(MICRO_BATCH_SPECS):
        samples = [make_sample(cfg, spec, seed + 10 * b + i) for i, spec in enumerate(specs)]
        longest = max(len(s["tokens"]) for s in samples)
        batches.append(collate(samples, pad_to=-(-longest // multiple_of) * multiple_of))
    return batches


def count_calls(module, name: str) -> List[int]:
    """Replace module.<name> by a wrapper that appends to the returned list at each call (for the rest
    of the process: child processes and workers only, nothing puts it back)."""
    calls, real = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    setattr(module, name, counted)
    return calls


def fuse_weight_gradients() -> List[int]:
    """Gradient-accumulation fusion on the CPU (megatron_eve enables it on CUDA only), for the rest of
    the process: the fused kernel's calls."""
    from megatron_eve.model import wgrad_accumulation

    wgrad_accumulation.available = lambda: True
    return count_calls(wgrad_accumulation, "wgrad_gemm_accum_fp32")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_environment(cuda: bool = False) -> Dict[str, str]:
    """Child processes run on CPU (CUDA hidden) unless a test asks for the GPU; a one-process
    child makes its own process group (torchrun sets RANK for its own children)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RANK", None)
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def torchrun(script: str, nproc: int, args: Sequence[str] = (), timeout: int = 300,
             cuda: bool = False) -> subprocess.CompletedProcess:
    """Run tests/parallel/<script> under torchrun (on CPU unless cuda); fail with its output if it
    fails, else return the finished process (its stdout)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}",
        str(ROOT / "tests" / "parallel" / script), *map(str, args),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_environment(cuda), cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def read_json(path) -> Dict:
    return json.loads(Path(path).read_text())


def child_report(module: str, report_path, timeout: int = 240) -> Dict:
    """`python -m module REPORT` in a process of its own (megatron-core's process group and CPU
    shims stay out of pytest's; the child's assertions fail it): the JSON report it wrote."""
    proc = subprocess.run([sys.executable, "-m", module, str(report_path)], capture_output=True, text=True,
                          timeout=timeout, env=child_environment(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return read_json(report_path)


# ------------------------------------------------------------------------------ pretrain_eve.py runs
LINE = re.compile(r"iteration +(\d+)/ *\d+ .*? lm loss: (\S+) \| align loss: (\S+) \|"
                  r"(?: loss scale: \S+ \|)? grad norm: (\S+)")


def base_args(data: Dict, stage: str = "prealign", kind: str = "captions") -> List[str]:
    """pretrain_eve.py flags for the tiny preset on the `data` fixture's preprocessed corpus."""
    return ["--stage", stage, "--preset", "tiny", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--seq-length", "512", "--lr", "1e-3", "--log-interval", "1", "--data-path", data[kind],
            "--split", "90,10,0", "--vision-teacher-path", data["teacher"], "--num-workers", "1",
            "--tokenizer-model", data["tokenizer"]]


def launch(args: Sequence, nproc: int = 2, cuda: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(ROOT / "pretrain_eve.py"), *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=child_environment(cuda), cwd=ROOT)


def train(args: Sequence, nproc: int = 2, timeout: int = 300, cuda: bool = False):
    """Run pretrain_eve.py to completion → ({iteration: (lm, align, grad norm)}, output)."""
    proc = launch(args, nproc, cuda)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException:  # a time limit (ours or pytest's): stop the run, show how far it got
        proc.kill()
        print(f"pretrain_eve.py stopped unfinished; its output:\n{proc.communicate()[0][-6000:]}", file=sys.stderr)
        raise
    assert proc.returncode == 0, out[-6000:]
    return losses(out), out


def validations(text):
    """Megatron-LM's evaluations at --eval-interval: {iteration: lm loss}."""
    return dict(re.findall(r" validation loss at iteration (\d+) \| lm loss value: (\S+) \| lm loss PPL: \S+ \|", text))


def final_evaluations(text):
    """Megatron-LM's evaluations after training: [(iteration, "validation" or "test", lm loss)]."""
    return re.findall(r" validation loss at iteration (\d+) on (validation|test) set \| lm loss value: (\S+) \|", text)


def losses(text: str) -> Dict[int, Tuple[float, ...]]:
    return {int(m[0]): tuple(float(x) for x in m[1:]) for m in LINE.findall(text)}


def damaged_png(path, seed: int = 0) -> None:
    """A PNG whose image data goes on in a second chunk with a damaged chunk name: Pillow opens it,
    then raises SyntaxError (not OSError) while decoding."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    random_image(50, 40, seed).save(buffer, format="PNG")
    data = buffer.getvalue()
    start = data.find(b"IDAT")
    length = struct.unpack(">I", data[start - 4:start])[0]
    payload = data[start + 4:start + 4 + length]

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    half = len(payload) // 2
    second = bytearray(chunk(b"IDAT", payload[half:]))
    second[4:8] = b"\x00\x01\x02\x03"
    Path(path).write_bytes(data[:start - 4] + chunk(b"IDAT", payload[:half]) + bytes(second)
                           + data[start + 4 + length + 4:])
