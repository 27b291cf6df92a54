"""Two gloo processes, one tensor-parallel group: rank 0 reads and sends micro-batches, rank 1
receives them. Each rank saves what it made under argv[1] (<name>_<rank>.pt, see main); rank 0
prints one JSON of what both saw (loaders built, end of data, failed read, work).

argv[2] == "exit": instead, training that stops with a prefetch in flight (see stop_in_flight)."""

import atexit
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def job_and_rows():
    from megatron_eve.data.dataset import assemble_sequence
    from megatron_eve.training.arguments import parse_args
    from tests.test_loader import image_sample, sample

    job = parse_args(["--preset", "tiny", "--tensor-model-parallel-size", "2", "--micro-batch-size", "2",
                      "--global-batch-size", "2", "--seq-length", "48", "--train-iters", "1", "--lr", "1e-3",
                      "--data-path", "unused", "--transformer-impl", "torch", "--packed-attention", "thd"])
    rows = [assemble_sequence([image_sample((1 + i % 3, 2)), sample(3 + i)], pad_to=48) for i in range(6)]
    return job, rows


def main():
    import dataclasses

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_eve import distributed
    from megatron_eve.config import ParallelConfig
    from megatron_eve.data.broadcast import GroupFeed, MicroBatchFeed
    from megatron_eve.data.dataset import assemble_sequence
    from megatron_eve.data.loader import model_inputs
    from megatron_eve.training.loop import MicroBatches
    from tests.test_broadcast import batches
    from tests.test_loader import VISION, sample

    out = Path(sys.argv[1])
    distributed.initialize(ParallelConfig(2, 1))
    rank = ps.get_tensor_model_parallel_rank()
    group, src = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_src_rank()
    thd = [name.endswith("thd") for name in batches()]

    # The feed alone: every kind of collated batch, rank 0 → rank 1, one at a time on the TP group.
    feed = GroupFeed(group, src)
    inputs = []
    for name, batch in batches().items():
        received = feed.send(lambda: batch) if rank == 0 else feed.receive()
        inputs.append(model_inputs(received, VISION, "cpu", thd=name.endswith("thd")))
    torch.save(inputs, out / f"direct_{rank}.pt")

    # The same batches prefetched: the next one travels while this one is used; the end of the
    # source's batches (StopIteration in its read) ends the stream on both ranks after the last.
    prefetched = MicroBatchFeed(group, src, iter(batches().values()).__next__ if rank == 0 else None)
    inputs = [model_inputs(received, VISION, "cpu", thd=t) for received, t in zip(prefetched, thd, strict=True)]
    torch.save(inputs, out / f"prefetched_{rank}.pt")

    # As the trainer reads: 3 micro-batches of 2 rows, read 7 times (evaluation cycles through them),
    # with and without prefetch.
    job, rows = job_and_rows()
    batches_of_rows = MicroBatches.over(rows, job, True, 1000, num_workers=1)
    torch.save([next(batches_of_rows) for _ in range(7)], out / f"micro_batches_{rank}.pt")
    work = list(dataclasses.astuple(batches_of_rows.work))
    one_at_a_time = MicroBatches.over(rows, job, True, 1000, num_workers=1, prefetch=False)
    torch.save([next(one_at_a_time) for _ in range(7)], out / f"micro_batches_sync_{rank}.pt")

    # Fewer rows than a micro-batch: rank 0 runs out at once, and so does rank 1.
    empty = MicroBatches.over(rows[:1], job, False, 0, num_workers=0)
    try:
        next(empty)
        stopped = False
    except StopIteration:
        stopped = True

    # The second micro-batch holds a row whose placeholders do not fit its grid: rank 0's collation
    # fails while the first is still in use (prefetched), yet both ranks get the first one and
    # raise at the second, rank 0 its own error, rank 1 the news of it.
    broken = [assemble_sequence([{**sample(4), "image_grids": [(2, 4)]}], None)] * 2
    failing = MicroBatches.over(rows[:2] + broken, job, False, 0, num_workers=0)
    failed = [0, None]
    try:
        while True:
            next(failing)
            failed[0] += 1
    except Exception as error:  # noqa: BLE001 - the type is what is checked
        failed[1] = type(error).__name__

    seen = [None, None]
    dist.all_gather_object(seen, (batches_of_rows.loader is not None, stopped, failed, work))
    if rank == 0:
        print(json.dumps({"rank 0 loader": seen[0][0], "rank 1 loader": seen[1][0],
                          "stopped": [s[1] for s in seen], "failed": [s[2] for s in seen],
                          "same work": seen[0][3] == seen[1][3] and seen[0][3][0] > 0}), flush=True)
    distributed.destroy()  # batches_of_rows still has its eighth micro-batch in flight


class SlowRows(list):
    """Rows whose reads after the first `fast` take `seconds` each (a loader that is late)."""

    fast, seconds, reads = 10 ** 9, 0.0, 0

    def __getitem__(self, index):
        self.reads += 1
        if self.reads > self.fast:
            time.sleep(self.seconds)
        return super().__getitem__(index)


def stop_in_flight():
    """Training stops after 3 micro-batches while the fourth is in flight: rank 0 still reading it
    (slowly), rank 1 waiting for it. Each rank destroys its process groups at once and exits; at
    exit (after the interpreter joined the transfer in flight) it saves what that transfer left:
    <out>/dropped_<rank>.pt, and before, how long destroy took: <out>/exit_<rank>.json."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_eve import distributed
    from megatron_eve.config import ParallelConfig
    from megatron_eve.training.loop import MicroBatches

    out = Path(sys.argv[1])
    distributed.initialize(ParallelConfig(2, 1))
    rank = ps.get_tensor_model_parallel_rank()
    job, rows = job_and_rows()
    rows = SlowRows(rows)
    rows.fast, rows.seconds = 6, 2.5  # the fourth micro-batch's rows (the split starts again) are late
    batches = MicroBatches.over(rows, job, False, 0, num_workers=0)
    taken = [next(batches)["input_ids"].view(2, -1) for _ in range(3)]

    def dropped():  # runs after the interpreter joined the transfer thread
        batch, error = batches.feed._outcome
        torch.save({"taken": taken, "dropped": None if batch is None else batch["tokens"],
                    "error": repr(error) if error else None}, out / f"dropped_{rank}.pt")

    atexit.register(dropped)
    started = time.time()
    # Like run(): its last collectives, then destroy, with the fourth micro-batch still in flight.
    dist.all_gather_object([None, None], rank)
    distributed.destroy()
    elapsed = time.time() - started
    in_flight = batches.feed._thread is not None and batches.feed._thread.is_alive()
    (out / f"exit_{rank}.json").write_text(json.dumps({"destroy_s": elapsed, "in_flight": in_flight}))


if __name__ == "__main__":
    if sys.argv[2:] == ["exit"]:
        stop_in_flight()
    else:
        main()
