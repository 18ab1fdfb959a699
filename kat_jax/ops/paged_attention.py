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
    b, t, n, h = q_btnh.shape
    kv_heads, _, s_blk, _ = pool_k.shape
    if n % kv_heads:
        raise ValueError(f"query heads ({n}) must be a multiple of kv heads ({kv_heads})")
    g = n // kv_heads
    scale = h ** -0.5 if scale is None else scale
    s = block_tables.shape[1] * s_blk
    k_kbsh = gather_rows(pool_k, block_tables).astype(q_btnh.dtype)
    v_kbsh = gather_rows(pool_v, block_tables).astype(q_btnh.dtype)
    q_kbtgh = q_btnh.reshape(b, t, kv_heads, g, h).transpose(2, 0, 1, 3, 4)
    visible = jnp.arange(s, dtype=jnp.int32)[None, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if b * t == 1:
        # one query row (batch-1 decode): keys as the left operand and the scores kept
        # [K, B, S, T, G] (the dot's own order), else XLA:CPU transposes the gathered keys to
        # [H, S] every step; this way only the queries (G x H numbers) move. Same products, sums.
        scores = jnp.einsum("kbsh,kbtgh->kbstg", k_kbsh, q_kbtgh,
                            preferred_element_type=jnp.float32)
        scores = jnp.where(visible.swapaxes(1, 2)[None, :, :, :, None], scores * scale,
                           MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=2)
        out = jnp.einsum("kbstg,kbsh->kbtgh", probs.astype(v_kbsh.dtype), v_kbsh,
                         preferred_element_type=jnp.float32)
    else:
        scores = jnp.einsum("kbtgh,kbsh->kbtgs", q_kbtgh, k_kbsh,
                            preferred_element_type=jnp.float32)
        scores = jnp.where(visible[None, :, :, None], scores * scale, MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("kbtgs,kbsh->kbtgh", probs.astype(v_kbsh.dtype), v_kbsh,
                         preferred_element_type=jnp.float32)
    return out.transpose(1, 2, 0, 3, 4).reshape(b, t, n, h).astype(q_btnh.dtype)
