"""Timing a benchmark's steps and where their time goes (tools/bench_train.py, --profile): steps
timed back to back, peak memory between runs; the top kernels and host ops, the share of the step
time each kernel family takes and the GPU idles, and the host synchronisations inside a step."""

import collections
import os
import time
import warnings
from pathlib import Path
from typing import Optional

import torch


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_waits(fn):
    """Runs fn under torch's CUDA synchronisation check: (what fn returned, {"file:line": count} of
    every place the host waited for the device meanwhile)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return result, collections.Counter(f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught
                                       if "synchroniz" in str(w.message))


def free_device_memory():
    """Between runs: the previous run's model and optimizer go, the peak counter restarts."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**30


def timed_steps(train_step, warmup: int, steps: int):
    """(what each timed step returned, seconds): `warmup` steps, then `steps` steps back to back, timed
    from a synchronisation before the first to one after the last, as a training loop runs them (none
    waits for the device after its optimizer step: the next step's host work overlaps it)."""
    for _ in range(warmup):
        train_step()
    sync()
    start = time.time()
    results = [train_step() for _ in range(steps)]
    sync()
    return results, time.time() - start


# Kernel families by name: CUDA kernels, or on the CPU the aten ops doing the work. First match wins.
KERNEL_FAMILIES = (
    ("attention", ("flash", "fmha", "attention", "varlen", "flex")),
    ("gemm", ("gemm", "nvjet", "cutlass", "cublas", "xmma", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("optimizer", ("adam", "multi_tensor")),
    ("communication", ("nccl", "gloo", "allreduce", "all_gather", "allgather", "reduce_scatter")),
    ("copy", ("memcpy", "memset", "copy")),
)


# Device-timeline entries of the profiler itself, not work.
PROFILER_OWN = ("Activity Buffer Request",)


def kernel_family(name: str) -> str:
    lowered = name.lower()
    return next((family for family, marks in KERNEL_FAMILIES if any(m in lowered for m in marks)), "elementwise/other")


def timed_work(prof, on_gpu: bool) -> list:
    """(name, microseconds) of what did the work in a profile: on the GPU its kernels and copies,
    not the ranges that the optimizer's and other record_function annotations also put on the
    device timeline (counting those too gave the optimizer twice its time); on the CPU the aten
    ops' own time."""
    if on_gpu:
        return [(e.name, e.self_device_time_total) for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
                and e.name not in PROFILER_OWN]
    return [(e.key, e.self_cpu_time_total) for e in prof.key_averages() if e.key.startswith("aten::")]


def idle_gaps(prof, top: int = 12, at_least_us: float = 50.0) -> list:
    """Where the GPU waited within the profiled steps: the longest stretches with no kernel or copy
    running (merged over streams), each with the work just before and just after it and its start
    (ms into the profile), so that a gap points at the host work, synchronisation or launch burst
    that caused it. (The profiler's host overhead lengthens gaps; where they are is what counts.)"""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA
                   and not getattr(e, "is_user_annotation", False) and e.name not in PROFILER_OWN)
    if not spans:
        return []
    origin, gaps, busy_until, last = spans[0][0], [], spans[0][1], spans[0][2]
    for start, end, name in spans[1:]:
        if start - busy_until >= at_least_us:
            gaps.append({"us": start - busy_until, "at_ms": (busy_until - origin) / 1e3, "after": last[:60],
                         "before": name[:60]})
        if end > busy_until:
            busy_until, last = end, name
    return sorted(gaps, key=lambda gap: -gap["us"])[:top]


def time_shares(timed: list, whole_us=None) -> dict:
    """Where the time of `timed_work` went, by kernel family, as shares of `whole_us` with the rest
    as idle (no kernel running: launch gaps, host work, synchronisations); without `whole_us`, as
    shares of the work's own time."""
    families = {}
    for name, us in timed:
        families[kernel_family(name)] = families.get(kernel_family(name), 0.0) + us
    whole = whole_us or max(sum(families.values()), 1e-9)
    shares = {family: us / whole for family, us in sorted(families.items(), key=lambda item: -item[1])}
    if whole_us:
        shares["idle"] = max(0.0, 1.0 - sum(shares.values()))
    return shares


def profile_ours(step_fn, folder, timed_step_s: float, title: Optional[str] = None):
    """Profiles two more of our steps: the kernels and host ops that cost most, the share of the
    step time each kernel family takes (and the GPU idles), and every host synchronisation inside a
    step (by source line; CUDA only), into folder/profile.txt (appended under `title` when given).
    Returns the shares and the synchronisation count.

    The shares are of the unprofiled step time (`timed_step_s`, from the timed steps): the
    profiler's own host overhead slows a launch-bound step (on an H100, 311 ms a step profiled
    against 232 ms timed) and would show as GPU idle time that a run without it does not have."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(folder, exist_ok=True)
    on_gpu = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    step_fn()
    sync()
    start = time.time()
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(2):
            step_fn()
        sync()
    wall = time.time() - start
    averages = prof.key_averages()
    timed = timed_work(prof, on_gpu)
    kernel_us = sum(us for _, us in timed) if on_gpu else 0.0
    shares = time_shares(timed, 2 * timed_step_s * 1e6 if on_gpu else None)
    lines = [f"2 steps: wall {wall * 1e3:.1f} ms profiled, {2 * timed_step_s * 1e3:.1f} ms timed; GPU kernel "
             f"time {kernel_us / 1e3:.1f} ms ({100 * kernel_us / 1e6 / max(2 * timed_step_s, 1e-9):.1f}% of the "
             "timed steps)",
             "time shares" + (" of the timed steps: " if on_gpu else " of aten ops' time: ")
             + ", ".join(f"{family} {100 * share:.1f}%" for family, share in shares.items())]
    gaps = idle_gaps(prof) if on_gpu else []
    if gaps:
        lines.append(f"longest GPU idle gaps (of {len(gaps)} shown, {sum(g['us'] for g in gaps) / 1e3:.1f} ms; "
                     "profiled, so longer than unprofiled):")
        lines += [f"  {g['us'] / 1e3:7.2f} ms at {g['at_ms']:7.1f} ms  after {g['after']}  before {g['before']}"
                  for g in gaps]
    syncs = collections.Counter()
    if on_gpu:
        _, syncs = host_waits(lambda: (step_fn(), sync()))
        lines.append(f"host synchronisations in one step: {sum(syncs.values())}")
        lines += [f"  {count:5d}  {where}" for where, count in syncs.most_common(25)]
    sort = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    lines += ["", averages.table(sort_by=sort, row_limit=30, max_name_column_width=70),
              "", averages.table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=70)]
    if title:
        with open(Path(folder, "profile.txt"), "a") as out:
            out.write(f"\n\n===== {title}\n" + "\n".join(lines) + "\n")
    else:
        Path(folder, "profile.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:3 + (len(gaps) + 1 if gaps else 0) + min(len(syncs), 25)]))
    return {"wall_ms_two_steps": wall * 1e3, "timed_ms_two_steps": 2 * timed_step_s * 1e3,
            "kernel_ms_two_steps": kernel_us / 1e3, "time_shares": shares,
            "host_syncs_per_step": sum(syncs.values()) if on_gpu else None, "idle_gaps": gaps}
