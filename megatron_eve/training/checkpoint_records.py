"""What a checkpoint root records, read before any work: which iteration is the latest and complete,
the model configuration, learning-rate schedule and optimizer format it was saved with, and the
checks that refuse a run whose flags disagree with them (before a process group or a model exists;
the optimizer's param groups, once built, before its state is read).

Also the directory conventions (Megatron-LM's) and the one-line report of an unreadable checkpoint
that checkpoint.py, which saves and loads, shares with this module: SAVE/iter_0000100/ is one
checkpoint, SAVE/latest_checkpointed_iteration.txt names the newest complete one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
from typing import Dict, List, NamedTuple, Optional, Tuple

from megatron_eve.atomic import recover_replaced
from megatron_eve.checkpoint import safe_metadata
from megatron_eve.config import (ConfigError, EVEModelConfig, TrainingJob, architecture_differences,
                                 model_config_from_dict)
from megatron_eve.training.optim import optimizer_parts, schedule_differences, vision_rates

safe_metadata.install()  # reading a common state reads .metadata: never run code from it
TRACKER = "latest_checkpointed_iteration.txt"
# Optimizer state formats (megatron-core's DistributedOptimizer sharding types, and the plain optimizer's).
DP_RESHARDABLE, FULLY_RESHARDABLE, PLAIN = "dp_reshardable", "fully_reshardable", "plain"


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


class CheckpointLoadError(ConfigError):
    """A checkpoint directory whose files cannot be read (truncated, damaged, incomplete)."""


def _innermost(error: BaseException) -> BaseException:
    """The innermost cause (a rank's own error inside torch's CheckpointException)."""
    while error.__cause__ is not None:
        error = error.__cause__
    failures = getattr(error, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        error = inner[0] if isinstance(inner, tuple) else inner
    return error


def _first_line(error: BaseException) -> str:
    """The innermost cause's message, on one line."""
    error = _innermost(error)
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}".rstrip(": ")


def _refused_object(error: BaseException) -> Optional[str]:
    """What a refused unpickling named (safe_metadata's or torch's weights-only error), if it was one."""
    error = _innermost(error)
    if not isinstance(error, pickle.UnpicklingError):
        return None
    named = re.search(r"(?:refers to|unsupported GLOBAL) ([\w.]+)", str(error))
    return named[1] if named else "an object"


class _FromCheckpointReads(logging.Filter):
    """Drops the records torch.distributed.checkpoint logs while it reads: its loader logs a failed
    read of `.metadata` with the whole traceback (a warning on the *root* logger, which Python prints
    on stderr when nothing is configured) before raising the error that reading() reports in one line."""

    def __init__(self):
        super().__init__()
        import torch.distributed.checkpoint as dcp

        self.package = os.path.dirname(os.path.abspath(dcp.__file__)) + os.sep

    def filter(self, record: logging.LogRecord) -> bool:
        return not os.path.abspath(record.pathname).startswith(self.package)


@contextlib.contextmanager
def _quiet_checkpoint_logs():
    """While inside: no log records from torch.distributed.checkpoint's reads (the root logger's,
    filtered; and its own loggers', should a torch version log there), as they were once outside."""
    quiet = _FromCheckpointReads()
    root, package = logging.getLogger(), logging.getLogger("torch.distributed.checkpoint")
    level = package.level
    root.addFilter(quiet)
    package.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        root.removeFilter(quiet)
        package.setLevel(level)


def _mismatch(error: BaseException) -> Optional[Tuple[str, str]]:
    """(key, what is wrong with it) when a load failed on a key the checkpoint lacks or holds at
    another shape: torch's strategy raises KeyError("<key> from model not in state dict: ..."),
    megatron-core a CheckpointingException listing missing / unexpected keys or naming a shape.
    The checkpoint is intact then, but was saved by another configuration."""
    error = _innermost(error)
    if isinstance(error, KeyError):
        key = str(error.args[0]) if error.args else ""
        return key.split(" from model not in state dict")[0][:200], "it has no"
    if type(error).__name__ != "CheckpointingException":
        return None
    text = str(error)
    listed = re.search(r"(?:Missing|Unexpected) keys \(for [^)]*\): \{'([^']+)'", text)
    if listed:
        return listed[1], "it has no" if listed[0].startswith("Unexpected") else "this run has no"
    shape = re.search(r"Global shape mismatch .*? for key (\S+)", text)  # e.g. another vocabulary size
    return (shape[1], "it holds another shape of") if shape else None


def _mismatch_cause(key: str) -> str:
    if key.startswith("optimizer."):
        return ("its optimizer state was saved for other parameters or another optimizer (--stage, "
                "--use-distributed-optimizer, --vision-lr): --no-load-optim loads the weights only")
    return "the model it holds is not the one built (architecture, layer spec): --use-checkpoint-args builds its own"


@contextlib.contextmanager
def reading(directory: str, earlier: str = f"resume from an earlier iteration by writing its number into {TRACKER}"):
    """Turn whatever a damaged checkpoint file raises deep inside dist-checkpointing into one line
    that names the directory and says what to do (`earlier`: how this tool uses an earlier iteration).
    A key the checkpoint lacks is no damage (an earlier iteration lacks it too): named as a mismatch."""
    try:
        with _quiet_checkpoint_logs():
            yield
    except (ConfigError, KeyboardInterrupt, SystemExit):
        raise
    # torch's CheckpointException (a BaseException) wraps the ranks' read errors.
    except BaseException as error:  # noqa: BLE001 — torch / megatron-core raise many kinds here
        refused = _refused_object(error)
        if refused:
            raise CheckpointLoadError(
                f"{directory} cannot be loaded: it stores {refused}, which a checkpoint never holds; refusing to "
                "unpickle it (a crafted or foreign checkpoint?)") from error
        mismatch = _mismatch(error)
        if mismatch:
            key, what = mismatch
            raise CheckpointLoadError(f"{directory} does not match this run's configuration: {what} {key} "
                                      f"({_mismatch_cause(key)})") from error
        detail = _first_line(error)
        raise CheckpointLoadError(
            f"{directory} cannot be loaded ({detail}): a file is truncated, damaged or missing; {earlier}") from error


def latest_iteration(root: str) -> Optional[int]:
    """The iteration the tracker names (None without one). A root that a conversion or an export
    (replace_directory) moved aside and was killed before renaming its replacement in is put back
    first, as is the iteration's directory of a save killed likewise."""
    recover_replaced(root, legacy=False)  # (".replaced" beside a root may be a user's own)
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        text = handle.read().strip()
    if not text.isdigit():
        raise ConfigError(f"{path} holds {text!r}, not an iteration number")
    iteration = int(text)
    recover_replaced(checkpoint_dir(root, iteration))
    return iteration


def complete_iterations(root: str) -> List[int]:
    """Iterations with a finished checkpoint directory under root (whatever the marker says)."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        if name.startswith("iter_") and name[5:].isdigit() and os.path.isfile(
                os.path.join(root, name, "metadata.json")):
            found.append(int(name[5:]))
    return sorted(found)


def iteration_to_load(root: str, step: Optional[int] = None) -> Optional[int]:
    """The iteration to load under `root`: `step` (--ckpt-step) if given, else the one the tracker
    names; None when `root` has no tracker (no checkpoint yet). One whose directory is not there is
    refused, naming the iterations that are (a tracker edited by hand, or a pruned --ckpt-step)."""
    marked = latest_iteration(root)
    if marked is None:
        return None
    iteration = marked if step is None else step
    if os.path.isdir(checkpoint_dir(root, iteration)):  # (an incomplete one is named damaged when read)
        return iteration
    found = complete_iterations(root)
    what = f"--ckpt-step {step}" if step is not None else f"{os.path.join(root, TRACKER)} names iteration {iteration}"
    there = f"the iterations there are {', '.join(map(str, found))}" if found else "it holds no complete checkpoint"
    raise ConfigError(f"{what}, but there is no {checkpoint_dir(root, iteration)}: {there}")


class CheckpointRecord(NamedTuple):
    """The checkpoint training loads under `root`, read once (the checks before work all use it)."""
    root: str
    directory: str
    common: Dict  # the common state: everything but the sharded tensors


def latest_record(root: str, step: Optional[int] = None) -> CheckpointRecord:
    """The latest complete checkpoint under `root` (or iteration `step`) with its common state."""
    from megatron.core import dist_checkpointing

    iteration = iteration_to_load(root, step)
    if iteration is None:
        raise ConfigError(f"{root}: no {TRACKER} (no complete checkpoint there)")
    directory = checkpoint_dir(root, iteration)
    with reading(directory):
        return CheckpointRecord(root, directory, dist_checkpointing.load_common_state_dict(directory))


def _model_config(record: CheckpointRecord) -> EVEModelConfig:
    if "model_config" not in record.common:
        raise ConfigError(f"{record.directory} records no model configuration: build the model from flags instead")
    return model_config_from_dict(record.common["model_config"])


def recorded_model_config(root: str, step: Optional[int] = None) -> EVEModelConfig:
    """The model configuration the latest checkpoint under `root` (or iteration `step`) recorded
    (at save or conversion)."""
    return _model_config(latest_record(root, step))


def checkpoint_to_load(load: Optional[str], pretrained_checkpoint: Optional[str]) -> Optional[str]:
    """The root load() reads first: --load when it holds a checkpoint (resume, or --finetune's
    weights), else --pretrained-checkpoint."""
    if load and latest_iteration(load) is not None:
        return load
    return pretrained_checkpoint


def check_architecture(job: TrainingJob, record: CheckpointRecord) -> None:
    """Refuse, naming each field, a checkpoint whose recorded architecture is not the model built."""
    differences = architecture_differences(job.model, _model_config(record))
    if differences:
        raise ConfigError(
            f"{record.root} holds a different architecture (this run vs the checkpoint): {'; '.join(differences)}; "
            "pass --use-checkpoint-args to build the model the checkpoint records")


def saved_optimizer_format(common: Dict) -> str:
    """The optimizer format a checkpoint's common state records (older checkpoints: fully reshardable)."""
    return common.get("optimizer_format") or (common.get("content_metadata") or {}).get(
        "distrib_optim_sharding_type", FULLY_RESHARDABLE)


def _resumes_optimizer(job: TrainingJob, record: CheckpointRecord) -> bool:
    """Whether training resumes `record` with its optimizer state (not a new stage's weights)."""
    ck = job.checkpoint
    return record.root == ck.load and not ck.finetune and not ck.no_load_optim


def check_optimizer_format(job: TrainingJob, record: CheckpointRecord) -> None:
    """Refuse, in one line, an optimizer state of the other kind: megatron-core's distributed optimizer
    reads its state as param / exp_avg / exp_avg_sq per model tensor (optimizer.state.param.* even in
    fp32), which the plain optimizer's checkpoint does not hold, and the plain optimizer cannot pair
    its param groups with the distributed one's. Checkpoints that predate the recorded format: no check."""
    saved = record.common.get("optimizer_format")
    if not _resumes_optimizer(job, record) or saved is None:
        return
    if saved == PLAIN and job.optim.use_distributed_optimizer:
        raise ConfigError(
            f"{record.directory} was saved with the plain optimizer, whose state the distributed one cannot load: "
            "resume without --use-distributed-optimizer, or pass --no-load-optim to start the optimizer afresh")
    if saved != PLAIN and not job.optim.use_distributed_optimizer:
        where = ("any TP / PP: it is fully reshardable" if saved == FULLY_RESHARDABLE
                 else "any data-parallel size at the saved TP / PP")
        raise ConfigError(
            f"{record.directory} holds the distributed optimizer's state, which the plain optimizer cannot load: "
            f"resume with --use-distributed-optimizer ({where}), or pass --no-load-optim to start the optimizer afresh")


def check_stage(job: TrainingJob, record: CheckpointRecord) -> None:
    """Refuse to resume another stage's checkpoint with its optimizer: prealign's holds no state for
    the frozen LLM (its load fails), and a pretrain checkpoint resumed as prealign would silently
    freeze the LLM and go on with the old stage's iteration count and schedule."""
    saved = record.common.get("stage")
    if not _resumes_optimizer(job, record) or saved in (None, job.schedule.stage):
        return
    raise ConfigError(
        f"--load {record.root}: {record.directory} is a {saved} checkpoint, not {job.schedule.stage} (--stage): start "
        f"the new stage from it with --pretrained-checkpoint {record.root} (--load / --save then name this stage's "
        "own folder) or --finetune, or pass --no-load-optim to keep its iteration count with a fresh optimizer")


def tokenizer_difference(job: TrainingJob, record: CheckpointRecord, checksum: Optional[str]) -> Optional[str]:
    """A different --tokenizer-model than the checkpoint was trained with (by content: SHA-256), in
    words naming both; None when the same, or when either side has no checksum (older checkpoints)."""
    saved = record.common.get("tokenizer_sha256")
    if not saved or not checksum or saved == checksum:
        return None
    return (f"{record.directory} was trained with the tokenizer {record.common.get('tokenizer_model')} "
            f"(sha256 {saved[:12]}), not --tokenizer-model {job.data.tokenizer_model} (sha256 {checksum[:12]})")


def check_tokenizer(job: TrainingJob, record: CheckpointRecord, checksum: Optional[str]) -> Optional[str]:
    """Refuse a resume with a different tokenizer (token ids change meaning under the trained
    embeddings: the loss jumps); at the start of a new stage (--pretrained-checkpoint, --finetune)
    return the difference as a warning, as a new vocabulary can be deliberate there."""
    difference = tokenizer_difference(job, record, checksum)
    if difference and record.root == job.checkpoint.load and not job.checkpoint.finetune:
        raise ConfigError(f"{difference}: resume with the checkpoint's tokenizer, or start a new stage from it with "
                          "--pretrained-checkpoint or --finetune")
    return difference


def _param_groups_in(state) -> List[Dict]:
    """Every optimizer state dict's param groups inside `state` (chained optimizers nest them)."""
    if not isinstance(state, dict):
        return []
    if isinstance(state.get("param_groups"), list):
        return list(state["param_groups"])
    return [group for value in state.values() for group in _param_groups_in(value)]


def _saved_param_groups(record: CheckpointRecord) -> List[Dict]:
    """The optimizer's param groups as the checkpoint holds them: in the common state (the plain
    optimizer's, and the distributed optimizer's in model space), or with the distributed
    optimizer's data-parallel-sharded format in an object per data-parallel group, which all hold
    the same groups (megatron-core aligns them over ranks): the first one's are read. None in
    converted checkpoints."""
    groups = _param_groups_in(record.common.get("optimizer"))
    if groups or saved_optimizer_format(record.common) != DP_RESHARDABLE:
        return groups
    import io

    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    with reading(record.directory):
        keys = [key for key in FileSystemReader(record.directory).read_metadata().state_dict_metadata
                if key.endswith("optimizer.distributed.dp_group_idx_0.optimizer/shard_0_1")]
        for key in keys:  # one per chained optimizer
            # Read as megatron-core's load_common_state_dict reads its object ([data], maybe still bytes).
            state = {key: io.BytesIO()}
            dcp_load(state, storage_reader=FileSystemReader(record.directory), no_dist=True)
            loaded = state[key]
            if isinstance(loaded, io.BytesIO):
                loaded.seek(0)
                loaded = torch.load(loaded, weights_only=True)
            groups += _param_groups_in(loaded[0])
    return groups


def _group_identifier(group: Dict) -> tuple:
    """How megatron-core (0.19) tells a param group from another when it pairs this run's groups with
    a checkpoint's (its `param_group_identifier_keys`; NeMo's pre_ aliases and None as missing)."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    return tuple(group.get(key, group.get(f"pre_{key}")) for key in param_group_identifier_keys)


def check_param_groups(optimizer, record: CheckpointRecord) -> None:
    """Refuse, in one line, to load an optimizer state into parameter groups that megatron-core would
    not find in it (its load fails only after the checkpoint's tensors are read: with the distributed
    optimizer a bare KeyError of the key tuple). The learning-rate bounds are compared before work
    (check_schedule); this catches the rest: groups made by other weight-decay rules or other
    trainable parameters (e.g. a checkpoint saved with --vision-lr before its parameters kept
    megatron-core's no-weight-decay groups)."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    saved = [_group_identifier(group) for group in _saved_param_groups(record)]
    if not saved:
        return  # converted checkpoints hold no optimizer state
    ours = [_group_identifier(group) for sub in optimizer_parts(optimizer) for group in sub.optimizer.param_groups]
    have = set(saved)
    missing = [key for key in ours if key not in have]
    if not missing:
        return
    # Named by the fields on which the groups differ (lr_mult, is_expert_parallel ... rarely do).
    fields = [(index, name) for index, name in enumerate(param_group_identifier_keys)
              if len({key[index] for key in saved + ours}) > 1]

    def described(key: tuple) -> str:
        return "(" + ", ".join(f"{name} {key[index]}" for index, name in fields) + ")"

    raise ConfigError(
        f"{record.directory}: its optimizer state has no parameter group for this run's {described(missing[0])}"
        f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; it holds "
        f"{'; '.join(described(key) for key in saved)}. The groups follow the learning rates, the weight-decay "
        "rules and which parameters train: pass --no-load-optim to start the optimizer and its schedule afresh")


VISION_FLAGS = {"max_lr": "--vision-lr", "min_lr": "--vision-lr x --min-lr / --lr"}


def vision_rate_differences(job: TrainingJob, record: CheckpointRecord) -> List[str]:
    """"vision max_lr: checkpoint X, flags Y (--vision-lr)" for each learning-rate bound of the
    vision parameters that the checkpoint's optimizer param groups hold with another value (the
    scheduler's state holds only the base groups' bounds, which schedule_differences compares).
    The checkpoint's vision bounds are those of its groups whose bounds are not the base ones
    (megatron-core's no-weight-decay groups share their parameters' bounds); none: the vision
    parameters trained in the base groups."""
    groups = [g for g in _saved_param_groups(record) if "max_lr" in g]
    scheduler = record.common.get("opt_param_scheduler", {})
    if not groups or "max_lr" not in scheduler:
        return []  # no optimizer state (converted), or one without per-group bounds
    base = {"max_lr": scheduler["max_lr"], "min_lr": scheduler["min_lr"]}
    own = [g for g in groups if (g["max_lr"], g["min_lr"]) != (base["max_lr"], base["min_lr"])]
    ours = vision_rates(job.optim)
    if not own and ours is None:
        return []  # the vision parameters train in the base groups on both sides
    saved = own[0] if own else base
    ours = ours or {"max_lr": job.optim.lr, "min_lr": job.optim.min_lr}
    return [f"vision {name}: checkpoint {saved[name]}, flags {value} ({VISION_FLAGS[name]})"
            for name, value in ours.items() if saved[name] != value]


# megatron-core (0.19) pairs the optimizer's param groups with a checkpoint's by their max_lr /
# min_lr (among other fields) when it loads the optimizer state: a group whose bounds changed is
# "not found" (a traceback once the model is built) whichever scheduler flag is given.
GROUP_BOUNDS = ("max_lr", "min_lr")


def check_schedule(job: TrainingJob, record: CheckpointRecord) -> None:
    """Refuse a resume whose learning-rate / weight-decay schedule flags differ from the
    checkpoint's unless the run says which to follow (Megatron-LM asserts the same); learning-rate
    bounds (--lr, --min-lr, --vision-lr) other than the checkpoint's whatever the run says."""
    ck, o = job.checkpoint, job.optim
    if record.root != ck.load or ck.finetune or ck.no_load_optim:
        return  # not a resume that loads the optimizer and the scheduler
    if job.schedule.global_batch_size is None:
        return  # no data-parallel size from the flags and the world size: job_problems says why
    scheduler = record.common.get("opt_param_scheduler", {})
    bounds = (schedule_differences(job, {k: v for k, v in scheduler.items() if k in GROUP_BOUNDS})
              + vision_rate_differences(job, record))
    if bounds:
        raise ConfigError(
            f"{record.directory} was trained with other learning rates than these flags give ({'; '.join(bounds)}): "
            "megatron-core loads the optimizer state only into parameter groups of the same learning rates, so "
            "neither --override-opt-param-scheduler nor --use-checkpoint-opt-param-scheduler applies: resume with "
            "the checkpoint's values, or pass --no-load-optim to start the optimizer and its schedule afresh")
    differences = schedule_differences(job, {k: v for k, v in scheduler.items() if k not in GROUP_BOUNDS})
    if differences and not (o.override_opt_param_scheduler or o.use_checkpoint_opt_param_scheduler):
        raise ConfigError(
            f"{record.directory} was trained on another learning-rate schedule than these flags give ("
            f"{'; '.join(differences)}; steps count samples): pass --override-opt-param-scheduler to follow "
            "the flags from the checkpoint's step, or --use-checkpoint-opt-param-scheduler to keep the checkpoint's")
