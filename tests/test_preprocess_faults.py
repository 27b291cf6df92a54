"""Preprocessing under hostile input and faults: every valid record survives, every bad one is
skipped, counted and named, and no interrupted or stale output reads as complete."""

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_eve.config import VisionConfig
from megatron_eve.data import indexed, sources
from megatron_eve.data.indexed import DatasetFormatError, IndexedSamples, read_metadata
from megatron_eve.data.indexed_writer import SampleWriter
from megatron_eve.data.preprocess import PreprocessJob, partition_prefix, run
from megatron_eve.data.records import RecordConfig, Sample
from megatron_eve.data.sources import Broken, iter_records, parse
from tests.helpers import ROOT, damaged_png

VISION = VisionConfig(image_size=672)


def job(corpus, inputs, prefix, template="vicuna_v1", **options):
    return PreprocessJob(inputs=[str(p) for p in inputs], output_prefix=str(prefix),
                         tokenizer_model=corpus["tokenizer"], progress=False,
                         record=RecordConfig(template=template, vision=VISION, image_folder=corpus["root"]),
                         **options)


def conversation(i):
    return {"id": f"r{i}", "conversations": [{"from": "human", "value": f"question {i}"},
                                             {"from": "gpt", "value": f"answer {i}"}]}


def parsed(path):
    out = [parse(r) for _, r in iter_records([str(path)])]
    return [r["id"] for r in out if isinstance(r, dict) and "conversations" in r], out


# ------------------------------------------------------------------------------ 1. resynchronisation
BREAKAGES = {
    # Record 2 without its closing brace: the next "{" that follows a "," is record 3's.
    "missing closing brace": lambda text: text[: text.rstrip().rfind("}")],
    # A quote lost inside record 2: the string swallows text up to the next quote.
    "unterminated string": lambda text: text.replace('"answer 2"', '"answer 2'),
    # A missing comma before the conversations list: parsing stops before the nested turns.
    "missing comma": lambda text: text.replace('"id": "r2",', '"id": "r2"'),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
@pytest.mark.parametrize("chunk", [1 << 20, 31, 97, 211], ids=["one-read", "reads-31", "reads-97", "reads-211"])
def test_a_broken_list_element_costs_only_itself(tmp_path, monkeypatch, breakage, chunk):
    monkeypatch.setattr(sources, "_CHUNK", chunk)
    monkeypatch.setattr(sources, "_MAX_RECORD_CHARS", max(4 * chunk, 1024))  # above one record
    monkeypatch.setattr(sources, "_LOOKBEHIND", 64)
    elements = [json.dumps(conversation(i), indent=2) for i in range(8)]
    elements[2] = BREAKAGES[breakage](elements[2])
    path = tmp_path / "list.json"
    path.write_text("[\n" + ",\n".join(elements) + "\n]\n")
    ids, out = parsed(path)
    assert ids == [f"r{i}" for i in range(8) if i != 2]
    assert any(isinstance(r, Broken) for r in out)


# ------------------------------------------------------------------------------------- 5. UTF-8
@pytest.mark.parametrize("where", ["first 8 KiB", "after 8 KiB"])
@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_invalid_utf8_rejects_its_record_only(tmp_path, where, layout):
    records = [conversation(i) for i in range(60)]
    bad = 1 if where == "first 8 KiB" else 55
    encoded = [json.dumps(r, ensure_ascii=False).encode() for r in records]
    encoded[bad] = encoded[bad].replace(b"question", b"qu\xff\xfestion")
    data = (b"[" + b",\n".join(encoded) + b"]") if layout == "json" else b"\n".join(encoded) + b"\n"
    path = tmp_path / f"input.{layout}"
    path.write_bytes(data)
    ids, out = parsed(path)
    assert ids == [r["id"] for i, r in enumerate(records) if i != bad]
    broken = [r for r in out if isinstance(r, Broken)]
    assert len(broken) == 1 and broken[0].reason == "invalid_utf8"


def test_invalid_utf8_is_a_counted_reason(corpus, tmp_path):
    path = tmp_path / "input.jsonl"
    lines = [json.dumps(conversation(i)).encode() for i in range(4)]
    lines[2] = lines[2].replace(b"answer", b"\xc3(nswer")
    path.write_bytes(b"\n".join(lines))
    summary = run(job(corpus, [path], tmp_path / "out"))
    assert summary.samples == 3 and dict(summary.rejected) == {"invalid_utf8": 1}


# ------------------------------------------------------------------- 4, 10. images that break decoders
def test_16_bit_grey_and_damaged_png(corpus, tmp_path):
    from PIL import Image

    folder = Path(corpus["root"]) / f"faults_{tmp_path.name}"
    folder.mkdir()
    ramp = (np.arange(96 * 128).reshape(96, 128) * 5).astype(np.uint16)  # 0 .. 61435
    Image.fromarray(ramp).save(folder / "grey16.png")
    assert Image.open(folder / "grey16.png").mode.startswith("I")
    damaged_png(folder / "damaged.png")
    ask = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A ramp."}]
    records = [{"id": "grey", "image": f"{folder.name}/grey16.png", "conversations": ask},
               {"id": "damaged", "image": f"{folder.name}/damaged.png", "conversations": ask},
               {**conversation(9)}]
    path = tmp_path / "images.json"
    path.write_text(json.dumps(records))
    summary = run(PreprocessJob([str(path)], str(tmp_path / "out"), corpus["tokenizer"], progress=False,
                                record=RecordConfig("vicuna_v1", VISION, image_folder=corpus["root"],
                                                    image_codec="png")))
    assert summary.samples == 2 and dict(summary.rejected) == {"corrupt_image": 1}
    rejects = [json.loads(line) for line in open(tmp_path / "out.rejects.jsonl")]
    assert rejects[0]["id"] == "damaged" and "SyntaxError" in rejects[0]["detail"]
    crop = IndexedSamples(str(tmp_path / "out")).get(0)["images"][0].astype(float)
    expected = np.asarray(Image.fromarray(np.rint(ramp / 257.0).astype(np.uint8)).convert("RGB").resize(
        (crop.shape[1], crop.shape[0]), Image.BICUBIC), dtype=float)
    assert crop.std() > 20 and np.abs(crop - expected).max() <= 1  # a ramp, not a white page


# ------------------------------------------------------------------------- 11. a worker killed by the OS
def test_a_worker_killed_by_the_os_costs_its_record(corpus, tmp_path):
    records = json.load(open(corpus["qa"]))[:12]
    records.insert(5, {**records[0], "id": "kills-its-worker"})
    path = tmp_path / "input.json"
    path.write_text(json.dumps(records))
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "parallel" / "preprocess_fatal_record.py"),
                          "--no-progress", "--input", path, "--image-folder", corpus["root"], "--template",
                          "vicuna_v1", "--tokenizer-model", corpus["tokenizer"], "--output-prefix",
                          tmp_path / "out", "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    data = IndexedSamples(str(tmp_path / "out"))
    assert [data.get(i)["id"] for i in range(len(data))] == [r["id"] for r in records if r["id"] != "kills-its-worker"]
    rejects = [json.loads(line) for line in open(tmp_path / "out.rejects.jsonl")]
    assert [(r["id"], r["reason"]) for r in rejects] == [("#5", "worker_died")]


# --------------------------------------------------------------------------- 2. stale partitions
def test_partitions_of_another_input_are_not_reused(corpus, tmp_path):
    first = tmp_path / "first.json"
    first.write_text(json.dumps(json.load(open(corpus["qa"]))[:20]))
    second = tmp_path / "input.json"
    second.write_text(json.dumps(json.load(open(corpus["qa"]))[20:]))
    prefix = tmp_path / "many"
    run(job(corpus, [second], tmp_path / "expected"))
    # An interrupted partitioned run over other records left complete parts behind.
    os.replace(first, tmp_path / "input_old.json")
    run(job(corpus, [tmp_path / "input_old.json"], prefix, partitions=3, partition_index=0))
    run(job(corpus, [tmp_path / "input_old.json"], prefix, partitions=3, partition_index=1))
    kept = os.path.getmtime(partition_prefix(str(prefix), 0, 3) + ".bin")
    summary = run(job(corpus, [second], prefix, partitions=3, keep_parts=True))
    assert summary.samples == 20
    assert filecmp.cmp(f"{tmp_path}/expected.bin", f"{prefix}.bin", shallow=False)
    assert read_metadata(str(prefix))["inputs"] == [str(second)]
    assert os.path.getmtime(partition_prefix(str(prefix), 0, 3) + ".bin") != kept
    # A rerun with the same input keeps its own finished parts.
    kept = os.path.getmtime(partition_prefix(str(prefix), 0, 3) + ".bin")
    run(job(corpus, [second], prefix, partitions=3, keep_parts=True))
    assert os.path.getmtime(partition_prefix(str(prefix), 0, 3) + ".bin") == kept
    # Without --keep-parts they go once merged (a second copy of the dataset).
    run(job(corpus, [second], prefix, partitions=3))
    assert filecmp.cmp(f"{tmp_path}/expected.bin", f"{prefix}.bin", shallow=False)
    assert not [name for name in os.listdir(tmp_path) if "_part" in name]


# ------------------------------------------------------------------- 3. replacing a dataset in place
def write_dataset(prefix, count, first_token):
    with SampleWriter(str(prefix), {"template": "plain"}) as writer:
        for i in range(count):
            tokens = np.arange(first_token, first_token + 5 + i, dtype=np.int32)
            writer.add(Sample(f"s{i}", tokens, tokens.copy()))
        writer.finalize()


def test_replacement_interrupted_between_renames_is_finished(tmp_path, monkeypatch):
    """Interrupted after its commit (the staged sidecar complete), a replacement is finished on the way
    out, never left as a mix of old and new files (a kill, which runs no handler: tests/test_preprocess_swap.py)."""
    prefix = tmp_path / "data"
    write_dataset(prefix, 4, 10)
    assert read_metadata(str(prefix))["counts"]["samples"] == 4
    renames = []
    real_replace = os.replace

    def killed_after_bin(source, target):
        real_replace(source, target)
        renames.append(str(target))
        if str(target).endswith(".bin"):
            raise KeyboardInterrupt("killed between the .bin and .idx renames")

    monkeypatch.setattr(indexed.os, "replace", killed_after_bin)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(prefix, 40, 100)
    monkeypatch.setattr(indexed.os, "replace", real_replace)
    assert renames == [f"{prefix}{suffix}" for suffix in (".meta.json.tmp", ".bin", ".idx", ".meta.json")]
    assert len(IndexedSamples(str(prefix))) == 40
    assert sorted(os.listdir(tmp_path)) == ["data.bin", "data.idx", "data.meta.json"]


def test_truncated_files_are_refused_before_training(tmp_path):
    prefix = tmp_path / "data"
    write_dataset(prefix, 4, 10)
    IndexedSamples(str(prefix))
    for suffix in (".bin", ".idx"):
        path = f"{prefix}{suffix}"
        content = Path(path).read_bytes()
        Path(path).write_bytes(content[:-8])
        with pytest.raises(DatasetFormatError, match=f"{suffix} holds {len(content) - 8} bytes but its sidecar says"):
            read_metadata(str(prefix))
        Path(path).write_bytes(content)
    Path(f"{prefix}.meta.json").write_text("{ not json")
    with pytest.raises(DatasetFormatError, match="is not a readable sidecar"):
        read_metadata(str(prefix))


# ------------------------------------------------------------------- 17. paths that leave the folder
def test_image_paths_may_not_leave_the_image_folder(corpus, tmp_path):
    from tests.helpers import random_image

    outside = tmp_path / "outside.png"
    random_image(60, 40, 1).save(outside)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    random_image(60, 40, 2).save(folder / "inside.png")
    ask = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Noise."}]
    records = [{"id": "inside", "image": "inside.png", "conversations": ask},
               {"id": "dotdot", "image": "../outside.png", "conversations": ask},
               {"id": "absolute", "image": str(outside), "conversations": ask},
               {"id": "sneaky", "image": "sub/../../outside.png", "conversations": ask}]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))

    def preprocess(prefix, allow):
        return run(PreprocessJob([str(path)], str(prefix), corpus["tokenizer"], progress=False,
                                 record=RecordConfig("vicuna_v1", VISION, image_folder=str(folder),
                                                     allow_images_outside_folder=allow)))

    summary = preprocess(tmp_path / "strict", False)
    assert summary.samples == 1 and dict(summary.rejected) == {"image_outside_folder": 3}
    assert preprocess(tmp_path / "allowed", True).samples == 4


def test_resynchronisation_at_every_read_boundary(tmp_path, monkeypatch):
    """The same broken lists read in windows of every size from 16 to 200 characters, so that each
    step of the resynchronisation (a nested "]", the "," before a "{") meets a buffer edge."""
    monkeypatch.setattr(sources, "_MAX_RECORD_CHARS", 1024)
    monkeypatch.setattr(sources, "_LOOKBEHIND", 16)
    for breakage in sorted(BREAKAGES):
        elements = [json.dumps(conversation(i), indent=2) for i in range(5)]
        elements[2] = BREAKAGES[breakage](elements[2])
        path = tmp_path / f"{breakage}.json"
        path.write_text("[\n" + ",\n".join(elements) + "\n]\n")
        for chunk in range(16, 201):
            monkeypatch.setattr(sources, "_CHUNK", chunk)
            assert parsed(path)[0] == ["r0", "r1", "r3", "r4"], (breakage, chunk)


def test_a_write_on_a_full_disk_leaves_no_temporary_file(tmp_path):
    """The abort's close flushes again and fails again (the disk is still full): the temporary files
    are removed all the same (they stayed and kept the disk full), the earlier dataset is kept."""
    import resource
    import signal

    prefix = tmp_path / "data"
    write_dataset(prefix, 4, 10)
    before = {suffix: Path(f"{prefix}{suffix}").read_bytes() for suffix in (".bin", ".idx", ".meta.json")}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))  # past 64 KiB each write fails, as on a full disk
    try:
        with pytest.raises(OSError):
            write_dataset(prefix, 4000, 10)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert sorted(os.listdir(tmp_path)) == ["data.bin", "data.idx", "data.meta.json"]
    assert {suffix: Path(f"{prefix}{suffix}").read_bytes() for suffix in before} == before
