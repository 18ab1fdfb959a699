"""Block-sparse XLA tree attention: cost follows the visible (q, k) block pairs, not T^2.

Rule (ARCHITECTURE.md): query q may see key k iff  k <= q < subtree_end[k].  Rows are token trees
in DFS pre-order; padding tokens are one-token trees (subtree_end[i] = i + 1).

Shapes: q: [B, T, N, H], k and v: [B, T, K, H] (queries and keys are the same tokens; GQA: query
head n reads kv head n // G, G = N // K), subtree_end: int32[B, T]. Output: [B, T, N, H] in q's
dtype. Scores, softmax statistics and all accumulators are float32.

The sequence is cut into nb blocks of bs = `block_size` tokens (T is padded up internally when no
schedule is given). A host-side schedule (`build_block_schedule`, numpy, called by the data
packer) lists per row the (q block, k block) pairs that hold at least one visible pair, each
marked full (no element mask needed) or partial; the list is padded to a power-of-two length P
with kind-0 entries that are skipped (fully masked).

`xla_block_sparse_attention` is flash-style with a `jax.custom_vjp`:
  forward   a loop over chunks of C = `pairs_per_step` pairs (P padded to a multiple of C with
            kind-0 pairs). Blocks are held head-major ([B, nb, K, G, bs, H]). Per step it
            gathers the chunk's Q and K/V blocks, scores them ([B, C, K, G, bs, bs]), masks them
            (element mask only for kind 1) and updates running online-softmax statistics of the
            chunk's q blocks: max m and sum l [B, nb, K, G, bs], weighted values acc
            [B, nb, K, G, bs, H]. Pairs of one q block within a chunk are
            merged with chunk-local segment max / sum, then the q block's m, l, acc are rescaled
            and written back (only touched q blocks are read or written). out = acc / l; the
            residual is lse = m + log(l).
  backward  delta = sum(dout * out) per query and head, then a scan over the same chunks that
            recomputes the scores, p = exp(s - lse), and scatter-adds dV += p^T dO,
            dQ += dS K * scale, dK += dS^T Q * scale (dS = p * (dO V^T - delta)) into float32
            [B, nb, K, ...] buffers; dK / dV sum over the G query heads of a kv head. No autodiff
            runs through the scans; subtree_end and the schedule get no gradient.
  The loops stop after the last chunk holding a live pair in any row of the batch (the rest is
  the schedule's padding), with a trip count reduced over the whole batch (uniform under SPMD).

Memory: O(B * C * bs^2 * N) float32 for one step's scores (a few such arrays in the backward)
plus O(B * T * N * H) for accumulators, residuals and gradients; nothing is O(P * bs^2). Work is
O(B * P * bs^2 * N * H); the scan runs ceil(P / C) sequential steps.

What is exact: the schedule's classification (empty / partial / full) is exact, so the output and
its gradients equal the dense reference `xla_dense_attention` up to float rounding (the online
softmax reorders the float32 sums). With schedule=None every lower-triangular block pair is
scored as partial (exact, but no savings). Masked pairs get probability exactly 0, so a query
that sees no key (never produced by valid trees) gets output 0 and zero gradients, finite in
forward and backward (the dense reference instead averages all values for such a query).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from kat_jax.ops.tree_mask import MASK_VALUE

KIND_SKIP, KIND_PARTIAL, KIND_FULL = 0, 1, 2
# Block pairs scored per step of the scan (the default pairs_per_step). Small: a row's last step
# is padded to it (a 1536-token GRPO tree has 50 live pairs: 52 scored in steps of 4, 64 in steps
# of 16, ~25% slower), and longer rows lose nothing (CPU, forward and forward + backward,
# 1.5k-8k-token rows: steps of 4 were as fast as or faster than 2, 8 and 16).
PAIRS_PER_STEP = 4


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def classify_block_pairs(subtree_end: np.ndarray, block_size: int) -> np.ndarray:
    """int8[B, nb, nb] kind of each (q block i, k block j): 0 empty (or j > i), 1 partial, 2 full.

    Key k is visible to the contiguous query range [k, subtree_end[k]), so the q blocks it reaches
    are [k // bs, (subtree_end[k] - 1) // bs]; all keys of block j start at q block j, hence the
    union over block j is [j, hi[j]] with hi[j] the max of the per-key ends: (i, j) is non-empty
    iff j <= i <= hi[j]. It is full iff the largest key is <= the smallest query
    ((j + 1) * bs - 1 <= i * bs) and the largest query is < the smallest subtree_end of block j.
    O(T + nb^2) per row.
    """
    se = np.asarray(subtree_end)
    if se.ndim != 2:
        raise ValueError(f"subtree_end must be [B, T], got shape {se.shape}")
    b, t = se.shape
    bs = int(block_size)
    if bs <= 0 or t % bs:
        raise ValueError(f"T ({t}) must be a multiple of block_size ({bs})")
    nb = t // bs
    se = np.minimum(se.astype(np.int64), t)
    pos = np.arange(t, dtype=np.int64)
    last_q_block = np.where(se > pos, (se - 1) // bs, -1)             # -1: key seen by nobody
    hi = last_q_block.reshape(b, nb, bs).max(axis=2)                  # [B, nb] over key blocks j
    min_end = se.reshape(b, nb, bs).min(axis=2)                       # [B, nb]
    i = np.arange(nb)[:, None]                                        # q block
    j = np.arange(nb)[None, :]                                        # k block
    nonempty = (j <= i)[None] & (i[None] <= hi[:, None, :])           # [B, i, j]
    full = nonempty & ((j + 1) * bs - 1 <= i * bs)[None] & ((i + 1) * bs <= min_end[:, None, :])
    kind = np.where(full, KIND_FULL, np.where(nonempty, KIND_PARTIAL, KIND_SKIP))
    return kind.astype(np.int8)


def build_block_schedule(subtree_end: np.ndarray, block_size: int,
                         min_pairs: int = 8, kernel_lists: bool = False) -> dict[str, np.ndarray]:
    """Host-side (numpy) schedule of non-empty block pairs for `xla_block_sparse_attention`.

    Returns int32[B, P] arrays "q_block", "k_block", "kind" (0 skip/padding -> block 0/0,
    1 partial, 2 full), pairs of a row in (q block, k block) order. P is the max number of
    non-empty pairs over rows rounded up to a power of two, and at least `min_pairs`.
    With kernel_lists, also the Pallas kernels' loops (kat_jax.ops.pallas.schedule.KERNEL_KEYS:
    "q_kv_blocks" int32[B, nb * nb], "q_kv_count", "kv_q_last", "kv_min_end" int32[B, nb]),
    so attention_impl='pallas' takes them from the batch instead of computing them in jit.
    """
    kind = classify_block_pairs(subtree_end, block_size)
    b, nb, _ = kind.shape
    counts = (kind > 0).reshape(b, -1).sum(axis=1)
    p = _next_pow2(max(int(counts.max(initial=0)), int(min_pairs), 1))
    rows, qb, kb = np.nonzero(kind)                                   # row-major: sorted by row
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(rows.size) - offsets[rows]
    out = {name: np.zeros((b, p), np.int32) for name in ("q_block", "k_block", "kind")}
    out["q_block"][rows, slot] = qb
    out["k_block"][rows, slot] = kb
    out["kind"][rows, slot] = kind[rows, qb, kb]
    if kernel_lists:
        from kat_jax.ops.pallas.schedule import kernel_schedule_host

        out.update(kernel_schedule_host(subtree_end, block_size))
    return out


def dense_block_schedule(num_blocks: int, batch: int) -> dict[str, np.ndarray]:
    """Every lower-triangular pair (i, j <= i), all partial: the schedule when none is given."""
    qb, kb = np.tril_indices(num_blocks)
    p = qb.size
    return {"q_block": np.broadcast_to(qb.astype(np.int32), (batch, p)),
            "k_block": np.broadcast_to(kb.astype(np.int32), (batch, p)),
            "kind": np.full((batch, p), KIND_PARTIAL, np.int32)}


def _segment_ids(q_block: jax.Array) -> jax.Array:
    """int32[B * C] chunk-local segment of each pair: row * C + the first slot of the chunk with the
    same (row, q block). Pairs sharing a q block within a chunk share a segment."""
    b, c = q_block.shape
    first = jnp.argmax(q_block[:, :, None] == q_block[:, None, :], axis=-1).astype(jnp.int32)
    return (jnp.arange(b, dtype=jnp.int32)[:, None] * c + first).reshape(b * c)


def _chunk_scores(q, k, end, scale, q_block, k_block, kind):
    """Scores of one chunk of pairs, blocks head-major (see _flash_fwd_impl). q: [B, nb, K, G, bs,
    H], k: [B, nb, K, bs, H], end: [B, nb, bs], q_block / k_block / kind: int32[B, C]. Returns
    the gathered blocks, the float32 scores [B, C, K, G, bs, bs] (not masked; the matmul writes
    them in this order, no transpose) and the visibility mask [B, C, 1, 1, bs, bs]."""
    bs = q.shape[4]
    rows = jnp.arange(q.shape[0])[:, None]
    qp = q[rows, q_block]                                                 # [B, C, K, G, bs, H]
    kp = k[rows, k_block]                                                 # [B, C, K, bs, H]
    endp = end[rows, k_block]                                             # [B, C, bs]
    s = jnp.einsum("bckgqh,bcksh->bckgqs", qp, kp, preferred_element_type=jnp.float32) * scale
    offs = jnp.arange(bs, dtype=jnp.int32)
    q_pos = (q_block * bs)[..., None] + offs                              # [B, C, bs]
    k_pos = (k_block * bs)[..., None] + offs
    elem = ((k_pos[..., None, :] <= q_pos[..., :, None])
            & (q_pos[..., :, None] < endp[..., None, :]))                 # [B, C, bs_q, bs_k]
    kind = kind[..., None, None]
    visible = (kind == KIND_FULL) | ((kind == KIND_PARTIAL) & elem)
    return qp, kp, s, visible[:, :, None, None]


def _chunked(x: jax.Array, c: int) -> jax.Array:
    """int32[B, P] (P a multiple of c) -> [P // c, B, c]: the scanned chunks."""
    b, p = x.shape
    return x.reshape(b, p // c, c).transpose(1, 0, 2)


def _run_live_chunks(step, init, xs):
    """Run `step` over the schedule's chunks up to the last chunk that holds a live pair in any
    row of the batch; the rest (the power-of-two and chunk padding at the end of every row's
    schedule) is never visited. The trip count is reduced over the whole batch, so under a
    batch-sharded jit every device runs the same iterations. (A per-chunk lax.cond would skip the
    same chunks, but conditionals holding collectives deadlock XLA:CPU's multi-device runtime.)"""
    q_chunks, k_chunks, kind_chunks, live = xs
    n_live = jnp.max(jnp.where(live, jnp.arange(1, live.shape[0] + 1), 0))

    def body(i, carry):
        return step(carry, (q_chunks[i], k_chunks[i], kind_chunks[i]))[0]

    return jax.lax.fori_loop(0, n_live, body, init)


def _scan_inputs(q_block, k_block, kind, c):
    """Chunks [P // c, B, c] of the schedule, and per chunk whether any pair of any row is live."""
    kinds = _chunked(kind, c)
    return (_chunked(q_block, c), _chunked(k_block, c), kinds,
            jnp.any(kinds != KIND_SKIP, axis=(1, 2)))


def _flash_fwd_impl(q, k, v, end, scale, q_block, k_block, kind, c):
    """Blocked inputs, head-major within a block: q [B, nb, K, G, bs, H], k and v [B, nb, K, bs,
    H], end [B, nb, bs]. Returns out [B, nb, K, G, bs, H] in q's dtype and lse float32
    [B, nb, K, G, bs]."""
    b, nb, kv_heads, g, bs, h = q.shape
    rows = jnp.arange(b)[:, None]

    def step(carry, chunk):
        m, denom, acc = carry
        qb, kb, kd = chunk                                                # int32[B, C] each
        _, _, s, visible = _chunk_scores(q, k, end, scale, qb, kb, kd)
        vp = v[rows, kb]                                                  # [B, C, K, bs, H]
        seg = _segment_ids(qb)
        pair_max = jnp.where(visible, s, MASK_VALUE).max(axis=-1)         # [B, C, K, G, bs]
        chunk_max = jax.ops.segment_max(pair_max.reshape(b * c, kv_heads, g, bs), seg,
                                        num_segments=b * c)[seg].reshape(pair_max.shape)
        m_old = m[rows, qb]                                               # [B, C, K, G, bs]
        m_new = jnp.maximum(m_old, chunk_max)
        p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)        # [B, C, K, G, bs, bs]
        pv = jnp.einsum("bckgqs,bcksh->bckgqh", p.astype(v.dtype), vp,
                        preferred_element_type=jnp.float32)
        p_sum = jax.ops.segment_sum(p.sum(axis=-1).reshape(b * c, kv_heads, g, bs), seg,
                                    num_segments=b * c)[seg].reshape(m_old.shape)
        pv_sum = jax.ops.segment_sum(pv.reshape(b * c, kv_heads, g, bs, h), seg,
                                     num_segments=b * c)[seg].reshape(pv.shape)
        alpha = jnp.exp(m_old - m_new)                                    # 1 where the max held
        denom_new = denom[rows, qb] * alpha + p_sum
        acc_new = acc[rows, qb] * alpha[..., None] + pv_sum
        # Pairs of one q block carry identical values, so duplicate indices write the same thing.
        return (m.at[rows, qb].set(m_new), denom.at[rows, qb].set(denom_new),
                acc.at[rows, qb].set(acc_new)), None

    init = (jnp.full((b, nb, kv_heads, g, bs), MASK_VALUE, jnp.float32),
            jnp.zeros((b, nb, kv_heads, g, bs), jnp.float32),
            jnp.zeros((b, nb, kv_heads, g, bs, h), jnp.float32))
    m, denom, acc = _run_live_chunks(step, init, _scan_inputs(q_block, k_block, kind, c))
    seen = denom > 0                                                        # else: sees no key
    out = acc / jnp.where(seen, denom, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), 0.0)
    return out.astype(q.dtype), lse


@partial(jax.custom_vjp, nondiff_argnums=(8,))
def _flash(q, k, v, end, scale, q_block, k_block, kind, c):
    return _flash_fwd_impl(q, k, v, end, scale, q_block, k_block, kind, c)[0]


def _flash_fwd(q, k, v, end, scale, q_block, k_block, kind, c):
    out, lse = _flash_fwd_impl(q, k, v, end, scale, q_block, k_block, kind, c)
    return out, (q, k, v, end, scale, q_block, k_block, kind, out, lse)


def _flash_bwd(c, res, dout):
    q, k, v, end, scale, q_block, k_block, kind, out, lse = res
    rows = jnp.arange(q.shape[0])[:, None]
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, nb, K, G, bs]

    def step(carry, chunk):
        dq, dk, dv = carry
        qb, kb, kd = chunk
        qp, kp, s, visible = _chunk_scores(q, k, end, scale, qb, kb, kd)
        vp = v[rows, kb]
        dop = dout[rows, qb]                                              # [B, C, K, G, bs, H]
        p = jnp.where(visible, jnp.exp(s - lse[rows, qb][..., None]), 0.0)
        dv_p = jnp.einsum("bckgqs,bckgqh->bcksh", p.astype(dout.dtype), dop,
                          preferred_element_type=jnp.float32)
        dp = jnp.einsum("bckgqh,bcksh->bckgqs", dop, vp, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[rows, qb][..., None])).astype(q.dtype)
        dq_p = jnp.einsum("bckgqs,bcksh->bckgqh", ds, kp, preferred_element_type=jnp.float32)
        dk_p = jnp.einsum("bckgqs,bckgqh->bcksh", ds, qp, preferred_element_type=jnp.float32)
        return (dq.at[rows, qb].add(dq_p * scale), dk.at[rows, kb].add(dk_p * scale),
                dv.at[rows, kb].add(dv_p)), None

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32),
            jnp.zeros(v.shape, jnp.float32))
    dq, dk, dv = _run_live_chunks(step, init, _scan_inputs(q_block, k_block, kind, c))
    # subtree_end, scale and the schedule get no gradient (None: a zero cotangent).
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def xla_block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, subtree_end: jax.Array,
                               q_index: jax.Array | None = None, scale: float | None = None, *,
                               schedule: dict[str, jax.Array] | None = None,
                               block_size: int = 128,
                               pairs_per_step: int = PAIRS_PER_STEP) -> jax.Array:
    """Tree attention over the block pairs of `schedule` (see module docstring). Jittable; the
    schedule may be traced (its P is the only static part). `pairs_per_step` (static) pairs are
    scored per scan step."""
    if q_index is not None:
        raise NotImplementedError("xla_block_sparse_attention: q_index (decode) is not supported; "
                                  "use xla_dense_attention")
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    if k.shape[1] != t or v.shape[1] != t or subtree_end.shape != (b, t):
        raise ValueError(f"q, k, v and subtree_end must share T: q {q.shape}, k {k.shape}, "
                         f"v {v.shape}, subtree_end {subtree_end.shape}")
    if n % kv_heads:
        raise ValueError(f"query heads ({n}) must be a multiple of kv heads ({kv_heads})")
    c = int(pairs_per_step)
    if c <= 0:
        raise ValueError(f"pairs_per_step must be positive, got {pairs_per_step}")
    g = n // kv_heads
    bs = int(block_size)
    scale = h ** -0.5 if scale is None else scale
    subtree_end = subtree_end.astype(jnp.int32)

    t_pad = -(-t // bs) * bs
    if t_pad != t:
        if schedule is not None:
            raise ValueError(f"T ({t}) must be a multiple of block_size ({bs}) when a schedule "
                             "is given")
        pad = ((0, 0), (0, t_pad - t), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
        own_end = jnp.broadcast_to(jnp.arange(t + 1, t_pad + 1, dtype=jnp.int32), (b, t_pad - t))
        subtree_end = jnp.concatenate([subtree_end, own_end], axis=1)
    nb = t_pad // bs
    if schedule is None:
        schedule = dense_block_schedule(nb, b)
    sched = [jnp.asarray(schedule[name], jnp.int32) for name in ("q_block", "k_block", "kind")]
    p = sched[0].shape[1]
    p_pad = max(-(-p // c) * c, c)
    if p_pad != p:                                                        # kind-0 pairs (0, 0)
        sched = [jnp.pad(x, ((0, 0), (0, p_pad - p))) for x in sched]

    # blocks head-major ([B, nb, K, G, bs, H]): the per-pair matmuls write their results in
    # place; with tokens before heads XLA:CPU transposes every step's scores (~1.5x slower)
    out = _flash(q.reshape(b, nb, bs, kv_heads, g, h).transpose(0, 1, 3, 4, 2, 5),
                 k.reshape(b, nb, bs, kv_heads, h).transpose(0, 1, 3, 2, 4),
                 v.reshape(b, nb, bs, kv_heads, h).transpose(0, 1, 3, 2, 4),
                 subtree_end.reshape(b, nb, bs), jnp.asarray(scale, jnp.float32), *sched, c)
    return out.transpose(0, 1, 4, 2, 3, 5).reshape(b, t_pad, n, h)[:, :t]
