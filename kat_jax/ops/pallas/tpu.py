"""TPU lowering (Pallas on Mosaic) of the tree-attention kernels; runs on CPU in TPU interpret mode.

Layout inside: heads-major q, dO: [B, N, T, H], k, v: [B, K, T, H] (transposed from the model's
[B, T, heads, H] by XLA around the calls) so that each block is a (bs, H) tile; bs is a multiple
of 128. The compact schedule (kat_jax.ops.pallas.schedule, TPU_KEYS: the live block pairs of each
row, at most max_pairs P) is scalar-prefetched into SMEM and drives the BlockSpec index maps, so
the grid steps over live pairs only and the pipeline DMAs only listed blocks:

  forward  grid (b, n, p < P): step p handles pair tpu_pairs[b, p] = (q block i, kv block j), the
           pairs of one q block consecutive; the first initialises the running max / sum
           (lane-replicated in VMEM scratch [bs, 128]) and acc [bs, H] (float32), the last writes
           out (q's dtype) and lse float32 [B, N, 1, T]. Partial pairs take the masked path, full
           ones the unmasked one (pl.when). Steps p >= tpu_num_pairs[b] repeat the last pair: no
           DMA, no compute.
  dQ       same grid and order: p = exp(s - lse), dS = p * (dO V^T - delta), dQ += dS K.
  dK, dV   grid (b, kv head, p < P, g < G) over tpu_pairs_t (ordered by kv block j), transposed
           scores K Q^T so lse and delta are rows; dK, dV accumulate over the pairs of j and the
           G query heads of the kv head.

SMEM: B * (2P + nb + 1) int32 per call (inside shard_map: the local B), checked at trace time
against schedule.TPU_SMEM_WORDS. Grid steps: B * N * P per kernel (P = nb (nb + 1) / 2 by
default, the causal count; a host schedule built with a smaller max_pairs shrinks the grid).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kat_jax.ops.pallas.schedule import TPU_KEYS, check_tpu_smem
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


def _pair(pairs, b, p, big_p, nb, num):
    """(outer, inner, active, first, last) of step p: outer = the block the accumulators belong
    to (q block for tpu_pairs, kv block for tpu_pairs_t)."""
    base = b * big_p
    f = pairs[base + p]
    outer, inner = lax.div(f, nb), lax.rem(f, nb)
    prev = lax.div(pairs[base + jnp.maximum(p - 1, 0)], nb)
    nxt = lax.div(pairs[base + jnp.minimum(p + 1, big_p - 1)], nb)
    n = jnp.minimum(num[b], big_p)
    return outer, inner, p < n, (p == 0) | (prev != outer), (p == n - 1) | (nxt != outer)


def _fwd_kernel(pairs, pairs_t, num, min_end, q_ref, k_ref, v_ref, end_ref, o_ref, lse_ref,
                m_ref, l_ref, acc_ref, *, bs, nb, big_p, scale):
    del pairs_t
    b, p = pl.program_id(0), pl.program_id(2)
    i, j, active, first, last = _pair(pairs, b, p, big_p, nb, num)

    @pl.when(active & first)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    full = (j < i) & ((i + 1) * bs <= min_end[b * nb + j])

    def step(masked: bool):
        sc = _nt(q_ref[...], k_ref[...]) * scale                            # [bs, bs]
        if masked:
            sc = jnp.where(_visible(sc.shape, i * bs, j * bs, end_ref[...], False), sc, NEG_INF)
        m_prev = m_ref[...]                                                  # [bs, LANES]
        m_next = jnp.maximum(m_prev, jnp.max(sc, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p_ = jnp.exp(sc - m_next[:, :1])
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p_, axis=1, keepdims=True)
        v = v_ref[...]
        acc_ref[...] = acc_ref[...] * alpha[:, :1] + _nn(p_.astype(v.dtype), v)
        m_ref[...] = m_next

    pl.when(active & full)(partial(step, False))
    pl.when(active & jnp.logical_not(full))(partial(step, True))

    @pl.when(active & last)
    def _():
        denom = l_ref[...]
        seen = denom > 0.0
        l_safe = jnp.where(seen, denom, 1.0)
        o_ref[...] = (acc_ref[...] / l_safe[:, :1]).astype(o_ref.dtype)
        lse = jnp.where(seen, m_ref[...] + jnp.log(l_safe), 0.0)             # [bs, LANES]
        lse_ref[...] = lse.T[:1, :]                                          # [1, bs]


def _dq_kernel(pairs, pairs_t, num, min_end, q_ref, k_ref, v_ref, end_ref, do_ref, lse_ref,
               delta_ref, dq_ref, acc_ref, *, bs, nb, big_p, scale):
    del pairs_t
    b, p = pl.program_id(0), pl.program_id(2)
    i, j, active, first, last = _pair(pairs, b, p, big_p, nb, num)

    @pl.when(active & first)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    full = (j < i) & ((i + 1) * bs <= min_end[b * nb + j])

    def step(masked: bool):
        k = k_ref[...]
        sc = _nt(q_ref[...], k) * scale
        if masked:
            sc = jnp.where(_visible(sc.shape, i * bs, j * bs, end_ref[...], False), sc, NEG_INF)
        lse = jnp.expand_dims(lse_ref[0], -1)                                # [bs, 1]
        delta = jnp.expand_dims(delta_ref[0], -1)
        p_ = jnp.exp(sc - lse)
        ds = p_ * (_nt(do_ref[...], v_ref[...]) - delta)
        acc_ref[...] += _nn(ds.astype(k.dtype), k)

    pl.when(active & full)(partial(step, False))
    pl.when(active & jnp.logical_not(full))(partial(step, True))

    @pl.when(active & last)
    def _():
        dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(pairs, pairs_t, num, min_end, q_ref, k_ref, v_ref, end_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, dk_acc, dv_acc, *, bs, nb, big_p, groups, scale):
    del pairs
    b, p, g = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    j, i, active, first, last = _pair(pairs_t, b, p, big_p, nb, num)

    @pl.when(active & first & (g == 0))
    def _():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    full = (j < i) & ((i + 1) * bs <= min_end[b * nb + j])

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

    @pl.when(active & last & (g == groups - 1))
    def _():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _prefetch(sched):
    return [sched[key].reshape(-1) for key in TPU_KEYS]


def _heads_major(x):
    return x.transpose(0, 2, 1, 3)


def _sizes(q, k, sched, bs):
    b, t, n, h = q.shape
    if bs % 128:
        raise ValueError(f"the TPU kernels need a block size that is a multiple of 128, got {bs}")
    nb, big_p = t // bs, sched["tpu_pairs"].shape[1]
    check_tpu_smem(b, nb, big_p)
    return b, t, n, h, k.shape[2], n // k.shape[2], nb, big_p


def _ij(bi, p, pairs, nb, big_p):
    f = pairs[bi * big_p + p]
    return lax.div(f, nb), lax.rem(f, nb)


def _q_major_specs(bs, h, g, nb, big_p):
    """BlockSpecs of the (b, n, p) grid over tpu_pairs: q-block, kv-block, end and stat tiles."""
    def q_of(bi, ni, p, pairs, *_):
        return bi, ni, _ij(bi, p, pairs, nb, big_p)[0], 0

    def kv_of(bi, ni, p, pairs, *_):
        return bi, lax.div(ni, g), _ij(bi, p, pairs, nb, big_p)[1], 0

    def end_of(bi, ni, p, pairs, *_):
        return bi, 0, _ij(bi, p, pairs, nb, big_p)[1]

    def stat_of(bi, ni, p, pairs, *_):
        return bi, ni, 0, _ij(bi, p, pairs, nb, big_p)[0]

    tile = (None, None, bs, h)
    return (pl.BlockSpec(tile, q_of), pl.BlockSpec(tile, kv_of),
            pl.BlockSpec((None, 1, bs), end_of), pl.BlockSpec((None, None, 1, bs), stat_of))


def forward(q, k, v, end, sched, *, bs: int, scale: float, interpret: bool):
    """out [B, T, N, H] (q's dtype), lse float32[B, N, 1, T]. sched: the TPU_KEYS arrays."""
    b, t, n, h, kv_heads, g, nb, big_p = _sizes(q, k, sched, bs)
    q_spec, kv_spec, end_spec, stat_spec = _q_major_specs(bs, h, g, nb, big_p)
    out, lse = pl.pallas_call(
        partial(_fwd_kernel, bs=bs, nb=nb, big_p=big_p, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=(b, n, big_p),
            in_specs=[q_spec, kv_spec, kv_spec, end_spec],
            out_specs=[q_spec, stat_spec],
            scratch_shapes=[pltpu.VMEM((bs, LANES), jnp.float32),
                            pltpu.VMEM((bs, LANES), jnp.float32),
                            pltpu.VMEM((bs, h), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((b, n, t, h), q.dtype),
                   jax.ShapeDtypeStruct((b, n, 1, t), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret), name="tree_attention_fwd",
    )(*_prefetch(sched), _heads_major(q), _heads_major(k), _heads_major(v), end[:, None, :])
    return _heads_major(out), lse


def backward(q, k, v, end, sched, out, lse, dout, *, bs: int, scale: float, interpret: bool):
    """(dq, dk, dv) in the dtypes of q, k, v, from the forward's out and lse [B, N, 1, T]."""
    b, t, n, h, kv_heads, g, nb, big_p = _sizes(q, k, sched, bs)
    delta = jnp.einsum("btnh,btnh->bnt", dout.astype(jnp.float32),
                       out.astype(jnp.float32))[:, :, None, :]               # [B, N, 1, T]
    qt, kt, vt, dot = (_heads_major(x) for x in (q, k, v, dout))
    prefetch = _prefetch(sched)
    q_spec, kv_spec, end_spec, stat_spec = _q_major_specs(bs, h, g, nb, big_p)
    dq = pl.pallas_call(
        partial(_dq_kernel, bs=bs, nb=nb, big_p=big_p, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=(b, n, big_p),
            in_specs=[q_spec, kv_spec, kv_spec, end_spec, q_spec, stat_spec, stat_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bs, h), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((b, n, t, h), q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret), name="tree_attention_dq",
    )(*prefetch, qt, kt, vt, end[:, None, :], dot, lse, delta)

    def q_of(bi, kh, p, gi, pairs, pairs_t, *_):
        return bi, kh * g + gi, _ij(bi, p, pairs_t, nb, big_p)[1], 0

    def stat_of(bi, kh, p, gi, pairs, pairs_t, *_):
        return bi, kh * g + gi, 0, _ij(bi, p, pairs_t, nb, big_p)[1]

    def kv_of(bi, kh, p, gi, pairs, pairs_t, *_):
        return bi, kh, _ij(bi, p, pairs_t, nb, big_p)[0], 0

    def end_of(bi, kh, p, gi, pairs, pairs_t, *_):
        return bi, _ij(bi, p, pairs_t, nb, big_p)[0], 0

    tile = (None, None, bs, h)
    dk, dv = pl.pallas_call(
        partial(_dkv_kernel, bs=bs, nb=nb, big_p=big_p, groups=g, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=(b, kv_heads, big_p, g),
            in_specs=[pl.BlockSpec(tile, q_of), pl.BlockSpec(tile, kv_of),
                      pl.BlockSpec(tile, kv_of), pl.BlockSpec((None, bs, 1), end_of),
                      pl.BlockSpec(tile, q_of), pl.BlockSpec((None, None, 1, bs), stat_of),
                      pl.BlockSpec((None, None, 1, bs), stat_of)],
            out_specs=[pl.BlockSpec(tile, kv_of), pl.BlockSpec(tile, kv_of)],
            scratch_shapes=[pltpu.VMEM((bs, h), jnp.float32), pltpu.VMEM((bs, h), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((b, kv_heads, t, h), k.dtype),
                   jax.ShapeDtypeStruct((b, kv_heads, t, h), v.dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=_interpret(interpret), name="tree_attention_dkv",
    )(*prefetch, qt, kt, vt, end[:, :, None], dot, lse, delta)
    return _heads_major(dq), _heads_major(dk), _heads_major(dv)
