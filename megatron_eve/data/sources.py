"""Streaming readers for LLaVA-format inputs: a JSON list (however large) or JSON Lines.

Records come out one at a time with their position in the input, so memory stays bounded and a
broken record is reported by position instead of ending the run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator, List, Tuple, Union

_CHUNK = 1 << 20
# A list element that still fails to parse with this much text after its start is broken (not
# merely cut by the read buffer); bounds what a broken element makes the reader hold.
_MAX_RECORD_CHARS = 64 << 20
_WHITESPACE = " \t\r\n"


@dataclass
class Unparsed:
    """A JSON Lines line, decoded later (in a worker)."""

    text: str


@dataclass
class Broken:
    """Input that is not valid JSON; `detail` says where and why."""

    detail: str


Record = Union[dict, list, str, int, float, None, Unparsed, Broken]


class InputError(OSError):
    """An input that cannot be read at all."""


def _is_json_list(path: str) -> bool:
    try:
        with open(path, "r", encoding="utf-8") as handle:
            while True:
                char = handle.read(1)
                if char == "":
                    return False
                if char not in _WHITESPACE:
                    return char == "["
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read input {path}: {error}") from None


def _iter_json_list(path: str) -> Iterator[Record]:
    decoder = json.JSONDecoder()
    with open(path, "r", encoding="utf-8", errors="replace") as handle:
        buffer, eof = handle.read(_CHUNK), False
        position = buffer.index("[") + 1

        def read_more(keep_from: int):
            nonlocal buffer, eof
            more = handle.read(max(_CHUNK, len(buffer) - keep_from))
            eof = more == ""
            buffer = buffer[keep_from:] + more
            return 0

        while True:
            while True:  # skip separators, reading on when the buffer runs out
                while position < len(buffer) and buffer[position] in _WHITESPACE + ",":
                    position += 1
                if position < len(buffer) or eof:
                    break
                position = read_more(position)
            if position >= len(buffer) or buffer[position] == "]":
                return
            try:
                record, end = decoder.raw_decode(buffer, position)
            except json.JSONDecodeError as error:
                if not eof and len(buffer) - position < _MAX_RECORD_CHARS:
                    position = read_more(position)  # maybe only cut by the buffer: read on
                    continue
                yield Broken(f"{error.msg} at character {error.pos - position} of a list element")
                next_start = buffer.find("{", position + 1)  # resynchronise at the next object
                while next_start < 0 and not eof:
                    position = read_more(position)
                    next_start = buffer.find("{", position + 1)
                if next_start < 0:
                    return
                position = next_start
                continue
            yield record
            position = end
            if len(buffer) - position < _CHUNK // 2 and not eof:
                position = read_more(position)


def _iter_json_lines(path: str) -> Iterator[Record]:
    with open(path, "r", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                yield Unparsed(line)


def iter_records(paths: List[str]) -> Iterator[Tuple[int, Record]]:
    """(index, record) over all inputs in order; indices count records across files."""
    index = 0
    for path in paths:
        reader = _iter_json_list(path) if _is_json_list(path) else _iter_json_lines(path)
        for record in reader:
            yield index, record
            index += 1


def count_records(paths: List[str]) -> int:
    return sum(1 for _ in iter_records(paths))


def parse(record: Record) -> Record:
    """Decode an Unparsed line (a Broken marker if it is not JSON); other records pass through."""
    if isinstance(record, Unparsed):
        try:
            return json.loads(record.text)
        except json.JSONDecodeError as error:
            return Broken(f"{error.msg} at column {error.colno}")
    return record
