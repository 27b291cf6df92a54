"""What the benchmark loaders share: BenchmarkFileError, and a JSON reader that raises it."""

from __future__ import annotations

import json


class BenchmarkFileError(ValueError):
    """A benchmark file that cannot be read as its benchmark writes it; the message names it."""


def load_json(path: str):
    """The JSON in `path`; BenchmarkFileError (naming it) when it cannot be read or is not JSON."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except OSError as error:
        raise BenchmarkFileError(f"{path}: cannot be read ({error.strerror or error})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BenchmarkFileError(f"{path}: not JSON ({error})") from None
