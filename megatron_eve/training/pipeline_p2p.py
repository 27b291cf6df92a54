"""Pipeline point-to-point with variable-length micro-batches: shapes exchanged on the host, and
interleaved 1F1B on two pipeline ranks.

megatron-core (0.19) exchanges each tensor's shape before the tensor when lengths vary (ours do: an
activation carries the aligner taps computed so far), as device tensors with a device
synchronisation each time; here the shapes are host tensors (_communicate_shapes_on_host). With two
ranks a rank's previous and next stage are the same peer, and point-to-point messages between two
ranks pair in the order they are posted, so the exchange goes wrong in two ways there:
- its shape exchange posts (send_prev, recv_prev, send_next, recv_next) on both ranks, so an
  activation's shape lands where a gradient's is expected and vice versa (NVIDIA/Megatron-LM#5100,
  fixed upstream in #5271, not in 0.19);
- the interleaved schedule's calls are not symmetric (one rank's send_forward_recv_forward meets
  the other's four-way exchange), and a completed shape phase waits for a tensor that the peer
  sends only after its own shape phase, which waits for this rank's next call: a deadlock.
Here each direction of traffic (activations forward, gradients backward) from each of the two ranks
has its own process group, every send (shape, then tensor) is posted at once, and each receive
takes its shape then its tensor from its own stream, so messages pair by stream whatever the calls
look like; shapes go as host tensors (the groups' gloo half), so reading one waits for the peer's
host, never for a device. A group per sender, not one per direction: with NCCL a group's messages
between two ranks run in order on one stream, so two ranks that both post a send before the
matching receive on one group each wait for the other once a message outgrows NCCL's buffer (a few
MiB; an EVE-7B activation is 32 MiB), which gloo, where tests run, does not show.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

DIRECTIONS = ("forward", "backward")  # activations to the next stage, gradients to the previous one
# Per pipeline group (its global ranks): {(direction, sending global rank): its group}.
_streams: Dict[Tuple[int, ...], Dict[Tuple[str, int], dist.ProcessGroup]] = {}
_original_communicate = None


def _make_streams() -> None:
    """A new group over every pipeline group's ranks per direction and sender; collective: every
    rank calls it once."""
    from megatron.core import parallel_state

    from megatron_eve.platform import distributed_backend

    mine = tuple(dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group()))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for ranks in sorted(set(everyone)):  # the same order on every rank
        groups = {(direction, sender): dist.new_group(list(ranks), backend=distributed_backend())
                  for direction in DIRECTIONS for sender in ranks}
        if ranks == mine:
            _streams[mine] = groups


def _receive(source: int, group, dtype: torch.dtype, device) -> torch.Tensor:
    shape = torch.empty(3, dtype=torch.int64)  # on the host: gloo's half of the group, no device wait
    dist.irecv(shape, source, group=group).wait()
    tensor = torch.empty(shape.tolist(), requires_grad=True, device=device, dtype=dtype)
    dist.irecv(tensor, source, group=group).wait()
    return tensor


def _communicate(self, *, tensor_send_next: Optional[torch.Tensor], tensor_send_prev: Optional[torch.Tensor],
                 recv_prev: bool, recv_next: bool, tensor_shape, wait_on_reqs: bool = True):
    """P2PCommunicator._communicate for two-rank pipelines set up by pair_two_rank_interleaving."""
    streams = _streams.get(tuple(dist.get_process_group_ranks(self.pp_group)))
    if streams is None or not getattr(self.config, "two_rank_streams", False):
        return _original_communicate(self, tensor_send_next=tensor_send_next, tensor_send_prev=tensor_send_prev,
                                     recv_prev=recv_prev, recv_next=recv_next, tensor_shape=tensor_shape,
                                     wait_on_reqs=wait_on_reqs)
    from megatron_eve.platform import current_device

    me, device = dist.get_rank(), current_device()
    sends, payloads = [], []  # the payloads stay referenced until their sends complete
    for tensor, peer, direction in ((tensor_send_next, self.next_rank, "forward"),
                                    (tensor_send_prev, self.prev_rank, "backward")):
        if tensor is not None:
            payloads += [torch.tensor(tensor.size(), dtype=torch.int64), tensor.contiguous()]
            sends += [dist.isend(payload, peer, group=streams[direction, me]) for payload in payloads[-2:]]
    dtype = self.config.pipeline_dtype
    received_prev = (_receive(self.prev_rank, streams["forward", self.prev_rank], dtype, device)
                     if recv_prev else None)
    received_next = (_receive(self.next_rank, streams["backward", self.next_rank], dtype, device)
                     if recv_next else None)
    for request in sends:
        request.wait()
    return received_prev, received_next, None


def _communicate_shapes_on_host(self, tensor_send_next, tensor_send_prev, recv_prev: bool, recv_next: bool):
    """P2PCommunicator._communicate_shapes (every pipeline but the two-rank interleaved one, whose
    exchange is _communicate's) with the shapes as host tensors, in the same order: they travel over
    the pipeline group's gloo half, so a rank waits for its peer's host, never for a device.
    megatron-core's sends them as device tensors, reads them back with .tolist() and calls
    torch.cuda.synchronize(): device waits at every exchange of every micro-batch on every stage."""
    if self.config.use_ring_exchange_p2p:
        return _original_communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next)
    shapes = {"prev": torch.empty(3, dtype=torch.int64) if recv_prev else None,
              "next": torch.empty(3, dtype=torch.int64) if recv_next else None}
    ops = []
    for tensor, received, peer in ((tensor_send_prev, shapes["prev"], self.prev_rank),
                                   (tensor_send_next, shapes["next"], self.next_rank)):
        if tensor is not None:
            ops.append(dist.P2POp(dist.isend, torch.tensor(tensor.size(), dtype=torch.int64), peer, self.pp_group))
        if received is not None:
            ops.append(dist.P2POp(dist.irecv, received, peer, self.pp_group))
    for request in dist.batch_isend_irecv(ops) if ops else []:
        request.wait()
    return tuple(shape.tolist() if shape is not None else [0, 0, 0] for shape in (shapes["prev"], shapes["next"]))


_original_communicate_shapes = None


def exchange_shapes_on_host() -> None:
    """Pipelines exchange activation shapes through _communicate_shapes_on_host (idempotent)."""
    global _original_communicate_shapes
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    if _original_communicate_shapes is None:
        _original_communicate_shapes = P2PCommunicator._communicate_shapes
        P2PCommunicator._communicate_shapes = _communicate_shapes_on_host


def pair_two_rank_interleaving(config) -> None:
    """Route the interleaved schedule's exchange through per-direction streams on a two-rank
    pipeline (other sizes have distinct prev and next peers and keep megatron-core's exchange).
    Collective on first use: every rank must call it."""
    global _original_communicate
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    if parallel_state.get_pipeline_model_parallel_world_size() != 2:
        return
    if not _streams:
        _make_streams()
    if _original_communicate is None:
        _original_communicate = P2PCommunicator._communicate
        P2PCommunicator._communicate = _communicate
    config.two_rank_streams = True
