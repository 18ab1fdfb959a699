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
  xla_block_sparse each query block visits only the key blocks it can see (kat_jax.ops.block_sparse);
                   full blocks need no element mask. Cost follows the visible pairs. CPU default.
  pallas           (issue "Pallas kernels"): not built yet.
  auto             the best available for the platform; today xla_block_sparse everywhere.
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
                                  "use 'xla_block_sparse', 'xla_dense' or 'auto'")

    return fn


def _xla_block_sparse(q, k, v, subtree_end, q_index=None, scale=None, *, schedule=None,
                      block_size=128):
    from kat_jax.ops.block_sparse import xla_block_sparse_attention

    if q_index is not None:  # decode against a cache: dense over the cache
        return xla_dense_attention(q, k, v, subtree_end, q_index=q_index, scale=scale)
    return xla_block_sparse_attention(q, k, v, subtree_end, scale=scale, schedule=schedule,
                                      block_size=effective_block_size(block_size, q.shape[1]))


def _xla_dense(q, k, v, subtree_end, q_index=None, scale=None, *, schedule=None, block_size=128):
    return xla_dense_attention(q, k, v, subtree_end, q_index=q_index, scale=scale)


ATTENTION_IMPLS: dict[str, Callable[..., jax.Array]] = {
    "xla_dense": _xla_dense,
    "xla_block_sparse": _xla_block_sparse,
    "pallas": _not_built("pallas", "Pallas tree-attention kernels"),
}


def effective_block_size(block_size: int, row_len: int) -> int:
    """The block size used for rows of row_len tokens: the largest power of two <= block_size that
    divides row_len (row buckets are 2^k and 1.5 * 2^k). Host-side schedules use the same value."""
    row_len = int(row_len)
    return max(1, min(int(block_size), row_len & -row_len))


def resolve_attention_impl(name: str, platform: str | None = None) -> str:
    """Map a config name to a concrete implementation for a platform ('cpu', 'gpu', 'tpu').

    auto: xla_block_sparse on every platform until the Pallas kernels land (then pallas on GPU/TPU).
    """
    if name == "auto":
        return "xla_block_sparse"
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {name!r}; known: {['auto', *ATTENTION_IMPLS]}")
    return name


def tree_attention(q: jax.Array, k: jax.Array, v: jax.Array, subtree_end: jax.Array,
                   q_index: jax.Array | None = None, *, impl: str = "auto",
                   scale: float | None = None, schedule: dict | None = None,
                   block_size: int = 128) -> jax.Array:
    """Attention under the tree rule by the implementation named `impl` (see module docstring).

    schedule: the host-built block schedule of kat_jax.ops.block_sparse (block pairs a query block
    must visit) for xla_block_sparse; ignored by xla_dense. Without it, block-sparse visits every
    lower-triangular block pair (exact, about half the dense work)."""
    fn = ATTENTION_IMPLS[resolve_attention_impl(impl)]
    return fn(q, k, v, subtree_end, q_index=q_index, scale=scale, schedule=schedule,
              block_size=block_size)
