"""Tree log-probabilities and entropies, chunked over the vocabulary with a custom VJP.

For a packed tree, the log-prob of token i is predicted from its parent:
    logp[i] = log_softmax(logits[parent[i]] / temperature)[tokens[i]]        (0 where parent[i] < 0)
and entropy[i] is the entropy of that same distribution (the one token i was drawn from).

A branching token's distribution is computed once: the log-sum-exp and entropy are computed per
position, then gathered at the parent. Only the target logit needs a per-token dot product.

Memory: the per-position pass walks the vocabulary in chunks with an online log-sum-exp, forward and
backward (custom VJP: the backward recomputes each chunk's logits from hidden and head), so a
[T, V] array never exists; peak extra memory is O(T * chunk). Exact: no sampling of the vocabulary;
all arithmetic in float32.

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
    of the head). The last chunk is shifted left to end at V; the columns it shares with the
    previous chunk are marked invalid so that every column counts once."""
    v = head.shape[1]
    start = jnp.minimum(idx * chunk, v - chunk)
    w = jax.lax.dynamic_slice_in_dim(head, start, chunk, axis=1)
    logits = jnp.einsum("...d,dv->...v", hidden, w, preferred_element_type=jnp.float32)
    logits = logits / temperature
    valid = (start + jnp.arange(chunk)) >= idx * chunk
    return logits, valid, w, start


def _lse_entropy_fwd_impl(hidden, head, chunk, temperature):
    chunk, n_chunks = _chunking(head.shape[1], chunk)
    batch_shape = hidden.shape[:-1]

    def body(carry, idx):
        m, s, t = carry
        logits, valid, _, _ = _chunk_logits(hidden, head, idx, chunk, temperature)
        logits = jnp.where(valid, logits, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        alpha = jnp.exp(m - m_new)
        e = jnp.exp(logits - m_new[..., None])
        s_new = s * alpha + jnp.sum(e, axis=-1)
        t_new = t * alpha + jnp.sum(e * jnp.where(valid, logits, 0.0), axis=-1)
        return (m_new, s_new, t_new), None

    init = (jnp.full(batch_shape, -jnp.inf, jnp.float32), jnp.zeros(batch_shape, jnp.float32),
            jnp.zeros(batch_shape, jnp.float32))
    (m, s, t), _ = jax.lax.scan(body, init, jnp.arange(n_chunks))
    lse = m + jnp.log(s)
    return lse, lse - t / s


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def position_logsumexp_entropy(hidden: jax.Array, head: jax.Array, chunk: int = 8192,
                               temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Per position: log-sum-exp and entropy of softmax(hidden @ head / temperature).

    hidden: [..., D]; head: [D, V]. Returns (lse, entropy): float32[...] each.
    """
    return _lse_entropy_fwd_impl(hidden, head, chunk, temperature)


def _fwd(hidden, head, chunk, temperature):
    lse, ent = _lse_entropy_fwd_impl(hidden, head, chunk, temperature)
    return (lse, ent), (hidden, head, lse, ent)


def _bwd(chunk, temperature, res, g):
    hidden, head, lse, ent = res
    g_lse, g_ent = g
    chunk, n_chunks = _chunking(head.shape[1], chunk)
    h32 = hidden.astype(jnp.float32)

    def body(carry, idx):
        dh, dhead = carry
        logits, valid, w, start = _chunk_logits(hidden, head, idx, chunk, temperature)
        logq = logits - lse[..., None]
        q = jnp.where(valid, jnp.exp(logq), 0.0)
        dlogits = q * (g_lse[..., None] - g_ent[..., None] * (logq + ent[..., None]))
        dlogits = jnp.where(valid, dlogits, 0.0) / temperature
        dh = dh + jnp.einsum("...v,dv->...d", dlogits, w.astype(jnp.float32))
        dw = jnp.einsum("...d,...v->dv", h32, dlogits)
        old = jax.lax.dynamic_slice_in_dim(dhead, start, chunk, axis=1)
        dhead = jax.lax.dynamic_update_slice_in_dim(dhead, old + dw, start, axis=1)
        return (dh, dhead), None

    init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(head.shape, jnp.float32))
    (dh, dhead), _ = jax.lax.scan(body, init, jnp.arange(n_chunks))
    return dh.astype(hidden.dtype), dhead.astype(head.dtype)


position_logsumexp_entropy.defvjp(_fwd, _bwd)


def tree_logprobs(hidden: jax.Array, head: jax.Array, tokens: jax.Array, parent: jax.Array,
                  chunk: int = 8192, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """logp, entropy: float32[B, T] for each token given its parent (0 at roots, parent < 0).

    hidden: [B, T, D] final hidden states; head: [D, V] output projection; tokens, parent: int32[B, T];
    temperature: the sampling temperature the distribution is taken at (rollout log-probs).
    """
    lse, ent = position_logsumexp_entropy(hidden, head, chunk, temperature)
    has_parent = parent >= 0
    par = jnp.where(has_parent, parent, 0)
    h_par = jnp.take_along_axis(hidden, par[..., None], axis=-2)  # [B, T, D]
    w_tok = jnp.take(head, tokens, axis=1)  # [D, B, T]
    target = jnp.einsum("btd,dbt->bt", h_par, w_tok, preferred_element_type=jnp.float32)
    target = target / temperature
    lse_par = jnp.take_along_axis(lse, par, axis=-1)
    ent_par = jnp.take_along_axis(ent, par, axis=-1)
    logp = jnp.where(has_parent, target - lse_par, 0.0)
    entropy = jnp.where(has_parent, ent_par, 0.0)
    return logp, entropy
