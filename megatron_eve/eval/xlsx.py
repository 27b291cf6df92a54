"""MMBench's upload file: one sheet as convert_mmbench_for_submission.py writes it (pandas'
to_excel through openpyxl), written with openpyxl under a temporary name and renamed into place."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

from megatron_eve.atomic import replacing

Cell = Union[None, str, int, float]


def numeric_columns(rows: Sequence[Sequence[Optional[str]]], width: int) -> List[bool]:
    """Which columns pandas would read as numbers: every present cell parses as an int (or a float)."""
    flags = []
    for i in range(width):
        present = [r[i] for r in rows if i < len(r) and r[i] is not None]
        flags.append(bool(present) and all(_number(v) is not None for v in present))
    return flags


def _number(text) -> Optional[Union[int, float]]:
    if isinstance(text, (int, float)):
        return text
    try:
        return int(text)
    except (TypeError, ValueError):
        try:
            value = float(text)
        except (TypeError, ValueError):
            return None
        return value if value == value and value not in (float("inf"), float("-inf")) else None


def write_xlsx(path: str, columns: Sequence[str], rows: Sequence[Sequence[Cell]], numbers: bool = True,
               text_columns: Sequence[str] = ()) -> List[Tuple[int, str]]:
    """One sheet ("Sheet1", pandas' name): `columns` as the header row, then `rows`; None is an empty
    cell. With `numbers`, a column whose every cell is a number is written as numbers (as pandas
    read the TSV), except `text_columns` (pandas held them as text). The control characters a
    workbook cannot hold are taken out; returned: (row index, column) of each cell that lost some."""
    from openpyxl import Workbook
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    if numbers:
        numeric = numeric_columns(rows, len(columns))
        flags = [is_number and column not in text_columns for is_number, column in zip(numeric, columns)]
        rows = [[(_number(v) if flags[i] and v is not None else v) for i, v in enumerate(r)] for r in rows]
    cleaned = []
    book = Workbook()
    sheet = book.active
    sheet.title = "Sheet1"
    sheet.append(list(columns))
    for index, row in enumerate(rows):
        cells = list(row)
        for i, value in enumerate(cells):
            if isinstance(value, str) and ILLEGAL_CHARACTERS_RE.search(value):
                cells[i] = ILLEGAL_CHARACTERS_RE.sub("", value)
                cleaned.append((index, columns[i] if i < len(columns) else str(i)))
        sheet.append(cells)
    with replacing(path, "wb") as handle:
        book.save(handle)
    return cleaned


def read_header(path: str) -> List[Cell]:
    """The first row of the first sheet (raises on a file that is not a workbook)."""
    from openpyxl import load_workbook

    book = load_workbook(path, read_only=True)
    try:
        return list(next(book.worksheets[0].iter_rows(values_only=True), ()))
    finally:
        book.close()


def read_xlsx(path: str) -> List[List[Cell]]:
    """The cells of the first sheet, header row first (None for empty cells)."""
    from openpyxl import load_workbook

    book = load_workbook(path, read_only=True)
    try:
        return [list(row) for row in book.worksheets[0].iter_rows(values_only=True)]
    finally:
        book.close()
