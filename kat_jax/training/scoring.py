"""`kat-jax score`: per-token log-probs and entropies of token sequences under a model.

Input JSONL, one sequence per line: {"id": ..., "tokens": [int, ...]}.
Output JSONL, same order: {"id": ..., "logprobs": [...], "entropies": [...]}, each of len(tokens) - 1:
logprobs[i - 1] = log p(tokens[i] | tokens[:i]) and entropies[i - 1] = the entropy of that
next-token distribution, for i >= 1 (natural log, float32 arithmetic).

The whole input is validated before any compute; an error names the file and line, and no output
file is left behind (the output is written to a temporary file renamed into place at the end).

All sequences are merged into one prefix trie (a prefix shared by several sequences is computed once,
see kat_jax.trees) and packed into rows of bucket_length(max(longest sequence, min(--batch-tokens,
tree tokens))) tokens, --batch-tokens // row_len rows per forward call. computed_tokens in the
summary counts the tokens laid out in rows (distinct prefixes, plus repeated context when a tree had
to be split);
reuse_ratio = 1 - computed_tokens / total_tokens. Ids may be any JSON value (null included) and are
echoed back unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kat_jax.atomic_io import check_output_file, write_jsonl_atomic
from kat_jax.jsonl import read_jsonl
from kat_jax.models.decoder import Decoder
from kat_jax.training.step import forward_logprobs
from kat_jax.trees.batch import StepBatch
from kat_jax.trees.packing import (
    bucket_length,
    gather_per_trajectory,
    pack_trie,
    schedule_length,
)
from kat_jax.trees.trajectory import Trajectory
from kat_jax.trees.trie import build_trie


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
        records.append(ScoreRecord(obj["id"], arr))
    return records


def make_score_fn(model: Decoder):
    """jitted (state, rows: StepBatch [B, T]) -> (logp, entropy) float32[B, T]: the train step's
    forward (kat_jax.training.step.forward_logprobs)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def score(state, rows: StepBatch):
        return forward_logprobs(nnx.merge(graphdef, state), rows)

    return score, state


def score_records(model: Decoder, records: list[ScoreRecord], batch_tokens: int
                  ) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """Per record: (logprobs, entropies) float32[len - 1]; plus a summary dict.

    All sequences go into one prefix trie, so a prefix shared by several sequences is computed once;
    rows are bucket_length(max(longest sequence, min(batch_tokens, tree tokens))) tokens,
    batch_tokens // row_len rows per call (at least one), one compiled shape per run. The rows and
    their attention schedule are packed exactly as for training (kat_jax.trees.packing)."""
    score, state = make_score_fn(model)
    trajs = [Trajectory(r.tokens, id=r.id) for r in records]
    longest = max(len(t) for t in trajs)
    trie = build_trie(trajs)
    # Rows of batch_tokens, shrunk when everything fits in less; never shorter than a sequence.
    row_len = bucket_length(max(longest, min(batch_tokens, trie.tree_tokens)))
    per_call = max(1, batch_tokens // row_len)
    # every call: per_call rows (the last padded), one fixed schedule length
    pairs = schedule_length(row_len, model.cfg.attention_block_size)
    packed = pack_trie(trie, row_len, rows_multiple=per_call,
                       attention_block_size=model.cfg.attention_block_size, schedule_pairs=pairs)
    rows = packed.batch
    n_calls = rows.num_rows // per_call
    logp = np.zeros((n_calls * per_call, row_len), np.float32)
    ent = np.zeros_like(logp)
    for c in range(n_calls):
        sl = slice(c * per_call, (c + 1) * per_call)
        call = jax.tree.map(lambda x, sl=sl: jnp.asarray(x[sl]),
                            rows.replace(traj_index=None, valid=None, trainable=None,
                                         advantage=None))
        logp[sl], ent[sl] = jax.device_get(score(state, call))
    lp_traj = gather_per_trajectory(logp, rows.traj_index)
    en_traj = gather_per_trajectory(ent, rows.traj_index)
    results = [(lp_traj[k, 1:len(t)], en_traj[k, 1:len(t)]) for k, t in enumerate(trajs)]
    nonfinite = sum(int(np.sum(~np.isfinite(lp)) + np.sum(~np.isfinite(en)))
                    for lp, en in results)
    total = packed.total_tokens
    summary = {
        "sequences": len(trajs),
        "total_tokens": total,
        "computed_tokens": packed.laid_out_tokens,
        "reuse_ratio": 0.0 if total == 0 else 1.0 - packed.laid_out_tokens / total,
        "rows": packed.used_rows,
        "row_len": row_len,
        "nonfinite_values": nonfinite,
    }
    return results, summary


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def write_score_output(path: str, records: list[ScoreRecord],
                       results: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Write JSONL atomically (temporary file in the same directory, then rename)."""
    write_jsonl_atomic(path, ({"id": rec.id, "logprobs": [_finite(x) for x in lp.tolist()],
                               "entropies": [_finite(x) for x in en.tolist()]}
                              for rec, (lp, en) in zip(records, results)))


def run_score(checkpoint: str, input_path: str, output_path: str, batch_tokens: int = 4096,
              dtype: str | None = None, attention_impl: str | None = None) -> dict[str, Any]:
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
    results, summary = score_records(model, records, batch_tokens)
    write_score_output(output_path, records, results)
    if summary["nonfinite_values"]:
        print(f"warning: {summary['nonfinite_values']} non-finite values written as null "
              f"(check the checkpoint and --dtype)", file=sys.stderr)
    print(f"scored {summary['sequences']} sequences -> {output_path}", file=sys.stderr)
    return summary
