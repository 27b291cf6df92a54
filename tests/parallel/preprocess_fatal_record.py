"""tools/preprocess_data.py with one record that kills its worker process outright (SIGKILL, as
the kernel's out-of-memory killer does): launched by tests/test_preprocess_faults.py.

Spawned workers import this file as their main module, so the patch below is in force there too."""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_eve.data import preprocess  # noqa: E402

_real = preprocess.process_record


def _fatal(record, index, config, tokenizer):
    if isinstance(record, dict) and record.get("id") == "kills-its-worker":
        os.kill(os.getpid(), signal.SIGKILL)
    return _real(record, index, config, tokenizer)


preprocess.process_record = _fatal

if __name__ == "__main__":
    from tools.preprocess_data import main

    sys.exit(main())
