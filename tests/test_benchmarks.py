"""The benchmark scripts run end to end (small sizes); their figures come from real runs."""

import re
import subprocess
import sys

from tests.helpers import ROOT


def test_bench_data_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_data.py"), "--images", "24", "--length-samples", "20000",
         "--workers", "1", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    packed = float(re.search(r"packed:\s+([\d.]+)% real tokens", out.stdout).group(1))
    padded = float(re.search(r"pad-to-longest:\s+([\d.]+)% real tokens", out.stdout).group(1))
    assert 0 < padded < packed <= 100  # the 98% target is asserted on a full stream in test_packing
    assert re.search(r"jpeg:\s+[\d.]+ samples/s per worker", out.stdout)
    assert re.search(r"KiB/image", out.stdout)


def test_bench_train_runs_on_cpu():
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_train.py"), "--preset", "tiny", "--layers", "2",
         "--seq-length", "512", "--micro-batches", "2", "--steps", "2", "--warmup", "1", "--samples", "40",
         "--baseline", "hf", "--hf-micro-batch-size", "4"],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "2"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ours = re.search(r"megatron_eve \(packed, \d+ seq\)\s+(\d+) tokens/s/GPU\s+([\d.]+) TFLOP/s/GPU\s+MFU\s+n/a", out.stdout)
    theirs = re.search(r"HF transformers \(padded\)\s+(\d+) tokens/s/GPU", out.stdout)
    assert ours and theirs and int(ours.group(1)) > 0 and int(theirs.group(1)) > 0, out.stdout
    assert re.search(r"speed-up over the HF baseline: [\d.]+x", out.stdout)
