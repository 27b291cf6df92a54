#!/usr/bin/env python3
"""Conversion benchmark at full EVE-7B size: writes a random bf16 EVE-7B checkpoint laid out like
the BAAI release (two .bin shards, ~10 GB + ~4 GB, and their index), converts it to megatron
(target TP=2, PP=2) and back to HF `.bin` shards, and prints wall time and peak RSS of each step
against the largest shard, then checks a sample of tensors survived bit for bit.

  python tools/bench_convert.py --workdir /data/bench_convert      # needs ~45 GB of disk
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megatron_eve.checkpoint.hf_config import hf_config  # noqa: E402
from megatron_eve.checkpoint.hf_eve import HFWeights, expected_shapes  # noqa: E402
from megatron_eve.config import get_preset  # noqa: E402

FIRST_SHARD_BYTES = 9_976_000_000  # the release's pytorch_model-00001-of-00002.bin


def write_release_like(folder: str, preset: str) -> int:
    """Random bf16 tensors of every EVE key, in two .bin shards + index; returns the largest shard size."""
    os.makedirs(folder, exist_ok=True)
    model = get_preset(preset)
    shapes = expected_shapes(model)
    keys = [k for k in shapes if not k.startswith("lm_head")] + ["lm_head.weight"]  # release order: lm_head last
    shards, current = [[]], 0
    for key in keys:
        nbytes = 2 * int(torch.Size(shapes[key]).numel())
        if current + nbytes > FIRST_SHARD_BYTES and len(shards) == 1:
            shards.append([])
            current = 0
        shards[-1].append(key)
        current += nbytes
    names = [f"pytorch_model-0000{i + 1}-of-0000{len(shards)}.bin" for i in range(len(shards))]
    generator = torch.Generator().manual_seed(0)
    for name, part in zip(names, shards):
        state = {k: torch.empty(shapes[k], dtype=torch.bfloat16).normal_(0, 0.02, generator=generator) for k in part}
        torch.save(state, os.path.join(folder, name))
        del state
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as handle:
        json.dump({"metadata": {}, "weight_map": {k: n for n, part in zip(names, shards) for k in part}}, handle)
    config = hf_config(model, torch.bfloat16)
    config.pop("auto_map")
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(config, handle)
    return max(os.path.getsize(os.path.join(folder, n)) for n in names)


def measured(cmd):
    """Run cmd in a fresh child; return (seconds, peak RSS in bytes of that child)."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    start = time.time()
    out = subprocess.run([sys.executable, "-c", probe, sys.executable, *map(str, cmd)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
    peak_kib = int(out.stdout.strip().splitlines()[-1].split()[-1])
    return time.time() - start, peak_kib * 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--preset", default="eve-7b")
    parser.add_argument("--samples", type=int, default=12, help="tensors compared after the round trip")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    hf, megatron, back = work / "hf", work / "megatron", work / "hf_back"
    t = time.time()
    if (hf / "config.json").exists():  # reuse the random checkpoint of an earlier run
        largest = max(p.stat().st_size for p in hf.glob("*.bin"))
    else:
        largest = write_release_like(str(hf), args.preset)
    print(f"random {args.preset} release-like checkpoint ready in {time.time() - t:.0f} s; largest shard "
          f"{largest / 1e9:.2f} GB ({hf})")
    steps = [
        ("HF .bin → megatron (target TP=2, PP=2)", [ROOT / "checkpoint_conversion" / "hf_to_megatron.py", "--hf", hf,
                                                   "--out", megatron, "--target-tensor-parallel-size", 2,
                                                   "--target-pipeline-parallel-size", 2]),
        ("megatron → HF .bin shards", [ROOT / "checkpoint_conversion" / "megatron_to_hf.py", "--megatron", megatron,
                                       "--out", back, "--format", "bin", "--no-progress"]),
    ]
    for name, cmd in steps:
        seconds, peak = measured(cmd)
        print(f"{name:42s} {seconds:7.1f} s   peak RSS {peak / 1e9:6.2f} GB = {peak / largest:.2f} x the largest shard")
    original, exported = HFWeights(str(hf)), HFWeights(str(back))
    keys = random.Random(0).sample(sorted(original.keys()), args.samples)
    same = all(torch.equal(original.get(k), exported.get(k)) for k in keys)
    print(f"round trip: {len(exported.keys())} tensors written; {args.samples} sampled tensors bit-exact: {same}")


if __name__ == "__main__":
    main()
