"""Compare the model tensors of two checkpoint directories (one process): prints a JSON map of
tensor key → max |a - b| over the whole global tensor."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(first: str, second: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(20000 + os.getpid() % 20000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import dist_checkpointing

    a = dist_checkpointing.load_plain_tensors(first)
    b = dist_checkpointing.load_plain_tensors(second)
    keys = sorted(k for k in a if torch.is_tensor(a[k]) and not k.startswith("optimizer."))
    print(json.dumps({k: float((a[k].float() - b[k].float()).abs().max()) for k in keys}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
