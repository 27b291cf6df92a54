#!/usr/bin/env python3
"""Training throughput of megatron_eve vs the reference's stack, on the same synthetic samples.

ours:      EVE on megatron-core (this repo's layer spec: Transformer Engine, or torch's fused
           attention kernels, or the local path), packed sequences, bf16, megatron-core DDP and
           Adam, one GPU; each step as the trainer takes it (its check that the losses and
           gradients are finite and its host reads included).
--baseline hf: the same model in Hugging Face transformers (modeling_eve: LlamaForCausalLM with
           SDPA) on pad-to-longest micro-batches of the same samples, in random order and
           length-grouped (HF's group_by_length, as LLaVA's SFT samples), pure bf16 with torch's fused
           AdamW — the EVE reference's stack without DeepSpeed (and without the fp32 master weights
           that ours and DeepSpeed's bf16 keep: the baseline's optimizer step is the cheaper one).
           Its batches are built on the device before timing; ours are made on the device inside the
           timed steps from pinned host batches planned as a loader worker plans them, as the trainer
           makes them (the baseline is spared that work).

Both are timed over N steps back to back, from a synchronisation before the first to one after the
last, as a training loop runs them, on real (non-padding) tokens; TFLOP/s and MFU count the model
FLOPs of real tokens only, each side's from its own samples, the peak looked up from the device name
(H100 / H200: 989 dense bf16). The aligner is off in both (it needs the 304M CLIP teacher; pass
--aligner to time ours with a random teacher).

  python tools/bench_train.py --layers 4 --seq-length 4096 --steps 10 --baseline hf      # GPU
  python tools/bench_train.py --preset tiny --layers 2 --seq-length 512 --steps 2 --baseline hf  # CPU smoke
"""

import argparse
import dataclasses
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tools.bench_hf import run_hf  # noqa: E402
from tools.bench_profile import free_device_memory, peak_memory, profile_ours, timed_steps  # noqa: E402

if TYPE_CHECKING:
    from megatron_eve.config import RuntimeConfig


# Speed levers and whether the trainer pulls them by default (where they apply): --ablate turns
# a default one off, --try turns another on, one at a time, each timed between two runs of ours.
# lever: ({field: (its value with the lever on, off)}, on by default). The fields are RuntimeConfig's
# or a run's own (Setting's): the optimizer's fused AdamW, the packed rows per micro-batch.
LEVERS = {"grad-accumulation-fusion": ({"gradient_accumulation_fusion": (True, False)}, True),
          "fused-adam": ({"fused_adam": (True, False)}, True),
          "rope-fusion": ({"apply_rope_fusion": (True, False)}, True),
          # The LM loss's fused cross-entropy: this package's (on by default with CUDA) or megatron-core's.
          "torch-cross-entropy": ({"cross_entropy_loss_fusion": (True, False),
                                   "cross_entropy_fusion_impl": ("torch", "torch")}, True),
          "native-cross-entropy": ({"cross_entropy_loss_fusion": (True, None),
                                    "cross_entropy_fusion_impl": ("native", "torch")}, False),
          # varlen's flash kernels called directly, without its custom-op wrapper's host work.
          "aten-flash-attention": ({"attention_backend": ("aten-flash", "auto")}, False),
          # liger-kernel's Triton RMSNorm (forward and backward) instead of torch's fused one.
          "liger-rmsnorm": ({"norm_kernel": ("liger", "torch")}, False),
          # HF LlamaRMSNorm's arithmetic compiled by torch.compile instead of torch's fused RMSNorm.
          "compiled-rmsnorm": ({"norm_kernel": ("compiled", "torch")}, False),
          "compile-layers": ({"torch_compile_layers": (True, False)}, False),
          # Compiled with the weight-gradient accumulation unfused: the fused one mutates the main grads
          # inside the linears' backward, which splits each layer's graph at every linear (model/compile_layers.py).
          "compile-whole-layers": ({"torch_compile_layers": (True, False),
                                    "gradient_accumulation_fusion": (False, True)}, False),
          # Two packed rows per micro-batch (--micro-batch-size 2; the same rows, half the micro-batches):
          # GEMMs over 8192 tokens, each weight's main grad read and written half as often.
          "micro-batch-size-2": ({"micro_batch_size": (2, 1)}, False)}
ABLATIONS = tuple(lever for lever, (_, default) in LEVERS.items() if default)
TRIALS = tuple(lever for lever, (_, default) in LEVERS.items() if not default)


@dataclasses.dataclass(frozen=True)
class Setting:
    """How one run of ours trains: the runtime config and the run's own fields."""

    runtime: "RuntimeConfig"
    fused_adam: bool = True
    micro_batch_size: int = 1


RUN_FIELDS = tuple(field.name for field in dataclasses.fields(Setting) if field.name != "runtime")


def with_lever(setting: Setting, lever: str, on: bool) -> Setting:
    """`setting` with one lever pulled or released."""
    values = {field: both[0 if on else 1] for field, both in LEVERS[lever][0].items()}
    own = {field: value for field, value in values.items() if field in RUN_FIELDS}
    runtime = dataclasses.replace(setting.runtime, **{f: v for f, v in values.items() if f not in own})
    return dataclasses.replace(setting, runtime=runtime, **own)


def sample_stream(count, model, rng):
    """LLaVA-mix-665K-like samples: lognormal text, ~85% with one image of random aspect ratio."""
    from megatron_eve.data.images import image_layout, teacher_layout, token_grid, tokens_per_image
    from megatron_eve.model.visual_layout import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    vision, vocab = model.vision, model.language.vocab_size
    samples = []
    for _ in range(count):
        text = int(np.clip(rng.lognormal(4.8, 0.8), 16, 1500))
        tokens = [1] + rng.integers(3, vocab, text).tolist()
        labels = [IGNORE_INDEX] * (text // 3) + tokens[text // 3 + 1:] + [IGNORE_INDEX]
        sample = {"image": None}
        if rng.random() < 0.85:
            width, height = int(rng.integers(200, 1000)), int(rng.integers(200, 1000))
            layout = image_layout(width, height, vision)
            run = tokens_per_image(*token_grid(width, height, vision))
            sample["image"] = rng.integers(0, 256, (layout.height, layout.width, 3), dtype=np.uint8)
            base = teacher_layout(width, height, vision)
            sample["teacher"] = rng.integers(0, 256, (base.height, base.width, 3), dtype=np.uint8)
            sample["grid"] = token_grid(width, height, vision)
            tokens = tokens[:6] + [IMAGE_TOKEN_INDEX] * run + tokens[6:]
            labels = [IGNORE_INDEX] * (6 + run) + labels[6:]
        sample["tokens"], sample["labels"] = np.asarray(tokens), np.asarray(labels)
        samples.append(sample)
    return samples


def as_row_sample(s):
    has = s["image"] is not None
    return {"tokens": s["tokens"], "labels": s["labels"], "image_grids": [s["grid"]] if has else [],
            "images": [s["image"]] if has else [], "teacher_images": [s["teacher"]] if has else []}


def save_figures(path, figures) -> None:
    """bench.json under a temporary name, then renamed: a run killed at its time limit mid-write
    leaves the previous figures whole, not an empty file."""
    from megatron_eve.atomic import write_text

    write_text(str(path), json.dumps(figures, indent=1))


def run_ours(args, model_cfg, samples, setting: Setting):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_eve.data.dataset import assemble_sequence
    from megatron_eve.data.loader import BatchPlan, collate, model_inputs
    from megatron_eve.data.packing import pack
    from megatron_eve.model.build import build_model
    from megatron_eve.platform import current_device
    from megatron_eve.training.iteration_stats import IterationStats
    from megatron_eve.training.metrics import BatchWork, micro_batch_work
    from megatron_eve.training.optim import build_optimizer, use_fused_torch_adam, wrap_model
    from megatron_eve.training.step import forward_step
    from megatron_eve.training.update import reduce_and_update
    from megatron_eve.config import OptimConfig, ParallelConfig, ScheduleConfig, TrainingJob

    runtime, per = setting.runtime, setting.micro_batch_size
    if args.micro_batches % per:
        raise ValueError(f"--micro-batches {args.micro_batches} is not a multiple of the micro-batch size {per}")
    model = build_model(model_cfg, ParallelConfig(), runtime, load_teacher=args.aligner)
    job = TrainingJob(model_cfg, ParallelConfig(), runtime, OptimConfig(lr=1e-5), ScheduleConfig(train_iters=1),
                      None, None, None)
    ddp = wrap_model(model, job)
    optimizer = build_optimizer(ddp, job)
    if not setting.fused_adam:
        use_fused_torch_adam(optimizer, fused=False)
    lengths = np.asarray([len(s["tokens"]) for s in samples])
    plan = pack(lengths, args.seq_length, 10000, np.random.default_rng(0))
    device, thd = current_device(), runtime.uses_thd()
    sequences = [assemble_sequence([as_row_sample(samples[i]) for i in plan.sequence(k)], args.seq_length)
                 for k in range(len(plan))]
    # Micro-batches of `per` consecutive rows, cycling: every micro-batch size takes the same rows in
    # the same order. As the trainer's loader delivers them: collated with the index plan a worker makes,
    # in pinned memory on a GPU machine; each step makes their model inputs on the device as it goes.
    groups = len(sequences) // math.gcd(len(sequences), per)
    rows = [collate([sequences[(g * per + i) % len(sequences)] for i in range(per)],
                    BatchPlan.of(model_cfg.vision, thd=thd)) for g in range(groups)]
    rows = list(torch.utils.data.DataLoader(rows, batch_size=None, collate_fn=lambda row: row,
                                            pin_memory=device.type == "cuda"))
    fb = get_forward_backward_func()
    step = lambda it, m: forward_step(1.0 if args.aligner else 0.0, it, m)  # noqa: E731
    per_step, cursor = args.micro_batches // per, 0
    stats = IterationStats(device, counts_losses=True, counts_work=False)

    def train_step():
        nonlocal cursor
        chunk = [rows[(cursor + i) % len(rows)] for i in range(per_step)]
        cursor += per_step
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        inputs = (model_inputs(r, model_cfg.vision, device, dtype=runtime.params_dtype, thd=thd) for r in chunk)
        losses = fb(forward_step_func=step, data_iterator=inputs, model=[ddp], num_microbatches=len(chunk),
                    seq_length=args.seq_length, micro_batch_size=per, forward_only=False)
        # What the trainer does between backward and update (training/loop.py): the all-ranks flags
        # (whether the losses and gradients are finite) and the update they allow.
        if not reduce_and_update(optimizer, stats, losses, [buffer.grad_data for buffer in ddp.buffers]).finite:
            raise RuntimeError("a non-finite loss or gradient in the benchmark")
        return chunk

    chunks, seconds = timed_steps(train_step, args.warmup, args.steps)
    # The frozen teacher's forward is work too, counted as the trainer counts it (training/loop.py).
    teacher_params = 0 if model.teacher is None else sum(p.numel() for p in model.teacher.model.parameters())
    work = BatchWork()
    for raw in (micro_batch for chunk in chunks for micro_batch in chunk):
        work.add(micro_batch_work(raw, model_cfg, args.aligner, teacher_params))
    memory = peak_memory()
    profiled = (profile_ours(train_step, args.profile, seconds / args.steps, getattr(args, "profile_title", None))
                if args.profile else None)
    return work, seconds, memory, len(plan), profiled


def bench_model_config(args, layers: int):
    """The preset at `layers` layers with the width flags applied."""
    from megatron_eve.config import get_preset, replace

    changes = {"language.num_layers": layers, "aligner.enabled": args.aligner,
               "aligner.tap_interval": max(1, layers // 8) if layers % 8 else None}
    for name in ("hidden_size", "ffn_hidden_size", "num_attention_heads"):
        if getattr(args, name):
            changes[f"language.{name}"] = getattr(args, name)
            if name == "num_attention_heads":
                changes["language.num_query_groups"] = getattr(args, name)
    return replace(get_preset(args.preset), **changes)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Without CUDA the defaults are a smoke test's: EVE-7B width at 4096 positions needs ~24 GiB of host memory.
    gpu = torch.cuda.is_available()
    parser.add_argument("--preset", default="eve-7b" if gpu else "tiny", help="default: eve-7b (tiny without CUDA)")
    parser.add_argument("--layers", type=int, default=4 if gpu else 2, help="default: 4 (2 without CUDA)")
    parser.add_argument("--hidden-size", type=int, default=None)
    parser.add_argument("--ffn-hidden-size", type=int, default=None)
    parser.add_argument("--num-attention-heads", type=int, default=None)
    parser.add_argument("--seq-length", type=int, default=4096 if gpu else 512, help="default: 4096 (512 without CUDA)")
    parser.add_argument("--micro-batches", type=int, default=4, help="packed sequences per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--bf16", action="store_true", default=torch.cuda.is_available())
    parser.add_argument("--transformer-impl", default="auto")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--recompute", choices=("none", "selective", "full"), default="none")
    parser.add_argument("--aligner", action="store_true")
    parser.add_argument("--baseline", choices=("none", "hf"), default="none")
    parser.add_argument("--hf-micro-batch-size", type=int, default=4)
    parser.add_argument("--hf-gradient-checkpointing", action="store_true")
    parser.add_argument("--hf-order", choices=("random", "length-grouped", "both"), default="both",
                        help="the HF baseline's sampling: random, length-grouped (HF's group_by_length, as "
                             "LLaVA's SFT uses), or both (the speed-up is then against the faster)")
    parser.add_argument("--ablate", nargs="+", default=[], choices=ABLATIONS, metavar="LEVER",
                        help="after the main run, time ours again with each of these turned off, one at a "
                             f"time ({', '.join(ABLATIONS)}): what each is worth, measured in the same run")
    parser.add_argument("--try", dest="trials", nargs="+", default=[], choices=TRIALS, metavar="LEVER",
                        help=f"likewise, time ours again with each of these turned on ({', '.join(TRIALS)})")
    parser.add_argument("--combine", nargs="?", type=float, const=1.01, default=None, metavar="MIN_GAIN",
                        help="after the --try levers, time ours with every one of them that gained more than "
                             "MIN_GAIN (default 1.01) on together: the deepest model with each --also-micro-batches "
                             "count, then at --layers and each --also-layers depth")
    parser.add_argument("--combine-only-deepest", action="store_true",
                        help="with --combine, only the deepest model with each --also-micro-batches count")
    parser.add_argument("--also-layers", nargs="+", type=int, default=[], metavar="N",
                        help="after the levers, time ours again at each of these depths (same width and "
                             "batches): a deeper model puts less weight on the LM head, embedding and optimizer")
    parser.add_argument("--also-micro-batches", nargs="+", type=int, default=[], metavar="N",
                        help="before the levers, time ours with N micro-batches a step at each depth, the "
                             "deepest first (as many micro-batches in all as the main run, at least 3 steps): the "
                             "optimizer's step spread over more tokens, as a larger global batch (or the "
                             "distributed optimizer's sharding over data-parallel ranks) does; 16 rows of 4096 "
                             "hold about EVE's SFT global batch (128 samples of ~514 positions)")
    parser.add_argument("--profile-deepest", action="store_true",
                        help="with --profile, also profile the deepest --also-layers run (at --micro-batches a step: "
                             "a profile's events grow with layers x micro-batches), appended to DIR/profile.txt: "
                             "where the time goes nearest a full model")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="after timing, profile two of our steps into DIR/profile.txt (top kernels, "
                             "host ops, GPU busy share, host synchronisations per step)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.combine_only_deepest and not args.also_micro_batches:
        parser.error("--combine-only-deepest times the deepest model with each --also-micro-batches count: give one")

    from megatron_eve import distributed
    from megatron_eve.config import ParallelConfig, RuntimeConfig
    from megatron_eve.model.specs import resolve_transformer_impl
    from megatron_eve.training.metrics import peak_tflops

    distributed.initialize(ParallelConfig())
    model_cfg = bench_model_config(args, args.layers)
    if args.aligner:
        from tools.make_synthetic_corpus import save_random_teacher

        model_cfg.aligner.teacher_path = tempfile.mkdtemp(prefix="teacher_")
        save_random_teacher(model_cfg.aligner.teacher_path, args.preset, 0)
    runtime = RuntimeConfig(transformer_impl=args.transformer_impl, attention_backend=args.attention_backend,
                            bf16=args.bf16, recompute_granularity=None if args.recompute == "none" else args.recompute,
                            recompute_method="uniform" if args.recompute == "full" else None,
                            recompute_num_layers=1 if args.recompute == "full" else None)
    setting = Setting(runtime)
    samples = sample_stream(args.samples, model_cfg, np.random.default_rng(0))
    peak = peak_tflops()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    lm = model_cfg.language
    print(f"{device}: {lm.num_layers} layers, hidden {lm.hidden_size}, FFN {lm.ffn_hidden_size}, "
          f"{lm.num_attention_heads} heads, seq {args.seq_length}, {'bf16' if args.bf16 else 'fp32'}, "
          f"impl {resolve_transformer_impl(args.transformer_impl)}, {len(samples)} samples "
          f"(mean {np.mean([len(s['tokens']) for s in samples]):.0f} positions)")

    figures = {"device": device, "layers": lm.num_layers, "hidden_size": lm.hidden_size,
               "seq_length": args.seq_length, "bf16": args.bf16,
               "transformer_impl": resolve_transformer_impl(args.transformer_impl), "peak_tflops": peak}

    def save():
        # After every figure: a run stopped at its time limit keeps what it measured.
        if args.json:
            save_figures(args.json, figures)

    def report(key, name, work, seconds, memory):
        tokens = work.real_tokens / max(seconds, 1e-9)
        tflops = work.flops / max(seconds, 1e-9) / 1e12
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
        print(f"  {name:42s} {tokens:10.0f} tokens/s/GPU  {tflops:7.2f} TFLOP/s/GPU  MFU {mfu:>6s}  "
              f"peak memory {memory:6.1f} GiB")
        figures[key] = {"tokens_per_s_per_gpu": tokens, "tflops_per_gpu": tflops,
                        "mfu": tflops / peak if peak else None, "peak_memory_gib": memory,
                        "real_tokens": work.real_tokens, "seconds": seconds}
        save()
        return tokens

    def first_run(run_args):
        """Ours' first run. If it fails, the run again without torch's fused AdamW (so without the update's
        device-side skip: its host read before the step, megatron-core's own clipping), the error kept:
        every figure of ours after it is still measured, in that setting."""
        nonlocal setting
        try:
            return run_ours(run_args, model_cfg, samples, setting)
        except Exception as error:
            figures["ours_fallback"] = {"error": f"{type(error).__name__}: {error}"[:500]}
            print(f"  ours failed: {figures['ours_fallback']['error']}\n  again without the fused AdamW")
            save()
        # Out of the except block: its traceback no longer holds the failed run's model and optimizer.
        free_device_memory()
        setting = with_lever(setting, "fused-adam", False)
        measured = run_ours(run_args, model_cfg, samples, setting)
        figures["ours_fallback"]["setting"] = "fused-adam off"  # every run of ours from here
        save()
        return measured

    if torch.cuda.is_available():
        # A process's first runs are slower (inductor's compile workers, cuBLAS heuristics, the allocator
        # growing: 67k against 78k-81k tokens/s for the runs after it on an H100). After an untimed run of
        # two steps the timed one was still ~10% under the runs after it, the difference all GPU idle time;
        # likely because each run starts at the first batch, so that short run had met only 20 of the timed
        # run's 51 micro-batches and their shapes (the PEL's GEMMs, the compiled kernels' guards). An
        # untimed run as long as the timed one meets them all first: what is timed is the steady state.
        first_run(argparse.Namespace(**{**vars(args), "profile": None}))
        free_device_memory()
        work, seconds, memory, sequences, profiled = run_ours(args, model_cfg, samples, setting)
    else:
        work, seconds, memory, sequences, profiled = first_run(args)
    ours = report("ours", f"megatron_eve (packed, {sequences} seq)", work, seconds, memory)
    if profiled:
        figures["profile"] = profiled
        save()
    # The baseline before the levers: the speed-up is the figure a time limit must not cut.
    if args.baseline == "hf":
        args._ours_tokens_per_step = work.real_tokens / args.steps
        orders = ("random", "length-grouped") if args.hf_order == "both" else (args.hf_order,)
        best = 0.0
        for order in orders:
            free_device_memory()
            key = "hf" if order == "random" else "hf_length_grouped"
            try:
                hf_work, hf_seconds, hf_memory = run_hf(args, model_cfg, samples, order == "length-grouped")
            except Exception as error:  # reported; the levers are still measured
                figures[key] = {"error": f"{type(error).__name__}: {error}"[:500]}
                print(f"  HF ({order}): failed: {figures[key]['error']}")
                save()
                continue
            best = max(best, report(key, f"HF transformers (padded, {order})", hf_work, hf_seconds, hf_memory))
        if best:
            figures["speedup"] = ours / best
            print(f"  speed-up over the faster HF baseline: {figures['speedup']:.2f}x tokens/s")
            save()
    variant_args = argparse.Namespace(**{**vars(args), "profile": None})

    def at_depth(layers, variant: Setting, key, name, profile=False, micro_batches=None):
        """Ours at another depth (same width and batches; `micro_batches` per step when given, over as many
        micro-batches in all as the main run's steps, at least 3 steps); a failure costs this figure only.
        With `profile`, its steps profiled too, appended to the main run's profile."""
        deeper = bench_model_config(args, layers)
        deeper.aligner.teacher_path = model_cfg.aligner.teacher_path
        free_device_memory()
        count = micro_batches or args.micro_batches
        run_args = argparse.Namespace(**{
            **vars(variant_args), "profile": args.profile if profile else None, "profile_title": name,
            "micro_batches": count, "steps": max(min(3, args.steps), round(args.steps * args.micro_batches / count)),
            "warmup": max(min(1, args.warmup), math.ceil(args.warmup * args.micro_batches / count))})
        try:
            work, seconds, memory, _, profiled = run_ours(run_args, deeper, samples, variant)
            report(key, name, work, seconds, memory)
            if profiled:
                figures[key]["profile"] = profiled
                save()
        except Exception as error:  # e.g. out of memory
            figures[key] = {"error": f"{type(error).__name__}: {error}"[:500]}
            print(f"  {name}: failed: {figures[key]['error']}")
            save()

    # The deepest model with the most micro-batches a step first: the figure nearest a full model's
    # training, which a time limit must not cut.
    for count in args.also_micro_batches:
        for layers in sorted({args.layers, *args.also_layers}, reverse=True):
            at_depth(layers, setting, f"ours_{layers}_layers_{count}_micro_batches",
                     f"megatron_eve at {layers} layers, {count} micro-batches a step", micro_batches=count)
    # Each variant runs between two runs of ours and is compared with their mean: the runs' order
    # (allocator and compile caches warm, clocks) then cancels instead of landing on one lever.
    ours_runs = [ours]

    def timed(variant: Setting):
        free_device_memory()
        return run_ours(variant_args, model_cfg, samples, variant)

    def ours_again():
        work, seconds = timed(setting)[:2]
        ours_runs.append(work.real_tokens / max(seconds, 1e-9))

    levers = [(lever, False) for lever in args.ablate] + [(lever, True) for lever in args.trials]
    if "ours_fallback" in figures and ("fused-adam", False) in levers:
        levers.remove(("fused-adam", False))  # ours already runs without it: nothing to compare
        figures["without_fused-adam"] = {"error": "not timed: ours runs without the fused AdamW (ours_fallback)"}
        save()
    if levers:  # the first lever's bracket: two runs after the main one (which can still be the slower)
        ours_again()
    for lever, on in levers:
        key = f"{'with' if on else 'without'}_{lever}"
        try:
            variant = timed(with_lever(setting, lever, on))
        except Exception as error:  # one lever that fails here costs its own figure only
            figures[key] = {"error": f"{type(error).__name__}: {error}"[:500]}
            print(f"  {key.replace('_', ' ')}: failed: {figures[key]['error']}")
            save()
            continue
        tokens = report(key, f"  {key.replace('_', ' ')}", *variant[:3])
        ours_again()
        reference = (ours_runs[-2] + ours_runs[-1]) / 2
        # What pulling the lever gains: > 1 means faster with it on.
        gain = tokens / reference if on else reference / max(tokens, 1e-9)
        figures[key].update(gain_of_lever=gain, reference_tokens_per_s=reference)
        figures["ours_runs_tokens_per_s"] = ours_runs
        save()
        print(f"    {lever}: {gain:.3f}x tokens/s with it on (ours again: {ours_runs[-1]:.0f} tokens/s)")
    if len(ours_runs) > 1:
        # The default setting timed several times in this process: its median is the steady figure.
        steady = float(np.median(ours_runs))
        figures["ours_steady"] = {"tokens_per_s_per_gpu": steady, "runs": len(ours_runs),
                                  "mfu": figures["ours"]["mfu"] * steady / ours if figures["ours"]["mfu"] else None}
        figures["ours_runs_tokens_per_s"] = ours_runs  # also when every lever failed: the runs the median is of
        mfu = figures["ours_steady"]["mfu"]
        print(f"  megatron_eve, median of {len(ours_runs)} runs: {steady:.0f} tokens/s/GPU"
              + (f"  MFU {100 * mfu:.1f}%" if mfu else ""))
        save()
    if args.combine is not None:
        # Levers need not add up: the ones that paid, together. Of two that set one field
        # (the two RMSNorms; compile-layers, compile-whole-layers), the better one. Before the depth runs at the main
        # micro-batch count: the deepest model with the most micro-batches a step and every paying lever
        # is the likeliest best figure, which a time limit must not cut.
        def gain(lever):
            return figures.get(f"with_{lever}", {}).get("gain_of_lever", 0)

        paying, fields_set = [], set()
        for lever in sorted(args.trials, key=gain, reverse=True):
            fields = set(LEVERS[lever][0])
            if gain(lever) > args.combine and not fields_set & fields:
                paying.append(lever)
                fields_set |= fields
        figures["combined_levers"] = paying
        save()
        combined = setting
        for lever in paying:
            combined = with_lever(combined, lever, True)
        depths = [args.layers, *args.also_layers] if paying else []
        deepest = max(depths, default=args.layers)
        for count in args.also_micro_batches if paying else []:
            at_depth(deepest, combined, f"combined_{deepest}_layers_{count}_micro_batches",
                     f"megatron_eve at {deepest} layers, {count} micro-batches a step, with {' + '.join(paying)}",
                     micro_batches=count)
        for layers in [] if args.combine_only_deepest else depths:
            # The deepest run, the one nearest a full model, profiled too: where its time goes.
            at_depth(layers, combined, f"combined_{layers}_layers",
                     f"megatron_eve at {layers} layers with {' + '.join(paying)}", profile=layers == deepest)
    # The main micro-batch count at the other depths, after the levers (the deepest run profiled: its
    # events, and so the profile's own time, grow with layers x micro-batches).
    for layers in args.also_layers:
        at_depth(layers, setting, f"ours_{layers}_layers", f"megatron_eve at {layers} layers",
                 profile=args.profile_deepest and layers == max(args.also_layers))
    distributed.destroy()
    if args.baseline == "hf" and "speedup" not in figures:
        sys.exit("the HF baseline failed: no speed-up measured")


if __name__ == "__main__":
    main()
