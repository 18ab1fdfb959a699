"""The paged KV cache, its prefix tree and continuous batching: the same tokens and log-probs with
and without cached prefixes over a multi-turn episode and a group, only the new tokens of a turn
prefilled, the decode chunk updates the pool in place, concurrent calls share decode chunks, and
weight updates drop or keep cached prefixes as configured."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.models.config import get_preset
from kat_jax.models.decoder import init_model
from kat_jax.ops.dense import xla_dense_attention
from kat_jax.ops.paged_attention import paged_attention, paged_write, token_slots
from kat_jax.rollout.kv_cache import BlockAllocator, PrefixCache
from kat_jax.rollout.sampler import EngineConfig, JaxEngine, SamplingParams

CFG = dict(block_size=4, chunk_steps=4, cache_tokens=1024, max_batch=8)
SP = SamplingParams(temperature=1.0, max_new_tokens=6, seed=3)


@pytest.fixture(scope="module")
def model():
    return init_model(get_preset("tiny"), seed=4)


@pytest.fixture(scope="module")
def engines(model):
    return (JaxEngine(model, EngineConfig(**CFG)),
            JaxEngine(model, EngineConfig(**CFG, prefix_cache=False)))


def test_paged_attention_equals_dense_attention_over_the_gathered_rows():
    rng = np.random.default_rng(0)
    b, t, n, k, h, bs = 2, 3, 4, 2, 8, 4
    pool_k = jnp.asarray(rng.normal(size=(k, 9, bs, h)), jnp.float32)
    pool_v = jnp.asarray(rng.normal(size=(k, 9, bs, h)), jnp.float32)
    tables = jnp.asarray([[3, 7, 1], [5, 2, 0]], jnp.int32)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    new_k = jnp.asarray(rng.normal(size=(b, t, k, h)), jnp.float32)
    pos = jnp.asarray([[6, 7, 8], [2, 3, 0]], jnp.int32)
    valid = jnp.asarray([[True] * 3, [True, True, False]])
    slots = token_slots(tables, pos, valid, bs)
    assert slots[1, 2] // bs == 0  # padding goes to the trash block
    pool_k = paged_write(pool_k, new_k, slots)
    got = paged_attention(q, pool_k, pool_v, tables, pos)
    # [B, positions, K, H]: each row's blocks end to end, written out with numpy
    dense_k = np.stack([np.concatenate([np.asarray(pool_k)[:, blk].transpose(1, 0, 2)
                                        for blk in np.asarray(row)]) for row in tables])
    dense_v = np.stack([np.concatenate([np.asarray(pool_v)[:, blk].transpose(1, 0, 2)
                                        for blk in np.asarray(row)]) for row in tables])
    np.testing.assert_allclose(dense_k[0, 6:9], new_k[0])
    want = xla_dense_attention(q, dense_k, dense_v, jnp.full((b, 12), 99, jnp.int32), q_index=pos)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_prefix_tree_matches_whole_blocks_refcounts_and_evicts_least_recently_used():
    pool = BlockAllocator(6)
    tree = PrefixCache(pool, 2)
    a = pool.alloc(3)
    tree.insert([1, 2, 3, 4, 5], a)  # two full blocks cached, the third is the sequence's own
    pool.release(a)
    assert pool.refs[a[0]] == pool.refs[a[1]] == 1 and pool.refs[a[2]] == 0
    assert tree.match([1, 2, 3, 4, 9]) == a[:2] and tree.match([1, 2, 7]) == a[:1]
    assert tree.match([2, 2]) == []
    pool.release(a[:2] + a[:1])
    b = pool.alloc(2)
    tree.insert([7, 7, 8, 8], b)
    pool.release(b)
    tree.match([1, 2, 3, 4])  # [1, 2, 3, 4] becomes the most recently used
    pool.release(a[:2])
    assert tree.evict(2) == 2 and tree.match([7, 7]) == [] and tree.match([1, 2, 3, 4]) == a[:2]
    pool.release(a[:2])
    tree.clear()
    assert sorted(pool.free) == [1, 2, 3, 4, 5]


def scripted_episode(engine, prompt, turns=3, n=1):
    """Turns of agent-like calls: each prompt is the last one + the generated tokens + a scripted
    'tool result'; returns every generation."""
    histories = [list(prompt)] * n
    out = []
    gens = engine.generate([prompt], SP, n=n, seeds=[7])[0]
    for turn in range(turns):
        out.append(gens)
        histories = [h + g.tokens + [300 + turn, 301, 302 + (i % 2), 40, 41] for i, (h, g)
                     in enumerate(zip(histories, gens))]
        if turn < turns - 1:
            gens = [engine.generate([h], SP, seeds=[11 + turn])[0][0] for h in histories]
    return out, sum(len(h) for h in histories)


def test_cached_prefixes_give_the_same_tokens_and_log_probs_and_prefill_only_new_tokens(engines):
    cached, plain = engines
    prompt = list(range(20, 43))
    for n in (1, 3):  # one episode, then a group of three sharing the prompt
        before = dict(cached.stats)
        got, _ = scripted_episode(cached, prompt, n=n)
        plain_before = plain.stats["prefill_tokens"]
        want, _ = scripted_episode(plain, prompt, n=n)
        for gs, ws in zip(got, want):
            for g, w in zip(gs, ws):
                assert g.tokens == w.tokens and g.finish_reason == w.finish_reason
                np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
                np.testing.assert_allclose(g.entropies, w.entropies, atol=1e-5)
        prefilled = cached.stats["prefill_tokens"] - before["prefill_tokens"]
        assert prefilled < (plain.stats["prefill_tokens"] - plain_before) / 2
        assert cached.stats["cached_tokens"] > before["cached_tokens"]


def test_decode_chunk_updates_the_pool_in_place_without_cache_sized_temporaries(engines):
    eng = engines[0]
    pool_bytes = sum(k.nbytes + v.nbytes for k, v in eng._pool)
    b, m = 8, 4
    args = (eng.params, eng._layer_states, eng._pool, np.zeros((b, m), np.int32),
            np.zeros(b, np.int32), np.zeros(b, np.int32), np.zeros((b, 2), np.uint32),
            np.zeros(b, np.int32), np.ones(b, np.int32), np.ones(b, bool),
            np.full((b, 1), -1, np.int32), np.ones(b, np.float32), np.ones(b, np.float32),
            np.zeros(b, np.int32), 0, CFG["chunk_steps"])
    compiled = eng._decode.lower(*args).compile()
    mem = compiled.memory_analysis()
    assert mem.temp_size_in_bytes < pool_bytes / 4, (mem.temp_size_in_bytes, pool_bytes)
    assert mem.alias_size_in_bytes >= pool_bytes  # the donated pool is the output pool
    hlo = compiled.as_text()
    pool_shape = "f32[{},{},{},{}]".format(*eng._pool[0][0].shape)
    copies = [ln for ln in hlo.splitlines() if " copy(" in ln and pool_shape in ln.split("=")[0]]
    assert not copies, copies[:3]


def test_concurrent_calls_share_decode_chunks_and_get_their_own_samples(engines):
    eng = engines[0]
    prompts = [[5 + i, 9, 200, 31 + i, 7] for i in range(4)]
    alone = [eng.generate([p], SP, seeds=[i])[0][0] for i, p in enumerate(prompts)]
    calls = eng.stats["decode_calls"]
    results = {}

    def worker(i):
        results[i] = eng.generate([prompts[i]], SP, seeds=[i])[0][0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert results[i].tokens == alone[i].tokens
        np.testing.assert_allclose(results[i].logprobs, alone[i].logprobs, atol=1e-5)
    assert eng.stats["decode_calls"] - calls < 4 * -(-(SP.max_new_tokens - 1) // CFG["chunk_steps"])


@pytest.mark.parametrize("mode", ["recompute", "keep"])
def test_weight_updates_drop_or_keep_cached_prefixes_as_configured(model, mode):
    eng = JaxEngine(model, EngineConfig(**CFG, on_weight_update=mode))
    prompt = list(range(30, 60))
    eng.generate([prompt], SP)
    before = eng.stats["prefill_tokens"]
    eng.update_weights(jax.tree.map(lambda x: x * 1.01, eng.params))
    eng.generate([prompt], SP)
    prefilled = eng.stats["prefill_tokens"] - before
    assert prefilled == (len(prompt) if mode == "recompute" else len(prompt) % CFG["block_size"]
                         or CFG["block_size"])


def test_chained_decode_chunks_give_the_unchained_tokens(model):
    """Chunks chained on device (the rows' state passed from one to the next, the host reading
    chunk k while k + 1 runs) sample what one chunk per dispatch samples; a length-limited chain
    stops at the last chunk with work (no idle call), and a row that stops early (stop token) idles
    to the end of its chain without writing tokens."""
    sp = SamplingParams(temperature=1.0, max_new_tokens=13, seed=5)
    prompts = [[5, 9, 200, 31, 7], [8, 8, 1]]
    out = {}
    for chain in (1, 4):
        eng = JaxEngine(model, EngineConfig(**CFG))
        eng.CHAIN = chain
        gens = eng.generate(prompts, sp, n=2)
        out[chain] = [g for row in gens for g in row]
        assert eng.stats["decode_calls"] == 3 and eng.stats["decode_idle_calls"] == 0
    for a, b in zip(out[1], out[4]):
        assert a.tokens == b.tokens and len(a.tokens) == 13
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)
    stop = out[1][0].tokens[2]  # a token sample 0 draws third: it stops there
    sp_stop = SamplingParams(temperature=1.0, max_new_tokens=13, seed=5, stop_tokens=(stop,))
    stopped = {}
    for chain in (1, 4):
        eng = JaxEngine(model, EngineConfig(**CFG))
        eng.CHAIN = chain
        stopped[chain] = [g for row in eng.generate(prompts, sp_stop, n=2) for g in row]
    for a, b in zip(stopped[1], stopped[4]):
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
    assert stopped[4][0].tokens == out[1][0].tokens[:3] and stopped[4][0].finish_reason == "stop"


def test_a_chain_and_a_twin_engine_compile_one_decode_program(model):
    """A chain's first chunk (its rows' state from the host) and its later chunks (the state the
    previous chunk left on device) run one compiled decode program, and a second engine of the
    same model and block size compiles nothing the first one compiled (the programs are shared)."""
    cfg = dict(CFG, block_size=2, chunk_steps=3)  # a block size no other test uses: fresh programs
    sp = SamplingParams(temperature=1.0, max_new_tokens=11, seed=2)
    a = JaxEngine(model, EngineConfig(**cfg))
    first = a.generate([[5, 9, 200]], sp)[0][0]
    assert a.stats["decode_calls"] == 4  # 10 decode steps: chunks of 3, one chain of 4
    assert a._decode._cache_size() == 1 and a._prefill._cache_size() == 1
    b = JaxEngine(model, EngineConfig(**cfg, prefix_cache=False))
    assert b._decode is a._decode
    assert b.generate([[5, 9, 200]], sp)[0][0].tokens == first.tokens
    assert a._decode._cache_size() == 1 and a._prefill._cache_size() == 1


def test_close_stops_the_scheduler_and_later_calls_fail_clearly(model):
    """close() (also run for every live engine at interpreter exit, so that no scheduler thread is
    torn down inside a device call) ends the scheduler thread; a later call is an error, not a
    hang."""
    eng = JaxEngine(model, EngineConfig(**CFG))
    assert len(eng.generate([[5, 9, 200]], SP)[0][0].tokens) == SP.max_new_tokens
    eng.close()
    assert not eng._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        eng.generate([[5, 9, 200]], SP)
