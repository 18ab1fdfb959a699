"""Block-sparse XLA tree attention: cost follows the visible (q, k) block pairs, not T^2.

Rule (ARCHITECTURE.md): query q may see key k iff  k <= q < subtree_end[k].  Rows are token trees
in DFS pre-order; padding tokens are one-token trees (subtree_end[i] = i + 1).

Shapes: q: [B, T, N, H], k and v: [B, T, K, H] (queries and keys are the same tokens; GQA: query
head n reads kv head n // (N // K)), subtree_end: int32[B, T]. Output: [B, T, N, H] in q's dtype.
Scores, softmax and the weighted sums accumulate in float32.

The sequence is cut into blocks of `block_size` tokens. A host-side schedule
(`build_block_schedule`, numpy, called by the data packer) lists per row the (q block, k block)
pairs that hold at least one visible pair, each marked full (no element mask needed) or partial;
the list is padded to a power-of-two length P with kind-0 entries that are skipped (fully masked).
`xla_block_sparse_attention` gathers the Q and K/V blocks of the P pairs, scores them, and merges
the pairs of each q block with a segment log-sum-exp. Work and memory are O(B * P * bs^2 * N).

What is exact: the schedule's classification (empty / partial / full) is exact, so the output and
its gradients (plain JAX autodiff) equal the dense reference `xla_dense_attention` up to float
rounding. With schedule=None every lower-triangular block pair is scored as partial (exact, but
no savings). A query that sees no key (never produced by valid trees) gets a finite output, not
NaN, in forward and backward; it need not equal the dense reference's value for such a query.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kat_jax.ops.attention import MASK_VALUE

KIND_SKIP, KIND_PARTIAL, KIND_FULL = 0, 1, 2


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
                         min_pairs: int = 8) -> dict[str, np.ndarray]:
    """Host-side (numpy) schedule of non-empty block pairs for `xla_block_sparse_attention`.

    Returns int32[B, P] arrays "q_block", "k_block", "kind" (0 skip/padding -> block 0/0,
    1 partial, 2 full), pairs of a row in (q block, k block) order. P is the max number of
    non-empty pairs over rows rounded up to a power of two, and at least `min_pairs`.
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
    return out


def dense_block_schedule(num_blocks: int, batch: int) -> dict[str, np.ndarray]:
    """Every lower-triangular pair (i, j <= i), all partial: the schedule when none is given."""
    qb, kb = np.tril_indices(num_blocks)
    p = qb.size
    return {"q_block": np.broadcast_to(qb.astype(np.int32), (batch, p)),
            "k_block": np.broadcast_to(kb.astype(np.int32), (batch, p)),
            "kind": np.full((batch, p), KIND_PARTIAL, np.int32)}


def _gather_blocks(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x: [B, nb, ...], idx: int[B, P] -> [B, P, ...]."""
    return jax.vmap(lambda xb, ib: jnp.take(xb, ib, axis=0))(x, idx)


def xla_block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, subtree_end: jax.Array,
                               q_index: jax.Array | None = None, scale: float | None = None, *,
                               schedule: dict[str, jax.Array] | None = None,
                               block_size: int = 128) -> jax.Array:
    """Tree attention over the block pairs of `schedule` (see module docstring). Jittable; the
    schedule may be traced (its P is the only static part)."""
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
    q_block = jnp.asarray(schedule["q_block"], jnp.int32)            # [B, P]
    k_block = jnp.asarray(schedule["k_block"], jnp.int32)
    kind = jnp.asarray(schedule["kind"], jnp.int32)
    p = q_block.shape[1]

    qp = _gather_blocks(q.reshape(b, nb, bs, kv_heads, g, h), q_block)    # [B, P, bs, K, G, H]
    kp = _gather_blocks(k.reshape(b, nb, bs, kv_heads, h), k_block)       # [B, P, bs, K, H]
    vp = _gather_blocks(v.reshape(b, nb, bs, kv_heads, h), k_block)
    endp = _gather_blocks(subtree_end.reshape(b, nb, bs), k_block)        # [B, P, bs]

    scores = jnp.einsum("bpqkgh,bpskh->bpqkgs", qp, kp,
                        preferred_element_type=jnp.float32) * scale       # [B, P, bs, K, G, bs]
    offs = jnp.arange(bs, dtype=jnp.int32)
    q_pos = (q_block * bs)[..., :, None] + offs                           # [B, P, bs]
    k_pos = (k_block * bs)[..., :, None] + offs
    elem = ((k_pos[..., None, :] <= q_pos[..., :, None])
            & (q_pos[..., :, None] < endp[..., None, :]))                 # [B, P, bs_q, bs_k]
    visible = (kind == KIND_FULL)[..., None, None] | ((kind == KIND_PARTIAL)[..., None, None] & elem)
    visible = visible[:, :, :, None, None, :]                             # [B, P, bs, 1, 1, bs]
    scores = jnp.where(visible, scores, MASK_VALUE)

    # Segment log-sum-exp over the pairs of each q block; segments are flattened (row, q block).
    seg = (jnp.arange(b, dtype=jnp.int32)[:, None] * nb + q_block).reshape(b * p)
    pair_max = scores.max(axis=-1).reshape(b * p, bs, kv_heads, g)
    row_max = jax.ops.segment_max(pair_max, seg, num_segments=b * nb)
    # The max only stabilises exp; the result does not depend on it, so no gradient flows through
    # it. Clamping keeps q blocks without any pair (-inf identity) finite.
    row_max = jax.lax.stop_gradient(jnp.maximum(row_max, MASK_VALUE))
    probs = jnp.exp(scores - row_max[seg].reshape(b, p, bs, kv_heads, g, 1))
    pair_sum = probs.sum(axis=-1).reshape(b * p, bs, kv_heads, g)
    pair_out = jnp.einsum("bpqkgs,bpskh->bpqkgh", probs.astype(v.dtype), vp,
                          preferred_element_type=jnp.float32).reshape(b * p, bs, kv_heads, g, h)
    denom = jax.ops.segment_sum(pair_sum, seg, num_segments=b * nb)
    numer = jax.ops.segment_sum(pair_out, seg, num_segments=b * nb)
    denom = jnp.where(denom > 0, denom, 1.0)                              # no pair at all: out 0
    out = numer / denom[..., None]                                        # [B * nb, bs, K, G, H]
    return out.reshape(b, t_pad, n, h)[:, :t].astype(q.dtype)
