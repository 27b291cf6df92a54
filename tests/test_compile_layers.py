"""--torch-compile-layers: each decoder layer compiled (regional compile) gives the eager model's
losses and gradients on packed THD micro-batches of varying sample counts, each layer one whole
graph (no graph breaks), recompiled only while the varying sizes become dynamic; and, under DDP
with the weight-gradient accumulation fused into the main grads (CUDA's default), the same main
grads. Run in a process of its own (megatron-core's groups, dynamo's caches); compiled for the CPU
here."""

import dataclasses
import json
import sys

import numpy as np
import torch

from tests.helpers import child_report, fuse_weight_gradients, tiny_config


def test_compiled_layers_match_eager_in_whole_graphs(tmp_path):
    report = child_report("tests.test_compile_layers", tmp_path / "report.json", timeout=600)
    assert report["compiled_layers"] == report["layers"] > 1
    assert report["sample_counts"][0] != report["sample_counts"][1]  # cu_seqlens changes size
    assert report["graph_breaks"] == {}, report["graph_breaks"]
    assert max(report["loss_relative_diffs"]) <= 1e-5, report
    assert report["grad_relative_diff"] <= 1e-4, report
    # One graph, recompiled once the packed samples' count (and their longest length) first change.
    assert report["unique_graphs"] <= 3, report
    # With gradient-accumulation fusion (the CUDA default; forced here), under DDP: the compiled layers
    # fuse as often as the eager ones and leave the same fp32 main grads (measured 1.3e-6). Their graphs
    # split at the linears (the fused backward writes the main grad: model/compile_layers.py).
    fused = report["fused"]
    assert fused["compiled_fused_calls"] == fused["eager_fused_calls"] > 0, fused
    assert fused["main_grad_relative_diff"] <= 1e-4, fused


def compiled_layers_report(report_path: str):
    from torch._dynamo.utils import counters

    from megatron_eve import distributed
    from megatron_eve.config import ParallelConfig, RuntimeConfig
    from megatron_eve.data.dataset import assemble_sequence
    from megatron_eve.data.loader import BatchPlan, collate, model_inputs
    from megatron_eve.data.packing import pack
    from megatron_eve.model.build import build_model
    from tools.bench_train import as_row_sample, sample_stream

    parallel = ParallelConfig()
    distributed.initialize(parallel, seed=1)
    cfg = tiny_config(changes={"aligner.enabled": False})
    torch.manual_seed(0)
    eager = build_model(cfg, parallel, RuntimeConfig(use_cpu_initialization=True, transformer_impl="torch"),
                        load_teacher=False)
    compiled = build_model(cfg, parallel, RuntimeConfig(use_cpu_initialization=True, transformer_impl="torch",
                                                        torch_compile_layers=True), load_teacher=False)
    compiled.load_state_dict(eager.state_dict())
    samples = sample_stream(40, cfg, np.random.default_rng(0))
    plan = pack(np.asarray([len(s["tokens"]) for s in samples]), 512, 10000, np.random.default_rng(0))
    rows = [collate([assemble_sequence([as_row_sample(samples[i]) for i in plan.sequence(k)], 512)],
                    BatchPlan.of(cfg.vision, thd=True)) for k in range(4)]
    diffs, counts = [], []
    for row in rows:
        counts.append(len(row["cu_seqlens"]) - 1 if "cu_seqlens" in row else None)
        losses = []
        for model in (eager, compiled):
            loss = model(**model_inputs(row, cfg.vision, "cpu", thd=True))[0].float().sum()
            loss.backward()
            losses.append(float(loss))
        diffs.append(abs(losses[0] - losses[1]) / abs(losses[0]))
    grad_diff = max(float((p.grad - q.grad).abs().max() / (p.grad.abs().max() + 1e-12))
                    for p, q in zip(eager.parameters(), compiled.parameters()) if p.grad is not None)
    layers = list(compiled.decoder.layers)
    report = {"layers": len(layers),
              "compiled_layers": sum(getattr(layer, "_compiled_call_impl", None) is not None for layer in layers),
              "sample_counts": counts, "loss_relative_diffs": diffs, "grad_relative_diff": grad_diff,
              "graph_breaks": dict(counters["graph_break"]), "unique_graphs": counters["stats"]["unique_graphs"],
              "fused": fused_accumulation_report(cfg, parallel, rows[:2])}
    with open(report_path, "w") as out:
        json.dump(report, out)
    distributed.destroy()


def fused_accumulation_report(cfg, parallel, rows) -> dict:
    """Eager and compiled layers under DDP with the weight-gradient accumulation fused into the main grads
    (CUDA's default, forced on the CPU): fused kernel calls of each, and their main grads' difference."""
    from types import SimpleNamespace

    from megatron_eve.config import OptimConfig, RuntimeConfig
    from megatron_eve.data.loader import model_inputs
    from megatron_eve.model.build import build_model
    from megatron_eve.training.optim import wrap_model

    calls = fuse_weight_gradients()
    runtime = RuntimeConfig(use_cpu_initialization=True, transformer_impl="torch")
    job = SimpleNamespace(optim=OptimConfig(), runtime=runtime)
    torch.manual_seed(0)
    eager = build_model(cfg, parallel, runtime, load_teacher=False)
    compiled = build_model(cfg, parallel, dataclasses.replace(runtime, torch_compile_layers=True), load_teacher=False)
    compiled.load_state_dict(eager.state_dict())
    fused_calls = []
    for ddp in (wrap_model(eager, job), wrap_model(compiled, job)):
        calls.clear()
        for row in rows:
            ddp(**model_inputs(row, cfg.vision, "cpu", thd=True))[0].float().sum().backward()
        fused_calls.append(len(calls))
    diff = max(float((p.main_grad - q.main_grad).abs().max() / (p.main_grad.abs().max() + 1e-12))
               for p, q in zip(eager.parameters(), compiled.parameters()) if hasattr(p, "main_grad"))
    return {"eager_fused_calls": fused_calls[0], "compiled_fused_calls": fused_calls[1],
            "main_grad_relative_diff": diff}


if __name__ == "__main__":
    compiled_layers_report(sys.argv[1])
