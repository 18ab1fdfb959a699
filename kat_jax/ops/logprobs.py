"""Tree log-probabilities and (optionally) entropies: one pass over the vocabulary, chunked only
where memory needs it, with a custom VJP.

For a packed tree, the log-prob of token i is predicted from its parent:
    logp[i] = log_softmax(logits[parent[i]] / temperature)[tokens[i]]        (0 where parent[i] < 0)
and entropy[i] is the entropy of that same distribution (the one token i was drawn from).

A branching token's distribution is computed once: the log-sum-exp (and entropy) are computed per
position, then gathered at the parent. Only the target logit needs a per-token dot product.

One pass: the per-position statistics are the running max m, the sum s = sum_j exp(l_j - m) and,
when the entropy is asked for, the centred sum c = sum_j exp(l_j - m) (l_j - m), so that
    lse = m + log s,    entropy = log s - c / s
(centred, so no large lse is subtracted from a large mean logit). The vocabulary is walked in
chunks of `chunk` columns (online rescaling between chunks); with chunk >= V it is a single
matmul and two reductions (the max, then s and c together in one variadic reduction), no loop.
Without the entropy (entropy=False) neither c nor its backward terms are computed.

Memory: peak extra memory is O(T * chunk) float32, forward and backward (the custom VJP's
backward recomputes each chunk's logits from hidden and head), so a [T, V] array exists only when
chunk >= V. Exact: no sampling of the vocabulary; all arithmetic in float32.

Gradients (per position p, chunk logits l = h W / temperature, q = softmax(l)):
    d lse / d l_j = q_j,    d H / d l_j = -q_j (log q_j + H).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def _chunking(v: int, chunk: int) -> tuple[int, int]:
    chunk = max(1, min(chunk, v))
    return chunk, -(-v // chunk)


def _chunk_logits(hidden, head, idx, chunk, temperature):
    """Logits of vocabulary chunk idx, read in place from head [D, V] (no padded or transposed copy
    of the head), and the mask of the columns that count (None when every chunk is whole). The
    last chunk of a ragged vocabulary is shifted left to end at V; the columns it shares with the
    previous chunk are masked so that every column counts once."""
    v = head.shape[1]
    start = jnp.minimum(idx * chunk, v - chunk)
    w = jax.lax.dynamic_slice_in_dim(head, start, chunk, axis=1)
    logits = jnp.einsum("...d,dv->...v", hidden, w, preferred_element_type=jnp.float32)
    logits = logits / temperature
    valid = None if v % chunk == 0 else (start + jnp.arange(chunk)) >= idx * chunk
    return logits, valid, w, start


def _chunk_stats(logits, valid, with_entropy):
    """(m, s, c) of one chunk: max, sum of exp(l - m), centred sum of exp(l - m) (l - m) (None
    without the entropy). Masked columns contribute nothing. s and c come from one variadic
    reduction (one pass over the chunk)."""
    masked = logits if valid is None else jnp.where(valid, logits, -jnp.inf)
    m = jnp.max(masked, axis=-1)
    centred = masked - m[..., None]
    e = jnp.exp(centred)
    if not with_entropy:
        return m, jnp.sum(e, axis=-1), None
    if valid is not None:
        centred = jnp.where(valid, centred, 0.0)  # exp(-inf) * -inf would be NaN
    s, c = jax.lax.reduce((e, e * centred), (0.0, 0.0),
                          lambda x, y: (x[0] + y[0], x[1] + y[1]), (e.ndim - 1,))
    return m, s, c


def _stats_fwd_impl(hidden, head, chunk, temperature, with_entropy):
    """(lse, entropy or None) float32[...] of softmax(hidden @ head / temperature)."""
    chunk, n_chunks = _chunking(head.shape[1], chunk)
    m, s, c = _chunk_stats(*_chunk_logits(hidden, head, 0, chunk, temperature)[:2], with_entropy)

    def body(carry, idx):
        m, s, c = carry
        logits, valid, _, _ = _chunk_logits(hidden, head, idx, chunk, temperature)
        m_k, s_k, c_k = _chunk_stats(logits, valid, with_entropy)
        m_new = jnp.maximum(m, m_k)
        a, a_k = jnp.exp(m - m_new), jnp.exp(m_k - m_new)  # finite: every m is a real max
        if with_entropy:  # re-centre both sums on m_new: sum e (l - m_new) = c + s (m - m_new)
            c = a * (c + s * (m - m_new)) + a_k * (c_k + s_k * (m_k - m_new))
        return (m_new, a * s + a_k * s_k, c), None

    if n_chunks > 1:
        (m, s, c), _ = jax.lax.scan(body, (m, s, c), jnp.arange(1, n_chunks))
    log_s = jnp.log(s)
    return m + log_s, (log_s - c / s) if with_entropy else None


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def position_stats(hidden: jax.Array, head: jax.Array, chunk: int = 8192,
                   temperature: float = 1.0, entropy: bool = True
                   ) -> tuple[jax.Array, jax.Array | None]:
    """Per position: log-sum-exp and (entropy=True) entropy of softmax(hidden @ head /
    temperature), else (lse, None).

    hidden: [..., D]; head: [D, V]. Returns (lse, entropy): float32[...] each.
    """
    return _stats_fwd_impl(hidden, head, chunk, temperature, entropy)


def _fwd(hidden, head, chunk, temperature, entropy):
    lse, ent = _stats_fwd_impl(hidden, head, chunk, temperature, entropy)
    return (lse, ent), (hidden, head, lse, ent)


def _bwd(chunk, temperature, entropy, res, g):
    hidden, head, lse, ent = res
    g_lse, g_ent = g
    chunk, n_chunks = _chunking(head.shape[1], chunk)
    h32 = hidden.astype(jnp.float32)

    def body(carry, idx):
        dh, dhead = carry
        logits, valid, w, start = _chunk_logits(hidden, head, idx, chunk, temperature)
        logq = logits - lse[..., None]
        q = jnp.exp(logq)
        if entropy:
            dlogits = q * (g_lse[..., None] - g_ent[..., None] * (logq + ent[..., None]))
        else:
            dlogits = q * g_lse[..., None]
        if valid is not None:
            dlogits = jnp.where(valid, dlogits, 0.0)
        dlogits = dlogits / temperature
        dh = dh + jnp.einsum("...v,dv->...d", dlogits, w.astype(jnp.float32))
        dw = jnp.einsum("...d,...v->dv", h32, dlogits)
        old = jax.lax.dynamic_slice_in_dim(dhead, start, chunk, axis=1)
        dhead = jax.lax.dynamic_update_slice_in_dim(dhead, old + dw, start, axis=1)
        return (dh, dhead), None

    init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(head.shape, jnp.float32))
    (dh, dhead), _ = jax.lax.scan(body, init, jnp.arange(n_chunks))
    return dh.astype(hidden.dtype), dhead.astype(head.dtype)


position_stats.defvjp(_fwd, _bwd)


def tree_logprobs(hidden: jax.Array, head: jax.Array, tokens: jax.Array, parent: jax.Array,
                  chunk: int = 8192, temperature: float = 1.0, entropy: bool = True
                  ) -> tuple[jax.Array, jax.Array | None]:
    """logp, entropy: float32[B, T] for each token given its parent (0 at roots, parent < 0);
    entropy is None when entropy=False (then it is not computed at all).

    hidden: [B, T, D] final hidden states; head: [D, V] output projection; tokens, parent: int32[B, T];
    temperature: the sampling temperature the distribution is taken at (rollout log-probs).
    """
    lse, ent = position_stats(hidden, head, chunk, temperature, entropy)
    has_parent = parent >= 0
    par = jnp.where(has_parent, parent, 0)
    h_par = jnp.take_along_axis(hidden, par[..., None], axis=-2)  # [B, T, D]
    w_tok = jnp.take(head, tokens, axis=1)  # [D, B, T]
    target = jnp.einsum("btd,dbt->bt", h_par, w_tok, preferred_element_type=jnp.float32)
    target = target / temperature
    logp = jnp.where(has_parent, target - jnp.take_along_axis(lse, par, axis=-1), 0.0)
    if ent is None:
        return logp, None
    return logp, jnp.where(has_parent, jnp.take_along_axis(ent, par, axis=-1), 0.0)
