"""The benchmark scripts run end to end (small sizes); their figures come from real runs."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

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
    grouped = float(re.search(r"pad-to-longest, length-grouped:\s+([\d.]+)% real tokens", out.stdout).group(1))
    assert padded < grouped <= 100  # grouping pads less than random order
    assert re.search(r"jpeg:\s+[\d.]+ samples/s per worker", out.stdout)
    assert re.search(r"KiB/image", out.stdout)
    # A real dataset's lengths (here the run's own preprocessed stream), all of them, packing only.
    real = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_data.py"), "--lengths-from",
                           str(tmp_path / "stream_jpeg")], capture_output=True, text=True, timeout=300)
    assert real.returncode == 0, real.stderr[-3000:]
    assert re.search(r"\n  24 sample lengths of .*stream_jpeg", real.stdout) and "length-grouped" in real.stdout
    assert "loader" not in real.stdout


def test_bench_train_runs_on_cpu(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_train.py"), "--preset", "tiny", "--layers", "2",
         "--seq-length", "512", "--micro-batches", "2", "--steps", "2", "--warmup", "1", "--samples", "40",
         "--baseline", "hf", "--hf-micro-batch-size", "4", "--profile", str(tmp_path),
         "--ablate", "grad-accumulation-fusion", "fused-adam", "rope-fusion", "--try", "native-cross-entropy",
         "micro-batch-size-2",
         "--also-layers", "3", "--also-micro-batches", "4", "--combine", "0", "--json", str(tmp_path / "bench.json")],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "2"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ours = re.search(r"megatron_eve \(packed, \d+ seq\)\s+(\d+) tokens/s/GPU\s+([\d.]+) TFLOP/s/GPU\s+MFU\s+n/a", out.stdout)
    theirs = re.findall(r"HF transformers \(padded, (random|length-grouped)\)\s+(\d+) tokens/s/GPU", out.stdout)
    assert ours and int(ours.group(1)) > 0, out.stdout
    assert sorted(order for order, _ in theirs) == ["length-grouped", "random"], out.stdout
    assert all(int(tokens) > 0 for _, tokens in theirs)
    assert re.search(r"speed-up over the faster HF baseline: [\d.]+x", out.stdout)
    profile = (tmp_path / "profile.txt").read_text()
    assert profile.startswith("2 steps: wall") and "aten::" in profile
    figures = json.loads((tmp_path / "bench.json").read_text())
    shares = figures["profile"]["time_shares"]  # of the aten ops' time on the CPU
    assert shares["gemm"] > 0 and abs(sum(shares.values()) - 1) < 1e-6 and "time shares" in profile
    # Each lever timed again: the default ones off, the other on.
    # (Two rows per micro-batch: the same rows, so the same real tokens.)
    for key in ("without_grad-accumulation-fusion", "without_fused-adam", "without_rope-fusion",
                "with_native-cross-entropy", "with_micro-batch-size-2"):
        assert re.search(rf"{key.replace('_', ' ')}\s+\d+ tokens/s/GPU", out.stdout), out.stdout
        assert figures[key]["real_tokens"] == figures["ours"]["real_tokens"]
        assert figures[key]["gain_of_lever"] > 0
    # Ours again at another depth, on the same batches.
    assert re.search(r"megatron_eve at 3 layers\s+\d+ tokens/s/GPU", out.stdout), out.stdout
    assert figures["ours_3_layers"]["real_tokens"] == figures["ours"]["real_tokens"]
    # The tried levers that gained more than --combine's 0, together, at each depth.
    assert sorted(figures["combined_levers"]) == ["micro-batch-size-2", "native-cross-entropy"]
    for layers in (2, 3):
        combined = rf"megatron_eve at {layers} layers with [a-z0-9-]+ \+ [a-z0-9-]+\s+\d+ tokens/s/GPU"
        assert re.search(combined, out.stdout), out.stdout
        assert figures[f"combined_{layers}_layers"]["real_tokens"] == figures["ours"]["real_tokens"]
    # The deepest combined run profiled too, its section appended to the main run's profile.
    assert "profile" in figures["combined_3_layers"] and "profile" not in figures["combined_2_layers"]
    assert re.search(r"\n===== megatron_eve at 3 layers with .*\n2 steps: wall", (tmp_path / "profile.txt").read_text())
    # ... each between two runs of ours (the first lever after a second one: not the main run), and
    # compared with their mean; the median of ours' runs is the steady figure.
    runs = figures["ours_runs_tokens_per_s"]
    assert len(runs) == 7 and runs[0] == figures["ours"]["tokens_per_s_per_gpu"]
    for index, key in enumerate(("without_grad-accumulation-fusion", "without_fused-adam")):
        assert abs(figures[key]["reference_tokens_per_s"] - (runs[index + 1] + runs[index + 2]) / 2) < 1e-6
    steady = figures["ours_steady"]
    assert steady["runs"] == 7 and steady["tokens_per_s_per_gpu"] == sorted(runs)[3]
    # Ours with another number of micro-batches a step, at each depth; combined at the deepest.
    for layers in (2, 3):
        assert figures[f"ours_{layers}_layers_4_micro_batches"]["real_tokens"] > figures["ours"]["real_tokens"]
    assert (figures["combined_3_layers_4_micro_batches"]["real_tokens"]
            == figures["ours_3_layers_4_micro_batches"]["real_tokens"])
    assert "combined_2_layers_4_micro_batches" not in figures


def test_steps_are_timed_back_to_back(monkeypatch):
    """Both sides' timed steps run as a training loop runs them: warm-up steps, a synchronisation,
    the timed steps with none waiting for the device in between, a synchronisation."""
    import tools.bench_profile as bench

    events = []
    monkeypatch.setattr(bench, "sync", lambda: events.append("sync"))
    results, seconds = bench.timed_steps(lambda: events.append("step") or len(events), 2, 3)
    assert events == ["step", "step", "sync", "step", "step", "step", "sync"]
    assert results == [4, 5, 6] and seconds >= 0


def test_time_shares_count_kernels_not_annotations():
    """On the GPU the profiler also puts record_function ranges (the optimizer's step) and its own
    buffer requests on the device timeline: only kernels and copies count, idle is the rest."""
    from types import SimpleNamespace

    import torch

    from tools.bench_profile import time_shares, timed_work

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(name, us, device=cuda, annotation=False):
        return SimpleNamespace(name=name, self_device_time_total=us, device_type=device, is_user_annotation=annotation)

    prof = SimpleNamespace(events=lambda: [
        event("nvjet_sm90_tst_256x128_64x4", 600.0), event("multi_tensor_apply_kernel<AdamW>", 100.0),
        event("Optimizer.step#AdamW.step", 100.0, annotation=True), event("Activity Buffer Request", 50.0),
        event("aten::mm", 600.0, device=cpu), event("Memcpy DtoD", 50.0), event("flash_fwd_kernel", 100.0)])
    timed = timed_work(prof, on_gpu=True)
    assert sorted(name for name, _ in timed) == ["Memcpy DtoD", "flash_fwd_kernel", "multi_tensor_apply_kernel<AdamW>",
                                                 "nvjet_sm90_tst_256x128_64x4"]
    shares = time_shares(timed, 1000.0)
    expected = {"gemm": 0.6, "optimizer": 0.1, "attention": 0.1, "copy": 0.05, "idle": 0.15}
    assert shares.keys() == expected.keys() and all(abs(shares[k] - v) < 1e-9 for k, v in expected.items())


def test_idle_gaps_name_the_work_around_each_wait():
    """The GPU's idle stretches, merged over streams (a kernel on a second stream covers a gap on the
    first), longest first, each with the kernel before and after it."""
    from types import SimpleNamespace

    import torch

    from tools.bench_profile import idle_gaps

    def event(name, start, end, annotation=False):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                               device_type=torch.autograd.DeviceType.CUDA, is_user_annotation=annotation)

    prof = SimpleNamespace(events=lambda: [
        event("embedding", 0, 100), event("nvjet_fwd", 160, 1000), event("nccl_on_side_stream", 900, 1300),
        event("Optimizer.step#AdamW.step", 1300, 3000, annotation=True), event("reduce_norm", 1310, 1400),
        event("adamw", 3400, 3600), event("copy", 3620, 3700)])
    gaps = idle_gaps(prof, at_least_us=50)
    assert [(g["us"], g["after"], g["before"]) for g in gaps] == [(2000, "reduce_norm", "adamw"),
                                                                  (60, "embedding", "nvjet_fwd")]
    assert gaps[0]["at_ms"] == 1.4


def make_wheel(folder, name: str) -> str:
    """A minimal pure-Python wheel of an empty package (for the installer path)."""
    import zipfile

    path = os.path.join(folder, f"{name}-0.0.1-py3-none-any.whl")
    info = f"{name}-0.0.1.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name}/__init__.py", "VALUE = 7\n")
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return path


def test_gpu_check_script_writes_its_summary(tmp_path):
    """tools/gpu_check.sh end to end on the CPU (EVE_GPU_TIER_ON_CPU=1, a slice of the tier, a
    tiny benchmark): missing wheels installed aside, logs and summary.json written."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(str(wheels), "eve_check_probe")
    out = tmp_path / "out"
    env = {**os.environ, "EVE_GPU_TIER_ON_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable,
           "GPU_CHECK_ALLOW_CPU": "1", "GPU_CHECK_SITE": str(tmp_path / "site"), "TIER_ARGS": "-k attention",
           "PEL_TIMEOUT": "0",
           "BENCH_ARGS": "--preset tiny --layers 2 --seq-length 512 --steps 1 --warmup 1 --samples 40 --baseline hf "
                          "--also-layers 3 --also-micro-batches 2 --profile-deepest --try native-cross-entropy "
                          "--combine 0 --combine-only-deepest"}
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), str(wheels), str(out)],
                          capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert (tmp_path / "site" / "eve_check_probe" / "__init__.py").is_file()
    assert "eve_check_probe-0.0.1-py3-none-any.whl" in (out / "env.txt").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tests"]["passed"] >= 2 and summary["tests"]["failed"] == 0 and summary["tests"]["exit_code"] == 0
    assert summary["tokens_per_s_per_gpu"] > 0 and summary["speedup_vs_hf"] > 0 and summary["ours_fallback"] is None
    assert summary["bench"]["figures"]["hf"]["real_tokens"] > 0
    assert list(summary["mfu_at_layers"]) == ["3"]  # MFU None on the CPU (no peak)
    assert summary["combined_levers"] == ["native-cross-entropy"]
    assert list(summary["mfu_at_micro_batches"]) == ["3 layers, 2 micro-batches", "2 layers, 2 micro-batches"]
    # --combine-only-deepest: the paying levers together at the deepest depth with 2 micro-batches a step only.
    assert list(summary["combined_mfu_at_micro_batches"]) == ["3 layers, 2 micro-batches"]
    assert summary["combined_mfu_at_layers"] == {} and summary["combined_time_shares"] == {}
    assert list(summary["deep_time_shares"]) == ["3"] and summary["deep_time_shares"]["3"]["gemm"] > 0  # profiled
    for name in ("gpu_tests.log", "bench.log", "bench.json", "profile.txt"):
        assert (out / name).stat().st_size > 0
    assert len(list(out.iterdir())) <= 8  # a device call brings back eight files at most
    assert (out / "pel.log").read_text() == "skipped (limit 0)\n" and summary["pel_bench"]["exit_code"] == 0
    refused = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), str(wheels), str(out), "benchmark"],
                             capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode == 2 and "unknown part benchmark: all, bench or tier" in refused.stderr


def test_gpu_check_writes_its_summary_within_the_calls_budget(tmp_path):
    """Steps are cut to the call's budget, whatever start-up took: with none left they are skipped
    (status 124 each) and summary.json is still written before the device call's own timeout."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, "GPU_CHECK_BUDGET": "10",
           "GPU_CHECK_ALLOW_CPU": "1", "GPU_CHECK_SITE": str(tmp_path / "site")}
    out.mkdir()
    (out / "bench.json.tmp4242").write_text("{")  # an earlier call's write killed before its rename
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), str(wheels), str(out), "bench"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0
    assert (out / "bench.log").read_text() == "skipped (no time left in the call's budget)\n"
    assert not (out / "bench.json.tmp4242").exists()  # not a ninth file to bring back
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bench"]["exit_code"] == 124 and summary["pel_bench"]["exit_code"] == 124


def test_gpu_check_paces_the_tier_to_the_calls_real_limit(tmp_path):
    """The second call of the two (README, GPU tier) has what the device's budget has left, less than
    the tier's own limit: GPU_CHECK_BUDGET cuts the tier's step to it, and summary.json (no JUnit XML:
    pytest was killed) is still written within it. The bench part's defaults fit its 360 s call."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (tmp_path / "test_sleeps.py").write_text("import time\n\nimport pytest\n\n\n@pytest.mark.gpu\n"
                                             "def test_sleeps_past_the_budget():\n    time.sleep(600)\n")
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, "GPU_CHECK_ALLOW_CPU": "1",
           "GPU_CHECK_SITE": str(tmp_path / "site"), "GPU_CHECK_BUDGET": "40",
           "TIER_ARGS": f"{tmp_path / 'test_sleeps.py'} -k sleeps_past"}
    started = time.time()
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), str(wheels), str(out), "tier"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert time.time() - started < 55, proc.stdout[-3000:]  # the call's own limit: its budget + 15 s
    assert re.search(r"cut to \d+ s \(the call's budget\)", proc.stdout), proc.stdout[-3000:]
    assert (out / "gpu_tests.log").is_file()  # (under load it may be stopped while pytest still collects)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tests"]["exit_code"] == 124 and summary["tests"]["report"] == "missing"
    assert summary["total_seconds"] <= 40  # the summary written within the budget
    assert "budget: 40 s" in (out / "env.txt").read_text()
    # Without GPU_CHECK_BUDGET: call 1's part keeps 30 s of its 360 s call for start-up and transfers.
    env.update(BENCH_ARGS="--help", PEL_ARGS="--help")  # each step over at once
    del env["GPU_CHECK_BUDGET"]
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), str(wheels), str(out), "bench"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    plan = re.search(r"budget: (\d+) s; limits: bench (\d+), tier (\d+), pel (\d+) s", proc.stdout)
    budget, bench, tier, pel = map(int, plan.groups())
    assert budget <= 330 and bench + tier + pel + 10 <= budget and tier == 0 and pel >= 20


def test_gpu_check_installs_each_wheel_once_and_needs_cuda(tmp_path):
    """A wheel an earlier call installed into the private folder is not installed again; an installed
    megatron-core at another version than the wheel's is named; without CUDA the script refuses, in
    one line, unless GPU_CHECK_ALLOW_CPU=1 (a CPU would bench a tiny fp32 model)."""
    from importlib.metadata import version

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(str(wheels), "eve_check_probe")
    make_wheel(str(wheels), "megatron_core")  # 0.0.1: not the installed one
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable,
           "GPU_CHECK_SITE": str(tmp_path / "site"), "BENCH_TIMEOUT": "0", "PEL_TIMEOUT": "0"}
    command = ["bash", str(ROOT / "tools" / "gpu_check.sh"), str(wheels), str(out), "bench"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0, refused.stdout + refused.stderr
    assert "torch.cuda.is_available() is False" in refused.stderr and "GPU_CHECK_ALLOW_CPU=1" in refused.stderr
    assert not (out / "env.txt").exists()
    env["GPU_CHECK_ALLOW_CPU"] = "1"
    for call in range(2):
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        installed = re.search(r"installed from .*: (.*)", (out / "env.txt").read_text())[1]
        probe = str(wheels / "eve_check_probe-0.0.1-py3-none-any.whl")
        assert installed == ("nothing (all present)" if call else probe)
        warning = (f"warning: megatron-core {version('megatron-core')} is already installed and used, "
                   "not megatron_core-0.0.1-py3-none-any.whl's 0.0.1")
        assert warning in (out / "env.txt").read_text() and warning in proc.stdout
        assert re.search(r"\nmegatron-core \S+ from /\S+\n", (out / "env.txt").read_text())  # the one used


def run_summary(out, junit) -> subprocess.CompletedProcess:
    codes = {"tier-rc": 124, "tier-seconds": 9, "bench-rc": 124, "bench-seconds": 9, "pel-rc": 0, "pel-seconds": 1,
             "total-seconds": 20}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check_summary.py"), str(out), "--junit",
                           str(junit), *[f"--{name}={value}" for name, value in codes.items()]],
                          capture_output=True, text=True, timeout=60)


def test_gpu_check_summary_is_written_whatever_its_inputs(tmp_path):
    """A step killed mid-write leaves an empty or cut-short file: the summary names each one it could
    not read and summarizes the rest, instead of failing with no summary.json at all."""
    out = tmp_path / "out"
    out.mkdir()
    junit = tmp_path / "gpu_tests.xml"
    bench = {"device": "CPU", "ours": {"tokens_per_s_per_gpu": 5.0, "tflops_per_gpu": 1.0, "mfu": None,
                                       "peak_memory_gib": 1.0}}
    passing = '<testsuites><testsuite><testcase classname="a" name="t"/></testsuite></testsuites>'
    cases = [("", "", passing, ["bench.json", "pel.json"]),
             (json.dumps(bench)[:40], "{}", passing[:60], ["bench.json", "gpu_tests.xml"]),
             (json.dumps(bench), "[1, 2]", "", ["pel.json", "gpu_tests.xml"])]
    for bench_text, pel_text, junit_text, unreadable in cases:
        (out / "bench.json").write_text(bench_text)
        (out / "pel.json").write_text(pel_text)
        junit.write_text(junit_text)
        (out / "summary.json").unlink(missing_ok=True)
        proc = run_summary(out, junit)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert [Path(error.split(":")[0]).name for error in summary["input_errors"]] == unreadable
        assert summary["tests"]["passed"] == (0 if "gpu_tests.xml" in unreadable else 1)
        assert summary["tests"].get("report") == ("unreadable" if "gpu_tests.xml" in unreadable else None)
        assert summary["bench"]["exit_code"] == 124 and summary["total_seconds"] == 20
        assert summary.get("tokens_per_s_per_gpu") == (None if "bench.json" in unreadable else 5.0)
        assert summary["pel_bench"]["figures"] == (None if "pel.json" in unreadable else {})


def test_bench_json_is_replaced_whole(tmp_path, monkeypatch):
    """bench.json is written under a temporary name and renamed: a run killed before the rename (here
    the rename fails) leaves the previous figures whole, not an empty or cut-short file."""
    from tools.bench_train import save_figures

    path = tmp_path / "bench.json"
    save_figures(path, {"ours": 1})

    def killed(*args):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    try:
        save_figures(path, {"ours": 1, "hf": 2})
    except KeyboardInterrupt:
        pass
    assert json.loads(path.read_text()) == {"ours": 1} and [p.name for p in tmp_path.iterdir()] == ["bench.json"]


def test_hf_baseline_meets_every_shape_before_timing(monkeypatch):
    """Ours is timed after an untimed run over the batches it then times (on a GPU): so is the HF
    baseline, from the same first batch, or its first encounters of padded shapes flatter the speed-up."""
    import argparse

    import numpy as np
    import torch

    import tools.bench_hf as bench_hf
    from megatron_eve.config import get_preset, replace
    from tools.bench_train import sample_stream

    calls = []

    def recording(train_step, warmup, steps):
        results, seconds = timed(train_step, warmup, steps)
        calls.append([step.real_tokens for step in results])
        return results, seconds

    timed = bench_hf.timed_steps
    monkeypatch.setattr(bench_hf, "timed_steps", recording)
    model_cfg = replace(get_preset("tiny"), **{"language.num_layers": 1, "aligner.enabled": False})
    samples = sample_stream(12, model_cfg, np.random.default_rng(0))
    args = argparse.Namespace(bf16=False, hf_gradient_checkpointing=False, hf_micro_batch_size=2, warmup=0, steps=2,
                              _ours_tokens_per_step=600)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a tiny model: pytest's process-wide threads only contend
    try:
        work = bench_hf.run_hf(args, model_cfg, samples, grouped=True, untimed_pass=True)[0]
        assert len(calls) == 2 and calls[0] == calls[1]  # the timed steps' batches, already met untimed
        assert work.real_tokens == sum(calls[1]) > 0
    finally:
        torch.set_num_threads(threads)


def test_peak_tflops_takes_the_longest_matching_name(monkeypatch):
    """The NVL and PCIe parts have lower peaks than the SXM ones whose names they contain."""
    import torch

    from megatron_eve.training.metrics import peak_tflops

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, peak in (("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA H100 80GB HBM3", 989.0),
                       ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0), ("NVIDIA H800", 989.0),
                       ("NVIDIA H800 PCIe", 756.0), ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                       ("Tesla T4", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_, name=name: name)
        assert peak_tflops() == peak, name
    assert peak_tflops(500.0) == 500.0


def test_bench_train_counts_the_teacher_and_keeps_its_runs(tmp_path):
    """With --aligner the frozen teacher's forward is counted (its parameters passed as the trainer
    passes them); when the one lever fails, the two runs of ours whose median is printed are kept."""
    from tests.helpers import child_environment

    report = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "tests.test_benchmarks", "teacher", str(report)], capture_output=True,
                          text=True, timeout=300, env=child_environment(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(report.read_text())
    assert figures["teacher_params_counted"] == [figures["teacher_params"]] and figures["teacher_params"] > 0
    assert figures["with_liger-rmsnorm"]["error"] and "median of 2 runs" in proc.stdout
    assert len(figures["ours_runs_tokens_per_s"]) == 2 and figures["ours_steady"]["runs"] == 2


def test_bench_train_falls_back_when_the_fused_update_fails(tmp_path):
    """If ours' first run fails (here: the update's device-side skip, made to raise), the bench keeps the
    error and measures every figure of ours in the setting without torch's fused AdamW (whose ablation
    then has nothing to compare)."""
    from tests.helpers import child_report

    figures = child_report("tests.test_benchmarks", tmp_path / "bench.json", timeout=300)
    assert figures["ours_fallback"] == {"error": "RuntimeError: simulated: the device-side skip failed",
                                        "setting": "fused-adam off"}
    assert figures["ours"]["real_tokens"] > 0 and figures["ours_2_layers_4_micro_batches"]["real_tokens"] > 0
    assert figures["without_fused-adam"]["error"].startswith("not timed: ours runs without the fused AdamW")


def run_bench_with_a_failing_device_skip(report_path: str) -> None:
    import megatron_eve.training.update as update
    from tools import bench_train

    def refuse(*args, **kwargs):
        raise RuntimeError("simulated: the device-side skip failed")

    update.arm_update_skip = refuse
    sys.argv = ["bench_train.py", "--preset", "tiny", "--layers", "2", "--seq-length", "512", "--micro-batches", "2",
                "--steps", "2", "--warmup", "1", "--samples", "40", "--also-micro-batches", "4", "--ablate", "fused-adam",
                "--json", report_path]
    bench_train.main()


def run_bench_counting_the_teacher(report_path: str) -> None:
    """tools/bench_train.py --aligner with a lever that fails on the CPU (liger-kernel is not installed
    here); the teacher parameters each micro-batch's work was counted with, and the teacher's own count."""
    import megatron_eve.model.build as build
    import megatron_eve.training.metrics as metrics
    from tools import bench_train

    counted, teachers = set(), []
    work, build_model = metrics.micro_batch_work, build.build_model

    def counting(batch, model, align, teacher_params=0, llm_trains=True):
        counted.add(teacher_params)
        return work(batch, model, align, teacher_params, llm_trains)

    def building(*args, **kwargs):
        model = build_model(*args, **kwargs)
        teachers.append(sum(p.numel() for p in model.teacher.model.parameters()) if model.teacher else 0)
        return model

    metrics.micro_batch_work, build.build_model = counting, building
    sys.argv = ["bench_train.py", "--preset", "tiny", "--layers", "2", "--seq-length", "512",
                "--micro-batches", "2", "--steps", "1", "--warmup", "0", "--samples", "24", "--aligner", "--try",
                "liger-rmsnorm",
                "--json", report_path]
    bench_train.main()
    figures = json.loads(Path(report_path).read_text())
    figures.update(teacher_params_counted=sorted(counted), teacher_params=teachers[0])
    Path(report_path).write_text(json.dumps(figures))


if __name__ == "__main__":
    if sys.argv[1] == "teacher":
        run_bench_counting_the_teacher(sys.argv[2])
    else:
        run_bench_with_a_failing_device_skip(sys.argv[1])
