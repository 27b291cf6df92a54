"""Loss and gradients at TP=2, PP=2 and TP=2 + sequence parallel equal TP=1 / PP=1, for the same
global weights saved at TP=1 and loaded at the other layout through dist-checkpointing.

Three micro-batches (landscape, portrait, square and text-only samples; then text only); the
aligner and its CLIP teacher are on, so the taps of both pipeline stages reach the aligner. Tolerances (fp32):
losses within 1e-5 absolute, every gradient tensor within 1e-4 of its largest entry
(measured: < 1e-6).
"""

import pytest

from tests.helpers import read_json, torchrun

LAYOUTS = {"tp2": ["--tp", "2"], "pp2": ["--pp", "2"], "tp2_sp": ["--tp", "2", "--sp"],
           # Interleaved 1F1B: 4 chunks of 2 layers on 2 ranks (chunk v of rank r holds layers
           # 4v + 2r, 4v + 2r + 1), taps on every chunk; a packed fourth micro-batch (the schedule
           # takes a multiple of PP micro-batches).
           "pp2_vpp2": ["--pp", "2", "--vpp", "2", "--packed"],
           # Weight gradients accumulated into the main grads inside the GEMM (megatron_eve's torch
           # kernel for apex's extension; on by default on CUDA), over SP's gathered inputs, and the
           # token embedding's rows added into its vocabulary shard's main grad; and the LM loss of
           # --cross-entropy-fusion-impl torch over vocabulary shards (rank 1's padded: vocab 1000 of
           # 1024) against the reference's megatron-core loss.
           "tp2_sp_fusions": ["--tp", "2", "--sp", "--grad-accumulation-fusion", "--torch-cross-entropy"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher_path):
    root = tmp_path_factory.mktemp("parity")
    torchrun("eve_worker.py", 1, ["reference", "--out", root / "reference", "--teacher", teacher_path])
    return root


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_reference(runs, teacher_path, layout):
    packed = "--packed" in LAYOUTS[layout]
    reference_dir = runs / ("reference_packed" if packed else "reference")
    if packed and not reference_dir.exists():
        torchrun("eve_worker.py", 1, ["reference", "--packed", "--out", reference_dir, "--teacher", teacher_path])
    torchrun("eve_worker.py", 2, ["layout", "--out", runs / layout, "--teacher", teacher_path, *LAYOUTS[layout]])
    reference = read_json(reference_dir / "losses.json")
    other = read_json(runs / layout / "losses.json")
    assert len(reference) == len(other) == (4 if packed else 3)
    assert reference[0]["align loss"] > 0.1 and reference[2]["align loss"] == 0.0
    if packed:
        assert reference[3]["align loss"] > 0.1
    for ref_step, step in zip(reference, other):
        for key in ("lm loss", "align loss"):
            assert abs(ref_step[key] - step[key]) <= 1e-5, (key, ref_step, step)

    differences = read_json(runs / layout / "grad_differences.json")
    assert "key mismatch" not in differences, differences
    assert any(k.startswith("aligner.norm_layer.") for k in differences)
    assert any(k.startswith("vision_model.") for k in differences)
    zero = [k for k, d in differences.items() if d["reference_max"] == 0]
    assert not zero, f"parameters without gradient: {zero}"
    worst = max(differences, key=lambda k: differences[k]["relative"])
    assert differences[worst]["relative"] <= 1e-4, (worst, differences[worst])
