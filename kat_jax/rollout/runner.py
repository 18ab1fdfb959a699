"""`kat-jax rollout`: G samples per task of an environment, episodes run concurrently, one JSONL
line per trajectory (what `kat-jax prune`, `kat-jax score` and offline RFT / RL training read).

Line: a rollout record (kat_jax.data.records): {"id", "group" (the task), "task_id", "tokens",
"logprobs" and "entropies" (per token, null where not generated), "tags" (per token: null,
"tool_call" or "tool_result"), "reward", "status", "passed", "turns", "tool_calls"}. The output
is written atomically at the end; the last stdout line is a JSON summary (success rate, mean
reward, mean turns, tool calls per turn, statuses, the model's context and the token budget used,
and the sampler's work: prefill_tokens vs distinct_tokens (the prefix cache's saving),
cached_tokens, generated_tokens, decode_tokens_per_s).

The token budget (max_tokens) defaults to the checkpoint's context and is clamped to it; an episode
that runs out of context is recorded with status context_limit (kat_jax.rollout.agent), so one long
episode never fails the job.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kat_jax.atomic_io import check_output_file
from kat_jax.data.records import write_rollouts


def env_tasks(env_name: str, tasks_file: str | None):
    """The tasks of a registered environment (kat_jax.envs.registry) from `tasks_file` (None: its
    bundled ones)."""
    from kat_jax.envs import ENVS, load_env_tasks

    if env_name not in ENVS:
        raise ValueError(f"--env: unknown environment {env_name!r}; known: {sorted(ENVS)}")
    return load_env_tasks(env_name, tasks_file)


def tokenizer_for_checkpoint(spec: str, tokenizer: str | None = None):
    from kat_jax import storage
    from kat_jax.data.tokenizer import ByteTokenizer, load_tokenizer
    from kat_jax.models.checkpoint import resolve_checkpoint_dir

    if tokenizer:
        return load_tokenizer(tokenizer)
    path = resolve_checkpoint_dir(spec)
    if not spec.startswith("preset:") and storage.isfile(os.path.join(path, "tokenizer.json")):
        return load_tokenizer(path)
    return ByteTokenizer()


def run_rollouts(engine, env_name: str, tasks, tokenizer, samples_per_task: int, sp,
                 max_turns: int = 8, max_tokens: int | None = None,
                 timeout_s: float | None = None, concurrency: int = 8, seed: int = 0,
                 progress: bool = True, env_kwargs: dict[str, Any] | None = None
                 ) -> list[dict[str, Any]]:
    """One record per (task, sample) (run_episode); ``max_tokens``: the token budget of each
    episode, None = the engine's context (a larger one is clamped to it); ``env_kwargs`` go to
    ``make_env`` (e.g. a SWE ``backend``)."""
    from tqdm import tqdm

    from kat_jax.envs import make_env
    from kat_jax.rollout.agent import run_episode, token_budget

    token_budget(max_tokens, engine.context_length)  # a bad budget fails before any episode
    jobs = [(t, s) for t in tasks for s in range(samples_per_task)]

    def one(job):
        task, sample = job
        env = make_env(env_name, **(env_kwargs or {}))
        try:
            return run_episode(engine, env, task, tokenizer, sp, max_turns=max_turns,
                               max_tokens=max_tokens, timeout_s=timeout_s, seed=seed,
                               sample=sample)
        finally:
            env.close()

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as ex:
        return list(tqdm(ex.map(one, jobs), total=len(jobs), desc=f"rollout {env_name}",
                         disable=not progress))


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(records)
    turns = sum(r["turns"] for r in records)
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return {"trajectories": n, "success_rate": sum(r["passed"] for r in records) / max(n, 1),
            "mean_reward": sum(r["reward"] for r in records) / max(n, 1),
            "mean_turns": turns / max(n, 1),
            "tool_calls_per_turn": sum(r["tool_calls"] for r in records) / max(turns, 1),
            "statuses": statuses}


def distinct_tokens(records: list[dict[str, Any]]) -> int:
    """Tokens of the records' prefix trie: each shared prefix counted once (what an ideal prefix
    cache would prefill, give or take the generated tokens it never feeds)."""
    nodes: dict[tuple[int, int], int] = {}
    for r in records:
        node = 0
        for t in r["tokens"]:
            node = nodes.setdefault((node, t), len(nodes) + 1)
    return len(nodes)


def sampling_summary(stats: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The sampler's work: tokens prefilled vs the distinct tokens of the trajectories, tokens
    taken from the prefix cache, generated tokens and decode tokens/s (decode chunks only)."""
    distinct = distinct_tokens(records)
    prefill = stats.get("prefill_tokens", 0)
    seconds = stats.get("decode_seconds", 0.0)
    return {"prefill_tokens": prefill, "distinct_tokens": distinct,
            "prefill_over_distinct": round(prefill / max(distinct, 1), 3),
            "cached_tokens": stats.get("cached_tokens"),
            "generated_tokens": stats.get("generated_tokens"),
            "decode_tokens_per_s": round(stats.get("decode_tokens", 0) / seconds, 1)
            if seconds else None}


def run_rollout_cmd(checkpoint: str, env_name: str, output: str, tasks_file: str | None = None,
                    samples_per_task: int = 4, temperature: float = 1.0, seed: int = 0,
                    max_turns: int = 8, max_tokens: int | None = None,
                    max_new_tokens: int = 512,
                    concurrency: int = 8, max_tasks: int | None = None,
                    tokenizer: str | None = None,
                    env_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    from kat_jax.rollout.agent import token_budget
    from kat_jax.rollout.sampler import SamplingParams, engine_from_checkpoint

    check_output_file(output)
    tasks = env_tasks(env_name, tasks_file)
    if max_tasks is not None:
        tasks = tasks[:max_tasks]
    tok = tokenizer_for_checkpoint(checkpoint, tokenizer)
    engine = engine_from_checkpoint(checkpoint)  # batches the concurrent episodes continuously
    sp = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    records = run_rollouts(engine, env_name, tasks, tok, samples_per_task, sp, max_turns,
                           max_tokens, concurrency=concurrency, seed=seed, env_kwargs=env_kwargs)
    write_rollouts(output, records)
    return {**summarize(records), "output": output, "context": engine.context_length,
            "max_tokens": token_budget(max_tokens, engine.context_length),
            **sampling_summary(engine.stats, records)}
