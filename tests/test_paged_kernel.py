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


def _loop_computations(hlo: str) -> tuple[dict, set]:
    """(computation name -> its text, the names the decode while loop's body reaches)."""
    import re

    bodies = dict(re.findall(r"^(?:ENTRY )?(%\S+) [^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M))
    (entry,) = re.findall(r"^ENTRY (%\S+)", hlo, re.M)
    (body,) = re.findall(r" while\(.*body=(%[\w.\-]+)", bodies[entry])
    reached, todo = set(), [body]
    while todo:
        name = todo.pop()
        if name in reached or name not in bodies:
            continue
        reached.add(name)
        todo += re.findall(r"(?:calls|to_apply|body|condition)=(%[\w.\-]+)", bodies[name])
        for group in re.findall(r"branch_computations=\{([^}]*)\}", bodies[name]):
            todo += [x.strip() for x in group.split(",")]
    return bodies, reached


def test_decode_loop_gathers_only_the_blocks_a_chunk_writes_without_transposed_copies():
    """A decode chunk gathers each layer's keys and values [K, B, M * S_blk, H] once, before its
    loop (chunk_context), in the order the score and value contractions read (the pool is
    [K, P, S_blk, H]: no transpose); a step gathers only the R = ceil(steps / S_blk) + 1 blocks
    the chunk writes (2 gathers per layer, no transpose). At batch 1 and 8 no op inside the loop
    has the size of the whole table's keys (before: 2 whole-table gathers per layer and step,
    ~a third of a batch-1 step; with [P, S_blk, K, H] XLA:CPU also transposed them; at batch 1
    it transposes the keys unless they are the score contraction's left operand)."""
    import re

    eng = _xla_engine()
    k, _, s, h = eng._pool[0][0].shape
    steps = 4
    r = -(-steps // s) + 1
    for b in (1, 8):
        m = 4
        hlo = _decode_hlo(eng, b, m)
        bodies, loop = _loop_computations(hlo)
        in_loop, outside = [], []
        for name, text in bodies.items():
            for ln in text.splitlines():
                got = re.match(r"\s*(?:ROOT )?%\S+ = f32\[([\d,]+)\]\{[^}]*\} (\w+)\(", ln)
                if got and got.group(2) in ("fusion", "gather", "copy", "transpose"):
                    n = int(np.prod([int(x) for x in got.group(1).split(",")]))
                    (in_loop if name in loop else outside).append((n, ln))
        whole, recent = k * b * m * s * h, k * b * r * s * h
        assert not [ln for n, ln in in_loop if n == whole], b
        gathers = [ln for n, ln in outside if n == whole and ("gather" in ln)]
        assert len(gathers) >= 2 * eng.cfg.num_layers, (b, len(gathers))
        per_step = [ln for n, ln in in_loop if n == recent and " fusion(" in ln]
        assert len(per_step) == 2 * eng.cfg.num_layers, (b, per_step)
        sized = [bodies[c] for ln in per_step for c in re.findall(r"calls=(%[\w.\-]+)", ln)]
        assert all(" gather(" in t and " transpose(" not in t for t in sized), sized
        assert not [ln for n, ln in in_loop if n == recent and re.search(r" (copy|transpose)\(",
                                                                          ln)]


def test_gather_path_one_query_row_equals_the_dense_reference():
    """Batch-1 decode (one query row) takes the keys-first contraction order; same numbers."""
    rng = np.random.default_rng(3)
    q, pool_k, pool_v, tables, q_pos = _case(rng, 1, 8, 2, 64)
    for r in range(3):
        args = (q[r:r + 1], pool_k, pool_v, tables[r:r + 1], q_pos[r:r + 1])
        got = np.asarray(paged_attention(*(jnp.asarray(x) for x in args)))
        np.testing.assert_allclose(got, _dense_reference(*args), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rows", [1, 3], ids=["one-row", "three-rows"])
def test_chunk_attention_reads_the_prefix_gathered_at_the_chunk_start_and_fresh_recent_blocks(rows):
    """chunk_paged_attention: the context gathered at the chunk's start (chunk_context), then the
    chunk's steps overwrite positions start .. q_pos in the pool (the stale copies of those
    positions in the gathered context must not be read); the result equals the dense reference
    over the updated pool, at 0, 2 and 4 steps into a 5-step chunk (crossing a block boundary
    for row 2)."""
    from kat_jax.ops.paged_attention import chunk_context, chunk_paged_attention

    rng = np.random.default_rng(7)
    q, pool_k, pool_v, tables, q_pos = _case(rng, 1, 8, 2, 64)
    start = np.maximum(q_pos[:, 0] - np.array([0, 2, 4]), 0).astype(np.int32)
    context = chunk_context(jnp.asarray(pool_k), jnp.asarray(pool_v), jnp.asarray(tables),
                            jnp.asarray(start), 5)
    for r in range(3):  # the chunk's writes so far: new keys / values at start .. q_pos
        for p in range(start[r], q_pos[r, 0] + 1):
            blk, off = tables[r, p // S_BLK], p % S_BLK
            pool_k[:, blk, off] = rng.normal(size=pool_k.shape[::3])
            pool_v[:, blk, off] = rng.normal(size=pool_v.shape[::3])
    want = _dense_reference(q, pool_k, pool_v, tables, q_pos)
    sl = slice(0, rows) if rows == 3 else slice(2, 3)
    ctx = {k: (v[:, sl] if k.startswith("prefix") else v[sl]) for k, v in context.items()}
    got = chunk_paged_attention(jnp.asarray(q[sl]), jnp.asarray(pool_k), jnp.asarray(pool_v), ctx,
                                jnp.asarray(q_pos[sl]))
    np.testing.assert_allclose(np.asarray(got), want[sl], atol=1e-5, rtol=0)
