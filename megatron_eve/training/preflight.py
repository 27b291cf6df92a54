"""Checks before work: everything that can be known wrong before a process group or a model exists
(the options together, the data's files, the checkpoint to load, the output folders), reported as
one ConfigError listing every problem."""

from __future__ import annotations

import logging
import os
from typing import List, Optional, Tuple

from megatron_eve.atomic import nearest_existing
from megatron_eve.config import ConfigError, TrainingJob, complete_job, job_problems
from megatron_eve.data.dataset import check_blend, split_ranges
from megatron_eve.data.indexed import DatasetFormatError, read_metadata
from megatron_eve.locks import FolderLocked, lock_folder
from megatron_eve.ranks import is_rank_zero
from megatron_eve.training import checkpoint_records

logger = logging.getLogger(__name__)


def check_job(job: TrainingJob, world_size: int) -> None:
    """Everything that can be known wrong before a process group or a model exists: the options
    together (config.validate_job), the data's files and the checkpoint to load; one error."""
    complete_job(job, world_size)
    problems = job_problems(job, world_size)
    checksum, tokenizer_problems = _tokenizer_checksum(job)
    problems += tokenizer_problems
    try:
        blend = job.data.blend
    except ValueError:  # a malformed --data-path: job_problems names it, and there are no files to check
        blend = None
    if blend is not None:
        problems += _check_data(job, blend, checksum)
    try:
        (train_start, train_end), (valid_start, valid_end), _ = split_ranges(10**6, job.data.split)
    except ValueError as error:
        problems.append(str(error))
    else:
        log = job.logging
        if train_start == train_end:
            problems.append(f"--split {job.data.split} gives the train split no weight (e.g. 98,2,0)")
        if log.eval_interval and log.eval_iters and valid_start == valid_end:
            problems.append(f"--eval-interval {log.eval_interval} evaluates on the valid split, but --split "
                            f"{job.data.split} gives it no weight (e.g. 98,2,0)")
    teacher = job.model.aligner.teacher_path
    if job.model.aligner.enabled and teacher and not os.path.isfile(os.path.join(teacher, "config.json")):
        problems.append(f"--vision-teacher-path {teacher}: not a folder holding an HF CLIP model (no config.json)")
    if job.logging.tensorboard_log_interval < 1:
        problems.append(f"--tensorboard-log-interval {job.logging.tensorboard_log_interval} must be at least 1")
    source = checkpoint_records.checkpoint_to_load(job.checkpoint.load, job.checkpoint.pretrained_checkpoint)
    if source is not None:
        problems += _check_checkpoint(job, source, checksum)
    problems += _check_load(job, source)
    problems += _check_outputs(job, source)
    if not problems:
        problems += _lock_save(job)
    if problems:
        raise ConfigError("cannot start training:\n  - " + "\n  - ".join(problems))


def _lock_save(job: TrainingJob) -> List[str]:
    """Rank 0 takes the --save folder's lock for the rest of the run (released when it ends, however):
    a second run saving there would replace this one's checkpoints, or delete the staging directory of
    the save it is writing. Taken last, once nothing else is wrong."""
    save = job.checkpoint.save
    if not save or not is_rank_zero():
        return []
    try:
        lock_folder(save)
    except FolderLocked as error:
        return [f"{error}: wait for it to end, or choose another --save"]
    except OSError as error:
        return [f"--save {save}: cannot be locked ({error.strerror or error})"]
    return []


def _check_load(job: TrainingJob, source: Optional[str]) -> List[str]:
    """A --load without a checkpoint (checkpoint.load's refusal, found before the model is built): a
    first run may name its --save folder there, or start from --pretrained-checkpoint; --finetune
    needs the checkpoint. (Megatron-LM would start from scratch; a mistyped folder must not.)"""
    ck = job.checkpoint
    if ck.load and source != ck.load and not ck.pretrained_checkpoint and (ck.finetune or ck.load != ck.save):
        return [f"--load {ck.load}: no {checkpoint_records.TRACKER} (no complete checkpoint there)"]
    return []


def _writable_folder_problem(flag: str, path: str) -> Optional[str]:
    """Why `path` cannot be (or become) a folder this process writes in; None if it can."""
    existing = nearest_existing(path)
    if not os.path.isdir(existing):
        return f"{flag} {path}: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{flag} {path}: {existing} is not writable"
    return None


def _check_outputs(job: TrainingJob, source: Optional[str]) -> List[str]:
    """--save and --tensorboard-dir can be written (found now, not at the first save, hours in), and
    --save holds no other run's checkpoints, which a run that does not resume from them would overwrite."""
    ck = job.checkpoint
    problems = [problem for flag, path in (("--save", ck.save), ("--tensorboard-dir", job.logging.tensorboard_dir))
                if path and (problem := _writable_folder_problem(flag, path))]
    if ck.save and not problems and os.path.isdir(ck.save):
        try:
            saved = checkpoint_records.latest_iteration(ck.save)
        except ConfigError as error:  # a marker that is not an iteration number
            return [str(error)]
        if saved is None:
            return problems
        # Only a resume continues the numbering of --save's checkpoints: --load naming it (with its
        # tracker, so checkpoint_to_load chose it), without --finetune. A new stage started from them
        # (--pretrained-checkpoint naming --save, or --finetune) counts from iteration 0 again, and
        # its saves would replace theirs one by one, the tracker moved back beside newer ones.
        same = source is not None and source == ck.load and os.path.samefile(source, ck.save)
        if same and not ck.finetune:
            _warn_newer_checkpoints(job)
        elif same:
            problems.append(f"--save {ck.save} holds another run's checkpoints (up to iteration {saved}), which this "
                            f"run would overwrite: --finetune starts again at iteration 0, so choose another --save")
        else:
            problems.append(f"--save {ck.save} holds another run's checkpoints (up to iteration {saved}), which this "
                            f"run would overwrite: pass --load {ck.save} to resume from them, or choose another --save")
    return problems


def _warn_newer_checkpoints(job: TrainingJob) -> None:
    """A resume from an earlier iteration than --save's newest (the tracker set back, or --ckpt-step):
    said once, as what happens to the newer checkpoints is not obvious."""
    ck = job.checkpoint
    try:
        loaded = checkpoint_records.iteration_to_load(ck.load, ck.ckpt_step)
    except ConfigError:  # (a tracker naming a missing iteration: _check_checkpoint says so)
        return
    newer = [i for i in checkpoint_records.complete_iterations(ck.save) if loaded is not None and i > loaded]
    if newer and is_rank_zero():
        logger.warning("warning: --save %s holds iterations %s, newer than iteration %d this run resumes from: "
                       "each stays until this run saves that iteration, which replaces it (--ckpt-keep-last "
                       "never deletes them); the tracker names this run's newest", ck.save,
                       ", ".join(map(str, newer)), loaded)


CHECKPOINT_CHECKS = (checkpoint_records.check_architecture, checkpoint_records.check_schedule,
                     checkpoint_records.check_stage, checkpoint_records.check_optimizer_format)


def _check_checkpoint(job: TrainingJob, source: str, checksum: Optional[str]) -> List[str]:
    """The checkpoint training loads first against the flags: its common state is read once (a
    file over the network for large runs) and given to each check."""
    try:
        record = checkpoint_records.latest_record(source, job.checkpoint.ckpt_step)
    except ConfigError as error:
        return [str(error)]
    problems = []
    for check in CHECKPOINT_CHECKS:
        try:
            check(job, record)
        except ConfigError as error:
            problems.append(str(error))
    try:
        warning = checkpoint_records.check_tokenizer(job, record, checksum)
    except ConfigError as error:
        problems.append(str(error))
    else:  # a new stage's start: said once (before the process group and logging exist: rank 0 by its variable)
        if warning and is_rank_zero():
            logger.warning("warning: %s: the embeddings were trained on other token ids", warning)
    return problems


def _tokenizer_checksum(job: TrainingJob) -> Tuple[Optional[str], List[str]]:
    """The --tokenizer-model's SHA-256 (None without one, or unreadable: then the problem)."""
    if not job.data.tokenizer_model:
        return None, []
    from megatron_eve.data.tokenizer import Tokenizer, TokenizerError

    try:
        return Tokenizer(job.data.tokenizer_model).checksum, []
    except TokenizerError as error:  # names the flag and the file
        return None, [str(error)]
    except (OSError, RuntimeError) as error:
        return None, [f"--tokenizer-model: {error}"]


def _data_warnings(job: TrainingJob, prefix: str, meta: dict) -> List[str]:
    """What a dataset's preprocessing makes of this stage, legal but likely a slip: another template
    than EVE trains the stage with (plain captions for prealign / pretrain, a conversation for SFT),
    or a --max-length below --seq-length (longer samples were dropped or cut then, not now)."""
    warnings, stage, template = [], job.schedule.stage, meta.get("template")
    if template is not None and (template == "plain") != (stage in ("prealign", "pretrain")):
        expected = "plain" if stage in ("prealign", "pretrain") else "a conversation template (vicuna_v1)"
        warnings.append(f"{prefix} was preprocessed with --template {template}; EVE's {stage} stage trains on "
                        f"{expected}")
    max_length, seq = meta.get("max_length"), job.data.seq_length
    if max_length is not None and max_length < seq:
        done = "cut to" if meta.get("over_length") == "truncate" else "dropped beyond"
        warnings.append(f"{prefix} was preprocessed with --max-length {max_length}: its samples were {done} "
                        f"{max_length} positions, while --seq-length {seq} would take them")
    return warnings


def _check_data(job: TrainingJob, blend, checksum: Optional[str]) -> List[str]:
    problems, images = [], 0
    vision, lm = job.model.vision, job.model.language
    for weight, prefix in blend:
        try:
            meta = read_metadata(prefix)
        except (DatasetFormatError, OSError, ValueError) as error:
            problems.append(f"--data-path {prefix}: {error}")
            continue
        if meta["image_size"] != vision.image_size or meta["teacher_image_size"] != vision.teacher_image_size:
            problems.append(f"{prefix} holds {meta['image_size']}/{meta['teacher_image_size']}-px images but the "
                            f"model takes {vision.image_size}/{vision.teacher_image_size} (--image-size)")
        if meta["tokenizer_vocab_size"] > lm.vocab_size:
            problems.append(f"{prefix} was tokenized with {meta['tokenizer_vocab_size']} ids, more than the "
                            f"model's vocabulary {lm.vocab_size}")
        if checksum and meta["tokenizer_sha256"] != checksum:
            problems.append(f"{prefix} was made with a different tokenizer than --tokenizer-model")
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                problems.append(f"{prefix}{suffix} is missing")
        for warning in _data_warnings(job, prefix, meta) if is_rank_zero() else ():
            logger.warning("warning: %s", warning)
        if weight != 0:  # NaN (unweighted) too
            images += meta.get("counts", {}).get("images", 1)
    if not problems and job.schedule.stage == "prealign" and not images:
        problems.append("--stage prealign trains the vision parts only, and no dataset of --data-path holds an image")
    if not problems:
        try:  # what the blend makes of them (every dataset empty, none left in the training split), now
            check_blend(job.data)
        except (ConfigError, DatasetFormatError, ValueError) as error:
            problems.append(str(error))
    return problems
