"""The attention implementations by name: the one registry of `attention_impl` values.

ModelConfig validates `model.attention_impl` against `attention_impl_names()`, the command line
offers the same names, and the dispatcher (kat_jax.ops.attention.tree_attention) calls the
implementation registered under the resolved name. 'auto' is not an implementation: the
dispatcher resolves it per platform and row length
(kat_jax.ops.attention.resolve_attention_impl).

Every implementation has one signature:

    fn(q, k, v, subtree_end, q_index=None, scale=None, *, schedule=None, block_size=128) -> out

with q: [B, T, N, H], k and v: [B, S, K, H], subtree_end: int32[B, S], q_index: int32[B, T] or
None (see kat_jax.ops.dense), out: [B, T, N, H] in q's dtype. With q_index (decode against a
cache) every implementation runs the dense reference.

This module imports no JAX at import time (each entry imports its kernel when first called), so
the config and the command line read the names cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

AUTO = "auto"


def _xla_dense(q, k, v, subtree_end, q_index=None, scale=None, *, schedule=None, block_size=128):
    from kat_jax.ops.dense import xla_dense_attention

    return xla_dense_attention(q, k, v, subtree_end, q_index=q_index, scale=scale)


def _xla_block_sparse(q, k, v, subtree_end, q_index=None, scale=None, *, schedule=None,
                      block_size=128):
    if q_index is not None:  # decode against a cache: dense over the cache
        return _xla_dense(q, k, v, subtree_end, q_index=q_index, scale=scale)
    from kat_jax.ops.block_sparse import xla_block_sparse_attention
    from kat_jax.ops.tree_mask import effective_block_size

    return xla_block_sparse_attention(q, k, v, subtree_end, scale=scale, schedule=schedule,
                                      block_size=effective_block_size(block_size, q.shape[1]))


def _pallas(q, k, v, subtree_end, q_index=None, scale=None, *, schedule=None, block_size=128):
    if q_index is not None:  # decode against a cache: dense over the cache
        return _xla_dense(q, k, v, subtree_end, q_index=q_index, scale=scale)
    from kat_jax.ops.pallas import pallas_tree_attention

    return pallas_tree_attention(q, k, v, subtree_end, scale=scale, schedule=schedule,
                                 block_size=block_size)


# name -> implementation (module docstring: the signature). The single source of the names.
ATTENTION_IMPLS: dict[str, Callable[..., Any]] = {
    "xla_dense": _xla_dense,                 # kat_jax.ops.dense: the reference, O(T * S)
    "xla_block_sparse": _xla_block_sparse,   # kat_jax.ops.block_sparse: visible blocks only
    "pallas": _pallas,                       # kat_jax.ops.pallas: Triton (GPU) / Mosaic (TPU)
}


def attention_impl_names() -> tuple[str, ...]:
    """Every value `attention_impl` accepts: 'auto', then the registered implementations."""
    return (AUTO, *ATTENTION_IMPLS)
