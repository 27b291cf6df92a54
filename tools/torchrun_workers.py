"""Run a benchmark script's own `--worker` mode on N local processes under torchrun and return
what its ranks reported (the last stdout line starting "RESULT ", as JSON)."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, Sequence


def run_workers(script: str, nproc: int, worker_args: Sequence[str]) -> Dict:
    import torch

    from tests.helpers import child_environment, free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", script, "--worker", *map(str, worker_args)]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=child_environment(cuda=torch.cuda.is_available()))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{Path(script).stem}: the ranks failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])
