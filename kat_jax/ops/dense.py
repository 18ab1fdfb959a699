"""Dense XLA tree attention: every (q, k) pair scored and masked. The reference every other
implementation is tested against (attention_impl='xla_dense'), and the decode path (queries
against a KV cache) of all of them.

Rule (ARCHITECTURE.md): query q may see key k iff  k <= q < subtree_end[k]  (kat_jax.ops.tree_mask).

Shapes: q: [B, T, N, H], k and v: [B, S, K, H] with N = K * G (grouped-query attention: query head n
reads kv head n // G), subtree_end: int32[B, S] (of the keys), q_index: int32[B, T] (the index of each
query in key space; arange(T) when queries and keys are the same tokens). Output: [B, T, N, H] in
the dtype of q. Scores, softmax and the weighted sum accumulate in float32. O(T * S) time and memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kat_jax.ops.tree_mask import MASK_VALUE, tree_visible


def xla_dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, subtree_end: jax.Array,
                        q_index: jax.Array | None = None, scale: float | None = None) -> jax.Array:
    """Dense reference. A query that sees no key (never produced by valid trees) returns a finite
    average rather than NaN."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    if n % kv_heads:
        raise ValueError(f"query heads ({n}) must be a multiple of kv heads ({kv_heads})")
    g = n // kv_heads
    scale = h ** -0.5 if scale is None else scale
    # queries as [B, K, G, T, H]: the score matmul then writes [B, K, G, T, S] in place (with q in
    # its [B, T, K, G, H] order, XLA:CPU transposes the whole score array instead; ~1.5x slower)
    qg = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4)
    scores = jnp.einsum("bkgth,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    visible = tree_visible(subtree_end, q_index)[:, None, None]  # [B, 1, 1, T, S]
    scores = jnp.where(visible, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskh->bkgth", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)
