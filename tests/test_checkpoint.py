"""Checkpoints: across layer specs, replacement without a window of loss, no restart over unmarked ones."""

import json
import subprocess
import sys

from tests.helpers import ROOT, child_environment


def test_checkpoints_across_specs_and_safe_replacement(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "parallel" / "checkpoint_worker.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=child_environment(), cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["plain_to_te"] == {"iteration": 1, "weights_equal": True, "extra_state_loaded": None,
                                "fused_after_load": True, "own_steps": True}
    assert r["te_to_plain"] == {"iteration": 2, "weights_equal": True}
    assert r["te_to_te"] == {"extra_state_loaded": {"fp8_meta": 1}}
    assert "iter_0000002 cannot be loaded" in r["damaged"] and "truncated, damaged or missing" in r["damaged"]
    assert "\n" not in r["damaged"]
    assert r["resaved_entries"] == ["iter_0000001", "latest_checkpointed_iteration.txt"]
    assert r["recovered_iteration"] == 1 and r["recovered_entries"] == r["resaved_entries"]
    assert "holds" in r["unmarked"] and "iter_0000001 but no latest_checkpointed_iteration.txt" in r["unmarked"]


class _Payload:
    """What a crafted checkpoint would carry: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_crafted_metadata_does_not_run(tmp_path):
    import pickle

    from megatron_eve.checkpoint.hf_eve import MegatronCheckpoint

    directory = tmp_path / "iter_0000001"
    directory.mkdir()
    marker = tmp_path / "code-ran"
    (directory / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    (directory / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1}')
    try:
        MegatronCheckpoint(str(directory))
        raised = None
    except pickle.UnpicklingError as error:
        raised = str(error)
    assert not marker.exists()
    assert raised and "refers to posix.system" in raised and "refusing to load it" in raised


def test_crafted_common_state_does_not_run(tmp_path):
    """The objects inside a checkpoint's .distcp files (megatron-core's common state) are read
    weights-only: torch's default load planner would unpickle them with weights_only=False."""
    from megatron_eve.atomic import write_text
    from megatron_eve.checkpoint.dcp_writer import write_checkpoint
    from megatron_eve.training.checkpoint_records import CheckpointLoadError, latest_record

    root, marker = tmp_path / "root", tmp_path / "code-ran"
    write_checkpoint(str(root / "iter_0000000"), [], common={"x": _Payload(marker)})
    write_text(str(root / "latest_checkpointed_iteration.txt"), "0")
    try:
        latest_record(str(root))
        raised = None
    except CheckpointLoadError as error:
        raised = str(error)
    assert not marker.exists()
    assert raised and "\n" not in raised and "iter_0000000" in raised and "posix.system" in raised
    # What the writer stores in earnest still reads.
    write_checkpoint(str(root / "iter_0000001"), [], common={"model_config": {"layers": 2}, "step": 3})
    write_text(str(root / "latest_checkpointed_iteration.txt"), "1")
    assert latest_record(str(root)).common == {"model_config": {"layers": 2}, "step": 3}


# ------------------------------------------------------------ optimizer formats and --async-save
def _worker(mode, root, nproc=2):
    from tests.helpers import torchrun

    out = torchrun("async_checkpoint_worker.py", nproc, [mode, root], timeout=400)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_optimizer_formats_async_save_and_resharding(tmp_path):
    """Distributed optimizer, 2 processes (gloo): the default format is written by each data-parallel
    rank as it holds it and resumes bitwise at the same layout, and at another data-parallel size;
    at another TP it is refused in one line (weights-only still loads); the fully reshardable format
    loads at TP2 with every global tensor bitwise equal; --async-save resumes like a sync save. The
    plain optimizer's state and the distributed one's do not load into each other: refused in one line."""
    r = _worker("formats", tmp_path)
    assert r["default_format"] == "dp_reshardable" and r["reshardable_format"] == "fully_reshardable"
    same = {"iteration": 3, "consumed": 12, "weights": True, "optimizer": True, "scheduler": True}
    assert r["resume_sync"] == r["resume_async"] == r["resume_full"] == same
    for name in ("sync", "full"):  # the vision parameters in groups of their own: not in the checkpoint
        message = r[f"other_groups_{name}"]
        assert "\n" not in message and f"{name}/iter_0000003: its optimizer state has no parameter group" in message
        assert "max_lr 0.0005" in message and "--no-load-optim" in message
    assert "plain/iter_0000003 was saved with the plain optimizer" in r["plain_into_distributed"]
    assert "full/iter_0000003 holds the distributed optimizer's state, which the plain optimizer cannot load: " \
        "resume with --use-distributed-optimizer (any TP / PP" in r["full_into_plain"]
    assert "(any data-parallel size at the saved TP / PP)" in r["sync_into_plain"]
    assert r["async_returned_unpublished"]  # save() returned before the checkpoint was marked
    assert r["async_published"] == ["iter_0000003", "latest_checkpointed_iteration.txt"]
    assert r["async_verified"] is True and r["checksums_cover_all"]
    message = r["tp2_default"]
    assert "\n" not in message and "sync/iter_0000003 holds the distributed optimizer's state sharded by " \
        "data-parallel rank" in message and "at TP=2 PP=1 (saved at TP=1 PP=1)" in message
    assert "--no-load-optim" in message and "--dist-ckpt-optim-fully-reshardable" in message
    assert r["tp2_default_no_load_optim"] == 3 and r["tp2_default_weights_equal"]
    assert r["tp2_full"] == 3 and r["tp2_full_tensors_equal"] and r["tp2_full_optimizer_tensors"] > 0
    # The same default-format checkpoint at one process (TP1/DP1): every global tensor as saved.
    assert _worker("dp1", tmp_path, nproc=1) == {"iteration": 3, "tensors_equal": True}


def test_kill_9_during_async_save_keeps_the_previous_checkpoint(tmp_path):
    """Iteration 1 is published; the background save of iteration 2 is in flight (rank 0's shard
    written, rank 1's not) while training goes on; kill -9 every process: the marker still names
    iteration 1, which loads with the saved state; the torn directory is never marked and the next
    save replaces it."""
    import subprocess
    import time

    import psutil

    from megatron_eve.atomic import STAGING_MARK
    from tests.helpers import child_environment, free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(ROOT / "tests" / "parallel" / "async_checkpoint_worker.py"),
           "hang", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=child_environment(), cwd=ROOT)
    steps = tmp_path / "steps0"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (
            (tmp_path / "writing0").exists() and (tmp_path / "writing1").exists()
            and steps.exists() and steps.read_text().strip().isdigit() and int(steps.read_text()) >= 3):
        time.sleep(0.2)
    alive = proc.poll() is None
    for child in psutil.Process(proc.pid).children(recursive=True):  # ranks and their writers
        child.kill()
    proc.kill()
    out, _ = proc.communicate()
    assert alive, out[-4000:]
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "1"
    # The staging directory is named by rank 0's process (dead now: the next save deletes it).
    staging = [name for name in entries if name.startswith("iter_0000002.") and name.endswith(STAGING_MARK)]
    assert "iter_0000002" not in entries and len(staging) == 1, entries
    assert any(p.name.startswith("__0_") for p in (tmp_path / staging[0]).iterdir())  # torn

    r = _worker("after", tmp_path)
    assert r["marked"] == 1 and r["resumed"] == 1 and r["weights"] and r["optimizer"]
    assert r["resaved"] == 2 and r["entries_after"] == ["iter_0000001", "iter_0000002"]


# ------------------------------------------------------------------- checks of a resume before work
RESUME = ["--micro-batch-size", "1", "--global-batch-size", "4", "--seq-length", "1024", "--data-path", "x",
          "--train-iters", "4", "--lr", "1e-3", "--min-lr", "1e-4", "--load", "ck"]


def _param_groups(lr, min_lr, vision_lr=None):
    """Param groups of build_optimizer's flags with the fields megatron-core 0.19 saves and pairs
    groups by (as a saved checkpoint's common state holds them, params aside): weight matrices, and
    biases / norms without weight decay (megatron-core's standard groups), for the base and, with
    their own --vision-lr, the vision parameters."""
    base = {"wd_mult": 1.0, "lr_mult": 1.0, "is_expert_parallel": False, "is_decoupled_lr": False,
            "default_config": True, "max_lr": lr, "min_lr": min_lr, "params": [0, 1]}
    groups = [base, {**base, "default_config": False, "wd_mult": 0.0, "params": [2]}]
    if vision_lr is None or vision_lr == lr:
        return groups
    vision = {**base, "default_config": False, "max_lr": vision_lr, "min_lr": min_lr * (vision_lr / lr)}
    return groups + [{**vision, "params": [3]}, {**vision, "wd_mult": 0.0, "params": [4]}]


def test_resume_refuses_learning_rates_megatron_core_cannot_load_the_optimizer_with():
    """--lr, --min-lr and --vision-lr set the optimizer's param groups' max_lr / min_lr, by which
    megatron-core pairs them with the checkpoint's when it loads the optimizer state: a change is
    refused before work (each named) whichever scheduler flag is given, as megatron-core's pairing
    fails; the other schedule settings still follow --override-opt-param-scheduler /
    --use-checkpoint-opt-param-scheduler."""
    import copy

    import torch
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    from megatron_eve.config import ConfigError
    from megatron_eve.training.arguments import parse_args
    from megatron_eve.training.checkpoint_records import CheckpointRecord, check_schedule
    from megatron_eve.training.optim import build_scheduler

    saved_flags = RESUME + ["--vision-lr", "5e-4"]
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.0)
    common = {"opt_param_scheduler": build_scheduler(sgd, parse_args(saved_flags)).state_dict(),
              "optimizer": {"state": {}, "param_groups": _param_groups(1e-3, 1e-4, 5e-4)}}
    record = CheckpointRecord("ck", "ck/iter_0000004", common)

    def refusal(*flags):
        try:
            check_schedule(parse_args(saved_flags + list(flags)), record)
        except ConfigError as error:
            return str(error)

    def pairs(*flags):
        """Whether megatron-core's load pairs the flags' param groups with the checkpoint's."""
        o = parse_args(saved_flags + list(flags)).optim
        try:
            MegatronOptimizer._filter_and_reorder_param_groups(
                _param_groups(o.lr, o.min_lr, o.vision_lr), copy.deepcopy(common["optimizer"]["param_groups"]))
        except ValueError:  # "Could not find parameter group with key ..."
            return False
        return True

    assert pairs() and refusal() is None
    for choice in ([], ["--override-opt-param-scheduler"], ["--use-checkpoint-opt-param-scheduler"]):
        message = refusal("--vision-lr", "2e-4", *choice)
        assert not pairs("--vision-lr", "2e-4") and "neither --override" in message
        assert "vision max_lr: checkpoint 0.0005, flags 0.0002 (--vision-lr)" in message
        assert "vision min_lr: checkpoint 5e-05, flags 2e-05 (--vision-lr x --min-lr / --lr)" in message
        assert not pairs("--lr", "2e-3") and "max_lr: checkpoint 0.001, flags 0.002 (--lr)" in refusal(
            "--lr", "2e-3", *choice)
        assert not pairs("--min-lr", "0") and "min_lr: checkpoint 0.0001, flags 0.0 (--min-lr)" in refusal(
            "--min-lr", "0", *choice)
        # --vision-lr as --lr: the vision parameters train at --lr in the base groups (megatron-core's
        # standard groups then differ too: the resume failed in a real run).
        assert "vision max_lr: checkpoint 0.0005, flags 0.001 (--vision-lr)" in refusal("--vision-lr", "1e-3", *choice)
        assert pairs("--train-iters", "6") and (refusal("--train-iters", "6", *choice) is None) == bool(choice)
    assert "was trained on another learning-rate schedule" in refusal("--train-iters", "6")
    assert refusal("--vision-lr", "2e-4", "--no-load-optim") is None  # a fresh optimizer: nothing to pair

    # A checkpoint trained without --vision-lr: its vision parameters were in the base groups.
    common["optimizer"]["param_groups"] = _param_groups(1e-3, 1e-4)
    assert refusal("--vision-lr", "1e-3") is None
    message = refusal("--vision-lr", "5e-4", "--override-opt-param-scheduler")
    assert "vision max_lr: checkpoint 0.001, flags 0.0005 (--vision-lr)" in message
    assert "vision min_lr: checkpoint 0.0001, flags 5e-05" in message
    # Converted checkpoints hold no optimizer state.
    del common["optimizer"]
    assert refusal("--vision-lr", "2e-4") is None


def test_resume_keeps_an_earlier_sample_based_schedule_and_compares_an_increasing_weight_decay():
    """With --train-samples the decay is now --train-samples itself (Megatron-LM's), where earlier
    versions decayed over its whole global batches: such a checkpoint resumes without a scheduler
    flag (megatron-core goes on with its schedule). An increasing weight decay's length is compared
    on resume; constant weight decay's is not (megatron-core never reads it)."""
    import pytest
    import torch

    from megatron_eve.config import ConfigError
    from megatron_eve.training.arguments import parse_args
    from megatron_eve.training.checkpoint_records import CheckpointRecord, check_schedule
    from megatron_eve.training.optim import build_scheduler

    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.0)
    at = RESUME.index("--train-iters")
    samples = RESUME[:at] + RESUME[at + 2:] + ["--train-samples", "18", "--lr-warmup-fraction", "0.25"]
    scheduler = build_scheduler(sgd, parse_args(samples)).state_dict()
    assert (scheduler["lr_decay_steps"], scheduler["lr_warmup_steps"]) == (18, 4.5)
    earlier = {**scheduler, "lr_decay_steps": 16, "lr_warmup_steps": 4}  # 4 global batches of 4, int(0.25 x 16)
    check_schedule(parse_args(samples), CheckpointRecord("ck", "ck/iter_0000004", {"opt_param_scheduler": earlier}))
    with pytest.raises(ConfigError, match=r"lr_decay_steps: checkpoint 12, flags 18 \(--lr-decay-samples"):
        check_schedule(parse_args(samples), CheckpointRecord("ck", "ck/iter_0000003", {
            "opt_param_scheduler": {**earlier, "lr_decay_steps": 12}}))

    wd = ["--weight-decay-incr-style", "cosine", "--start-weight-decay", "0.01", "--end-weight-decay", "0.1"]
    for extra, refused in (([], False), (wd, True)):
        saved = build_scheduler(sgd, parse_args(RESUME + extra)).state_dict()
        record = CheckpointRecord("ck", "ck/iter_0000004", {"opt_param_scheduler": saved})
        longer = parse_args(RESUME + extra + ["--train-iters", "6", "--lr-decay-iters", "4"])
        try:
            check_schedule(longer, record)
        except ConfigError as error:
            assert refused and "(wd_incr_steps: checkpoint 16, flags 24 (--train-iters x --global-batch-size);" in str(
                error)
        else:
            assert not refused


def test_a_resume_into_param_groups_the_checkpoint_lacks_is_refused_in_one_line():
    """megatron-core pairs this run's optimizer param groups with the checkpoint's by its identifier
    keys; one without a partner fails its load after the tensors are read (the distributed
    optimizer: a bare KeyError of the key tuple). check_param_groups refuses such a resume in one
    line: here a checkpoint saved with --vision-lr before the vision parameters kept megatron-core's
    no-weight-decay groups (one vision group, not two). tests/parallel/async_checkpoint_worker.py
    does it with real checkpoints of both optimizer formats."""
    from types import SimpleNamespace

    from megatron_eve.config import ConfigError
    from megatron_eve.training.checkpoint_records import CheckpointRecord, check_param_groups

    def refusal(ours, saved):
        optimizer = SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=SimpleNamespace(param_groups=ours))])
        record = CheckpointRecord("ck", "ck/iter_0000004", {"optimizer": {"state": {}, "param_groups": saved}})
        try:
            check_param_groups(optimizer, record)
        except ConfigError as error:
            return str(error)

    current = _param_groups(1e-3, 1e-4, 5e-4)
    assert refusal(current, current) is None
    before_fix = current[:3]  # the vision parameters' one group, weight decay on its norms too
    assert refusal(current, before_fix) == (
        "ck/iter_0000004: its optimizer state has no parameter group for this run's (max_lr 0.0005, min_lr 5e-05, "
        "wd_mult 0.0); it holds (max_lr 0.001, min_lr 0.0001, wd_mult 1.0); (max_lr 0.001, min_lr 0.0001, wd_mult "
        "0.0); (max_lr 0.0005, min_lr 5e-05, wd_mult 1.0). The groups follow the learning rates, the weight-decay "
        "rules and which parameters train: pass --no-load-optim to start the optimizer and its schedule afresh")
    # No optimizer state (a converted checkpoint): nothing to pair.
    optimizer = SimpleNamespace(optimizer=SimpleNamespace(param_groups=current))
    assert check_param_groups(optimizer, CheckpointRecord("ck", "ck/iter_0000004", {})) is None


def test_check_job_reads_the_checkpoint_once_for_both_checks(tmp_path, monkeypatch):
    """check_job reads the latest checkpoint's common state once and gives it to the architecture,
    schedule, stage and optimizer-format checks, each reporting its own problem."""
    from dataclasses import asdict

    import torch
    from megatron.core import dist_checkpointing

    from megatron_eve.config import ConfigError
    from megatron_eve.training.arguments import parse_args
    from megatron_eve.training.loop import check_job
    from megatron_eve.training.optim import build_scheduler

    (tmp_path / "iter_0000004").mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4")
    flags = RESUME[:-1] + [str(tmp_path), "--preset", "tiny"]
    saved = parse_args(flags)
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.0)
    common = {"model_config": asdict(parse_args(flags + ["--num-layers", "3"]).model),
              "opt_param_scheduler": build_scheduler(sgd, saved).state_dict(),
              "optimizer": {"state": {}, "param_groups": _param_groups(1e-3, 1e-4)},
              "stage": "prealign", "optimizer_format": "dp_reshardable"}
    reads = []
    monkeypatch.setattr(dist_checkpointing, "load_common_state_dict",
                        lambda directory: reads.append(directory) or common)
    try:
        check_job(parse_args(flags + ["--vision-lr", "5e-4"]), 1)
        message = ""
    except ConfigError as error:
        message = str(error)
    assert reads == [str(tmp_path / "iter_0000004")]
    assert "holds a different architecture" in message and "vision max_lr: checkpoint 0.001, flags 0.0005" in message
    assert "is a prealign checkpoint, not pretrain (--stage)" in message
    assert "holds the distributed optimizer's state, which the plain optimizer cannot load" in message


# ------------------------------------------------------------------ what a failed load means
def _refusal(directory, error):
    from megatron_eve.training.checkpoint_records import CheckpointLoadError, reading

    try:
        with reading(directory):
            raise error
    except CheckpointLoadError as refused:
        return str(refused)


def test_a_checkpoint_of_another_configuration_is_not_called_damaged():
    """A key the checkpoint lacks (torch's KeyError inside the ranks' CheckpointException, megatron-core's
    missing / unexpected keys, a shape) means another configuration, named in one line with its key and
    likely cause, no rollback advised (an earlier iteration lacks it too); read errors still mean damage."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    key = "optimizer.state.param.aligner.output_layer.bias"
    wrapped = CheckpointException("failed", {1: (KeyError(f"{key} from model not in state dict: ['a', 'b']"), None)})
    message = _refusal("ck/iter_0000004", wrapped)
    assert message.startswith(f"ck/iter_0000004 does not match this run's configuration: it has no {key} (its "
                              "optimizer state was saved for other parameters or another optimizer")
    assert "--no-load-optim" in message and "earlier" not in message and "\n" not in message
    unexpected = CheckpointingException("Unexpected keys (not found in the checkpoint) encountered in the provided "
                                        "sharded state dict. \nUnexpected keys (for this rank): {'decoder.x.weight'}. ")
    assert "it has no decoder.x.weight (the model it holds is not the one built" in _refusal("ck", unexpected)
    missing = CheckpointingException("Some keys found in the checkpoint are missing in the provided sharded state "
                                     "dict. \nMissing keys (for all ranks): {'vision_model.y'}. ")
    assert "configuration: this run has no vision_model.y" in _refusal("ck", missing)
    shape = CheckpointingException("Global shape mismatch for loaded (torch.Size([8])) and expected "
                                   "(torch.Size([4])) tensor for key embedding.word_embeddings.weight")
    assert "it holds another shape of embedding.word_embeddings.weight" in _refusal("ck", shape)
    for damage in (EOFError("Ran out of input"), OSError("short read"), CheckpointException("x", {0: (
            RuntimeError("PytorchStreamReader failed reading zip archive"), None)})):
        message = _refusal("ck/iter_0000004", damage)
        assert "a file is truncated, damaged or missing; resume from an earlier iteration" in message, message


def test_the_iteration_to_load_must_be_there(tmp_path):
    """--ckpt-step N loads iteration N instead of the tracker's; a missing one (or a tracker naming one
    that is not there) is refused in one line listing the iterations there are."""
    from megatron_eve.config import ConfigError
    from megatron_eve.training.checkpoint_records import iteration_to_load

    for iteration in (2, 4):
        (tmp_path / f"iter_000000{iteration}").mkdir()
        (tmp_path / f"iter_000000{iteration}" / "metadata.json").write_text("{}")
    assert iteration_to_load(str(tmp_path / "nothing")) is None
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4")
    assert iteration_to_load(str(tmp_path)) == 4 and iteration_to_load(str(tmp_path), 2) == 2

    def refusal(step=None):
        try:
            iteration_to_load(str(tmp_path), step)
        except ConfigError as error:
            return str(error)

    assert refusal(3) == f"--ckpt-step 3, but there is no {tmp_path}/iter_0000003: the iterations there are 2, 4"
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("6")
    assert refusal() == (f"{tmp_path}/latest_checkpointed_iteration.txt names iteration 6, but there is no "
                         f"{tmp_path}/iter_0000006: the iterations there are 2, 4")
    assert iteration_to_load(str(tmp_path), 4) == 4


def test_a_resume_of_another_optimizer_kind_stage_or_tokenizer_is_refused_in_one_line():
    """Checked before work against what the checkpoint records: the plain optimizer's state does not load
    into the distributed optimizer (megatron-core looks for optimizer.state.param.* it lacks) nor the
    distributed one's into the plain optimizer (no param group pairs), whichever format; another stage
    (prealign's optimizer has no state for the frozen LLM; pretrain resumed as prealign would freeze it);
    another tokenizer on a resume (a warning at a new stage's start). --no-load-optim / --finetune /
    --pretrained-checkpoint are the ways on; checkpoints that record none of it are not checked."""
    from megatron_eve.config import ConfigError
    from megatron_eve.training.arguments import parse_args
    from megatron_eve.training.checkpoint_records import (CheckpointRecord, check_optimizer_format, check_stage,
                                                          check_tokenizer)

    def refusal(check, common, *flags, checksum=None):
        record = CheckpointRecord("ck", "ck/iter_0000004", common)
        job = parse_args(RESUME + list(flags))
        try:
            return check(job, record) if checksum is None else check(job, record, checksum)
        except ConfigError as error:
            assert "\n" not in str(error)
            return str(error)

    plain = {"optimizer_format": "plain"}
    assert refusal(check_optimizer_format, plain) is None
    assert refusal(check_optimizer_format, plain, "--use-distributed-optimizer") == (
        "ck/iter_0000004 was saved with the plain optimizer, whose state the distributed one cannot load: resume "
        "without --use-distributed-optimizer, or pass --no-load-optim to start the optimizer afresh")
    for flags in (["--no-load-optim"], ["--finetune"]):
        assert refusal(check_optimizer_format, plain, "--use-distributed-optimizer", *flags) is None
    assert refusal(check_optimizer_format, {"optimizer_format": "fully_reshardable"}) == (
        "ck/iter_0000004 holds the distributed optimizer's state, which the plain optimizer cannot load: resume "
        "with --use-distributed-optimizer (any TP / PP: it is fully reshardable), or pass --no-load-optim to start "
        "the optimizer afresh")
    sharded = refusal(check_optimizer_format, {"optimizer_format": "dp_reshardable"})
    assert "(any data-parallel size at the saved TP / PP)" in sharded and "fully-reshardable" not in sharded
    assert refusal(check_optimizer_format, {"optimizer_format": "dp_reshardable"}, "--use-distributed-optimizer") \
        is None
    assert refusal(check_optimizer_format, {}) is None  # older checkpoints record no format

    prealign = {"stage": "prealign"}
    assert refusal(check_stage, prealign) == (
        "--load ck: ck/iter_0000004 is a prealign checkpoint, not pretrain (--stage): start the new stage from it "
        "with --pretrained-checkpoint ck (--load / --save then name this stage's own folder) or --finetune, or pass "
        "--no-load-optim to keep its iteration count with a fresh optimizer")
    pretrain = refusal(check_stage, {"stage": "pretrain"}, "--stage", "prealign")
    assert "is a pretrain checkpoint, not prealign" in pretrain
    for flags in (["--stage", "prealign"], ["--finetune"], ["--no-load-optim"]):
        assert refusal(check_stage, prealign, *flags) is None
    assert refusal(check_stage, {}) is None

    tokenizer = {"tokenizer_model": "/data/tok-a.model", "tokenizer_sha256": "a" * 64}
    assert refusal(check_tokenizer, tokenizer, "--tokenizer-model", "tok-b.model", checksum="b" * 64) == (
        f"ck/iter_0000004 was trained with the tokenizer /data/tok-a.model (sha256 {'a' * 12}), not "
        f"--tokenizer-model tok-b.model (sha256 {'b' * 12}): resume with the checkpoint's tokenizer, or start a new "
        "stage from it with --pretrained-checkpoint or --finetune")
    assert refusal(check_tokenizer, tokenizer, "--tokenizer-model", "copy.model", checksum="a" * 64) is None
    warning = refusal(check_tokenizer, tokenizer, "--tokenizer-model", "tok-b.model", "--finetune", checksum="b" * 64)
    assert warning.startswith("ck/iter_0000004 was trained with the tokenizer /data/tok-a.model")
    assert refusal(check_tokenizer, {"tokenizer_model": "/data/tok-a.model"}, checksum="b" * 64) is None
