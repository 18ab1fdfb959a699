"""Pallas paged attention (decode and short prefill chunks over the paged KV pool); the XLA gather
path kat_jax.ops.paged_attention.paged_attention is its reference, with the same signature.

    q:            [B, T, N, H]       T new tokens per row (decode: T = 1)
    pool_k/v:     [K, P, S_blk, H]   the pool (block 0 is the trash block)
    block_tables: int32[B, M]        block m of row b holds positions m * S_blk .. (m + 1) * S_blk - 1
    q_pos:        int32[B, T]        query (b, t) sees the row's positions 0 .. q_pos[b, t]

GQA: the G = N // K query heads of kv head k (heads k * G .. k * G + G - 1) are laid out as the
R = T * G rows of one [R, H] query tile (XLA reshapes around the call; row t * G + g), so a kv
block is read once for all the heads and tokens that use it. Rows are padded to the backend's tile
(GPU: a power of two >= 16, the smallest Triton dot; TPU: a multiple of 8 sublanes) with
position -1 (they see nothing and are sliced off).

  GPU (Triton)  grid (b, kv head, q tile of bq rows); the program loops (fori_loop) over the row's
                live blocks only: 0 .. max(q_pos of the tile) // S_blk, never a block past the
                tile's last position; each step loads table[b, i]'s [S_blk, H] keys and values of
                its kv head (dynamic index into the pool), scores q K^T * scale in float32, masks
                keys past each query's position (-inf), online softmax (running max, sum and the
                accumulator in float32).
  TPU (Mosaic)  grid (b, block i < M) with the block table and each row's live-block count
                scalar-prefetched into SMEM: the pool's BlockSpec index map reads table[b, i], so
                the pipeline DMAs only the row's blocks; steps i >= live repeat the last live block
                (no new DMA) and skip compute (pl.when). A step takes all K kv heads of the block
                ([K, S_blk, H]: one DMA per pool, each head's [S_blk, H] whole in the tile's last
                two dims) and loops over them statically; the running max /
                sum are lane-replicated VMEM scratch [K, R, 128], the accumulator [K, R, H]
                float32. Only run interpreted (pltpu.InterpretParams) here, never on a TPU.

A query that sees no key (padding rows) gets 0. Exact: the same float32 scores and masking as the
gather path; only the order of the softmax sums differs (online softmax), so results agree to
float32 rounding.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kat_jax.ops.tree_mask import MASK_VALUE

NEG_INF = float("-inf")
LANES = 128
GPU_Q_TILE = 64          # query rows per GPU program (float32 accumulator [64, H] in registers)
_NT = (((1,), (1,)), ((), ()))


def _nt(a, b):
    return lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)


def _nn(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _gpu_kernel(table_ref, qpos_ref, q_ref, k_ref, v_ref, o_ref, *, s_blk, m, scale):
    kh = pl.program_id(1)
    q = q_ref[...]                                                         # [bq, H]
    qp = qpos_ref[...]                                                     # [bq]
    live = jnp.clip(jnp.max(qp) // s_blk + 1, 0, m)

    def block(i, carry):
        mx, denom, acc = carry
        blk = table_ref[i]
        k = k_ref[kh, blk].astype(q.dtype)                                 # [S_blk, H]
        v = v_ref[kh, blk].astype(q.dtype)
        sc = _nt(q, k) * scale                                             # [bq, S_blk]
        k_pos = i * s_blk + lax.broadcasted_iota(jnp.int32, sc.shape, 1)
        sc = jnp.where(k_pos <= qp[:, None], sc, NEG_INF)
        m_new = jnp.maximum(mx, jnp.max(sc, axis=1))
        alpha = jnp.exp(mx - m_new)
        p = jnp.exp(sc - m_new[:, None])
        return (m_new, denom * alpha + jnp.sum(p, axis=1),
                acc * alpha[:, None] + _nn(p.astype(v.dtype), v))

    bq, h = q.shape
    init = (jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, h), jnp.float32))
    _, denom, acc = lax.fori_loop(0, live, block, init)
    l_safe = jnp.where(denom > 0.0, denom, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)


def _gpu_call(q_bkrh, qpos_br, pool_k, pool_v, tables, *, scale, interpret):
    from jax.experimental.pallas import triton as plgpu

    b, kv_heads, r, h = q_bkrh.shape
    m, s_blk = tables.shape[1], pool_k.shape[2]
    bq = min(r, GPU_Q_TILE)
    q_spec = pl.BlockSpec((None, None, bq, h), lambda bi, kh, qi: (bi, kh, qi, 0))
    whole = pl.BlockSpec(pool_k.shape, lambda bi, kh, qi: (0, 0, 0, 0))  # indexed in the kernel
    return pl.pallas_call(
        partial(_gpu_kernel, s_blk=s_blk, m=m, scale=scale),
        grid=(b, kv_heads, r // bq),
        in_specs=[pl.BlockSpec((None, m), lambda bi, kh, qi: (bi, 0)),
                  pl.BlockSpec((None, bq), lambda bi, kh, qi: (bi, qi)),
                  q_spec, whole, whole],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q_bkrh.shape, q_bkrh.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret, name="paged_attention_gpu",
    )(tables, qpos_br, q_bkrh, pool_k, pool_v)


def _tpu_kernel(table_ref, live_ref, qpos_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref,
                *, s_blk, kv_heads, scale):
    b, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(i < live_ref[b])
    def _():
        qp = qpos_ref[...]                                                 # [R, 1]
        for kh in range(kv_heads):
            q = q_ref[kh]                                                  # [R, H]
            k = k_ref[kh].astype(q.dtype)                                  # [S_blk, H]
            v = v_ref[kh].astype(q.dtype)
            sc = _nt(q, k) * scale                                         # [R, S_blk]
            k_pos = i * s_blk + lax.broadcasted_iota(jnp.int32, sc.shape, 1)
            sc = jnp.where(k_pos <= qp, sc, NEG_INF)
            m_prev = m_ref[kh]                                             # [R, LANES]
            m_next = jnp.maximum(m_prev, jnp.max(sc, axis=1, keepdims=True))
            alpha = jnp.exp(m_prev - m_next)
            p = jnp.exp(sc - m_next[:, :1])
            l_ref[kh] = alpha * l_ref[kh] + jnp.sum(p, axis=1, keepdims=True)
            acc_ref[kh] = acc_ref[kh] * alpha[:, :1] + _nn(p.astype(v.dtype), v)
            m_ref[kh] = m_next

    @pl.when(i == pl.num_programs(1) - 1)
    def _():
        denom = l_ref[...]                                                 # [K, R, LANES]
        l_safe = jnp.where(denom > 0.0, denom, 1.0)
        o_ref[...] = (acc_ref[...] / l_safe[:, :, :1]).astype(o_ref.dtype)


def _tpu_call(q_bkrh, qpos_br, pool_k, pool_v, tables, *, scale, interpret):
    from jax.experimental.pallas import tpu as pltpu

    b, kv_heads, r, h = q_bkrh.shape
    m, s_blk = tables.shape[1], pool_k.shape[2]
    live = jnp.clip(jnp.max(qpos_br, axis=1) // s_blk + 1, 1, m).astype(jnp.int32)

    def pool_of(bi, i, table, live):
        return 0, table[bi * m + jnp.minimum(i, live[bi] - 1)], 0, 0

    row = lambda bi, i, table, live: (bi, 0, 0)                            # noqa: E731
    q_spec = pl.BlockSpec((None, kv_heads, r, h), lambda bi, i, table, live: (bi, 0, 0, 0))
    pool_spec = pl.BlockSpec((kv_heads, None, s_blk, h), pool_of)
    return pl.pallas_call(
        partial(_tpu_kernel, s_blk=s_blk, kv_heads=kv_heads, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, m),
            in_specs=[pl.BlockSpec((None, r, 1), row), q_spec, pool_spec, pool_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((kv_heads, r, LANES), jnp.float32),
                            pltpu.VMEM((kv_heads, r, LANES), jnp.float32),
                            pltpu.VMEM((kv_heads, r, h), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q_bkrh.shape, q_bkrh.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False, name="paged_attention_tpu",
    )(tables.reshape(-1), live, qpos_br[:, :, None], q_bkrh, pool_k, pool_v)


BACKENDS = ("gpu", "tpu")


def pallas_paged_attention(q_btnh: jax.Array, pool_k: jax.Array, pool_v: jax.Array,
                           block_tables: jax.Array, q_pos: jax.Array, scale: float | None = None,
                           *, backend: str | None = None, interpret: bool | None = None
                           ) -> jax.Array:
    """[B, T, N, H] attention of queries q (at positions q_pos int32[B, T]) over their rows'
    cached positions 0 .. q_pos through the block table (see the module docstring); the same
    result as kat_jax.ops.paged_attention.paged_attention. backend 'gpu' or 'tpu' (default from
    the platform; CPU runs the GPU lowering interpreted); interpret: default True on CPU only."""
    from kat_jax.ops.pallas.tree_attention import default_backend

    auto_backend, auto_interpret = default_backend()
    backend = auto_backend if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    interpret = auto_interpret if interpret is None else bool(interpret)
    b, t, n, h = q_btnh.shape
    kv_heads, _, s_blk, _ = pool_k.shape
    if n % kv_heads:
        raise ValueError(f"query heads ({n}) must be a multiple of kv heads ({kv_heads})")
    if pool_v.shape != pool_k.shape or pool_k.shape[3] != h or block_tables.shape[0] != b \
            or q_pos.shape != (b, t):
        raise ValueError(f"shapes disagree: q {q_btnh.shape}, pools {pool_k.shape} / "
                         f"{pool_v.shape}, block_tables {block_tables.shape}, q_pos {q_pos.shape}")
    if not interpret and backend == "gpu" and (h & (h - 1) or h < 16 or s_blk & (s_blk - 1)
                                               or s_blk < 16):
        raise ValueError(f"the Triton kernel needs a power-of-two head dim and block size >= 16, "
                         f"got head_dim {h}, block size {s_blk}")
    g = n // kv_heads
    scale = float(h ** -0.5 if scale is None else scale)
    r = t * g
    if backend == "gpu":
        r_pad = max(16, 1 << (r - 1).bit_length())
        if r_pad > GPU_Q_TILE:
            r_pad = -(-r // GPU_Q_TILE) * GPU_Q_TILE
    else:
        r_pad = -(-r // 8) * 8
    q_bkrh = q_btnh.reshape(b, t, kv_heads, g, h).transpose(0, 2, 1, 3, 4).reshape(
        b, kv_heads, r, h)
    qpos_br = jnp.repeat(q_pos.astype(jnp.int32), g, axis=1)             # row t * G + g
    if r_pad != r:
        q_bkrh = jnp.pad(q_bkrh, ((0, 0), (0, 0), (0, r_pad - r), (0, 0)))
        qpos_br = jnp.pad(qpos_br, ((0, 0), (0, r_pad - r)), constant_values=-1)
    call = _gpu_call if backend == "gpu" else _tpu_call
    out = call(q_bkrh, qpos_br, pool_k, pool_v, block_tables.astype(jnp.int32), scale=scale,
               interpret=interpret)
    out = out[:, :, :r].reshape(b, kv_heads, t, g, h).transpose(0, 2, 1, 3, 4)
    return out.reshape(b, t, n, h)
