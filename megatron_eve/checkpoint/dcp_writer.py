"""Write a megatron-core dist checkpoint (torch_dist format) one tensor chunk at a time.

megatron-core stores every model tensor in its global shape (decoder layers stacked along a
leading layer axis) and reshards on load, so a converter only has to describe the global tensors
and their chunks — here one chunk per decoder layer — and produce each chunk when the writer asks
for it. Nothing forces the whole model into memory: a chunk is computed, written and dropped.
The result loads at any TP / PP, like a checkpoint the trainer saved.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from megatron_eve.atomic import named_write_errors, replace_directory


@dataclass
class GlobalTensor:
    """A tensor of the checkpoint: its key, global shape and dtype, and how to make each chunk.

    chunks: (offsets, make) pairs; make() returns the chunk (shape = its slice of the global).
    """

    key: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    chunks: List[Tuple[Tuple[int, ...], Callable[[], torch.Tensor]]]


def layer_chunks(num_layers: int, make_layer: Callable[[int], torch.Tensor]):
    """Chunks of a layer-stacked tensor [L, ...]: chunk i is layer i with a leading axis of 1."""
    return [((i,), (lambda i=i: make_layer(i).unsqueeze(0))) for i in range(num_layers)]


# megatron-core keeps its non-tensor ("common") state as one pickled object under this key.
COMMON_STATE_KEY = "common_state/shard_0_1"


class _LazyPlanner(DefaultSavePlanner):
    def __init__(self, tensors: Sequence[GlobalTensor], common: Dict):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.makers: Dict[Tuple[str, Tuple[int, ...]], Callable[[], torch.Tensor]] = {}
        self.common = common
        self.items: List[WriteItem] = [WriteItem(index=MetadataIndex(COMMON_STATE_KEY), type=WriteItemType.BYTE_IO)]
        for tensor in tensors:
            for offsets, make in tensor.chunks:
                full = tuple(offsets) + (0,) * (len(tensor.shape) - len(offsets))
                index = MetadataIndex(tensor.key, torch.Size(full))
                self.items.append(WriteItem(
                    index=index,
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=torch.Size(full), sizes=torch.Size(
                            [1] * len(offsets) + list(tensor.shape[len(offsets):]) if offsets else tensor.shape)),
                        properties=TensorProperties(dtype=tensor.dtype),
                        size=torch.Size(tensor.shape),
                    ),
                ))
                self.makers[(tensor.key, full)] = make

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self.items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            buffer = io.BytesIO()
            torch.save([self.common], buffer)
            buffer.seek(0)
            return buffer
        made = self.makers[(write_item.index.fqn, tuple(write_item.index.offset))]()
        expected = tuple(write_item.tensor_data.chunk.sizes)
        if tuple(made.shape) != expected:
            raise ValueError(f"{write_item.index.fqn}: made a chunk of shape {tuple(made.shape)}, "
                             f"expected {expected}")
        return made.to(write_item.tensor_data.properties.dtype).contiguous()


def write_checkpoint(directory: str, tensors: Sequence[GlobalTensor], common: Dict = None) -> None:
    """A complete dist checkpoint in `directory`, written under a temporary name first; `common`
    is its small non-tensor state (plain Python values)."""
    staging = directory.rstrip("/") + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    writer = FileSystemWriter(staging, single_file_per_rank=True, thread_count=1, sync_files=True)
    with named_write_errors(staging):  # a full disk: torch's RuntimeError / CheckpointException otherwise
        dcp_save({}, storage_writer=writer, planner=_LazyPlanner(tensors, common or {}), no_dist=True)
    with open(os.path.join(staging, "metadata.json"), "w") as handle:  # megatron-core's marker
        json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1}, handle)
    replace_directory(staging, directory)
