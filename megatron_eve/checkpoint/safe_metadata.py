"""torch.distributed.checkpoint reads a checkpoint's `.metadata` with plain `pickle.load`, so a
crafted checkpoint folder could run code on every --load, conversion, generation or demo start.
`install()` makes that read use an unpickler that resolves only what checkpoint metadata holds:
torch.distributed.checkpoint's metadata and planner classes, torch sizes / dtypes / layouts /
memory formats, paths and plain containers. Anything else is refused with an error naming it.
(Tensors and objects inside the checkpoint files are read by torch.load with weights_only=True.)
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


def install() -> None:
    """Idempotent; affects metadata reads in this process only."""
    from torch.distributed.checkpoint import filesystem

    if not isinstance(filesystem.pickle, _RestrictedPickle):
        filesystem.pickle = _RestrictedPickle()
