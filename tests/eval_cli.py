"""tools/eval_vqa.py run in this process, and the answer files its tests write (shared by
tests/test_scoring*.py)."""

import io
import json
from contextlib import redirect_stderr, redirect_stdout

from tools.eval_vqa import main

SHORT = "\nAnswer the question using a single word or phrase."


def run(*argv):
    """`tools/eval_vqa.py *argv`, run in this process (tests/test_generation.py runs the script):
    (exit code, stdout, stderr), a command-line mistake's exit included."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as stop:  # argparse's way out
            code = stop.code
    return code, out.getvalue(), err.getvalue()


def answers_file(tmp_path, rows, name="answers.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path
