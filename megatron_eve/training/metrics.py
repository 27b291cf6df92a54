"""What a training run reports: throughput from real (non-padding) tokens (tokens/s, model FLOPs,
MFU), the learning rates and loss scale, Megatron-LM's iteration line, and the TensorBoard writer.
One function computes what the console line and TensorBoard both show."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Dict, Optional

import torch

from megatron_eve.config import EVEModelConfig, TrainingJob
from megatron_eve.model.size import parameter_counts

logger = logging.getLogger(__name__)

# Dense bf16 peaks per device, TFLOP/s (sparsity excluded).
# The longest key found in the device name wins ("H100 PCIe" before "H100", the SXM part).
PEAK_TFLOPS = {"H200": 989.0, "H200 NVL": 835.0, "H100": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
               "H800": 989.0, "H800 PCIe": 756.0, "GH200": 989.0, "A100": 312.0, "A800": 312.0, "B200": 2250.0,
               "GB200": 2450.0, "L40S": 362.0}


def peak_tflops(override: Optional[float] = None) -> Optional[float]:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key]
    return None


@dataclass
class BatchWork:
    """What a global batch computes, counted from real tokens only."""

    real_tokens: int = 0
    positions: int = 0  # real + padding
    samples: int = 0
    images: int = 0
    flops: float = 0.0

    def add(self, other: "BatchWork") -> None:
        self.real_tokens += other.real_tokens
        self.positions += other.positions
        self.samples += other.samples
        self.images += other.images
        self.flops += other.flops


def micro_batch_work(batch: Dict, model: EVEModelConfig, align: bool, teacher_params: int = 0,
                     llm_trains: bool = True) -> BatchWork:
    """Training FLOPs of a collated micro-batch, from real tokens (padding is not work): decoder
    matmuls, causal attention within each sample, LM head, PEL, projector, aligner and teacher.
    A trained matmul costs 3 x its forward (forward, input and weight gradients); a frozen one that
    gradients still pass through (the LLM in prealign) 2 x; attention's score products 3 x either
    way; the teacher its forward only."""
    lm, vision = model.language, model.vision
    h, c = lm.hidden_size, vision.hidden_size
    counts = parameter_counts(model)
    lengths = batch["sample_lengths"].double()
    tokens = float(lengths.sum())
    decoder_weights = counts["decoder"] - lm.num_layers * 2 * h - h  # matmul weights, norms excluded
    llm_matmuls = 2.0 * tokens * (decoder_weights + lm.hidden_size * lm.vocab_size)
    scores = lm.num_layers * 2.0 * h * float((lengths * (lengths + 1)).sum())  # QK^T and AV, causal
    trained = 0.0  # forward FLOPs of trained modules outside the LLM
    grids = batch["image_grid_hw"].double()
    if grids.numel():
        rows, cols = grids[:, 0], grids[:, 1]
        merged = float((rows * cols).sum())
        visual = float((1 + rows * (cols + 1)).sum())
        images = float(grids.shape[0])
        conv = 4 * 2 * 3 * vision.patch_size**2 * c  # four patches per merged token
        local = 2 * c * c + 4 * 2 * 2 * c * c + 2 * c * c  # window query, its 4 pixels' keys / values, proj
        global_kv = 2 * 2 * c * c  # every merged token is a key / value of the CLS query
        trained += merged * (conv + local + global_kv) + images * 2 * (2 * c * c)  # + CLS query, proj
        trained += visual * 2 * (c * h + h * h)  # projector
        if align:
            a = model.aligner.hidden_size
            pool = vision.align_pool
            cells = float(((rows // pool) * (cols // pool)).sum())
            taps = len(model.aligner.taps(lm.num_layers))
            trained += cells * 2 * (taps * h * a + h * a + a * a)
    flops = (3.0 if llm_trains else 2.0) * llm_matmuls + 3.0 * scores + 3.0 * trained
    images = int(grids.shape[0])
    if align and images:
        flops += 2.0 * teacher_params * images * (vision.teacher_grid**2 + 1)
    return BatchWork(int(tokens), int(batch["tokens"].numel()), int(batch["num_samples"]), images, flops)


@dataclass
class IntervalMeter:
    """Accumulates iterations between two log lines."""

    iterations: int = 0
    seconds: float = 0.0
    work: BatchWork = field(default_factory=BatchWork)

    def scalars(self, world_size: int, peak: Optional[float]) -> Dict[str, float]:
        seconds = max(self.seconds, 1e-9)
        tflops = self.work.flops / seconds / world_size / 1e12
        out = {
            "iteration-time": seconds / max(self.iterations, 1) * 1000.0,
            "tokens-per-sec-per-gpu": self.work.real_tokens / seconds / world_size,
            "throughput": tflops,
            "packing-efficiency": self.work.real_tokens / max(self.work.positions, 1),
        }
        if peak:
            out["mfu"] = tflops / peak
        return out


def memory_scalars() -> Dict[str, float]:
    if torch.cuda.is_available():
        return {"mem-allocated-bytes": float(torch.cuda.memory_allocated()),
                "mem-max-allocated-bytes": float(torch.cuda.max_memory_allocated())}
    import psutil

    return {"mem-rss-bytes": float(psutil.Process(os.getpid()).memory_info().rss)}


# ------------------------------------------------------------------- the training log line
def learning_rates(optimizer) -> Dict[str, float]:
    """The learning rate in force for the trained parameters: "learning-rate" is the rate of the
    groups under --lr, or where none is trained (prealign) of those under --vision-lr; with both
    trained, "vision-learning-rate" too."""
    rates = {}
    for group in optimizer.param_groups:
        if group["params"]:
            rates.setdefault("base" if group.get("default_config", True) else "vision", float(group["lr"]))
    if not rates:
        return {"learning-rate": float(optimizer.param_groups[0]["lr"])}
    if "base" not in rates:
        return {"learning-rate": rates["vision"]}
    return {"learning-rate": rates["base"], **({"vision-learning-rate": rates["vision"]} if "vision" in rates else {})}


def logged_loss_scale(optimizer, job: TrainingJob, read: bool) -> Optional[float]:
    """The loss scale Megatron-LM logs: 1.0 without fp16, fp16's static --loss-scale, or (read=True)
    the dynamic scaler's current scale, a read of the device (None with read=False)."""
    if dynamic_loss_scale(job):
        return float(optimizer.get_loss_scale()) if read else None
    return float(job.optim.loss_scale) if job.runtime.fp16 else 1.0


def dynamic_loss_scale(job: TrainingJob) -> bool:
    """fp16 without a static --loss-scale: the scale lives on the device and changes."""
    return job.runtime.fp16 and not job.optim.loss_scale


def training_log_line(state, s, last_iteration: int, scalars: Dict[str, float], grad_norm: Optional[float],
                      loss_scale: float) -> str:
    """Megatron-LM's training_log line (its fields, order and formats; no grad norm before a finite
    one, as Megatron-LM prints none without one), with EVE's vision learning rate after the learning
    rate, and tokens/s/GPU, MFU and packing efficiency after the grad norm."""
    mfu = f"{100 * scalars['mfu']:.1f}%" if "mfu" in scalars else "n/a"
    return (
        f" [{datetime.now().strftime('%Y-%m-%d %H:%M:%S.%f')}] iteration {state.iteration:8d}/{last_iteration:8d} |"
        f" consumed samples: {state.consumed_samples:12d} |"
        f" elapsed time per iteration (ms): {scalars['iteration-time']:.1f} |"
        f" throughput per GPU (TFLOP/s/GPU): {scalars['throughput']:.1f} |"
        f" learning rate: {scalars['learning-rate']:.6E} |"
        + (f" vision learning rate: {scalars['vision-learning-rate']:.6E} |"
           if "vision-learning-rate" in scalars else "")
        + f" global batch size: {s.global_batch_size:5d} |"
        f" lm loss: {scalars['lm loss']:.6E} | align loss: {scalars['align loss']:.6E} |"
        f" loss scale: {loss_scale:.1f} |"
        + (f" grad norm: {grad_norm:.3f} |" if grad_norm is not None else "")
        + f" tokens/s/GPU: {scalars['tokens-per-sec-per-gpu']:.1f} | MFU: {mfu} |"
        f" packing efficiency: {100 * scalars['packing-efficiency']:.1f}% |"
        f" number of skipped iterations: {state.skipped_iterations:3d} |"
        f" number of nan iterations: {state.nan_iterations:3d} |"
    )


# ------------------------------------------------------------------------------ TensorBoard
class TensorBoard:
    """Scalars against iterations, and against consumed samples for losses and lr (Megatron's
    "<name> vs samples"), the latter in the subfolder VS_SAMPLES (a second run in TensorBoard's UI).

    iteration and consumed_samples are where this run starts (0, or the loaded checkpoint's). A run
    resumed after a kill logs again what the killed run logged past its last checkpoint: TensorBoard
    hides those older points when the new event file opens with a START event at the first step it
    writes (purge_step). Every run writes one, the first too: TensorBoard skips the first START of a
    folder and purges at each later one. A purge cuts every tag of its folder at one step, so the
    charts indexed by consumed samples live in their own folder and are purged at a sample count."""

    VS_SAMPLES = "vs-samples"

    def __init__(self, directory: Optional[str], iteration: int = 0, consumed_samples: int = 0):
        self.writer = self.samples_writer = None
        self.directory = directory
        if directory:
            from torch.utils.tensorboard import SummaryWriter

            # This run writes steps from iteration + 1 on; the checkpoint's own step stays.
            self.writer = SummaryWriter(log_dir=directory, max_queue=100, purge_step=iteration + 1)
            self.samples_writer = SummaryWriter(log_dir=os.path.join(directory, self.VS_SAMPLES), max_queue=100,
                                                purge_step=consumed_samples + 1)
            for writer in (self.writer, self.samples_writer):
                _quiet_writer_thread(writer)

    def write(self, scalars: Dict[str, float], iteration: int, consumed: int, vs_samples=()) -> None:
        if self.writer is None:
            return
        try:
            for name, value in scalars.items():
                # Stored as doubles: a grad norm or loss compared across runs keeps all its digits.
                self.writer.add_scalar(name, value, iteration, new_style=True, double_precision=True)
                if name in vs_samples:
                    self.samples_writer.add_scalar(f"{name} vs samples", value, consumed, new_style=True,
                                                   double_precision=True)
        except Exception as error:  # noqa: BLE001 - the event writer thread's error, re-raised here
            self._give_up(error)

    def _give_up(self, error: BaseException) -> None:
        """A write that failed (a full disk, a vanished folder) costs the charts, not the run: one
        warning, and no more TensorBoard writes."""
        writers, self.writer, self.samples_writer = (self.writer, self.samples_writer), None, None
        logger.warning("--tensorboard-dir %s: cannot write (%s): TensorBoard logging stops, training goes on",
                       self.directory, error)
        # The writer thread keeps this exception, which its re-raise here tied to the training loop's
        # frames (and their loaders, whose workers would then never be told to stop): cut that tie.
        error.__traceback__ = None
        for writer in writers:
            # SummaryWriter.close stops at a failing flush: close each event file's writer (its thread stops).
            for file_writer in list((getattr(writer, "all_writers", None) or {}).values()):
                with contextlib.suppress(Exception):
                    file_writer.close()
            with contextlib.suppress(Exception):
                writer.close()

    def close(self) -> None:
        try:
            for writer in (self.writer, self.samples_writer):
                if writer is not None:
                    writer.flush()
                    writer.close()
        except Exception as error:  # noqa: BLE001
            self._give_up(error)


class _QuietRecordWriter:
    """The record writer as an event file's writer thread calls it: a failed write or flush is kept
    where the thread keeps its own failures (the next add_scalar or flush raises it, and the
    TensorBoard gives up with one warning) instead of ending the thread with a traceback on stderr;
    nothing more is written after it (a torn record stays the file's last)."""

    def __init__(self, records, thread):
        self.records, self.thread = records, thread

    def _call(self, method, *args):
        if self.thread.exception is not None:
            return None
        try:
            return getattr(self.records, method)(*args)
        except Exception as error:  # noqa: BLE001 - what the thread would have died of
            self.thread.exception = error
            return None

    def write(self, data):
        return self._call("write", data)

    def flush(self):
        return self._call("flush")

    def close(self):
        return self._call("close")


def _quiet_writer_thread(writer) -> None:
    """Let a SummaryWriter's writer thread keep a failure for the writer to raise instead of dying of it
    (threading prints "Exception in thread ..." and a traceback). Leaves another tensorboard's as it is."""
    for file_writer in (getattr(writer, "all_writers", None) or {}).values():
        thread = getattr(getattr(getattr(file_writer, "event_writer", None), "_async_writer", None), "_worker", None)
        if thread is not None and hasattr(thread, "_record_writer") and hasattr(thread, "exception"):
            thread._record_writer = _QuietRecordWriter(thread._record_writer, thread)
