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
