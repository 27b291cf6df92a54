"""Preprocessing inputs that once cost more than their own record: JSON the decoder refuses, ids
with no UTF-8 form, byte-order marks, list elements broken mid-way, 32-bit pixels, sidecars that
are not objects."""

import json
import os

import numpy as np
import pytest

from megatron_eve.config import VisionConfig
from megatron_eve.data import sources
from megatron_eve.data.indexed import DatasetFormatError, IndexedSamples, dataset_complete, read_metadata
from megatron_eve.data.preprocess import PreprocessJob, partition_prefix, run
from megatron_eve.data.records import RecordConfig, to_rgb
from megatron_eve.data.sources import Broken, iter_records, parse

VISION = VisionConfig(image_size=672)


def conversation(i, turns=1):
    pairs = [[{"from": "human", "value": f"question {i}.{t}"}, {"from": "gpt", "value": f"answer {i}.{t}"}]
             for t in range(turns)]
    return {"id": f"r{i}", "conversations": [turn for pair in pairs for turn in pair]}


def job(corpus, inputs, prefix, **options):
    return PreprocessJob(inputs=[str(p) for p in inputs], output_prefix=str(prefix),
                         tokenizer_model=corpus["tokenizer"], progress=False,
                         record=RecordConfig(template="vicuna_v1", vision=VISION, image_folder=corpus["root"]),
                         **options)


def read(path):
    """(index, id or the Broken marker) of every record, as the workers see them."""
    out = []
    for index, record in iter_records([str(path)]):
        record = parse(record)
        out.append((index, record if isinstance(record, Broken) else record.get("id")))
    return out


def write_list(path, elements):
    path.write_text("[\n" + ",\n".join(elements) + "\n]\n")


# ------------------------------------------------------------------ JSON the decoder refuses
UNDECODABLE = {
    "nested 100,000 deep": "[" * 100_000 + "]" * 100_000,  # RecursionError
    "5000-digit integer": "1" * 5000,  # ValueError: Exceeds the limit (4300 digits)
}


@pytest.mark.parametrize("kind", sorted(UNDECODABLE))
@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_json_the_decoder_refuses_is_one_broken_record(tmp_path, layout, kind):
    texts = [json.dumps(conversation(i)) for i in range(4)]
    texts[1] = texts[1][:-1] + ', "extra": ' + UNDECODABLE[kind] + "}"
    path = tmp_path / f"input.{layout}"
    if layout == "json":
        write_list(path, texts)
    else:
        path.write_text("\n".join(texts) + "\n")
    out = read(path)
    assert [(i, r) for i, r in out if not isinstance(r, Broken)] == [(0, "r0"), (2, "r2"), (3, "r3")]
    broken = [r for _, r in out if isinstance(r, Broken)]
    assert len(broken) == 1 and broken[0].reason == "invalid_json"
    assert ("nested too deeply" if "nested" in kind else "4300 digits") in broken[0].detail


@pytest.mark.parametrize("workers", [1, 2])
def test_undecodable_records_cost_only_themselves_in_a_run(corpus, tmp_path, workers):
    deep, big = UNDECODABLE["nested 100,000 deep"], UNDECODABLE["5000-digit integer"]
    texts = [json.dumps(conversation(i)) for i in range(6)]
    texts[1] = texts[1][:-1] + ', "extra": ' + deep + "}"
    texts[3] = texts[3][:-1] + ', "extra": ' + big + "}"
    # Parses, but deeper than pickle goes: it cannot be sent to a worker process.
    texts[4] = texts[4][:-1] + ', "extra": ' + "[" * 1200 + "]" * 1200 + "}"
    (tmp_path / "input.jsonl").write_text("\n".join(texts) + "\n")
    write_list(tmp_path / "input.json", texts)
    summary = run(job(corpus, [tmp_path / "input.jsonl", tmp_path / "input.json"], tmp_path / "out",
                      workers=workers))
    data = IndexedSamples(str(tmp_path / "out"))
    from_list = ["r0", "r2", "r5"] if workers > 1 else ["r0", "r2", "r4", "r5"]
    assert [data.get(i)["id"] for i in range(len(data))] == ["r0", "r2", "r4", "r5"] + from_list
    assert summary.rejected["invalid_json"] == 4
    rejects = [json.loads(line) for line in open(tmp_path / "out.rejects.jsonl")]
    assert [r["id"] for r in rejects if r["reason"] == "invalid_json"] == ["#1", "#3", "#7", "#9"]
    if workers > 1:  # one list element too deep to pickle: only itself is lost
        others = [(r["id"], r["reason"]) for r in rejects if r["reason"] != "invalid_json"]
        assert others == [("#10", "unexpected_error")]


# ------------------------------------------------------------------------ ids without UTF-8
def test_an_id_with_a_lone_surrogate_rejects_its_record_only(corpus, tmp_path):
    lines = [json.dumps(conversation(i)) for i in range(3)]
    lines[1] = lines[1].replace('"r1"', '"bad\\ud800id"')  # the escape, as json.dumps writes it
    path = tmp_path / "input.jsonl"
    path.write_text("\n".join(lines) + "\n")
    summary = run(job(corpus, [path], tmp_path / "out"))
    assert summary.samples == 2 and dict(summary.rejected) == {"invalid_id": 1}
    data = IndexedSamples(str(tmp_path / "out"))
    assert [data.get(i)["id"] for i in range(len(data))] == ["r0", "r2"]
    rejects = [json.loads(line) for line in open(tmp_path / "out.rejects.jsonl", encoding="utf-8")]
    assert rejects[0]["id"] == "#1" and "\\ud800" in rejects[0]["detail"]


# ------------------------------------------------------------------------- byte-order marks
@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path, layout):
    texts = [json.dumps(conversation(i)) for i in range(3)]
    text = ("[" + ",".join(texts) + "]") if layout == "json" else "\n".join(texts) + "\n"
    path = tmp_path / f"input.{layout}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert read(path) == [(0, "r0"), (1, "r1"), (2, "r2")]


# ------------------------------------------------------- resuming after a broken list element
@pytest.mark.parametrize("chunk", [1 << 20, 16, 31, 97], ids=["one-read", "reads-16", "reads-31", "reads-97"])
def test_a_broken_element_with_nested_turns_is_one_rejection(tmp_path, monkeypatch, chunk):
    """The reader resumes after the broken element's own end, not at its nested turns: one
    rejection, and every later record keeps its true index."""
    monkeypatch.setattr(sources, "_CHUNK", chunk)
    monkeypatch.setattr(sources, "_LOOKBEHIND", 16)
    records = [conversation(i, turns=2) for i in range(6)]
    records[2] = {"id": "r2", "image": "x.png", "conversations": records[2]["conversations"]}
    # Brackets, quotes and backslashes inside strings must not end the element early.
    records[2]["conversations"][1]["value"] = 'a "quoted" ]} [ { \\ answer'
    records[2]["conversations"][3]["value"] = "ends with a backslash \\"
    elements = [json.dumps(r) for r in records]
    elements[2] = elements[2].replace('"id": "r2", "image"', '"id": "r2" "image"')  # a missing comma
    path = tmp_path / "list.json"
    write_list(path, elements)
    out = read(path)
    assert [(i, r) for i, r in out if not isinstance(r, Broken)] == [(0, "r0"), (1, "r1"), (3, "r3"),
                                                                      (4, "r4"), (5, "r5")]
    assert len(out) == 6 and isinstance(out[2][1], Broken)


def test_an_element_that_never_closes_falls_back_to_the_next_record(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_MAX_RECORD_CHARS", 1024)
    elements = [json.dumps(conversation(i)) for i in range(40)]
    elements[2] = elements[2][:-3]  # unbalanced: the reader cannot find its end
    path = tmp_path / "list.json"
    write_list(path, elements)
    ids = [r for _, r in read(path) if not isinstance(r, Broken)]
    assert ids == [f"r{i}" for i in range(40) if i != 2]


# ---------------------------------------------------------------------- 32-bit integer pixels
def test_32_bit_integer_pixels_are_scaled_by_their_depth(tmp_path):
    from PIL import Image

    ramp = np.linspace(0, 1, 64 * 80).reshape(64, 80)
    for white in (255, 65535, 2**31 - 1):  # 8-bit, 16-bit and 32-bit data in mode I
        path = tmp_path / f"ramp{white}.tiff"
        Image.fromarray(np.rint(ramp * white).astype(np.int32)).save(path)
        with Image.open(path) as image:
            assert image.mode == "I"
            image.load()
            grey = np.asarray(to_rgb(image))[..., 0].astype(float)
        assert np.abs(grey - np.rint(ramp * 255)).max() <= 1, white  # a ramp, not a white page
    negative = Image.fromarray(np.full((4, 4), -5, dtype=np.int32))
    assert np.asarray(to_rgb(negative)).max() == 0


def test_sixteen_bit_pixels_are_scaled_in_integers_without_float_copies():
    """to_rgb of a 5-megapixel 16-bit image: the same 8 bits as value * 255 / 65535 rounded, with a
    peak of one 64-bit copy (float copies per step took 3 of them)."""
    import tracemalloc

    from PIL import Image

    values = np.random.default_rng(0).integers(0, 65536, size=(2000, 2500)).astype(np.uint16)
    image = Image.frombytes("I;16", (2500, 2000), values.tobytes())
    tracemalloc.start()
    grey = np.asarray(to_rgb(image))[..., 0]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.array_equal(grey, np.rint(values * (255 / 65535)).astype(np.uint8))
    assert peak < 2000 * 2500 * 8 * 1.5, peak


def _record(image_turn, images):
    turns = [{"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "Red."}]
    if image_turn == "leading gpt":
        turns = [{"from": "gpt", "value": "<image>\nHello."}] + turns
        turns[1]["value"] = "<image>\n" * (len(images) - 1) + turns[1]["value"]
    else:
        turns[0]["value"] = "<image>\n" * len(images) + turns[0]["value"]
    return {"id": "r", "image": images if len(images) > 1 else images[0], "conversations": turns}


def test_an_image_in_a_leading_gpt_turn_the_template_drops_goes_unused(corpus):
    """The reference drops a leading gpt turn, <image> and all, and then uses that image nowhere
    (its text trains): stored without it, every image kept has its positions (was: stored with the
    image and no position, then left out as damaged at training time)."""
    from megatron_eve.data.dataset import sample_problem
    from megatron_eve.data.records import Sample, decode_image, process_record
    from megatron_eve.data.tokenizer import Tokenizer
    from megatron_eve.model.visual_layout import IMAGE_TOKEN_INDEX

    tokenizer = Tokenizer(corpus["tokenizer"])
    images = sorted(name for name in os.listdir(os.path.join(corpus["root"], "images")))[:2]
    images = [f"images/{name}" for name in images]
    config = RecordConfig(template="vicuna_v1", vision=VISION, image_folder=corpus["root"], max_images=2)

    def stored(record):
        sample = process_record(record, 0, config, tokenizer)
        assert isinstance(sample, Sample), sample
        arrays = {"tokens": sample.tokens, "labels": sample.labels, "image_grids": [], "teacher_images": []}
        for data in sample.images:
            height, width = decode_image(data).shape[:2]
            arrays["image_grids"].append((height // VISION.token_cell, width // VISION.token_cell))
            arrays["teacher_images"].append(None)
        assert sample_problem(arrays) == "", sample_problem(arrays)
        return sample

    alone = stored(_record("leading gpt", images[:1]))
    assert alone.images == [] and IMAGE_TOKEN_INDEX not in alone.tokens and (alone.labels >= 0).any()
    second = stored(_record("leading gpt", images))  # the first image's <image> went with the turn
    assert len(second.images) == 1 and second.images == stored(_record("human", images[1:])).images


def test_an_image_pillow_only_warns_about_is_kept_and_a_bomb_is_named_too_large(corpus, tmp_path, monkeypatch):
    """As the reference's Image.open(...).convert("RGB"): up to twice MAX_IMAGE_PIXELS Pillow only
    warns (a 108 MP photo): kept; beyond, its DecompressionBombError rejects that record, as
    image_too_large (was corrupt_image, and already at the warning)."""
    from PIL import Image

    from megatron_eve.data.records import Rejection, Sample, process_record
    from megatron_eve.data.tokenizer import Tokenizer

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for side in (40, 50):  # 1600 pixels: a warning; 2500: past twice the limit
        Image.new("RGB", (side, side), (200, 10, 10)).save(tmp_path / f"{side}.png")
    config = RecordConfig(template="vicuna_v1", vision=VISION, image_folder=str(tmp_path))
    tokenizer = Tokenizer(corpus["tokenizer"])
    assert isinstance(process_record(_record("human", ["40.png"]), 0, config, tokenizer), Sample)
    rejected = process_record(_record("human", ["50.png"]), 0, config, tokenizer)
    assert isinstance(rejected, Rejection) and rejected.reason == "image_too_large", rejected


# ------------------------------------------------------------------ sidecars that are not objects
def test_a_sidecar_that_is_a_json_list_is_not_a_dataset(corpus, tmp_path):
    records = json.load(open(corpus["qa"]))[:6]
    path = tmp_path / "input.json"
    path.write_text(json.dumps(records))
    prefix = tmp_path / "many"
    run(job(corpus, [path], prefix, partitions=2, keep_parts=True))
    part = partition_prefix(str(prefix), 0, 2)
    for text in ("[]", '{"format": "megatron_eve.indexed/1", "files": [], "counts": {}}'):
        with open(part + ".meta.json", "w") as handle:
            handle.write(text)
        with pytest.raises(DatasetFormatError, match="preprocess the data again"):
            read_metadata(part)
        assert not dataset_complete(part)
    # A resumed partitioned run redoes that part instead of failing on it.
    assert run(job(corpus, [path], prefix, partitions=2, keep_parts=True)).samples == 6
    assert read_metadata(part)["counts"]["samples"] == 3


# ------------------------------------------------------------ the synthetic corpus (quick-start input)
def test_the_synthetic_corpus_replaces_only_its_own_folder_and_whole(tmp_path, monkeypatch, capsys):
    from tools import make_synthetic_corpus as tool

    def make(out, *flags):
        return tool.main(["--out", str(out), "--captions", "3", "--qa", "3", "--held-out", "2",
                          "--teacher-preset", "", "--tokenizer-vocab", "400", *flags])

    def contents(folder):
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    user = tmp_path / "user"
    user.mkdir()
    (user / "caption.json").write_text("my captions")
    assert make(user) == 1
    assert "error:" in capsys.readouterr().err and contents(user) == {"caption.json": b"my captions"}
    corpus = tmp_path / "corpus"
    assert make(corpus) == 0 and (corpus / tool.MARKER).is_file()
    assert make(corpus) == 0  # our own corpus: replaced without --overwrite
    before = contents(corpus)

    def fails(*args, **kwargs):
        raise RuntimeError("trainer_interface.cc(1) [x] tokenizer training failed")

    monkeypatch.setattr(tool, "train_tokenizer", fails)
    assert make(corpus, "--seed", "5") == 2
    assert capsys.readouterr().err.strip().endswith("no tokenizer can be trained (tokenizer training failed)")
    assert contents(corpus) == before  # a failed rerun leaves the earlier corpus whole
    monkeypatch.undo()
    assert make(user, "--overwrite", "--tokenizer-vocab", "3000") == 0 and (user / tool.MARKER).is_file()
    assert sorted(os.listdir(tmp_path)) == ["corpus", "user"]  # no staging folder left behind
    import sentencepiece

    pieces = sentencepiece.SentencePieceProcessor(model_file=str(user / "tokenizer.model")).vocab_size()
    assert pieces < 3000 and f"tokenizer.model ({pieces} pieces)" in capsys.readouterr().out  # what it holds
    for flags, message in ((["--captions", "-5"], "--captions must not be negative, got -5"),
                           (["--text-only-fraction", "2"], "--text-only-fraction must be in [0, 1], got 2.0")):
        with pytest.raises(SystemExit) as exit_code:
            make(tmp_path / "never", *flags)
        assert exit_code.value.code == 2 and capsys.readouterr().err.strip().endswith(message)
    assert not (tmp_path / "never").exists()
