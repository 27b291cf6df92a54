"""Checkpoints with megatron-core dist-checkpointing (Megatron-LM's directory conventions).

SAVE/iter_0000100/ holds model, optimizer (fully reshardable), scheduler, iteration, consumed
samples and per-rank RNG; SAVE/latest_checkpointed_iteration.txt names the newest complete one.
A checkpoint is written under a temporary name and renamed when every rank has finished, and the
marker is replaced only after that, so an interrupted save never looks like the latest; a directory
being replaced is moved aside, never deleted, until its replacement is in place.
Loading reshards to any TP / PP and across layer specs (Transformer Engine's `_extra_state` is
loaded where both sides have it, left alone where one lacks it); --finetune loads model weights
only (a new stage), and weights missing from the checkpoint (e.g. a fresh PEL on top of a language
model) keep their initialisation.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron_eve.config import ConfigError
from megatron_eve.model.specs import resolve_transformer_impl
from megatron_eve.training.arguments import TrainingJob

logger = logging.getLogger(__name__)
TRACKER = "latest_checkpointed_iteration.txt"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def unwrap(model):
    """The EVEModel inside DDP / Float16Module: checkpoints use its keys, whatever the wrapping."""
    while hasattr(model, "module"):
        model = model.module
    return model


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


EXTRA_STATE = "_extra_state"  # Transformer Engine modules' non-tensor state (FP8 metadata)


def latest_iteration(root: str) -> Optional[int]:
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        text = handle.read().strip()
    if not text.isdigit():
        raise ConfigError(f"{path} holds {text!r}, not an iteration number")
    iteration = int(text)
    _recover_replaced(checkpoint_dir(root, iteration))
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


def _aside(directory: str) -> str:
    return directory + ".replaced"


def _recover_replaced(directory: str) -> None:
    """A save killed between moving the old directory aside and renaming the new one in place
    leaves only the old copy: put it back."""
    if not os.path.isdir(directory) and os.path.isdir(_aside(directory)):
        os.replace(_aside(directory), directory)


def _move_into_place(staging: str, final: str) -> None:
    """Rename staging to final; an existing final is moved aside first and removed only once
    the new one is in place, so some complete copy exists at every instant."""
    if os.path.isdir(final):
        shutil.rmtree(_aside(final), ignore_errors=True)
        os.replace(final, _aside(final))
    os.replace(staging, final)
    shutil.rmtree(_aside(final), ignore_errors=True)


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0
    nan_iterations: int = 0


def _layout() -> Dict[str, int]:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size()}


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


def save(job: TrainingJob, model, optimizer, scheduler, state: TrainState) -> str:
    """Write a complete checkpoint of `state.iteration`; returns its directory."""
    from megatron.core import dist_checkpointing

    root = job.checkpoint.save
    final = checkpoint_dir(root, state.iteration)
    staging = final + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    dist.barrier()
    model_sd = unwrap(model).sharded_state_dict()
    sharded = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_METADATA),
        "opt_param_scheduler": scheduler.state_dict(),
        "train_state": asdict(state),
        "layout": _layout(),
        "stage": job.schedule.stage,
        "model_config": asdict(job.model),  # lets converters rebuild the architecture
        "transformer_impl": resolve_transformer_impl(job.runtime.transformer_impl),
        "rng_state": _rng_object(_rng_state()),
    }
    dist_checkpointing.save(sharded, staging, content_metadata=OPTIMIZER_METADATA)
    dist.barrier()
    if dist.get_rank() == 0:
        _move_into_place(staging, final)
        marker = os.path.join(root, TRACKER)
        with open(marker + ".tmp", "w") as handle:
            handle.write(str(state.iteration))
        os.replace(marker + ".tmp", marker)  # only now is this checkpoint the latest
        _prune(root, job.checkpoint.keep_last, keep=state.iteration)
    dist.barrier()
    return final


def _prune(root: str, keep_last: Optional[int], keep: int) -> None:
    if not keep_last:
        return
    iterations = sorted(int(name[5:]) for name in os.listdir(root)
                        if name.startswith("iter_") and name[5:].isdigit())
    for iteration in iterations[:-keep_last]:
        if iteration != keep:
            shutil.rmtree(checkpoint_dir(root, iteration), ignore_errors=True)


def load(job: TrainingJob, model, optimizer, scheduler) -> TrainState:
    """Resume from --load, or start a stage from --pretrained-checkpoint / --load --finetune
    (weights only); returns where training continues."""
    from megatron.core import dist_checkpointing

    ck = job.checkpoint
    model = unwrap(model)
    resume = latest_iteration(ck.load) if ck.load else None
    if resume is None:
        _refuse_unmarked(ck.load, ck.save)
    if resume is not None and not ck.finetune:
        return _resume(job, model, optimizer, scheduler, checkpoint_dir(ck.load, resume))
    source = ck.load if (ck.finetune and resume is not None) else ck.pretrained_checkpoint
    if source is None:
        if ck.load and (ck.finetune or ck.load != ck.save):
            raise ConfigError(f"--load {ck.load}: no {TRACKER} (no complete checkpoint there)")
        if ck.load:
            logger.warning("no checkpoint in %s yet: starting from scratch", ck.load)
        return TrainState()
    iteration = latest_iteration(source)
    if iteration is None:
        raise ConfigError(f"{source}: no {TRACKER} (no complete checkpoint there)")
    directory = checkpoint_dir(source, iteration)
    present, missing = split_by_presence(model.sharded_state_dict(), directory)
    loaded = dist_checkpointing.load({"model": present}, directory)["model"]
    model.load_state_dict(loaded, strict=False)
    missing = [k for k in missing if not k.endswith(EXTRA_STATE)]
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
        if done:
            raise ConfigError(
                f"{root} holds {checkpoint_dir(root, done[-1])} but no {TRACKER}: write {done[-1]} into "
                f"{os.path.join(root, TRACKER)} to resume from it, or train into an empty --save directory")


def split_by_presence(sharded: Dict, directory: str) -> Tuple[Dict, List[str]]:
    """A model's sharded state dict → (the entries `directory` holds, the keys it lacks).
    Tensors and objects (such as `_extra_state`) alike."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    # Objects are listed per shard ("<key>/shard_<offset>_<count>"); an entry matches by its key.
    available = {key.split("/shard_")[0] for key in load_sharded_metadata(directory)}
    present = {k: v for k, v in sharded.items() if getattr(v, "key", k) in available}
    return present, sorted(k for k in sharded if k not in present)


def _resume(job: TrainingJob, model, optimizer, scheduler, directory: str) -> TrainState:
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(directory)
    model_sd = model.sharded_state_dict()
    # A checkpoint saved under another layer spec lacks (or has extra) `_extra_state` entries:
    # resume without them; every weight must still be there.
    present, lacking = split_by_presence(model_sd, directory)
    weights_lacking = [k for k in lacking if not k.endswith(EXTRA_STATE)]
    if weights_lacking:
        raise ConfigError(f"{directory} lacks model tensors: {', '.join(weights_lacking[:8])}"
                          f"{' …' if len(weights_lacking) > 8 else ''}")
    if lacking and dist.get_rank() == 0:
        logger.info("%s was saved under the %s layer spec: %d %s entries are not restored", directory,
                    common.get("transformer_impl", "local"), len(lacking), EXTRA_STATE)
    model_sd = {k: v for k, v in model_sd.items() if k not in lacking}
    template = {"model": model_sd}
    if not job.checkpoint.no_load_optim:
        template["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIMIZER_METADATA)
    same_layout = common.get("layout") == _layout()
    if same_layout and not job.checkpoint.no_load_rng:
        template["rng_state"] = _rng_object(_rng_state())
    state = dist_checkpointing.load(template, directory)
    model.load_state_dict(state["model"], strict=not lacking)
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(common["opt_param_scheduler"])
    else:
        optimizer.reload_model_params()
    if "rng_state" in state:
        _set_rng_state(state["rng_state"])
    elif not job.checkpoint.no_load_rng and dist.get_rank() == 0:
        logger.warning("checkpoint layout %s differs from %s: RNG states are not restored",
                       common.get("layout"), _layout())
    return TrainState(**common["train_state"])
