"""Output files that are written whole or not at all (shared by the command-line jobs)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO, Any


def check_output_file(path: str) -> None:
    """An error unless `path` can be written as a file: its directory exists and it is not a
    directory. Called before expensive work so a bad path fails fast."""
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"{path}: directory {out_dir} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory; --output names a file")


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[IO[str]]:
    """A text file written into a temporary file in the same directory and renamed into place on
    success; on any error the temporary file is removed and `path` is untouched."""
    out_dir = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "w") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_jsonl_atomic(path: str, objects: Iterable[Any]) -> None:
    """One JSON line per object, written whole or not at all (atomic_file)."""
    with atomic_file(path) as f:
        for obj in objects:
            f.write(json.dumps(obj) + "\n")
