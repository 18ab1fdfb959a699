"""Policy engines: one interface, three implementations.

    engine.generate(prompts: list[list[int]], params: SamplingParams, n=1, seeds=None)
        -> list (per prompt) of list (n samples) of Generation(tokens, logprobs, entropies,
           finish_reason)
    engine.update_weights(params)
    engine.context_length   # int: prompt + max_new_tokens may not exceed it; None: unknown

A request that does not fit the context raises kat_jax.rollout.sampler.ContextLengthError (the
agent loop makes it the episode's status, context_limit).

  JaxEngine       (kat_jax.rollout.sampler) the built-in sampler: paged KV cache with a prefix
                  tree, continuous batching of concurrent calls (needs no wrapper).
  BatchingEngine  wraps an engine that serves one call at a time: concurrent generate calls
                  (many episodes at once) are merged into one batch per round, so sandbox
                  latency overlaps generation.
  OpenAIEngine    a client of OpenAI-compatible /v1/completions servers that take prompts as token
                  ids and return token ids and log-probs (`kat-jax serve`, vLLM, sglang-jax).
"""

from __future__ import annotations

import dataclasses
import json
import queue
import re
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kat_jax.rollout.sampler import ContextLengthError, Generation, SamplingParams

# What servers say when a request does not fit the model (kat-jax serve: "... exceeds
# max_position_embeddings N"; vLLM: "This model's maximum context length is N tokens ...").
CONTEXT_REFUSAL = re.compile(r"max_position_embeddings|context length", re.I)


@dataclasses.dataclass
class _Request:
    prompts: list[list[int]]
    params: SamplingParams
    n: int
    seeds: list[int] | None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class BatchingEngine:
    """Merges concurrent generate calls with equal sampling parameters (seeds may differ) and
    equal n into one call of the wrapped engine; waits up to wait_s for company. When a merged
    call does not fit the context (ContextLengthError), each request is retried alone, so only the
    requests that do not fit get the error."""

    def __init__(self, engine, max_prompts: int = 64, wait_s: float = 0.005):
        self.engine, self.max_prompts, self.wait_s = engine, max_prompts, wait_s
        self._queue: queue.Queue[_Request] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="batching-engine")
        self._thread.start()
        self.batches = 0

    @property
    def stats(self) -> dict:
        return getattr(self.engine, "stats", {})

    @property
    def context_length(self) -> int | None:
        """The wrapped engine's context (None when it does not know it)."""
        return getattr(self.engine, "context_length", None)

    def update_weights(self, params) -> None:
        self.engine.update_weights(params)

    def generate(self, prompts, params: SamplingParams, n: int = 1, seeds=None):
        req = _Request([list(p) for p in prompts], params, n, None if seeds is None else list(seeds))
        self._queue.put(req)
        req.done.wait()
        if req.error is not None:
            raise req.error
        return req.result

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            batch = [first]
            deadline = self.wait_s
            while sum(len(r.prompts) for r in batch) < self.max_prompts:
                try:
                    batch.append(self._queue.get(timeout=deadline))
                except queue.Empty:
                    break
            groups: dict[tuple, list[_Request]] = {}
            for r in batch:
                key = (dataclasses.replace(r.params, seed=0), r.n)
                groups.setdefault(key, []).append(r)
            for (params, n), reqs in groups.items():
                try:
                    self._run(reqs, params, n)
                except ContextLengthError as e:
                    if len(reqs) == 1:
                        reqs[0].error = e
                    else:  # retried one by one: only the requests that do not fit fail
                        for r in reqs:
                            self._run_or_fail([r], params, n)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    for r in reqs:
                        r.error = e
                for r in reqs:
                    r.done.set()

    def _run_or_fail(self, reqs: list[_Request], params: SamplingParams, n: int) -> None:
        try:
            self._run(reqs, params, n)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            for r in reqs:
                r.error = e

    def _run(self, reqs: list[_Request], params: SamplingParams, n: int) -> None:
        """One call of the wrapped engine for reqs; their results are set (errors propagate)."""
        prompts = [p for r in reqs for p in r.prompts]
        seeds = [s for r in reqs for s in (r.seeds or [r.params.seed] * len(r.prompts))]
        out = self.engine.generate(prompts, params, n=n, seeds=seeds)
        self.batches += 1
        i = 0
        for r in reqs:
            r.result = out[i:i + len(r.prompts)]
            i += len(r.prompts)


class OpenAIEngine:
    """Client of an OpenAI-compatible completions server that accepts token-id prompts and returns
    token ids (`choices[i].token_ids`, or logprobs.tokens as "token_id:N" strings as vLLM does with
    return_tokens_as_token_ids) and log-probs. Entropies are read from logprobs.entropies when the
    server sends them (kat-jax serve does), else null.

    context_length: the served model's context, when known (the agent loop then clamps each
    turn to it); None: unknown. Either way, a server's HTTP 400 refusing a request for its length
    (a message naming max_position_embeddings or the context length, as kat-jax serve and vLLM
    send) raises ContextLengthError."""

    def __init__(self, base_url: str, model: str = "kat_jax", timeout_s: float = 600.0,
                 max_concurrency: int = 16, context_length: int | None = None):
        if context_length is not None and context_length < 1:
            raise ValueError(f"OpenAIEngine: context_length must be >= 1 or None, got "
                             f"{context_length}")
        self.base_url = base_url.rstrip("/")
        self.model, self.timeout_s = model, timeout_s
        self.context_length = context_length
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency)

    def update_weights(self, params) -> None:
        raise NotImplementedError("OpenAIEngine: weights live in the server; restart or reload it "
                                  "with the new checkpoint")

    def _post(self, body: dict) -> dict:
        req = urllib.request.Request(f"{self.base_url}/v1/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            msg = f"{self.base_url}: HTTP {e.code}: {e.read()[:500]!r}"
            if e.code == 400 and CONTEXT_REFUSAL.search(msg):
                raise ContextLengthError(msg) from None
            raise RuntimeError(msg) from None

    def _one(self, prompt: list[int], sp: SamplingParams, n: int, seed: int) -> list[Generation]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": sp.max_new_tokens,
                "temperature": sp.temperature, "top_p": sp.top_p, "n": n, "seed": seed,
                "logprobs": 1, "stop_token_ids": list(sp.stop_tokens),
                "return_tokens_as_token_ids": True, "skip_special_tokens": False}
        if sp.top_k:
            body["top_k"] = sp.top_k
        out = self._post(body)
        gens = []
        for ch in sorted(out["choices"], key=lambda c: c.get("index", 0)):
            lp = ch.get("logprobs") or {}
            ids = ch.get("token_ids")
            if ids is None:
                ids = [int(str(t).split(":", 1)[1]) for t in lp.get("tokens", [])]
            lps = lp.get("token_logprobs") or [None] * len(ids)
            ents = lp.get("entropies") or [None] * len(ids)
            gens.append(Generation(list(ids), list(lps), list(ents),
                                   "stop" if ch.get("finish_reason") == "stop" else "length"))
        return gens

    def generate(self, prompts, params: SamplingParams, n: int = 1, seeds=None):
        seeds = [params.seed] * len(prompts) if seeds is None else list(seeds)
        futs = [self._pool.submit(self._one, list(p), params, n, s) for p, s in zip(prompts, seeds)]
        return [f.result() for f in futs]
