"""Saving and loading checkpoints with megatron-core dist-checkpointing (Megatron-LM's directory
conventions; checkpoint_records.py reads what a checkpoint root holds before any work).

SAVE/iter_0000100/ holds model, optimizer, scheduler, iteration, consumed samples and per-rank RNG;
SAVE/latest_checkpointed_iteration.txt names the newest complete one. A checkpoint is written under
a temporary name and renamed when every rank has finished, and the marker is replaced only after
that, so an interrupted save (killed, or still writing in the background with --async-save) never
looks like the latest; a directory being replaced is moved aside, never deleted, until its
replacement is in place.
The distributed optimizer's state is saved as each data-parallel rank holds it ("dp_reshardable":
every rank writes its own shard, nothing is gathered); it loads at any data-parallel size but only
at the tensor / pipeline sizes it was saved at. --dist-ckpt-optim-fully-reshardable saves it in
model space instead ("fully_reshardable": gathered over data-parallel ranks at every save), which
loads at any layout. The plain optimizer's state follows the model's sharding and loads into the
plain optimizer at any layout; the plain and the distributed formats do not load into each other.
Model weights reshard to any TP / PP and across layer specs (Transformer Engine's `_extra_state` is
loaded where both sides have it, left alone where one lacks it); --finetune loads model weights
only (a new stage), and weights missing from the checkpoint (e.g. a fresh PEL on top of a language
model) keep their initialisation.
"""

from __future__ import annotations

import functools
import logging
import os
import random
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron_eve.atomic import staging_name
from megatron_eve.checkpoint import safe_metadata
from megatron_eve.config import ConfigError, TrainingJob
from megatron_eve.model.specs import resolve_transformer_impl
from megatron_eve.training.checkpoint_records import (DP_RESHARDABLE, FULLY_RESHARDABLE, PLAIN, TRACKER,
                                                      CheckpointLoadError, CheckpointRecord, check_optimizer_format,
                                                      check_param_groups, checkpoint_dir, complete_iterations,
                                                      iteration_to_load, reading, saved_optimizer_format)
from megatron_eve.training.checkpoint_writes import (finalize_async_saves, remove_stale_staging,
                                                     start_results_queue, write)
from megatron_eve.training.checksums import damaged_files
from megatron_eve.training.optim import torch_adam_loading, torch_adam_state_made, zero_steps_restored

logger = logging.getLogger(__name__)
safe_metadata.install()  # every load in this process reads .metadata without running its code


def _chunks(model) -> List:
    """The model chunks of `model`: a list of them (interleaved pipeline), or one."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def model_states(model) -> Dict[str, Dict]:
    """The sharded state dicts of the EVEModels inside DDP / Float16Module (checkpoints use their
    keys, whatever the wrapping), under Megatron-LM's names: "model", or with several model chunks
    per rank (interleaved pipeline) "model0", "model1", ... Tensors inside are keyed by global
    layer number, so a checkpoint of any chunking loads into any other."""
    chunks = []
    for chunk in _chunks(model):
        while hasattr(chunk, "module"):
            chunk = chunk.module
        chunks.append(chunk)
    names = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    return {name: (chunk, chunk.sharded_state_dict()) for name, chunk in zip(names, chunks)}


def gather_updated_parameters(model) -> None:
    """With the distributed optimizer's overlapped parameter gather (--overlap-param-gather) a step
    writes only this rank's shard of the update into the model's parameters; the next forward pass
    gathers the rest. Gathered here, synchronously, so what is read now (a checkpoint) holds the
    step's weights, not ones mostly a step old (Megatron-LM gathers before saving likewise)."""
    for chunk in _chunks(model):
        config = getattr(chunk, "ddp_config", None)
        if config is not None and config.use_distributed_optimizer and config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


EXTRA_STATE = "_extra_state"  # Transformer Engine modules' non-tensor state (FP8 metadata)


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    consumed_valid_samples: int = 0  # validation sequences read: a resumed run evaluates on the next ones
    skipped_iterations: int = 0
    nan_iterations: int = 0


def _layout() -> Dict[str, int]:
    from megatron.core import parallel_state as ps

    layout = {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size()}
    chunks = ps.get_virtual_pipeline_model_parallel_world_size()
    if chunks:  # interleaved: the distributed optimizer's buckets follow the chunks too
        layout["vpp"] = chunks
    return layout


def _describe(layout: Dict[str, int]) -> str:
    return " ".join(f"{key.upper()}={value}" for key, value in layout.items())


def _rng_object(data):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        "rng_state", data,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(),
    )


def _rng_state() -> Dict:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def optimizer_format(job: TrainingJob) -> str:
    """The format save() writes the optimizer state in."""
    if not job.optim.use_distributed_optimizer:
        return PLAIN
    return FULLY_RESHARDABLE if job.checkpoint.dist_ckpt_optim_fully_reshardable else DP_RESHARDABLE


@functools.lru_cache(maxsize=4)
def tokenizer_checksum(path: Optional[str]) -> Optional[str]:
    """The SHA-256 of the tokenizer model (as preprocessed data records it), read at the start of the
    run (load()) and kept: a tokenizer file gone since then costs the record, not the save."""
    if not path:
        return None
    from megatron_eve.data.tokenizer import Tokenizer

    try:
        return Tokenizer(path).checksum
    except (OSError, RuntimeError):  # (a TokenizerError is an OSError)
        return None


def _optimizer_metadata(fmt: str) -> Dict[str, str]:
    # The plain optimizer ignores it (the plain and the distributed formats do not load into each
    # other: checkpoint_records.check_optimizer_format refuses that before work).
    return {"distrib_optim_sharding_type": DP_RESHARDABLE if fmt == DP_RESHARDABLE else FULLY_RESHARDABLE}


def _save_strategy(job: TrainingJob):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    strategy = get_default_save_sharded_strategy()
    if job.checkpoint.ckpt_fully_parallel_save:
        # Data-parallel replicas of a tensor (the weights) are written by one of them each, spread evenly.
        strategy = FullyParallelSaveStrategyWrapper(strategy, ps.get_data_parallel_group())
    return strategy


def save(job: TrainingJob, model, optimizer, scheduler, state: TrainState) -> str:
    """Write a complete checkpoint of `state.iteration`; returns its directory. With --async-save
    the files are written by a background process and this returns once the state is captured;
    finalize_async_saves() publishes the checkpoint when every rank has written its part."""
    from megatron.core import dist_checkpointing

    finalize_async_saves(blocking=True)  # one save in flight at a time, published in order
    start_results_queue()
    root = job.checkpoint.save
    final = checkpoint_dir(root, state.iteration)
    # Named by rank 0's process (host and pid), so that only a dead run's staging is ever taken for a
    # leftover (remove_stale_staging); every rank writes in the one rank 0 made.
    names = [None]
    if dist.get_rank() == 0:
        remove_stale_staging(root)
        names = [os.path.join(root, staging_name(os.path.basename(final)))]
        os.makedirs(names[0])
    dist.broadcast_object_list(names, src=0)
    staging = names[0]
    gather_updated_parameters(model)
    fmt = optimizer_format(job)
    torch_adam_state_made(optimizer)  # a save before the first update writes the state its resume reads
    models = {name: sharded for name, (_, sharded) in model_states(model).items()}
    sharded = {
        **models,
        "optimizer": optimizer.sharded_state_dict(models, metadata=_optimizer_metadata(fmt)),
        "optimizer_format": fmt,
        "opt_param_scheduler": scheduler.state_dict(),
        "train_state": asdict(state),
        "layout": _layout(),
        "stage": job.schedule.stage,
        "model_config": asdict(job.model),  # lets converters rebuild the architecture
        # and export the tokenizer (megatron_to_hf without --tokenizer-model)
        "tokenizer_model": os.path.abspath(job.data.tokenizer_model) if job.data.tokenizer_model else None,
        "tokenizer_sha256": tokenizer_checksum(job.data.tokenizer_model),  # a resume's tokenizer is compared by it
        "transformer_impl": resolve_transformer_impl(job.runtime.transformer_impl),
        "rng_state": _rng_object(_rng_state()),
    }
    # The same request either way: written here (sync) or by a forked process (async), then the
    # finalize functions (megatron-core's metadata, then ours) run on every rank once all have written.
    request = dist_checkpointing.save(sharded, staging, sharded_strategy=_save_strategy(job),
                                      async_sharded_save=True, async_strategy="mcore",
                                      content_metadata={**_optimizer_metadata(fmt), "optimizer_format": fmt})
    write(request, root, staging, final, state.iteration, job.checkpoint.keep_last, job.checkpoint.async_save)
    return final


def verify_checksums(directory: str) -> bool:
    """Check every file against checksums.json; raise CheckpointLoadError naming the damaged
    files. False when the checkpoint records no checksums (older, converted)."""
    with reading(directory):
        problems = damaged_files(directory)
    if problems:
        raise CheckpointLoadError(f"{directory} is damaged: {'; '.join(problems[:5])}"
                                  f"{' …' if len(problems) > 5 else ''}; resume from an earlier iteration by "
                                  f"writing its number into {TRACKER}")
    return problems is not None


def load(job: TrainingJob, model, optimizer, scheduler) -> TrainState:
    """Resume from --load, or start a stage from --pretrained-checkpoint / --load --finetune
    (weights only); returns where training continues."""
    tokenizer_checksum(job.data.tokenizer_model)  # what every save of this run records
    ck = job.checkpoint
    resume = iteration_to_load(ck.load, ck.ckpt_step) if ck.load else None
    if resume is None:
        _refuse_unmarked(ck.load, ck.save)
    if resume is not None and not ck.finetune:
        return _resume(job, model, optimizer, scheduler, checkpoint_dir(ck.load, resume))
    if ck.finetune and resume is not None:
        return _load_weights(model, optimizer, checkpoint_dir(ck.load, resume), ck.verify_checkpoint)
    source = ck.pretrained_checkpoint
    if source is None:
        if ck.load and (ck.finetune or ck.load != ck.save):
            raise ConfigError(f"--load {ck.load}: no {TRACKER} (no complete checkpoint there)")
        if ck.load and dist.get_rank() == 0:
            logger.warning("no checkpoint in %s yet: starting from scratch", ck.load)
        if job.schedule.stage == "prealign" and dist.get_rank() == 0:
            logger.warning("prealign trains the vision side against a frozen language model, here a randomly "
                           "initialised one: give --pretrained-checkpoint (Vicuna converted by "
                           "checkpoint_conversion/llama_to_megatron.py) unless that is what you want")
        return TrainState()
    iteration = iteration_to_load(source, ck.ckpt_step)
    if iteration is None:
        raise ConfigError(f"{source}: no {TRACKER} (no complete checkpoint there)")
    return _load_weights(model, optimizer, checkpoint_dir(source, iteration), ck.verify_checkpoint)


def _load_weights(model, optimizer, directory: str, verify: bool) -> TrainState:
    """A new stage's start: the weights `directory` holds (those it lacks keep their initialisation)."""
    from megatron.core import dist_checkpointing

    if verify:
        verify_checksums(directory)
    chunks, template, missing = {}, {}, []
    with reading(directory):
        for name, (chunk, sharded) in model_states(model).items():
            present, lacking = split_by_presence(sharded, directory)
            chunks[name], template[name] = chunk, present
            missing += [k for k in lacking if not k.endswith(EXTRA_STATE)]
        loaded = dist_checkpointing.load(template, directory)  # one call: the access check spans all chunks
    for name, chunk in chunks.items():
        chunk.load_state_dict(loaded[name], strict=False)
    optimizer.reload_model_params()  # the optimizer's fp32 main copies follow the loaded weights
    if dist.get_rank() == 0:
        logger.info("initialised from the weights of %s", directory)
        if missing:
            logger.warning("not in %s, kept as initialised: %s", directory, ", ".join(missing))
    return TrainState()


def _refuse_unmarked(*roots: Optional[str]) -> None:
    """Complete iter_* directories without a marker: starting from scratch would overwrite them."""
    for root in dict.fromkeys(r for r in roots if r):
        done = complete_iterations(root)
        if done and not os.path.isfile(os.path.join(root, TRACKER)):
            raise ConfigError(
                f"{root} holds {checkpoint_dir(root, done[-1])} but no {TRACKER}: write {done[-1]} into "
                f"{os.path.join(root, TRACKER)} to resume from it, or train into an empty --save directory")


def _check_optimizer_format(job: TrainingJob, record: CheckpointRecord) -> None:
    """Refuse, in one line, an optimizer state this run's optimizer cannot load: one of the other
    kind (plain / distributed), or the data-parallel-sharded format, which follows the distributed
    optimizer's buckets of one TP x PP layout, at another layout (the weights still reshard)."""
    check_optimizer_format(job, record)
    here, layout = _layout(), record.common.get("layout")
    if saved_optimizer_format(record.common) != DP_RESHARDABLE or layout is None or layout == here:
        return
    raise ConfigError(
        f"{record.directory} holds the distributed optimizer's state sharded by data-parallel rank, which cannot "
        f"be loaded at {_describe(here)} (saved at {_describe(layout)}): pass --no-load-optim to load the weights "
        "only, or resume as saved and save again with --dist-ckpt-optim-fully-reshardable")


def split_by_presence(sharded: Dict, directory: str) -> Tuple[Dict, List[str]]:
    """A model's sharded state dict → (the entries `directory` holds, the keys it lacks).
    Tensors and objects (such as `_extra_state`) alike."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    # Objects are listed per shard ("<key>/shard_<offset>_<count>"); an entry matches by its key.
    available = {key.split("/shard_")[0] for key in load_sharded_metadata(directory)}
    present = {k: v for k, v in sharded.items() if getattr(v, "key", k) in available}
    return present, sorted(k for k in sharded if k not in present)


def _refuse_converted(root: str, directory: str, common: Dict) -> None:
    """A converter's output holds weights only (no optimizer, scheduler or iteration): it starts a
    run, it does not resume one."""
    if "converted_from" in common:
        raise ConfigError(
            f"--load {root}: {directory} was converted from {common['converted_from']}, not saved by training, "
            f"so there is nothing to resume: start from it with --pretrained-checkpoint {root} (--load / --save "
            "then name this run's own folder), or pass --finetune to load its weights only")


def _resume(job: TrainingJob, model, optimizer, scheduler, directory: str) -> TrainState:
    from megatron.core import dist_checkpointing

    verified = verify_checksums(directory) if job.checkpoint.verify_checkpoint else None  # damage named first
    with reading(directory):
        common = dist_checkpointing.load_common_state_dict(directory)
    _refuse_converted(job.checkpoint.load, directory, common)
    if verified is False and dist.get_rank() == 0:
        logger.warning("%s records no checksums: loaded unverified", directory)
    # A checkpoint saved under another layer spec lacks (or has extra) `_extra_state` entries:
    # resume without them; every weight must still be there.
    chunks, template, lacking = {}, {}, []
    with reading(directory):
        for name, (chunk, sharded) in model_states(model).items():
            _, chunk_lacking = split_by_presence(sharded, directory)
            chunks[name] = chunk
            template[name] = {k: v for k, v in sharded.items() if k not in chunk_lacking}
            lacking += chunk_lacking
    weights_lacking = [k for k in lacking if not k.endswith(EXTRA_STATE)]
    if weights_lacking:
        raise ConfigError(f"{directory} lacks model tensors: {', '.join(weights_lacking[:8])}"
                          f"{' …' if len(weights_lacking) > 8 else ''}")
    if lacking and dist.get_rank() == 0:
        logger.info("%s was saved under the %s layer spec: %d %s entries are not restored", directory,
                    common.get("transformer_impl", "local"), len(lacking), EXTRA_STATE)
    models = dict(template)
    same_layout = common.get("layout") == _layout()
    if not job.checkpoint.no_load_optim:
        saved = saved_optimizer_format(common)
        record = CheckpointRecord(job.checkpoint.load, directory, common)
        _check_optimizer_format(job, record)
        check_param_groups(optimizer, record)
        torch_adam_state_made(optimizer)
        template["optimizer"] = optimizer.sharded_state_dict(models, is_loading=True,
                                                             metadata=_optimizer_metadata(saved))
    if same_layout and not job.checkpoint.no_load_rng:
        template["rng_state"] = _rng_object(_rng_state())
    with reading(directory):
        state = dist_checkpointing.load(template, directory)
    for name, chunk in chunks.items():
        chunk.load_state_dict(state[name], strict=not lacking)
    if "optimizer" in template:  # (the result holds the checkpoint's common optimizer entries either way)
        # megatron-core copies the data-parallel-sharded state into the main parameters in place
        # without no_grad: in fp32 training those are views of the model's leaf parameters.
        zero_steps_restored(state["optimizer"])
        with torch.no_grad(), torch_adam_loading(optimizer):
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(common["opt_param_scheduler"])
    else:
        optimizer.reload_model_params()
    if "rng_state" in state:
        _set_rng_state(state["rng_state"])
    elif not job.checkpoint.no_load_rng and dist.get_rank() == 0:
        logger.warning("checkpoint layout %s differs from %s: RNG states are not restored",
                       common.get("layout"), _layout())
    saved = common["train_state"]
    state = TrainState(**{k: v for k, v in saved.items() if k in TrainState.__dataclass_fields__})
    if "consumed_valid_samples" not in saved:  # written before it was kept: Megatron-LM's estimate
        log, schedule = job.logging, job.schedule
        evaluations = state.iteration // log.eval_interval if log.eval_interval else 0
        state.consumed_valid_samples = evaluations * log.eval_iters * schedule.global_batch_size
    return state
