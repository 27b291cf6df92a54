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
The tensors stay on the host, so on GPU machines they travel over gloo and the training step never
waits on the device for its data.

GroupFeed sends and receives one batch on the calling thread. MicroBatchFeed (what training uses)
keeps the next batch's transfer in flight while the current one is computed: each transfer (the
source's read, status, header, buffers: the same two-phase exchange) runs on a thread of its own,
one at a time, over a gloo group of its own (FeedGroup), so its collectives never interleave with
the training's on the tensor-parallel group nor with another feed's. Every rank of the group asks
for the same number of batches, so every transfer it starts is matched on the others and finishes
without them; at exit the interpreter joins the one in flight (its batch is dropped), and
destroy_process_group does not know the feed's group, so it neither waits for nor breaks it.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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
    will never come. group: a torch.distributed group (src: a global rank of it) or a FeedGroup.
    pin: receive into pinned memory (as the loader pins), for asynchronous host-to-device copies.
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
            data = tensor.view(-1).view(torch.uint8)
            if isinstance(self.group, FeedGroup):
                self.group.broadcast(data, self.src)
            else:
                dist.broadcast(data, self.src, group=self.group)
        return tensor


class FeedGroup:
    """A gloo process group of its own for one feed, over `ranks` (global ranks, this one among them).

    Made only by those ranks (a rendezvous in the default store under a prefix of its own), in the
    same order on each: the n-th FeedGroup of a rank set is the same group on all of its ranks. It is
    not registered with torch.distributed: destroy_process_group() leaves it alone, so a transfer in
    flight when training ends finishes instead of being cut off (the group goes with its feed)."""

    _made: Dict[Tuple[int, ...], int] = {}

    def __init__(self, ranks: Sequence[int], timeout: timedelta):
        self.ranks = tuple(ranks)
        serial = FeedGroup._made.get(self.ranks, 0)
        FeedGroup._made[self.ranks] = serial + 1
        prefix = f"megatron_eve/feed/{'-'.join(map(str, self.ranks))}/{serial}/"
        store = dist.PrefixStore(prefix, dist.distributed_c10d._get_default_store())
        self.backend = dist.ProcessGroupGloo(store, self.ranks.index(dist.get_rank()), len(self.ranks), timeout)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        options = dist.BroadcastOptions()
        options.rootRank, options.rootTensor = self.ranks.index(src), 0
        self.backend.broadcast([tensor], options).wait()


class MicroBatchFeed:
    """A group's micro-batch stream as an iterator, the next batch's transfer already in flight.

    On the source rank (`read` given) each transfer reads a batch with `read` and sends it; on the
    others (`read` None) it receives one. `next()` waits for the transfer started by the previous
    call (or starts one: the first call), starts the next one and returns its batch; a transfer that
    ended the stream (the source's read raised StopIteration: END) or failed (its read raised:
    FAILED; BatchBroadcastError on the receivers) starts none, and raises at the same `next()` as
    GroupFeed would, on every rank. A later `next()` starts again, as GroupFeed's `send`/`receive`
    would (evaluation's `read` cycles; an empty one ends again).

    Each transfer runs on a thread of its own (not a daemon: the interpreter waits for the one in
    flight at exit, which every rank of the group has also started, so it finishes), over a FeedGroup
    made here: collectively, by every rank of `group`, in the same order. `read` then runs on that
    thread, never concurrently with another call of it. prefetch=False: the same transfers on the
    calling thread, nothing in flight between calls. pin: as GroupFeed's (the transfer thread then
    computes on this thread's CUDA device, not device 0). `read` should not hold the feed (nor what
    holds it): an error it raises in a transfer nobody takes (at exit) would make a reference cycle."""

    def __init__(self, group, src: int, read: Optional[Callable[[], Dict]] = None, *, pin: bool = False,
                 timeout: Optional[timedelta] = None, prefetch: bool = True):
        from torch.distributed.constants import default_pg_timeout

        ranks = dist.get_process_group_ranks(group)
        self.feed = GroupFeed(FeedGroup(ranks, timeout or default_pg_timeout), src, pin)
        self.read, self.prefetch = read, prefetch
        self.device = torch.cuda.current_device() if pin and torch.cuda.is_available() else None
        self._thread: Optional[threading.Thread] = None
        self._outcome: Optional[Tuple[Optional[Dict], Optional[BaseException]]] = None

    def __iter__(self):
        return self

    def __next__(self) -> Dict:
        if self._thread is None:
            if not self.prefetch:
                self._transfer()
            else:
                self._start()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        (batch, error), self._outcome = self._outcome, None
        if error is not None:
            try:
                raise error  # StopIteration (END), the read's own error (source), BatchBroadcastError (others)
            finally:
                del error  # else this frame, in the error's traceback, would hold it: a reference cycle
        if self.prefetch:
            self._start()  # the next batch travels while this one is computed
        return batch

    def close(self) -> None:
        """Waits for the transfer in flight, if any, and drops its batch. Not needed before exit or
        destroy_process_group (see the class), but it bounds when the feed's work ends."""
        if self._thread is not None:
            self._thread.join()
            self._thread, self._outcome = None, None

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._transfer, name="megatron-eve-feed")
        self._thread.start()

    def _transfer(self) -> None:
        try:
            if self.device is not None and threading.current_thread() is self._thread:
                torch.cuda.set_device(self.device)  # a new thread starts on device 0
            batch = self.feed.send(self.read) if self.read is not None else self.feed.receive()
            self._outcome = batch, None
        except BaseException as error:  # noqa: BLE001 - handed to next() as it is
            self._outcome = None, error
            # The error's traceback holds this frame: without `self` in it, a feed left holding an
            # error (dropped at exit) is no reference cycle and goes, with what it reads, at once.
            self = None  # noqa: PLW0642


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
