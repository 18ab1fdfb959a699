"""JSONL data sources for the four stages, as groups of records with random access (grain sources).

Formats (one JSON object per line; blank lines are skipped):
  mid       {"text": str} or {"tokens": [ids]}; optional "id". A document is tokenized, ended with
            the tokenizer's eos, and cut into chains of at most row_len tokens (all trainable).
  chat      {"messages": [...], "tools": [...] (optional), "id", "group" (optional)}: agent
            trajectories in OpenAI chat form, rendered by kat_jax.data.chat (Qwen format).
  rollouts  rollout records (kat_jax.data.records: "id", "group", "tokens", "logprobs", "tags",
            "reward" and/or "advantage", "status", "teacher", ...), the output of
            `kat-jax rollout`; validated by records.validate_rollout.

Records that share "group" are one element, so trajectories that share prompts land in the same
tree; without "group", every line is its own element (its prefix can still be shared with others
of the same batch). The whole file is indexed and every line parsed once up front, so bad input
fails before training starts with `file:line:` in the message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from kat_jax import storage
from kat_jax.data.records import validate_rollout
from kat_jax.jsonl import parse_line


def open_source(spec: str, key: str, kind: str):
    """data.train_files / eval_files -> the random-access source, opened (indexed, validated) once:
    JsonlGroups of the JSONL files of `kind`, or a seqio source for 'seqio:NAME[:SPLIT]'."""
    from kat_jax.data.seqio_source import SeqioGroups, parse_seqio_spec

    parsed = parse_seqio_spec(spec)
    if parsed is not None:
        return SeqioGroups(*parsed)
    return JsonlGroups(expand_files(spec, key), kind)


def expand_files(spec: str | list[str], key: str) -> list[str]:
    """Comma-separated paths or globs ('pkg:' prefix: a file bundled in kat_jax/assets)."""
    items = spec if isinstance(spec, (list, tuple)) else [s for s in str(spec).split(",") if s]
    out: list[str] = []
    for item in items:
        item = item.strip()
        if item.startswith("pkg:"):
            item = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets",
                                item[len("pkg:"):])
        matches = storage.glob(item) if any(c in item for c in "*?[") else [item]
        for m in matches:
            if not storage.isfile(m):
                raise FileNotFoundError(f"{key}: {m}: no such file")
            out.append(m)
    if not out:
        raise ValueError(f"{key}: no data files given")
    return out


def check_mid(obj: dict[str, Any], where: str) -> None:
    """A mid-training document: {"text": non-empty str} or {"tokens": >= 2 ids}."""
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise ValueError(f"{where}: 'text' must be a non-empty string")
    elif "tokens" in obj:
        t = obj["tokens"]
        if not isinstance(t, list) or len(t) < 2 or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in t):
            raise ValueError(f"{where}: 'tokens' must be a list of at least 2 ids >= 0")
    else:
        raise ValueError(f"{where}: a mid-training document needs 'text' or 'tokens'")


def check_chat(obj: dict[str, Any], where: str) -> None:
    """A chat transcript with at least one assistant message."""
    m = obj.get("messages")
    if not isinstance(m, list) or not m:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    if not any(isinstance(x, dict) and x.get("role") == "assistant" for x in m):
        raise ValueError(f"{where}: no assistant message (nothing to train on)")


# Data kind -> the check of one record (errors start with `where`), registered explicitly; a new
# kind is added with kat_jax.data.pipeline.register_data_kind (its check and its converter).
VALIDATORS: dict[str, Callable[[dict[str, Any], str], None]] = {
    "mid": check_mid,
    "chat": check_chat,
    "rollouts": validate_rollout,  # the schema of kat_jax.data.records
}


class JsonlGroups:
    """Random-access source: element i is a list of (record, "file:line") of one group."""

    def __init__(self, files: list[str], kind: str, group_key: str | None = "group"):
        if kind not in VALIDATORS:
            raise ValueError(f"unknown data kind {kind!r}; known: {tuple(VALIDATORS)}")
        self.kind = kind
        self.files = list(files)  # as given (messages name these)
        self._local = [storage.local_copy(f) for f in self.files]  # gs:// -> downloaded once
        self._index: list[list[tuple[int, int, int]]] = []  # per group: (file idx, offset, lineno)
        by_group: dict[str, int] = {}
        for fi, path in enumerate(self.files):
            with open(self._local[fi], "rb") as f:
                offset = 0
                for lineno, raw in enumerate(f, 1):
                    here = offset
                    offset += len(raw)
                    if not raw.strip():
                        continue
                    where = f"{path}:{lineno}"
                    obj = parse_line(raw, where)
                    VALIDATORS[kind](obj, where)
                    g = obj.get(group_key) if group_key else None
                    if g is None:
                        self._index.append([(fi, here, lineno)])
                    else:
                        key = json.dumps(g, sort_keys=True)
                        if key not in by_group:
                            by_group[key] = len(self._index)
                            self._index.append([])
                        self._index[by_group[key]].append((fi, here, lineno))
        if not self._index:
            raise ValueError(f"{', '.join(self.files)}: no records")

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> list[tuple[dict, str]]:
        out = []
        for fi, offset, lineno in self._index[i]:
            with open(self._local[fi], "rb") as f:
                f.seek(offset)
                where = f"{self.files[fi]}:{lineno}"
                out.append((parse_line(f.readline(), where), where))
        return out

    @property
    def num_records(self) -> int:
        return sum(len(g) for g in self._index)
