"""TP rank 0 reads each micro-batch and broadcasts it to its tensor-parallel group: the wire
encoding round trip, two gloo processes, and a TP=2 training run whose rank 1 builds no loader."""

import dataclasses
import json
import re
import time

import psutil
import pytest
import torch

from megatron_eve.data.broadcast import BatchBroadcastError, decode, encode
from megatron_eve.data.dataset import assemble_sequence
from megatron_eve.data.loader import BatchPlan, collate, model_inputs
from megatron_eve.model.patch_embedding import FlatPlan
from megatron_eve.model.visual_layout import IMAGE_TOKEN_INDEX
from tests.helpers import base_args, launch, losses, torchrun, train
from tests.test_loader import VISION, image_sample, sample


def batches():
    """Collated micro-batches: crops of several shapes with teacher views, text only, unpacked
    rows, each unplanned and planned for THD and for [b, s]."""
    rows = {
        "images": [assemble_sequence([image_sample((2, 4)), sample(3)], pad_to=48),
                   assemble_sequence([sample(5), image_sample((1, 2), 2), image_sample((3, 3), 1)], pad_to=48)],
        "text only": [assemble_sequence([sample(4), sample(6)], pad_to=12), assemble_sequence([sample(12)], pad_to=12)],
        "unpacked": [assemble_sequence([image_sample((2, 2))], None), assemble_sequence([sample(7)], None)],
    }
    plans = {"no plan": None, "thd": BatchPlan.of(VISION, thd=True), "bs": BatchPlan.of(VISION, thd=False)}
    return {f"{name}, {plan_name}": collate(r, plan) for name, r in rows.items() for plan_name, plan in plans.items()}


def assert_same(ours, theirs, where="batch"):
    """Equal types, and tensors equal in dtype, shape and every value (lists, dataclasses, dicts
    compared item by item)."""
    assert type(ours) is type(theirs), where
    if isinstance(ours, torch.Tensor):
        assert (ours.dtype, ours.shape) == (theirs.dtype, theirs.shape), where
        assert torch.equal(ours, theirs), where
    elif isinstance(ours, (list, tuple)):
        assert len(ours) == len(theirs), where
        for index, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{where}[{index}]")
    elif isinstance(ours, dict):
        assert list(ours) == list(theirs), where
        for key in ours:
            assert_same(ours[key], theirs[key], f"{where}[{key!r}]")
    elif dataclasses.is_dataclass(ours):
        for field in dataclasses.fields(ours):
            assert_same(getattr(ours, field.name), getattr(theirs, field.name), f"{where}.{field.name}")
    else:
        assert ours == theirs, where


@pytest.mark.parametrize("name", list(batches()))
def test_encoding_round_trip_reproduces_the_batch(name):
    batch = batches()[name]
    header, buffers = encode(batch)
    assert header.dtype == torch.int64 and len({b.dtype for b in buffers}) == len(buffers)
    received = decode(header.clone(), [b.clone() for b in buffers])
    assert_same(received, batch)
    for key in ("images", "teacher_images"):  # crops keep their strides (HWC memory, CHW view)
        assert [c.stride() for c in received.get(key, [])] == [c.stride() for c in batch.get(key, [])]
    if "plan" in batch:
        assert received["plan"] == batch["plan"]
    thd = name.endswith("thd")
    assert_same(model_inputs(received, VISION, "cpu", thd=thd), model_inputs(batch, VISION, "cpu", thd=thd))


def test_batches_cover_what_the_loader_makes():
    all_batches = batches()
    planned = all_batches["images, thd"]
    assert {"images", "teacher_images", "cu_seqlens", "max_seqlen", "visual_layout", "teacher_patches",
            "plan", "pel_plan"} <= set(planned)
    assert [tuple(c.shape) for c in planned["images"]] == [(3, 56, 112), (3, 28, 56), (3, 84, 84)]
    assert planned["pel_plan"].shapes == ((56, 112), (28, 56), (84, 84))
    assert not planned["images"][0].is_contiguous()  # permuted HWC crops travel as they are
    assert "images" not in all_batches["text only, thd"]
    assert (all_batches["images, no plan"]["tokens"] == IMAGE_TOKEN_INDEX).any()


def test_scalars_and_other_dtypes_round_trip():
    batch = {"ratio": 0.1, "flag": True, "count": -3, "half": torch.randn(2, 3).bfloat16(),
             "mask": torch.tensor([True, False]), "empty": torch.zeros(0, 4, dtype=torch.int16), "nested": [[]],
             "größe": 2, "pairs": ((1, 2), [(3,)], ())}
    header, buffers = encode(batch)
    assert_same(decode(header, buffers), batch)


def test_the_pel_plan_travels_in_the_buffers():
    """Receivers get the worker's FlatPlan as sent (shapes as tuples, as the PEL compares them), its
    index tensors views of the received int64 buffer: pinned where the feed pins, and nothing to
    build or to read back from the device."""
    batch = batches()["images, bs"]
    header, buffers = encode(batch)
    received = decode(header, buffers)["pel_plan"]
    assert isinstance(received, FlatPlan)
    assert_same(received, batch["pel_plan"])
    int64_buffer, = [b for b in buffers if b.dtype == torch.int64]
    for name in ("grid_hw", "first_runs", "row_runs", "cell_image", "token_positions"):
        tensor = getattr(received, name)
        assert tensor.untyped_storage().data_ptr() == int64_buffer.untyped_storage().data_ptr(), name


def test_what_cannot_travel_is_named():
    with pytest.raises(BatchBroadcastError, match="batch key 'id': str is not supported"):
        encode({"tokens": torch.zeros(2), "id": "sample-7"})
    with pytest.raises(BatchBroadcastError, match="batch key 'z': dtype torch.complex64 is not supported"):
        encode({"z": torch.zeros(2, dtype=torch.complex64)})


def test_two_ranks_make_the_same_model_inputs(tmp_path):
    """Rank 0 reads and sends, rank 1 receives (tests/parallel/broadcast_worker.py), one batch at a
    time and with the next one prefetched: the same batches either way; evaluation's cycling, the
    end of the data and a failed read (at the micro-batch that failed) reach the receiver too."""
    out = torchrun("broadcast_worker.py", 2, [tmp_path], timeout=240)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"rank 0 loader": True, "rank 1 loader": False, "stopped": [True, True],
                      "failed": [[1, "VisualLayoutError"], [1, "BatchBroadcastError"]], "same work": True}
    saved = {(name, rank): torch.load(tmp_path / f"{name}_{rank}.pt", weights_only=False)
             for name in ("direct", "prefetched", "micro_batches", "micro_batches_sync") for rank in (0, 1)}
    for name in ("direct", "prefetched", "micro_batches", "micro_batches_sync"):
        ours, theirs = saved[name, 0], saved[name, 1]
        assert len(ours) == (len(batches()) if name in ("direct", "prefetched") else 7)
        assert_same(theirs, ours, name)
        assert all(("pel_plan" in inputs) == ("images" in inputs) for inputs in ours)
    for rank in (0, 1):  # prefetching changes nothing a rank receives
        assert_same(saved["prefetched", rank], saved["direct", rank], f"prefetched on rank {rank}")
        assert_same(saved["micro_batches", rank], saved["micro_batches_sync", rank], f"micro-batches on rank {rank}")
    ours = saved["micro_batches", 0]
    assert all("pel_plan" in inputs for inputs in ours)  # every row of these micro-batches has an image
    assert_same(ours[3], ours[0], "the fourth read starts the split again")


def test_a_run_that_stops_with_a_prefetch_in_flight_exits_cleanly(tmp_path):
    """Training stops after 3 micro-batches while the fourth is in flight on both ranks (rank 0
    still reading it, slowly): destroying the process groups does not wait for it nor break it, the
    interpreter's exit waits for it on each rank, and it finishes there (matched on both ranks,
    nobody left in a collective); its batch is dropped."""
    out = torchrun("broadcast_worker.py", 2, [tmp_path, "exit"], timeout=120)
    reports = [json.loads((tmp_path / f"exit_{rank}.json").read_text()) for rank in (0, 1)]
    assert all(r["in_flight"] for r in reports), reports  # when destroy returned
    assert all(r["destroy_s"] < 2.5 for r in reports), reports  # the late read (2 x 2.5 s) is not awaited
    assert "Connection closed" not in out.stderr, out.stderr[-3000:]
    ours, theirs = (torch.load(tmp_path / f"dropped_{rank}.pt", weights_only=False) for rank in (0, 1))
    assert ours["error"] is None and theirs["error"] is None, (ours, theirs)
    assert_same(theirs, ours, "what each rank took and dropped")
    assert_same(ours["dropped"], ours["taken"][0], "the dropped fourth micro-batch starts the split again")


VALIDATION = re.compile(r"validation loss at iteration +(\d+) \| lm loss value: (\S+)")


def ranks_and_their_children(proc, seconds: float):
    """Polls the torchrun launch's rank processes until it ends: {rank: most loader workers seen at
    once}, and {rank: {child pid: its command line}} of every child seen (to tell what a stray one was).
    A loader worker is a forked copy of its rank (the same command line) seen in two polls in a row:
    short-lived helpers a library may run (an ldconfig, a reaped zombie with no command line: seen once
    on TP rank 1 in CI) are not workers."""
    most, seen, before = {}, {}, {}
    deadline = time.time() + seconds
    while proc.poll() is None and time.time() < deadline:
        try:
            for child in psutil.Process(proc.pid).children():
                rank, own = int(child.environ()["RANK"]), child.cmdline()
                copies = set()
                for grandchild in child.children(recursive=True):
                    command = grandchild.cmdline()
                    seen.setdefault(rank, {}).setdefault(grandchild.pid, " ".join(command[:6]))
                    if command == own:
                        copies.add(grandchild.pid)
                most[rank] = max(most.get(rank, 0), len(copies & before.get(rank, set())))
                before[rank] = copies
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
            pass  # a rank, or a child, starting or leaving
        time.sleep(0.2)
    return most, seen


def test_tensor_parallel_ranks_share_one_loader(data):
    """TP=2 trains and evaluates like 2-way data parallel (the same global batches; CPU
    initialisation makes the same weights at both sizes), while only TP rank 0 runs DataLoader
    workers."""
    args = base_args(data, "pretrain") + ["--train-iters", 3, "--eval-interval", 3, "--eval-iters", 1,
                                          "--use-cpu-initialization"]
    reference, reference_out = train(args)
    proc = launch(args + ["--tensor-model-parallel-size", 2])
    children, commands = ranks_and_their_children(proc, 300)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-6000:]
    assert children[0] >= 1 and children[1] == 0, (children, commands)  # rank 0: its train and valid loaders' workers
    tensor_parallel = losses(out)
    assert sorted(tensor_parallel) == sorted(reference) == [1, 2, 3]
    for iteration in reference:
        for ours, theirs in zip(tensor_parallel[iteration][:2], reference[iteration][:2]):
            assert abs(ours - theirs) <= 1e-5 * abs(theirs)
    (iteration, ours), = VALIDATION.findall(out)
    (_, theirs), = VALIDATION.findall(reference_out)
    assert iteration == "3" and abs(float(ours) - float(theirs)) <= 1e-5 * abs(float(theirs))
