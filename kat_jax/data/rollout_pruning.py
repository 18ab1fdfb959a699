"""What an entropy-pruning token budget keeps of groups of rollout records (`kat-jax prune`).

    trajs = [prune_trajectory(obj) for obj, _ in read_rollouts(path, FOR_PRUNING, min_tokens=1)]
    kept, stats = prune_groups(trajs, [group_key(obj) for obj, _ in rows], PruneConfig(budget=...))

Each group becomes one prefix trie, pruned by kat_jax.trees.pruning. Pruning removes whole
subtrees, so what remains of a trajectory is a prefix: kept[i] is its length in tokens.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from kat_jax.data.records import per_token_array, tag_array
from kat_jax.trees.pruning import PruneConfig, kept_lengths, prune_group
from kat_jax.trees.trajectory import Trajectory
from kat_jax.trees.trie import build_trie


def group_key(obj: dict[str, Any]) -> str:
    """The record's "group" as a hashable key (absent: null, one group for all such records)."""
    return json.dumps(obj.get("group"), sort_keys=True)


def prune_trajectory(obj: dict[str, Any]) -> Trajectory:
    """A validated record -> Trajectory(tokens, entropies (0 where null or absent), tags,
    behaviour log-probs)."""
    tokens = np.asarray(obj["tokens"])
    ent = per_token_array(obj, "entropies")
    return Trajectory(tokens, entropies=np.zeros(len(tokens), np.float32) if ent is None else ent,
                      tags=tag_array(obj), id=obj.get("id"),
                      behaviour_logprobs=per_token_array(obj, "logprobs"))


def prune_groups(trajs: Sequence[Trajectory], groups: Sequence[Hashable], cfg: PruneConfig
                 ) -> tuple[list[int], dict[str, Any]]:
    """Per trajectory: the number of leading tokens kept; and statistics: groups, tokens_before /
    tokens_after (distinct tree tokens) and entropy_mass_kept (share of sum(share * entropy) kept,
    share-of-trajectories reach whatever cfg.reach is)."""
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    kept = [0] * len(trajs)
    before = after = 0
    mass_all = mass_kept = 0.0
    for idx in members.values():
        trie = build_trie([trajs[i] for i in idx])
        keep, nodes = prune_group(trie, cfg)
        for i, n_kept in zip(idx, kept_lengths(trie, keep)):
            kept[i] = n_kept
        mass = (nodes.share * nodes.entropy)[:trie.num_nodes]
        mass_all += float(mass.sum())
        mass_kept += float(mass[keep].sum())
        before += trie.tree_tokens
        after += int(trie.node_len[keep].sum())
    stats = {"groups": len(members), "tokens_before": before, "tokens_after": after,
             "entropy_mass_kept": 1.0 if mass_all == 0 else mass_kept / mass_all}
    return kept, stats
