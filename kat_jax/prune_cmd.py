"""`kat-jax prune`: what an entropy-pruning budget keeps of groups of rollouts.

Input JSONL lines: {"id", "tokens": [ids], "entropies": [float or null per token; null where the
token was not sampled, e.g. the prompt], "tags": [null or a tag name per token] (optional),
"logprobs": [float or null per token] (optional; behaviour log-probs, for --reach prob),
"group": any JSON value (optional; absent means one group)}.
Lines without "entropies" get them from a forward pass of --checkpoint (any loadable model), if
given; otherwise they are an error. Each group becomes one prefix trie, pruned with --budget tokens
(kat_jax.trees.pruning).
Output JSONL, same order: {"id", "kept"}: how many leading tokens of the trajectory remain (pruning
removes whole subtrees, so what remains of a trajectory is a prefix). The last stdout line is a JSON
summary: groups, trajectories, tokens_before / tokens_after (distinct tree tokens), and
entropy_mass_kept (share of sum(share * entropy) kept, with share-of-trajectories reach whatever
--reach is). Entropies computed by --checkpoint cover every token after the first (the model's
entropy at prompt tokens too).

Bad input is an error naming the file, line and trajectory, and no output file is left behind.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import numpy as np

from kat_jax.atomic_io import check_output_file, write_jsonl_atomic
from kat_jax.trees.pruning import PruneConfig, node_arrays, prune_trie
from kat_jax.trees.trajectory import TAGS, Trajectory
from kat_jax.trees.trie import build_trie


def _bad(path: str, lineno: int, obj_id: Any, msg: str) -> ValueError:
    return ValueError(f"{path}:{lineno}: trajectory {obj_id!r}: {msg}")


def per_token_floats(values: Any, n: int, key: str, what: str, ok, rule: str, bad
                      ) -> np.ndarray:
    """float32[n] from a JSON list of n numbers or nulls (null -> 0); `ok(x)` decides validity;
    `bad(msg)` builds the error naming the line and trajectory."""
    if not isinstance(values, list) or len(values) != n:
        raise bad(f"'{key}' must be a list of {n} values (one per token, null where not sampled)")
    out = np.zeros(n, np.float32)
    for j, x in enumerate(values):
        if x is None:
            continue
        if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x) \
                or not ok(x):
            raise bad(f"{what} {x!r} at index {j} must be a finite number {rule} or null")
        out[j] = x
    return out


def read_rollouts(path: str, allow_missing_entropies: bool = False,
                  missing: list[int] | None = None, need_logprobs: bool = False
                  ) -> list[tuple[Any, Trajectory]]:
    """(group, Trajectory) per line, validated. Lines without "entropies" are accepted only when
    allow_missing_entropies; their indices are appended to `missing`."""
    missing = [] if missing is None else missing
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or "id" not in obj:
                raise ValueError(f"{path}:{lineno}: expected an object with 'id'")
            tid = obj["id"]
            toks = obj.get("tokens")
            if not isinstance(toks, list) or not toks or not all(
                    isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in toks):
                raise _bad(path, lineno, tid, "'tokens' must be a non-empty list of ids >= 0")
            ents = obj.get("entropies")
            if ents is None and "entropies" not in obj and allow_missing_entropies:
                ents = [None] * len(toks)
                missing.append(len(out))
            def bad(msg, lineno=lineno, tid=tid):
                return _bad(path, lineno, tid, msg)

            if ents is None:
                raise bad(f"'entropies' must be a list of {len(toks)} values (one per token, null "
                          "where not sampled); without them, pass --checkpoint to compute them "
                          "with a forward pass")
            ent = per_token_floats(ents, len(toks), "entropies", "entropy", lambda x: x >= 0,
                                    ">= 0", bad)
            tags_in = obj.get("tags")
            tags = np.zeros(len(toks), np.int32)
            if tags_in is not None:
                if not isinstance(tags_in, list) or len(tags_in) != len(toks):
                    raise _bad(path, lineno, tid, f"'tags' must be a list of {len(toks)} values")
                for j, tag in enumerate(tags_in):
                    if tag is None:
                        continue
                    if tag not in TAGS:
                        raise _bad(path, lineno, tid, f"unknown tag {tag!r} at index {j}; known: "
                                   f"{sorted(TAGS)}")
                    tags[j] = TAGS[tag]
            lps_in = obj.get("logprobs")
            if need_logprobs and lps_in is None:
                raise _bad(path, lineno, tid, "--reach prob needs 'logprobs' (one per token, null "
                           "where not sampled)")
            lps = None if lps_in is None else per_token_floats(
                lps_in, len(toks), "logprobs", "log-prob", lambda x: x <= 0, "<= 0", bad)
            traj = Trajectory(np.asarray(toks), entropies=ent, tags=tags, id=tid,
                              behaviour_logprobs=lps)
            out.append((json.dumps(obj.get("group"), sort_keys=True), traj))
    if not out:
        raise ValueError(f"{path}: no rollouts")
    return out


def fill_entropies(rows: list[tuple[Any, Trajectory]], missing: list[int], checkpoint: str,
                   batch_tokens: int = 4096) -> None:
    """Entropies of the distributions each token was drawn from, by a forward pass of the model
    (kat_jax.training.scoring), for the trajectories listed in `missing` (token 0 gets 0: not predicted)."""
    from kat_jax.models.checkpoint import load_model
    from kat_jax.training.scoring import ScoreRecord, score_records

    model, cfg = load_model(checkpoint)
    for i in missing:
        traj = rows[i][1]
        traj.validate(cfg.vocab_size)
        if len(traj) > cfg.max_position_embeddings:
            raise ValueError(f"{traj.name()}: {len(traj)} tokens exceed the model's maximum of "
                             f"{cfg.max_position_embeddings}")
    records = [ScoreRecord(rows[i][1].id, rows[i][1].tokens) for i in missing]
    results, summary = score_records(model, records, batch_tokens)
    if summary["nonfinite_values"]:
        raise ValueError(f"{checkpoint}: the forward pass gave {summary['nonfinite_values']} "
                         "non-finite entropies")
    for i, (_, ent) in zip(missing, results):
        traj = rows[i][1]
        traj.entropies = np.concatenate([[0.0], np.maximum(ent, 0.0)]).astype(np.float32)


def run_prune(input_path: str, output_path: str, budget: int, reach: str = "share",
              keep_tags: tuple[str, ...] | None = None, fuse_tool_results: bool = True,
              checkpoint: str | None = None) -> dict[str, Any]:
    kw = {} if keep_tags is None else {"keep_tags": keep_tags}
    cfg = PruneConfig(budget=budget, reach=reach, fuse_tool_results=fuse_tool_results, **kw)
    missing: list[int] = []
    rows = read_rollouts(input_path, allow_missing_entropies=checkpoint is not None,
                         missing=missing, need_logprobs=reach == "prob")
    check_output_file(output_path)
    if missing:
        fill_entropies(rows, missing, checkpoint)
    groups: dict[str, list[int]] = {}
    for i, (g, _) in enumerate(rows):
        groups.setdefault(g, []).append(i)
    kept = [0] * len(rows)
    before = after = 0
    mass_all = mass_kept = 0.0
    for members in groups.values():
        trie = build_trie([rows[i][1] for i in members])
        # pad to a power of two: groups of similar size share one compiled pruner
        pad = 1 << max(4, (trie.num_nodes - 1).bit_length())
        nodes = node_arrays(trie, cfg.keep_tags, cfg.fuse_tool_results, pad_to=pad)
        keep = prune_trie(trie, cfg, nodes=nodes)
        for local, i in enumerate(members):
            n_kept = 0
            for n in trie.traj_path[local]:
                if not keep[n]:
                    break
                n_kept += int(trie.node_len[n])
            kept[i] = n_kept
        mass = (nodes.share * nodes.entropy)[:trie.num_nodes]
        mass_all += float(mass.sum())
        mass_kept += float(mass[keep].sum())
        before += trie.tree_tokens
        after += int(trie.node_len[keep].sum())
    write_jsonl_atomic(output_path, ({"id": traj.id, "kept": k} for (_, traj), k in zip(rows, kept)))
    summary = {"groups": len(groups), "trajectories": len(rows), "budget_per_group": budget,
               "tokens_before": before, "tokens_after": after,
               "entropy_mass_kept": 1.0 if mass_all == 0 else mass_kept / mass_all}
    print(f"pruned {len(rows)} trajectories in {len(groups)} groups -> {output_path}",
          file=sys.stderr)
    return summary
