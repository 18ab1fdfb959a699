"""Block schedules of the Pallas tree-attention kernels, on host (numpy) or inside jit (jnp).

Rule (ARCHITECTURE.md): query q may see key k iff  k <= q < subtree_end[k].  The row of T tokens is
cut into nb = T // bs square blocks. Key k is seen by the contiguous query range [k, subtree_end[k]),
so kv block j is seen by the contiguous q blocks [j, q_last[j]] (q_last = the largest
(subtree_end - 1) // bs over the block's keys) and by no other; pair (q block i, kv block j) is
non-empty iff j <= i <= q_last[j], and full (every element visible, no mask needed) iff j < i and
(i + 1) * bs <= kv_min_end[j] (the smallest subtree_end of the block). Same classification as
kat_jax.ops.block_sparse.classify_block_pairs; exact.

GPU arrays (KERNEL_KEYS; all int32, per row b; 2-D so that they batch, pad and shard like the rest of the
schedule dict built by kat_jax.ops.block_sparse.build_block_schedule):
  q_kv_blocks [B, nb * nb]  row-major [i, s]: the s-th non-empty kv block of q block i in
                            increasing order, for s < q_kv_count[i]; later slots repeat the last
                            one (0 when there is none), so a TPU pipeline fetches nothing new.
  q_kv_count  [B, nb]       number of non-empty kv blocks of q block i (forward and dQ loops).
  kv_q_last   [B, nb]       last q block that sees kv block j (j - 1 or less: nobody does): the q
                            blocks j .. kv_q_last[j] see it (the GPU dK/dV kernel bounds its loop
                            by its own tile's largest subtree_end, which is tighter).
  kv_min_end  [B, nb]       min subtree_end over kv block j (full-block test).
An all-zero row is a valid schedule that computes nothing (output 0, zero gradients): the filler
rows that kat_jax.training.scoring appends get exactly that.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

KERNEL_KEYS = ("q_kv_blocks", "q_kv_count", "kv_q_last", "kv_min_end")


def _block_stats(xp, subtree_end, bs: int):
    """(q_last, min_end) [B, nb] with the array module xp (numpy or jax.numpy)."""
    b, t = subtree_end.shape
    nb = t // bs
    se = xp.minimum(subtree_end.astype(xp.int32), t)
    pos = xp.arange(t, dtype=xp.int32)
    last_q = xp.where(se > pos, (se - 1) // bs, -1)
    return (last_q.reshape(b, nb, bs).max(axis=2).astype(xp.int32),
            se.reshape(b, nb, bs).min(axis=2).astype(xp.int32))


def _lists(xp, q_last, sort):
    """Per-q-block lists of non-empty kv blocks: (q_kv_blocks [B, nb * nb], q_kv_count [B, nb])."""
    b, nb = q_last.shape
    i = xp.arange(nb, dtype=xp.int32)[:, None]
    j = xp.arange(nb, dtype=xp.int32)[None, :]
    nonempty = (j <= i)[None] & (i[None] <= q_last[:, None, :])          # [B, i, j]
    count = nonempty.sum(axis=2).astype(xp.int32)
    order = sort(~nonempty).astype(xp.int32)       # stable: non-empty j first, increasing
    slot = xp.minimum(xp.arange(nb, dtype=xp.int32)[None, None, :], xp.maximum(count, 1)[..., None] - 1)
    blocks = xp.take_along_axis(order, slot, axis=2)
    blocks = xp.where(count[..., None] > 0, blocks, 0).astype(xp.int32)
    return blocks.reshape(b, nb * nb), count


def kernel_schedule_host(subtree_end: np.ndarray, block_size: int) -> dict[str, np.ndarray]:
    """numpy: the kernel schedule (KERNEL_KEYS, see module docstring) of int32[B, T] subtree_end,
    T a multiple of block_size. O(B * nb^2) time and memory."""
    se = np.asarray(subtree_end)
    if se.ndim != 2 or se.shape[1] % int(block_size):
        raise ValueError(f"subtree_end must be [B, T] with T a multiple of {block_size}, "
                         f"got shape {se.shape}")
    q_last, min_end = _block_stats(np, se, int(block_size))
    blocks, count = _lists(np, q_last, lambda x: np.argsort(x, axis=2, kind="stable"))
    return {"q_kv_blocks": blocks, "q_kv_count": count, "kv_q_last": q_last,
            "kv_min_end": min_end}


def kernel_schedule(subtree_end: jax.Array, block_size: int) -> dict[str, jax.Array]:
    """jnp (jittable; shapes static from T and block_size): same arrays as kernel_schedule_host."""
    q_last, min_end = _block_stats(jnp, subtree_end, int(block_size))
    blocks, count = _lists(jnp, q_last, lambda x: jnp.argsort(x, axis=2, stable=True))
    return {"q_kv_blocks": blocks, "q_kv_count": count, "kv_q_last": q_last,
            "kv_min_end": min_end}


# ------------------------------------------------------------------------------ TPU: live pairs
#
# The TPU kernels step over live block pairs only. Per row, the live pairs (i, j) (non-empty, plus
# the diagonal (i, i) so that every q block's output is written, also for all-zero filler rows)
# are listed twice, as flat indices into the nb x nb block grid:
#   tpu_pairs     [B, P]  i * nb + j, ordered by q block i then kv block j: the concatenation of
#                         each q block's list of live kv blocks (its count = its run length);
#                         forward and dQ.
#   tpu_pairs_t   [B, P]  j * nb + i, ordered by kv block j then q block i; dK/dV.
#   tpu_num_pairs [B]     live pairs of the row (slots from there on repeat the last pair: no new
#                         DMA, no compute).
#   kv_min_end    [B, nb] as above.
# P, the documented maximum, is `max_pairs` (default nb * (nb + 1) / 2, a causal row's count, so
# the default never overflows). The schedule is scalar-prefetched into SMEM:
# B * (2 * P + nb + 1) int32 per call must stay within TPU_SMEM_WORDS (checked at trace time).
# A row with more live pairs than P is an error on the host (tpu_schedule_host); inside jit the
# kernel's output for that row is NaN (never a silently wrong value).

TPU_KEYS = ("tpu_pairs", "tpu_pairs_t", "tpu_num_pairs", "kv_min_end")
TPU_SMEM_WORDS = 1 << 17     # 512 KiB of the TPU core's scalar memory for the schedule


def causal_pairs(nb: int) -> int:
    """Live block pairs of a causal row of nb blocks: the most any row has."""
    return nb * (nb + 1) // 2


def tpu_smem_words(b: int, nb: int, max_pairs: int) -> int:
    return b * (2 * max_pairs + nb + 1)


def check_tpu_smem(b: int, nb: int, max_pairs: int) -> None:
    words = tpu_smem_words(b, nb, max_pairs)
    if words > TPU_SMEM_WORDS:
        raise ValueError(
            f"the TPU tree-attention schedule needs {words} int32 of scalar memory ({b} rows x "
            f"(2 x max_pairs={max_pairs} + {nb} blocks + 1)), over kat_jax.ops.pallas.schedule."
            f"TPU_SMEM_WORDS={TPU_SMEM_WORDS}: use a larger attention block size, fewer rows per "
            f"device, or a smaller max_pairs")


def _tpu_pairs(xp, q_last, max_pairs: int, sort):
    b, nb = q_last.shape
    i = xp.arange(nb, dtype=xp.int32)[:, None]
    j = xp.arange(nb, dtype=xp.int32)[None, :]
    live = ((j <= i)[None] & (i[None] <= q_last[:, None, :])) | (i == j)[None]    # [B, i, j]
    count = live.sum(axis=(1, 2)).astype(xp.int32)
    slot = xp.minimum(xp.arange(max_pairs, dtype=xp.int32)[None],
                      xp.minimum(count, max_pairs)[:, None] - 1)

    def compact(mask):                      # [B, nb * nb] -> flat indices of the live entries
        order = sort(~mask).astype(xp.int32)                 # stable: live first, in order
        return xp.take_along_axis(order, slot, axis=1).astype(xp.int32)

    return (compact(live.reshape(b, nb * nb)),
            compact(live.transpose(0, 2, 1).reshape(b, nb * nb)), count)


def tpu_schedule_host(subtree_end: np.ndarray, block_size: int,
                      max_pairs: int | None = None) -> dict[str, np.ndarray]:
    """numpy: the TPU_KEYS arrays (see above) of int32[B, T] subtree_end. Raises ValueError naming
    max_pairs when a row has more live block pairs."""
    se = np.asarray(subtree_end)
    if se.ndim != 2 or se.shape[1] % int(block_size):
        raise ValueError(f"subtree_end must be [B, T] with T a multiple of {block_size}, "
                         f"got shape {se.shape}")
    q_last, min_end = _block_stats(np, se, int(block_size))
    nb = q_last.shape[1]
    p = causal_pairs(nb) if max_pairs is None else int(max_pairs)
    pairs, pairs_t, count = _tpu_pairs(np, q_last, p, lambda x: np.argsort(x, axis=1,
                                                                           kind="stable"))
    if (count > p).any():
        raise ValueError(f"a row has {int(count.max())} live block pairs, over max_pairs={p} "
                         f"(block size {block_size}); raise max_pairs (at most {causal_pairs(nb)})")
    return {"tpu_pairs": pairs, "tpu_pairs_t": pairs_t, "tpu_num_pairs": count,
            "kv_min_end": min_end}


def tpu_schedule(subtree_end: jax.Array, block_size: int,
                 max_pairs: int | None = None) -> dict[str, jax.Array]:
    """jnp (jittable): the same arrays; tpu_num_pairs is the true count, which exceeds max_pairs
    for a row that does not fit (the caller turns that row's output into NaN)."""
    q_last, min_end = _block_stats(jnp, subtree_end, int(block_size))
    nb = q_last.shape[1]
    p = causal_pairs(nb) if max_pairs is None else int(max_pairs)
    pairs, pairs_t, count = _tpu_pairs(jnp, q_last, p,
                                       lambda x: jnp.argsort(x, axis=1, stable=True))
    return {"tpu_pairs": pairs, "tpu_pairs_t": pairs_t, "tpu_num_pairs": count,
            "kv_min_end": min_end}
