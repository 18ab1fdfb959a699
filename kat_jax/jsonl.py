"""The one JSONL reader: every command and data source reads its input through it.

    for obj, where in read_jsonl(path):      # where = "path:line"
        ...

Blank lines are skipped. A line that is not valid JSON, or not a JSON object, is a ValueError whose
message starts with `path:line:`; callers prefix their own checks with the same `where`, so every
bad-input error names the file and line. Remote paths (gs://) are read through kat_jax.storage.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from kat_jax import storage


class JsonlError(ValueError):
    """Bad JSONL input; the message starts with `path:line:`."""


def parse_line(raw: str | bytes, where: str) -> dict[str, Any]:
    """One JSONL line -> its JSON object; JsonlError naming `where` otherwise."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = getattr(e, "msg", str(e))
        raise JsonlError(f"{where}: not valid JSON ({msg})") from None
    if not isinstance(obj, dict):
        raise JsonlError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_jsonl(path: str) -> Iterator[tuple[dict[str, Any], str]]:
    """(object, "path:line") for every non-blank line of `path` (local or gs://)."""
    with open(storage.local_copy(path), "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield parse_line(raw, f"{path}:{lineno}"), f"{path}:{lineno}"
