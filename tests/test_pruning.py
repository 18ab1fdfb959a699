"""The jitted entropy pruner selects exactly what a plain Python best-first expansion selects."""

import heapq

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tree_cases import random_trajectories

from kat_jax.trees.packing import pack_trie
from kat_jax.trees.pruning import PruneConfig, node_arrays, prune_trie
from kat_jax.trees.trajectory import TAGS, Trajectory, tag_mask
from kat_jax.trees.trie import build_trie

PAD_TO = 256  # fixed padded size: one compilation for all examples


def with_entropies(trajs, rng, tag_prob=0.1):
    """Entropies and log-probs on a 1/8 grid (exact float32 sums), random tags."""
    out = []
    for t in trajs:
        n = len(t)
        ent = rng.integers(0, 24, n) / 8.0
        ent[: rng.integers(0, 3)] = 0.0  # un-sampled prompt tokens
        lp = -rng.integers(0, 8, n) / 8.0
        tags = np.where(rng.random(n) < tag_prob, rng.choice([1, 2, 4], n), 0)
        out.append(Trajectory(t.tokens, entropies=ent, behaviour_logprobs=lp, tags=tags, id=t.id))
    return out


def reference_prune(trie, cfg):
    """Plain Python: keys by recursion, groups by fusing tool results, best-first with a heap."""
    m = trie.num_nodes
    keep_bits = tag_mask(cfg.keep_tags)
    f32 = np.float32
    ent, tier, fuse, reach = [], [], [], []
    through = [0] * m
    for path in trie.traj_path:
        for n in path:
            through[n] += 1
    for n in range(m):
        t = trie.trajectories[trie.node_rep[n]]
        d, ln = int(trie.node_depth[n]), int(trie.node_len[n])
        ent.append(np.sum(t.entropies[d:d + ln], dtype=f32))
        tags = t.tags[d:d + ln]
        tier.append(int(any(int(x) & keep_bits for x in tags)))
        fuse.append(cfg.fuse_tool_results and trie.node_parent[n] >= 0
                    and bool(int(tags[0]) & TAGS["tool_result"]))
        if cfg.reach == "share":
            reach.append(f32(through[n]) / f32(len(trie.trajectories)))
        else:
            s, a = f32(0), trie.node_parent[n]
            while a >= 0:
                ta = trie.trajectories[trie.node_rep[a]]
                da, la = int(trie.node_depth[a]), int(trie.node_len[a])
                s = f32(s + np.sum(ta.behaviour_logprobs[da:da + la], dtype=f32))
                a = trie.node_parent[a]
            reach.append(np.exp(f32(s)))
    prio = [f32(reach[n]) * ent[n] / f32(max(trie.node_len[n], 1)) for n in range(m)]

    def own(n):  # (tier, prio) with prio's lowest mantissa bit dropped, as documented
        return (tier[n], int(np.float32(prio[n]).view(np.int32)) >> 1)

    def key(n):
        best = own(n)
        for c in trie.children[n]:
            best = max(best, key(c))
        return best

    keys = [key(n) for n in range(m)]

    def group_root(n):
        while fuse[n]:
            n = trie.node_parent[n]
        return n

    members = {}
    for n in range(m):
        members.setdefault(group_root(n), []).append(n)

    def order(g):
        return (-keys[g][0], -keys[g][1], g)

    heap = [(order(r), r) for r in trie.roots]
    heapq.heapify(heap)
    keep, used = np.zeros(m, bool), 0
    while heap:
        _, g = heapq.heappop(heap)
        cost = sum(int(trie.node_len[n]) for n in members[g])
        if used + cost > cfg.budget:
            break
        used += cost
        for n in members[g]:
            keep[n] = True
        for n in members[g]:
            for c in trie.children[n]:
                if not fuse[c]:
                    heapq.heappush(heap, (order(c), c))
    return keep


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 10), st.sampled_from(["share", "prob"]),
       st.floats(0.1, 1.0), st.booleans())
def test_jitted_pruner_equals_python_best_first(seed, n, reach, frac, fuse):
    rng = np.random.default_rng(seed)
    trajs = with_entropies(random_trajectories(rng, n, 20, vocab=4), rng)
    trie = build_trie(trajs)
    shortest_root = min(int(trie.node_len[r]) for r in trie.roots)
    budget = max(shortest_root, int(frac * trie.tree_tokens))
    cfg = PruneConfig(budget=budget, reach=reach, fuse_tool_results=fuse)
    ref = reference_prune(trie, cfg)
    if not ref.any():  # the first group in order does not fit: an error, never a silent empty set
        with pytest.raises(ValueError, match="keeps nothing"):
            prune_trie(trie, cfg, pad_to=PAD_TO)
        return
    ours = prune_trie(trie, cfg, pad_to=PAD_TO)
    np.testing.assert_array_equal(ours, ref)
    assert int(trie.node_len[ours].sum()) <= budget
    par = trie.node_parent
    assert not np.any(ours & (par >= 0) & ~ours[np.maximum(par, 0)])  # ancestor-closed


def test_tagged_regions_are_kept_before_higher_entropy_ones():
    prompt = list(range(10))
    calm_tool = Trajectory(prompt + [20, 21, 22], entropies=[0.0] * 10 + [0.1] * 3,
                           tags=[0] * 10 + [TAGS["tool_call"]] * 3, id="tool")
    noisy = Trajectory(prompt + [30, 31, 32], entropies=[0.0] * 10 + [3.0] * 3, id="noisy")
    trie = build_trie([calm_tool, noisy])
    keep = prune_trie(trie, PruneConfig(budget=13))
    kept_ids = {trie.trajectories[trie.node_rep[n]].id for n in np.flatnonzero(keep)
                if trie.node_depth[n] > 0}
    assert kept_ids == {"tool"}
    keep = prune_trie(trie, PruneConfig(budget=13, keep_tags=()))
    kept_ids = {trie.trajectories[trie.node_rep[n]].id for n in np.flatnonzero(keep)
                if trie.node_depth[n] > 0}
    assert kept_ids == {"noisy"}


def test_tool_call_is_never_kept_without_its_result():
    prompt = list(range(6))
    call, res = [TAGS["tool_call"]] * 2, TAGS["tool_result"]
    a = Trajectory(prompt + [40, 41, 50, 51, 52], entropies=[1.0] * 11,
                   tags=[0] * 6 + call + [res] * 3, id="a")
    b = Trajectory(prompt + [40, 41, 60], entropies=[1.0] * 9, tags=[0] * 6 + call + [res], id="b")
    c = Trajectory(prompt + [70], entropies=[1.0] * 7, id="c")
    trie = build_trie([a, b, c])  # prompt; then the shared call (two results) or c's token
    call_node = next(n for n in range(trie.num_nodes) if trie.node_tokens(n)[0] == 40)
    # The call with its results is one unit of 2 + 3 + 1 tokens; with 8 tokens it cannot fit,
    # although the call alone (2) would. The expansion stops at the first unit that does not fit.
    keep = prune_trie(trie, PruneConfig(budget=8))
    assert not keep[call_node] and int(trie.node_len[keep].sum()) == 6
    keep = prune_trie(trie, PruneConfig(budget=12))  # tagged unit first, then c would not fit
    assert keep[call_node] and int(trie.node_len[keep].sum()) == 12
    keep = prune_trie(trie, PruneConfig(budget=8, fuse_tool_results=False))
    assert keep[call_node]  # without the rule the call is kept alone


def test_packing_a_pruned_tree_drops_tokens_from_compute_and_loss():
    rng = np.random.default_rng(0)
    trajs = with_entropies(random_trajectories(rng, 6, 20, vocab=4), rng)
    trie = build_trie(trajs)
    keep = prune_trie(trie, PruneConfig(budget=max(trie.tree_tokens // 2,
                                                   int(trie.node_len[trie.roots].max()))))
    batch = pack_trie(trie, 64, keep=keep)
    assert batch.laid_out_tokens == batch.tree_tokens == int(trie.node_len[keep].sum())
    for k, t in enumerate(trajs):
        kept_len = sum(int(trie.node_len[n]) for n in trie.traj_path[k] if keep[n])
        idx = batch.batch.traj_index[k, :len(t)]
        assert np.all(idx[:kept_len] >= 0) and np.all(idx[kept_len:] < 0)  # a kept prefix
        assert not batch.batch.trainable[k, kept_len:].any()
        assert batch.batch.pruned[k, kept_len:len(t)].sum() == \
            t.trainable[max(kept_len, 1):].sum()


def test_budget_smaller_than_the_root_path_is_an_error():
    trie = build_trie([Trajectory(list(range(10)), id="r"), Trajectory(list(range(10)) + [3])])
    with pytest.raises(ValueError, match="trajectory 'r'.*smaller than its root path"):
        prune_trie(trie, PruneConfig(budget=5))


def test_node_arrays_pad_nodes_are_inert():
    trie = build_trie([Trajectory([1, 2, 3], entropies=[0, 1, 1])])
    arrays = node_arrays(trie, pad_to=8)
    assert arrays.valid.sum() == 1 and np.all(arrays.end[1:] == np.arange(2, 9))
