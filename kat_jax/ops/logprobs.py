"""Tree log-probabilities and entropies, chunked over the vocabulary.

For a packed tree, the log-prob of token i is predicted from its parent:
    logp[i] = log_softmax(logits[parent[i]])[tokens[i]]        (0 where parent[i] < 0)
and entropy[i] is the entropy of that same distribution (the one token i was drawn from).

A branching token's distribution is computed once: the log-sum-exp and entropy are computed per
position (chunked over the vocabulary with an online log-sum-exp, so a [T, V] array never exists at
once, and recomputed in the backward pass), then gathered at the parent. Only the target logit needs a
per-token dot product. All of it is exact (no sampling of the vocabulary); numerics in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def position_logsumexp_entropy(hidden: jax.Array, head: jax.Array, chunk: int = 8192
                               ) -> tuple[jax.Array, jax.Array]:
    """Per position: log-sum-exp and entropy of softmax(hidden @ head).

    hidden: [B, T, D]; head: [D, V]. Returns (lse, entropy): float32[B, T] each.
    Peak memory O(B * T * chunk) in the forward and the backward (the chunk body is rematerialised).
    """
    d, v = head.shape
    chunk = max(1, min(chunk, v))
    n_chunks = -(-v // chunk)
    pad = n_chunks * chunk - v
    head_p = jnp.pad(head, ((0, 0), (0, pad))) if pad else head
    head_c = head_p.reshape(d, n_chunks, chunk).transpose(1, 0, 2)  # [C, D, chunk]
    col = jnp.arange(chunk)
    batch_shape = hidden.shape[:-1]

    @jax.checkpoint
    def body(carry, xs):
        m, s, t = carry
        w, idx = xs
        logits = jnp.einsum("...d,dv->...v", hidden, w, preferred_element_type=jnp.float32)
        valid = (idx * chunk + col) < v
        logits = jnp.where(valid, logits, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        alpha = jnp.exp(m - m_new)
        e = jnp.exp(logits - m_new[..., None])
        lz = jnp.where(valid, logits, 0.0)
        s_new = s * alpha + jnp.sum(e, axis=-1)
        t_new = t * alpha + jnp.sum(e * lz, axis=-1)
        return (m_new, s_new, t_new), None

    init = (jnp.full(batch_shape, -jnp.inf, jnp.float32), jnp.zeros(batch_shape, jnp.float32),
            jnp.zeros(batch_shape, jnp.float32))
    (m, s, t), _ = jax.lax.scan(body, init, (head_c, jnp.arange(n_chunks)))
    lse = m + jnp.log(s)
    entropy = lse - t / s
    return lse, entropy


def tree_logprobs(hidden: jax.Array, head: jax.Array, tokens: jax.Array, parent: jax.Array,
                  chunk: int = 8192) -> tuple[jax.Array, jax.Array]:
    """logp, entropy: float32[B, T] for each token given its parent (0 at roots, parent < 0).

    hidden: [B, T, D] final hidden states; head: [D, V] output projection; tokens, parent: int32[B, T].
    """
    lse, ent = position_logsumexp_entropy(hidden, head, chunk)
    has_parent = parent >= 0
    par = jnp.where(has_parent, parent, 0)
    h_par = jnp.take_along_axis(hidden, par[..., None], axis=-2)  # [B, T, D]
    w_tok = jnp.take(head, tokens, axis=1)  # [D, B, T]
    target = jnp.einsum("btd,dbt->bt", h_par, w_tok, preferred_element_type=jnp.float32)
    lse_par = jnp.take_along_axis(lse, par, axis=-1)
    ent_par = jnp.take_along_axis(ent, par, axis=-1)
    logp = jnp.where(has_parent, target - lse_par, 0.0)
    entropy = jnp.where(has_parent, ent_par, 0.0)
    return logp, entropy
