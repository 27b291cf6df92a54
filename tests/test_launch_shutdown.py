"""examples/eve7b_common.sh gives torchrun a --shutdown-timeout under slurm_eve7b.sbatch's signal
lead, so --exit-signal-handler's checkpoint is written before torchrun SIGKILLs its workers."""

import json
import os
import re
import subprocess

import pytest

from tests.helpers import ROOT


def launch(tmp_path, help_text):
    """The LAUNCH array eve7b_common.sh builds, with a torchrun whose --help prints `help_text`."""
    fake = tmp_path / "torchrun"
    fake.write_text(f"#!/usr/bin/env bash\necho {help_text!r}\n")
    fake.chmod(0o755)
    script = f'source {ROOT}/examples/eve7b_common.sh 0 127.0.0.1; python3 -c "import json, sys; ' \
             f'print(json.dumps(sys.argv[1:]))" "${{LAUNCH[@]}}"'
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout), out.stderr


@pytest.mark.parametrize("has_flag", [True, False])
def test_torchrun_waits_for_the_exit_checkpoint(tmp_path, has_flag):
    argv, warned = launch(tmp_path, "[--shutdown-timeout SHUTDOWN_TIMEOUT]" if has_flag else "[--max-restarts]")
    if has_flag:
        timeout = int(argv[argv.index("--shutdown-timeout") + 1])
        sbatch = (ROOT / "examples" / "slurm_eve7b.sbatch").read_text()
        lead = int(re.search(r"--signal=TERM@(\d+)", sbatch).group(1))
        assert 30 < timeout < lead and not warned
    else:
        assert "--shutdown-timeout" not in argv and "no --shutdown-timeout" in warned
