"""Two gloo processes, one tensor-parallel group: rank 0 reads and sends micro-batches, rank 1
receives them. Each rank saves its model inputs under argv[1] ({direct,micro_batches}_<rank>.pt);
rank 0 prints one JSON of what both saw (loaders built, end of data, failed read, work)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    import dataclasses

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_eve import distributed
    from megatron_eve.config import ParallelConfig
    from megatron_eve.data.broadcast import GroupFeed
    from megatron_eve.data.dataset import assemble_sequence
    from megatron_eve.data.loader import model_inputs
    from megatron_eve.training.arguments import parse_args
    from megatron_eve.training.loop import MicroBatches
    from tests.test_broadcast import batches
    from tests.test_loader import VISION, image_sample, sample

    out = Path(sys.argv[1])
    distributed.initialize(ParallelConfig(2, 1))
    rank = ps.get_tensor_model_parallel_rank()

    # The feed alone: every kind of collated batch, rank 0 → rank 1.
    feed = GroupFeed(ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_src_rank())
    inputs = []
    for name, batch in batches().items():
        received = feed.send(lambda: batch) if rank == 0 else feed.receive()
        inputs.append(model_inputs(received, VISION, "cpu", thd=name.endswith("thd")))
    torch.save(inputs, out / f"direct_{rank}.pt")

    # As the trainer reads: 3 micro-batches of 2 rows, read 7 times (evaluation cycles through them).
    job = parse_args(["--preset", "tiny", "--tensor-model-parallel-size", "2", "--micro-batch-size", "2",
                      "--global-batch-size", "2", "--seq-length", "48", "--train-iters", "1", "--lr", "1e-3",
                      "--data-path", "unused", "--transformer-impl", "torch", "--packed-attention", "thd"])
    rows = [assemble_sequence([image_sample((1 + i % 3, 2)), sample(3 + i)], pad_to=48) for i in range(6)]
    batches_of_rows = MicroBatches.over(rows, job, True, 1000, num_workers=1)
    torch.save([next(batches_of_rows) for _ in range(7)], out / f"micro_batches_{rank}.pt")
    work = list(dataclasses.astuple(batches_of_rows.work))

    # Fewer rows than a micro-batch: rank 0 runs out at once, and so does rank 1.
    empty = MicroBatches.over(rows[:1], job, False, 0, num_workers=0)
    try:
        next(empty)
        stopped = False
    except StopIteration:
        stopped = True

    # A row whose placeholders do not fit its grid fails rank 0's collation; rank 1 hears of it.
    broken = [assemble_sequence([{**sample(4), "image_grids": [(2, 4)]}], None)] * 2
    failing = MicroBatches.over(broken, job, False, 0, num_workers=0)
    try:
        next(failing)
        failed = None
    except Exception as error:  # noqa: BLE001 - the type is what is checked
        failed = type(error).__name__

    seen = [None, None]
    dist.all_gather_object(seen, (batches_of_rows.loader is not None, stopped, failed, work))
    if rank == 0:
        print(json.dumps({"rank 0 loader": seen[0][0], "rank 1 loader": seen[1][0],
                          "stopped": [s[1] for s in seen], "failed": [s[2] for s in seen],
                          "same work": seen[0][3] == seen[1][3] and seen[0][3][0] > 0}), flush=True)
    distributed.destroy()


if __name__ == "__main__":
    main()
