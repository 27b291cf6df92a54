"""Streaming readers for LLaVA-format inputs: a JSON list (however large) or JSON Lines.

Records come out one at a time with their position in the input, so memory stays bounded and a
broken record is reported by position instead of ending the run. Text is read tolerantly: bytes
that are not UTF-8 never stop the run; the record holding them is reported broken, with its own
reason, instead of being kept with replacement characters.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple, Union

_CHUNK = 1 << 20
# A list element that still fails to parse with this much text after its start is broken (not
# merely cut by the read buffer); bounds what a broken element makes the reader hold.
_MAX_RECORD_CHARS = 64 << 20
_WHITESPACE = " \t\r\n"
# Undecodable bytes, as Python's "surrogateescape" error handler maps them.
_NOT_UTF8 = re.compile("[\udc80-\udcff]")
# How far back from a candidate "{" the reader keeps text to see the "," before it.
_LOOKBEHIND = 4096
# What changes the state of a scan for an element's end: brackets, quotes, escapes, and the
# control characters that JSON forbids inside a string.
_STRUCTURE = re.compile(r'[][{}",\\\x00-\x1f]')
_CLOSER = {"}": "{", "]": "["}


@dataclass
class Unparsed:
    """A JSON Lines line, decoded later (in a worker)."""

    text: str


@dataclass
class Broken:
    """Input that cannot become a record; `reason` classifies it, `detail` says where and why."""

    detail: str
    reason: str = "invalid_json"


Record = Union[dict, list, str, int, float, None, Unparsed, Broken]


class InputError(OSError):
    """An input that cannot be read at all."""


def _open(path: str):
    # utf-8-sig: a byte-order mark (some Windows editors write one) is not part of the first record.
    return open(path, "r", encoding="utf-8-sig", errors="surrogateescape")


def _not_utf8(text: str) -> bool:
    return _NOT_UTF8.search(text) is not None


def _is_json_list(path: str) -> bool:
    try:
        with _open(path) as handle:
            while True:
                char = handle.read(1)
                if char == "":
                    return False
                if char not in _WHITESPACE:
                    return char == "["
    except OSError as error:
        raise InputError(f"cannot read input {path}: {error}") from None


class _Window:
    """A sliding window over a text file: `text` holds the file from some point on."""

    def __init__(self, handle):
        self.handle = handle
        self.text = handle.read(_CHUNK)
        self.eof = self.text == ""

    def more(self, keep_from: int) -> int:
        """Drop the text before keep_from and read on; returns by how much indices shifted."""
        extra = self.handle.read(max(_CHUNK, len(self.text) - keep_from))
        self.eof = extra == ""
        self.text = self.text[keep_from:] + extra
        return keep_from

    def skip(self, position: int, chars: str) -> int:
        """The first index at or after position whose character is not in chars (reading on);
        len(text) only at the end of the input."""
        while True:
            while position < len(self.text) and self.text[position] in chars:
                position += 1
            if position < len(self.text) or self.eof:
                return position
            position -= self.more(position)

    def element_end(self, start: int) -> Tuple[int, Optional[int]]:
        """Where the list element that begins at `start` ends, from its brackets and strings alone
        (a syntax error inside it does not matter): (start, end) in the text as it is now (reading
        on moves indices). end is None where that is unknown: the element does not close within
        _MAX_RECORD_CHARS, closes a bracket it did not open, or holds a raw control character in a
        string (an unterminated string)."""
        opened, in_string, position = [], False, start
        while True:
            found = _STRUCTURE.search(self.text, position)
            if found is None or (found.group() == "\\" and found.end() == len(self.text)):
                resume = len(self.text) if found is None else found.start()  # an escape needs its next char
                if self.eof or resume - start >= _MAX_RECORD_CHARS:
                    return start, None
                shift = self.more(start)
                start, position = start - shift, resume - shift
                continue
            char, position = found.group(), found.end()
            if in_string:
                if char == '"':
                    in_string = False
                elif char == "\\":
                    position += 1  # the escaped character
                elif char < " ":
                    return start, None
            elif char == '"':
                in_string = True
            elif char in "{[":
                opened.append(char)
            elif char in "}]":
                if not opened:  # "]" ends the list (an element without brackets ends before it)
                    return start, (found.start() if char == "]" else None)
                if opened.pop() != _CLOSER[char]:
                    return start, None
                if not opened:
                    return start, position
            elif char == "," and not opened:  # an element without brackets
                return start, found.start()

    def after_broken(self, start: int, error_at: int) -> int:
        """Where reading resumes after the broken element that begins at `start`: its end, or
        where that is unknown, the next element found by next_element from `error_at` on."""
        offset = error_at - start
        start, end = self.element_end(start)
        return end if end is not None else self.next_element(start + offset)

    def next_element(self, start: int) -> int:
        """Where the next list element begins after a broken one: the first "{" at or after
        start that follows a "," (nested objects that open a list follow a "["); len(text) if
        none is left. Text before `start` parsed, so the objects nested there are closed."""
        while True:
            found = self.text.find("{", start)
            while found >= 0:
                before = found - 1
                while before >= 0 and self.text[before] in _WHITESPACE:
                    before -= 1
                if before >= 0 and self.text[before] == ",":
                    return found
                found = self.text.find("{", found + 1)
            if self.eof:
                return len(self.text)
            searched = len(self.text)
            keep = max(0, searched - _LOOKBEHIND)
            start = searched - self.more(keep)


def _iter_json_list(path: str) -> Iterator[Record]:
    decoder = json.JSONDecoder()
    with _open(path) as handle:
        window = _Window(handle)
        position = window.text.index("[") + 1
        while True:
            position = window.skip(position, _WHITESPACE + ",")
            if position >= len(window.text):
                return
            if window.text[position] == "]":
                after = window.skip(position + 1, _WHITESPACE)  # may read on: indices move
                if after >= len(window.text):  # the list's end
                    return
                # A nested list of an element broken earlier closes here: look further.
                position = window.next_element(after)
                continue
            try:
                record, end = decoder.raw_decode(window.text, position)
            except json.JSONDecodeError as error:
                if not window.eof and len(window.text) - position < _MAX_RECORD_CHARS:
                    position -= window.more(position)  # maybe only cut by the buffer: read on
                    continue
                yield Broken(f"{error.msg} at character {error.pos - position} of a list element")
                position = window.after_broken(position, max(error.pos, position + 1))
                continue
            except (RecursionError, ValueError) as error:  # whatever text follows, it stays refused
                yield _undecodable(error, "a list element")
                position = window.after_broken(position, position + 1)
                continue
            if _not_utf8(window.text[position:end]):
                yield Broken("bytes that are not UTF-8 inside a list element", "invalid_utf8")
            else:
                yield record
            position = end
            if len(window.text) - position < _CHUNK // 2 and not window.eof:
                position -= window.more(position)


def _iter_json_lines(path: str) -> Iterator[Record]:
    with _open(path) as handle:
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
    """Decode an Unparsed line (a Broken marker if it is not UTF-8 JSON); other records pass through."""
    if isinstance(record, Unparsed):
        if _not_utf8(record.text):
            return Broken("bytes that are not UTF-8 on this line", "invalid_utf8")
        try:
            return json.loads(record.text)
        except json.JSONDecodeError as error:
            return Broken(f"{error.msg} at column {error.colno}")
        except (RecursionError, ValueError) as error:
            return _undecodable(error, "this line")
    return record


def _undecodable(error: Exception, where: str) -> Broken:
    """Valid JSON that Python's decoder refuses: nested deeper than it recurses, or an integer with
    more digits than Python converts (4300 by default)."""
    if isinstance(error, RecursionError):
        return Broken(f"nested too deeply to decode ({where})")
    return Broken(f"{str(error).split(';')[0]} ({where})")
