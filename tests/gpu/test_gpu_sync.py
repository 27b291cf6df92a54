"""The host never waits for the GPU inside a training step's micro-batches: each wait stops the
host from queueing work ahead, and the GPU then idles while it catches up.

The trainer's per-micro-batch path runs under torch's synchronisation check
(tests/parallel/sync_free_worker.py): the loader's pinned batches planned in a worker, model inputs
(crops normalised, the teacher's squares composed on the device), the PEL, decoder, aligner, CLIP
teacher, losses and backward. No wait may come from this package, and three micro-batches a step
may wait no more often than one does (megatron-core's once-a-step work may wait). The update after
them (training/update.py, fused AdamW with clipping: the trainer's defaults) waits once, in
megatron-core's read of the gradient norm, never in this package (its flags' read finds them ready)."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, child_environment

pytestmark = pytest.mark.gpu


def test_a_training_step_waits_for_the_device_no_more_often_with_more_micro_batches(tmp_path, on_gpu, data):
    out = tmp_path / "waits.json"
    cmd = [sys.executable, str(ROOT / "tests" / "parallel" / "sync_free_worker.py"), "--data", data["captions"],
           "--teacher", data["teacher"], "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=child_environment(on_gpu), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["cuda"] == on_gpu
    one, three = report["waits"]["1"], report["waits"]["3"]
    ours = {place: count for place, count in three.items() if place.startswith(("megatron_eve", "tests"))}
    assert not ours, f"the host waited for the device in this package: {ours}"
    assert sum(three.values()) <= sum(one.values()), f"waits per micro-batch: one {one}, three {three}"
    for count, places in report["update_waits"].items():
        norm_read = all(place.rsplit(":", 1)[0].endswith("megatron/core/optimizer/clip_grads.py") for place in places)
        assert sum(places.values()) <= 1 and norm_read, (count, places)
