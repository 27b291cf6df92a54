"""Checkpoints: across layer specs, replacement without a window of loss, no restart over unmarked ones."""

import json
import subprocess
import sys

from tests.helpers import ROOT, child_environment


def test_checkpoints_across_specs_and_safe_replacement(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "parallel" / "checkpoint_worker.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=child_environment(), cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["plain_to_te"] == {"iteration": 1, "weights_equal": True, "extra_state_loaded": None}
    assert r["te_to_plain"] == {"iteration": 2, "weights_equal": True}
    assert r["te_to_te"] == {"extra_state_loaded": {"fp8_meta": 1}}
    assert "iter_0000002 cannot be loaded" in r["damaged"] and "truncated, damaged or missing" in r["damaged"]
    assert "\n" not in r["damaged"]
    assert r["resaved_entries"] == ["iter_0000001", "latest_checkpointed_iteration.txt"]
    assert r["recovered_iteration"] == 1 and r["recovered_entries"] == r["resaved_entries"]
    assert "holds" in r["unmarked"] and "iter_0000001 but no latest_checkpointed_iteration.txt" in r["unmarked"]


class _Payload:
    """What a crafted checkpoint would carry: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_crafted_metadata_does_not_run(tmp_path):
    import pickle

    from megatron_eve.checkpoint.hf_eve import MegatronCheckpoint

    directory = tmp_path / "iter_0000001"
    directory.mkdir()
    marker = tmp_path / "code-ran"
    (directory / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    (directory / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1}')
    try:
        MegatronCheckpoint(str(directory))
        raised = None
    except pickle.UnpicklingError as error:
        raised = str(error)
    assert not marker.exists()
    assert raised and "refers to posix.system" in raised and "refusing to load it" in raised
