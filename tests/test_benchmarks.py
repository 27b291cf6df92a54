"""The benchmark scripts run end to end (small sizes); their figures come from real runs."""

import json
import os
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
           "GPU_CHECK_SITE": str(tmp_path / "site"), "TIER_ARGS": "-k attention", "PEL_TIMEOUT": "0",
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
           "GPU_CHECK_SITE": str(tmp_path / "site")}
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), str(wheels), str(out), "bench"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0
    assert (out / "bench.log").read_text() == "skipped (no time left in the call's budget)\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bench"]["exit_code"] == 124 and summary["pel_bench"]["exit_code"] == 124


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


if __name__ == "__main__":
    run_bench_with_a_failing_device_skip(sys.argv[1])
