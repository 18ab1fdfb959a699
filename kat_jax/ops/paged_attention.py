"""Attention over a paged KV cache: keys and values live in fixed-size blocks of one preallocated
pool, and each sequence's block table lists its blocks in order (as vLLM's PagedAttention).

    pool_k, pool_v: [K, P, S_blk, H]     per kv head, P blocks of S_blk token slots, per layer
    block_tables:   int32[B, M]          block m of row b holds the row's positions
                                         m * S_blk .. (m + 1) * S_blk - 1
    slots:          int32[B, T]          flat slot (block * S_blk + offset) of each new token

Block 0 is the trash block: never given to a sequence; table padding points at it and the writes
of padding tokens land in it (token_slots), so padding never touches a live block.

paged_write stores new keys / values at their slots (a scatter: in place when the pool is donated
or a loop carry). paged_attention is the XLA gather path: a row's blocks are gathered into
[K, B, M * S_blk, H] (one layer at a time, so the temporary is one layer's live KV, never the
pool) and attended densely as kat_jax.ops.dense does (float32 scores and softmax, scale H^-0.5);
query (b, t) at position q_pos[b, t] sees the row's positions 0 .. q_pos[b, t]. Exact: the same
arithmetic as the dense path over the same keys.

A decode chunk (JaxEngine's on-device loop of steps) does not gather the whole table every step:
chunk_context gathers each layer's rows once before the loop (positions before a row's chunk start
are final: the chunk writes only from there on), and chunk_paged_attention reads those, plus the
few blocks the chunk writes, gathered every step, under one softmax.

Layout: kv heads lead (as JAX's TPU paged-attention kernel has its pages), so the gather of a
row's blocks comes out as [K, B, M * S_blk, H], already in the order the score and value
contractions read (batch dims K, B leading, the contracted or kept H last): no transposed copy of
the gathered keys and values per layer and decode step. With [P, S_blk, K, H] XLA:CPU transposed
both every step, which made attention 2.5-3x slower on the d256 peer model's decode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kat_jax.ops.tree_mask import MASK_VALUE

TRASH_BLOCK = 0


def token_slots(block_tables: jax.Array, positions: jax.Array, valid: jax.Array,
                block_size: int) -> jax.Array:
    """int32[B, T] flat pool slots of tokens at positions int32[B, T] of each row; tokens with
    valid False (padding) get a slot of the trash block."""
    m = block_tables.shape[1]
    block = jnp.take_along_axis(block_tables, jnp.clip(positions // block_size, 0, m - 1), axis=1)
    slot = block * block_size + positions % block_size
    return jnp.where(valid, slot, TRASH_BLOCK * block_size + positions % block_size)


def paged_write(pool: jax.Array, new_btkh: jax.Array, slots_bt: jax.Array) -> jax.Array:
    """pool [K, P, S_blk, H] with new[b, t] written at flat slot slots[b, t]. Indexed by (block,
    offset) rather than through a flat [K, P * S_blk, H] view: XLA:CPU copied the reshaped pool
    (twice per layer and step inside the decode loop) to give the view its layout."""
    k, _, s, h = pool.shape
    slots = slots_bt.reshape(-1)
    new_kxh = jnp.swapaxes(new_btkh.reshape(-1, k, h), 0, 1)  # [K, B * T, H]
    return pool.at[:, slots // s, slots % s].set(new_kxh.astype(pool.dtype))


def gather_rows(pool: jax.Array, block_tables: jax.Array) -> jax.Array:
    """[K, B, M * S_blk, H]: the blocks of each row's table laid end to end, per kv head. One
    gather from the pool seen as [K * P, S_blk, H] (a free reshape) with indices k * P + block,
    so index dims lead and the block's slice dims trail: the result needs no transpose."""
    kv_heads, p, s_blk, h = pool.shape
    b, m = block_tables.shape
    idx = jnp.arange(kv_heads, dtype=jnp.int32)[:, None, None] * p + block_tables[None]
    return pool.reshape(kv_heads * p, s_blk, h)[idx].reshape(kv_heads, b, m * s_blk, h)


def paged_attention(q_btnh: jax.Array, pool_k: jax.Array, pool_v: jax.Array,
                    block_tables: jax.Array, q_pos: jax.Array,
                    scale: float | None = None) -> jax.Array:
    """[B, T, N, H] attention of queries q (at positions q_pos int32[B, T]) over their rows' cached
    positions 0 .. q_pos (gather path; see the module docstring)."""
    s = block_tables.shape[1] * pool_k.shape[2]
    k_kbsh = gather_rows(pool_k, block_tables)
    v_kbsh = gather_rows(pool_v, block_tables)
    visible = jnp.arange(s, dtype=jnp.int32)[None, None, :] <= q_pos[:, :, None]  # [B, T, S]
    return _attend(q_btnh, [(k_kbsh, v_kbsh, visible)], scale)


def _attend(q_btnh, parts, scale: float | None):
    """Softmax attention of q [B, T, N, H] over one or more key / value parts, each (k [K, B, S_i,
    H], v [K, B, S_i, H], visible bool[B, T, S_i]): the parts' scores side by side under one
    softmax (float32, scale H^-0.5 by default), then the parts' value products summed; query
    head n reads kv head n // (N / K). Returns [B, T, N, H] in q's dtype.

    One query row (b * t == 1, batch-1 decode): keys as the left operand and the scores kept
    [K, B, S, T, G] (the dot's own order), else XLA:CPU transposes the keys to [H, S] every
    step; this way only the queries (G x H numbers) move. Same products, sums."""
    b, t, n, h = q_btnh.shape
    kv_heads = parts[0][0].shape[0]
    if n % kv_heads:
        raise ValueError(f"query heads ({n}) must be a multiple of kv heads ({kv_heads})")
    g = n // kv_heads
    scale = h ** -0.5 if scale is None else scale
    q_kbtgh = q_btnh.reshape(b, t, kv_heads, g, h).transpose(2, 0, 1, 3, 4)
    one = b * t == 1
    axis = 2 if one else 4
    scores = []
    for k, _, visible in parts:
        k = k.astype(q_btnh.dtype)
        if one:
            sc = jnp.einsum("kbsh,kbtgh->kbstg", k, q_kbtgh, preferred_element_type=jnp.float32)
            mask = visible.swapaxes(1, 2)[None, :, :, :, None]
        else:
            sc = jnp.einsum("kbtgh,kbsh->kbtgs", q_kbtgh, k, preferred_element_type=jnp.float32)
            mask = visible[None, :, :, None]
        scores.append(jnp.where(mask, sc * scale, MASK_VALUE))
    probs = jax.nn.softmax(scores[0] if len(parts) == 1 else
                           jnp.concatenate(scores, axis=axis), axis=axis)
    spec = "kbstg,kbsh->kbtgh" if one else "kbtgs,kbsh->kbtgh"
    out, at = 0.0, 0
    for k, v, _ in parts:
        v = v.astype(q_btnh.dtype)
        p = probs if len(parts) == 1 else \
            jax.lax.slice_in_dim(probs, at, at + k.shape[2], axis=axis)
        at += k.shape[2]
        out = out + jnp.einsum(spec, p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.transpose(1, 2, 0, 3, 4).reshape(b, t, n, h).astype(q_btnh.dtype)


def chunk_context(pool_k: jax.Array, pool_v: jax.Array, block_tables: jax.Array,
                  start: jax.Array, steps: int) -> dict:
    """What a decode chunk of `steps` steps that starts at positions start int32[B] reads of one
    layer without gathering it again every step: the rows' keys and values gathered once
    (prefix_k / prefix_v [K, B, M * S_blk, H], of which positions < start are final: the chunk
    writes only positions start .. start + steps - 1), and the table of the blocks the chunk
    writes (recent_tables int32[B, R], R = ceil(steps / S_blk) + 1, from block start // S_blk;
    recent_base: the position of their first slot). For chunk_paged_attention."""
    s_blk = pool_k.shape[2]
    m = block_tables.shape[1]
    first = start // s_blk
    r = -(-steps // s_blk) + 1
    idx = jnp.clip(first[:, None] + jnp.arange(r, dtype=jnp.int32)[None], 0, m - 1)
    return {"prefix_k": gather_rows(pool_k, block_tables),
            "prefix_v": gather_rows(pool_v, block_tables), "start": start,
            "recent_tables": jnp.take_along_axis(block_tables, idx, axis=1),
            "recent_base": first * s_blk}


def chunk_paged_attention(q_btnh: jax.Array, pool_k: jax.Array, pool_v: jax.Array,
                          context: dict, q_pos: jax.Array, scale: float | None = None
                          ) -> jax.Array:
    """paged_attention for a step of a decode chunk (context from chunk_context at the chunk's
    start): positions before the row's chunk start come from the keys and values gathered once
    for the chunk, positions from it on from the pool through the few blocks the chunk writes
    (gathered every step: they change). The same keys, values and visibility (0 .. q_pos) as
    paged_attention, under one softmax: the same result up to float32 summation order. Per
    step it gathers R blocks instead of the whole table (the whole-table gather was ~a third
    of a batch-1 decode step on XLA:CPU)."""
    start = context["start"]
    k1, v1 = context["prefix_k"], context["prefix_v"]
    k2 = gather_rows(pool_k, context["recent_tables"])
    v2 = gather_rows(pool_v, context["recent_tables"])
    pos1 = jnp.arange(k1.shape[2], dtype=jnp.int32)[None, None, :]
    vis1 = (pos1 < start[:, None, None]) & (pos1 <= q_pos[:, :, None])
    pos2 = (context["recent_base"][:, None] + jnp.arange(k2.shape[2], dtype=jnp.int32))[:, None]
    vis2 = (pos2 >= start[:, None, None]) & (pos2 <= q_pos[:, :, None])
    return _attend(q_btnh, [(k1, v1, vis1), (k2, v2, vis2)], scale)
