"""Attention under the tree rule, with one switch between implementations.

Rule (ARCHITECTURE.md): query q may see key k iff  k <= q < subtree_end[k].
A causal sequence is a chain (subtree_end = row end), packed sequences are a forest of chains, and
shared-prefix rollouts are real trees; all go through the same function.

Shapes: q: [B, T, N, H], k and v: [B, S, K, H] with N = K * G (grouped-query attention: query head n
reads kv head n // G), subtree_end: int32[B, S] (of the keys), q_index: int32[B, T] (the index of each
query in key space; arange(T) when queries and keys are the same tokens). Output: [B, T, N, H] in the
dtype of q. Scores, softmax and the weighted sum accumulate in float32.

Implementations are chosen by name (config `model.attention_impl`), never by import-time accident;
the names are registered in one place, kat_jax.ops.attention_impls.ATTENTION_IMPLS:
  xla_dense        every (q, k) pair scored and masked: the reference, O(T * S).
  xla_block_sparse each query block visits only the key blocks it can see (kat_jax.ops.block_sparse);
                   full blocks need no element mask. Cost follows the visible pairs. CPU default.
  pallas           flash-attention kernels in Pallas (kat_jax.ops.pallas): Triton on GPU, Mosaic on
                   TPU, interpreted on CPU (slow; for tests). Same block classification as
                   xla_block_sparse, schedule in-kernel. Decode (q_index) falls back to xla_dense.
  auto             by platform and shape (`resolve_attention_impl`): pallas on GPU and TPU
                   (where the kernels take the head dim); elsewhere xla_block_sparse, except for
                   short rows, where block sparsity cannot pay (`dense_is_cheaper`): xla_dense.

Under a mesh, the Pallas kernel runs inside shard_map over batch rows and heads
(`sharded_tree_attention`); `tree_attention` does that by itself when a mesh is set with
jax.set_mesh and names axes of BATCH_MESH_AXES / HEAD_MESH_AXES.

Layering inside kat_jax.ops: this dispatcher imports the implementations (attention_impls, and
through it dense, block_sparse, pallas); they and it import the shared basics from
kat_jax.ops.tree_mask; no implementation imports this module.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from kat_jax.ops.attention_impls import ATTENTION_IMPLS, attention_impl_names
from kat_jax.ops.dense import xla_dense_attention
from kat_jax.ops.tree_mask import (
    BATCH_MESH_AXES,
    HEAD_MESH_AXES,
    MASK_VALUE,
    current_platform,
    effective_block_size,
    mesh_platform,
    tree_visible,
)

# Re-exported: the dispatcher is where callers look for the attention API.
__all__ = ["ATTENTION_IMPLS", "BATCH_MESH_AXES", "DENSE_MAX_BLOCKS", "HEAD_MESH_AXES", "MASK_VALUE",
           "PALLAS_HEAD_DIMS",
           "attention_impl_names", "dense_is_cheaper", "effective_block_size", "mesh_platform",
           "resolve_attention_impl", "sharded_tree_attention", "tree_attention", "tree_visible",
           "xla_dense_attention"]

# Head dims the device kernels are built for (the Triton lowering needs a power of two).
PALLAS_HEAD_DIMS = (64, 128, 256)


# Rows of at most this many attention blocks take the dense path under `auto` (dense_is_cheaper).
DENSE_MAX_BLOCKS = 4


def dense_is_cheaper(row_len: int, block_size: int) -> bool:
    """True when rows of row_len tokens are too short for block-sparse attention to pay: at most
    DENSE_MAX_BLOCKS blocks (block = effective_block_size(block_size, row_len)). The dense path
    scores all nb^2 block pairs; the block-sparse scan scores the visible ones, nb (nb + 1) / 2
    for a causal chain, rounded up to its step of PAIRS_PER_STEP pairs, each ~1.5x the dense
    cost per pair (gathers, online-softmax rescaling, scatters), so it saves work only beyond a
    few blocks. Measured on CPU (2 cores, 4 / 2 heads of 64, block 128, causal chains, forward
    and forward + backward), block-sparse / dense time: ~5x at 128 tokens (1 block), ~2x at 256,
    ~1x at 512 (4 blocks), ~0.6-0.7x at 1024, lower beyond and for trees (fewer visible
    pairs)."""
    nb = -(-int(row_len) // effective_block_size(block_size, row_len))
    return nb <= DENSE_MAX_BLOCKS


def resolve_attention_impl(name: str, platform: str | None = None,
                           head_dim: int | None = None, row_len: int | None = None,
                           block_size: int = 128) -> str:
    """Map a config name to a concrete implementation for a platform ('cpu', 'gpu'/'cuda', 'tpu';
    default: JAX's default backend, i.e. the platform of the devices a mesh is made of) and, when
    row_len is given, for rows of that many tokens attended in blocks of block_size.

    auto: pallas on GPU and TPU when head_dim is one of PALLAS_HEAD_DIMS (or not given);
    otherwise (CPU, where the Pallas kernels would only run interpreted) xla_block_sparse, or
    xla_dense when the rows are short (`dense_is_cheaper(row_len, block_size)`). A rule on
    shapes only, so the host (which builds block schedules only for the block-sparse paths) and
    the compiled step agree."""
    if name == "auto":
        if current_platform(platform) in ("gpu", "cuda", "tpu") and (
                head_dim is None or head_dim in PALLAS_HEAD_DIMS):
            return "pallas"
        if row_len is not None and dense_is_cheaper(row_len, block_size):
            return "xla_dense"
        return "xla_block_sparse"
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {name!r}; known: {list(attention_impl_names())}")
    return name


def tree_attention(q: jax.Array, k: jax.Array, v: jax.Array, subtree_end: jax.Array,
                   q_index: jax.Array | None = None, *, impl: str = "auto",
                   scale: float | None = None, schedule: dict | None = None,
                   block_size: int = 128) -> jax.Array:
    """Attention under the tree rule by the implementation named `impl` (see module docstring).

    schedule: the host-built block schedule of kat_jax.ops.block_sparse (block pairs a query block
    must visit) for xla_block_sparse, and the kernel lists for pallas; ignored by xla_dense.
    Without it, block-sparse visits every lower-triangular block pair (exact, about half the
    dense work) and pallas computes its lists inside jit (exact, no extra work).

    A schedule holding 'block_perm' is the layout of a row permuted for context parallelism
    (kat_jax.ops.context_parallel.context_layout): it runs context_tree_attention.

    When the resolved impl is pallas and a mesh is set (jax.set_mesh) with axes named in
    BATCH_MESH_AXES / HEAD_MESH_AXES that are not already manual, the kernel runs inside
    shard_map over them (a custom call cannot be partitioned by GSPMD)."""
    name = resolve_attention_impl(impl, head_dim=q.shape[-1], row_len=q.shape[1],
                                  block_size=block_size)
    if schedule is not None and "block_perm" in schedule and q_index is None:
        # a row permuted for context parallelism (kat_jax.ops.context_parallel)
        from kat_jax.ops.context_parallel import context_tree_attention

        return context_tree_attention(q, k, v, subtree_end, schedule, impl=name, scale=scale,
                                      block_size=block_size)
    if name == "pallas" and q_index is None:
        mesh = jax.sharding.get_abstract_mesh()
        free = () if mesh.empty else tuple(a for a in mesh.axis_names
                                           if a not in mesh.manual_axes and mesh.shape[a] > 1)
        batch = tuple(a for a in BATCH_MESH_AXES if a in free)
        heads = next((a for a in HEAD_MESH_AXES if a in free), None)
        if batch or heads:
            fn = sharded_tree_attention(mesh, batch, heads, impl="pallas")
            return fn(q, k, v, subtree_end, scale=scale, schedule=schedule,
                      block_size=block_size)
    fn = ATTENTION_IMPLS[name]
    return fn(q, k, v, subtree_end, q_index=q_index, scale=scale, schedule=schedule,
              block_size=block_size)


def sharded_tree_attention(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
                           batch_axes: str | tuple[str, ...] | None = ("data",),
                           head_axis: str | None = "tensor",
                           impl: str = "pallas") -> Callable[..., jax.Array]:
    """`tree_attention` (same signature, minus impl) run inside shard_map over `mesh`: rows split
    over batch_axes, query and kv heads over head_axis (GQA groups stay on one shard; if the kv
    heads do not divide over head_axis they are repeated to one per query head first). Axes
    whose size does not divide B (or the heads) are not used for that dimension (replicated).
    Every array of `schedule` is [B, ...] and is split with the rows. Exact: attention is
    independent per row and per head, so the result equals the unsharded call."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if isinstance(batch_axes, str):
        batch_axes = (batch_axes,)
    batch_axes = tuple(a for a in (batch_axes or ()) if a in mesh.axis_names)
    head_axis = head_axis if head_axis in mesh.axis_names else None

    def fn(q, k, v, subtree_end, q_index=None, *, scale=None, schedule=None, block_size=128):
        b, n, kv_heads = q.shape[0], q.shape[2], k.shape[2]
        rows = 1
        for a in batch_axes:
            rows *= mesh.shape[a]
        row_spec = batch_axes if batch_axes and b % rows == 0 else None
        hs = mesh.shape[head_axis] if head_axis else 1
        head_spec = head_axis if head_axis and n % hs == 0 else None
        if head_spec and kv_heads % hs:
            k, v = (jnp.repeat(x, n // kv_heads, axis=2) for x in (k, v))
        qkv_spec = P(row_spec, None, head_spec, None)
        row2 = P(row_spec, None)
        sched_spec = None if schedule is None else {key: row2 for key in schedule}
        qi_spec = None if q_index is None else row2

        def local(q, k, v, e, qi, sched):
            return tree_attention(q, k, v, e, qi, impl=impl, scale=scale, schedule=sched,
                                  block_size=block_size)

        args = (q, k, v, subtree_end, q_index, schedule)
        specs = (qkv_spec, qkv_spec, qkv_spec, row2, qi_spec, sched_spec)
        if set(mesh.explicit_axes) & {*batch_axes, head_axis}:  # explicit sharding: say it
            abstract = isinstance(mesh, jax.sharding.AbstractMesh)
            args = tuple(None if a is None else jax.tree.map(
                lambda x, sp: jax.reshard(x, sp if abstract else NamedSharding(mesh, sp)), a, sp,
                is_leaf=lambda x: isinstance(x, P)) for a, sp in zip(args, specs))
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=qkv_spec,
                             check_vma=False)(*args)

    return fn
