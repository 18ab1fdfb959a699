"""GPU lowering (Pallas on Triton) of the tree-attention kernels; also runs interpreted on CPU.

Layout is the model's: q, dO: [B, T, N, H], k, v: [B, T, K, H] (query head n reads kv head n // G),
subtree_end: int32[B, T]; T a multiple of the block size bs, H a power of two >= 16 on a GPU.
The schedule (kat_jax.ops.pallas.schedule) is in blocks of bs rows, the packer's unit; the kernels
subdivide it into tiles `choose_tiles` picks from head_dim, dtype and a register / shared-memory
budget (TILE_TABLE below), so a 512-row block runs in the same tiles as a 128-row one:

  forward  grid (q tile, b, n): the q tile of fwd_q rows lies in q block i; for the q_kv_count[i]
           listed kv blocks j, kv sub-tiles of fwd_kv rows (on the diagonal block only those up
           to the tile's last query), scores q K^T * scale in float32, the element mask only when
           the sub-tile is not fully visible (masked scores are -inf), online softmax (running
           max m, sum l, acc in float32). out = acc / l in q's dtype; lse = m + log(l):
           float32[B, N, T].
  dQ       grid (q tile, b, n), same loop: p = exp(s - lse), dS = p * (dO V^T - delta),
           dQ = scale * sum dS K.
  dK, dV   grid (kv tile, b, kv head): for the G query heads of the kv head and the q tiles of
           dkv_q rows from the kv tile's first key to its largest subtree_end (exactly the
           queries that can see it): transposed scores K Q^T, dV += p^T dO,
           dK += scale * dS^T Q, accumulated in float32.

A query that sees no key gets output 0, lse 0 and zero gradients. The tile table is derived from
FlashAttention-2 Triton shapes and a register / shared-memory estimate (tile_budget); it has not
been tuned or run on a GPU yet.
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


# Hardware budget per program (one thread block) on an H100 / H200 (compute capability 9.0).
REGS_PER_THREAD = 255              # the most 32-bit registers one thread can hold
SMEM_BYTES = 227 * 1024            # the most shared memory one thread block can take
REG_OVERHEAD = 32                  # indices, pointers, the softmax statistics, loop state

# Starting tiles per head dim (16-bit inputs): (fwd q, fwd kv, dQ q, dQ kv, dK/dV kv, dK/dV q,
# warps fwd, warps bwd, stages). FlashAttention-2 Triton shapes: 128-row q tiles where the
# float32 accumulator allows it, 32-row tiles at head_dim 256. `choose_tiles` clips them to the
# block size and halves the larger tile of a kernel until `tile_budget` holds (float32 inputs
# take twice the operand registers and shared memory, so they shrink first).
#
#   head_dim | fwd q x kv | dQ q x kv | dKV kv x q | warps fwd/bwd | stages
#   ---------+------------+-----------+------------+---------------+-------
#      64    |  128 x 64  |  64 x 64  |  64 x 64   |     4 / 4     |   3
#     128    |  128 x 64  |  64 x 64  |  64 x 32   |     8 / 8     |   2
#     256    |   64 x 32  |  64 x 32  |  32 x 32   |     8 / 8     |   2
TILE_TABLE = {
    64: (128, 64, 64, 64, 64, 64, 4, 4, 3),
    128: (128, 64, 64, 64, 64, 32, 8, 8, 2),
    256: (64, 32, 64, 32, 32, 32, 8, 8, 2),
}
MIN_TILE = 16                      # Triton's smallest dot operand


@dataclasses.dataclass(frozen=True)
class GpuTiles:
    """Tile sizes of the three kernels, each a power of two that divides the block size bs (the
    schedule's unit: a program owns a q tile (forward, dQ) or a kv tile (dK/dV) inside one block
    and loops over the blocks the schedule lists for it, in sub-tiles of the other side).
    fwd_q / dq_q: q rows per program; fwd_kv / dq_kv: kv rows per loop step; dkv_kv: kv rows per
    program; dkv_q: q rows per step. Triton warps and pipeline stages."""
    fwd_q: int = 64
    fwd_kv: int = 64
    dq_q: int = 64
    dq_kv: int = 32
    dkv_kv: int = 64
    dkv_q: int = 32
    num_warps_fwd: int = 8
    num_warps_bwd: int = 8
    num_stages: int = 2


def tile_budget(tiles: GpuTiles, head_dim: int, itemsize: int) -> dict[str, tuple[int, int]]:
    """Estimated (32-bit registers per thread, shared-memory bytes) of each kernel's program.

    Registers: the float32 accumulators, the float32 score tiles and the operands held for the
    whole program, spread over 32 * warps threads, plus REG_OVERHEAD. Shared memory: the streamed
    operand tiles times the pipeline stages, plus the resident operands. An estimate (the Triton
    compiler decides), for checking tiles against REGS_PER_THREAD and SMEM_BYTES."""
    h, w = head_dim, itemsize / 4
    t, st = tiles, tiles.num_stages
    wf, wb = 32 * tiles.num_warps_fwd, 32 * tiles.num_warps_bwd
    fwd = ((t.fwd_q * h + t.fwd_q * t.fwd_kv + t.fwd_q * h * w) / wf,
           st * 2 * t.fwd_kv * h * itemsize + t.fwd_q * h * itemsize)
    dq = ((t.dq_q * h + 2 * t.dq_q * t.dq_kv + 2 * t.dq_q * h * w) / wb,
          st * 2 * t.dq_kv * h * itemsize + 2 * t.dq_q * h * itemsize)
    dkv = ((2 * t.dkv_kv * h + 2 * t.dkv_kv * t.dkv_q + 2 * t.dkv_kv * h * w) / wb,
           st * 2 * t.dkv_q * h * itemsize + 2 * t.dkv_kv * h * itemsize)
    return {name: (int(r) + REG_OVERHEAD, int(m)) for name, (r, m) in
            (("fwd", fwd), ("dq", dq), ("dkv", dkv))}


def _fits(cost: tuple[int, int]) -> bool:
    return cost[0] <= REGS_PER_THREAD and cost[1] <= SMEM_BYTES


def choose_tiles(head_dim: int, dtype, bs: int) -> GpuTiles:
    """The tiles for head_dim (a power of two; 64, 128, 256 tabled, others take the nearest row),
    input dtype and block size bs: TILE_TABLE clipped to the largest power of two dividing bs,
    then each kernel's larger tile halved (not below MIN_TILE) until tile_budget fits."""
    itemsize = jnp.dtype(dtype).itemsize
    key = min(TILE_TABLE, key=lambda d: abs(d - head_dim))
    fq, fk, qq, qk, kk, kq, wf, wb, st = TILE_TABLE[key]
    cap = max(MIN_TILE, bs & -bs)
    tiles = GpuTiles(*(min(x, cap) for x in (fq, fk, qq, qk, kk, kq)), wf, wb, st)
    pairs = {"fwd": ("fwd_q", "fwd_kv"), "dq": ("dq_q", "dq_kv"), "dkv": ("dkv_kv", "dkv_q")}
    for name, (a, b) in pairs.items():
        while not _fits(tile_budget(tiles, head_dim, itemsize)[name]):
            big = a if getattr(tiles, a) >= getattr(tiles, b) else b
            if getattr(tiles, big) <= MIN_TILE:
                raise ValueError(f"no GPU tiles fit head_dim {head_dim} ({jnp.dtype(dtype)}) in "
                                 f"{REGS_PER_THREAD} registers / {SMEM_BYTES} B shared memory")
            tiles = dataclasses.replace(tiles, **{big: getattr(tiles, big) // 2})
    return tiles


def _nt(a, b):
    return lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)


def _nn(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _mask_rows(sc, q_start, k_start, end_k):
    """sc [Q, K] scores of queries q_start.. and keys k_start..: -inf where not visible."""
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, sc.shape, 0)
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, sc.shape, 1)
    return jnp.where((k_pos <= q_pos) & (q_pos < end_k[None, :]), sc, NEG_INF)


def _kv_steps(q_start, bq, j, bs, bk):
    """kv sub-tiles of block j that queries q_start .. q_start + bq - 1 can see (keys <= query):
    all bs // bk below the diagonal block, the first ones on it."""
    return jnp.clip((q_start + bq - j * bs + bk - 1) // bk, 0, bs // bk)


def _scores(q, k_ref, end_ref, q_start, start, bk, min_end, scale):
    """Masked float32 scores of the q tile against kv rows start .. start + bk - 1; the element
    mask is skipped when every key is below every query and no key's subtree ends inside the
    tile (min_end: the smallest subtree_end of the kv block)."""
    k = k_ref[pl.ds(start, bk), :]
    sc = _nt(q, k) * scale
    full = (start + bk - 1 <= q_start) & (q_start + q.shape[0] <= min_end)
    return lax.cond(full, lambda x: x,
                    lambda x: _mask_rows(x, q_start, start, end_ref[pl.ds(start, bk)]), sc), k


def _fwd_kernel(q_ref, k_ref, v_ref, end_ref, blocks_ref, count_ref, min_end_ref, o_ref, lse_ref,
                *, bs, bk, nb, scale):
    q = q_ref[...]                                                         # [bq, H]
    bq = q.shape[0]
    q_start = pl.program_id(0) * bq
    i = q_start // bs

    def block(s, carry):
        j = blocks_ref[i * nb + s]
        min_end = min_end_ref[j]

        def sub(t, carry):
            m, denom, acc = carry
            start = j * bs + t * bk
            sc, _ = _scores(q, k_ref, end_ref, q_start, start, bk, min_end, scale)   # [bq, bk]
            v = v_ref[pl.ds(start, bk), :]
            m_new = jnp.maximum(m, jnp.max(sc, axis=1))
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(sc - m_new[:, None])
            return (m_new, denom * alpha + jnp.sum(p, axis=1),
                    acc * alpha[:, None] + _nn(p.astype(v.dtype), v))

        return lax.fori_loop(0, _kv_steps(q_start, bq, j, bs, bk), sub, carry)

    h = q.shape[-1]
    init = (jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, h), jnp.float32))
    m, denom, acc = lax.fori_loop(0, count_ref[i], block, init)
    seen = denom > 0.0
    l_safe = jnp.where(seen, denom, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), 0.0)


def _dq_kernel(q_ref, k_ref, v_ref, end_ref, do_ref, lse_ref, delta_ref, blocks_ref, count_ref,
               min_end_ref, dq_ref, *, bs, bk, nb, scale):
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    bq = q.shape[0]
    q_start = pl.program_id(0) * bq
    i = q_start // bs

    def block(s, dq):
        j = blocks_ref[i * nb + s]
        min_end = min_end_ref[j]

        def sub(t, dq):
            start = j * bs + t * bk
            sc, k = _scores(q, k_ref, end_ref, q_start, start, bk, min_end, scale)
            v = v_ref[pl.ds(start, bk), :]
            p = jnp.exp(sc - lse[:, None])
            ds = p * (_nt(do, v) - delta[:, None])
            return dq + _nn(ds.astype(k.dtype), k)

        return lax.fori_loop(0, _kv_steps(q_start, bq, j, bs, bk), sub, dq)

    dq = lax.fori_loop(0, count_ref[i], block, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, end_ref, do_ref, lse_ref, delta_ref, min_end_ref,
                dk_ref, dv_ref, *, bs, bq, groups, scale):
    k, v = k_ref[...], v_ref[...]                                          # [bkv, H]
    bkv = k.shape[0]
    k_start = pl.program_id(0) * bkv
    kvh = pl.program_id(2)
    end = end_ref[...]                                                     # [bkv]
    min_end = min_end_ref[k_start // bs]
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (bkv, bq), 0)
    # The queries that see a key of this tile: k_start .. max(end) - 1, in q tiles of bq.
    q_lo = k_start // bq
    steps = jnp.maximum((jnp.max(end) + bq - 1) // bq - q_lo, 0)

    def q_tile(u, carry, n):
        dk, dv = carry
        qs = (q_lo + u) * bq
        q = q_ref[pl.ds(qs, bq), n, :]                                     # [bq, H]
        do = do_ref[pl.ds(qs, bq), n, :]
        lse = lse_ref[n, pl.ds(qs, bq)]
        delta = delta_ref[n, pl.ds(qs, bq)]
        st = _nt(k, q) * scale                                             # [bkv, bq] = S^T
        full = (k_start + bkv - 1 <= qs) & (qs + bq <= min_end)

        def masked(x):
            q_pos = qs + lax.broadcasted_iota(jnp.int32, x.shape, 1)
            return jnp.where((k_pos <= q_pos) & (q_pos < end[:, None]), x, NEG_INF)

        st = lax.cond(full, lambda x: x, masked, st)
        pt = jnp.exp(st - lse[None, :])
        dv = dv + _nn(pt.astype(do.dtype), do)
        dst = pt * (_nt(v, do) - delta[None, :])
        return dk + _nn(dst.astype(q.dtype), q), dv

    def head(g, carry):
        return lax.fori_loop(0, steps, partial(q_tile, n=kvh * groups + g), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, groups, head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _params(num_warps: int, num_stages: int):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _check(tiles: GpuTiles, bs: int) -> None:
    for name, size in dataclasses.asdict(tiles).items():
        if not name.startswith("num_") and (size & (size - 1) or bs % size):
            raise ValueError(f"GPU tile {name}={size} must be a power of two dividing the block "
                             f"size {bs}")


def forward(q, k, v, end, sched, *, bs: int, scale: float, interpret: bool,
            tiles: GpuTiles | None = None):
    """out [B, T, N, H] (q's dtype), lse float32[B, N, T]. sched: the KERNEL_KEYS arrays.
    tiles: default choose_tiles(H, q.dtype, bs)."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    g, nb = n // kv_heads, t // bs
    tiles = tiles or choose_tiles(h, q.dtype, bs)
    _check(tiles, bs)
    bq = tiles.fwd_q
    row = lambda width: pl.BlockSpec((None, width), lambda i, bi, ni: (bi, 0))  # noqa: E731
    kv_spec = pl.BlockSpec((None, t, None, h), lambda i, bi, ni: (bi, 0, ni // g, 0))
    q_spec = pl.BlockSpec((None, bq, None, h), lambda i, bi, ni: (bi, i, ni, 0))
    return pl.pallas_call(
        partial(_fwd_kernel, bs=bs, bk=tiles.fwd_kv, nb=nb, scale=scale),
        grid=(t // bq, b, n),
        in_specs=[q_spec, kv_spec, kv_spec, row(t), row(nb * nb), row(nb), row(nb)],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
        compiler_params=_params(tiles.num_warps_fwd, tiles.num_stages),
        interpret=interpret, name="tree_attention_fwd",
    )(q, k, v, end, sched["q_kv_blocks"], sched["q_kv_count"], sched["kv_min_end"])


def backward(q, k, v, end, sched, out, lse, dout, *, bs: int, scale: float, interpret: bool,
             tiles: GpuTiles | None = None):
    """(dq, dk, dv) in the dtypes of q, k, v, from the forward's out and lse."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    g, nb = n // kv_heads, t // bs
    tiles = tiles or choose_tiles(h, q.dtype, bs)
    _check(tiles, bs)
    delta = jnp.einsum("btnh,btnh->bnt", dout.astype(jnp.float32), out.astype(jnp.float32))
    row = lambda width: pl.BlockSpec((None, width), lambda i, bi, ni: (bi, 0))  # noqa: E731
    kv_full = pl.BlockSpec((None, t, None, h), lambda i, bi, ni: (bi, 0, ni // g, 0))
    bq = tiles.dq_q
    q_blk = pl.BlockSpec((None, bq, None, h), lambda i, bi, ni: (bi, i, ni, 0))
    stat_blk = pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, i))
    dq = pl.pallas_call(
        partial(_dq_kernel, bs=bs, bk=tiles.dq_kv, nb=nb, scale=scale),
        grid=(t // bq, b, n),
        in_specs=[q_blk, kv_full, kv_full, row(t), q_blk, stat_blk, stat_blk, row(nb * nb),
                  row(nb), row(nb)],
        out_specs=q_blk,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(tiles.num_warps_bwd, tiles.num_stages),
        interpret=interpret, name="tree_attention_dq",
    )(q, k, v, end, dout, lse, delta, sched["q_kv_blocks"], sched["q_kv_count"],
      sched["kv_min_end"])

    bkv = tiles.dkv_kv
    q_full = pl.BlockSpec((None, t, n, h), lambda j, bi, kh: (bi, 0, 0, 0))
    stat_full = pl.BlockSpec((None, n, t), lambda j, bi, kh: (bi, 0, 0))
    kv_blk = pl.BlockSpec((None, bkv, None, h), lambda j, bi, kh: (bi, j, kh, 0))
    dk, dv = pl.pallas_call(
        partial(_dkv_kernel, bs=bs, bq=tiles.dkv_q, groups=g, scale=scale),
        grid=(t // bkv, b, kv_heads),
        in_specs=[q_full, kv_blk, kv_blk, pl.BlockSpec((None, bkv), lambda j, bi, kh: (bi, j)),
                  q_full, stat_full, stat_full, row(nb)],
        out_specs=[kv_blk, kv_blk],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(tiles.num_warps_bwd, tiles.num_stages),
        interpret=interpret, name="tree_attention_dkv",
    )(q, k, v, end, dout, lse, delta, sched["kv_min_end"])
    return dq, dk, dv
