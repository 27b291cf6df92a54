"""Preprocessing killed or raced while it puts a dataset in place: at every instant the prefix holds the
old dataset or the new one (a half-done swap is finished by the next reader or run), two runs on one
prefix never write the same files, a partition reused after a kill keeps its rejects list, workers die
with their main process, and Ctrl-C is one line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_eve.atomic import host_name
from megatron_eve.config import VisionConfig
from megatron_eve.data.indexed import IndexedSamples, read_metadata
from megatron_eve.data.preprocess import PreprocessJob, partition_prefix, run
from megatron_eve.data.records import RecordConfig
from tests.helpers import ROOT

TOOL = str(ROOT / "tools" / "preprocess_data.py")
VISION = VisionConfig(image_size=224, teacher_image_size=112)
SIZES = ["--image-size", "224", "--teacher-image-size", "112", "--max-length", "512"]
# SIGKILL right after the Nth os.replace whose arguments contain FI_MATCH (no handler runs, as in a real kill).
INJECTOR = '''import os, signal
_n, _match, _real, _seen = int(os.environ["FI_AFTER"]), os.environ["FI_MATCH"], os.replace, [0]
def _replace(*args, **kwargs):
    _real(*args, **kwargs)
    if _match in " ".join(map(str, args)):
        _seen[0] += 1
        if _seen[0] == _n:
            os.kill(os.getpid(), signal.SIGKILL)
os.replace = _replace
'''


def job(corpus, inputs, prefix, template="plain", **options):
    record = RecordConfig(template=template, vision=VISION, max_length=512, image_folder=corpus["root"])
    return PreprocessJob(inputs=[str(p) for p in inputs], output_prefix=str(prefix),
                         tokenizer_model=corpus["tokenizer"], progress=False, record=record, **options)


def cli_args(corpus, inputs, prefix, template="plain", *flags):
    args = [sys.executable, TOOL, "--no-progress", "--image-folder", corpus["root"], "--template", template,
            "--tokenizer-model", corpus["tokenizer"], "--output-prefix", str(prefix), *SIZES, *flags]
    for path in inputs:
        args += ["--input", str(path)]
    return args


def killed_run(tmp_path, args, match, after):
    """The CLI run with a SIGKILL after the `after`-th rename matching `match`: whether it was killed."""
    injector = tmp_path / "injector"
    injector.mkdir(exist_ok=True)
    (injector / "sitecustomize.py").write_text(INJECTOR)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FI_AFTER": str(after), "FI_MATCH": match,
           "PYTHONPATH": f"{injector}{os.pathsep}{ROOT}"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode in (0, -signal.SIGKILL), result.stderr[-3000:]
    return result.returncode == -signal.SIGKILL


def ids(prefix):
    data = IndexedSamples(str(prefix))
    return [data.get(i, pixels=False, teacher=False)["id"] for i in range(len(data))]


def leftovers(folder):
    return sorted(name for name in os.listdir(folder) if ".tmp" in name or name.endswith(".lock"))


# ------------------------------------------------------------------------ D1: a kill at every rename
# Five renames: the staged sidecar (the commit), .bin, .idx, the rejects list, the sidecar; the kills
# between the first and the last (the old sidecar gone, the new not yet in) are the ones a reader must finish.
@pytest.mark.parametrize("after", [2, 3, 4])
def test_a_replacement_killed_at_any_rename_leaves_a_complete_dataset(corpus, tmp_path, after):
    prefix = tmp_path / "data"
    run(job(corpus, [corpus["captions"]], prefix))
    old, new = ids(prefix), [r["id"] for r in json.load(open(corpus["qa"]))]
    killed = killed_run(tmp_path, cli_args(corpus, [corpus["qa"]], prefix, "vicuna_v1"), str(prefix), after)
    assert killed  # (each position parametrized is reached: there are five renames)
    # Old or new, whole, without --overwrite; a reader finishes a swap left half done.
    assert read_metadata(str(prefix))["counts"]["samples"] == 40
    assert ids(prefix) in (old, new)
    summary = run(job(corpus, [corpus["qa"]], prefix, "vicuna_v1"))  # the rerun, without --overwrite
    assert summary.samples == 40 and ids(prefix) == new
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------- D2: two runs on one prefix
def test_a_second_run_on_a_prefix_being_written_is_refused_in_one_line(corpus, tmp_path, capsys):
    from tools.preprocess_data import main

    records = json.load(open(corpus["captions"])) * 6  # long enough to be caught running
    path = tmp_path / "many.json"
    path.write_text(json.dumps(records))
    prefix = tmp_path / "data"
    run(job(corpus, [corpus["qa"]], prefix, "vicuna_v1"))  # a good dataset already there
    first = subprocess.Popen(cli_args(corpus, [path], prefix), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        deadline = time.time() + 120
        while not os.path.exists(f"{prefix}.bin.tmp") and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the second started"
        code = main(["--input", corpus["captions"], "--image-folder", corpus["root"], "--template", "plain",
                     "--tokenizer-model", corpus["tokenizer"], "--output-prefix", str(prefix), "--no-progress",
                     *SIZES])
        assert first.poll() is None, "the first run ended before the second was refused"
        assert code == 1
        holder = f"pid {first.pid} on host {host_name()}"  # (the lock file names its holder)
        assert capsys.readouterr().err.strip() == (f"error: another run is writing {prefix} ({prefix}.lock: "
                                                   f"{holder}): wait for it to end, or choose another "
                                                   "--output-prefix")
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    assert ids(prefix) == [r["id"] for r in records]  # the first run's dataset, whole
    assert leftovers(tmp_path) == []


# ------------------------------------------------------- D3: partitions reused with their rejects list
def input_with_rejects(corpus, tmp_path):
    records = json.load(open(corpus["captions"]))[:30]
    for i in (12, 15, 18):  # in the second of 3 parts
        records[i] = {**records[i], "image": "missing.png"}
    path = tmp_path / "input.json"
    path.write_text(json.dumps(records))
    return path, [r["id"] for i, r in enumerate(records) if i not in (12, 15, 18)]


def check_merged(prefix, summary, kept):
    assert summary.samples == 27 and dict(summary.rejected) == {"missing_image": 3}
    assert ids(prefix) == kept
    rejects = [json.loads(line) for line in open(f"{prefix}.rejects.jsonl")]
    assert [r["reason"] for r in rejects] == ["missing_image"] * 3


@pytest.mark.parametrize("after", [3, 4])  # before and after its rejects list is renamed in
def test_a_partition_killed_while_put_in_place_keeps_its_rejects(corpus, tmp_path, after):
    path, kept = input_with_rejects(corpus, tmp_path)
    prefix = tmp_path / "data"
    assert killed_run(tmp_path, cli_args(corpus, [path], prefix, "plain", "--partitions", "3"),
                      partition_prefix(str(prefix), 1, 3), after)
    check_merged(prefix, run(job(corpus, [path], prefix, partitions=3)), kept)
    assert leftovers(tmp_path) == []


def test_a_partition_without_its_rejects_list_is_redone(corpus, tmp_path):
    path, kept = input_with_rejects(corpus, tmp_path)
    prefix = tmp_path / "data"
    run(job(corpus, [path], prefix, partitions=3, keep_parts=True))
    part = partition_prefix(str(prefix), 1, 3)
    for damage in ("remove", "truncate"):
        if damage == "remove":
            os.remove(part + ".rejects.jsonl")
        else:
            Path(part + ".rejects.jsonl").write_text(Path(part + ".rejects.jsonl").read_text().splitlines()[0] + "\n")
        check_merged(prefix, run(job(corpus, [path], prefix, partitions=3, keep_parts=True)), kept)
        assert len(open(part + ".rejects.jsonl").readlines()) == 3


# ------------------------------------------------------------- D8, Ctrl-C: workers and interruptions
def children(pid):
    """Live (not zombie) processes whose parent is `pid`."""
    out = []
    for name in os.listdir("/proc"):
        try:
            fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid) and fields[0] != "Z":
            out.append(int(name))
    return out


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def started(corpus, tmp_path, prefix, *flags):
    """A CLI run over 6 x 40 captions, once it has written samples (its workers are running)."""
    path = tmp_path / "many.json"
    path.write_text(json.dumps(json.load(open(corpus["captions"])) * 6))
    proc = subprocess.Popen(cli_args(corpus, [path], prefix, "plain", *flags), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.time() + 120
    tmp = f"{prefix}.bin.tmp"
    while proc.poll() is None and time.time() < deadline and not (os.path.exists(tmp) and os.path.getsize(tmp)):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    return proc


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_end_with_a_killed_main_process(corpus, tmp_path):
    proc = started(corpus, tmp_path, tmp_path / "data", "--workers", "2")
    workers = children(proc.pid)
    try:
        assert len(workers) >= 2
        proc.kill()
        proc.wait()
        deadline = time.time() + 10
        while [pid for pid in workers if alive(pid)] and time.time() < deadline:
            time.sleep(0.1)
        assert [pid for pid in workers if alive(pid)] == []
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_ctrl_c_is_one_line_and_keeps_the_dataset(corpus, tmp_path):
    prefix = tmp_path / "data"
    run(job(corpus, [corpus["qa"]], prefix, "vicuna_v1"))
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    proc = started(corpus, tmp_path, prefix, "--workers", "2")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: interrupted; {prefix} left as it was"]
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path) if name != "many.json"} == before
