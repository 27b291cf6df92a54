"""An answering run that can be interrupted and resumed (`eval_vqa.py answer`).

Each finished answer is appended, flushed, to a side file beside the answers file (ANSWERS.partial):
a header line saying what the run was made of (the question file's path and content hash, the model,
the options that change an answer), then one {"position", "row"} line per answer, "position" its
question's place in the (chunk of the) question file. A rerun with the same header keeps those
answers (a line torn by the interruption is dropped) and answers only the rest; once every answer is
in, the answers file is written whole, atomically, and the side file removed."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Tuple

from megatron_eve.atomic import OutputRefused
from megatron_eve.locks import flock_now

SUFFIX = ".partial"
FORMAT = "megatron_eve partial answers v1"


def side_file(answers_file: str) -> str:
    return answers_file + SUFFIX


def file_hash(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_header(question_file: str, options: dict) -> dict:
    """What a side file's answers were made for: the same header, the same answers."""
    return {"format": FORMAT, "question_file": os.path.realpath(question_file),
            "question_file_sha256": file_hash(question_file), "options": options}


def _differences(found: dict, wanted: dict) -> List[str]:
    names = [key for key in ("question_file", "question_file_sha256") if found.get(key) != wanted[key]]
    found_options = found.get("options") if isinstance(found.get("options"), dict) else {}
    names += [key for key in sorted(set(wanted["options"]) | set(found_options))
              if found_options.get(key) != wanted["options"].get(key)]
    return names


def read_side_file(path: str, header: dict, count: int, overwrite: bool) -> Tuple[Dict[int, dict], int]:
    """The answers an interrupted run with this `header` finished ({position: answer row}) and the
    byte length of the side file's good part (what follows it, a torn line, is dropped). A side
    file made for other questions or options, or not ours, is refused (OutputRefused) unless
    `overwrite`: then it is started over ({}, 0)."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:  # none, or just made by the writer's lock
        return {}, 0
    kept: Dict[int, dict] = {}
    good = 0
    with open(path, "rb") as handle:
        first = handle.readline()
        try:
            found = json.loads(first)
        except ValueError:
            found = None
        if not first.endswith(b"\n") or not isinstance(found, dict) or found.get("format") != FORMAT:
            if overwrite:
                return {}, 0
            raise OutputRefused(f"{path} is not a side file of ours (partial answers): move it away, or pass "
                                f"--overwrite to replace it")
        differences = _differences(found, header)
        if differences:
            if overwrite:
                return {}, 0
            raise OutputRefused(f"{path} holds the answers of a run with another {', '.join(differences)}: rerun "
                                f"with the same question file and options to resume it, or pass --overwrite to "
                                f"start over")
        good = len(first)
        for line in handle:
            try:
                entry = json.loads(line) if line.endswith(b"\n") else None
            except ValueError:
                entry = None
            if not (isinstance(entry, dict) and isinstance(entry.get("position"), int)
                    and 0 <= entry["position"] < count and isinstance(entry.get("row"), dict)):
                break  # torn by the interruption: this and anything after it are answered again
            kept[entry["position"]] = entry["row"]
            good += len(line)
    return kept, good


class SideFile:
    """The side file being written (by the one process that writes): locked when made, so that a
    second run answering into the same file is refused before it loads a model; started once every
    process has read it; appended and flushed per batch."""

    def __init__(self, path: str):
        self.path = path
        self.failed = False  # a write or flush failed: its error (naming the file) is the one reported
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.handle = open(path, "a", encoding="utf-8")
        try:  # two runs appending to one side file would mix their answers (no flock: unlocked)
            busy = flock_now(self.handle.fileno()) is False
        except OSError:
            self.handle.close()
            raise
        if busy:
            self.handle.close()
            raise OutputRefused(f"{path}: another run is answering into this answers file")

    def start(self, header: dict, good_length: int) -> None:
        """Drop a torn last line (or an unwanted earlier run: good_length 0) and write the header if new."""
        try:
            self.handle.truncate(good_length)
            if not good_length:
                self.handle.write(json.dumps(header) + "\n")
        except OSError as error:
            self.failed = True
            raise OSError(error.errno, error.strerror, self.path) from error
        self._sync()

    def add(self, answers: List[Tuple[int, dict]]) -> None:
        try:
            for position, row in answers:
                self.handle.write(json.dumps({"position": position, "row": row}) + "\n")
        except OSError as error:
            self.failed = True
            raise OSError(error.errno, error.strerror, self.path) from error
        self._sync()

    def _sync(self) -> None:
        try:  # a full disk shows at the flush: name the file (a bare write error names none)
            self.handle.flush()
            os.fsync(self.handle.fileno())
        except OSError as error:
            self.failed = True
            raise OSError(error.errno, error.strerror, self.path) from error

    def finish(self) -> None:
        """Once the answers file is in place: the side file has served."""
        self.handle.close()
        os.remove(self.path)

    def close(self) -> None:
        """Leaves what was written for a rerun; a side file made by the lock alone (the run stopped
        before it started) is removed. Closing flushes what a failed write left buffered: failing
        again, it names the file, and after a failed write it says nothing (that error is the one to report)."""
        if not self.handle.closed:
            try:
                self.handle.close()  # closed even when its flush fails
            except OSError as error:
                if not self.failed:
                    raise OSError(error.errno, error.strerror, self.path) from error
            if os.path.isfile(self.path) and os.path.getsize(self.path) == 0:
                os.remove(self.path)
