"""GPU lowering (Pallas on Triton) of the tree-attention kernels; also runs interpreted on CPU.

Layout is the model's: q, dO: [B, T, N, H], k, v: [B, T, K, H] (query head n reads kv head n // G),
subtree_end: int32[B, T]; T a multiple of the block size bs, H a power of two >= 16 on a GPU.
Every kernel program owns one block of bs rows and loops over the blocks the schedule
(kat_jax.ops.pallas.schedule) lists for it, in sub-tiles whose sizes `GpuTiles` sets:

  forward  grid (q block i, b, n): for the q_kv_count[i] listed kv blocks j, scores
           q K_j^T * scale in float32, element mask only when (i, j) is partial (masked
           scores are -inf), online softmax (running max m, sum l, acc in float32).
           out = acc / l in q's dtype; lse = m + log(l): float32[B, N, T].
  dQ       grid (q block i, b, n), same loop: p = exp(s - lse), dS = p * (dO V^T - delta),
           dQ = scale * sum dS K.
  dK, dV   grid (kv block j, b, kv head): for the G query heads of the kv head and the q blocks
           j .. kv_q_last[j] (exactly the queries that can see the block): transposed scores
           K Q^T, dV += p^T dO, dK += scale * dS^T Q, accumulated in float32.

A query that sees no key gets output 0, lse 0 and zero gradients. Tile sizes and warp counts are
starting points for H100/H200 (FlashAttention-2 Triton shapes); they are not tuned on hardware.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kat_jax.ops.tree_mask import MASK_VALUE

NEG_INF = float("-inf")
_NT = (((1,), (1,)), ((), ()))   # contract the last dims: a @ b.T


@dataclasses.dataclass(frozen=True)
class GpuTiles:
    """Sub-tile sizes (each divides the block size; clipped to it): kv rows per forward / dQ step,
    q rows per dK/dV step; Triton warps and pipeline stages."""
    fwd_kv: int = 64
    dq_kv: int = 32
    dkv_q: int = 32
    num_warps_fwd: int = 8
    num_warps_bwd: int = 8
    num_stages: int = 2


def _nt(a, b):
    return lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)


def _nn(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _mask_rows(sc, q_start, k_start, end_k):
    """sc [Q, K] scores of queries q_start.. and keys k_start..: -inf where not visible."""
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, sc.shape, 0)
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, sc.shape, 1)
    return jnp.where((k_pos <= q_pos) & (q_pos < end_k[None, :]), sc, NEG_INF)


def _fwd_kernel(q_ref, k_ref, v_ref, end_ref, blocks_ref, count_ref, min_end_ref, o_ref, lse_ref,
                *, bs, bk, nb, scale):
    i = pl.program_id(0)
    q = q_ref[...]                                                         # [bs, H]

    def body(s, carry):
        j = blocks_ref[i * nb + s]
        full = (j < i) & ((i + 1) * bs <= min_end_ref[j])
        for t in range(bs // bk):
            m, denom, acc = carry
            start = j * bs + t * bk
            k = k_ref[pl.ds(start, bk), :]
            v = v_ref[pl.ds(start, bk), :]
            sc = _nt(q, k) * scale                                         # [bs, bk] f32
            sc = lax.cond(full, lambda x: x,
                          lambda x, start=start: _mask_rows(x, i * bs, start,
                                                            end_ref[pl.ds(start, bk)]), sc)
            m_new = jnp.maximum(m, jnp.max(sc, axis=1))
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(sc - m_new[:, None])
            carry = (m_new, denom * alpha + jnp.sum(p, axis=1),
                     acc * alpha[:, None] + _nn(p.astype(v.dtype), v))
        return carry

    h = q.shape[-1]
    init = (jnp.full((bs,), MASK_VALUE, jnp.float32), jnp.zeros((bs,), jnp.float32),
            jnp.zeros((bs, h), jnp.float32))
    m, denom, acc = lax.fori_loop(0, count_ref[i], body, init)
    seen = denom > 0.0
    l_safe = jnp.where(seen, denom, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), 0.0)


def _dq_kernel(q_ref, k_ref, v_ref, end_ref, do_ref, lse_ref, delta_ref, blocks_ref, count_ref,
               min_end_ref, dq_ref, *, bs, bk, nb, scale):
    i = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def body(s, dq):
        j = blocks_ref[i * nb + s]
        full = (j < i) & ((i + 1) * bs <= min_end_ref[j])
        for t in range(bs // bk):
            start = j * bs + t * bk
            k = k_ref[pl.ds(start, bk), :]
            v = v_ref[pl.ds(start, bk), :]
            sc = _nt(q, k) * scale
            sc = lax.cond(full, lambda x: x,
                          lambda x, start=start: _mask_rows(x, i * bs, start,
                                                            end_ref[pl.ds(start, bk)]), sc)
            p = jnp.exp(sc - lse[:, None])
            ds = p * (_nt(do, v) - delta[:, None])
            dq = dq + _nn(ds.astype(k.dtype), k)
        return dq

    dq = lax.fori_loop(0, count_ref[i], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, end_ref, do_ref, lse_ref, delta_ref, q_last_ref, min_end_ref,
                dk_ref, dv_ref, *, bs, bq, groups, scale):
    j = pl.program_id(0)
    kvh = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]                                          # [bs, H]
    end = end_ref[...]                                                     # [bs]
    min_end = min_end_ref[j]
    k_pos = j * bs + lax.broadcasted_iota(jnp.int32, (bs, bq), 0)

    def q_block(i, carry, n):
        for t in range(bs // bq):
            dk, dv = carry
            qs = i * bs + t * bq
            q = q_ref[pl.ds(qs, bq), n, :]                                 # [bq, H]
            do = do_ref[pl.ds(qs, bq), n, :]
            lse = lse_ref[n, pl.ds(qs, bq)]
            delta = delta_ref[n, pl.ds(qs, bq)]
            st = _nt(k, q) * scale                                         # [bs, bq] = S^T
            full = (j * bs + bs - 1 <= qs) & (qs + bq <= min_end)

            def masked(x, qs=qs):
                q_pos = qs + lax.broadcasted_iota(jnp.int32, x.shape, 1)
                return jnp.where((k_pos <= q_pos) & (q_pos < end[:, None]), x, NEG_INF)

            st = lax.cond(full, lambda x: x, masked, st)
            pt = jnp.exp(st - lse[None, :])
            dv = dv + _nn(pt.astype(do.dtype), do)
            dst = pt * (_nt(v, do) - delta[None, :])
            carry = (dk + _nn(dst.astype(q.dtype), q), dv)
        return carry

    def head(g, carry):
        n = kvh * groups + g
        return lax.fori_loop(j, q_last_ref[j] + 1, partial(q_block, n=n), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, groups, head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _tile(size: int, bs: int) -> int:
    size = min(int(size), bs)
    if bs % size:
        raise ValueError(f"tile {size} must divide the block size {bs}")
    return size


def _params(num_warps: int, num_stages: int):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def forward(q, k, v, end, sched, *, bs: int, scale: float, interpret: bool,
            tiles: GpuTiles = GpuTiles()):
    """out [B, T, N, H] (q's dtype), lse float32[B, N, T]. sched: the KERNEL_KEYS arrays."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    g, nb = n // kv_heads, t // bs
    bk = _tile(tiles.fwd_kv, bs)
    row = lambda width: pl.BlockSpec((None, width), lambda i, bi, ni: (bi, 0))  # noqa: E731
    kv_spec = pl.BlockSpec((None, t, None, h), lambda i, bi, ni: (bi, 0, ni // g, 0))
    q_spec = pl.BlockSpec((None, bs, None, h), lambda i, bi, ni: (bi, i, ni, 0))
    return pl.pallas_call(
        partial(_fwd_kernel, bs=bs, bk=bk, nb=nb, scale=scale),
        grid=(nb, b, n),
        in_specs=[q_spec, kv_spec, kv_spec, row(t), row(nb * nb), row(nb), row(nb)],
        out_specs=[q_spec, pl.BlockSpec((None, None, bs), lambda i, bi, ni: (bi, ni, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
        compiler_params=_params(tiles.num_warps_fwd if bs >= 128 else 4, tiles.num_stages),
        interpret=interpret, name="tree_attention_fwd",
    )(q, k, v, end, sched["q_kv_blocks"], sched["q_kv_count"], sched["kv_min_end"])


def backward(q, k, v, end, sched, out, lse, dout, *, bs: int, scale: float, interpret: bool,
             tiles: GpuTiles = GpuTiles()):
    """(dq, dk, dv) in the dtypes of q, k, v, from the forward's out and lse."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    g, nb = n // kv_heads, t // bs
    delta = jnp.einsum("btnh,btnh->bnt", dout.astype(jnp.float32), out.astype(jnp.float32))
    warps = tiles.num_warps_bwd if bs >= 128 else 4
    row = lambda width: pl.BlockSpec((None, width), lambda i, bi, ni: (bi, 0))  # noqa: E731
    kv_full = pl.BlockSpec((None, t, None, h), lambda i, bi, ni: (bi, 0, ni // g, 0))
    q_blk = pl.BlockSpec((None, bs, None, h), lambda i, bi, ni: (bi, i, ni, 0))
    stat_blk = pl.BlockSpec((None, None, bs), lambda i, bi, ni: (bi, ni, i))
    dq = pl.pallas_call(
        partial(_dq_kernel, bs=bs, bk=_tile(tiles.dq_kv, bs), nb=nb, scale=scale),
        grid=(nb, b, n),
        in_specs=[q_blk, kv_full, kv_full, row(t), q_blk, stat_blk, stat_blk, row(nb * nb),
                  row(nb), row(nb)],
        out_specs=q_blk,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(warps, tiles.num_stages),
        interpret=interpret, name="tree_attention_dq",
    )(q, k, v, end, dout, lse, delta, sched["q_kv_blocks"], sched["q_kv_count"],
      sched["kv_min_end"])

    q_full = pl.BlockSpec((None, t, n, h), lambda j, bi, kh: (bi, 0, 0, 0))
    stat_full = pl.BlockSpec((None, n, t), lambda j, bi, kh: (bi, 0, 0))
    kv_blk = pl.BlockSpec((None, bs, None, h), lambda j, bi, kh: (bi, j, kh, 0))
    dk, dv = pl.pallas_call(
        partial(_dkv_kernel, bs=bs, bq=_tile(tiles.dkv_q, bs), groups=g, scale=scale),
        grid=(nb, b, kv_heads),
        in_specs=[q_full, kv_blk, kv_blk, pl.BlockSpec((None, bs), lambda j, bi, kh: (bi, j)),
                  q_full, stat_full, stat_full, row(nb), row(nb)],
        out_specs=[kv_blk, kv_blk],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(warps, tiles.num_stages),
        interpret=interpret, name="tree_attention_dkv",
    )(q, k, v, end, dout, lse, delta, sched["kv_q_last"], sched["kv_min_end"])
    return dq, dk, dv
