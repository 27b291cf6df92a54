"""MMBench: its TSV as pandas reads it, model_vqa_mmbench.py's prompt, convert_mmbench_for_submission.py's table."""

from __future__ import annotations

import csv
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_eve.eval.benchmarks.files import BenchmarkFileError
from megatron_eve.eval.prompts import OPTION_SUFFIX, OPTION_SUFFIX_CN


MMBENCH_OPTIONS = ("A", "B", "C", "D")
# pandas.read_table's default missing-value strings (pandas 2): LLaVA reads the TSV with it, so a
# cell holding one of these is NaN there, and an option that is NaN ends the option list.
PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
             "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
# The columns convert_mmbench_for_submission.py drops before adding "prediction" as the 7th.
MMBENCH_DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")


def mmbench_missing(value: Optional[str]) -> bool:
    """model_vqa_mmbench.py's is_none on a cell pandas read: NaN (see PANDAS_NA), or "nan" / "none"
    in any case."""
    return value is None or value in PANDAS_NA or value.lower() in ("nan", "none")


def read_mmbench(path: str) -> Tuple[List[str], List[Dict[str, str]]]:
    """MMBench's TSV (mmbench_dev_20230712.tsv ...): its columns and rows (cells as text); it must
    have index, question and A / B; images are base64 in "image"."""
    csv.field_size_limit(sys.maxsize)  # a base64 image is longer than csv's default limit
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t")
            header = next(reader, None)
            # a short line's missing cells are empty, as pandas makes them NaN
            rows = [dict(zip(header, cells + [""] * (len(header) - len(cells)))) for cells in reader if cells
                    ] if header else []
    except OSError as error:
        raise BenchmarkFileError(f"{path}: cannot be read ({error.strerror or error})") from None
    except (csv.Error, UnicodeDecodeError) as error:
        raise BenchmarkFileError(f"{path}: not a TSV file ({error})") from None
    missing = [c for c in ("index", "question", "A", "B") if not header or c not in header]
    if missing:
        raise BenchmarkFileError(f"{path}: not an MMBench TSV (no column {', '.join(missing)})")
    return header, rows


def mmbench_prompt(row: Dict[str, str], lang: str = "en") -> Tuple[str, List[str]]:
    """The question model_vqa_mmbench.py asks (EVE runs it with --single-pred-prompt): the hint
    (when present) on its own line before the question, then "A. ..." for each option up to the
    first missing one, then the option-letter instruction (in Chinese for --lang cn)."""
    options = []
    for letter in MMBENCH_OPTIONS:
        value = row.get(letter)
        if mmbench_missing(value):
            break
        options.append(value)
    question = row["question"]
    if not mmbench_missing(row.get("hint")):
        question = row["hint"] + "\n" + question
    for letter, option in zip(MMBENCH_OPTIONS, options):
        question += f"\n{letter}. {option}"
    return question + "\n" + (OPTION_SUFFIX_CN if lang == "cn" else OPTION_SUFFIX), list(MMBENCH_OPTIONS[:len(options)])


def mmbench_table(header: Sequence[str], rows: Sequence[Dict[str, str]], answers: Dict[str, str]
                  ) -> Tuple[List[str], List[List[Optional[str]]]]:
    """The table convert_mmbench_for_submission.py uploads: the TSV's columns less hint, category,
    source, image, comment and l2-category, with "prediction" (the answer text, untouched) inserted
    as the 7th column; answers: {str(index): text}; a row without an answer gets an empty cell,
    as do the TSV's missing (NaN) cells."""
    columns = [c for c in header if c not in MMBENCH_DROPPED]
    columns.insert(min(6, len(columns)), "prediction")
    table = []
    for row in rows:
        cells = {c: (None if row.get(c) is None or row.get(c) in PANDAS_NA else row[c]) for c in header}
        cells["prediction"] = answers.get(str(row.get("index")))
        table.append([cells.get(c) for c in columns])
    return columns, table
