"""The training loop: model and data setup (after preflight.check_job), iterations, evaluation,
logging, checkpoints, and the exits (end of training, --exit-interval, --exit-duration-in-mins, SIGTERM)."""

from __future__ import annotations

import gc
import itertools
import logging
import math
import os
import signal
import sys
import time
import traceback
from functools import partial
from typing import Dict, List

import torch
import torch.distributed as dist

from megatron_eve import distributed
from megatron_eve.atomic import os_error_line
from megatron_eve.config import ConfigError, TrainingJob
from megatron_eve.data.dataset import StageReads, build_datasets
from megatron_eve.data.loader import BatchPlan, build_loader, model_inputs
from megatron_eve.model.build import build_model_chunks
from megatron_eve.platform import current_device
from megatron_eve.training import checkpoint, checkpoint_records
from megatron_eve.training.iteration_stats import IterationStats
from megatron_eve.training.metrics import (
    BatchWork,
    IntervalMeter,
    TensorBoard,
    dynamic_loss_scale,
    learning_rates,
    logged_loss_scale,
    memory_scalars,
    micro_batch_work,
    peak_tflops,
    training_log_line,
)
from megatron_eve.training.optim import build_optimizer, build_scheduler, wrap_model_chunks
from megatron_eve.training.preflight import check_job
from megatron_eve.training.update import reduce_and_update
from megatron_eve.training.stages import apply_stage
from megatron_eve.training.step import forward_step

logger = logging.getLogger("megatron_eve")
SILENT_RANK_GRACE_SECONDS = 30  # how long a rank that does not report a start-up error outlives rank 0


# ---------------------------------------------------------------------------------- helpers
class MicroBatches:
    """Micro-batches for the schedule: collated batches → model inputs on this rank's device,
    counting the work each represents.

    feed (a data.broadcast.MicroBatchFeed, tensor parallelism only): with a loader this rank reads
    and sends each collated batch to its TP group; without one it receives them. Every TP rank then
    makes the same model inputs from the same host batch. The feed keeps the next batch's read and
    transfer in flight while the schedule computes the current one; a run that ends drops it."""

    class Reader:
        """Reads a loader in a cycle (evaluation cycles through its split). Its own object, holding
        neither the MicroBatches nor the feed: the feed's transfer thread calls it, and what that
        leaves behind (an error's traceback) must not make a reference cycle, or the loader's
        workers (which ignore SIGTERM) would outlive the run and hang the interpreter's exit."""

        def __init__(self, loader):
            self.loader, self.iterator = loader, iter(loader)

        def __call__(self) -> Dict:
            try:
                return next(self.iterator)
            except StopIteration:
                self.iterator = iter(self.loader)
                return next(self.iterator)

    def __init__(self, loader, job: TrainingJob, align: bool, teacher_params: int, feed=None):
        self.read = MicroBatches.Reader(loader) if loader is not None else None
        self.loader, self.feed, self.job, self.align, self.teacher_params = loader, feed, job, align, teacher_params
        self.work = BatchWork()

    @classmethod
    def over(cls, dataset, job: TrainingJob, align: bool, teacher_params: int, *, num_workers: int,
             consumed: int = 0, prefetch: bool = True) -> "MicroBatches":
        """This rank's micro-batches of `dataset` from sequence `consumed` on. Under tensor
        parallelism only TP rank 0 builds a loader (and its worker processes) and reads, as
        Megatron-LM's broadcast_data does; every TP rank calls this, in the same order (the feed's
        group is made collectively). prefetch=False: each batch read and sent when asked for."""
        from datetime import timedelta

        from megatron.core import parallel_state as ps

        from megatron_eve.data.broadcast import MicroBatchFeed

        pin = torch.cuda.is_available()
        # Sequence parallelism splits each row's positions over the TP ranks: unpacked rows (--no-pack)
        # are padded to a multiple of them.
        row_multiple = ps.get_tensor_model_parallel_world_size() if job.parallel.sequence_parallel else 1

        def loader():
            return build_loader(dataset, job.schedule.micro_batch_size, num_workers, consumed=consumed,
                                dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
                                pin_memory=pin, plan=BatchPlan.of(job.model.vision, job.runtime.uses_thd()),
                                row_multiple=row_multiple)

        if ps.get_tensor_model_parallel_world_size() == 1:
            return cls(loader(), job, align, teacher_params)
        reads = ps.get_tensor_model_parallel_rank() == 0
        batches = cls(loader() if reads else None, job, align, teacher_params)
        batches.feed = MicroBatchFeed(ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_src_rank(),
                                      batches.read, pin=pin, prefetch=prefetch,
                                      timeout=timedelta(minutes=job.parallel.distributed_timeout_minutes))
        return batches

    def __iter__(self):
        return self

    def __next__(self) -> Dict:
        # Without a loader the feed receives; StopIteration too when the reader ran out.
        batch = self.read() if self.feed is None else next(self.feed)
        # Receivers count too (cheap); only the counts_work rank's total is reduced (_iteration_stats).
        self.work.add(micro_batch_work(batch, self.job.model, self.align, self.teacher_params,
                                       llm_trains=self.job.schedule.stage != "prealign"))
        runtime = self.job.runtime
        return model_inputs(batch, self.job.model.vision, current_device(), dtype=runtime.params_dtype,
                            thd=runtime.uses_thd())

    def close(self) -> None:
        """Waits for the feed's transfer in flight and drops it (optional: see MicroBatchFeed)."""
        if self.feed is not None:
            self.feed.close()


def per_chunk(batches: MicroBatches, num_chunks: int) -> List:
    """One iterator per model chunk, all yielding the same micro-batches: under interleaved 1F1B
    every chunk of this rank runs each micro-batch, in its own order; each is read from the loader
    once and kept only until the last chunk has taken it."""
    return [batches] if num_chunks == 1 else list(itertools.tee(batches, num_chunks))


def _last_rank_of_losses() -> bool:
    from megatron.core import parallel_state as ps

    return (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_data_parallel_rank() == 0)


def _iteration_stats(**options) -> IterationStats:
    """One rank per data-parallel replica counts its losses (last stage) and its work (first)."""
    from megatron.core import parallel_state as ps

    tp0 = ps.get_tensor_model_parallel_rank() == 0
    return IterationStats(current_device(), counts_losses=tp0 and ps.is_pipeline_last_stage(),
                          counts_work=tp0 and ps.is_pipeline_first_stage(), **options)


class _SignalCatcher:
    def __init__(self, enabled: bool):
        self.caught = False
        if enabled:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):  # noqa: ARG002
        self.caught = True


def _last_iteration(job: TrainingJob, state) -> int:
    """The iteration the run ends at: --train-iters, or where --train-samples ends in whole global
    batches after the samples the checkpoint consumed (a resume at another --global-batch-size, e.g.
    its default at another data-parallel size, would overrun --train-samples at train_samples //
    the new batch, repeating samples, or stop short of it)."""
    s = job.schedule
    if s.train_samples is None:
        return s.iterations
    return state.iteration + max(0, (s.train_samples - state.consumed_samples) // s.global_batch_size)


def _data_sizes(job: TrainingJob, state, last_iteration: int):
    """Sequences of each split the run reads (Megatron-LM's sizes): the train split's up to the last
    iteration (at least what the checkpoint consumed), the valid split's evaluations at each
    --eval-interval and at the end, the test split's one at the end."""
    s, log = job.schedule, job.logging
    train = max(s.iterations * s.global_batch_size,
                state.consumed_samples + (last_iteration - state.iteration) * s.global_batch_size)
    evals = (last_iteration // log.eval_interval + 1) if log.eval_interval else 0
    valid = evals * log.eval_iters * s.global_batch_size if log.eval_iters else 0
    test = log.eval_iters * s.global_batch_size if evals else 0
    return train, valid or None, test or None


# ------------------------------------------------------------------------------------- run
def run(job: TrainingJob) -> int:
    started = time.time()  # --exit-duration-in-mins counts building and loading too (a job's time limit does)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_job(job, world_size)
    distributed.initialize(job.parallel, seed=job.schedule.seed,
                           virtual_pipeline_size=job.parallel.virtual_pipeline_size(job.model.language.num_layers))
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    rank = dist.get_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its per-module INFO chatter
    s, ck, log = job.schedule, job.checkpoint, job.logging
    align = job.model.aligner.enabled

    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    chunks = build_model_chunks(job.model, job.parallel, job.runtime, load_teacher=align)
    counts = [apply_stage(chunk, s.stage) for chunk in chunks]
    trainable, frozen = sum(c[0] for c in counts), sum(c[1] for c in counts)
    if min(c[0] for c in counts) == 0:
        where = f" (model chunk {[c[0] for c in counts].index(0)})" if len(chunks) > 1 else ""
        raise ConfigError(f"pipeline stage {ps.get_pipeline_model_parallel_rank()}{where} has nothing to train in "
                          f"stage {s.stage}: use fewer pipeline stages")
    teacher_params = sum(p.numel() for c in chunks if c.teacher for p in c.teacher.model.parameters())
    ddp = wrap_model_chunks(chunks, job)  # DDP per model chunk
    optimizer = build_optimizer(ddp, job)
    scheduler = build_scheduler(optimizer, job)
    state = checkpoint.load(job, ddp, optimizer, scheduler)
    if rank == 0:
        logger.info("stage %s: %s trainable / %s frozen parameters on rank 0; starting at iteration %d, "
                    "%d samples consumed", s.stage, f"{trainable:,}", f"{frozen:,}", state.iteration,
                    state.consumed_samples)

    last_iteration = _last_iteration(job, state)
    data = build_datasets(job.data, s.seed, _data_sizes(job, state, last_iteration),
                          StageReads(pixels=first, teacher=last and align, aligned=align))
    if data["train"] is None or len(data["train"]) == 0:
        raise ConfigError("no training sequence: the train split is empty or no sample fits --seq-length")
    train_batches = MicroBatches.over(data["train"], job, align, teacher_params, num_workers=job.data.num_workers,
                                      consumed=state.consumed_samples)
    valid_batches = None
    if log.eval_interval and log.eval_iters and (data["valid"] is None or len(data["valid"]) == 0):
        if rank == 0:  # --split gives it weight (check_job), but no sample of it fits --seq-length, say
            logger.warning("no validation: the valid split holds no sequence")
    elif log.eval_interval and log.eval_iters:
        # Where the run left off (modulo the set: a resume with other --eval-* flags may have read more).
        valid_batches = MicroBatches.over(data["valid"], job, False, 0, num_workers=min(job.data.num_workers, 1),
                                          consumed=state.consumed_valid_samples % len(data["valid"]))

    dp_size = ps.get_data_parallel_world_size()
    num_microbatches = s.global_batch_size // (s.micro_batch_size * dp_size)
    fb = get_forward_backward_func()
    step = partial(forward_step, job.model.aligner.loss_weight if align else 0.0)
    tensorboard = TensorBoard(log.tensorboard_dir if _last_rank_of_losses() else None,
                              iteration=state.iteration, consumed_samples=state.consumed_samples)
    evaluate = partial(_evaluate_and_print, fb, step, ddp, num_microbatches, job, state, tensorboard)
    catcher = _SignalCatcher(ck.exit_signal_handler)
    peak = peak_tflops(log.peak_tflops)
    stats = _iteration_stats()
    interval_seconds, grad_norm = 0.0, None
    exit_code, reason = 0, "finished"
    first_iteration = state.iteration
    nan_streak = 0  # non-finite iterations in a row

    train_iterators = per_chunk(train_batches, len(ddp))
    valid_iterators = per_chunk(valid_batches, len(ddp)) if valid_batches is not None else None
    while state.iteration < last_iteration:
        tick = time.time()
        for chunk in ddp:
            chunk.train()
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        train_batches.work = BatchWork()
        losses = fb(forward_step_func=step, data_iterator=train_iterators, model=ddp,
                    num_microbatches=num_microbatches, seq_length=job.data.seq_length,
                    micro_batch_size=s.micro_batch_size, forward_only=False)
        update = reduce_and_update(
            optimizer, stats, losses, [b.grad_data for c in ddp for b in c.buffers + c.expert_parallel_buffers],
            train_batches.work, sigterm=catcher.caught,
            over_time=bool(ck.exit_duration_in_mins) and (time.time() - started) / 60 > ck.exit_duration_in_mins)
        nan_streak = 0 if update.finite else nan_streak + 1
        if update.finite:
            grad_norm = update.grad_norm
            if update.updated:
                scheduler.step(increment=s.global_batch_size)
            else:
                state.skipped_iterations += 1  # fp16 loss-scale overflow
        else:
            state.nan_iterations += 1
            if rank == 0:
                logger.error("iteration %d: non-finite loss or gradient (%s); %s", state.iteration + 1,
                             stats.last_losses(), "stopping" if s.nan_action == "stop" else "update skipped")
            if s.nan_action == "stop":
                exit_code, reason = 1, "non-finite loss"
                state.iteration += 1
                break
            state.skipped_iterations += 1
            if nan_streak >= s.max_consecutive_nan_iterations:
                exit_code = 1
                reason = (f"{nan_streak} non-finite iterations in a row (the weights or the data are broken); "
                          "not saving")
                state.iteration += 1
                break
        state.iteration += 1
        state.consumed_samples += s.global_batch_size
        interval_seconds += time.time() - tick  # the update above waited for this iteration's gradients

        if tensorboard.writer is not None and state.iteration % log.tensorboard_log_interval == 0:
            # This iteration's own values, as Megatron-LM's training_log writes them: all on the host
            # already (the losses came with the iteration's flags), so no host read of the device.
            scalars = {**stats.read_losses(), **learning_rates(optimizer), "batch-size": s.global_batch_size}
            if update.grad_norm is not None:
                scalars["grad-norm"] = update.grad_norm
            loss_scale = logged_loss_scale(optimizer, job, read=False)
            if loss_scale is not None:
                scalars["loss-scale"] = loss_scale
            tensorboard.write(scalars, state.iteration, state.consumed_samples, vs_samples=tuple(scalars))
        if state.iteration % log.log_interval == 0 or state.iteration in (first_iteration + 1, last_iteration):
            interval = stats.read_interval()
            meter = IntervalMeter(interval.iterations, interval_seconds, interval.work)
            measured = {**meter.scalars(dist.get_world_size(), peak), **memory_scalars()}
            loss_scale = logged_loss_scale(optimizer, job, read=True)  # waits for no more than the read above
            if _last_rank_of_losses():
                values = {**interval.losses, **learning_rates(optimizer), **measured}
                print(training_log_line(state, s, last_iteration, values, grad_norm, loss_scale), flush=True)
            if dynamic_loss_scale(job):  # per log line only (each iteration's would read the device)
                measured["loss-scale"] = loss_scale
            tensorboard.write(measured, state.iteration, state.consumed_samples)
            interval_seconds = 0.0

        if valid_batches is not None and state.iteration % log.eval_interval == 0:
            evaluate(f"iteration {state.iteration}", valid_iterators, "validation")
            state.consumed_valid_samples += log.eval_iters * s.global_batch_size

        checkpoint.finalize_async_saves(blocking=False)  # publish a background save all ranks have written
        saved = False
        # During a non-finite streak the state may be broken: no interval checkpoint replaces a good one.
        if ck.save and ck.save_interval and state.iteration % ck.save_interval == 0 and not nan_streak:
            checkpoint.save(job, ddp, optimizer, scheduler, state)
            saved = True
        stop = None
        if update.sigterm:
            stop = "SIGTERM"
        elif ck.exit_interval and state.iteration % ck.exit_interval == 0:
            stop = "--exit-interval"
        elif update.over_time:
            stop = "--exit-duration-in-mins"
        if stop:
            if ck.save and not saved and not nan_streak:
                checkpoint.save(job, ddp, optimizer, scheduler, state)
                saved = True
            reason = f"{stop} at iteration {state.iteration}"
            break

    trained = state.iteration > first_iteration
    if not trained:
        reason = f"nothing to do: the checkpoint is at iteration {state.iteration} of {last_iteration}"
    elif reason == "finished" and ck.save and not nan_streak and (
            not ck.save_interval or state.iteration % ck.save_interval):
        checkpoint.save(job, ddp, optimizer, scheduler, state)
    if (reason == "finished" or not trained) and log.eval_interval and log.eval_iters:
        # As Megatron-LM's pretrain() after train() (its exits by signal, time or --exit-interval leave
        # before): the valid split, then the test split where --split gives it weight, after the save.
        if valid_batches is not None:
            evaluate(f"iteration {state.iteration} on validation set", valid_iterators, "validation")
            state.consumed_valid_samples += log.eval_iters * s.global_batch_size
        if data["test"] is None or len(data["test"]) == 0:
            if data["test"] is not None and rank == 0:
                logger.warning("no test evaluation: the test split holds no sequence")
        else:
            # Built now (every rank, in the same order): no test loader or workers while training.
            test_batches = MicroBatches.over(data["test"], job, False, 0, num_workers=min(job.data.num_workers, 1))
            evaluate(f"iteration {state.iteration} on test set", per_chunk(test_batches, len(ddp)), "test")
            test_batches.close()
    checkpoint.finalize_async_saves(blocking=True)  # an exit waits for the save in flight to be published
    tensorboard.close()
    if rank == 0:
        logger.info("exiting: %s (%d skipped, %d non-finite iterations)", reason, state.skipped_iterations,
                    state.nan_iterations)
    distributed.destroy()
    return exit_code


def _evaluate_and_print(fb, step, chunks, num_microbatches: int, job: TrainingJob, state, tensorboard: TensorBoard,
                        prefix: str, iterators, split: str) -> None:
    """--eval-iters global batches of a split, printed and written to TensorBoard as Megatron-LM's
    evaluate_and_print_results does (its line: " validation loss at <prefix> | lm loss value: ... |");
    the valid split under "<loss> validation", the test split under "<loss> test"."""
    # The LM loss only: the aligner runs in training alone (its loss here is a structural 0).
    losses = {"lm loss": _evaluate(fb, step, chunks, iterators, job.logging.eval_iters, num_microbatches,
                                   job)["lm loss"]}
    line = f" validation loss at {prefix} | " + "".join(
        f"{key} value: {value:.6E} | {key} PPL: {math.exp(min(20, value)):.6E} | " for key, value in losses.items())
    if _last_rank_of_losses():
        print("-" * (len(line) + 1), line, "-" * (len(line) + 1), sep="\n", flush=True)
    scalars = {f"{key} {split}": value for key, value in losses.items()}
    tensorboard.write(scalars, state.iteration, state.consumed_samples, vs_samples=tuple(scalars))


def _evaluate(fb, step, chunks, iterators, iters: int, num_microbatches: int, job: TrainingJob) -> Dict[str, float]:
    """Mean losses over `iters` global batches (one collective each, one host read)."""
    for chunk in chunks:
        chunk.eval()
    stats = _iteration_stats(drop_nonfinite_losses=False)
    with torch.no_grad():
        for _ in range(iters):
            losses = fb(forward_step_func=step, data_iterator=iterators, model=chunks,
                        num_microbatches=num_microbatches, seq_length=job.data.seq_length,
                        micro_batch_size=job.schedule.micro_batch_size, forward_only=True)
            stats.reduce(losses)
    for chunk in chunks:
        chunk.train()
    return stats.read_interval().losses


def main(argv=None) -> int:
    from megatron_eve.training.arguments import parse_args

    try:
        job = parse_args(argv)
        code = run(job)
    except ConfigError as error:
        rank = int(os.environ.get("RANK", "0"))
        # Checks before work (before the process group) agree on every rank: rank 0 speaks for
        # all. Later errors may be this rank's own (its stage, a checkpoint file it read): it says so.
        if rank == 0 or dist.is_initialized() or isinstance(error, checkpoint_records.CheckpointLoadError):
            _print_error(str(error))
        else:
            # torchrun stops every rank as soon as one exits: a silent rank that exits first could
            # cut rank 0 off before it says why. Rank 0's exit ends this wait (torchrun stops us).
            time.sleep(SILENT_RANK_GRACE_SECONDS)
        code = 2
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 — any failure of the run (torch's CheckpointException too)
        # Printed as Python would print it (a file the run could not write or read, such as a
        # checkpoint on a full disk, in one line naming it), then let go of before exiting: an
        # uncaught exception stays referenced (sys.last_exc) through the interpreter's exit, and with
        # it the run's frames and their loaders, whose workers ignore SIGTERM (a scheduler's must not
        # kill them): multiprocessing's exit would wait on them forever and torchrun never see this
        # rank fail.
        if isinstance(error, OSError) and error.filename is not None:
            _print_error(os_error_line(error, None))
        else:
            traceback.print_exception(error)
        code = 130 if isinstance(error, KeyboardInterrupt) else 1
    gc.collect()  # a failed run's frames and their cycles: the loaders' iterators stop their workers as they go
    _stop_loader_workers()
    return code


def _print_error(message: str) -> None:
    """One error line, naming this rank when several run."""
    rank = int(os.environ.get("RANK", "0"))
    prefix = f"[rank {rank}] " if rank and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    print(f"{prefix}error: {message}", file=sys.stderr, flush=True)


def _stop_loader_workers() -> None:
    """Kill the daemonic child processes (the DataLoader workers) still running once the run is over:
    an error can stay referenced where gc cannot free it (a library thread's or queue's), and with it a
    loader iterator, so its workers were never told to stop. multiprocessing's exit would terminate
    them (SIGTERM), which they ignore, then wait on them forever. They hold nothing to save."""
    import multiprocessing

    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=10)
