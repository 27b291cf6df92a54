"""Where the evaluation may write. An output never replaces one of the command's inputs (not even
with --overwrite), and an existing file or folder is replaced only when it is our own earlier
output of that kind (`ours`) or the user passed --overwrite. Checked before any work is done, so a
refused run has written nothing."""

from __future__ import annotations

import json
import os
from itertools import islice
from typing import Callable, Iterable, Sequence

from megatron_eve.atomic import Inputs, OutputRefused, check_not_an_input, check_output_dir, nearest_existing
from megatron_eve.config import ConfigError


def check_output_file(path: str, inputs: Inputs, ours: Callable[[str], bool], overwrite: bool, what: str,
                      flag: str) -> None:
    """Refuse writing the file `path` over an input, over a folder, or over an existing non-empty file
    that is not `what` (our own earlier output: `ours`) unless `overwrite`."""
    check_not_an_input(path, inputs, flag)
    if os.path.isdir(path):
        raise OutputRefused(f"{flag} {path} is a folder: name a file")
    _check_parent_folders(path, flag)
    if overwrite or not os.path.exists(path) or os.path.getsize(path) == 0 or ours(path):
        return
    raise OutputRefused(f"{flag} {path} exists and is not {what}: choose another {flag}, or pass --overwrite "
                        f"to replace it")


def _check_parent_folders(path: str, flag: str) -> None:
    """Refuse an output whose nearest existing parent is a file (its folders could not be made)."""
    parent = nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(parent):
        raise OutputRefused(f"{flag} {path}: {parent} is a file, not a folder")


def check_output_folder(path: str, inputs: Inputs, ours: Callable[[str], bool], overwrite: bool, what: str,
                        flag: str) -> None:
    """Refuse replacing the folder `path` when it is or holds an input, is a file, or is a non-empty
    folder that is not `what` (`ours`) unless `overwrite`."""
    check_not_an_input(path, inputs, flag)
    _check_parent_folders(path, flag)
    try:  # also refuses a path that is a file
        check_output_dir(path, ours, overwrite, what)
    except ConfigError as error:
        raise OutputRefused(f"{flag} {error}") from None


# ------------------------------------------------------------- what our own outputs look like

def _lines(path: str, limit: int) -> Iterable[str]:
    with open(path, encoding="utf-8", errors="replace") as handle:
        yield from islice((line for line in handle if line.strip()), limit)


def jsonl_of(keys: Sequence[str], without: Sequence[str] = (), limit: int = 100) -> Callable[[str], bool]:
    """Whether a file's first `limit` lines are JSON objects holding every one of `keys` and none of
    `without` (a question file and an answer file both have question_id and text)."""
    def ours(path: str) -> bool:
        try:
            for line in _lines(path, limit):
                row = json.loads(line)
                if not isinstance(row, dict) or any(k not in row for k in keys) or any(k in row for k in without):
                    return False
            return True
        except (OSError, ValueError):
            return False
    return ours


def _json(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def json_list_of(keys: Sequence[str]) -> Callable[[str], bool]:
    """Whether a file is a JSON list of objects holding `keys` (EvalAI's and GQA's prediction files)."""
    def ours(path: str) -> bool:
        data = _json(path)
        return isinstance(data, list) and all(isinstance(r, dict) and all(k in r for k in keys) for r in data)
    return ours


def json_object_keyed(prefix: str) -> Callable[[str], bool]:
    """Whether a file is a JSON object whose keys all start with `prefix` (MM-Vet's {"v1_<id>": ...})."""
    def ours(path: str) -> bool:
        data = _json(path)
        return isinstance(data, dict) and all(key.startswith(prefix) for key in data)
    return ours


def table_with(columns: Sequence[str]) -> Callable[[str], bool]:
    """Whether a file is a table (.xlsx, or .tsv / .csv by its extension) whose header has `columns`."""
    def ours(path: str) -> bool:
        try:
            if path.lower().endswith((".tsv", ".csv")):
                delimiter = "\t" if path.lower().endswith(".tsv") else ","
                header = next(iter(_lines(path, 1)), "").rstrip("\r\n").split(delimiter)
            else:
                from megatron_eve.eval.xlsx import read_header

                header = read_header(path)
            return all(c in header for c in columns)
        except Exception:  # noqa: BLE001 — openpyxl raises many kinds on a file that is not a workbook
            return False
    return ours


ANSWER_FILE = jsonl_of(("question_id", "text", "answer_id"))  # what `answer` writes
QUESTION_FILE = jsonl_of(("question_id", "text"), without=("answer_id",))  # what `questions` writes
