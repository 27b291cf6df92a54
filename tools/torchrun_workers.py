"""Run a benchmark script's own `--worker` mode on N local processes under torchrun and return
what its ranks reported (the last stdout line starting "RESULT ", as JSON)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Sequence


def run_workers(script: str, nproc: int, worker_args: Sequence[str]) -> Dict:
    import torch

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script,
           "--worker", *map(str, worker_args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if torch.cuda.device_count() < nproc:  # a GPU for each rank, or every rank on the CPU (gloo)
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{Path(script).stem}: the ranks failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])
