"""Sampling with a KV cache: a group's prompt is prefilled once, its cache shared by its samples.

    engine = JaxEngine(model)
    out = engine.generate([prompt_ids], SamplingParams(temperature=1.0, max_new_tokens=64,
                          stop_tokens=(im_end,), seed=0), n=8)   # out[0]: 8 Generations

Per generated token: its log-prob and the entropy of the distribution it was actually sampled from
(logits / temperature, restricted by top-k and top-p, renormalised). With temperature 1 and no
top-k / top-p that is exactly what `kat-jax score` computes for the same tokens (tested to 1e-4 in
float32), so rollout and trainer see the same numbers. Greedy (temperature 0) picks the argmax and
reports the log-prob and entropy of the untempered distribution (temperature 1).

Determinism: each sample has its own key, fold_in(key(seed), prompt index * n + sample index), folded
again with the step; the same seed gives the same tokens whatever else is in the batch.

Shapes are bucketed (prompt length and cache length to 2^k or 1.5 * 2^k, capped at the context;
batch to a power of two), so a run compiles a handful of programs. Weights are a jit argument:
update_weights swaps them without recompiling.

Context: `engine.context_length` is the model's max_position_embeddings; a call whose longest
prompt + max_new_tokens exceeds it raises ContextLengthError (a ValueError), before any compute.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class JaxEngine:
    """The built-in policy engine (see the module docstring). Thread-safe: concurrent generate
    calls run one at a time (use kat_jax.rollout.engine.BatchingEngine to merge them)."""

    def __init__(self, model):
        self.graphdef, self.params = nnx.split(model)
        self.cfg = model.cfg
        self.stats = {"prefill_tokens": 0, "decode_steps": 0, "generated_tokens": 0,
                      "prefill_calls": 0}
        self._lock = threading.Lock()
        graphdef = self.graphdef

        def head_logits(m, h):
            return m.logits(h)

        def prefill(params, tokens, lengths, cache_len):
            m = nnx.merge(graphdef, params)
            b, t = tokens.shape
            cache = m.init_cache(b, cache_len)
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            hidden, cache = m.decode(tokens, positions, cache, jnp.zeros(b, jnp.int32))
            last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
            return head_logits(m, last), cache

        def first(logits, rows, keys, temperature, top_p, top_k, k_bound):
            return sample_step(logits[rows], keys, jnp.int32(0), temperature, top_p, top_k,
                               k_bound)

        def step(params, cache, tokens, start, keys, i, temperature, top_p, top_k, k_bound):
            m = nnx.merge(graphdef, params)
            hidden, cache = m.decode(tokens[:, None], start[:, None], cache, start)
            tok, lp, ent = sample_step(head_logits(m, hidden[:, 0]), keys, i, temperature, top_p,
                                       top_k, k_bound)
            return cache, tok, lp, ent

        self._prefill = jax.jit(prefill, static_argnums=3)
        self._first = jax.jit(first, static_argnums=6)
        self._step = jax.jit(step, donate_argnums=1, static_argnums=9)

    @property
    def context_length(self) -> int:
        """The model's context (max_position_embeddings): prompt + max_new_tokens may not exceed it."""
        return self.cfg.max_position_embeddings

    def update_weights(self, params) -> None:
        """New weights of the same structure (e.g. from the trainer): no recompilation."""
        with self._lock:
            self.params = params

    def generate(self, prompts: list[list[int]], params: SamplingParams, n: int = 1,
                 seeds: list[int] | None = None) -> list[list[Generation]]:
        """n samples for each prompt (prompt i's samples share one prefill). seeds: one per
        prompt (default params.seed for all; sample j of prompt i uses fold_in(seed_i, j))."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        vocab = self.cfg.vocab_size
        for p in prompts:
            if min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"generate: token ids must be in [0, {vocab})")
        with self._lock:
            return self._generate(prompts, params, n, seeds)

    def _generate(self, prompts, sp: SamplingParams, n, seeds):
        # unique prompts are prefilled once
        keys_of = [tuple(int(t) for t in p) for p in prompts]
        uniq: dict[tuple, int] = {}
        for key in keys_of:
            uniq.setdefault(key, len(uniq))
        u_list = list(uniq)
        lengths = np.array([len(p) for p in u_list], np.int32)
        need = int(lengths.max()) + sp.max_new_tokens
        if need > self.context_length:
            raise ContextLengthError(f"prompt + max_new_tokens = {need} exceeds "
                                     f"max_position_embeddings {self.context_length}")
        cache_len = min(bucket_length(need), self.context_length)
        p_len = min(bucket_length(int(lengths.max())), cache_len)
        u_pad = _pow2(len(u_list))
        toks = np.zeros((u_pad, p_len), np.int32)
        for i, p in enumerate(u_list):
            toks[i, :len(p)] = p
        lens = np.ones(u_pad, np.int32)
        lens[:len(u_list)] = lengths
        logits, cache = self._prefill(self.params, jnp.asarray(toks), jnp.asarray(lens), cache_len)
        self.stats["prefill_tokens"] += int(lengths.sum())
        self.stats["prefill_calls"] += 1
        # rows: prompt i, sample j -> its unique prompt's cache row
        rows = np.array([uniq[key] for key in keys_of for _ in range(n)], np.int32)
        b = len(rows)
        b_pad = _pow2(b)
        rows_pad = np.concatenate([rows, np.full(b_pad - b, rows[0], np.int32)])
        seeds = [sp.seed] * len(prompts) if seeds is None else list(seeds)
        keys = np.stack([jax.random.key_data(jax.random.fold_in(jax.random.key(seeds[i]), j))
                         for i in range(len(prompts)) for j in range(n)]
                        + [jax.random.key_data(jax.random.key(0))] * (b_pad - b))
        keys = jnp.asarray(keys)
        cache = jax.tree.map(lambda c: jnp.take(c, jnp.asarray(rows_pad), axis=1), cache)
        temp = jnp.float32(sp.temperature)
        top_p = jnp.float32(sp.top_p)
        top_k = jnp.int32(sp.top_k)
        k_bound = min(_pow2(sp.top_k), self.cfg.vocab_size) if sp.top_k else 0
        tok, lp, ent = self._first(logits, jnp.asarray(rows_pad), keys, temp, top_p, top_k, k_bound)
        start = lens[rows_pad].astype(np.int32)
        stop = set(int(s) for s in sp.stop_tokens)
        out_t, out_lp, out_e = [[] for _ in range(b)], [[] for _ in range(b)], [[] for _ in range(b)]
        done = np.zeros(b, bool)
        reason = ["length"] * b
        for i in range(sp.max_new_tokens):
            t_np, lp_np, e_np = jax.device_get((tok, lp, ent))
            for r in range(b):
                if done[r]:
                    continue
                out_t[r].append(int(t_np[r]))
                out_lp[r].append(float(lp_np[r]))
                out_e[r].append(float(e_np[r]))
                if int(t_np[r]) in stop:
                    done[r] = True
                    reason[r] = "stop"
            if done.all() or i == sp.max_new_tokens - 1:
                break
            cache, tok, lp, ent = self._step(self.params, cache, tok, jnp.asarray(start + i), keys,
                                             jnp.int32(i + 1), temp, top_p, top_k, k_bound)
            self.stats["decode_steps"] += 1
        self.stats["generated_tokens"] += sum(len(t) for t in out_t)
        gens = [Generation(out_t[r], out_lp[r], out_e[r], reason[r]) for r in range(b)]
        return [gens[i * n:(i + 1) * n] for i in range(len(prompts))]


def engine_from_checkpoint(spec: str, **overrides: Any) -> JaxEngine:
    from kat_jax.models.checkpoint import load_model

    model, _ = load_model(spec, **overrides)
    return JaxEngine(model)
