"""Packing token sequences into fixed-length TreeBatch rows.

A row is a forest laid out in depth-first pre-order (ARCHITECTURE.md). Per token i:
    tokens[i], positions[i] (depth), parent[i] (-1 at a root), subtree_end[i].
Padding tokens are their own one-token trees (parent -1, subtree_end = i + 1): they see only
themselves, so no query ever has an empty softmax and padding never yields NaN.

This module packs independent sequences (chains). Shared-prefix tries reuse the same row format.
"""

from __future__ import annotations

import dataclasses

import numpy as np

MIN_BUCKET = 16


def bucket_length(n: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two >= max(n, minimum): a run compiles a handful of row shapes."""
    return max(minimum, 1 << max(0, int(n - 1).bit_length()))


@dataclasses.dataclass
class PackedRows:
    """int32[R, T] arrays, plus where each sequence sits: seq_row[s], seq_start[s], seq_len[s]."""

    tokens: np.ndarray
    positions: np.ndarray
    parent: np.ndarray
    subtree_end: np.ndarray
    seq_row: np.ndarray
    seq_start: np.ndarray
    seq_len: np.ndarray

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def row_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def real_tokens(self) -> int:
        return int(self.seq_len.sum())


def empty_rows(num_rows: int, row_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    idx = np.arange(row_len, dtype=np.int32)
    return dict(
        tokens=np.full((num_rows, row_len), pad_id, np.int32),
        positions=np.zeros((num_rows, row_len), np.int32),
        parent=np.full((num_rows, row_len), -1, np.int32),
        subtree_end=np.broadcast_to(idx + 1, (num_rows, row_len)).copy(),
    )


def assign_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: lists of sequence indices whose total length fits `capacity`.

    A sequence longer than `capacity` gets a row of its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        for r, f in enumerate(free):
            if n <= f:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(max(0, capacity - n))
    return rows


def pack_chains(seqs: list[np.ndarray], row_len: int, pad_id: int = 0,
                groups: list[list[int]] | None = None) -> PackedRows:
    """Pack sequences (int arrays) as chains into rows of exactly `row_len` tokens.

    groups: which sequences share a row (default: first-fit decreasing). Sequences not in any group
    are not packed (their seq_row is -1). Every group must fit in a row."""
    lengths = [len(s) for s in seqs]
    if groups is None:
        groups = assign_rows(lengths, row_len)
    for group in groups:
        used = sum(lengths[i] for i in group)
        if used > row_len:
            raise ValueError(f"{used} tokens of sequences {group[:4]} do not fit rows of {row_len}")
    arrays = empty_rows(len(groups), row_len, pad_id)
    seq_row = np.full(len(seqs), -1, np.int32)
    seq_start = np.zeros(len(seqs), np.int32)
    for r, group in enumerate(groups):
        start = 0
        for i in sorted(group):
            n = lengths[i]
            end = start + n
            arrays["tokens"][r, start:end] = seqs[i]
            arrays["positions"][r, start:end] = np.arange(n)
            arrays["parent"][r, start:end] = np.arange(start - 1, end - 1)
            arrays["parent"][r, start] = -1
            arrays["subtree_end"][r, start:end] = end
            seq_row[i], seq_start[i] = r, start
            start = end
    return PackedRows(**arrays, seq_row=seq_row, seq_start=seq_start,
                      seq_len=np.asarray(lengths, np.int32))
