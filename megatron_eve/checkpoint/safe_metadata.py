"""torch.distributed.checkpoint reads a checkpoint's `.metadata` with plain `pickle.load`, and the
objects stored inside its `.distcp` files (megatron-core's common state, sharded objects) with
`torch.load(weights_only=False)` in its default load planner: a crafted checkpoint folder could run
code on every --load, conversion, generation or demo start. `install()` makes the metadata read use
an unpickler that resolves only what checkpoint metadata holds (torch.distributed.checkpoint's
metadata and planner classes, torch sizes / dtypes / layouts / memory formats, paths and plain
containers; anything else is refused with an error naming it), and the planner's object reads use
torch.load with weights_only=True, as megatron-core's own reads of those objects do.
"""

from __future__ import annotations

import pickle

import torch

_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    # storage_meta.checkpoint_id of checkpoints written without a process group (our converters)
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("pathlib._local", "PosixPath"), ("pathlib._local", "PurePosixPath"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
}
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)


class MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = (module, name) in _ALLOWED or (module in _MODULES and not name.startswith("__")) or (
            module == "torch" and isinstance(getattr(torch, name, None), _TORCH_VALUES))
        if not allowed:
            raise pickle.UnpicklingError(
                f"checkpoint metadata refers to {module}.{name}, which checkpoint metadata never holds: refusing "
                "to load it (a crafted or foreign checkpoint?)")
        return super().find_class(module, name)


class _RestrictedPickle:
    """Stands in for the `pickle` module inside torch.distributed.checkpoint.filesystem: loads are
    restricted, everything else (dumps when saving) is the real module's."""

    def __getattr__(self, name):
        return getattr(pickle, name)

    @staticmethod
    def load(file, **kwargs):  # noqa: ARG004 — pickle.load's keyword arguments are not needed here
        return MetadataUnpickler(file).load()

    @staticmethod
    def loads(data, **kwargs):  # noqa: ARG004
        import io

        return MetadataUnpickler(io.BytesIO(data)).load()


class _WeightsOnlyTorch:
    """Stands in for the `torch` module inside torch.distributed.checkpoint.default_planner, whose
    `load_bytes` unpickles every stored object with weights_only=False: its loads are weights-only
    (tensors, plain containers and numbers; anything else raises pickle.UnpicklingError), everything
    else is the real module's."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(file, *args, **kwargs):
        kwargs["weights_only"] = True
        return torch.load(file, *args, **kwargs)


def install() -> None:
    """Idempotent; affects checkpoint reads in this process only."""
    from torch.distributed.checkpoint import default_planner, filesystem

    if not isinstance(filesystem.pickle, _RestrictedPickle):
        filesystem.pickle = _RestrictedPickle()
    if not isinstance(default_planner.torch, _WeightsOnlyTorch):
        default_planner.torch = _WeightsOnlyTorch()
