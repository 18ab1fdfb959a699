"""Choosing the next token without a vocabulary sort: the same tokens, log-probs and entropies as
the sort-based sampler it replaced (kept here as the reference), for greedy, temperature, top-k and
top-p rows mixed in one batch."""

import jax
import jax.numpy as jnp
import numpy as np

from kat_jax.rollout.sampler import sample_step


def reference_sample_step(logits, keys, step, temperature, top_p, top_k):
    """The sort-based sampler kat_jax used before (two full-vocabulary sorts per step), with the
    per-row parameters the new one takes."""
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    v = logits.shape[-1]
    use_k = (top_k > 0) & ~greedy
    idx = (v - jnp.clip(top_k, 1, v))[:, None]
    kth = jnp.take_along_axis(jnp.sort(scaled, axis=-1), idx, axis=-1)  # k-th largest
    keep = jnp.where(use_k[:, None], scaled >= kth, True)
    probs = jax.nn.softmax(jnp.where(keep, scaled, -jnp.inf), axis=-1)
    desc = jnp.sort(probs, axis=-1)[:, ::-1]
    count = jnp.sum((jnp.cumsum(desc, axis=-1) - desc) < top_p[:, None], axis=-1)
    cutoff = jnp.take_along_axis(desc, (jnp.maximum(count, 1) - 1)[:, None], axis=-1)
    keep &= jnp.where(((top_p < 1.0) & ~greedy)[:, None], probs >= cutoff, True)
    logp = jax.nn.log_softmax(jnp.where(keep, scaled, -jnp.inf), axis=-1)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.wrap_key_data(k), step))(keys)
    sampled = jax.vmap(jax.random.categorical)(step_keys, logp)
    token = jnp.where(greedy, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)
    lp = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    ent = -jnp.sum(jnp.where(keep, jnp.exp(logp) * logp, 0.0), axis=-1)
    return token, lp, ent


def test_sort_free_sampling_matches_the_sort_based_reference_row_by_row():
    rows = [(0.0, 1.0, 0), (1.0, 1.0, 0), (0.7, 1.0, 0), (1.0, 1.0, 5), (1.3, 0.9, 0),
            (1.0, 0.5, 0), (0.8, 0.95, 40), (1.0, 1e-6, 0), (2.0, 0.3, 3), (1.0, 1.0, 1)]
    temp = jnp.asarray([r[0] for r in rows], jnp.float32)
    top_p = jnp.asarray([r[1] for r in rows], jnp.float32)
    top_k = jnp.asarray([r[2] for r in rows], jnp.int32)
    b, v = len(rows), 300
    new = jax.jit(sample_step, static_argnums=6)
    ref = jax.jit(reference_sample_step)
    for trial in range(6):
        rng = np.random.default_rng(trial)
        logits = jnp.asarray(rng.normal(0, 1 + trial, (b, v)), jnp.float32)
        keys = jnp.stack([jax.random.key_data(jax.random.key(100 * trial + i)) for i in range(b)])
        for step in range(3):
            want = ref(logits, keys, jnp.int32(step), temp, top_p, top_k)
            got = new(logits, keys, jnp.int32(step), temp, top_p, top_k, 64)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_allclose(got[1], want[1], atol=1e-5)
            np.testing.assert_allclose(got[2], want[2], atol=1e-5)


def test_greedy_only_and_plain_temperature_batches_need_no_top_k_bound():
    rng = np.random.default_rng(7)
    logits = jnp.asarray(rng.normal(0, 3, (4, 500)), jnp.float32)
    keys = jnp.stack([jax.random.key_data(jax.random.key(i)) for i in range(4)])
    for t in (0.0, 1.0, 0.6):
        temp = jnp.full(4, t, jnp.float32)
        ones, zeros = jnp.ones(4, jnp.float32), jnp.zeros(4, jnp.int32)
        want = reference_sample_step(logits, keys, jnp.int32(2), temp, ones, zeros)
        got = sample_step(logits, keys, 2, t, 1.0, 0)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], atol=1e-5)
        np.testing.assert_allclose(got[2], want[2], atol=1e-5)


def test_sample_keys_equal_the_per_sample_fold_in():
    """The engine derives all of a call's sample keys in one device call; each is
    fold_in(key(seed), j), as one scalar derivation per sample gives (large seeds included)."""
    from kat_jax.rollout.sampler import sample_keys

    for seeds, js in (([0, 7, 2 ** 31 - 1, 7, 123456], [0, 3, 1, 0, 9]), ([2 ** 33 + 5], [2])):
        got = sample_keys(seeds, js)
        want = [np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(s), j)))
                for s, j in zip(seeds, js)]
        np.testing.assert_array_equal(got, np.stack(want))
