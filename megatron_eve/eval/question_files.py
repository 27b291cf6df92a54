"""Question files ({"question_id", "image", "text", ...} lines) from the benchmarks' own files, with
the prompt EVE's scripts ask (`eval_vqa.py questions`): QUESTION_SOURCES maps each benchmark to
its reader. MMBench's TSV carries its images (base64): they are decoded into the image folder."""

from __future__ import annotations

import base64
import binascii
import os
from typing import Callable, Dict, List, Optional

from megatron_eve.atomic import OutputRefused, write_bytes
from megatron_eve.eval.answer_files import report, warn
from megatron_eve.eval.benchmarks.files import BenchmarkFileError
from megatron_eve.eval.benchmarks.gqa import gqa_questions, load_gqa
from megatron_eve.eval.benchmarks.mmbench import mmbench_prompt, read_mmbench
from megatron_eve.eval.benchmarks.mme import load_mme, mme_questions
from megatron_eve.eval.benchmarks.scienceqa import scienceqa_questions
from megatron_eve.eval.benchmarks.seed import load_seed, seed_key, seed_questions


def mmbench_questions(source: str, image_folder: Optional[str], lang: str = "en", overwrite: bool = False
                      ) -> List[dict]:
    """MMBench's TSV → its questions as model_vqa_mmbench.py asks them (`mmbench_prompt`), each
    image written into `image_folder` as <index>.<png|jpg>; a row whose index cannot name a file,
    or whose image is not base64, is reported (file:line) and left out. An image file already
    there with other bytes is not ours to replace: refused (OutputRefused) before anything is
    written, unless `overwrite`; one with the same bytes is kept as it is."""
    if not image_folder:
        raise BenchmarkFileError("--benchmark mmbench needs --image-folder (the TSV's images are "
                                 "written there)")
    _, rows = read_mmbench(source)
    out, problems, images = [], [], []
    for number, row in enumerate(rows, 2):
        if not row["index"] or os.path.basename(row["index"]) != row["index"] or row["index"] in (".", ".."):
            problems.append(f"{source}:{number}: index {row['index']!r} cannot name an image file")
            continue
        raw = _base64_image(row.get("image"))
        if raw is None:
            problems.append(f"{source}:{number}: index {row['index']}: the image is not base64")
            continue
        name = f"{row['index']}.png" if raw.startswith(b"\x89PNG") else f"{row['index']}.jpg"
        images.append((number, name))
        text, letters = mmbench_prompt(row, lang)
        out.append({"question_id": seed_key(row["index"]), "image": name, "text": text,
                    "option_char": letters, "category": row.get("category")})
    report(problems)
    _check_images(image_folder, images, rows, overwrite)
    for number, name in images:  # decoded again: 4,000 images need not all be held at once
        path = os.path.join(image_folder, name)
        raw = _base64_image(rows[number - 2].get("image"))
        if not (os.path.isfile(path) and _same_bytes(path, raw)):
            write_bytes(path, raw)
    return out


def _base64_image(data) -> Optional[bytes]:
    """One of MMBench's base64 images, decoded; None when it is not base64 (or empty)."""
    try:
        return base64.b64decode(data or "", validate=False) or None
    except (binascii.Error, ValueError):
        return None


def _same_bytes(path: str, data: bytes) -> bool:
    if os.path.getsize(path) != len(data):
        return False
    with open(path, "rb") as handle:
        return handle.read() == data


def _check_images(folder: str, images, rows, overwrite: bool) -> None:
    """Refuse writing an image over a folder, or over a file with other bytes (unless `overwrite`)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OutputRefused(f"--image-folder {folder} is a file: name a folder")
    clashes = []
    for number, name in images:
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            raise OutputRefused(f"--image-folder {folder}: {name} is a folder, where the TSV's image goes")
        if not overwrite and os.path.exists(path) and not _same_bytes(path, _base64_image(rows[number - 2]["image"])):
            clashes.append(name)
    if clashes:
        raise OutputRefused(f"--image-folder {folder} already holds {len(clashes)} other files under the names of the "
                            f"TSV's images (e.g. {', '.join(clashes[:3])}): choose another --image-folder, or pass "
                            f"--overwrite to replace them")


def mme_source_questions(source: str) -> List[dict]:
    """MME's questions that have an image; those without one are named in a warning and counted."""
    questions = load_mme(source)
    imageless = [q for q in questions if q.image is None]
    if imageless:
        files = list(dict.fromkeys(f"{q.category}/{q.file}" for q in imageless))
        warn(f"{len(imageless)} of {len(questions)} MME questions are left out: their image is not in {source} "
             f"(e.g. beside {', '.join(files[:3])})")
    return mme_questions(questions)


# benchmark → its question rows from (source, image folder, language, overwrite); "questions --benchmark" choices
QUESTION_SOURCES: Dict[str, Callable[[str, Optional[str], str, bool], List[dict]]] = {
    "mmbench": mmbench_questions,
    "mme": lambda source, image_folder, lang, overwrite: mme_source_questions(source),  # the release folder
    "gqa": lambda source, image_folder, lang, overwrite: gqa_questions(load_gqa(source)),  # its questions json
    "seed": lambda source, image_folder, lang, overwrite: seed_questions(load_seed(source)),  # SEED-Bench.json
    "scienceqa": lambda source, image_folder, lang, overwrite: scienceqa_questions(source),  # llava_test_CQM-A.json
}
