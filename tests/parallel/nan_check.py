"""One process: the trainer's finiteness check sees a NaN in the loss or in any gradient buffer."""

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    import torch
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(20000 + os.getpid() % 20000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron_eve.training.loop import _all_finite

    def ddp(*grads):
        return SimpleNamespace(buffers=[SimpleNamespace(grad_data=g) for g in grads], expert_parallel_buffers=[])

    ok = torch.ones(5)
    results = {
        "finite": _all_finite(ddp(ok, ok), {"lm loss": 2.0, "align loss": 0.5}),
        "nan_loss": _all_finite(ddp(ok), {"lm loss": float("nan"), "align loss": 0.5}),
        "inf_loss": _all_finite(ddp(ok), {"lm loss": 1.0, "align loss": float("inf")}),
        "nan_grad": _all_finite(ddp(ok, torch.tensor([1.0, float("nan")])), {"lm loss": 1.0}),
    }
    print(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
