"""Question files ({"question_id", "image", "text", ...} lines) from the benchmarks' own files, with
the prompt EVE's scripts ask (`eval_vqa.py questions`): QUESTION_SOURCES maps each benchmark to
its reader. MMBench's TSV carries its images (base64): they are decoded into the image folder."""

from __future__ import annotations

import base64
import binascii
import os
from typing import Callable, Dict, List, Optional

from megatron_eve.atomic import write_bytes
from megatron_eve.eval.answer_files import report
from megatron_eve.eval.benchmarks.files import BenchmarkFileError
from megatron_eve.eval.benchmarks.gqa import gqa_questions, load_gqa
from megatron_eve.eval.benchmarks.mmbench import mmbench_prompt, read_mmbench
from megatron_eve.eval.benchmarks.mme import load_mme, mme_questions
from megatron_eve.eval.benchmarks.seed import load_seed, seed_key, seed_questions


def mmbench_questions(source: str, image_folder: Optional[str], lang: str = "en") -> List[dict]:
    """MMBench's TSV → its questions as model_vqa_mmbench.py asks them (`mmbench_prompt`), each
    image written into `image_folder` as <index>.<png|jpg>; a row whose index cannot name a file,
    or whose image is not base64, is reported (file:line) and left out."""
    if not image_folder:
        raise BenchmarkFileError("--benchmark mmbench needs --image-folder (the TSV's images are "
                                 "written there)")
    _, rows = read_mmbench(source)
    out, problems = [], []
    for number, row in enumerate(rows, 2):
        if not row["index"] or os.path.basename(row["index"]) != row["index"] or row["index"] in (".", ".."):
            problems.append(f"{source}:{number}: index {row['index']!r} cannot name an image file")
            continue
        image = _save_base64_image(row.get("image"), image_folder, row["index"])
        if image is None:
            problems.append(f"{source}:{number}: index {row['index']}: the image is not base64")
            continue
        text, letters = mmbench_prompt(row, lang)
        out.append({"question_id": seed_key(row["index"]), "image": image, "text": text,
                    "option_char": letters, "category": row.get("category")})
    report(problems)
    return out


def _save_base64_image(data, folder, index):
    """Decode one of MMBench's base64 images into `folder` as <index>.<png|jpg>; its name, or None."""
    try:
        raw = base64.b64decode(data or "", validate=False)
    except (binascii.Error, ValueError):
        return None
    if not raw:
        return None
    name = f"{index}.png" if raw.startswith(b"\x89PNG") else f"{index}.jpg"
    write_bytes(os.path.join(folder, name), raw)
    return name


# benchmark → its question rows from (source, image folder, language); "questions --benchmark" choices
QUESTION_SOURCES: Dict[str, Callable[[str, Optional[str], str], List[dict]]] = {
    "mmbench": mmbench_questions,
    "mme": lambda source, image_folder, lang: mme_questions(load_mme(source)),  # the release folder
    "gqa": lambda source, image_folder, lang: gqa_questions(load_gqa(source)),  # its questions json
    "seed": lambda source, image_folder, lang: seed_questions(load_seed(source)),  # SEED-Bench.json
}
