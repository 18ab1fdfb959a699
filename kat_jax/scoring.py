"""`kat-jax score`: per-token log-probs and entropies of token sequences under a model.

Input JSONL, one sequence per line: {"id": ..., "tokens": [int, ...]}.
Output JSONL, same order: {"id": ..., "logprobs": [...], "entropies": [...]}, each of len(tokens) - 1:
logprobs[i - 1] = log p(tokens[i] | tokens[:i]) and entropies[i - 1] = the entropy of that
next-token distribution, for i >= 1 (natural log, float32 arithmetic).

The whole input is validated before any compute; an error names the file and line, and no output
file is left behind (the output is written to a temporary file renamed into place at the end).

Sequences are packed as independent chains into rows of at most --batch-tokens tokens (first-fit
decreasing), each row's length rounded up to a power of two, rows of one length batched together
(B * T <= batch_tokens). A sequence longer than --batch-tokens gets a row of its own (its length
rounded up to a power of two), so --batch-tokens bounds the common case, not the longest sequence.
Ids may be any JSON value (null included) and are echoed back unchanged. Prefix sharing across
sequences comes with the trajectory-tree packing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kat_jax.models.decoder import Decoder
from kat_jax.ops.logprobs import tree_logprobs
from kat_jax.trees.packing import assign_rows, bucket_length, empty_rows, pack_chains


class InputError(ValueError):
    """Bad input data; the message names the file and line."""


@dataclasses.dataclass
class ScoreRecord:
    id: Any
    tokens: np.ndarray


def read_score_input(path: str, vocab_size: int, max_len: int) -> list[ScoreRecord]:
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{where}: expected a JSON object with 'id' and 'tokens'")
            if "id" not in obj:
                raise InputError(f"{where}: missing key 'id'")
            toks = obj.get("tokens")
            if toks is None:
                raise InputError(f"{where}: missing key 'tokens'")
            if not isinstance(toks, list) or not toks:
                raise InputError(f"{where}: 'tokens' must be a non-empty list of token ids")
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in toks):
                raise InputError(f"{where}: 'tokens' must hold integers only")
            for j, t in enumerate(toks):  # Python ints: no overflow for huge ids
                if not 0 <= t < vocab_size:
                    raise InputError(f"{where}: token id {t} at index {j} is outside the "
                                     f"vocabulary [0, {vocab_size})")
            arr = np.asarray(toks, np.int32)
            if len(arr) > max_len:
                raise InputError(f"{where}: {len(arr)} tokens exceed the model's maximum of "
                                 f"{max_len} (max_position_embeddings)")
            records.append(ScoreRecord(obj["id"], arr.astype(np.int32)))
    return records


def make_score_fn(model: Decoder):
    """jitted (state, tokens, positions, parent, subtree_end) -> (logp, entropy) float32[B, T]."""
    graphdef, state = nnx.split(model)
    chunk = model.cfg.vocab_chunk_size

    @jax.jit
    def score(state, tokens, positions, parent, subtree_end):
        m = nnx.merge(graphdef, state)
        hidden = m(tokens, positions, subtree_end)
        return tree_logprobs(hidden, m.head_kernel(), tokens, parent, chunk)

    return score, state


def score_records(model: Decoder, records: list[ScoreRecord], batch_tokens: int
                  ) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """Per record: (logprobs, entropies) float32[len - 1]; plus a summary dict."""
    score, state = make_score_fn(model)
    seqs = [r.tokens for r in records]
    lengths = [len(s) for s in seqs]
    groups = assign_rows(lengths, batch_tokens)
    by_len: dict[int, list[list[int]]] = {}
    for g in groups:
        by_len.setdefault(bucket_length(sum(lengths[i] for i in g)), []).append(g)
    results: list[Any] = [None] * len(seqs)
    computed = 0
    shapes = set()
    for row_len, rows in sorted(by_len.items()):
        per_call = max(1, batch_tokens // row_len)
        for b0 in range(0, len(rows), per_call):
            chunk_groups = rows[b0:b0 + per_call]
            packed = pack_chains(seqs, row_len, groups=chunk_groups)
            # Keep one batch shape per row length: fill the last batch with padding rows.
            pad_rows = per_call - packed.num_rows if len(rows) > per_call else 0
            filler = empty_rows(pad_rows, row_len)
            keys = ("tokens", "positions", "parent", "subtree_end")
            arrays = [np.concatenate([getattr(packed, k), filler[k]]) for k in keys]
            shapes.add(arrays[0].shape)
            logp, ent = jax.device_get(score(state, *map(jnp.asarray, arrays)))
            for g in chunk_groups:
                for i in g:
                    r, s, n = packed.seq_row[i], packed.seq_start[i], lengths[i]
                    results[i] = (logp[r, s + 1:s + n], ent[r, s + 1:s + n])
                    computed += n
    nonfinite = sum(int(np.sum(~np.isfinite(lp)) + np.sum(~np.isfinite(en)))
                    for lp, en in results)
    total = int(sum(lengths))
    summary = {
        "sequences": len(seqs),
        "total_tokens": total,
        "computed_tokens": int(computed),
        "reuse_ratio": 0.0 if total == 0 else 1.0 - computed / total,
        "compiled_shapes": len(shapes),
        "nonfinite_values": nonfinite,
    }
    return results, summary


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def write_score_output(path: str, records: list[ScoreRecord],
                       results: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Write JSONL atomically (temporary file in the same directory, then rename)."""
    out_dir = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "w") as f:
            for rec, (lp, en) in zip(records, results):
                f.write(json.dumps({"id": rec.id, "logprobs": [_finite(x) for x in lp.tolist()],
                                    "entropies": [_finite(x) for x in en.tolist()]}) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run_score(checkpoint: str, input_path: str, output_path: str, batch_tokens: int = 4096,
              dtype: str | None = None, attention_impl: str | None = None) -> dict[str, Any]:
    from kat_jax.models.checkpoint import load_config, load_model

    overrides = {}
    if dtype:
        overrides["dtype"] = dtype
    if attention_impl:
        overrides["attention_impl"] = attention_impl
    cfg = load_config(checkpoint, **overrides)  # cheap: validate input before loading weights
    if batch_tokens <= 0:
        raise ValueError(f"--batch-tokens must be positive, got {batch_tokens}")
    records = read_score_input(input_path, cfg.vocab_size, cfg.max_position_embeddings)
    out_dir = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"{output_path}: directory {out_dir} does not exist")
    if os.path.isdir(output_path):
        raise IsADirectoryError(f"{output_path}: is a directory; --output names a file")
    model, cfg = load_model(checkpoint, **overrides)
    results, summary = score_records(model, records, batch_tokens)
    write_score_output(output_path, records, results)
    if summary["nonfinite_values"]:
        print(f"warning: {summary['nonfinite_values']} non-finite values written as null "
              f"(check the checkpoint and --dtype)", file=sys.stderr)
    print(f"scored {summary['sequences']} sequences -> {output_path}", file=sys.stderr)
    return summary
