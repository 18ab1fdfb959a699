"""Prefix tries and packed rows: structure, exact visibility under splits, clear errors."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tree_cases import random_trajectories

from kat_jax.trees.packing import pack_trajectories, pack_trie
from kat_jax.trees.trajectory import Trajectory
from kat_jax.trees.trie import build_trie

cases = st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 12), st.integers(1, 24),
                  st.integers(2, 6))


def distinct_prefixes(trajs):
    return len({tuple(t.tokens[:j + 1].tolist()) for t in trajs for j in range(len(t))})


@settings(max_examples=60, deadline=None)
@given(cases)
def test_trie_paths_rebuild_trajectories_and_nodes_are_maximal(case):
    seed, n, max_len, vocab = case
    trajs = random_trajectories(np.random.default_rng(seed), n, max_len, vocab)
    trie = build_trie(trajs)
    assert trie.tree_tokens == distinct_prefixes(trajs)
    ends = np.zeros(trie.num_nodes, int)
    for k, t in enumerate(trajs):
        path = trie.traj_path[k]
        np.testing.assert_array_equal(np.concatenate([trie.node_tokens(n) for n in path]), t.tokens)
        depth = 0
        for a, b in zip([-1] + path[:-1], path):
            assert trie.node_parent[b] == a and trie.node_depth[b] == depth
            depth += trie.node_len[b]
        ends[path[-1]] += 1
    for node in range(trie.num_nodes):
        assert trie.node_len[node] > 0
        # maximal: a node with a single child must be where some trajectory ends
        if len(trie.children[node]) == 1:
            assert ends[node] > 0
        assert node > trie.node_parent[node]  # pre-order
        firsts = [int(trie.node_tokens(c)[0]) for c in trie.children[node]]
        assert firsts == sorted(set(firsts))  # siblings differ in their first token


def check_rows_are_exact(packed, trajs):
    """Every token of every trajectory, at its primary placement, sees exactly its own prefix (in
    order, at the right positions), and parent points at the previous token of the trajectory."""
    batch, primary = packed.batch, packed.primary
    t_len = batch.row_len
    cols = np.arange(t_len)
    for k, traj in enumerate(trajs):
        for j in range(len(traj)):
            flat = batch.traj_index[k, j]
            r, c = divmod(int(flat), t_len)
            assert primary[r, c]
            visible = cols[(cols <= c) & (c < batch.subtree_end[r])]
            np.testing.assert_array_equal(batch.tokens[r, visible], traj.tokens[:j + 1])
            np.testing.assert_array_equal(batch.positions[r, visible], np.arange(j + 1))
            parent = batch.parent[r, c]
            assert parent == (-1 if j == 0 else visible[-2])
    # padding: one-token trees
    pad = ~(primary | (batch.subtree_end > cols + 1) | (batch.parent >= 0))
    assert np.all(batch.subtree_end[pad] == (cols + 1)[np.nonzero(pad)[1]])


@settings(max_examples=60, deadline=None)
@given(cases, st.integers(0, 3))
def test_packed_rows_show_each_token_exactly_its_prefix_even_when_trees_are_split(case, extra):
    seed, n, max_len, vocab = case
    trajs = random_trajectories(np.random.default_rng(seed), n, max_len, vocab)
    longest = max(len(t) for t in trajs)
    row_len = longest + extra  # tight rows force splits with repeated context
    trie = build_trie(trajs)
    batch = pack_trie(trie, row_len)
    check_rows_are_exact(batch, trajs)
    assert batch.tree_tokens == distinct_prefixes(trajs)
    assert int(batch.primary.sum()) == batch.tree_tokens  # every shared token laid out once
    assert batch.laid_out_tokens >= batch.tree_tokens
    if trie.tree_tokens <= row_len:
        assert batch.num_rows == 1 and batch.laid_out_tokens == batch.tree_tokens
    # trainable: the trajectory's own trainable tokens after the first (they have a prediction)
    for k, t in enumerate(trajs):
        tr = t.trainable.copy()
        tr[0] = False
        np.testing.assert_array_equal(batch.batch.trainable[k, :len(t)], tr)
        assert not batch.batch.trainable[k, len(t):].any() and batch.batch.valid[k, :len(t)].all()


def test_wide_and_deep_trees():
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 50, 40).tolist()
    wide = [Trajectory(prompt + [i]) for i in range(50)]  # 50 single-token branches
    deep, s = [], list(prompt)
    for _ in range(30):  # every turn extends the last
        s = s + rng.integers(0, 50, 3).tolist()
        deep.append(Trajectory(list(s)))
    for trajs, row_len in ((wide, 64), (deep, 256), (wide + deep, 160)):
        batch = pack_trajectories(trajs, row_len)
        check_rows_are_exact(batch, trajs)
    batch = pack_trajectories(deep, 256)
    assert batch.tree_tokens == 40 + 90 and batch.total_tokens == sum(len(t) for t in deep)


def test_bad_trajectories_are_named():
    with pytest.raises(ValueError, match="trajectory 'e'.*non-empty"):
        Trajectory([], id="e")
    with pytest.raises(ValueError, match="trajectory 'r'.*reward"):
        Trajectory([1, 2], reward=math.nan, id="r")
    with pytest.raises(ValueError, match="trajectory 'v'.*outside the vocabulary"):
        pack_trajectories([Trajectory([1, 2]), Trajectory([1, 99], id="v")], vocab_size=50)
    with pytest.raises(ValueError, match="trajectory 'long'.*do not fit rows of 8"):
        pack_trajectories([Trajectory(list(range(9)), id="long")], row_len=8)
    kept = pack_trajectories([Trajectory(list(range(9)), id="long"), Trajectory([1, 2], id="ok")],
                             row_len=8, drop_overlong=True)
    assert kept.dropped == ["long"] and kept.total_tokens == 2
    with pytest.raises(ValueError, match="'trainable' has shape"):
        Trajectory([1, 2, 3], trainable=[True], id="m")
    with pytest.raises(ValueError, match="need 2 rows"):
        pack_trajectories([Trajectory([1] * 8), Trajectory([2] * 8)], row_len=8, num_rows=1)
