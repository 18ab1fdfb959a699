"""`kat-jax score`: per-token log-probs and entropies of token sequences under a model.

Input JSONL, one sequence per line: {"id": ..., "tokens": [int, ...]}.
Output JSONL, same order: {"id": ..., "logprobs": [...], "entropies": [...]}, each of len(tokens) - 1:
logprobs[i - 1] = log p(tokens[i] | tokens[:i]) and entropies[i - 1] = the entropy of that
next-token distribution, for i >= 1 (natural log, float32 arithmetic; written with 9 significant
digits, which read back as the same float32; non-finite values as null). With --no-entropies
(entropies=False) the entropies are not computed and the lines have no "entropies" key.

The whole input is validated before any compute; an error names the file and line, and no output
file is left behind (the output is written to a temporary file renamed into place at the end).

All sequences are merged into one prefix trie (a prefix shared by several sequences is computed once,
see kat_jax.trees) and packed into rows of choose_row_len(trie, --batch-tokens) tokens (the
bucketed length with the least padding), --batch-tokens // row_len rows per forward call; only the
rows needed are computed (the last call holds the rest). computed_tokens in the summary counts the
tokens laid out in rows (distinct prefixes, plus repeated context when a tree had to be split);
reuse_ratio = 1 - computed_tokens / total_tokens; rows = rows the layout needs, computed_rows =
rows the forward calls computed (equal), calls = forward calls, attention_impl = the attention
implementation `auto` resolved to for these rows. Ids may be any JSON value (null included) and
are echoed back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import numpy as np
from flax import nnx

from kat_jax.atomic_io import atomic_file, check_output_file
from kat_jax.jsonl import read_jsonl
from kat_jax.models.decoder import Decoder
from kat_jax.ops.attention import resolve_attention_impl
from kat_jax.training.step import forward_logprobs
from kat_jax.trees.batch import StepBatch
from kat_jax.trees.packing import (
    assign_rows,
    bucket_length,
    make_pieces,
    pack_trie,
    schedule_length,
)
from kat_jax.trees.trajectory import Trajectory
from kat_jax.trees.trie import Trie, build_trie


class InputError(ValueError):
    """Bad input data; the message names the file and line."""


@dataclasses.dataclass
class ScoreRecord:
    id: Any
    tokens: np.ndarray


def read_score_input(path: str, vocab_size: int, max_len: int) -> list[ScoreRecord]:
    """The validated sequences of `path`; bad JSON (kat_jax.jsonl) or a bad line is an error naming
    the file and line."""
    records = []
    for obj, where in read_jsonl(path):
        if "id" not in obj:
            raise InputError(f"{where}: missing key 'id'")
        toks = obj.get("tokens")
        if toks is None:
            raise InputError(f"{where}: missing key 'tokens'")
        if not isinstance(toks, list) or not toks:
            raise InputError(f"{where}: 'tokens' must be a non-empty list of token ids")
        if not all(type(t) is int for t in toks):  # JSON true / false are bools, not ints
            raise InputError(f"{where}: 'tokens' must hold integers only")
        try:
            arr = np.asarray(toks, np.int64)
        except OverflowError:  # beyond int64: certainly outside the vocabulary
            arr = None
        if arr is None or not ((arr >= 0) & (arr < vocab_size)).all():
            j, t = next((j, t) for j, t in enumerate(toks) if not 0 <= t < vocab_size)
            raise InputError(f"{where}: token id {t} at index {j} is outside the "
                             f"vocabulary [0, {vocab_size})")
        arr = arr.astype(np.int32)
        if len(arr) > max_len:
            raise InputError(f"{where}: {len(arr)} tokens exceed the model's maximum of "
                             f"{max_len} (max_position_embeddings)")
        records.append(ScoreRecord(obj["id"], arr))
    return records


@partial(jax.jit, static_argnames=("graphdef", "entropies"))
def _score(graphdef: nnx.GraphDef, state, rows: StepBatch, entropies: bool):
    return forward_logprobs(nnx.merge(graphdef, state), rows, entropy=entropies)


def make_score_fn(model: Decoder, entropies: bool = True):
    """(score, state): score(state, rows: StepBatch [B, T]) -> (logp, entropy or None)
    float32[B, T], the train step's forward (kat_jax.training.step.forward_logprobs) jitted once
    per model structure and shape (calls for another model of the same structure reuse the
    compiled program); entropies=False computes none."""
    graphdef, state = nnx.split(model)
    return partial(_score, graphdef, entropies=entropies), state


def choose_row_len(trie: Trie, batch_tokens: int) -> int:
    """The row length that lays the trie out in the fewest padded tokens (rows x row length; ties:
    the shorter), among the buckets (kat_jax.trees.packing.bucket_length) from the longest
    sequence's up to the longest sequence's or min(batch_tokens, tree tokens), whichever is
    longer. E.g. GRPO groups of 1536 tree tokens get 1536-token rows, one group each, where
    4096-token rows would hold two groups and a quarter of padding."""
    longest = max(len(t) for t in trie.trajectories)
    row_len = high = bucket_length(max(longest, min(batch_tokens, trie.tree_tokens)))
    best = None
    b = bucket_length(longest)
    while b <= high:
        cost = b * len(assign_rows([p.size for p in make_pieces(trie, b)], b))
        if best is None or cost < best:
            best, row_len = cost, b
        b = bucket_length(b + 1)
    return row_len


def _calls(num_rows: int, per_call: int) -> list[slice]:
    """Row slices of the forward calls: per_call rows each, the last one the rest (no empty row is
    ever computed; at most two compiled shapes per run)."""
    return [slice(r, min(r + per_call, num_rows)) for r in range(0, num_rows, per_call)]


def score_records(model: Decoder, records: list[ScoreRecord], batch_tokens: int,
                  entropies: bool = True,
                  on_result: Callable[[int, np.ndarray, np.ndarray | None], None] | None = None
                  ) -> tuple[list[tuple[np.ndarray, np.ndarray | None]], dict[str, Any]]:
    """Per record: (logprobs, entropies) float32[len - 1] (entropies None when entropies=False:
    then they are not computed); plus a summary dict.

    All sequences go into one prefix trie, so a prefix shared by several sequences is computed
    once; rows are choose_row_len(trie, batch_tokens) tokens, packed exactly as for training
    (kat_jax.trees.packing), and only the rows needed are computed: forward calls of
    batch_tokens // row_len rows (at least one), the last call holding the rest. Attention is
    the model's (`auto` resolves by platform and row length, kat_jax.ops.attention); the block
    schedule is built only when the resolved implementation reads one.

    Host work overlaps device work: call k + 1 is dispatched (JAX dispatch is asynchronous)
    before call k's results are fetched, and on_result(index, logprobs, entropies) is called for
    each record as soon as all the rows holding its tokens are back (in completion order, not
    record order), while the next call runs."""
    cfg = model.cfg
    score, state = make_score_fn(model, entropies)
    trajs = [Trajectory(r.tokens, id=r.id) for r in records]
    trie = build_trie(trajs)
    row_len = choose_row_len(trie, batch_tokens)
    per_call = max(1, batch_tokens // row_len)
    attention = resolve_attention_impl(cfg.attention_impl, head_dim=cfg.head_dim,
                                       row_len=row_len, block_size=cfg.attention_block_size)
    block = None if attention == "xla_dense" else cfg.attention_block_size
    packed = pack_trie(trie, row_len, attention_block_size=block,
                       schedule_pairs=None if block is None else schedule_length(row_len, block))
    rows = packed.batch.replace(traj_index=None, valid=None, trainable=None, advantage=None)
    traj_index = packed.batch.traj_index
    calls = _calls(packed.num_rows, per_call)
    # the call after which each record is complete: the call of the last row holding its tokens
    last_row = np.max(traj_index, axis=1) // row_len
    done_after = np.searchsorted([c.stop for c in calls], last_row, side="right")
    logp = np.zeros((packed.num_rows, row_len), np.float32)
    ent = np.zeros_like(logp) if entropies else None
    results: list = [None] * len(trajs)
    nonfinite = 0

    def dispatch(sl: slice):
        return score(state, jax.device_put(jax.tree.map(lambda x: x[sl], rows)))

    pending = dispatch(calls[0])
    for c, sl in enumerate(calls):
        running, pending = pending, dispatch(calls[c + 1]) if c + 1 < len(calls) else None
        lp_c, en_c = jax.device_get(running)
        logp[sl] = lp_c
        if entropies:
            ent[sl] = en_c
        for k in np.flatnonzero(done_after == c):
            idx = traj_index[k, 1:len(trajs[k])]
            lp_k = logp.reshape(-1)[idx]
            en_k = ent.reshape(-1)[idx] if entropies else None
            nonfinite += int(np.sum(~np.isfinite(lp_k)))
            if entropies:
                nonfinite += int(np.sum(~np.isfinite(en_k)))
            results[k] = (lp_k, en_k)
            if on_result is not None:
                on_result(int(k), lp_k, en_k)
    total = packed.total_tokens
    summary = {
        "sequences": len(trajs),
        "total_tokens": total,
        "computed_tokens": packed.laid_out_tokens,
        "reuse_ratio": 0.0 if total == 0 else 1.0 - packed.laid_out_tokens / total,
        "rows": packed.used_rows,
        "computed_rows": sum(c.stop - c.start for c in calls),
        "calls": len(calls),
        "row_len": row_len,
        "attention_impl": attention,
        "nonfinite_values": nonfinite,
    }
    return results, summary


def format_score_line(record_id: Any, logprobs: np.ndarray, entropies: np.ndarray | None) -> str:
    """One output line (no newline): {"id", "logprobs", "entropies"} (no "entropies" key when
    they are None). Values are float32 written with 9 significant digits (they read back as the
    same float32); non-finite values are null."""
    line = '{"id": ' + json.dumps(record_id) + ', "logprobs": ' + _float_list(logprobs)
    if entropies is not None:
        line += ', "entropies": ' + _float_list(entropies)
    return line + "}"


def _float_list(values: np.ndarray) -> str:
    if np.isfinite(values).all():
        return "[" + ", ".join([f"{x:.9g}" for x in values.tolist()]) + "]"
    return "[" + ", ".join([f"{x:.9g}" if math.isfinite(x) else "null"
                            for x in values.tolist()]) + "]"


def run_score(checkpoint: str, input_path: str, output_path: str, batch_tokens: int = 4096,
              dtype: str | None = None, attention_impl: str | None = None,
              entropies: bool = True) -> dict[str, Any]:
    """Score input_path into output_path (see the module docstring); returns the summary. Lines
    are formatted as their records complete, while the next forward call runs, and written in
    input order as soon as every line before them is (into the temporary file that is renamed
    into place at the end)."""
    from kat_jax.models.checkpoint import load_model, load_model_config

    overrides = {}
    if dtype:
        overrides["dtype"] = dtype
    if attention_impl:
        overrides["attention_impl"] = attention_impl
    cfg = load_model_config(checkpoint, **overrides)  # cheap: validate input before loading weights
    if batch_tokens <= 0:
        raise ValueError(f"--batch-tokens must be positive, got {batch_tokens}")
    records = read_score_input(input_path, cfg.vocab_size, cfg.max_position_embeddings)
    if not records:
        raise InputError(f"{input_path}: no sequences")
    check_output_file(output_path)
    model, cfg = load_model(checkpoint, **overrides)
    lines: list[str | None] = [None] * len(records)
    written = 0
    with atomic_file(output_path) as out:
        def keep(k: int, logprobs: np.ndarray, ents: np.ndarray | None) -> None:
            nonlocal written
            lines[k] = format_score_line(records[k].id, logprobs, ents)
            while written < len(lines) and lines[written] is not None:
                out.write(lines[written] + "\n")
                lines[written] = ""  # written: keep no copy
                written += 1

        _, summary = score_records(model, records, batch_tokens, entropies, on_result=keep)
    if summary["nonfinite_values"]:
        print(f"warning: {summary['nonfinite_values']} non-finite values written as null "
              f"(check the checkpoint and --dtype)", file=sys.stderr)
    print(f"scored {summary['sequences']} sequences -> {output_path}", file=sys.stderr)
    return summary
