"""Pruning on the training path (config prune.*): each group's trie goes through the entropy
pruner under prune.budget before packing; pruned tokens are not laid out (no compute), are not
trained on, and are marked in StepBatch.pruned (loss.count_pruned_in_denominator)."""

import json

import numpy as np
import pytest

from kat_jax.data.pipeline import BatchShape, make_step_iterator
from kat_jax.data.rollout_pruning import group_key, prune_groups, prune_trajectory
from kat_jax.data.tokenizer import ByteTokenizer
from kat_jax.trees.pruning import PruneConfig

TOK = ByteTokenizer()
PROMPT = 12


def _records(seed: int, groups: int = 3):
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(groups):
        prompt = [int(x) for x in rng.integers(0, 256, PROMPT)]
        stems = [[int(x) for x in rng.integers(0, 256, int(rng.integers(2, 8)))] for _ in range(2)]
        for k in range(4):
            n = int(rng.integers(4, 20))
            gen = stems[k % 2] + [int(x) for x in rng.integers(0, 256, n)]
            rows.append({"id": f"{g}-{k}", "group": g, "tokens": prompt + gen,
                         "logprobs": [None] * PROMPT + [-1.0] * len(gen),
                         "entropies": [None] * PROMPT + [float(x) for x in
                                                         rng.uniform(0, 3, len(gen))],
                         "reward": float(k % 3)})
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _batches(path, prune, fields=("behaviour_logprobs",)):
    shape = BatchShape(4, 128, 16, 16, fields + (("pruned",) if prune else ()), prune)
    return list(make_step_iterator([path], "rl", TOK, shape, 512, 1, 1, shuffle=False, epochs=1))


@pytest.mark.parametrize("seed,budget", [(0, 30), (1, 45), (2, 40)])
def test_pruned_batches_keep_what_the_pruner_keeps(tmp_path, seed, budget):
    rows = _records(seed)
    path = _write(tmp_path / "r.jsonl", rows)
    cfg = PruneConfig(budget=budget)
    # the reference: `kat-jax prune`'s per-group computation, trajectory by trajectory
    want, ref_stats = prune_groups([prune_trajectory(r) for r in rows], [group_key(r) for r in rows],
                                   cfg)
    want = dict(zip((r["id"] for r in rows), want))
    full = _batches(path, None)
    pruned = _batches(path, cfg)
    assert len(full) == len(pruned) == 1
    (b0, s0), (b1, s1) = full[0], pruned[0]
    assert s1["tree_tokens"] == s0["tree_tokens"] == ref_stats["tokens_before"]
    assert s1["kept_tokens"] == ref_stats["tokens_after"] < s0["kept_tokens"]
    assert s1["computed_tokens"] < s0["computed_tokens"]  # pruned tokens are not laid out
    order = [r["id"] for r in rows]  # packed in file order (one batch, no shuffle)
    for k, rid in enumerate(order):
        n = len(rows[k]["tokens"])
        valid = np.asarray(b1.valid[0, 0, k, :n])
        kept = want[rid]
        assert valid[:kept].all() and not valid[kept:].any(), rid  # a kept prefix
        was = np.asarray(b0.trainable[0, 0, k, :n])
        assert (np.asarray(b1.trainable[0, 0, k, :n]) == (was & valid)).all()
        assert (np.asarray(b1.pruned[0, 0, k, :n]) == (was & ~valid)).all()
        # what is kept is computed exactly as without pruning (same tokens, same positions)
        idx = np.asarray(b1.traj_index[0, 0, k, :kept])
        toks = np.asarray(b1.tokens[0, 0]).reshape(-1)[idx]
        assert toks.tolist() == rows[k]["tokens"][:kept]
    for g in range(3):  # each group within its budget
        ids = [r["id"] for r in rows if r["group"] == g]
        assert max(want[i] for i in ids) <= budget


def test_a_budget_below_the_shared_prompt_is_an_error(tmp_path):
    path = _write(tmp_path / "r.jsonl", _records(0))
    with pytest.raises(ValueError, match=r"prune.budget=8 is below the shared prompt of group 0 "
                                         r"\(1[2-9] tokens\)"):
        _batches(path, PruneConfig(budget=8))
