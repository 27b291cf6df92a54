"""pretrain_eve.py end to end on 2 CPU processes: the three stages, kernels and layouts against the
local path, fp16, overlapped communication, TensorBoard scalars (resume, SIGTERM and failing runs:
test_training_resume.py; the checks before work: test_training_preflight.py)."""

import json
import math
import re
import subprocess
import sys

import pytest
import torch

from megatron_eve.config import ConfigError
from megatron_eve.training.arguments import parse_args
from tests.helpers import ROOT, base_args, final_evaluations, launch, train, validations


def checkpoint_diff(a, b):
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "parallel" / "checkpoint_diff.py"), a, b],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_three_stages(data, tmp_path):
    """prealign (TP=2) → pretrain (PP=2, from prealign) → finetune (TP=2 + SP, from pretrain)."""
    pre, out = train(base_args(data) + ["--tensor-model-parallel-size", 2, "--train-iters", 4, "--save",
                                        tmp_path / "pre", "--save-interval", 2, "--tensorboard-dir", tmp_path / "tb",
                                        "--vision-lr", "5e-4", "--lr-decay-style", "cosine"])
    assert sorted(pre) == [1, 2, 3, 4]
    assert pre[4][1] < pre[1][1]  # the aligner learns
    # Prealign trains the PEL, projector and aligner; the language model stays bit-identical.
    diff = checkpoint_diff(str(tmp_path / "pre" / "iter_0000002"), str(tmp_path / "pre" / "iter_0000004"))
    llm = {k: v for k, v in diff.items() if k.startswith(("decoder.", "embedding.", "output_layer."))}
    vision = {k: v for k, v in diff.items() if k.startswith(("vision_model.", "vision_projection.", "aligner."))}
    assert llm and all(v == 0.0 for v in llm.values()), llm
    assert vision and all(v > 0.0 for v in vision.values())

    mid, out = train(base_args(data, "pretrain") + ["--pipeline-model-parallel-size", 2, "--train-iters", 3,
                                                    "--load", tmp_path / "pre", "--finetune", "--save", tmp_path / "mid"])
    assert sorted(mid) == [1, 2, 3]  # a new stage restarts its iteration count
    diff = checkpoint_diff(str(tmp_path / "pre" / "iter_0000004"), str(tmp_path / "mid" / "iter_0000003"))
    assert all(v > 0.0 for k, v in diff.items() if k.startswith("decoder."))  # now the LLM trains

    # --pretrained-checkpoint starts from the previous stage only while --load holds nothing.
    sft_args = base_args(data, "finetune", "qa") + ["--tensor-model-parallel-size", 2, "--sequence-parallel",
                                                    "--pretrained-checkpoint", tmp_path / "mid", "--load",
                                                    tmp_path / "sft", "--save", tmp_path / "sft",
                                                    "--lr-decay-iters", 3]  # the resume keeps the schedule
    sft, out = train(sft_args + ["--train-iters", 2])
    assert sorted(sft) == [1, 2] and all(v[0] > 0 for v in sft.values())
    more, out = train(sft_args + ["--train-iters", 3])
    assert sorted(more) == [3]  # resumed from its own checkpoint, not restarted from "mid"

    # TensorBoard holds the console's figures under Megatron's names.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tensorboard.compat.proto import types_pb2
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    tags = set(events.Tags()["tensors"])
    for tag in ("lm loss", "align loss", "learning-rate", "grad-norm", "throughput",
                "tokens-per-sec-per-gpu", "packing-efficiency", "iteration-time", "mem-rss-bytes"):
        assert tag in tags, (tag, sorted(tags))
    # The charts against consumed samples are a run of their own (TensorBoard purges each folder at one step).
    by_samples = EventAccumulator(str(tmp_path / "tb" / "vs-samples"), size_guidance={"tensors": 0})
    by_samples.Reload()
    assert {"lm loss vs samples", "align loss vs samples",
            "learning-rate vs samples"} <= set(by_samples.Tags()["tensors"])

    def scalars(tag):
        return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]

    assert [step for step, _ in scalars("lm loss")] == [1, 2, 3, 4]
    assert abs(scalars("lm loss")[0][1] - pre[1][0]) < 1e-5
    # Grad norms as doubles; the console prints them as Megatron-LM does, with 3 decimals.
    assert events.Tensors("grad-norm")[0].tensor_proto.dtype == types_pb2.DT_DOUBLE
    assert abs(scalars("grad-norm")[0][1] - pre[1][2]) <= 5e-4
    # Prealign trains only what --vision-lr steers: that is the learning rate reported.
    assert "vision-learning-rate" not in tags
    rates = [lr for _, lr in scalars("learning-rate")]
    # Cosine over 4 iterations from --vision-lr 5e-4 (the base --lr 1e-3 would give 8.54e-4 first).
    assert abs(rates[0] - 5e-4 * 0.5 * (1 + math.cos(math.pi / 4))) < 1e-9 and max(rates) <= 5e-4


def test_torch_kernels_and_thd_train_like_the_local_path(data, tmp_path):
    """--transformer-impl torch with packed THD batches (cu_seqlens; SDPA's CPU fallback here) gives
    the local path's losses step for step (TP=2, same seed); so do its layers compiled
    (--torch-compile-layers, compiled for the CPU here), with sequence parallelism and full
    recompute inside the compiled layers too."""
    args = base_args(data, "pretrain") + ["--tensor-model-parallel-size", 2, "--train-iters", 3]
    local, _ = train(args + ["--transformer-impl", "local"])
    fused, _ = train(args + ["--transformer-impl", "torch", "--packed-attention", "thd"])
    compiled, _ = train(args + ["--transformer-impl", "torch", "--packed-attention", "thd", "--torch-compile-layers",
                                "--sequence-parallel", "--recompute-granularity", "full",
                                "--recompute-method", "uniform"])
    assert sorted(local) == sorted(fused) == sorted(compiled) == [1, 2, 3]
    for iteration in (1, 2, 3):
        for ours, theirs in zip(fused[iteration][:2], local[iteration][:2]):
            assert abs(ours - theirs) <= 1e-4 * max(1.0, abs(theirs))
        for ours, theirs in zip(compiled[iteration][:2], fused[iteration][:2]):
            assert abs(ours - theirs) <= 1e-5 * max(1.0, abs(theirs))
        # The grad norm too, as printed (3 decimals, as Megatron-LM's).
        assert abs(compiled[iteration][2] - fused[iteration][2]) <= 1e-3 + 1e-5 * fused[iteration][2]


def test_fp16_scales_its_loss_and_skips_the_steps_that_overflow(data, tmp_path):
    """--fp16: megatron-core's schedule scales each micro-batch's loss by the optimizer's loss scale
    (the hook Megatron-LM sets) and the step unscales the gradients. A static --loss-scale trains as
    fp32 does, grad norm included (the gradients had reached AdamW divided by the scale: no update
    at 2^32); the dynamic scale's first steps overflow and are skipped iterations while the scale
    backs off, as in Megatron-LM, not non-finite ones that stop the run."""
    args = base_args(data, "pretrain") + ["--train-iters", 3]
    fp32, _ = train(args, nproc=1)
    static, out = train(args + ["--fp16", "--loss-scale", 1024], nproc=1)
    assert "loss scale: 1024.0 |" in out
    for iteration in (1, 2, 3):
        for ours, theirs in zip(static[iteration], fp32[iteration]):
            assert abs(ours - theirs) <= 1e-2 * max(1.0, abs(theirs)), (iteration, static, fp32)
    # From 2^20 the tiny model's scaled gradients overflow: 3 skipped steps (the scale halves after
    # megatron-core's hysteresis of 2), then updates at 2^18.
    dynamic_args = args[:-1] + [5, "--fp16", "--initial-loss-scale", 2 ** 20]
    dynamic, out = train(dynamic_args, nproc=1)
    assert re.search(r"exiting: finished \(3 skipped, 0 non-finite iterations\)", out), out[-3000:]
    assert sorted(dynamic) == [4, 5] and dynamic[5][0] < dynamic[4][0] - 0.3  # (skipped: no grad norm)
    assert "loss scale: 262144.0 | grad norm:" in out
    # Saved while those steps are still skipped (torch's Adam has made no state yet), a checkpoint resumes
    # to the same losses: the distributed optimizer's save failed (megatron-core read each parameter's
    # step), the plain one's resume lacked Adam's tensors. (Both within 1e-5 of the plain run.)
    for optimizer in ([], ["--use-distributed-optimizer"]):
        ck = tmp_path / f"ck{len(optimizer)}"
        _, out = train(dynamic_args + optimizer + ["--exit-interval", 2, "--save", ck], nproc=1)
        assert (ck / "latest_checkpointed_iteration.txt").read_text().strip() == "2", out[-3000:]
        resumed, out = train(dynamic_args + optimizer + ["--load", ck, "--save", ck], nproc=1)
        assert re.search(r"exiting: finished \(3 skipped, 0 non-finite iterations\)", out), out[-3000:]
        assert sorted(resumed) == [4, 5]
        for iteration in (4, 5):
            for ours, theirs in zip(resumed[iteration], dynamic[iteration]):
                assert abs(ours - theirs) <= 1e-5 * max(1.0, abs(theirs)), (optimizer, iteration, resumed, dynamic)


def test_unpacked_rows_train_under_sequence_parallelism(data, tmp_path):
    """--no-pack pads each micro-batch to its longest row, which sequence parallelism must split
    over the TP ranks: rows are padded to a multiple of them (an odd longest row failed in
    megatron-core's scatter), and the losses are those of TP=2 without sequence parallelism."""
    args = base_args(data, "pretrain") + ["--tensor-model-parallel-size", 2, "--train-iters", 2, "--no-pack"]
    plain, _ = train(args)
    split, _ = train(args + ["--sequence-parallel"])
    assert sorted(plain) == sorted(split) == [1, 2]
    for iteration in (1, 2):
        for ours, theirs in zip(split[iteration][:2], plain[iteration][:2]):
            assert abs(ours - theirs) <= 1e-5 * max(1.0, abs(theirs))


@pytest.mark.parametrize("recompute", [["--recompute-granularity", "full", "--recompute-method", "uniform"],
                                       ["--recompute-granularity", "selective"]])
def test_recompute_keeps_losses_and_aligner_taps(data, tmp_path, recompute):
    """Activation recompute changes memory, not numbers: the aligner still sees every tap."""
    args = base_args(data, "pretrain") + ["--train-iters", 2]
    plain, _ = train(args, nproc=1)
    again, _ = train(args + recompute, nproc=1)
    for iteration in (1, 2):
        for ours, theirs in zip(again[iteration][:2], plain[iteration][:2]):
            assert abs(ours - theirs) <= 1e-5 * max(1.0, abs(theirs))


def test_distributed_optimizer_with_overlap_matches_plain_data_parallel(data, tmp_path):
    """--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather (2-way data
    parallel; the EVE-7B recipes' optimizer flags) trains like the plain optimizer: the same losses
    step for step."""
    args = base_args(data, "pretrain") + ["--train-iters", 3]
    plain, _ = train(args)
    sharded, _ = train(args + ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"])
    for iteration in (1, 2, 3):
        for ours, theirs in zip(sharded[iteration][:2], plain[iteration][:2]):
            assert abs(ours - theirs) <= 1e-5 * max(1.0, abs(theirs))


@pytest.fixture(scope="module")
def text_only_data(tmp_path_factory, corpus):
    """A Q&A dataset without images (vicuna_v1), preprocessed with the corpus's tokenizer."""
    from megatron_eve.data.preprocess import PreprocessJob, run
    from megatron_eve.data.records import RecordConfig
    from megatron_eve.data.synthetic import make_corpus
    from tests.helpers import tiny_config

    root = tmp_path_factory.mktemp("text_only")
    records = make_corpus(str(root), 40, "qa", seed=7, text_only_fraction=1.0)
    run(PreprocessJob([records], str(root / "qa"), corpus["tokenizer"],
                      RecordConfig("vicuna_v1", tiny_config().vision, image_folder=str(root)), progress=False))
    return str(root / "qa")


def test_overlapped_grad_reduce_trains_through_micro_batches_without_images(data, text_only_data):
    """A micro-batch whose rows hold no image leaves the PEL, projector and aligner out of its
    graph; with --overlap-grad-reduce megatron-core starts a bucket's reduction only once every
    parameter in it has its gradient in the step's last micro-batch, so such a micro-batch there
    failed the step. Those parameters get a zero gradient instead: the same losses as without the
    overlap, on a blend of image and text-only rows."""
    args = base_args(data, "finetune", "qa") + ["--train-iters", 4, "--micro-batch-size", 1, "--data-path", 1,
                                                data["qa"], 1, text_only_data, "--use-distributed-optimizer"]
    plain, _ = train(args)
    overlapped, out = train(args + ["--overlap-grad-reduce"])
    assert sorted(overlapped) == [1, 2, 3, 4], out[-3000:]
    for iteration in (1, 2, 3, 4):
        for ours, theirs in zip(overlapped[iteration][:2], plain[iteration][:2]):
            assert abs(ours - theirs) <= 1e-5 * max(1.0, abs(theirs))


def test_a_checkpoint_holds_the_step_weights_with_overlapped_param_gather(data, tmp_path):
    """--overlap-param-gather leaves the other data-parallel ranks' shards of a step's update to the
    next forward pass: a checkpoint saved right after the step gathers them first, so it holds
    the same weights as one saved without the overlap."""
    args = base_args(data, "pretrain") + ["--train-iters", 2, "--use-distributed-optimizer", "--overlap-grad-reduce"]
    train(args + ["--save", tmp_path / "plain"])
    train(args + ["--overlap-param-gather", "--save", tmp_path / "overlapped"])
    diff = checkpoint_diff(str(tmp_path / "plain" / "iter_0000002"), str(tmp_path / "overlapped" / "iter_0000002"))
    assert diff and all(v == 0.0 for v in diff.values()), {k: v for k, v in diff.items() if v}


def test_interleaved_pipeline_trains_and_checkpoints_like_the_plain_pipeline(data, tmp_path):
    """PP=2 with two model chunks per rank (--num-layers-per-virtual-pipeline-stage 2: layers 0-1,
    4-5 on rank 0, 2-3, 6-7 on rank 1; aligner taps on every chunk) from the same weights as PP=2
    without interleaving: the same losses step for step; its checkpoint (model0/model1) resumes
    without interleaving and continues as the plain run does."""
    args = base_args(data, "pretrain") + ["--lr-decay-iters", 3]
    start = tmp_path / "start"
    train(args + ["--train-iters", 1, "--save", start], nproc=1)
    pipeline = args + ["--pipeline-model-parallel-size", 2, "--pretrained-checkpoint", start]
    plain, _ = train(pipeline + ["--train-iters", 3])
    interleaved, out = train(pipeline + ["--train-iters", 2, "--num-layers-per-virtual-pipeline-stage", 2,
                                         "--save", tmp_path / "vpp"])
    resumed, _ = train(pipeline + ["--train-iters", 3, "--load", tmp_path / "vpp", "--save", tmp_path / "vpp"])
    assert sorted(interleaved) == [1, 2] and sorted(resumed) == [3], out[-3000:]
    for iteration, run in ((1, interleaved), (2, interleaved), (3, resumed)):
        assert run[iteration][1] > 0.1  # the aligner trained
        for ours, theirs in zip(run[iteration][:2], plain[iteration][:2]):
            assert abs(ours - theirs) <= 1e-5 * max(1.0, abs(theirs)), (iteration, run[iteration], plain[iteration])


@pytest.mark.parametrize("clip_grad", [0, 1.0], ids=["flags-read-before-the-step", "skipped-on-the-device"])
def test_a_streak_of_non_finite_iterations_stops_without_saving(data, tmp_path, clip_grad):
    """An absurd learning rate breaks the weights after one update: every later iteration is
    non-finite, skipped and not saved, and the streak ends the run with exit 1. Without clipping the
    flags are read before the step, which is not taken; with it (fused AdamW), the AdamW skips on
    the device and the flags are read after."""
    args = base_args(data, "pretrain") + ["--train-iters", 10, "--lr", "1e20", "--clip-grad", clip_grad, "--save",
                                          tmp_path / "ck", "--save-interval", 1, "--max-consecutive-nan-iterations", 2]
    proc = launch(args, nproc=1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-4000:]
    assert "2 non-finite iterations in a row (the weights or the data are broken); not saving" in out
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["iter_0000001", "latest_checkpointed_iteration.txt"]


def test_verify_checkpoint_refuses_a_damaged_file(data, tmp_path):
    args = base_args(data, "pretrain") + ["--train-iters", 2, "--save", tmp_path / "ck", "--save-interval", 1,
                                          "--lr-decay-iters", 3]  # one schedule for both runs
    train(args, nproc=1)
    directory = tmp_path / "ck" / "iter_0000002"
    recorded = json.loads((directory / "checksums.json").read_text())["files"]
    assert any(name.endswith(".distcp") for name in recorded) and ".metadata" in recorded
    shard = next(p for p in sorted(directory.iterdir()) if p.suffix == ".distcp")
    with open(shard, "r+b") as handle:  # random bytes inside, the size unchanged
        handle.seek(shard.stat().st_size // 2)
        handle.write(bytes(range(256)) * 4)
    proc = launch(args + ["--load", tmp_path / "ck", "--train-iters", 3, "--verify-checkpoint"], nproc=1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-4000:]  # torchrun reports the worker's exit 2 as 1
    assert f"error: {directory} is damaged: {shard.name} does not match its checksum" in out


def test_use_checkpoint_args_trains_a_converted_release_of_another_geometry(data, tmp_path):
    """A release whose PEL width, aligner width and tap interval match no preset: converted, it
    trains with --use-checkpoint-args; without it the preset's architecture is refused by name."""
    from tests.helpers import save_tiny_teacher, tiny_config
    from tests.hf_fixtures import release_like_eve

    model = tiny_config(changes={"vision.hidden_size": 48, "aligner.hidden_size": 32, "aligner.tap_interval": 2})
    release_like_eve(str(tmp_path / "release"), model, dtype=torch.float32)
    config = json.loads((tmp_path / "release" / "config.json").read_text())
    config["image_size_clip"] = 112  # the tiny teacher's square (the release's default is 336)
    (tmp_path / "release" / "config.json").write_text(json.dumps(config))
    out = subprocess.run([sys.executable, str(ROOT / "checkpoint_conversion" / "hf_to_megatron.py"), "--hf",
                          tmp_path / "release", "--out", tmp_path / "converted"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    args = base_args(data, "pretrain") + ["--train-iters", 2, "--pretrained-checkpoint", tmp_path / "converted",
                                          "--save", tmp_path / "run"]
    args[args.index("--vision-teacher-path") + 1] = save_tiny_teacher(str(tmp_path / "teacher"), model)

    refused = launch(args)
    text, _ = refused.communicate(timeout=300)
    assert refused.returncode != 0, text[-3000:]  # the ranks exit 2; torchrun reports 1
    assert "holds a different architecture (this run vs the checkpoint)" in text, text[-4000:]
    assert "vision.hidden_size: 64 vs 48" in text and "aligner.hidden_size: 64 vs 32" in text
    assert "aligner.tap_interval: 1 vs 2" in text and "--use-checkpoint-args" in text

    trained, _ = train(args + ["--use-checkpoint-args"])
    assert sorted(trained) == [1, 2] and all(math.isfinite(v) for row in trained.values() for v in row)
    assert trained[1][1] > 0  # the aligner ran, with the recorded width and taps

    with pytest.raises(ConfigError, match=r"--vision-hidden-size 64 \(the checkpoint: 48\)"):
        parse_args([str(a) for a in args] + ["--use-checkpoint-args", "--vision-hidden-size", "64"])
    job = parse_args([str(a) for a in args] + ["--use-checkpoint-args", "--aligner-tap-interval", "2"])
    assert (job.model.vision.hidden_size, job.model.aligner.hidden_size, job.model.aligner.tap_interval) == (48, 32, 2)


def tensorboard_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    events.Reload()
    return {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]
            for tag in events.Tags()["tensors"]}


# Megatron-LM's training_log fields in its order (EVE's own after the grad norm).
MEGATRON_LINE = re.compile(
    r" \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}\] iteration +(\d+)/ +\d+ \| consumed samples: +\d+ \|"
    r" elapsed time per iteration \(ms\): \d+\.\d \| throughput per GPU \(TFLOP/s/GPU\): \d+\.\d \|"
    r" learning rate: \S+E[-+]\d\d \| global batch size: +4 \| lm loss: (\S+) \| align loss: \S+ \|"
    r" loss scale: 1\.0 \| grad norm: \d+\.\d{3} \| tokens/s/GPU: .* \| number of skipped iterations: +0 \|"
    r" number of nan iterations: +0 \|\n")


def test_training_ends_with_megatron_lm_evaluations_and_logs_each_iteration_to_tensorboard(data, tmp_path):
    """A run that trains to its end evaluates the valid split (again, after --eval-interval's own at the
    last iteration) and the test split, in Megatron-LM's lines, here across 2 pipeline stages;
    TensorBoard gets each iteration's own losses, learning rate, grad norm, loss scale and batch size
    (--tensorboard-log-interval 1), the console the --log-interval means. An --exit-interval run
    leaves without them, as Megatron-LM's does."""
    args = base_args(data, "pretrain") + ["--train-iters", 4, "--eval-interval", 2, "--eval-iters", 1,
                                          "--split", "80,10,10"]
    trained, out = train(args + ["--log-interval", 4, "--pipeline-model-parallel-size", 2,
                                 "--tensorboard-dir", tmp_path / "tb"])
    assert sorted(trained) == [1, 4]  # the first iteration, then every --log-interval
    lines = {int(m[0]): float(m[1]) for m in MEGATRON_LINE.findall(out)}
    assert sorted(lines) == [1, 4], out[-3000:]
    assert list(validations(out)) == ["2", "4"]
    finals = final_evaluations(out)
    assert [(i, split) for i, split, _ in finals] == [("4", "validation"), ("4", "test")]
    line = f" validation loss at iteration 4 on test set | lm loss value: {finals[1][2]} | lm loss PPL: "
    before, after = out.split(line)
    rule = "-" * (len(line + after.split("\n")[0]) + 1)
    assert before.endswith(rule + "\n") and after.split("\n")[1] == rule

    scalars = tensorboard_scalars(tmp_path / "tb")
    assert [step for step, _ in scalars["lm loss"]] == [1, 2, 3, 4]
    assert abs(scalars["lm loss"][0][1] - lines[1]) <= 1e-6 * lines[1]
    # The console's line at 4 is the mean of iterations 2, 3 and 4, each written on its own.
    assert abs(sum(v for _, v in scalars["lm loss"][1:]) / 3 - lines[4]) <= 1e-6 * lines[4]
    for tag in ("align loss", "learning-rate", "grad-norm", "loss-scale", "batch-size"):
        assert [step for step, _ in scalars[tag]] == [1, 2, 3, 4], tag
    assert {v for _, v in scalars["loss-scale"]} == {1.0} and {v for _, v in scalars["batch-size"]} == {4.0}
    assert [step for step, _ in scalars["iteration-time"]] == [1, 4]  # measured over --log-interval
    assert [step for step, _ in scalars["lm loss validation"]] == [2, 4, 4]
    assert abs(scalars["lm loss validation"][2][1] - float(finals[0][2])) <= 1e-6 * float(finals[0][2])
    assert [step for step, _ in scalars["lm loss test"]] == [4]
    by_samples = tensorboard_scalars(tmp_path / "tb" / "vs-samples")
    assert [step for step, _ in by_samples["lm loss vs samples"]] == [4, 8, 12, 16]
    assert [step for step, _ in by_samples["lm loss test vs samples"]] == [16]

    stopped, out = train(args + ["--exit-interval", 2, "--tensorboard-dir", tmp_path / "tb2",
                                 "--tensorboard-log-interval", 2], nproc=1)
    assert "exiting: --exit-interval at iteration 2" in out
    assert list(validations(out)) == ["2"] and final_evaluations(out) == []
    assert [step for step, _ in tensorboard_scalars(tmp_path / "tb2")["lm loss"]] == [2]
