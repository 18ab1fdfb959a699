"""Entropy-based tree pruning under a token budget, as one jit-compiled function.

The source describes: under a fixed compute budget keep the most valuable nodes; a node's information
is estimated from the entropy aggregated in the tree and the likelihood that the node is reached;
nodes are expanded in order of importance until the budget is spent; structurally important regions
(tool or memory events) and local context are kept. No formula was published; this is ours.

Per trie node n (a maximal shared segment of len(n) tokens):
    E(n)      = sum of the per-token entropies of its tokens (0 for tokens that were not sampled,
                e.g. the prompt); from the rollout, or from a scoring forward pass when absent;
    reach(n)  = "share": the fraction of the group's trajectories that pass through n, or
                "prob":  the product of the sampling probabilities of the tokens before n
                         (exp of the summed behaviour log-probs along the path; float32, so it
                         underflows to 0 below about -100 nats and such nodes then tie at key 0);
    prio(n)   = reach(n) * E(n) / len(n)       (reach-weighted entropy per token spent);
    tier(n)   = 1 if any token of n carries a tag in keep_tags (default tool_call, tool_result,
                memory), else 0;
    key(n)    = max of (tier, prio) over the subtree of n (lexicographic), which makes the key
                monotone along every path: a node is never more important than its parent.
Local-context rule: a node whose first token is a tool result is fused with its parent (a tool call is
never kept without its result, nor a result without its call); a fused group is kept or dropped whole,
so a call whose result differs between trajectories is kept with all of its results.

Best-first expansion: starting from the roots, repeatedly take the frontier group that is first in
the order (tier desc, key desc, pre-order index asc) and keep it if it fits in the remaining budget,
otherwise stop. Because keys are monotone and ties go to the earlier node in pre-order (a parent
precedes its descendants there), a parent always precedes its children in this order, so the
expansion keeps exactly the longest prefix of the sorted groups whose token count fits: the kept set
is closed under ancestors (every kept token has its context) and uses at most `budget` tokens.
Tagged (tier 1) regions come first, with their ancestors, whenever they fit.

The jitted implementation finds that prefix without sorting: (tier, key) is packed into one int32
(tier in bit 30, the float32 bits of the key without their lowest bit below it), and for each
coordinate of the order in turn (that int, then -index) a bisection over the integer range finds
the threshold where the token count crosses the remaining budget (each step is one masked sum over
the nodes), then narrows to the nodes equal to the last threshold. Everything is over fixed-size
padded arrays (pad nodes have valid = False); no Python loop over nodes, no host round trip.
Ancestor quantities (the subtree max and the path log-probabilities) use doubling: O(M log M).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from kat_jax.trees.trajectory import TAGS, tag_mask
from kat_jax.trees.trie import Trie

REACH_MODES = ("share", "prob")
DEFAULT_KEEP_TAGS = ("tool_call", "tool_result", "memory")


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    budget: int  # tokens kept per group, at most
    reach: str = "share"
    keep_tags: tuple[str, ...] = DEFAULT_KEEP_TAGS
    fuse_tool_results: bool = True

    def __post_init__(self):
        if self.reach not in REACH_MODES:
            raise ValueError(f"prune config: key 'reach' must be one of {REACH_MODES}, "
                             f"got {self.reach!r}")
        if not isinstance(self.budget, int) or not 0 < self.budget < 2**31:
            raise ValueError(f"prune config: key 'budget' must be a positive integer, got "
                             f"{self.budget!r}")
        tag_mask(self.keep_tags)


@dataclasses.dataclass
class NodeArrays:
    """Per-node inputs of the pruner, numpy, padded to M nodes (pre-order).

    parent int32 (-1 root or pad), end int32 (one past the subtree's last node), length int32,
    entropy float32 (sum over the node's tokens), share float32 (fraction of trajectories through
    the node), logp float32 (sum of the node's tokens' behaviour log-probs), tier int32 (1 =
    keep_tags), fuse bool (first token is a tool result: fused with the parent), valid bool."""

    parent: np.ndarray
    end: np.ndarray
    length: np.ndarray
    entropy: np.ndarray
    share: np.ndarray
    logp: np.ndarray
    tier: np.ndarray
    fuse: np.ndarray
    valid: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return dataclasses.asdict(self)


def node_arrays(trie: Trie, keep_tags=DEFAULT_KEEP_TAGS, fuse_tool_results: bool = True,
                pad_to: int | None = None) -> NodeArrays:
    """Host-side per-node inputs from a trie. Token quantities are read from the node's
    representative trajectory (trajectories through a node share its tokens; their entropies and
    log-probs are those of the same distributions when sampled by the same policy)."""
    m = trie.num_nodes
    if trie.tree_tokens >= 2**31:
        raise ValueError(f"a group of {trie.tree_tokens} tree tokens exceeds the pruner's int32 "
                         "token counts; prune smaller groups")
    size = m if pad_to is None else pad_to
    if size < m:
        raise ValueError(f"{m} nodes do not fit pad_to={size}")
    keep = tag_mask(keep_tags)
    out = NodeArrays(
        parent=np.full(size, -1, np.int32), end=np.arange(1, size + 1, dtype=np.int32),
        length=np.zeros(size, np.int32),
        entropy=np.zeros(size, np.float32), share=np.zeros(size, np.float32),
        logp=np.zeros(size, np.float32), tier=np.zeros(size, np.int32),
        fuse=np.zeros(size, bool), valid=np.zeros(size, bool))
    out.parent[:m] = trie.node_parent
    out.length[:m] = trie.node_len
    out.valid[:m] = True
    n_nodes_sub = np.ones(m, np.int64)
    for n in range(m - 1, 0, -1):
        if trie.node_parent[n] >= 0:
            n_nodes_sub[trie.node_parent[n]] += n_nodes_sub[n]
    out.end[:m] = np.arange(m) + n_nodes_sub
    through = np.zeros(m, np.int64)
    for path in trie.traj_path:
        through[path] += 1
    out.share[:m] = through / len(trie.trajectories)
    for n in range(m):
        t = trie.trajectories[trie.node_rep[n]]
        d, length = trie.node_depth[n], trie.node_len[n]
        if t.entropies is not None:
            out.entropy[n] = np.sum(t.entropies[d:d + length], dtype=np.float32)
        if t.behaviour_logprobs is not None:
            out.logp[n] = np.sum(t.behaviour_logprobs[d:d + length], dtype=np.float32)
        tags = t.tags[d:d + length]
        out.tier[n] = int(np.any(tags & keep))
        out.fuse[n] = bool(fuse_tool_results and trie.node_parent[n] >= 0
                           and tags[0] & TAGS["tool_result"])
    return out


# ---------------------------------------------------------------------------------------------
def _float_key_bits(x: jax.Array) -> jax.Array:
    """Monotone int32 image of non-negative float32 values."""
    return jax.lax.bitcast_convert_type(jnp.maximum(x, 0.0).astype(jnp.float32), jnp.int32)


def _ancestor_sum(values: jax.Array, parent: jax.Array, steps: int) -> jax.Array:
    """sum of values over the strict ancestors of each node (pointer doubling)."""
    # acc covers the ancestors at distances 1 .. 2^j; ptr is the ancestor at distance 2^j.
    acc = jnp.where(parent >= 0, values[jnp.maximum(parent, 0)], 0.0)
    ptr = parent
    for _ in range(steps):
        acc = acc + jnp.where(ptr >= 0, acc[jnp.maximum(ptr, 0)], 0.0)
        ptr = jnp.where(ptr >= 0, ptr[jnp.maximum(ptr, 0)], -1)
    return acc


def _group_root(parent: jax.Array, fuse: jax.Array, steps: int) -> jax.Array:
    """For each node, its nearest ancestor-or-self that is not fused (pointer doubling, stopping
    as soon as nothing changes: fused chains are short)."""
    idx = jnp.arange(parent.shape[0])
    g = jnp.where(fuse & (parent >= 0), parent, idx)

    def cond(c):
        g, changed, i = c
        return changed & (i < steps)

    def body(c):
        g, _, i = c
        g2 = g[g]
        return g2, jnp.any(g2 != g), i + 1

    g, _, _ = jax.lax.while_loop(cond, body, (g, jnp.any(g != idx), 0))
    return g


def _range_max(values: jax.Array, end: jax.Array, levels: int) -> jax.Array:
    """max(values[n:end[n]]) for every n (end[n] > n), by a sparse table of power-of-two windows.

    The table's levels 1.. are built by one scan (its stacked output is the table: no extra copy),
    and each query reads two windows of the right level with one gather each."""
    m = values.shape[0]
    pos = jnp.arange(m, dtype=jnp.int32)
    length = jnp.maximum(end - pos, 1).astype(jnp.int32)
    level = jnp.clip(31 - jax.lax.clz(length), 0, levels - 1)  # floor(log2(length))
    if levels <= 1:
        return values

    def body(prev, j):
        shift = jnp.left_shift(jnp.int32(1), j - 1)
        shifted = jnp.where(pos + shift < m, jnp.roll(prev, -shift), prev[-1])
        nxt = jnp.maximum(prev, shifted)
        return nxt, nxt

    _, rest = jax.lax.scan(body, values, jnp.arange(1, levels, dtype=jnp.int32))
    flat = rest.reshape(-1)  # level j >= 1 at rows j - 1
    row = jnp.maximum(level - 1, 0) * m
    b_pos = jnp.clip(end - jnp.left_shift(1, level), 0, m - 1)
    a = flat.at[row + pos].get(mode="promise_in_bounds")
    b = flat.at[row + b_pos].get(mode="promise_in_bounds")
    at_level0 = jnp.maximum(values, values.at[b_pos].get(mode="promise_in_bounds"))
    return jnp.where(level == 0, at_level0, jnp.maximum(a, b))


def _bisect_level(coord, eq, tokens, rem):
    """Among eq nodes: smallest t with tokens(eq & coord >= t) <= rem (coord int32)."""
    big = jnp.iinfo(jnp.int32).max
    lo = jnp.min(jnp.where(eq, coord, big))
    hi = jnp.max(jnp.where(eq, coord, -big)) + 1

    def count(t):
        return jnp.sum(jnp.where(eq & (coord >= t), tokens, 0))

    def cond(c):
        lo, hi = c
        return lo < hi

    def body(c):
        lo, hi = c
        mid = lo + (hi - lo) // 2
        fits = count(mid) <= rem
        return jnp.where(fits, lo, mid + 1), jnp.where(fits, mid, hi)

    lo = jnp.where(jnp.any(eq), lo, 0)
    hi = jnp.where(jnp.any(eq), hi, 0)
    t, _ = jax.lax.while_loop(cond, body, (lo, hi))
    return t


@partial(jax.jit, static_argnums=2)
def prune_keep_mask(nodes: dict, budget: jax.Array, reach_prob: bool = False
                    ) -> tuple[jax.Array, jax.Array]:
    """bool[M] keep mask (ancestor-closed, <= budget tokens) and the int32 key of each node.

    nodes: the NodeArrays fields as arrays; budget: int32 scalar; reach_prob: static, "prob" reach.
    """
    parent, end = nodes["parent"], nodes["end"]
    length, valid = nodes["length"], nodes["valid"]
    m = parent.shape[0]
    steps = max(1, int(np.ceil(np.log2(max(m, 2)))))
    if reach_prob:
        reach = jnp.exp(_ancestor_sum(nodes["logp"], parent, steps))
    else:
        reach = nodes["share"]
    prio = reach * nodes["entropy"] / jnp.maximum(length, 1).astype(jnp.float32)
    prio = jnp.where(valid, prio, 0.0)
    # One int32 per node, monotone in (tier, prio) lexicographically: tier in bit 30, the float32
    # bits of prio (>= 0, finite) shifted right by one below it (prio loses its lowest mantissa
    # bit: values 1 ulp apart tie, and ties go to the earlier node in pre-order). key = its subtree max.
    own = (jnp.where(valid, nodes["tier"], 0).astype(jnp.int32) << 30) | (
        _float_key_bits(prio) >> 1)
    own = jnp.where(valid, own, -1)
    key = _range_max(own, end, steps + 1)
    # Fused groups take their root's key and index.
    g = _group_root(parent, nodes["fuse"] & valid, steps)
    key = key[g]
    tokens = jnp.where(valid, length, 0)
    rem = budget.astype(jnp.int32)
    eq = valid
    selected = jnp.zeros(m, bool)
    for coord in (key, -g.astype(jnp.int32)):
        coord = coord.astype(jnp.int32)
        t = _bisect_level(coord, eq, tokens, rem)
        take = eq & (coord >= t)
        selected = selected | take
        rem = rem - jnp.sum(jnp.where(take, tokens, 0))
        below = eq & (coord < t)
        nxt = jnp.max(jnp.where(below, coord, jnp.iinfo(jnp.int32).min))
        eq = below & (coord == nxt)
    return selected, key


def prune_trie(trie: Trie, cfg: PruneConfig, pad_to: int | None = None,
               nodes: NodeArrays | None = None) -> np.ndarray:
    """bool[num_nodes] keep mask of a trie under cfg (the jitted pruner on padded arrays).
    nodes: node_arrays(trie, cfg.keep_tags, cfg.fuse_tool_results, pad_to), when the caller
    already has them."""
    shortest = min(trie.roots, key=lambda r: trie.node_len[r])
    if cfg.budget < trie.node_len[shortest]:
        t = trie.trajectories[trie.node_rep[shortest]]
        raise ValueError(f"{t.name()}: budget {cfg.budget} is smaller than its root path "
                         f"({int(trie.node_len[shortest])} tokens shared before any branch)")
    if nodes is None:
        nodes = node_arrays(trie, cfg.keep_tags, cfg.fuse_tool_results, pad_to)
    keep, _ = prune_keep_mask({k: jnp.asarray(v) for k, v in nodes.as_dict().items()},
                              jnp.int32(cfg.budget), cfg.reach == "prob")
    keep = np.asarray(keep)[:trie.num_nodes]
    if not keep.any():
        # The first group in importance order (a root with any fused tool results) does not fit.
        t = trie.trajectories[trie.node_rep[trie.roots[0]]]
        raise ValueError(f"{t.name()}: budget {cfg.budget} keeps nothing: the most important root "
                         "group (a root path, with any tool results fused to it) is larger")
    return keep


def prune_group(trie: Trie, cfg: PruneConfig) -> tuple[np.ndarray, NodeArrays]:
    """(keep mask, node arrays) of one group's trie, its nodes padded to a power of two (>= 16) so
    that groups of similar size share one compiled pruner."""
    pad = 1 << max(4, (trie.num_nodes - 1).bit_length())
    nodes = node_arrays(trie, cfg.keep_tags, cfg.fuse_tool_results, pad_to=pad)
    return prune_trie(trie, cfg, nodes=nodes), nodes


def kept_lengths(trie: Trie, keep: np.ndarray) -> list[int]:
    """Per trajectory of the trie, the tokens of its path kept by `keep` (closed under ancestors:
    what remains of a trajectory is a prefix)."""
    out = []
    for path in trie.traj_path:
        n_kept = 0
        for n in path:
            if not keep[n]:
                break
            n_kept += int(trie.node_len[n])
        out.append(n_kept)
    return out
