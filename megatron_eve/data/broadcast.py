"""One micro-batch stream per tensor-parallel group: its source rank reads, the others receive.

Every rank of a TP group consumes the same micro-batch, so only the source rank (TP rank 0, as in
Megatron-LM's broadcast_data) runs a DataLoader; it sends each collated host batch to the others,
which then make their model inputs from it exactly as the source does.

Wire format, without pickling: a one-element int64 status (the header's length; END when the
source ran out, FAILED when its read raised), the int64 header, then one flat buffer per dtype. The
header lists the buffers (dtype code, element count), then the batch's entries: a key, then its
value, encoded recursively as a kind code and
  tensor:    dtype code, ndim, shape in memory order, dim order (its elements: the next ones of
             its dtype's buffer; the receiver's view has the sender's strides)
  list:      length, the items; tuple: likewise
  int/bool:  the value; float: its float64 bits
  dataclass: class code, its fields in declaration order (VisualLayout, BatchPlan, FlatPlan).
The tensors stay on the host, so on GPU machines they travel over the group's gloo backend and the
training step never waits on the device for its data.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Tuple

import torch
import torch.distributed as dist

from megatron_eve.data.loader import BatchPlan
from megatron_eve.model.patch_embedding import FlatPlan
from megatron_eve.model.visual_layout import VisualLayout

# Status values other than a header length.
END, FAILED = 0, -1
TENSOR, LIST, INT, BOOL, FLOAT, DATACLASS, TUPLE = range(7)
DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
          torch.float16, torch.bfloat16, torch.float32, torch.float64)
DATACLASSES = (VisualLayout, BatchPlan, FlatPlan)


class BatchBroadcastError(RuntimeError):
    """The source rank could not read the micro-batch, or the batch holds what cannot be sent."""


def encode(batch: Dict) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """A collated batch → (int64 header, one flat buffer per dtype, in the header's order)."""
    entries: List[int] = [len(batch)]
    tensors: Dict[torch.dtype, List[torch.Tensor]] = {}

    def value(key: str, item) -> None:
        if isinstance(item, torch.Tensor):
            if item.dtype not in DTYPES:
                raise BatchBroadcastError(f"cannot broadcast batch key {key!r}: dtype {item.dtype} is not supported")
            # Sent in memory order (a crop permuted from HWC stays one memcpy) and permuted back.
            order = sorted(range(item.dim()), key=lambda d: -item.stride(d))
            dense = item.permute(order)
            entries.extend([TENSOR, DTYPES.index(item.dtype), item.dim(), *dense.shape, *order])
            tensors.setdefault(item.dtype, []).append(dense)
        elif isinstance(item, list) or type(item) is tuple:  # a namedtuple would come back a plain tuple
            entries.extend([LIST if isinstance(item, list) else TUPLE, len(item)])
            for element in item:
                value(key, element)
        elif isinstance(item, bool):  # before int: bool is an int
            entries.extend([BOOL, int(item)])
        elif isinstance(item, int):
            entries.extend([INT, item])
        elif isinstance(item, float):
            entries.extend([FLOAT, _float_bits(item)])
        elif type(item) in DATACLASSES:
            entries.extend([DATACLASS, DATACLASSES.index(type(item))])
            for field in dataclasses.fields(item):
                value(key, getattr(item, field.name))
        else:
            raise BatchBroadcastError(f"cannot broadcast batch key {key!r}: {type(item).__name__} is not supported")

    for key, item in batch.items():
        name = key.encode()
        entries.extend([len(name), *name])
        value(key, item)
    buffers = [_flatten(group) for group in tensors.values()]
    table = [len(buffers)] + [code for b in buffers for code in (DTYPES.index(b.dtype), b.numel())]
    return torch.tensor(table + entries, dtype=torch.int64), buffers


def decode(header: torch.Tensor, buffers: List[torch.Tensor]) -> Dict:
    """encode's (header, buffers) → the batch; its tensors are views of the buffers."""
    codes = header.tolist()
    at = 1 + 2 * codes[0]
    offsets = {buffer.dtype: 0 for buffer in buffers}
    by_dtype = {buffer.dtype: buffer for buffer in buffers}

    def take(count: int) -> List[int]:
        nonlocal at
        at += count
        return codes[at - count:at]

    def value():
        kind = take(1)[0]
        if kind == TENSOR:
            dtype_code, ndim = take(2)
            shape, order = take(ndim), take(ndim)
            dtype = DTYPES[dtype_code]
            start = offsets[dtype]
            offsets[dtype] = start + math.prod(shape)
            dims_back = sorted(range(ndim), key=order.__getitem__)
            return by_dtype[dtype][start:offsets[dtype]].view(shape).permute(dims_back)
        if kind == LIST:
            return [value() for _ in range(take(1)[0])]
        if kind == TUPLE:
            return tuple(value() for _ in range(take(1)[0]))
        if kind == INT:
            return take(1)[0]
        if kind == BOOL:
            return bool(take(1)[0])
        if kind == FLOAT:
            return _bits_float(take(1)[0])
        cls = DATACLASSES[take(1)[0]]
        return cls(**{field.name: value() for field in dataclasses.fields(cls)})

    batch = {}
    for _ in range(take(1)[0]):
        key = bytes(take(take(1)[0])).decode()
        batch[key] = value()
    if at != len(codes) or any(offsets[b.dtype] != b.numel() for b in buffers):
        raise BatchBroadcastError("the batch header does not match its buffers (sender and receiver disagree)")
    return batch


def _buffer_table(header: torch.Tensor) -> List[Tuple[torch.dtype, int]]:
    """The (dtype, element count) of each flat buffer a header announces."""
    count = int(header[0])
    table = header[1:1 + 2 * count].view(count, 2).tolist()
    return [(DTYPES[code], numel) for code, numel in table]


class GroupFeed:
    """The micro-batch stream of one group: `send` on its source rank, `receive` on the others.

    The source sends a status before every batch, so the receivers also stop (StopIteration) when
    it ran out, and fail with an error when its read failed, instead of waiting for a batch that
    will never come. pin: receive into pinned memory (as the loader pins), for asynchronous
    host-to-device copies.
    """

    def __init__(self, group, src: int, pin: bool = False):
        self.group, self.src, self.pin = group, src, pin

    def send(self, read: Callable[[], Dict]) -> Dict:
        """Reads a batch with `read` and sends it; returns it (or raises what `read` raised)."""
        try:
            batch = read()
            header, buffers = encode(batch)
        except StopIteration:
            self._status(END)
            raise
        except Exception:
            self._status(FAILED)
            raise
        self._status(header.numel())
        self._broadcast(header)
        for buffer in buffers:
            self._broadcast(buffer)
        return batch

    def receive(self) -> Dict:
        length = self._status(0)
        if length == END:
            raise StopIteration
        if length == FAILED:
            raise BatchBroadcastError(f"tensor-parallel source rank {self.src} failed to read the micro-batch "
                                      "(its own error says why)")
        header = self._broadcast(torch.empty(length, dtype=torch.int64))
        buffers = [self._broadcast(torch.empty(numel, dtype=dtype, pin_memory=self.pin))
                   for dtype, numel in _buffer_table(header)]
        return decode(header, buffers)

    def _status(self, value: int) -> int:
        return int(self._broadcast(torch.tensor([value], dtype=torch.int64))[0])

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.numel():
            # As bytes: gloo need not support every dtype (bool, bfloat16) for this to work.
            dist.broadcast(tensor.view(-1).view(torch.uint8), self.src, group=self.group)
        return tensor


def _flatten(tensors: List[torch.Tensor]) -> torch.Tensor:
    """One flat buffer of the tensors, each copied once."""
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype)
    start = 0
    for tensor in tensors:
        flat[start:start + tensor.numel()].view(tensor.shape).copy_(tensor)
        start += tensor.numel()
    return flat


def _float_bits(value: float) -> int:
    return int(torch.tensor([value], dtype=torch.float64).view(torch.int64)[0])


def _bits_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int64).view(torch.float64)[0])
