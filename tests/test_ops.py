"""Tree attention and vocabulary-chunked log-probs against independent plain references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.ops.attention import tree_attention, xla_dense_attention
from kat_jax.ops.logprobs import tree_logprobs


def random_forest(rng, t):
    """A random forest in DFS pre-order: parent, depth, subtree_end (plain Python)."""
    parent = [-1]
    for i in range(1, t):
        # attach to a random earlier token on the current rightmost path, or start a new tree
        path, j = [], i - 1
        while j >= 0:
            path.append(j)
            j = parent[j]
        parent.append(-1 if rng.random() < 0.1 else int(rng.choice(path)))
    depth = [0] * t
    for i in range(t):
        depth[i] = 0 if parent[i] < 0 else depth[parent[i]] + 1
    end = list(range(1, t + 1))
    for i in reversed(range(t)):
        if parent[i] >= 0:
            end[parent[i]] = max(end[parent[i]], end[i])
    return np.array(parent), np.array(depth), np.array(end)


def naive_attention(q, k, v, parent):
    """Per query: softmax over its ancestors and itself, found by walking parent pointers."""
    t, n, h = q.shape
    g = n // k.shape[1]
    out = np.zeros_like(q)
    for i in range(t):
        anc, j = [], i
        while j >= 0:
            anc.append(j)
            j = parent[j]
        for head in range(n):
            kk, vv = k[anc, head // g], v[anc, head // g]
            s = kk @ q[i, head] / np.sqrt(h)
            p = np.exp(s - s.max())
            out[i, head] = (p / p.sum()) @ vv
    return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1), (8, 2)])
def test_dense_tree_attention_equals_ancestor_walk(heads, kv_heads):
    rng = np.random.default_rng(heads * 10 + kv_heads)
    t, h = 37, 8
    parent, _, end = random_forest(rng, t)
    q = rng.standard_normal((t, heads, h)).astype(np.float32)
    k = rng.standard_normal((t, kv_heads, h)).astype(np.float32)
    v = rng.standard_normal((t, kv_heads, h)).astype(np.float32)
    ours = xla_dense_attention(jnp.asarray(q)[None], jnp.asarray(k)[None], jnp.asarray(v)[None],
                               jnp.asarray(end, jnp.int32)[None])[0]
    np.testing.assert_allclose(np.asarray(ours), naive_attention(q, k, v, parent), atol=1e-5)


def test_unknown_attention_impl_is_a_clear_error():
    x = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="unknown attention_impl"):
        tree_attention(x, x, x, jnp.full((1, 4), 4, jnp.int32), impl="flash")


def reference_logprobs(hidden, head, tokens, parent):
    logits = hidden.astype(np.float64) @ head.astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    logp_all = logits - logz[..., None]
    ent_all = -(np.exp(logp_all) * logp_all).sum(-1)
    lp = np.zeros(tokens.shape)
    en = np.zeros(tokens.shape)
    for i, p in enumerate(parent):
        if p >= 0:
            lp[i], en[i] = logp_all[p, tokens[i]], ent_all[p]
    return lp, en


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_chunked_tree_logprobs_equal_full_log_softmax(chunk):
    rng = np.random.default_rng(chunk)
    t, d, v = 29, 16, 61  # vocab not a multiple of the chunk
    parent, _, _ = random_forest(rng, t)
    hidden = rng.standard_normal((t, d)).astype(np.float32)
    head = rng.standard_normal((d, v)).astype(np.float32)
    tokens = rng.integers(0, v, t).astype(np.int32)
    lp, en = tree_logprobs(jnp.asarray(hidden)[None], jnp.asarray(head), jnp.asarray(tokens)[None],
                           jnp.asarray(parent, jnp.int32)[None], chunk=chunk)
    ref_lp, ref_en = reference_logprobs(hidden, head, tokens, parent)
    np.testing.assert_allclose(np.asarray(lp[0]), ref_lp, atol=1e-5)
    np.testing.assert_allclose(np.asarray(en[0]), ref_en, atol=1e-5)


def test_chunked_tree_logprobs_gradients_equal_full_log_softmax_gradients():
    rng = np.random.default_rng(3)
    t, d, v = 13, 8, 37
    parent, _, _ = random_forest(rng, t)
    hidden = jnp.asarray(rng.standard_normal((1, t, d)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((d, v)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, v, (1, t)), jnp.int32)
    par = jnp.asarray(parent, jnp.int32)[None]
    w = jnp.asarray(rng.standard_normal((2, 1, t)), jnp.float32)

    def ours(hd, hk):
        lp, en = tree_logprobs(hd, hk, tokens, par, chunk=10)
        return jnp.sum(w[0] * lp + w[1] * en)

    def full(hd, hk):
        logp_all = jax.nn.log_softmax(hd @ hk, axis=-1)
        ent_all = -jnp.sum(jnp.exp(logp_all) * logp_all, -1)
        pp = jnp.maximum(par, 0)
        lp = jnp.take_along_axis(jnp.take_along_axis(logp_all, pp[..., None], 1),
                                 tokens[..., None], -1)[..., 0]
        en = jnp.take_along_axis(ent_all, pp, 1)
        mask = par >= 0
        return jnp.sum(w[0] * jnp.where(mask, lp, 0) + w[1] * jnp.where(mask, en, 0))

    g1 = jax.jit(jax.grad(ours, argnums=(0, 1)))(hidden, head)
    g2 = jax.grad(full, argnums=(0, 1))(hidden, head)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_temperature_scales_the_distribution():
    rng = np.random.default_rng(5)
    t, d, v = 9, 8, 23
    parent = np.arange(-1, t - 1)
    hidden = rng.standard_normal((t, d)).astype(np.float32)
    head = rng.standard_normal((d, v)).astype(np.float32)
    tokens = rng.integers(0, v, t).astype(np.int32)
    lp, en = tree_logprobs(jnp.asarray(hidden)[None], jnp.asarray(head), jnp.asarray(tokens)[None],
                           jnp.asarray(parent, jnp.int32)[None], chunk=5, temperature=0.7)
    ref_lp, ref_en = reference_logprobs(hidden, head / 0.7, tokens, parent)
    np.testing.assert_allclose(np.asarray(lp[0]), ref_lp, atol=1e-5)
    np.testing.assert_allclose(np.asarray(en[0]), ref_en, atol=1e-5)
