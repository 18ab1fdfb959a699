"""Context parallelism for packed tree rows: the tokens of each row split over a 'context' mesh axis.

Rule (ARCHITECTURE.md): query q may see key k iff  k <= q < subtree_end[k].  A row of T tokens is
cut into nb = T // bs blocks (bs = tree_mask.effective_block_size(block_size, T), the attention
block), and its q blocks are dealt to the C shards of the 'context' axis, nb / C blocks each.

Balance (`balance_query_blocks`). Trees are not causal triangles: the work of q block i is its
number of live (q block, kv block) pairs a_i (kv blocks j <= i holding a key it can see; the
diagonal is always live, so a_i >= 1). The blocks are sorted by a_i, descending, and dealt in a
snake (round r gives its C blocks to shards 0 .. C-1 when r is even, C-1 .. 0 when odd); each shard
gets exactly nb / C blocks. Bound (proved in the docstring of balance_query_blocks): for any two
shards the live pairs differ by at most max(a) - min(a), so every shard holds at most
    total / C + max(a) - min(a)   <=   nb (nb + 1) / (2 C) + nb - 1   live pairs
(`shard_pairs_bound`; the right side is the static per-shard schedule length used under jit).
The contiguous split (shard s = blocks s*nb/C ...) of a causal chain puts ~(2C - 1) / C^2 of the
pairs on the last shard instead (7/16 for C = 4).

Layout (`context_layout`, jittable, also runs on numpy). block_perm[b, p] is the original block
at slot p of the permuted row, so shard s holds slots [s * nb / C, (s + 1) * nb / C); tokens,
positions, parents and subtree_end are permuted by token_perm (the block permutation at token
level; subtree_end keeps its values, which are original indices). Every per-token computation
(embedding, norms, MLP, RoPE, log-probs through a remapped parent) runs in the permuted order
sharded over 'context' on the token axis; only attention needs the original order.

Attention (`context_tree_attention`, inside shard_map over the mesh set with jax.set_mesh):
K, V and subtree_end are all-gathered over 'context' (the documented choice: each device then
holds K and V of its whole row, O(T * K * H); a ring that streams kv blocks is a later option) and
un-permuted to the original order. Each shard then attends only its own q blocks:
  xla_dense         queries at their original indices (dense.xla_dense_attention with q_index):
                    O(T / C * T) per shard.
  xla_block_sparse  the shard's own schedule: its live pairs only, listed by original block ids
                    (q_block, k_block, kind: [B, C * P], shard s's P pairs at [s * P, (s + 1) * P),
                    P = shard_pairs_bound), run on a full-length query array in which only its
                    own blocks are non-zero. Work follows the shard's pairs; memory holds
                    full-length float32 accumulators (O(T * N * H) per device, like the gathered
                    K and V times G).
  pallas            the same full-length query array. GPU (Triton; interpreted on CPU, tested):
                    the kernel's lists computed in jit with q_kv_count zeroed for other shards'
                    q blocks, so forward and dQ skip them; the dK/dV kernel still walks them
                    (exact zeros): not balanced in the backward. TPU: the kernel builds its own
                    full schedule, so every shard does the whole row's attention work (exact, no
                    saving; not run here).
Gradients: autodiff through the all-gather (its transpose is a reduce-scatter) returns dK and dV
to the shards that own those tokens; dQ stays on its shard. Exact: every query sees exactly the
keys it sees unsharded, so outputs and gradients equal the single-device ones up to float rounding.

Where the layout is built: inside the step (jit, `kat_jax.training.step.forward_logprobs`), from
subtree_end, not by the host packer: the StepBatch and the data pipeline stay as they are and the
same batches run on any mesh. It costs O(B * nb^2) integer work per step, repeated on every
context shard (nb = 1024 at 128k tokens with blocks of 128: ~13 ms in numpy on one CPU core,
benchmarks/long_context_pack.py). Under context > 1 the batch's host-built schedule is unused.

Without a 'context' axis (or with one of size 1) `context_tree_attention` runs the same code on one
shard, so a permuted batch gives the same result on one device.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kat_jax.ops.tree_mask import effective_block_size

CONTEXT_AXIS = "context"
_KIND_PARTIAL, _KIND_FULL = 1, 2   # kat_jax.ops.block_sparse.KIND_PARTIAL / KIND_FULL


def context_shards() -> int:
    """Size of the 'context' axis of the mesh set with jax.set_mesh (1 when none is set, the axis
    is absent, or it is already manual)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or CONTEXT_AXIS not in mesh.axis_names or CONTEXT_AXIS in mesh.manual_axes:
        return 1
    return int(mesh.shape[CONTEXT_AXIS])


def check_context_split(row_len: int, block_size: int, shards: int) -> int:
    """The attention block of rows of row_len tokens, after checking that they cut into whole
    blocks per shard; the error names mesh.context."""
    bs = effective_block_size(block_size, row_len)
    nb = int(row_len) // bs
    if shards < 1 or nb % shards:
        raise ValueError(f"mesh.context={shards}: rows of {row_len} tokens are {nb} attention "
                         f"blocks of {bs}, which do not split into whole blocks per shard; choose "
                         "mesh.context dividing the block count (or change data.row_len / "
                         "model.attention_block_size)")
    return bs


def shard_pairs_bound(nb: int, shards: int) -> int:
    """The most live block pairs a shard can hold after balance_query_blocks, whatever the rows:
    nb (nb + 1) / (2 C) + nb - 1 (module docstring), capped by nb / C blocks of nb pairs each."""
    return int(min(nb * (nb + 1) // (2 * shards) + nb - 1, (nb // shards) * nb))


def _block_pairs(xp, subtree_end, bs: int):
    """(live, full) bool[B, nb, nb] over (q block i, kv block j): the classification of
    kat_jax.ops.block_sparse.classify_block_pairs, in numpy or jax.numpy."""
    b, t = subtree_end.shape
    nb = t // bs
    se = xp.minimum(subtree_end.astype(xp.int32), t)
    pos = xp.arange(t, dtype=xp.int32)
    q_last = xp.where(se > pos, (se - 1) // bs, -1).reshape(b, nb, bs).max(axis=2)   # [B, nb]
    min_end = se.reshape(b, nb, bs).min(axis=2)
    i = xp.arange(nb)[:, None]
    j = xp.arange(nb)[None, :]
    live = (j <= i)[None] & (i[None] <= q_last[:, None, :])
    full = live & (j < i)[None] & ((i + 1) * bs <= min_end[:, None, :])
    return live, full


def _snake_slots(nb: int, shards: int) -> np.ndarray:
    """int[nb]: the permuted slot of the k-th block in descending order of pairs (static)."""
    m = nb // shards
    k = np.arange(nb)
    r, p = k // shards, k % shards
    shard = np.where(r % 2 == 0, p, shards - 1 - p)
    return shard * m + r


def balance_query_blocks(pairs: np.ndarray | jax.Array, shards: int):
    """block_perm int32[B, nb] from the live pairs per q block int[B, nb]: slot p of the permuted
    row holds original block block_perm[b, p]; shard s owns slots [s * nb / C, (s + 1) * nb / C).

    Snake deal of the blocks sorted by pairs, descending (module docstring). Bound: for shards
    i < j, round r (the r-th C blocks in sorted order) adds d_r = x_i - x_j, >= 0 on even rounds
    and <= 0 on odd ones, |d_r| <= w_r (the spread of that round's pairs); the rounds are
    disjoint ranges of the sorted order, so sum w_r <= max - min and the total difference lies in
    [-(max - min), max - min]. Hence every shard holds <= total / C + max - min pairs."""
    xp = np if isinstance(pairs, np.ndarray) else jnp
    b, nb = pairs.shape
    if nb % shards:
        raise ValueError(f"{nb} blocks do not split into {shards} shards")
    if xp is np:
        order = np.argsort(-pairs, axis=1, kind="stable")
    else:
        order = jnp.argsort(-pairs, axis=1, stable=True)
    slot_to_rank = np.argsort(_snake_slots(nb, shards))      # static: which rank fills slot p
    return order[:, slot_to_rank].astype(xp.int32)


def context_layout(subtree_end, block_size: int, shards: int) -> dict:
    """The context-parallel layout of rows int32[B, T] (original order; jnp inside jit, or numpy):
      block_perm   int32[B, nb]     original block at each slot (balance_query_blocks)
      token_perm   int32[B, T]      original token at each position of the permuted row
      token_inv    int32[B, T]      position in the permuted row of each original token
      q_block, k_block, kind  int32[B, C * P]  each shard's live pairs (original block ids;
                   kind 0 padding, 1 partial, 2 full), shard s at [s * P, (s + 1) * P),
                   P = shard_pairs_bound(nb, C)
    block_size: the model's attention_block_size (the effective block is taken, and checked to
    split into whole blocks per shard)."""
    xp = np if isinstance(subtree_end, np.ndarray) else jnp
    b, t = subtree_end.shape
    bs = check_context_split(t, block_size, shards)
    nb, m = t // bs, t // bs // shards
    live, full = _block_pairs(xp, subtree_end, bs)
    block_perm = balance_query_blocks(live.sum(axis=2).astype(xp.int32), shards)
    offs = xp.arange(bs, dtype=xp.int32)
    token_perm = (block_perm[:, :, None] * bs + offs).reshape(b, t).astype(xp.int32)
    block_inv = xp.argsort(block_perm, axis=1).astype(xp.int32)
    token_inv = (block_inv[:, :, None] * bs + offs).reshape(b, t).astype(xp.int32)
    # each shard's pairs: rows of the [i, j] grid at its own q blocks, compacted (live first)
    p = shard_pairs_bound(nb, shards)
    kind = xp.where(full, _KIND_FULL, xp.where(live, _KIND_PARTIAL, 0)).astype(xp.int32)
    kind_sl = xp.take_along_axis(kind, block_perm[:, :, None], axis=1).reshape(b, shards, m * nb)
    if xp is np:
        order = np.argsort(kind_sl == 0, axis=2, kind="stable")[:, :, :p]
    else:
        order = jnp.argsort(kind_sl == 0, axis=2, stable=True)[:, :, :p]
    local_q = block_perm.reshape(b, shards, m)
    q_block = xp.take_along_axis(local_q, order // nb, axis=2)
    k_block = order % nb
    kind_p = xp.take_along_axis(kind_sl, order, axis=2)
    flat = lambda x: x.reshape(b, shards * p).astype(xp.int32)
    return {"block_perm": block_perm, "token_perm": token_perm, "token_inv": token_inv,
            "q_block": flat(q_block), "k_block": flat(k_block), "kind": flat(kind_p)}


def permute_tokens(x, token_perm):
    """x [B, T, ...] -> the permuted row's order: out[b, p] = x[b, token_perm[b, p]]."""
    idx = token_perm.reshape(*token_perm.shape, *([1] * (x.ndim - 2)))
    return jnp.take_along_axis(x, idx, axis=1)


def permute_parent(parent, layout: dict):
    """parent int32[B, T] (original indices, -1 at roots) -> the permuted row's parents: the
    permuted position of the parent of the token at each permuted position."""
    par = jnp.take_along_axis(parent, layout["token_perm"], axis=1)
    moved = jnp.take_along_axis(layout["token_inv"], jnp.maximum(par, 0), axis=1)
    return jnp.where(par >= 0, moved, -1)


def attention_schedule(layout: dict) -> dict:
    """The schedule dict the attention dispatcher takes (tree_attention routes a schedule holding
    'block_perm' to context_tree_attention)."""
    return {k: layout[k] for k in ("block_perm", "q_block", "k_block", "kind")}


def _unpermute_blocks(x, block_inv, bs):
    """x [B, T, ...] in the permuted order -> the original order (blocks gathered by block_inv)."""
    b, t = x.shape[:2]
    xb = x.reshape(b, t // bs, bs, *x.shape[2:])
    idx = block_inv.reshape(b, -1, *([1] * (xb.ndim - 2)))
    return jnp.take_along_axis(xb, idx, axis=1).reshape(x.shape)


def _local_attention(q, k, v, subtree_end, block_perm, sched, *, impl, scale, bs, axis):
    """One shard: q [b, T / C, N, H] (its own blocks, permuted order), k, v [b, T / C, K, H] and
    subtree_end [b, T / C] (its slice of the permuted row), block_perm [b, nb], sched: its pairs
    [b, P]. axis: the context axis name (None: one shard, no collectives)."""
    from kat_jax.ops.attention_impls import ATTENTION_IMPLS
    from kat_jax.ops.dense import xla_dense_attention

    if axis is not None:
        k, v, subtree_end = (jax.lax.all_gather(x, axis, axis=1, tiled=True)
                             for x in (k, v, subtree_end))
        shard = jax.lax.axis_index(axis)
    else:
        shard = 0
    b, t_local, n, h = q.shape
    t = k.shape[1]
    nb, m = t // bs, t_local // bs
    block_inv = jnp.argsort(block_perm, axis=1).astype(jnp.int32)
    k, v, subtree_end = (_unpermute_blocks(x, block_inv, bs) for x in (k, v, subtree_end))
    own = jax.lax.dynamic_slice_in_dim(block_perm, shard * m, m, axis=1)        # [b, m]
    offs = jnp.arange(bs, dtype=jnp.int32)
    if impl == "xla_dense":
        q_index = (own[:, :, None] * bs + offs).reshape(b, t_local)
        return xla_dense_attention(q, k, v, subtree_end, q_index=q_index, scale=scale)
    rows = jnp.arange(b)[:, None]
    q_full = jnp.zeros((b, nb, bs, n, h), q.dtype).at[rows, own].set(
        q.reshape(b, m, bs, n, h)).reshape(b, t, n, h)
    if impl == "pallas":
        from kat_jax.ops.pallas.schedule import kernel_schedule

        lists = kernel_schedule(subtree_end, bs)
        mine = jnp.zeros((b, nb), bool).at[rows, own].set(True)
        lists["q_kv_count"] = jnp.where(mine, lists["q_kv_count"], 0)
        sched = lists
    out = ATTENTION_IMPLS[impl](q_full, k, v, subtree_end, scale=scale, schedule=sched,
                                block_size=bs)
    return out.reshape(b, nb, bs, n, h)[rows, own].reshape(b, t_local, n, h)


def context_tree_attention(q: jax.Array, k: jax.Array, v: jax.Array, subtree_end: jax.Array,
                           schedule: dict, *, impl: str, scale: float | None = None,
                           block_size: int = 128) -> jax.Array:
    """Tree attention of a permuted row (context_layout): q [B, T, N, H], k, v [B, T, K, H],
    subtree_end int32[B, T] in the permuted order (values: original indices), schedule: the
    layout's attention_schedule. impl: a resolved implementation name. Under a mesh with a
    'context' axis (jax.set_mesh) it runs in shard_map: tokens over 'context', rows over the
    batch axes and heads over the head axis where they divide (see module docstring)."""
    from jax.sharding import PartitionSpec as P

    from kat_jax.ops.tree_mask import BATCH_MESH_AXES, HEAD_MESH_AXES

    b, t, n, _ = q.shape
    bs = effective_block_size(block_size, t)
    shards = context_shards()
    sched = {key: schedule[key] for key in ("q_block", "k_block", "kind")}
    kw = dict(impl=impl, scale=scale, bs=bs)
    if shards == 1:
        return _local_attention(q, k, v, subtree_end, schedule["block_perm"], sched, axis=None,
                                **kw)
    check_context_split(t, block_size, shards)
    mesh = jax.sharding.get_abstract_mesh()
    free = [a for a in mesh.axis_names if a not in mesh.manual_axes]
    batch = tuple(a for a in BATCH_MESH_AXES if a in free)
    rows = math.prod(mesh.shape[a] for a in batch)
    row_spec = batch if batch and b % rows == 0 else None
    head = next((a for a in HEAD_MESH_AXES if a in free and mesh.shape[a] > 1), None)
    head_spec = head if head and n % mesh.shape[head] == 0 else None
    if head_spec and k.shape[2] % mesh.shape[head]:
        k, v = (jnp.repeat(x, n // k.shape[2], axis=2) for x in (k, v))
    tok = P(row_spec, CONTEXT_AXIS, head_spec, None)
    row_tok = P(row_spec, CONTEXT_AXIS)

    def local(q, k, v, e, perm, s):
        return _local_attention(q, k, v, e, perm, s, axis=CONTEXT_AXIS, **kw)

    return jax.shard_map(local, mesh=mesh,
                         in_specs=(tok, tok, tok, row_tok, P(row_spec, None),
                                   {key: row_tok for key in sched}),
                         out_specs=tok, check_vma=False)(q, k, v, subtree_end,
                                                         schedule["block_perm"], sched)
