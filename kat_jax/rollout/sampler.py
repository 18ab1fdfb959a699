"""The built-in sampler: a paged KV cache with a prefix tree, decode as an on-device loop,
continuous batching.

    engine = JaxEngine(model)                     # EngineConfig() defaults
    out = engine.generate([prompt_ids], SamplingParams(temperature=1.0, max_new_tokens=64,
                          stop_tokens=(im_end,), seed=0), n=8)   # out[0]: 8 Generations

Per generated token: its log-prob and the entropy of the distribution it was actually sampled from
(logits / temperature, restricted by top-k and top-p, renormalised). With temperature 1 and no
top-k / top-p that is exactly what `kat-jax score` computes for the same tokens (tested to 1e-4 in
float32), so rollout and trainer see the same numbers. Greedy (temperature 0) picks the argmax and
reports the log-prob and entropy of the untempered distribution (temperature 1). Choosing a token
sorts nothing (sample_step).

Determinism: sample j of prompt i has its own key, fold_in(key(seeds[i]), j) (seeds default to
params.seed for every prompt), folded again with the index of the token in its generation; the
same seed gives the same tokens whatever else is in the batch (up to float32 rounding of batched
matmuls).

KV cache (kat_jax.ops.paged_attention, kat_jax.rollout.kv_cache): one preallocated pool of blocks
of `block_size` tokens per layer, a block table per sequence. A sequence reserves the blocks of its
prompt + max_new_tokens when it is admitted. With `prefix_cache` (the default) the full blocks of
every prompt and finished generation go into a radix tree keyed by token ids, so a later call
whose prompt starts with cached blocks prefills only the rest: an agent's next turn prefills only
the tokens appended since its last call, and episodes sharing a prompt share its blocks. Identical
prompts of one admission round (a group's n samples, concurrent episodes of a task) are prefilled
once; their partial last block is copied. Unused cached blocks are evicted least recently used when
the pool is full. The last prompt token is always prefilled (its logits choose the first token).

Continuous batching: generate may be called from many threads; a scheduler thread admits waiting
sequences into the running batch (up to max_batch rows) between chunks of `chunk_steps` decode
steps, each chunk one device dispatch (a lax.while_loop that stops early when every row is done);
rows leave when they stop. While nothing waits, up to JaxEngine.CHAIN chunks run as a chain: the
rows' state passes between them on device, so the next chunk is dispatched before the host reads
and hands out the previous one's tokens (the host's per-chunk work overlaps the device's).
Compiled shapes are bucketed: batch rows to powers of two, prefill length and block-table width
(the blocks a prefill or a chain reads, not all those reserved) to 2^k or 1.5 * 2^k.

Weights are jit arguments: update_weights swaps them without recompiling. Cached prefixes were
computed with the old weights; on_weight_update "recompute" (default) drops the prefix tree and
re-prefills the sequences in flight (prompt + what they generated) with the new weights, "keep"
keeps both (faster, approximate: stale keys and values).

Context: `engine.context_length` is the model's max_position_embeddings; a call whose longest
prompt + max_new_tokens exceeds it (or the KV pool) raises ContextLengthError (a ValueError),
before any compute.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import functools
import queue
import threading
import time
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kat_jax.ops.paged_attention import (
    chunk_context,
    chunk_paged_attention,
    paged_attention,
    token_slots,
)
from kat_jax.rollout.kv_cache import BlockAllocator, PrefixCache
from kat_jax.trees.packing import bucket_length


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 256
    stop_tokens: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 \
                or self.max_new_tokens < 1:
            raise ValueError(f"invalid sampling parameters {self}")


class ContextLengthError(ValueError):
    """A prompt + max_new_tokens that does not fit the model's context (raised by engines; the
    agent loop ends such an episode with status context_limit)."""


@dataclasses.dataclass
class Generation:
    tokens: list[int]
    logprobs: list[float]
    entropies: list[float]
    finish_reason: str  # "stop" (a stop token, included) or "length"


def sample_step(logits: jax.Array, keys: jax.Array, step: jax.Array, temperature: jax.Array,
                top_p: jax.Array, top_k: jax.Array, k_bound: int = 0):
    """Choose the next token of each row without sorting the vocabulary.

    logits float32[B, V]; keys uint32[B, 2] (key data); step int32[] or [B] (folded into each
    key); temperature, top_p float32[] or [B]; top_k int32[] or [B] (0: off). k_bound (static):
    an upper bound of top_k over the rows (0: no row uses top-k), the k of `jax.lax.top_k`.
    Returns (token int32[B], logprob float32[B], entropy float32[B]) of the distribution sampled
    from: softmax(logits / temperature) restricted to the top_k tokens and then to the smallest
    set of most probable tokens holding top_p of the mass (ties at the cut are kept). Greedy rows
    (temperature 0) take the argmax and report the untempered distribution.

    The top-p cut is found by bisection over the bit patterns of non-negative float32 (30 halvings
    of [0, 1] leave one representable threshold): the smallest t with sum(p > t) < top_p, so the
    kept set {p >= t} is exactly the set a sort and cumulative sum would keep (up to the summation
    order of float32). Batches with no top-k, no top-p or no sampled row skip those parts."""
    b, v = logits.shape
    temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (b,))
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (b,))
    top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (b,))
    step = jnp.broadcast_to(jnp.asarray(step, jnp.int32), (b,))
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    keep = jnp.ones(scaled.shape, bool)
    if k_bound:
        kb = min(int(k_bound), v)
        top_vals = jax.lax.top_k(scaled, kb)[0]  # [B, kb], descending
        kth = jnp.take_along_axis(top_vals, (jnp.clip(top_k, 1, kb) - 1)[:, None], axis=-1)
        keep = jnp.where(((top_k > 0) & ~greedy)[:, None], scaled >= kth, True)
    use_p = (top_p < 1.0) & ~greedy

    def top_p_keep(keep):
        probs = jax.nn.softmax(jnp.where(keep, scaled, -jnp.inf), axis=-1)

        def halve(_, lo_hi):
            lo, hi = lo_hi
            mid = lo + (hi - lo) // 2
            t = jax.lax.bitcast_convert_type(mid, jnp.float32)[:, None]
            ok = jnp.sum(jnp.where(probs > t, probs, 0.0), axis=-1) < top_p
            return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

        one = jax.lax.bitcast_convert_type(jnp.float32(1.0), jnp.int32)
        lo_hi = (jnp.zeros(b, jnp.int32), jnp.full(b, one, jnp.int32))
        _, hi = jax.lax.fori_loop(0, 30, halve, lo_hi)
        cut = jax.lax.bitcast_convert_type(hi, jnp.float32)[:, None]
        return keep & jnp.where(use_p[:, None], probs >= cut, True)

    keep = jax.lax.cond(jnp.any(use_p), top_p_keep, lambda k: k, keep)
    logp = jax.nn.log_softmax(jnp.where(keep, scaled, -jnp.inf), axis=-1)
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(logp):
        step_keys = jax.vmap(lambda k, s: jax.random.fold_in(jax.random.wrap_key_data(k), s))(
            keys, step)
        sampled = jax.vmap(jax.random.categorical)(step_keys, logp).astype(jnp.int32)
        return jnp.where(greedy, argmax, sampled)

    token = jax.lax.cond(jnp.all(greedy), lambda _: argmax, draw, logp)
    lp = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    ent = -jnp.sum(jnp.where(keep, jnp.exp(logp) * logp, 0.0), axis=-1)
    return token, lp, ent


@jax.jit
def _fold_keys(seeds, js):
    return jax.vmap(lambda s, j: jax.random.key_data(jax.random.fold_in(jax.random.key(s), j)))(
        seeds, js)


def sample_keys(seeds: list[int], js: list[int]) -> np.ndarray:
    """uint32[len(seeds), 2]: the key data of fold_in(key(seeds[i]), js[i]), for all samples in one
    device call (padded to a power of two rows, so few shapes compile) instead of a few eager ops
    per sample (~1 ms each on CPU: 30 ms for a batch of 32). Seeds outside [0, 2**31) take the
    scalar path (jax.random.key's own conversion of large ints)."""
    if all(0 <= s < 2 ** 31 for s in seeds):
        rows = _pow2(len(seeds))
        s_arr = np.zeros(rows, np.int32)
        j_arr = np.zeros(rows, np.int32)
        s_arr[:len(seeds)], j_arr[:len(seeds)] = seeds, js
        return np.asarray(_fold_keys(s_arr, j_arr))[:len(seeds)]
    return np.stack([np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(s), j)))
                     for s, j in zip(seeds, js)])


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """JaxEngine settings (see the module docstring).

    max_batch: rows of the running batch (sequences decoded together).
    chunk_steps: decode steps per device dispatch (rows join and leave between chunks).
    block_size: tokens per KV block (the granularity of prefix sharing).
    cache_tokens: KV pool capacity in tokens, the cache's memory budget (None: the larger of the
        context and 32768).
    prefix_cache: keep finished sequences' blocks in the radix tree for later calls.
    on_weight_update: "recompute" or "keep" (cached prefixes and in-flight sequences).
    attention: how prefill and decode read the pool: "xla" (the gather path,
        kat_jax.ops.paged_attention), "pallas" (kat_jax.ops.pallas.paged; interpreted on CPU) or
        "auto" (pallas on GPU / TPU, xla on CPU)."""

    max_batch: int = 32
    chunk_steps: int = 16
    block_size: int = 16
    cache_tokens: int | None = None
    prefix_cache: bool = True
    on_weight_update: str = "recompute"
    attention: str = "auto"

    def __post_init__(self):
        if min(self.max_batch, self.chunk_steps, self.block_size) < 1 or (
                self.cache_tokens is not None and self.cache_tokens < self.block_size):
            raise ValueError(f"invalid engine config {self}")
        if self.on_weight_update not in ("recompute", "keep"):
            raise ValueError(f"on_weight_update must be 'recompute' or 'keep', got "
                             f"{self.on_weight_update!r}")
        if self.attention not in ("auto", "xla", "pallas"):
            raise ValueError(f"EngineConfig.attention must be 'auto', 'xla' or 'pallas', got "
                             f"{self.attention!r}")


@dataclasses.dataclass
class _Request:
    n_left: int
    gens: list
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: BaseException | None = None


@dataclasses.dataclass(eq=False)
class _Seq:
    """One sample in flight: prompt, what it generated, its KV blocks (table order)."""

    prompt: list[int]
    sp: SamplingParams
    key: np.ndarray  # uint32[2]
    req: _Request
    index: int  # its place in req.gens
    out_t: list[int] = dataclasses.field(default_factory=list)
    out_lp: list[float] = dataclasses.field(default_factory=list)
    out_e: list[float] = dataclasses.field(default_factory=list)
    blocks: list[int] = dataclasses.field(default_factory=list)
    finish: str | None = None

    def context(self) -> list[int]:
        """What the next prefill of this sequence reads: the prompt and every generated token."""
        return self.prompt + self.out_t

    def take(self, tok: int, lp: float, ent: float) -> None:
        self.out_t.append(tok)
        self.out_lp.append(lp)
        self.out_e.append(ent)
        if tok in self.sp.stop_tokens:
            self.finish = "stop"
        elif len(self.out_t) >= self.sp.max_new_tokens:
            self.finish = "length"


def resolve_engine_attention(attention: str) -> str:
    """EngineConfig.attention with auto resolved: pallas on GPU / TPU, xla on CPU."""
    if attention == "auto":
        return "xla" if jax.default_backend() == "cpu" else "pallas"
    return attention


def _chunk_attention(q, pool_k, pool_v, block_tables, q_pos, *, context):
    """Attention.paged's attention function for a decode chunk's step (the XLA path)."""
    del block_tables  # the context holds the chunk's tables
    return chunk_paged_attention(q, pool_k, pool_v, context, q_pos)


def engine_programs(graphdef, layer_graphdef, bs: int, attention_impl: str):
    """The engine's two device programs, unjitted: prefill (new tokens of some rows into the pool,
    then the next token of each) and decode (a lax.while_loop of up to n_steps steps with stop
    checks on device); JaxEngine jits them with the pool donated, lower_engine_programs lowers them
    for abstract inputs."""
    if attention_impl == "pallas":
        from kat_jax.ops.pallas import paged as pallas_paged
        attention = pallas_paged.pallas_paged_attention
    else:
        attention = paged_attention

    def forward(params, layer_states, pool, tokens, positions, valid, tables, attend=attention):
        m = nnx.merge(graphdef, params)
        layers = [nnx.merge(layer_graphdef, s) for s in layer_states]
        slots = token_slots(tables, positions, valid, bs)
        hidden, pool = m.paged(layers, tokens, positions, slots, pool, tables, attend)
        return m, hidden, pool

    def prefill(params, layer_states, pool, tokens, positions, valid, tables, last, copy_src,
                copy_dst, rows, keys, steps, temperature, top_p, top_k, k_bound):
        m, hidden, pool = forward(params, layer_states, pool, tokens, positions, valid, tables)
        h_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        logits = m.logits(h_last)
        pool = [(k.at[:, copy_dst].set(k[:, copy_src]), v.at[:, copy_dst].set(v[:, copy_src]))
                for k, v in pool]
        tok, lp, ent = sample_step(logits[rows], keys, steps, temperature, top_p, top_k,
                                   k_bound)
        return pool, tok, lp, ent

    def decode(params, layer_states, pool, tables, tok, pos, keys, step, left, active, stops,
               temperature, top_p, top_k, k_bound, n_steps):
        b = tok.shape[0]
        out = (jnp.full((b, n_steps), -1, jnp.int32), jnp.zeros((b, n_steps), jnp.float32),
               jnp.zeros((b, n_steps), jnp.float32))

        def cond(carry):
            return (carry[0] < n_steps) & jnp.any(carry[6])

        if attention_impl == "xla":
            # each layer's context gathered once for the chunk; a step gathers only the blocks
            # the chunk writes (chunk_paged_attention)
            contexts = [chunk_context(k, v, tables, pos, n_steps) for k, v in pool]
            attend = [functools.partial(_chunk_attention, context=c) for c in contexts]
        else:
            attend = attention

        def body(carry):
            i, pool, tok, pos, step, left, active, (o_t, o_lp, o_e) = carry
            m, hidden, pool = forward(params, layer_states, pool, tok[:, None], pos[:, None],
                                      active[:, None], tables, attend)
            t, lp, e = sample_step(m.logits(hidden[:, 0]), keys, step, temperature, top_p,
                                   top_k, k_bound)
            o_t = o_t.at[:, i].set(jnp.where(active, t, -1))
            o_lp, o_e = o_lp.at[:, i].set(lp), o_e.at[:, i].set(e)
            ended = jnp.any(t[:, None] == stops, axis=-1) | (left <= 1)
            inc = active.astype(jnp.int32)
            return (i + 1, pool, jnp.where(active, t, tok), pos + inc, step + inc, left - inc,
                    active & ~ended, (o_t, o_lp, o_e))

        carry = (jnp.int32(0), pool, tok, pos, step, left, active, out)
        carry = jax.lax.while_loop(cond, body, carry)
        # the rows' state after the chunk: the next chunk of a chain starts from it on device
        return carry[1], carry[7], carry[0], carry[2:7]

    return prefill, decode


_ENGINES: weakref.WeakSet = weakref.WeakSet()  # live engines, closed at interpreter exit


@atexit.register
def _close_engines() -> None:
    for engine in list(_ENGINES):
        engine.close(timeout=30.0)


def _drain(q: queue.Queue) -> list:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


@functools.lru_cache(maxsize=16)
def _jitted_programs(graphdef, layer_graphdef, bs: int, attention_impl: str):
    """engine_programs jitted (the pool donated), one pair per model structure, block size and
    attention: engines of the same model share compiled programs (a second engine, e.g. one per
    evaluation or with another prefix-cache setting, compiles nothing its twin compiled)."""
    prefill, decode = engine_programs(graphdef, layer_graphdef, bs, attention_impl)
    return (jax.jit(prefill, donate_argnums=2, static_argnums=16),
            jax.jit(decode, donate_argnums=2, static_argnums=(14, 15)))


class JaxEngine:
    """The built-in policy engine (see the module docstring). Thread-safe: concurrent generate
    calls are batched continuously by one scheduler thread."""

    continuous_batching = True  # servers call it concurrently, without a BatchingEngine
    CHAIN = 4  # decode chunks per chain (_decode_chunk): at most this many between admissions

    def __init__(self, model, config: EngineConfig | None = None, kv_sharding=None):
        """kv_sharding: where the KV pool lives (a sharding of its [K, P, S_blk, H] arrays;
        default: the device of the model's parameters). Parameters sharded over several devices
        (a tensor-parallel replica, kat_jax.flow.placement) make XLA partition the programs."""
        self.config = cfg = config or EngineConfig()
        self.graphdef, self.params = nnx.split(model)
        self.cfg = model.cfg
        self._layer_graphdef = nnx.split(model.layers)[0]
        self._layer_states = model.unstacked_layer_states()
        self.stats = {"prefill_tokens": 0, "cached_tokens": 0, "decode_steps": 0,
                      "generated_tokens": 0, "prefill_calls": 0, "decode_calls": 0,
                      "decode_tokens": 0, "decode_seconds": 0.0, "prefill_seconds": 0.0,
                      "decode_idle_calls": 0}
        bs = cfg.block_size
        tokens = cfg.cache_tokens or max(self.context_length, 32768)
        self.num_blocks = -(-tokens // bs) + 1  # + the trash block
        if kv_sharding is None:
            devices = jax.tree.leaves(self.params)[0].devices()
            kv_sharding = jax.sharding.SingleDeviceSharding(next(iter(devices))) \
                if len(devices) == 1 else None
        if kv_sharding is not None and self.attention_needs_one_device(cfg, kv_sharding):
            raise ValueError("EngineConfig.attention='pallas' runs on one device; a KV pool "
                             "over several devices needs attention='xla'")
        self.kv_sharding = kv_sharding
        self._pool = self._new_pool()
        self._alloc = BlockAllocator(self.num_blocks)
        self._tree = PrefixCache(self._alloc, bs)
        self._lock = threading.Lock()  # device state: weights, pool, tree, running rows
        self._inbox: queue.Queue[list[_Seq]] = queue.Queue()
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._running: list[_Seq] = []
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._update_pending = threading.Event()
        self._closing = False
        _ENGINES.add(self)
        self.attention = resolve_engine_attention(cfg.attention)
        self._prefill, self._decode = _jitted_programs(self.graphdef, self._layer_graphdef, bs,
                                                       self.attention)
        # where a chain's rows' state lives between chunks. A chained chunk's state comes from
        # the previous chunk (committed device arrays); the first chunk's is put there too, so
        # both are one compiled program (arguments' placement is part of jit's cache key: host
        # arrays would compile every decode shape twice). On one device it is that device;
        # otherwise it is learned from the first chunk's outputs.
        self._state_sharding = kv_sharding if isinstance(
            kv_sharding, jax.sharding.SingleDeviceSharding) else None

    def _new_pool(self):
        """An empty KV pool, created where it lives (self.kv_sharding)."""
        model, n, bs = nnx.merge(self.graphdef, self.params), self.num_blocks, \
            self.config.block_size
        return jax.jit(lambda: model.init_kv_pool(n, bs), out_shardings=self.kv_sharding)()

    @staticmethod
    def attention_needs_one_device(cfg: EngineConfig, kv_sharding) -> bool:
        return resolve_engine_attention(cfg.attention) == "pallas" and \
            len(kv_sharding.device_set) > 1

    @property
    def context_length(self) -> int:
        """The model's context (max_position_embeddings): prompt + max_new_tokens may not exceed it."""
        return self.cfg.max_position_embeddings

    def update_weights(self, params) -> None:
        """New weights of the same structure (e.g. from the trainer): no recompilation. Applied
        between decode chunks; cached prefixes and in-flight sequences per
        config.on_weight_update."""
        model = nnx.merge(self.graphdef, params)
        layer_states = model.unstacked_layer_states()
        self._update_pending.set()  # a decode chain in progress stops at its next chunk
        with self._lock:
            self._update_pending.clear()
            self.params, self._layer_states = params, layer_states
            if self.config.on_weight_update == "recompute":
                self._tree.clear()
                for seq in reversed(self._running):  # re-prefilled with the new weights
                    self._alloc.release(seq.blocks)
                    seq.blocks = []
                    self._waiting.appendleft(seq)
                self._running = []

    def generate(self, prompts: list[list[int]], params: SamplingParams, n: int = 1,
                 seeds: list[int] | None = None) -> list[list[Generation]]:
        """n samples for each prompt (identical prompts are prefilled once). seeds: one per
        prompt (default params.seed for all; sample j of prompt i uses fold_in(seed_i, j))."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        if n < 1:
            raise ValueError(f"generate: n must be >= 1, got {n}")
        vocab = self.cfg.vocab_size
        for p in prompts:
            if min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"generate: token ids must be in [0, {vocab})")
        need = max(len(p) for p in prompts) + params.max_new_tokens
        if need > self.context_length:
            raise ContextLengthError(f"prompt + max_new_tokens = {need} exceeds "
                                     f"max_position_embeddings {self.context_length}")
        if self._blocks_for(need) > self.num_blocks - 1:
            raise ContextLengthError(f"prompt + max_new_tokens = {need} exceeds the KV pool "
                                     f"({self.num_blocks - 1} blocks of {self.config.block_size})")
        seeds = [params.seed] * len(prompts) if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError("generate: one seed per prompt")
        req = _Request(len(prompts) * n, [None] * (len(prompts) * n))
        keys = sample_keys([s for s in seeds for _ in range(n)], list(range(n)) * len(prompts))
        seqs = [_Seq([int(t) for t in p], params, keys[i * n + j], req, i * n + j)
                for i, p in enumerate(prompts) for j in range(n)]
        if self._closing:
            raise RuntimeError("the engine was closed (JaxEngine.close)")
        self._start()
        self._inbox.put(seqs)
        req.done.wait()
        if req.error is not None:
            raise req.error
        return [req.gens[i * n:(i + 1) * n] for i in range(len(prompts))]

    # -- the scheduler thread ------------------------------------------------------------------

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="jax-engine")
                self._thread.start()

    def _blocks_for(self, positions: int) -> int:
        """Blocks holding positions 0 .. positions - 2 (the last sampled token is never fed)."""
        return -(-max(positions - 1, 1) // self.config.block_size)

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop the scheduler thread at its next chunk boundary (requests still in flight get
        an error) and wait for it. Called for every live engine at interpreter exit: a daemon
        thread still inside a device call (e.g. reading a chain's last chunk after its results
        were handed out) would otherwise be torn down in C++ and abort the process."""
        self._closing = True
        self._inbox.put([])  # wakes an idle scheduler
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _loop(self) -> None:
        while True:
            if self._closing:
                with self._lock:
                    self._waiting.extend(s for batch in _drain(self._inbox) for s in batch)
                    for seq in [*self._running, *self._waiting]:
                        seq.req.error = RuntimeError("the engine was closed")
                        seq.req.done.set()
                    self._running, self._waiting = [], collections.deque()
                return
            if not self._waiting and not self._running:
                self._waiting.extend(self._inbox.get())
                continue  # (re)check closing: a close wakes the scheduler with nothing
            for batch in _drain(self._inbox):
                self._waiting.extend(batch)
            with self._lock:
                try:
                    self._admit()
                    if self._running:
                        self._decode_chunk()
                except BaseException as e:  # noqa: BLE001 - handed to every caller in flight
                    self._fail_all(e)

    def _fail_all(self, error: BaseException) -> None:
        """A device program failed (the donated pool may be gone): every request in flight gets
        the error and the cache starts empty."""
        for seq in [*self._running, *self._waiting]:
            seq.req.error = error
            seq.req.done.set()
        self._running, self._waiting = [], collections.deque()
        self._pool = self._new_pool()
        self._alloc = BlockAllocator(self.num_blocks)
        self._tree = PrefixCache(self._alloc, self.config.block_size)

    def _reserve(self, n: int) -> list[int] | None:
        blocks = self._alloc.alloc(n)
        if blocks is None and self._tree.evict(n - len(self._alloc.free)):
            blocks = self._alloc.alloc(n)
        return blocks

    def _admit(self) -> None:
        """Move waiting sequences into the running batch (one prefill for all of them)."""
        cfg, bs = self.config, self.config.block_size
        leaders: list[tuple[_Seq, int]] = []  # (sequence, prefix length taken from the cache)
        followers: list[tuple[_Seq, _Seq]] = []
        by_prompt: dict[tuple[int, ...], _Seq] = {}
        rows_free = cfg.max_batch - len(self._running)
        while self._waiting and len(leaders) + len(followers) < rows_free:
            seq = self._waiting[0]
            ctx = seq.context()
            total = self._blocks_for(len(seq.prompt) + seq.sp.max_new_tokens)
            leader = by_prompt.get(tuple(ctx)) if not seq.out_t else None
            if leader is not None:
                shared = leader.blocks[:len(ctx) // bs]
                own = self._reserve(total - len(shared))
                if own is None:
                    break
                self._alloc.retain(shared)
                seq.blocks = shared + own
                followers.append((seq, leader))
            else:
                matched = self._tree.match(ctx[:-1]) if cfg.prefix_cache else []
                own = self._reserve(total - len(matched))
                if own is None:
                    self._alloc.release(matched)
                    break
                seq.blocks = matched + own
                leaders.append((seq, len(matched) * bs))
                if not seq.out_t:
                    by_prompt[tuple(ctx)] = seq
            self._waiting.popleft()
        if not leaders:
            return
        self._prefill_rows(leaders, followers)

    def _prefill_rows(self, leaders, followers) -> None:
        bs = self.config.block_size
        b = _pow2(len(leaders))
        t = min(bucket_length(max(len(s.context()) - c for s, c in leaders)), self.context_length)
        # the table covers the contexts only (not the blocks reserved for generation), bucketed
        m = bucket_length(max(-(-len(s.context()) // bs) for s, _ in leaders), minimum=1)
        tokens = np.zeros((b, t), np.int32)
        positions = np.zeros((b, t), np.int32)
        valid = np.zeros((b, t), bool)
        tables = np.zeros((b, m), np.int32)
        last = np.zeros(b, np.int32)
        for r, (seq, c) in enumerate(leaders):
            ctx = seq.context()
            tokens[r, :len(ctx) - c] = ctx[c:]
            positions[r] = c + np.arange(t)
            valid[r, :len(ctx) - c] = True
            tables[r, :min(m, len(seq.blocks))] = seq.blocks[:m]
            last[r] = len(ctx) - c - 1
            self.stats["prefill_tokens"] += len(ctx) - c
            self.stats["cached_tokens"] += c
        row_of = {id(seq): r for r, (seq, _) in enumerate(leaders)}
        copies = [(leader.blocks[len(seq.prompt) // bs], seq.blocks[len(seq.prompt) // bs])
                  for seq, leader in followers if len(seq.prompt) % bs]
        n_copy = _pow2(len(copies))
        src = np.zeros(n_copy, np.int32)
        dst = np.zeros(n_copy, np.int32)
        for i, (s, d) in enumerate(copies):
            src[i], dst[i] = s, d
        seqs = [s for s, _ in leaders] + [s for s, _ in followers]
        rows = [row_of[id(s)] for s, _ in leaders] + [row_of[id(ld)] for _, ld in followers]
        arrays = self._row_arrays(seqs)
        rows_pad = np.zeros(len(arrays["keys"]), np.int32)
        rows_pad[:len(rows)] = rows
        t0 = time.perf_counter()
        self._pool, tok, lp, ent = self._prefill(
            self.params, self._layer_states, self._pool, tokens, positions, valid, tables, last,
            src, dst, rows_pad, arrays["keys"], arrays["step"], arrays["temperature"],
            arrays["top_p"], arrays["top_k"], arrays["k_bound"])
        tok, lp, ent = jax.device_get((tok, lp, ent))
        self.stats["prefill_seconds"] += time.perf_counter() - t0
        self.stats["prefill_calls"] += 1
        if self.config.prefix_cache:
            for seq, _ in leaders:  # the prompt's full blocks: shared from now on
                self._tree.insert(seq.context(), seq.blocks)
        for r, seq in enumerate(seqs):
            seq.take(int(tok[r]), float(lp[r]), float(ent[r]))
            if seq.finish is None:
                self._running.append(seq)
            else:
                self._retire(seq)

    def _row_arrays(self, seqs: list[_Seq]) -> dict[str, Any]:
        """Per-row sampling inputs of seqs, padded to a power of two rows."""
        b = _pow2(len(seqs))
        keys = np.zeros((b, 2), np.uint32)
        temp = np.ones(b, np.float32)
        top_p = np.ones(b, np.float32)
        top_k = np.zeros(b, np.int32)
        step = np.zeros(b, np.int32)
        for r, seq in enumerate(seqs):
            keys[r], temp[r], top_p[r], top_k[r] = (seq.key, seq.sp.temperature, seq.sp.top_p,
                                                    seq.sp.top_k)
            step[r] = len(seq.out_t)
        k_max = int(top_k.max())
        k_bound = min(_pow2(k_max), self.cfg.vocab_size) if k_max else 0
        return {"keys": keys, "temperature": temp, "top_p": top_p, "top_k": top_k,
                "step": step, "k_bound": k_bound}

    def _decode_chunk(self) -> None:
        """Decode the running batch: a chain of up to CHAIN chunks, each one device call. The
        rows' state passes from chunk to chunk on device, so chunk k + 1 is dispatched before
        chunk k's tokens are read and handed to their sequences: the host's work per chunk
        (reading the outputs, retiring rows, the next dispatch) overlaps the device's. The chain
        stops early when sequences wait to be admitted, a weight update is pending or every row
        has finished; rows that finish mid-chain idle (inactive, writing nothing) to its end."""
        seqs = self._running
        arrays = self._row_arrays(seqs)
        b = len(arrays["keys"])
        # the table covers what the chain can read: positions up to pos + CHAIN * chunk_steps - 1
        # (attention's cost grows with the table's width, not with the blocks reserved)
        ahead, bs = self.CHAIN * self.config.chunk_steps, self.config.block_size
        m = bucket_length(max(min(len(s.blocks), -(-(len(s.prompt) + len(s.out_t) - 1 + ahead)
                                                      // bs)) for s in seqs), minimum=1)
        n_stop = _pow2(max(len(s.sp.stop_tokens) for s in seqs) or 1)
        tables = np.zeros((b, m), np.int32)
        tok = np.zeros(b, np.int32)
        pos = np.zeros(b, np.int32)
        left = np.zeros(b, np.int32)
        active = np.zeros(b, bool)
        stops = np.full((b, n_stop), -1, np.int32)
        for r, seq in enumerate(seqs):
            tables[r, :min(m, len(seq.blocks))] = seq.blocks[:m]
            tok[r] = seq.out_t[-1]
            pos[r] = len(seq.prompt) + len(seq.out_t) - 1
            left[r] = seq.sp.max_new_tokens - len(seq.out_t)
            active[r] = True
            stops[r, :len(seq.sp.stop_tokens)] = seq.sp.stop_tokens
        t0 = time.perf_counter()
        state = (tok, pos, arrays["step"], left, active)
        if self._state_sharding is not None:
            state = jax.device_put(state, self._state_sharding)
        pending = None
        longest = int(left.max())  # no row runs longer (stop tokens may end rows sooner)
        for k in range(self.CHAIN):
            if k and longest <= k * self.config.chunk_steps:
                break  # every row has reached max_new_tokens
            tok, pos, step, left, active = state
            self._pool, outs, steps, state = self._decode(
                self.params, self._layer_states, self._pool, tables, tok, pos, arrays["keys"],
                step, left, active, stops, arrays["temperature"], arrays["top_p"],
                arrays["top_k"], arrays["k_bound"], self.config.chunk_steps)
            if self._state_sharding is None:
                self._state_sharding = state[0].sharding
            if pending is not None:  # the previous chunk's tokens, while this one runs
                self._take_chunk(seqs, *pending)
            pending = (outs, steps)
            if (self._waiting or not self._inbox.empty() or self._update_pending.is_set()
                    or all(seq.finish is not None for seq in seqs)):
                break
        self._take_chunk(seqs, *pending)
        self.stats["decode_seconds"] += time.perf_counter() - t0
        self._running = [seq for seq in seqs if seq.finish is None]

    def _take_chunk(self, seqs: list[_Seq], outs, steps) -> None:
        """One decode chunk's outputs to their sequences; finished ones retire."""
        o_t, o_lp, o_e, steps = jax.device_get((*outs, steps))
        n = int(steps)
        # a chained chunk that found every row already stopped (by a stop token) ran no step
        self.stats["decode_calls" if n else "decode_idle_calls"] += 1
        self.stats["decode_steps"] += n
        self.stats["decode_tokens"] += int((o_t >= 0).sum())
        o_t, o_lp, o_e = o_t[:, :n].tolist(), o_lp[:, :n].tolist(), o_e[:, :n].tolist()
        for r, seq in enumerate(seqs):
            if seq.finish is not None:  # retired in an earlier chunk of the chain
                continue
            for tok, lp, ent in zip(o_t[r], o_lp[r], o_e[r]):
                if tok < 0:
                    break
                seq.take(tok, lp, ent)
            if seq.finish is not None:
                self._retire(seq)

    def _retire(self, seq: _Seq) -> None:
        """A finished sequence: its computed blocks go into the prefix tree, its result to the
        caller."""
        if self.config.prefix_cache:
            self._tree.insert(seq.context()[:-1], seq.blocks)
        self._alloc.release(seq.blocks)
        seq.blocks = []
        self.stats["generated_tokens"] += len(seq.out_t)
        req = seq.req
        req.gens[seq.index] = Generation(seq.out_t, seq.out_lp, seq.out_e, seq.finish)
        req.n_left -= 1
        if req.n_left == 0:
            req.done.set()


def engine_from_checkpoint(spec: str, config: EngineConfig | None = None,
                           **overrides: Any) -> JaxEngine:
    from kat_jax.models.checkpoint import load_model

    model, _ = load_model(spec, **overrides)
    return JaxEngine(model, config)


def lower_engine_programs(model_cfg, config: EngineConfig | None = None, sharding=None,
                          prompt_tokens: int = 2048, param_shardings=None,
                          pool_sharding=None) -> dict[str, Any]:
    """JaxEngine's decode and prefill programs lowered for abstract inputs (nothing
    materialised), as the engine would run them with ``config`` on the device(s) of ``sharding``
    (e.g. one TPU device of an abstract topology: compile the result to check memory): decode
    of a full running batch (config.max_batch rows, block tables for the whole context, one
    chunk of config.chunk_steps steps), and prefill of one ``prompt_tokens`` prompt.
    A tensor-parallel replica (kat_jax.flow.placement.replica_targets): ``param_shardings``
    (one sharding per parameter, the model state's structure) and ``pool_sharding`` (the KV
    pool's), ``sharding`` then being the replica mesh's replicated sharding for the small
    inputs; the per-layer weight copies get the shardings the engine's slicing gives them (a
    compiled slicing program's output shardings). Returns {"decode": lowered, "prefill":
    lowered, "num_blocks", "pool_bytes"}."""
    from kat_jax.models.decoder import init_model

    config = config or EngineConfig()
    model = nnx.eval_shape(lambda: init_model(model_cfg, 0))
    graphdef, params = nnx.split(model)
    layer_graphdef = nnx.split(model.layers)[0]
    bs = config.block_size
    context = model_cfg.max_position_embeddings
    num_blocks = -(-(config.cache_tokens or max(context, 32768)) // bs) + 1

    def place(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    def pure(state):
        return jax.tree.map(place, state)

    def unstack(p):
        return nnx.merge(graphdef, p).unstacked_layer_states()

    layer_states = jax.eval_shape(unstack, params)
    pool = jax.eval_shape(lambda p: nnx.merge(graphdef, p).init_kv_pool(num_blocks, bs), params)
    if param_shardings is None:
        params, layer_states, pool = pure(params), pure(layer_states), pure(pool)
    else:
        def with_sharding(x, sh):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

        # param_shardings is a pure dict (the training sharding rules'): place the state's
        # leaves through its pure-dict view
        nnx.replace_by_pure_dict(params, jax.tree.map(
            with_sharding, nnx.to_pure_dict(params), param_shardings))
        layer_sh = jax.jit(unstack).lower(params).compile().output_shardings
        layer_states = jax.tree.map(with_sharding, layer_states, layer_sh)
        pool = jax.tree.map(lambda x: with_sharding(x, pool_sharding or sharding), pool)
    prefill, decode = engine_programs(graphdef, layer_graphdef, bs,
                                      resolve_engine_attention(config.attention))

    def arr(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    b, m = _pow2(config.max_batch), _pow2(-(-context // bs))
    f32, i32 = jnp.float32, jnp.int32
    dec = jax.jit(decode, donate_argnums=2, static_argnums=(14, 15)).lower(
        params, layer_states, pool, arr((b, m), i32), arr((b,), i32), arr((b,), i32),
        arr((b, 2), jnp.uint32), arr((b,), i32), arr((b,), i32), arr((b,), jnp.bool_),
        arr((b, 1), i32), arr((b,), f32), arr((b,), f32), arr((b,), i32), 0,
        config.chunk_steps)
    t = min(bucket_length(prompt_tokens), context)
    mp = _pow2(-(-t // bs))
    pre = jax.jit(prefill, donate_argnums=2, static_argnums=16).lower(
        params, layer_states, pool, arr((1, t), i32), arr((1, t), i32), arr((1, t), jnp.bool_),
        arr((1, mp), i32), arr((1,), i32), arr((1,), i32), arr((1,), i32), arr((1,), i32),
        arr((1, 2), jnp.uint32), arr((1,), i32), arr((1,), f32), arr((1,), f32), arr((1,), i32),
        0)
    pool_bytes = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
                     for x in jax.tree.leaves(pool))
    return {"decode": dec, "prefill": pre, "num_blocks": num_blocks, "pool_bytes": pool_bytes}
