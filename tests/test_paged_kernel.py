"""The Pallas paged-attention kernel (kat_jax.ops.pallas.paged, GPU and TPU lowerings, both
interpreted on CPU) equals the XLA gather path and a dense float64 reference written here, over
shuffled block tables, rows of different lengths (a partly filled last block, a one-token row),
decode and prefill chunks, GQA and MHA; slots past a row's positions do not reach the output; the
engine's attention option picks the kernel and gives the same tokens."""

import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.ops.paged_attention import paged_attention
from kat_jax.ops.pallas import paged as pallas_paged
from kat_jax.ops.pallas.paged import pallas_paged_attention

S_BLK = 16


def _case(rng, t, n, kv, h, num_blocks=14, m=4):
    """Pools with random keys / values, 3 rows with shuffled (non-contiguous) block tables: row 0
    ends in a partly filled last block, row 1 is a one-token row (T = 1: position 0), row 2 ends
    on a block boundary."""
    pool_k = rng.normal(size=(kv, num_blocks, S_BLK, h)).astype(np.float32)
    pool_v = rng.normal(size=(kv, num_blocks, S_BLK, h)).astype(np.float32)
    tables = rng.permutation(np.arange(1, num_blocks))[:3 * m].reshape(3, m).astype(np.int32)
    last = np.array([37, t - 1, 3 * S_BLK - 1])
    q_pos = (last[:, None] - t + 1 + np.arange(t)[None]).astype(np.int32)
    q = rng.normal(size=(3, t, n, h)).astype(np.float32)
    return q, pool_k, pool_v, tables, q_pos


def _dense_reference(q, pool_k, pool_v, tables, q_pos):
    """float64 softmax(q k^T / sqrt(H)) v over each row's positions 0 .. q_pos, from the row's
    blocks laid end to end (query head n reads kv head n // G)."""
    b, t, n, h = q.shape
    kv = pool_k.shape[0]
    out = np.zeros((b, t, n, h))
    for r in range(b):  # keys[kv head, position]
        keys = pool_k[:, tables[r]].reshape(kv, -1, h).transpose(1, 0, 2).astype(np.float64)
        vals = pool_v[:, tables[r]].reshape(kv, -1, h).transpose(1, 0, 2).astype(np.float64)
        for i in range(t):
            seen = q_pos[r, i] + 1
            for head in range(n):
                kh = head // (n // kv)
                s = keys[:seen, kh] @ q[r, i, head].astype(np.float64) / np.sqrt(h)
                p = np.exp(s - s.max())
                out[r, i, head] = (p / p.sum()) @ vals[:seen, kh]
    return out


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("t,n,kv,h", [(1, 8, 2, 64), (5, 8, 2, 64), (1, 2, 2, 128),
                                      (4, 2, 2, 128)],
                         ids=["decode-gqa4-h64", "prefill-gqa4-h64", "decode-mha-h128",
                              "prefill-mha-h128"])
def test_paged_kernel_equals_gather_path_and_dense_reference(backend, t, n, kv, h):
    rng = np.random.default_rng(t * 100 + n + h)
    q, pool_k, pool_v, tables, q_pos = _case(rng, t, n, kv, h)
    args = tuple(jnp.asarray(x) for x in (q, pool_k, pool_v, tables, q_pos))
    got = np.asarray(pallas_paged_attention(*args, backend=backend, interpret=True))
    gather = np.asarray(paged_attention(*args))
    np.testing.assert_allclose(got, gather, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got, _dense_reference(q, pool_k, pool_v, tables, q_pos),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_slots_past_each_rows_positions_do_not_reach_the_output(backend):
    rng = np.random.default_rng(7)
    q, pool_k, pool_v, tables, q_pos = _case(rng, 2, 8, 2, 64)
    args = tuple(jnp.asarray(x) for x in (q, pool_k, pool_v, tables, q_pos))
    clean = np.asarray(pallas_paged_attention(*args, backend=backend, interpret=True))
    # 1e4 in every slot no query of the row may see: the rest of its last live block, its later
    # blocks, and every block outside the tables (incl. the trash block).
    dirty_k, dirty_v = pool_k.copy(), pool_v.copy()
    live = np.zeros(pool_k.shape[1:3], bool)
    for r in range(3):
        for pos in range(q_pos[r].max() + 1):
            live[tables[r, pos // S_BLK], pos % S_BLK] = True
    dirty_k[:, ~live], dirty_v[:, ~live] = 1e4, 1e4
    dirty = np.asarray(pallas_paged_attention(q, jnp.asarray(dirty_k), jnp.asarray(dirty_v),
                                              tables, q_pos, backend=backend, interpret=True))
    assert np.isfinite(dirty).all()
    np.testing.assert_allclose(dirty, clean, atol=1e-6, rtol=0)


def test_engine_attention_pallas_gives_the_xla_tokens_and_unknown_values_are_errors(monkeypatch):
    from kat_jax.models.config import get_preset
    from kat_jax.models.decoder import init_model
    from kat_jax.rollout.sampler import EngineConfig, JaxEngine, SamplingParams

    with pytest.raises(ValueError, match="EngineConfig.attention"):
        EngineConfig(attention="flash")
    calls = []
    real = pallas_paged.pallas_paged_attention

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(pallas_paged, "pallas_paged_attention", counted)
    model = init_model(get_preset("tiny"), seed=1)
    sp = SamplingParams(temperature=0.0, max_new_tokens=5)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [3, 4]]
    gens = {}
    for impl in ("xla", "pallas"):
        eng = JaxEngine(model, EngineConfig(block_size=16, chunk_steps=4, cache_tokens=256,
                                            max_batch=2, attention=impl))
        assert eng.attention == impl
        n_before = len(calls)
        gens[impl] = [g[0] for g in eng.generate(prompts, sp)]
        assert (len(calls) > n_before) == (impl == "pallas")  # the option picks the kernel
    assert JaxEngine(model, EngineConfig(cache_tokens=64)).attention == "xla"  # auto on CPU
    for a, b in zip(gens["xla"], gens["pallas"]):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def _xla_engine():
    """The tiny model's engine on the XLA gather path (the programs the HLO tests read)."""
    from kat_jax.models.config import get_preset
    from kat_jax.models.decoder import init_model
    from kat_jax.rollout.sampler import EngineConfig, JaxEngine

    return JaxEngine(init_model(get_preset("tiny"), seed=0),
                     EngineConfig(block_size=16, chunk_steps=4, cache_tokens=1024, max_batch=8,
                                  attention="xla"))


def _decode_hlo(eng, b: int, m: int) -> str:
    """The compiled decode program's HLO text for b rows and block tables of width m."""
    z, ones = np.zeros(b, np.int32), np.ones(b, np.float32)
    args = (eng.params, eng._layer_states, eng._pool, np.zeros((b, m), np.int32), z, z,
            np.zeros((b, 2), np.uint32), z, np.ones(b, np.int32), np.ones(b, bool),
            np.full((b, 1), -1, np.int32), ones, ones, z, 0, 4)
    return eng._decode.lower(*args).compile().as_text()


def test_batch_one_decode_program_copies_no_pool():
    """paged_write indexes the pool by (block, offset): through a flat [P * S_blk, K, H] view,
    XLA:CPU copied each layer's pools twice per decode step at batch 1 (16 pool copies here)."""
    import re

    eng = _xla_engine()
    hlo = _decode_hlo(eng, 1, 4)
    k, p, s, h = eng._pool[0][0].shape
    pool_copy = rf"= f32\[({k},{p},{s},{h}|{k},{p * s},{h}|{k * p},{s},{h})\]\{{[^}}]*\}} copy\("
    copies = [ln for ln in hlo.splitlines() if re.search(pool_copy, ln)]
    assert not copies, copies[:2]


def test_decode_program_gathers_keys_and_values_without_transposed_copies():
    """The pool is [K, P, S_blk, H], so a row's gathered blocks [K, B, M * S_blk, H] are already in
    the order the score and value contractions read: at batch 1 and 8 the decode loop's only ops
    of that size are the 2 gathers per layer, none with a transpose (with [P, S_blk, K, H]
    XLA:CPU transposed both every step; at batch 1 it transposed the keys unless they are the
    score contraction's left operand)."""
    import re

    eng = _xla_engine()
    for b in (1, 8):
        m = 4
        hlo = _decode_hlo(eng, b, m)
        k, _, s, h = eng._pool[0][0].shape
        size = k * b * m * s * h
        bodies = dict(re.findall(r"^(%\S+) [^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M))
        sized = []
        for ln in hlo.splitlines():
            got = re.match(r"\s*(?:ROOT )?%\S+ = f32\[([\d,]+)\]\{[^}]*\} fusion\(.*"
                           r"calls=(%[\w.\-]+)", ln)
            if got and np.prod([int(x) for x in got.group(1).split(",")]) == size:
                sized.append(bodies[got.group(2)])
        assert len(sized) == 2 * eng.cfg.num_layers, (b, len(sized))
        assert all(" gather(" in body and " transpose(" not in body for body in sized), sized


def test_gather_path_one_query_row_equals_the_dense_reference():
    """Batch-1 decode (one query row) takes the keys-first contraction order; same numbers."""
    rng = np.random.default_rng(3)
    q, pool_k, pool_v, tables, q_pos = _case(rng, 1, 8, 2, 64)
    for r in range(3):
        args = (q[r:r + 1], pool_k, pool_v, tables[r:r + 1], q_pos[r:r + 1])
        got = np.asarray(paged_attention(*(jnp.asarray(x) for x in args)))
        np.testing.assert_allclose(got, _dense_reference(*args), atol=1e-5, rtol=0)
