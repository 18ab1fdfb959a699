"""Attention under the tree rule, with one switch between implementations.

Rule (ARCHITECTURE.md): query q may see key k iff  k <= q < subtree_end[k].
A causal sequence is a chain (subtree_end = row end), packed sequences are a forest of chains, and
shared-prefix rollouts are real trees; all go through the same function.

Shapes: q: [B, T, N, H], k and v: [B, S, K, H] with N = K * G (grouped-query attention: query head n
reads kv head n // G), subtree_end: int32[B, S] (of the keys), q_index: int32[B, T] (the index of each
query in key space; arange(T) when queries and keys are the same tokens). Output: [B, T, N, H] in the
dtype of q. Scores, softmax and the weighted sum accumulate in float32.

Implementations are chosen by name (config `model.attention_impl`), never by import-time accident:
  xla_dense        every (q, k) pair scored and masked: the reference, O(T * S).
  xla_block_sparse (issue "Trajectory trees"), pallas (issue "Pallas kernels"): not built yet.
  auto             the best available for the platform; today xla_dense everywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def tree_visible(subtree_end: jax.Array, q_index: jax.Array | None = None) -> jax.Array:
    """bool[B, T, S]: visible[b, q, k] = k <= q_index[b, q] < subtree_end[b, k]."""
    s = subtree_end.shape[-1]
    if q_index is None:
        q_index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), subtree_end.shape)
    k_index = jnp.arange(s, dtype=jnp.int32)
    qi = q_index[..., :, None]
    return (k_index[None, None, :] <= qi) & (qi < subtree_end[..., None, :])


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
    qg = q.reshape(b, t, kv_heads, g, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    visible = tree_visible(subtree_end, q_index)[:, None, None]  # [B, 1, 1, T, S]
    scores = jnp.where(visible, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def _not_built(name: str, issue: str) -> Callable:
    def fn(*args, **kwargs):
        raise NotImplementedError(f"attention_impl={name!r} is not built yet (issue: {issue}); "
                                  "use 'xla_dense' or 'auto'")

    return fn


ATTENTION_IMPLS: dict[str, Callable[..., jax.Array]] = {
    "xla_dense": xla_dense_attention,
    "xla_block_sparse": _not_built("xla_block_sparse", "Trajectory trees"),
    "pallas": _not_built("pallas", "Pallas tree-attention kernels"),
}


def resolve_attention_impl(name: str, platform: str | None = None) -> str:
    """Map a config name to a concrete implementation for a platform ('cpu', 'gpu', 'tpu')."""
    if name == "auto":
        return "xla_dense"
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {name!r}; known: {['auto', *ATTENTION_IMPLS]}")
    return name


def tree_attention(q: jax.Array, k: jax.Array, v: jax.Array, subtree_end: jax.Array,
                   q_index: jax.Array | None = None, *, impl: str = "auto",
                   scale: float | None = None) -> jax.Array:
    """Attention under the tree rule by the implementation named `impl` (see module docstring)."""
    fn = ATTENTION_IMPLS[resolve_attention_impl(impl)]
    return fn(q, k, v, subtree_end, q_index=q_index, scale=scale)
