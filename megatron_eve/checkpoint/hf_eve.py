"""The HF EVE release format (eve.md §2) ↔ megatron_eve's dist checkpoints.

Names: `model.layers.{i}.*` ↔ the stacked `decoder.layers.*` (fused QKV, fused [gate; up]),
`model.vision_tower.*` ↔ `vision_model.*` (same sub-names), `model.mm_projector.{0,2}.*` ↔
`vision_projection.{0,2}.*`, `model.vision_tower_compressor.*` ↔ `aligner.*`. The CLIP teacher
(`model.vision_clip.*`, aliased under `vision_tower_compressor.clip_layer.*`) is not part of the
model and is skipped. config.json's side of the format is hf_config.py's.

Everything is read lazily (memory-mapped `.bin` shards, read without executing pickled code;
safetensors by tensor) and written a chunk or a shard at a time.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from megatron_eve.atomic import recover_replaced
from megatron_eve.checkpoint.dcp_writer import GlobalTensor, layer_chunks
from megatron_eve.checkpoint.llama_layout import LAYER_RULES, OUTER_KEYS, hf_layer_shapes, pad_vocab
from megatron_eve.config import ConfigError, EVEModelConfig, padded_vocab_size

SKIPPED_PREFIXES = ("model.vision_clip.", "model.vision_tower_compressor.clip_layer.")
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)
LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# What to do about a damaged Megatron checkpoint when exporting it (megatron_to_hf's flag).
EARLIER_ITERATION = "export an earlier iteration with --iteration N"


class CheckpointFormatError(ValueError):
    """A checkpoint folder whose files or tensors do not form the expected model."""


# ---------------------------------------------------------------------------------- reading
class HFWeights:
    """Lazy access to the tensors of an HF folder: sharded or single `.bin` / safetensors."""

    def __init__(self, folder: str):
        recover_replaced(folder, legacy=False)  # an export killed between its two renames left it aside
        self.folder = folder
        self.files: Dict[str, str] = {}  # key → file
        self._handles: Dict[str, object] = {}
        index = next((os.path.join(folder, n) for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                      if os.path.isfile(os.path.join(folder, n))), None)
        if index:
            try:
                with open(index) as handle:
                    self.files = dict(json.load(handle)["weight_map"])
            except (ValueError, KeyError, TypeError) as error:
                raise CheckpointFormatError(f"{index}: not a shard index with a weight_map ({error})") from None
            missing = sorted({f for f in self.files.values() if not os.path.isfile(os.path.join(folder, f))})
            if missing:
                raise CheckpointFormatError(f"{folder}: shards named in {os.path.basename(index)} are missing: "
                                            f"{', '.join(missing)}")
        else:
            single = next((n for n in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(folder, n))), None)
            if single is None:
                raise CheckpointFormatError(f"{folder}: no model.safetensors, pytorch_model.bin or shard index")
            self.files = {key: single for key in self._open(single).keys()}

    def _open(self, name: str):
        if name not in self._handles:
            path = os.path.join(self.folder, name)
            if name.endswith(".safetensors"):
                from safetensors import safe_open

                try:
                    handle = safe_open(path, framework="pt")
                except Exception as error:  # noqa: BLE001 - SafetensorError, OSError: name the file
                    raise CheckpointFormatError(f"{path}: cannot be read as safetensors ({error})") from None
            else:  # weights_only: no pickled code runs; mmap: tensors stay on disk until used
                try:
                    handle = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except Exception as error:  # noqa: BLE001 - report which file is bad and why
                    raise CheckpointFormatError(f"{path}: cannot be read as a weights-only checkpoint ({error})") from None
            self._handles[name] = handle
        return self._handles[name]

    def keys(self) -> List[str]:
        return list(self.files)

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def _in_shard(self, key: str):
        """The open shard that the index says holds `key`, checked to hold it."""
        handle = self._open(self.files[key])
        if key not in handle.keys():
            raise CheckpointFormatError(f"{os.path.join(self.folder, self.files[key])}: tensor {key} is not in "
                                        "this shard, though the index says it is")
        return handle

    def shape(self, key: str) -> Tuple[int, ...]:
        handle = self._in_shard(key)
        if hasattr(handle, "get_slice"):
            return tuple(handle.get_slice(key).get_shape())
        return tuple(handle[key].shape)  # memory-mapped: no data is read

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype of `key`, read from the header (safetensors) or the memory map."""
        handle = self._in_shard(key)
        if hasattr(handle, "get_slice"):
            name = handle.get_slice(key).get_dtype()
            dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
            if name not in dtypes:
                raise CheckpointFormatError(f"{self.folder}: tensor {key} is stored as {name}, not a float type")
            return dtypes[name]
        return handle[key].dtype

    def get(self, key: str) -> torch.Tensor:
        if key not in self.files:
            raise CheckpointFormatError(f"{self.folder}: tensor {key} is missing")
        handle = self._in_shard(key)
        return handle.get_tensor(key) if hasattr(handle, "get_tensor") else handle[key]


# ------------------------------------------------------------------------------ HF → megatron
# Module prefixes outside the decoder: megatron ↔ HF (same sub-names below them).
VISION_PREFIXES = (("vision_model.", "model.vision_tower."), ("vision_projection.", "model.mm_projector."),
                   ("aligner.", "model.vision_tower_compressor."))
ALIGNER_PREFIX = "model.vision_tower_compressor."


def _vision_key_map(hf: HFWeights) -> Dict[str, str]:
    """megatron key → HF key for the vision tensors present in the folder."""
    out = {}
    for key in hf.keys():
        for dst, src in VISION_PREFIXES:
            if key.startswith(src) and not key.startswith(SKIPPED_PREFIXES):
                out[dst + key[len(src):]] = key
    return out


def _listed(keys: List[str], shown: int = 6) -> str:
    """The first few keys, then how many more (one line even for a whole missing module)."""
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def check_keys(hf: HFWeights, model: EVEModelConfig, need_vision: bool) -> None:
    """Every HF tensor is either used or knowingly skipped, and every needed one is there: the
    language model's, and with `need_vision` every PEL and projector tensor the configuration
    implies, and the aligner's unless the folder has none of it (a training-only module, which a
    release may leave out: training then starts it fresh). A partial module would train from
    random weights."""
    expected = {hf_key for _, hf_key, _ in OUTER_KEYS}
    for i in range(model.language.num_layers):
        expected.update(f"model.layers.{i}.{s}" for s in hf_layer_shapes(model.language))
    if need_vision:
        vision_prefixes = tuple(src for _, src in VISION_PREFIXES)
        if not any(k.startswith(vision_prefixes) for k in hf.keys()):  # (else: dozens of missing tensors)
            raise CheckpointFormatError(
                f"{hf.folder} holds no EVE vision weights (model.vision_tower.*, model.mm_projector.*): a Llama / "
                "Vicuna folder starts prealign through checkpoint_conversion/llama_to_megatron.py")
        vision = [k for k in expected_shapes(model) if k.startswith(vision_prefixes)]
        aligner = [k for k in vision if k.startswith(ALIGNER_PREFIX)]
        if aligner and not any(k in hf for k in aligner):
            vision = [k for k in vision if not k.startswith(ALIGNER_PREFIX)]
        expected.update(vision)
    unknown = sorted(k for k in hf.keys() if k not in expected and not k.startswith(SKIPPED_PREFIXES)
                     and not k.endswith(SKIPPED_SUFFIXES))
    missing = sorted(k for k in expected if k not in hf)
    if unknown or missing:
        raise CheckpointFormatError(
            f"{hf.folder}: " + "; ".join(filter(None, [
                f"unknown tensors: {_listed(unknown)}" if unknown else "",
                f"missing tensors: {_listed(missing)}" if missing else ""])))


def expected_shapes(model: EVEModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Shape of every HF EVE tensor the configuration implies (vision modules measured on the
    meta device, so nothing is allocated)."""
    lm = model.language
    shapes = {hf_key: (lm.vocab_size, lm.hidden_size) if padded else (lm.hidden_size,)
              for _, hf_key, padded in OUTER_KEYS}
    for i in range(lm.num_layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in hf_layer_shapes(lm).items()})
    with torch.device("meta"):
        for key, tensor in fresh_vision_tensors(model, seed=0):
            for dst, src in VISION_PREFIXES:
                if key.startswith(dst):
                    shapes[src + key[len(dst):]] = tuple(tensor.shape)
    return shapes


def check_shapes(hf: HFWeights, model: EVEModelConfig) -> None:
    """Every tensor present has the shape config.json implies (read from headers, not data)."""
    wrong = []
    for key, shape in expected_shapes(model).items():
        if key in hf:
            got = tuple(hf.shape(key))
            if got != shape:
                wrong.append(f"{key} is {list(got)}, expected {list(shape)}")
    if wrong:
        raise CheckpointFormatError(f"{hf.folder}: tensors of the wrong shape for its config.json: " + "; ".join(wrong))


def megatron_plan(hf: HFWeights, model: EVEModelConfig, padded_vocab: int, dtype: torch.dtype,
                  extra: Iterable[Tuple[str, torch.Tensor]] = ()) -> List[GlobalTensor]:
    """The dist checkpoint's tensors, each made lazily from the HF tensors (plus `extra`, already
    made tensors such as freshly initialised vision modules)."""
    lm = model.language
    h, vocab = lm.hidden_size, lm.vocab_size

    def padded(key):
        def make():
            weight = hf.get(key)
            if weight.shape[0] != vocab:
                raise CheckpointFormatError(f"{key} has {weight.shape[0]} rows, config.json says vocab {vocab}")
            return pad_vocab(weight, padded_vocab)
        return make

    plan = []
    for key, hf_key, is_padded in OUTER_KEYS:
        make = padded(hf_key) if is_padded else (lambda hf_key=hf_key: hf.get(hf_key))
        plan.append(GlobalTensor(key, (padded_vocab, h) if is_padded else (h,), dtype, [((), make)]))
    for rule in LAYER_RULES:
        def make_layer(i, rule=rule):
            return rule.join(lm, *(hf.get(f"model.layers.{i}.{s}") for s in rule.hf))
        shape = tuple(make_layer(0).shape)
        plan.append(GlobalTensor(f"decoder.layers.{rule.megatron}", (lm.num_layers, *shape), dtype,
                                 layer_chunks(lm.num_layers, make_layer)))
    for dst, src in _vision_key_map(hf).items():
        plan.append(GlobalTensor(dst, tuple(hf.get(src).shape), dtype, [((), lambda src=src: hf.get(src))]))
    for key, tensor in extra:
        plan.append(GlobalTensor(key, tuple(tensor.shape), dtype, [((), lambda t=tensor: t)]))
    return plan


def fresh_vision_tensors(model: EVEModelConfig, seed: int) -> Iterator[Tuple[str, torch.Tensor]]:
    """PEL, projector and aligner initialised as the reference does (PyTorch defaults; CLS and
    split embeddings ~ N(0, 1)): the start of stage 1 from a plain Llama / Vicuna."""
    from megatron_eve.model.aligner import PatchAligner
    from megatron_eve.model.patch_embedding import PatchEmbeddingLayer, VisionProjection

    if torch.get_default_device().type != "meta":
        torch.manual_seed(seed)
    modules = {"vision_model.": PatchEmbeddingLayer(model.vision),
               "vision_projection.": VisionProjection(model.vision.hidden_size, model.language.hidden_size)}
    if model.aligner.enabled:
        taps = range(len(model.aligner.taps(model.language.num_layers)))
        modules["aligner."] = PatchAligner(model.language.hidden_size, model.aligner, taps, with_head=True)
    for prefix, module in modules.items():
        for name, tensor in module.state_dict().items():
            yield prefix + name, tensor.detach()


# ------------------------------------------------------------------------------ megatron → HF
class MegatronCheckpoint:
    """Reads a dist checkpoint's model tensors whole or a layer at a time, straight from its
    torch.distributed.checkpoint files (no process group, no full tensor in memory)."""

    def __init__(self, directory: str):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from megatron_eve.checkpoint import safe_metadata

        safe_metadata.install()
        self.directory = directory
        self.reader = FileSystemReader(directory)
        self.metadata = self.reader.read_metadata()
        self.shapes = {k: (tuple(v.size), v.properties.dtype) for k, v in self.metadata.state_dict_metadata.items()
                       if isinstance(v, TensorStorageMetadata) and not k.startswith("optimizer.")}

    def dtype(self, key: str) -> torch.dtype:
        if key not in self.shapes:
            raise CheckpointFormatError(f"{self.directory}: no tensor {key}")
        return self.shapes[key][1]

    def tensor(self, key: str) -> torch.Tensor:
        return self._load(key, None)

    def layer(self, key: str, index: int) -> torch.Tensor:
        return self._load(key, index)

    def _load(self, key: str, index: Optional[int]) -> torch.Tensor:
        from torch.distributed.checkpoint import load as dcp_load

        if key not in self.shapes:
            raise CheckpointFormatError(f"{self.directory}: no tensor {key}")
        shape, dtype = self.shapes[key]
        region = (shape if index is None else (1, *shape[1:]))
        offsets = (0,) * len(shape) if index is None else (index,) + (0,) * (len(shape) - 1)
        out = torch.empty(region, dtype=dtype)
        with _reading(self.directory):  # a truncated or damaged file: one line naming the checkpoint
            dcp_load({key: out}, storage_reader=self.reader, planner=_RegionLoadPlanner(key, offsets, region),
                     no_dist=True)
        return out if index is None else out[0]


def _reading(directory: str):
    from megatron_eve.training.checkpoint_records import reading

    return reading(directory, EARLIER_ITERATION)


class _RegionLoadPlanner:
    """A DCP load planner that reads one region of one global tensor into a buffer."""

    def __new__(cls, key, offsets, sizes):
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        class Planner(DefaultLoadPlanner):
            def create_local_plan(self) -> LoadPlan:
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
                return LoadPlan(create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk]))

            def lookup_tensor(self, index):
                return self.state_dict[index.fqn]

        return Planner(allow_partial_load=True)


def hf_tensors(ckpt: MegatronCheckpoint, model: EVEModelConfig, dtype: torch.dtype) -> Iterator[Tuple[str, torch.Tensor]]:
    """HF EVE tensors in a natural order, a decoder layer at a time."""
    lm = model.language
    outer = {hf_key: (key, is_padded) for key, hf_key, is_padded in OUTER_KEYS}

    def outer_tensor(hf_key):
        key, is_padded = outer[hf_key]
        tensor = ckpt.tensor(key)
        return (tensor[: lm.vocab_size] if is_padded else tensor).to(dtype)

    yield "model.embed_tokens.weight", outer_tensor("model.embed_tokens.weight")
    for i in range(lm.num_layers):
        for rule in LAYER_RULES:
            for name, tensor in zip(rule.hf, rule.split(lm, ckpt.layer(f"decoder.layers.{rule.megatron}", i))):
                yield f"model.layers.{i}.{name}", tensor.to(dtype).contiguous()
    yield "model.norm.weight", outer_tensor("model.norm.weight")
    for prefix, hf_prefix in VISION_PREFIXES:
        for key in sorted(k for k in ckpt.shapes if k.startswith(prefix)):
            yield hf_prefix + key[len(prefix):], ckpt.tensor(key).to(dtype)
    yield "lm_head.weight", outer_tensor("lm_head.weight")


def check_padded_vocab(model: EVEModelConfig, tensor_parallel_size: int) -> int:
    lm = model.language
    if lm.num_attention_heads % tensor_parallel_size:
        raise ConfigError(f"TP {tensor_parallel_size} does not divide {lm.num_attention_heads} heads")
    return padded_vocab_size(lm.vocab_size, lm.make_vocab_size_divisible_by, tensor_parallel_size)
