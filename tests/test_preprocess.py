"""tools/preprocess_data.py: round trip, workers and partitions, bad input, atomic output."""

import dataclasses
import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_eve.config import VisionConfig
from megatron_eve.data.images import image_layout, teacher_layout, tokens_per_image
from megatron_eve.data.indexed import DatasetFormatError, IndexedSamples
from megatron_eve.data.preprocess import NoSampleError, PreprocessJob, partition_prefix, run
from megatron_eve.data.records import RecordConfig
from megatron_eve.data.templates import apply_template
from megatron_eve.data.tokenizer import Tokenizer
from megatron_eve.model.visual_layout import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from tests.helpers import ROOT

VISION = VisionConfig(image_size=672)
TOOL = str(ROOT / "tools" / "preprocess_data.py")


def job(corpus, inputs, prefix, template, **record):
    return PreprocessJob(
        inputs=inputs, output_prefix=str(prefix), tokenizer_model=corpus["tokenizer"],
        record=RecordConfig(template=template, vision=VISION, image_folder=corpus["root"], **record),
        progress=False,
    )


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, TOOL, "--no-progress", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def expected(record, template, tok):
    """The record through the template, placeholders expanded from the image's size."""
    from PIL import Image

    images = [Image.open(os.path.join(os.path.dirname(tok.model_path), record["image"]))] if "image" in record else []
    out = apply_template(template, record["conversations"], tok, len(images))
    grids = [(image_layout(*im.size, VISION).height // 28, image_layout(*im.size, VISION).width // 28) for im in images]
    tokens, labels = [], []
    for token, label in zip(out.tokens, out.labels):
        if token == IMAGE_TOKEN_INDEX:
            n = tokens_per_image(*grids.pop(0))
            tokens += [token] * n
            labels += [IGNORE_INDEX] * n
        else:
            tokens.append(token)
            labels.append(label)
    return tokens, labels, images


@pytest.mark.parametrize("kind, template", [("captions", "plain"), ("qa", "vicuna_v1")])
def test_round_trip(corpus, tmp_path, kind, template):
    summary = run(job(corpus, [corpus[kind]], tmp_path / kind, template, image_codec="png"))
    records = json.load(open(corpus[kind]))
    assert summary.samples == len(records) and not summary.rejected
    data = IndexedSamples(str(tmp_path / kind))
    tok = Tokenizer(corpus["tokenizer"])
    assert len(data) == len(records)
    for index, record in enumerate(records):
        sample = data.get(index)
        tokens, labels, images = expected(record, template, tok)
        assert sample["id"] == record["id"]
        assert sample["tokens"].tolist() == tokens and sample["labels"].tolist() == labels
        assert data.lengths[index] == len(tokens)
        for image, crop, teacher, grid in zip(images, sample["images"], sample["teacher_images"], sample["image_grids"]):
            layout, base = image_layout(*image.size, VISION), teacher_layout(*image.size, VISION)
            assert crop.shape == (layout.height, layout.width, 3)
            assert teacher.shape == (base.height, base.width, 3)
            # PNG is lossless: exactly the reference's bicubic resize.
            reference = np.asarray(image.convert("RGB").resize((layout.width, layout.height), 3))
            assert np.array_equal(crop, reference)
            assert tokens.count(IMAGE_TOKEN_INDEX) == tokens_per_image(*grid)
    meta = data.metadata
    assert meta["template"] == template and meta["image_size"] == 672
    assert meta["tokenizer_sha256"] == tok.checksum


def test_jpeg_storage_is_close_to_lossless(corpus, tmp_path):
    run(job(corpus, [corpus["captions"]], tmp_path / "jpeg", "plain"))
    run(job(corpus, [corpus["captions"]], tmp_path / "png", "plain", image_codec="png"))
    jpeg, png = IndexedSamples(str(tmp_path / "jpeg")), IndexedSamples(str(tmp_path / "png"))
    a, b = jpeg.get(0)["images"][0].astype(float), png.get(0)["images"][0].astype(float)
    assert a.shape == b.shape and np.abs(a - b).mean() < 2.0  # quality 95, 4:4:4


def test_stored_crops_are_pixels_only_and_the_same_bytes_each_run(corpus, tmp_path):
    """A source's metadata is not stored with its crops: Pillow's LAB -> RGB attaches an sRGB ICC
    profile stamped with the clock, which made two runs a second apart write different bytes."""
    import io

    from PIL import Image

    Image.new("LAB", (40, 30), (60, 80, 20)).save(tmp_path / "lab.tif")
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"id": "lab", "image": "lab.tif", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a red square"}]}]))
    for name in ("first", "second"):
        run(PreprocessJob(inputs=[str(records)], output_prefix=str(tmp_path / name), tokenizer_model=corpus["tokenizer"],
                          record=RecordConfig(template="plain", vision=VISION, image_folder=str(tmp_path),
                                              image_codec="png"), progress=False))
        time.sleep(1.1)  # the profile's creation time counts seconds
    assert filecmp.cmp(tmp_path / "first.bin", tmp_path / "second.bin", shallow=False)
    from megatron_eve.data.records import _crop, encode_image

    with Image.open(tmp_path / "lab.tif") as image:
        rgb = image.convert("RGB")
    assert "icc_profile" in rgb.info  # what was stored with every crop
    crop = Image.open(io.BytesIO(encode_image(_crop(rgb, image_layout(40, 30, VISION)), "png", 95)))
    assert "icc_profile" not in crop.info


def test_workers_and_partitions_give_identical_files(corpus, tmp_path):
    single = cli("--input", corpus["qa"], "--image-folder", corpus["root"], "--template", "vicuna_v1",
                 "--tokenizer-model", corpus["tokenizer"], "--output-prefix", tmp_path / "one")
    assert single.returncode == 0, single.stderr
    split = cli("--input", corpus["qa"], "--image-folder", corpus["root"], "--template", "vicuna_v1",
                "--tokenizer-model", corpus["tokenizer"], "--output-prefix", tmp_path / "many",
                "--workers", 2, "--partitions", 3)
    assert split.returncode == 0, split.stderr
    for suffix in (".bin", ".idx"):
        assert filecmp.cmp(f"{tmp_path}/one{suffix}", f"{tmp_path}/many{suffix}", shallow=False)
    assert "40 samples written" in split.stdout
    assert sorted(os.listdir(tmp_path)) == sorted(f"{name}{suffix}" for name in ("one", "many") for suffix in (
        ".bin", ".idx", ".meta.json", ".rejects.jsonl"))  # the merged parts removed: a second copy

    # A rerun finds finished partitions (kept) and redoes only an unfinished one.
    def kept_parts():
        return cli("--input", corpus["qa"], "--image-folder", corpus["root"], "--template", "vicuna_v1",
                   "--tokenizer-model", corpus["tokenizer"], "--output-prefix", tmp_path / "many", "--partitions", 3,
                   "--keep-parts")

    assert kept_parts().returncode == 0
    second = partition_prefix(str(tmp_path / "many"), 1, 3)
    os.remove(second + ".meta.json")
    kept = os.path.getmtime(partition_prefix(str(tmp_path / "many"), 0, 3) + ".bin")
    again = kept_parts()
    assert again.returncode == 0, again.stderr
    assert os.path.getmtime(partition_prefix(str(tmp_path / "many"), 0, 3) + ".bin") == kept
    assert filecmp.cmp(f"{tmp_path}/one.bin", f"{tmp_path}/many.bin", shallow=False)


def write_bad_corpus(corpus, root):
    """Valid records interleaved with one record of every bad kind, as JSON Lines."""
    folder = f"bad_images_{root.name}"  # beside the corpus, which is the --image-folder
    images = Path(corpus["root"]) / folder
    images.mkdir()
    (images / "corrupt.png").write_bytes(b"this is not an image")
    good_png = os.path.join(corpus["root"], json.load(open(corpus["captions"]))[0]["image"])
    from PIL import Image

    Image.open(good_png).convert("RGB").save(images / "full.jpg", quality=90)
    data = (images / "full.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(data[: len(data) // 2])
    ask = lambda text="<image>\nWhat is it?": [{"from": "human", "value": text}, {"from": "gpt", "value": "A shape."}]  # noqa: E731
    good = json.load(open(corpus["qa"]))[:6]
    bad = [
        ("missing_image", {"id": "missing", "image": "nowhere.png", "conversations": ask()}),
        ("corrupt_image", {"id": "corrupt", "image": f"{folder}/corrupt.png", "conversations": ask()}),
        ("truncated_image", {"id": "truncated", "image": f"{folder}/truncated.jpg", "conversations": ask()}),
        ("unknown_role", {"id": "role", "conversations": [{"from": "system", "value": "x"}]}),
        ("empty_conversation", {"id": "empty", "conversations": []}),
        ("too_many_images", {"id": "two", "image": [good[0]["image"]] * 2,
                             "conversations": ask("<image><image>\nCompare.")}),
        ("image_token_mismatch", {"id": "noplaceholder", "image": good[0]["image"], "conversations": ask("What?")}),
        ("too_long", {"id": "long", "conversations": ask("word " * 3000)}),
        ("malformed_record", {"id": "noconv"}),
    ]
    lines = []
    for i, record in enumerate(good):
        lines.append(json.dumps(record))
        if i < len(bad):
            lines.append(json.dumps(bad[i][1]))
    for _, record in bad[len(good):]:
        lines.append(json.dumps(record))
    lines.insert(3, '{"id": "broken json", "conversations": [')
    path = root / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    reasons = {reason: 1 for reason, _ in bad}
    reasons["invalid_json"] = 1
    return str(path), good, reasons


def test_bad_input_is_skipped_counted_and_listed(corpus, tmp_path):
    path, good, reasons = write_bad_corpus(corpus, tmp_path)
    result = cli("--input", path, "--image-folder", corpus["root"], "--template", "vicuna_v1",
                 "--tokenizer-model", corpus["tokenizer"], "--output-prefix", tmp_path / "out",
                 "--max-length", 2048)
    assert result.returncode == 0, result.stderr
    data = IndexedSamples(str(tmp_path / "out"))
    assert [data.get(i)["id"] for i in range(len(data))] == [r["id"] for r in good]  # valid ones intact
    assert data.metadata["rejected"] == reasons
    rejects = [json.loads(line) for line in open(tmp_path / "out.rejects.jsonl")]
    assert sorted(r["reason"] for r in rejects) == sorted(reasons)
    assert {r["id"] for r in rejects if r["reason"] == "missing_image"} == {"missing"}
    assert all(r["detail"] for r in rejects)
    for reason in reasons:
        assert reason in result.stdout  # the closing summary names every reason


def test_over_long_samples_can_be_truncated(corpus, tmp_path):
    record = {"id": "long", "conversations": [{"from": "human", "value": "word " * 3000},
                                              {"from": "gpt", "value": "ok"}]}
    path = tmp_path / "long.json"
    path.write_text(json.dumps([record]))
    # Truncation cuts the answer off, so nothing is left to learn from: the sample is refused.
    with pytest.raises(NoSampleError) as failure:
        run(job(corpus, [str(path)], tmp_path / "t", "vicuna_v1", max_length=512, over_length="truncate"))
    assert failure.value.rejected == {"no_supervised_tokens": 1}
    record["conversations"] = [{"from": "human", "value": "<image>\nWhat?"},
                               {"from": "gpt", "value": "word " * 3000}]
    record["image"] = json.load(open(corpus["captions"]))[0]["image"]
    path.write_text(json.dumps([record]))
    summary = run(job(corpus, [str(path)], tmp_path / "t2", "vicuna_v1", max_length=900, over_length="truncate"))
    assert summary.samples == 1
    sample = IndexedSamples(str(tmp_path / "t2")).get(0)
    assert len(sample["tokens"]) == 900 and len(sample["images"]) == 1


def test_nothing_valid_or_unreadable_input_fails(corpus, tmp_path):
    path = tmp_path / "all_bad.jsonl"
    path.write_text('{"id": 1, "conversations": []}\nnot json\n')
    result = cli("--input", path, "--template", "vicuna_v1", "--tokenizer-model", corpus["tokenizer"],
                 "--output-prefix", tmp_path / "none")
    assert result.returncode == 1 and "no valid sample" in result.stderr
    result = cli("--input", tmp_path / "absent.json", "--template", "plain", "--tokenizer-model",
                 corpus["tokenizer"], "--output-prefix", tmp_path / "absent")
    assert result.returncode == 1 and "cannot read input" in result.stderr
    assert not os.path.exists(tmp_path / "absent.bin")


def test_interrupted_run_leaves_nothing_that_looks_complete(corpus, tmp_path):
    records = json.load(open(corpus["qa"])) * 40  # long enough to be caught mid-run
    path = tmp_path / "many.json"
    path.write_text(json.dumps(records))
    prefix = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, TOOL, "--no-progress", "--input", str(path), "--image-folder",
                             corpus["root"], "--template", "vicuna_v1", "--tokenizer-model", corpus["tokenizer"],
                             "--output-prefix", str(prefix)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not os.path.exists(f"{prefix}.bin.tmp") and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(f"{prefix}.bin.tmp")
    for suffix in (".bin", ".idx", ".meta.json"):
        assert not os.path.exists(f"{prefix}{suffix}")
    with pytest.raises(DatasetFormatError, match="incomplete"):
        IndexedSamples(str(prefix))
    shutil.rmtree(tmp_path, ignore_errors=True)


# ------------------------------------------------------------- runs that fail keep what was there
def all_missing_images(corpus, root):
    """Records whose images are all absent (as with a typo in --image-folder)."""
    records = json.load(open(corpus["captions"]))[:4]
    path = root / "typo.json"
    path.write_text(json.dumps([{**r, "image": "typo/" + r["image"]} for r in records]))
    return str(path)


def files_of(prefix):
    return {suffix: Path(f"{prefix}{suffix}").read_bytes()
            for suffix in (".bin", ".idx", ".meta.json", ".rejects.jsonl") if os.path.exists(f"{prefix}{suffix}")}


def test_a_run_without_samples_replaces_no_dataset(corpus, tmp_path):
    from megatron_eve.data.preprocess import FAILED_REJECTS_SUFFIX

    prefix = tmp_path / "data"
    run(job(corpus, [corpus["captions"]], prefix, "plain"))
    good = files_of(prefix)
    typo = all_missing_images(corpus, tmp_path)
    for partitions in (1, 3, 6):  # 6 parts of 4 records: empty parts are legal, an empty merge is not
        with pytest.raises(NoSampleError, match=r"4 records rejected \(missing_image 4\)") as failure:
            run(dataclasses.replace(job(corpus, [typo], prefix, "plain"), partitions=partitions))
        assert files_of(prefix) == good  # the good dataset and its rejects list, untouched
        assert failure.value.rejects_path == f"{prefix}{FAILED_REJECTS_SUFFIX}"
        assert len(open(failure.value.rejects_path).readlines()) == 4
        assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    IndexedSamples(str(prefix))
    # Where no dataset is, the rejects list takes its usual name; no dataset file appears.
    result = cli("--input", typo, "--image-folder", corpus["root"], "--template", "plain", "--tokenizer-model",
                 corpus["tokenizer"], "--output-prefix", tmp_path / "fresh")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: no valid sample for {tmp_path}/fresh: 4 records rejected (missing_image 4), listed in "
        f"{tmp_path}/fresh.rejects.jsonl; nothing was written at {tmp_path}/fresh"]
    names = sorted(name for name in os.listdir(tmp_path) if "_part" not in name)
    assert names == sorted(["data.bin", "data.idx", "data.meta.json", "data.rejects.jsonl",
                            "data" + FAILED_REJECTS_SUFFIX, "typo.json", "fresh.rejects.jsonl"])


def test_files_not_ours_at_the_prefix_need_overwrite(corpus, tmp_path):
    from megatron_eve.data.preprocess import OutputError

    prefix = tmp_path / "megatron"
    for suffix in (".bin", ".idx"):  # a megatron-LM dataset: no sidecar of ours
        Path(f"{prefix}{suffix}").write_bytes(b"not ours")
    with pytest.raises(OutputError, match=r"found \.bin, \.idx but no complete dataset of this tool.*--overwrite"):
        run(job(corpus, [corpus["captions"]], prefix, "plain"))
    assert Path(f"{prefix}.bin").read_bytes() == b"not ours" and not os.path.exists(f"{prefix}.rejects.jsonl")
    run(dataclasses.replace(job(corpus, [corpus["captions"]], prefix, "plain"), overwrite=True))
    assert len(IndexedSamples(str(prefix))) == 40
    # Our own complete dataset is replaced without the flag.
    assert run(job(corpus, [corpus["qa"]], prefix, "vicuna_v1")).samples == 40


def test_a_failed_run_leaves_no_temporary_rejects_list(corpus, tmp_path, monkeypatch):
    from megatron_eve.data import preprocess

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(preprocess.SampleWriter, "finalize", full_disk)
    with pytest.raises(OSError, match="No space left"):
        run(job(corpus, [corpus["captions"]], tmp_path / "one", "plain"))
    monkeypatch.undo()
    monkeypatch.setattr(preprocess.SampleWriter, "add_prefix", full_disk)  # the merge of partitions
    with pytest.raises(OSError, match="No space left"):
        run(dataclasses.replace(job(corpus, [corpus["captions"]], tmp_path / "many", "plain"), partitions=2))
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    assert not os.path.exists(tmp_path / "one.rejects.jsonl") and not os.path.exists(tmp_path / "many.rejects.jsonl")


# ------------------------------------------------------------------------ one error line, no traceback
@pytest.mark.parametrize("flags, message", [
    (["--max-length", "-5"], "error: --max-length must be at least 1, got -5"),
    (["--max-images", "0"], "error: --max-images must be at least 1, got 0"),
    (["--workers", "0"], "error: --workers must be at least 1, got 0"),
    (["--partitions", "-1"], "error: --partitions must be at least 1, got -1"),
    (["--jpeg-quality", "101"], "error: --jpeg-quality must be 1..100, got 101"),
    # A typo'd folder: every record with an image rejected, the text-only ones written as the dataset.
    (["--image-folder", "/nonexistent/imagse"], "error: --image-folder /nonexistent/imagse is not a folder"),
])
def test_flags_out_of_range_are_one_error_line(corpus, tmp_path, capsys, flags, message):
    from tools.preprocess_data import main

    code = main(["--input", corpus["captions"], "--template", "plain", "--tokenizer-model", corpus["tokenizer"],
                 "--output-prefix", str(tmp_path / "out"), "--no-progress", *flags])
    assert code == 2 and capsys.readouterr().err.strip() == message
    assert not os.listdir(tmp_path)


def test_unusable_files_are_one_error_line(corpus, tmp_path, capsys):
    from tools.preprocess_data import main

    bad_model = tmp_path / "bad.model"
    bad_model.write_bytes(b"not a sentencepiece model")
    args = ["--input", corpus["captions"], "--template", "plain", "--no-progress"]
    assert main([*args, "--tokenizer-model", str(bad_model), "--output-prefix", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip() == (f"error: --tokenizer-model {bad_model}: not a SentencePiece model "
                                               f"(INTERNAL: could not parse ModelProto from {bad_model})")
    under_a_file = tmp_path / "bad.model" / "out"
    assert main([*args, "--tokenizer-model", corpus["tokenizer"], "--output-prefix", str(under_a_file)]) == 1
    expected = f"error: --output-prefix {under_a_file}: {bad_model} is a file, not a folder"
    assert capsys.readouterr().err.strip() == expected
