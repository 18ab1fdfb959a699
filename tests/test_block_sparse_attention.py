"""Block-sparse tree attention against the dense reference; its host schedule against brute force."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kat_jax.ops.attention import tree_visible, xla_dense_attention
from kat_jax.ops.block_sparse import build_block_schedule, xla_block_sparse_attention

H = 16


def random_tree_ends(rng: np.random.Generator, t: int, p_root: float = 0.1) -> np.ndarray:
    """subtree_end of a random forest in DFS pre-order: each token's parent is a random token of
    the current rightmost path, or it starts a new tree."""
    parent = np.full(t, -1)
    path: list[int] = []                                  # rightmost path, root first
    for i in range(t):
        if path and rng.random() >= p_root:
            depth = int(rng.integers(len(path)))
            del path[depth + 1:]
            parent[i] = path[-1]
        else:
            path.clear()
        path.append(i)
    end = np.arange(1, t + 1)
    for i in reversed(range(t)):
        if parent[i] >= 0:
            end[parent[i]] = max(end[parent[i]], end[i])
    return end


def chain_ends(lengths: list[int]) -> np.ndarray:
    """Packed causal sequences: every token of a chain sees to the chain's end."""
    return np.concatenate([np.full(n, s + n) for s, n in zip(np.cumsum([0, *lengths[:-1]]), lengths)])


def padded(ends: np.ndarray, t: int) -> np.ndarray:
    """Append padding tokens (one-token trees) up to length t."""
    return np.concatenate([ends, np.arange(len(ends) + 1, t + 1)])


def make_ends(case: str, rng: np.random.Generator, b: int, t: int) -> np.ndarray:
    rows = []
    for _ in range(b):
        if case == "forest":
            rows.append(random_tree_ends(rng, t))
        elif case == "tree":
            rows.append(random_tree_ends(rng, t, p_root=0.0))
        elif case == "chain":
            rows.append(np.full(t, t))
        elif case == "packed_chains":
            cuts = np.sort(rng.choice(np.arange(1, t), size=4, replace=False))
            rows.append(chain_ends(list(np.diff([0, *cuts, t]))))
        elif case == "padding":
            n = int(rng.integers(1, t - 4))
            rows.append(padded(random_tree_ends(rng, n), t))
        else:
            raise ValueError(case)
    return np.stack(rows).astype(np.int32)


def make_qkv(rng, b, t, n, kv, dtype=jnp.float32):
    q = rng.standard_normal((b, t, n, H))
    k = rng.standard_normal((b, t, kv, H))
    v = rng.standard_normal((b, t, kv, H))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def sparse_fn(ends: np.ndarray, use_schedule: bool, bs: int):
    """jitted block-sparse attention; the schedule is passed as a (traced) argument."""
    sched = build_block_schedule(ends, bs) if use_schedule else None
    fn = jax.jit(lambda q, k, v, e, s: xla_block_sparse_attention(q, k, v, e, schedule=s,
                                                                  block_size=bs))
    return lambda q, k, v: fn(q, k, v, jnp.asarray(ends), sched)


dense = jax.jit(xla_dense_attention)


def brute_force_kinds(ends: np.ndarray, bs: int) -> np.ndarray:
    vis = np.asarray(tree_visible(jnp.asarray(ends)))              # [B, Tq, Tk]
    b, t, _ = vis.shape
    nb = t // bs
    blocks = vis.reshape(b, nb, bs, nb, bs)
    anyv, allv = blocks.any(axis=(2, 4)), blocks.all(axis=(2, 4))
    return np.where(allv, 2, np.where(anyv, 1, 0))


def schedule_kinds(sched: dict[str, np.ndarray], nb: int) -> np.ndarray:
    b, p = sched["kind"].shape
    out = np.zeros((b, nb, nb), np.int64)
    for r in range(b):
        for i, j, kd in zip(sched["q_block"][r], sched["k_block"][r], sched["kind"][r]):
            if kd:
                assert out[r, i, j] == 0, "pair listed twice"
                out[r, i, j] = kd
            else:
                assert i == 0 and j == 0
    return out


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("use_schedule", [True, False])
@pytest.mark.parametrize("case,kv", [("forest", 8), ("forest", 2), ("forest", 1), ("tree", 2),
                                     ("chain", 8), ("packed_chains", 2), ("padding", 1)])
def test_forward_matches_dense(case, kv, use_schedule):
    rng = np.random.default_rng([len(case), ord(case[0]), kv, use_schedule])
    b, t, n, bs = 3, 48, 8, 8
    ends = make_ends(case, rng, b, t)
    q, k, v = make_qkv(rng, b, t, n, kv)
    got = sparse_fn(ends, use_schedule, bs)(q, k, v)
    want = dense(q, k, v, jnp.asarray(ends))
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t,bs", [(45, 8), (37, 16), (5, 8)])
def test_forward_t_not_multiple_of_block(t, bs):
    rng = np.random.default_rng(t)
    ends = make_ends("forest", rng, 2, t)
    q, k, v = make_qkv(rng, 2, t, 4, 1)
    got = jax.jit(xla_block_sparse_attention, static_argnames="block_size")(
        q, k, v, jnp.asarray(ends), block_size=bs)
    assert got.shape == (2, t, 4, H)
    np.testing.assert_allclose(got, dense(q, k, v, jnp.asarray(ends)), rtol=1e-5, atol=1e-5)


def test_bfloat16_close_to_dense():
    rng = np.random.default_rng(7)
    ends = make_ends("forest", rng, 2, 64)
    q, k, v = make_qkv(rng, 2, 64, 8, 2, jnp.bfloat16)
    got = sparse_fn(ends, True, 16)(q, k, v)
    assert got.dtype == jnp.bfloat16
    want = np.asarray(dense(q, k, v, jnp.asarray(ends)), np.float32)
    got = np.asarray(got, np.float32)
    assert np.linalg.norm(got - want) <= 1e-2 * np.linalg.norm(want)
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=2e-2)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("use_schedule,case,kv,t", [(True, "forest", 2, 48), (False, "padding", 1, 45),
                                                    (True, "packed_chains", 8, 48)])
def test_gradients_match_dense(use_schedule, case, kv, t):
    rng = np.random.default_rng(t + kv)
    b, n, bs = 2, 8, 8
    ends = make_ends(case, rng, b, t)
    q, k, v = make_qkv(rng, b, t, n, kv)
    ct = jnp.asarray(rng.standard_normal((b, t, n, H)), jnp.float32)
    sched = build_block_schedule(ends, bs) if use_schedule else None

    def loss_sparse(q, k, v):
        return jnp.sum(xla_block_sparse_attention(q, k, v, jnp.asarray(ends), schedule=sched,
                                                  block_size=bs) * ct)

    def loss_dense(q, k, v):
        return jnp.sum(xla_dense_attention(q, k, v, jnp.asarray(ends)) * ct)

    got = jax.jit(jax.grad(loss_sparse, argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss_dense, argnums=(0, 1, 2)))(q, k, v)
    for g_got, g_want in zip(got, want):
        np.testing.assert_allclose(g_got, g_want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_schedule,case,kv,pairs_per_step", [
    (True, "forest", 2, 3), (True, "tree", 8, 5), (False, "chain", 1, 4), (True, "padding", 2, 1),
    (True, "packed_chains", 2, 64)])
def test_gradients_match_dense_any_pairs_per_step(use_schedule, case, kv, pairs_per_step):
    """Chunks that do not divide P (P is a power of two with a schedule, 21 without), a chunk
    larger than P, and one pair per step."""
    rng = np.random.default_rng([pairs_per_step, kv])
    b, t, n, bs = 2, 48, 8, 8
    ends = make_ends(case, rng, b, t)
    q, k, v = make_qkv(rng, b, t, n, kv)
    ct = jnp.asarray(rng.standard_normal((b, t, n, H)), jnp.float32)
    sched = build_block_schedule(ends, bs) if use_schedule else None

    def loss_sparse(q, k, v, e, s):
        out = xla_block_sparse_attention(q, k, v, e, schedule=s, block_size=bs,
                                         pairs_per_step=pairs_per_step)
        return jnp.sum(out * ct), out

    def loss_dense(q, k, v, e):
        out = xla_dense_attention(q, k, v, e)
        return jnp.sum(out * ct), out

    (_, got_out), got = jax.jit(jax.value_and_grad(loss_sparse, argnums=(0, 1, 2), has_aux=True))(
        q, k, v, jnp.asarray(ends), sched)
    (_, want_out), want = jax.jit(jax.value_and_grad(loss_dense, argnums=(0, 1, 2), has_aux=True))(
        q, k, v, jnp.asarray(ends))
    np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-5)
    for g_got, g_want in zip(got, want):
        np.testing.assert_allclose(g_got, g_want, rtol=1e-5, atol=1e-5)


def test_bfloat16_gradients_close_to_dense():
    rng = np.random.default_rng(11)
    b, t, n, kv, bs = 2, 64, 8, 2, 16
    ends = make_ends("forest", rng, b, t)
    q, k, v = make_qkv(rng, b, t, n, kv, jnp.bfloat16)
    ct = jnp.asarray(rng.standard_normal((b, t, n, H)), jnp.float32)
    sched = build_block_schedule(ends, bs)

    def loss(attn, q, k, v):
        return jnp.sum(attn(q, k, v).astype(jnp.float32) * ct)

    sparse = partial(xla_block_sparse_attention, subtree_end=jnp.asarray(ends), schedule=sched,
                     block_size=bs, pairs_per_step=3)
    got = jax.jit(jax.grad(partial(loss, sparse), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(partial(loss, partial(xla_dense_attention, subtree_end=jnp.asarray(ends))),
                            argnums=(0, 1, 2)))(q, k, v)
    for g_got, g_want in zip(got, want):
        assert g_got.dtype == jnp.bfloat16
        g_got, g_want = np.asarray(g_got, np.float32), np.asarray(g_want, np.float32)
        assert np.linalg.norm(g_got - g_want) <= 2e-2 * np.linalg.norm(g_want)


# ---------------------------------------------------------------- memory


def test_memory_is_bounded_not_all_pairs():
    """Forward + backward of a 4096-token chain must not hold O(P * bs^2) scores: compile only and
    compare XLA's temp buffer size with materialising every pair's float32 scores once."""
    t, bs, n, kv, h = 4096, 64, 8, 2, 64
    ends = np.full((1, t), t, np.int32)
    sched = build_block_schedule(ends, bs)
    p = sched["kind"].shape[1]
    assert p == 4096                                                 # 2080 pairs, power of two

    def loss(q, k, v, e, s):
        return jnp.sum(xla_block_sparse_attention(q, k, v, e, schedule=s, block_size=bs) ** 2)

    def sds(heads):
        return jax.ShapeDtypeStruct((1, t, heads, h), jnp.float32)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
        sds(n), sds(kv), sds(kv), ends, sched).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    all_pairs = p * bs * bs * n * 4                                  # 512 MiB
    assert temp < all_pairs // 4, (temp, all_pairs)                  # about 24 MiB measured


# ---------------------------------------------------------------- padding, no NaN


def test_all_padding_row_and_unseen_queries_are_finite():
    rng = np.random.default_rng(3)
    b, t, n, kv, bs = 3, 32, 4, 2, 8
    ends = make_ends("forest", rng, b, t)
    ends[1] = np.arange(1, t + 1)                  # row entirely padding
    ends[2, 8:16] = np.arange(8, 16)               # invalid: keys 8..15 visible to nobody
    q, k, v = make_qkv(rng, b, t, n, kv)
    ct = jnp.asarray(rng.standard_normal((b, t, n, H)), jnp.float32)
    for sched in (build_block_schedule(ends, bs), None):
        def loss(q, k, v, sched=sched):
            out = xla_block_sparse_attention(q, k, v, jnp.asarray(ends), schedule=sched, block_size=bs)
            return jnp.sum(out * ct), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        assert np.isfinite(np.asarray(out)).all()
        for g in grads:
            assert np.isfinite(np.asarray(g)).all()
        # each padding token sees only itself
        np.testing.assert_allclose(out[1], jnp.repeat(v[1], n // kv, axis=1), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out[0], dense(q, k, v, jnp.asarray(ends))[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- host schedule


@pytest.mark.parametrize("bs", [1, 4, 8])
@pytest.mark.parametrize("case", ["forest", "tree", "chain", "packed_chains", "padding"])
def test_schedule_matches_brute_force(case, bs):
    rng = np.random.default_rng(bs)
    ends = make_ends(case, rng, 4, 48)
    sched = build_block_schedule(ends, bs)
    p = sched["kind"].shape[1]
    assert all(a.dtype == np.int32 and a.shape == (4, p) for a in sched.values())
    assert p >= 8 and p & (p - 1) == 0
    brute = brute_force_kinds(ends, bs)
    assert p < 2 * max(8, (brute > 0).reshape(4, -1).sum(1).max())
    np.testing.assert_array_equal(schedule_kinds(sched, 48 // bs), brute)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), t=st.sampled_from([8, 16, 24, 40]),
       p_root=st.floats(0.0, 0.5), bs=st.sampled_from([2, 4, 8]))
def test_schedule_matches_brute_force_property(seed, t, p_root, bs):
    rng = np.random.default_rng(seed)
    ends = np.stack([random_tree_ends(rng, t, p_root) for _ in range(2)]).astype(np.int32)
    sched = build_block_schedule(ends, bs, min_pairs=1)
    np.testing.assert_array_equal(schedule_kinds(sched, t // bs), brute_force_kinds(ends, bs))


def test_short_chains_have_few_block_pairs():
    t, bs = 1024, 16
    ends = chain_ends([32] * (t // 32))[None].astype(np.int32)      # 32 chains of 32 tokens
    sched = build_block_schedule(ends, bs)
    nb = t // bs
    nonempty = int((sched["kind"] > 0).sum())
    assert nonempty == 3 * (t // 32)                                 # 2 diagonal + 1 full per chain
    assert nonempty * 10 < nb * (nb + 1) // 2                        # vs the full triangle (2080)
    assert sched["kind"].shape[1] == 128
    assert int((sched["kind"] == 2).sum()) == t // 32


def test_errors():
    with pytest.raises(ValueError, match=r"T \(12\).*block_size \(8\)"):
        build_block_schedule(np.full((1, 12), 12, np.int32), 8)
    q = jnp.zeros((1, 8, 2, H))
    with pytest.raises(NotImplementedError):
        xla_block_sparse_attention(q, q, q, jnp.full((1, 8), 8, jnp.int32),
                                   q_index=jnp.zeros((1, 8), jnp.int32), block_size=8)
    with pytest.raises(ValueError, match="pairs_per_step"):
        xla_block_sparse_attention(q, q, q, jnp.full((1, 8), 8, jnp.int32), block_size=8,
                                   pairs_per_step=0)
