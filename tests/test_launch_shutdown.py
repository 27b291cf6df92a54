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


FAKE_TORCHRUN = """#!/usr/bin/env bash
# torchrun under a SIGTERM sent to the whole job step: its workers save (or not), and torchrun
# re-raises the signal it forwarded: status 1 either way.
[ "$1" = "--help" ] && exit 0
save=""; previous=""
for arg in "$@"; do [ "$previous" = "--save" ] && save=$arg; previous=$arg; done
mkdir -p "$save"
trap '[ "$SAVES" = 1 ] && echo 7 > "$save/latest_checkpointed_iteration.txt"; exit 1' TERM
touch "$STARTED"
while :; do sleep 0.05; done
"""


@pytest.mark.parametrize("saves", [True, False])
def test_a_sigterm_that_saved_is_a_clean_stop(tmp_path, saves):
    """SLURM signals every process of the step: the stage script waits for torchrun (killed, it ended
    its task while the workers were saving), and a stop whose checkpoint was written exits 0 although
    torchrun reports the signal it forwarded with status 1; a stop that wrote none still fails."""
    import signal
    import time

    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir()
    fake.write_text(FAKE_TORCHRUN)
    fake.chmod(0o755)
    started = tmp_path / "started"
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "CHECKPOINTS": str(tmp_path / "ckpt"),
           "STARTED": str(started), "SAVES": "1" if saves else "0"}
    proc = subprocess.Popen(["bash", str(ROOT / "examples" / "eve7b_pretrain.sh"), "0", "127.0.0.1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while not started.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if saves:
        assert proc.returncode == 0, err
        assert "stopped by SIGTERM after saving iteration 7" in err
    else:
        assert proc.returncode == 1, err
