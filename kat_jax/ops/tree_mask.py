"""The tree-attention basics that the dispatcher and every kernel share: the mask rule, the mask
value, the block size, the platform and the mesh axis names.

Rule (ARCHITECTURE.md): query q may see key k iff  k <= q < subtree_end[k].

This module sits below everything else in kat_jax.ops that attends: the kernels
(kat_jax.ops.dense, kat_jax.ops.block_sparse, kat_jax.ops.pallas) and the dispatcher
(kat_jax.ops.attention) import it, and it imports none of them, so no kernel ever imports the
dispatcher.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The score of a masked (q, k) pair: finite (so max and exp stay NaN-free), far below any real one.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# Mesh axis names that split a batch's rows (every device of both axes sees different rows) and
# attention heads. The one definition in kat_jax: the training mesh (kat_jax.training.sharding)
# splits batches over BATCH_MESH_AXES, and tree_attention shards the Pallas kernel by itself over
# these axes under a mesh set with jax.set_mesh (others are left to GSPMD).
BATCH_MESH_AXES = ("data", "fsdp")
HEAD_MESH_AXES = ("tensor",)


def tree_visible(subtree_end: jax.Array, q_index: jax.Array | None = None) -> jax.Array:
    """bool[B, T, S]: visible[b, q, k] = k <= q_index[b, q] < subtree_end[b, k].

    subtree_end: int32[B, S] (of the keys); q_index: int32[B, T], the index of each query in key
    space (default arange(S): queries and keys are the same tokens)."""
    s = subtree_end.shape[-1]
    if q_index is None:
        q_index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), subtree_end.shape)
    k_index = jnp.arange(s, dtype=jnp.int32)
    qi = q_index[..., :, None]
    return (k_index[None, None, :] <= qi) & (qi < subtree_end[..., None, :])


def effective_block_size(block_size: int, row_len: int) -> int:
    """The block size used for rows of row_len tokens: the largest power of two <= block_size that
    divides row_len (row buckets are 2^k and 1.5 * 2^k). Host-side schedules use the same value."""
    row_len = int(row_len)
    return max(1, min(int(block_size), row_len & -row_len))


def mesh_platform() -> str | None:
    """Platform of the devices of the mesh set with jax.set_mesh, or None when none is set. On a
    CPU host compiling ahead of time for abstract TPU devices this is 'tpu' while
    jax.default_backend() is 'cpu'; everywhere else the two agree."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return None if device is None else device.platform


def current_platform(platform: str | None = None) -> str:
    """`platform` lower-cased, else the platform of the mesh set with jax.set_mesh, else JAX's
    default backend ('cpu', 'gpu' / 'cuda' / 'rocm', 'tpu')."""
    return (platform or mesh_platform() or jax.default_backend()).lower()
