"""TPU lowering (Pallas on Mosaic) of the tree-attention kernels; runs on CPU in TPU interpret mode.

Layout inside: heads-major q, dO: [B, N, T, H], k, v: [B, K, T, H] (transposed from the model's
[B, T, heads, H] by XLA around the calls) so that each block is a (bs, H) tile; bs is a multiple
of 128. The schedule (kat_jax.ops.pallas.schedule) is scalar-prefetched into SMEM and drives the
BlockSpec index maps, so the pipeline DMAs only the blocks that are listed:

  forward  grid (b, n, q block i, s < nb): step s handles kv block q_kv_blocks[i, s] while
           s < q_kv_count[i] (later slots repeat the last block: no new DMA, no compute).
           Running max / sum live lane-replicated in VMEM scratch [bs, 128], acc [bs, H], all
           float32; partial blocks take the masked path, full blocks the unmasked one (pl.when).
           out in q's dtype; lse float32 [B, N, 1, T] (a lane-dense row per q block).
  dQ       same grid and loop: p = exp(s - lse), dS = p * (dO V^T - delta), dQ += dS K.
  dK, dV   grid (b, kv head, kv block j, g < G, s < nb): q block i = j + s for i <= kv_q_last[j]
           (the queries that can see block j), transposed scores K Q^T so lse and delta are rows.

SMEM holds B * nb * (nb + 3) int32 of schedule per call (inside shard_map: the local B); at
bs = 128 that is 64 Ki words per row at T = 32K. Larger blocks shrink it quadratically.
Grid steps are B * N * nb^2 per kernel (empty steps cost only the step overhead).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kat_jax.ops.tree_mask import MASK_VALUE

NEG_INF = float("-inf")
LANES = 128
_NT = (((1,), (1,)), ((), ()))


def _nt(a, b):
    return lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)


def _nn(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _interpret(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


def _visible(shape, q_start, k_start, end, transposed: bool):
    """bool mask of a score tile: [Q, K] (end: [1, K]) or, transposed, [K, Q] (end: [K, 1])."""
    q_axis, k_axis = (1, 0) if transposed else (0, 1)
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, shape, q_axis)
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, k_axis)
    return (k_pos <= q_pos) & (q_pos < end)


def _fwd_kernel(blocks, count, q_last, min_end, q_ref, k_ref, v_ref, end_ref, o_ref, lse_ref,
                m_ref, l_ref, acc_ref, *, bs, nb, scale):
    del q_last
    b, i, s = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    row = b * nb

    @pl.when(s == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    j = blocks[(row + i) * nb + s]
    active = s < count[row + i]
    full = (j < i) & ((i + 1) * bs <= min_end[row + j])

    def step(masked: bool):
        sc = _nt(q_ref[...], k_ref[...]) * scale                            # [bs, bs]
        if masked:
            sc = jnp.where(_visible(sc.shape, i * bs, j * bs, end_ref[...], False), sc, NEG_INF)
        m_prev = m_ref[...]                                                  # [bs, LANES]
        m_next = jnp.maximum(m_prev, jnp.max(sc, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.exp(sc - m_next[:, :1])
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        acc_ref[...] = acc_ref[...] * alpha[:, :1] + _nn(p.astype(v.dtype), v)
        m_ref[...] = m_next

    pl.when(active & full)(partial(step, False))
    pl.when(active & jnp.logical_not(full))(partial(step, True))

    @pl.when(s == nb - 1)
    def _():
        denom = l_ref[...]
        seen = denom > 0.0
        l_safe = jnp.where(seen, denom, 1.0)
        o_ref[...] = (acc_ref[...] / l_safe[:, :1]).astype(o_ref.dtype)
        lse = jnp.where(seen, m_ref[...] + jnp.log(l_safe), 0.0)             # [bs, LANES]
        lse_ref[...] = lse.T[:1, :]                                          # [1, bs]


def _dq_kernel(blocks, count, q_last, min_end, q_ref, k_ref, v_ref, end_ref, do_ref, lse_ref,
               delta_ref, dq_ref, acc_ref, *, bs, nb, scale):
    del q_last
    b, i, s = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    row = b * nb

    @pl.when(s == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    j = blocks[(row + i) * nb + s]
    active = s < count[row + i]
    full = (j < i) & ((i + 1) * bs <= min_end[row + j])

    def step(masked: bool):
        k = k_ref[...]
        sc = _nt(q_ref[...], k) * scale
        if masked:
            sc = jnp.where(_visible(sc.shape, i * bs, j * bs, end_ref[...], False), sc, NEG_INF)
        lse = jnp.expand_dims(lse_ref[0], -1)                                # [bs, 1]
        delta = jnp.expand_dims(delta_ref[0], -1)
        p = jnp.exp(sc - lse)
        ds = p * (_nt(do_ref[...], v_ref[...]) - delta)
        acc_ref[...] += _nn(ds.astype(k.dtype), k)

    pl.when(active & full)(partial(step, False))
    pl.when(active & jnp.logical_not(full))(partial(step, True))

    @pl.when(s == nb - 1)
    def _():
        dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(blocks, count, q_last, min_end, q_ref, k_ref, v_ref, end_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, dk_acc, dv_acc, *, bs, nb, groups, scale):
    del blocks, count
    b, j, g, s = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    row = b * nb
    i = j + s

    @pl.when((g == 0) & (s == 0))
    def _():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    active = i <= q_last[row + j]
    full = (j < i) & ((i + 1) * bs <= min_end[row + j])

    def step(masked: bool):
        q, do, v = q_ref[...], do_ref[...], v_ref[...]
        st = _nt(k_ref[...], q) * scale                                      # [bs_k, bs_q]
        if masked:
            st = jnp.where(_visible(st.shape, i * bs, j * bs, end_ref[...], True), st, NEG_INF)
        pt = jnp.exp(st - lse_ref[...])                                      # lse row [1, bs]
        dv_acc[...] += _nn(pt.astype(do.dtype), do)
        dst = pt * (_nt(v, do) - delta_ref[...])
        dk_acc[...] += _nn(dst.astype(q.dtype), q)

    pl.when(active & full)(partial(step, False))
    pl.when(active & jnp.logical_not(full))(partial(step, True))

    @pl.when((g == groups - 1) & (s == nb - 1))
    def _():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _prefetch(sched):
    return [sched[key].reshape(-1) for key in ("q_kv_blocks", "q_kv_count", "kv_q_last",
                                               "kv_min_end")]


def _heads_major(x):
    return x.transpose(0, 2, 1, 3)


def forward(q, k, v, end, sched, *, bs: int, scale: float, interpret: bool):
    """out [B, T, N, H] (q's dtype), lse float32[B, N, 1, T]. sched: the KERNEL_KEYS arrays."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    g, nb = n // kv_heads, t // bs
    if bs % 128:
        raise ValueError(f"the TPU kernels need a block size that is a multiple of 128, got {bs}")

    def kv_block(bi, ni, i, s, blocks, *_):
        return bi, lax.div(ni, g), blocks[(bi * nb + i) * nb + s], 0

    def end_block(bi, ni, i, s, blocks, *_):
        return bi, 0, blocks[(bi * nb + i) * nb + s]

    q_spec = pl.BlockSpec((None, None, bs, h), lambda bi, ni, i, s, *_: (bi, ni, i, 0))
    kv_spec = pl.BlockSpec((None, None, bs, h), kv_block)
    out, lse = pl.pallas_call(
        partial(_fwd_kernel, bs=bs, nb=nb, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=(b, n, nb, nb),
            in_specs=[q_spec, kv_spec, kv_spec, pl.BlockSpec((None, 1, bs), end_block)],
            out_specs=[q_spec, pl.BlockSpec((None, None, 1, bs),
                                            lambda bi, ni, i, s, *_: (bi, ni, 0, i))],
            scratch_shapes=[pltpu.VMEM((bs, LANES), jnp.float32),
                            pltpu.VMEM((bs, LANES), jnp.float32),
                            pltpu.VMEM((bs, h), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((b, n, t, h), q.dtype),
                   jax.ShapeDtypeStruct((b, n, 1, t), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret), name="tree_attention_fwd",
    )(*_prefetch(sched), _heads_major(q), _heads_major(k), _heads_major(v), end[:, None, :])
    return _heads_major(out), lse


def backward(q, k, v, end, sched, out, lse, dout, *, bs: int, scale: float, interpret: bool):
    """(dq, dk, dv) in the dtypes of q, k, v, from the forward's out and lse [B, N, 1, T]."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    g, nb = n // kv_heads, t // bs
    delta = jnp.einsum("btnh,btnh->bnt", dout.astype(jnp.float32),
                       out.astype(jnp.float32))[:, :, None, :]               # [B, N, 1, T]
    qt, kt, vt, dot = (_heads_major(x) for x in (q, k, v, dout))
    prefetch = _prefetch(sched)

    def kv_block(bi, ni, i, s, blocks, *_):
        return bi, lax.div(ni, g), blocks[(bi * nb + i) * nb + s], 0

    def end_block(bi, ni, i, s, blocks, *_):
        return bi, 0, blocks[(bi * nb + i) * nb + s]

    q_spec = pl.BlockSpec((None, None, bs, h), lambda bi, ni, i, s, *_: (bi, ni, i, 0))
    stat_spec = pl.BlockSpec((None, None, 1, bs), lambda bi, ni, i, s, *_: (bi, ni, 0, i))
    kv_spec = pl.BlockSpec((None, None, bs, h), kv_block)
    dq = pl.pallas_call(
        partial(_dq_kernel, bs=bs, nb=nb, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=(b, n, nb, nb),
            in_specs=[q_spec, kv_spec, kv_spec, pl.BlockSpec((None, 1, bs), end_block), q_spec,
                      stat_spec, stat_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bs, h), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((b, n, t, h), q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret), name="tree_attention_dq",
    )(*prefetch, qt, kt, vt, end[:, None, :], dot, lse, delta)

    def q_of(bi, kh, j, gi, s, blocks, count, q_last, *_):
        # q block j + s, clamped to the last one that sees kv block j (no new DMA past it).
        return bi, kh * g + gi, jnp.minimum(j + s, jnp.maximum(q_last[bi * nb + j], j)), 0

    def stat_of(bi, kh, j, gi, s, blocks, count, q_last, *_):
        qb, qh, qi, _ = q_of(bi, kh, j, gi, s, blocks, count, q_last)
        return qb, qh, 0, qi

    kv_own = pl.BlockSpec((None, None, bs, h), lambda bi, kh, j, gi, s, *_: (bi, kh, j, 0))
    dk, dv = pl.pallas_call(
        partial(_dkv_kernel, bs=bs, nb=nb, groups=g, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=(b, kv_heads, nb, g, nb),
            in_specs=[pl.BlockSpec((None, None, bs, h), q_of), kv_own, kv_own,
                      pl.BlockSpec((None, bs, 1), lambda bi, kh, j, gi, s, *_: (bi, j, 0)),
                      pl.BlockSpec((None, None, bs, h), q_of),
                      pl.BlockSpec((None, None, 1, bs), stat_of),
                      pl.BlockSpec((None, None, 1, bs), stat_of)],
            out_specs=[kv_own, kv_own],
            scratch_shapes=[pltpu.VMEM((bs, h), jnp.float32), pltpu.VMEM((bs, h), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((b, kv_heads, t, h), k.dtype),
                   jax.ShapeDtypeStruct((b, kv_heads, t, h), v.dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=_interpret(interpret), name="tree_attention_dkv",
    )(*prefetch, qt, kt, vt, end[:, :, None], dot, lse, delta)
    return _heads_major(dq), _heads_major(dk), _heads_major(dv)
