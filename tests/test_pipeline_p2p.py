"""The pipeline's shape exchange on the host (megatron_eve/training/pipeline_p2p.py): megatron-core's
order of messages, host tensors, no device wait. (The pipeline parity and training tests run it
end to end over gloo.)"""

import types

import pytest
import torch
import torch.distributed as dist

from megatron_eve.training import pipeline_p2p


def refuse(*args, **kwargs):
    raise AssertionError("the shape exchange touched the device")


@pytest.fixture
def world():
    """A one-rank gloo world (P2POp looks up the default group); the exchange itself is recorded."""
    made = not dist.is_initialized()
    if made:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield dist.group.WORLD
    if made:
        dist.destroy_process_group()


@pytest.mark.parametrize("send_prev, recv_prev, send_next, recv_next", [
    (True, True, True, True), (False, True, True, False), (True, False, False, True), (False, False, False, False)])
def test_shapes_travel_as_host_tensors_in_megatron_core_order(world, monkeypatch, send_prev, recv_prev, send_next,
                                                                recv_next):
    posted = []

    def batch_isend_irecv(ops):
        posted.extend(ops)
        for op in ops:
            assert op.tensor.device.type == "cpu" and op.tensor.dtype == torch.int64
            if op.op is dist.irecv:  # what the peer sends: its activation's shape
                op.tensor.copy_(torch.tensor([7, 1, 16 if op.peer == 3 else 32]))
        return [types.SimpleNamespace(wait=lambda: None) for _ in ops]

    monkeypatch.setattr(dist, "batch_isend_irecv", batch_isend_irecv)
    monkeypatch.setattr(torch.cuda, "synchronize", refuse)
    monkeypatch.setattr(torch.cuda, "current_device", refuse)
    communicator = types.SimpleNamespace(config=types.SimpleNamespace(use_ring_exchange_p2p=False),
                                         prev_rank=3, next_rank=5, pp_group=world)
    prev, nxt = pipeline_p2p._communicate_shapes_on_host(
        communicator, torch.zeros(5, 1, 8) if send_next else None, torch.zeros(4, 1, 8) if send_prev else None,
        recv_prev, recv_next)
    expected = [(dist.isend, 3, [4, 1, 8])] * send_prev + [(dist.irecv, 3, None)] * recv_prev \
        + [(dist.isend, 5, [5, 1, 8])] * send_next + [(dist.irecv, 5, None)] * recv_next
    assert [(op.op, op.peer, op.tensor.tolist() if op.op is dist.isend else None) for op in posted] == expected
    assert prev == ([7, 1, 16] if recv_prev else [0, 0, 0]) and nxt == ([7, 1, 32] if recv_next else [0, 0, 0])
