"""`kat-jax prune`: what an entropy-pruning budget keeps of groups of rollouts.

Input JSONL: rollout records (kat_jax.data.records) with "id", "tokens", "entropies" (null where the
token was not sampled, e.g. the prompt), and optionally "tags", "logprobs" (behaviour log-probs,
for --reach prob) and "group" (absent means one group).
Lines without "entropies" get them from a forward pass of --checkpoint (any loadable model), if
given; otherwise they are an error. Each group becomes one prefix trie, pruned with --budget tokens
(kat_jax.data.rollout_pruning, kat_jax.trees.pruning).
Output JSONL, same order: {"id", "kept"}: how many leading tokens of the trajectory remain (pruning
removes whole subtrees, so what remains of a trajectory is a prefix). The last stdout line is a JSON
summary: groups, trajectories, tokens_before / tokens_after (distinct tree tokens), and
entropy_mass_kept (share of sum(share * entropy) kept, with share-of-trajectories reach whatever
--reach is). Entropies computed by --checkpoint cover every token after the first (the model's
entropy at prompt tokens too).

Bad input is an error naming the file, line and trajectory, and no output file is left behind.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kat_jax.commands import CHECKPOINT_HELP

NAME = "prune"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME, help="entropy-based tree pruning of rollouts under a budget",
        description="Per group, keep the most informative nodes of the rollouts' prefix tree "
        "within --budget tokens; write {\"id\", \"kept\"} per line (leading tokens kept); the last "
        "stdout line is a JSON summary.")
    p.add_argument("--input", required=True,
                   help="JSONL {id, tokens, entropies (null where not sampled), tags?, group?}")
    p.add_argument("--output", required=True, help="output JSONL (written atomically)")
    p.add_argument("--budget", type=int, required=True, help="tokens kept per group, at most")
    p.add_argument("--reach", choices=("share", "prob"), default="share",
                   help="reach likelihood: share of trajectories through a node (default), or "
                   "product of sampling probabilities (needs behaviour log-probs)")
    p.add_argument("--keep-tags", default=None,
                   help="comma-separated tags kept first (default tool_call,tool_result,memory; "
                   "'' for none)")
    p.add_argument("--checkpoint", default=None,
                   help="compute entropies by a forward pass for lines without them; "
                   + CHECKPOINT_HELP)
    p.add_argument("--no-fuse-tool-results", action="store_true",
                   help="allow a tool call to be kept without its result")
    return p


def run(args: argparse.Namespace) -> int:
    keep_tags = None if args.keep_tags is None else tuple(
        t for t in args.keep_tags.split(",") if t)
    summary = run_prune(args.input, args.output, args.budget, reach=args.reach,
                        keep_tags=keep_tags, fuse_tool_results=not args.no_fuse_tool_results,
                        checkpoint=args.checkpoint)
    print(json.dumps(summary))
    return 0


def _read(path: str, reach: str, checkpoint: str | None) -> list[tuple[dict[str, Any], str]]:
    """Validated records; the error for a missing field says how to supply it."""
    from kat_jax.data.records import FOR_PRUNING, RolloutError, read_rollouts

    require = [f for f in FOR_PRUNING if not (f == "entropies" and checkpoint)]
    if reach == "prob":
        require.append("logprobs")
    try:
        return read_rollouts(path, require, min_tokens=1)
    except RolloutError as e:
        if e.missing and e.field == "entropies":
            raise ValueError(f"{e}; without them, pass --checkpoint to compute them with a "
                             "forward pass") from None
        if e.missing and e.field == "logprobs":
            raise ValueError(f"{e}; --reach prob needs them") from None
        raise


def fill_entropies(trajs: list, checkpoint: str, batch_tokens: int = 4096) -> None:
    """Entropies of the distributions each token was drawn from, by a forward pass of the model
    (kat_jax.training.scoring), for the given trajectories (token 0 gets 0: not predicted)."""
    import numpy as np

    from kat_jax.models.checkpoint import load_model
    from kat_jax.training.scoring import ScoreRecord, score_records

    model, cfg = load_model(checkpoint)
    for traj in trajs:
        traj.validate(cfg.vocab_size)
        if len(traj) > cfg.max_position_embeddings:
            raise ValueError(f"{traj.name()}: {len(traj)} tokens exceed the model's maximum of "
                             f"{cfg.max_position_embeddings}")
    results, summary = score_records(model, [ScoreRecord(t.id, t.tokens) for t in trajs],
                                     batch_tokens)
    if summary["nonfinite_values"]:
        raise ValueError(f"{checkpoint}: the forward pass gave {summary['nonfinite_values']} "
                         "non-finite entropies")
    for traj, (_, ent) in zip(trajs, results):
        traj.entropies = np.concatenate([[0.0], np.maximum(ent, 0.0)]).astype(np.float32)


def run_prune(input_path: str, output_path: str, budget: int, reach: str = "share",
              keep_tags: tuple[str, ...] | None = None, fuse_tool_results: bool = True,
              checkpoint: str | None = None) -> dict[str, Any]:
    from kat_jax.atomic_io import check_output_file, write_jsonl_atomic
    from kat_jax.data.rollout_pruning import group_key, prune_groups, prune_trajectory
    from kat_jax.trees.pruning import PruneConfig

    kw = {} if keep_tags is None else {"keep_tags": keep_tags}
    cfg = PruneConfig(budget=budget, reach=reach, fuse_tool_results=fuse_tool_results, **kw)
    rows = _read(input_path, reach, checkpoint)
    check_output_file(output_path)
    trajs = [prune_trajectory(obj) for obj, _ in rows]
    missing = [t for t, (obj, _) in zip(trajs, rows) if obj.get("entropies") is None]
    if missing:
        fill_entropies(missing, checkpoint)
    kept, stats = prune_groups(trajs, [group_key(obj) for obj, _ in rows], cfg)
    write_jsonl_atomic(output_path, ({"id": t.id, "kept": k} for t, k in zip(trajs, kept)))
    print(f"pruned {len(trajs)} trajectories in {stats['groups']} groups -> {output_path}",
          file=sys.stderr)
    return {"groups": stats["groups"], "trajectories": len(trajs), "budget_per_group": budget,
            "tokens_before": stats["tokens_before"], "tokens_after": stats["tokens_after"],
            "entropy_mass_kept": stats["entropy_mass_kept"]}
