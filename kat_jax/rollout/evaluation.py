"""`kat-jax eval`: K samples of the agent per task, scored as pass@k.

pass@k is the unbiased estimator of Chen et al. 2021 (the Codex paper): from n samples of a task,
c of them correct, the probability that at least one of k samples drawn without replacement is
correct, 1 - C(n-c, k) / C(n, k), averaged over the tasks. It is computed as the product
1 - prod_{i=n-c+1}^{n} (1 - k/i) (no large binomials; exact up to float rounding), and is 1 when
n - c < k.

Reported k: the powers of two up to the samples per task K (1, 2, 4, ...); K itself only when it
is a power of two (with K = 6: pass@1, pass@2, pass@4). pass@1 is the mean success rate.

The output, E.json (written atomically): "pass@1", "pass@2", ... as top-level keys, "n_tasks",
"samples_per_task", "mean_reward", "mean_turns" and "mean_tool_calls" (per trajectory),
"parallel_tool_calls_per_turn" (below), "statuses" (trajectories per episode status), and "tasks":
[{"id", "n", "correct"}]; run_eval adds the run's settings (env, split, checkpoint, temperature,
seed, ...). Beside it, E.md: a markdown table (metric | value), then one row per task.

parallel_tool_calls_per_turn: the tool calls the environment ran (the records' "tool_calls")
divided by the assistant turns whose tool results were appended to the trajectory (each such
turn is one run of "tool_result"-tagged tokens in the record), over all trajectories; null when
no turn called a tool. 1.0 means one call per calling turn; above 1, the policy calls tools in
parallel. A turn whose calls were all malformed counts as a calling turn with no call (its error
messages are tool results); a turn whose results did not fit in the context is not counted.
"""

from __future__ import annotations

import json
import os
from typing import Any

from kat_jax import storage
from kat_jax.atomic_io import atomic_file, check_output_file


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one task with n samples, c correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def reported_ks(samples_per_task: int) -> list[int]:
    """1, 2, 4, ... up to samples_per_task (powers of two only)."""
    if samples_per_task < 1:
        raise ValueError(f"--samples-per-task must be >= 1, got {samples_per_task}")
    ks, k = [], 1
    while k <= samples_per_task:
        ks.append(k)
        k *= 2
    return ks


def calling_turns(record: dict[str, Any]) -> int:
    """Assistant turns of a record whose tool results are in its trajectory: the runs of
    "tool_result"-tagged tokens (a turn's results are one run, between its call and the next
    assistant header)."""
    runs, inside = 0, False
    for tag in record.get("tags") or ():
        now = tag == "tool_result"
        runs += now and not inside
        inside = now
    return runs


def evaluate_records(records: list[dict[str, Any]], samples_per_task: int) -> dict[str, Any]:
    """The metrics of the module docstring from rollout records (``task_id`` or else ``group``,
    ``passed``, ``reward``, ``turns``, ``tool_calls``, ``status``, ``tags``); tasks in the order
    of their first record. Every task must have samples_per_task records (a ValueError names the
    first that does not)."""
    ks = reported_ks(samples_per_task)
    tasks: dict[Any, dict[str, Any]] = {}
    statuses: dict[str, int] = {}
    for r in records:
        tid = r.get("task_id", r.get("group"))
        t = tasks.setdefault(tid, {"id": tid, "n": 0, "correct": 0})
        t["n"] += 1
        t["correct"] += bool(r["passed"])
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    for t in tasks.values():
        if t["n"] != samples_per_task:
            raise ValueError(f"task {t['id']!r}: {t['n']} records, expected {samples_per_task}")
    n = len(records)
    calls = sum(r["tool_calls"] for r in records)
    turns_with_calls = sum(calling_turns(r) for r in records)
    out: dict[str, Any] = {
        f"pass@{k}": (sum(pass_at_k(t["n"], t["correct"], k) for t in tasks.values())
                      / max(len(tasks), 1)) for k in ks}
    out.update(
        n_tasks=len(tasks), samples_per_task=samples_per_task,
        mean_reward=sum(r["reward"] for r in records) / max(n, 1),
        mean_turns=sum(r["turns"] for r in records) / max(n, 1),
        mean_tool_calls=calls / max(n, 1),
        parallel_tool_calls_per_turn=calls / turns_with_calls if turns_with_calls else None,
        statuses=statuses, tasks=list(tasks.values()))
    return out


def markdown_report(result: dict[str, Any]) -> str:
    """E.md: a metric | value table (every scalar of `result`), then task | n | correct."""
    def cell(v: Any) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.4f}"
        if isinstance(v, dict):
            return ", ".join(f"{k}: {x}" for k, x in v.items()) or "-"
        return str(v)

    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {cell(v)} |" for k, v in result.items() if k != "tasks"]
    lines += ["", "| task | n | correct |", "| --- | --- | --- |"]
    lines += [f"| {t['id']} | {t['n']} | {t['correct']} |" for t in result.get("tasks", [])]
    return "\n".join(lines) + "\n"


def markdown_path(output: str) -> str:
    """E.md beside E.json (the .json suffix replaced; other names get .md appended)."""
    root, ext = os.path.splitext(output)
    return (root if ext == ".json" else output) + ".md"


def eval_tasks(env_name: str, tasks_file: str | None, split: str | None):
    """The tasks to evaluate. split: "train" / "test" (an environment with a split), "all" or None
    (every task; None means "test" for an environment with a split)."""
    from kat_jax.envs.registry import ENVS, has_split, load_env_tasks

    if env_name not in ENVS:
        raise ValueError(f"--env: unknown environment {env_name!r}; known: {sorted(ENVS)}")
    if tasks_file is not None and not storage.isfile(tasks_file):
        raise FileNotFoundError(f"--tasks: {tasks_file}: no such file")
    if split is None:
        split = "test" if has_split(env_name) else "all"
    if split not in ("train", "test", "all"):
        raise ValueError(f"--split must be train, test or all, got {split!r}")
    if split != "all" and not has_split(env_name):
        raise ValueError(f"--split {split}: environment {env_name!r} has no train/test split; "
                         "use --split all (or leave it out)")
    return load_env_tasks(env_name, tasks_file, None if split == "all" else split), split


def run_eval(checkpoint: str, env_name: str, output: str, tasks_file: str | None = None,
             split: str | None = None, samples_per_task: int = 4, temperature: float = 1.0,
             seed: int = 0, max_turns: int = 8, max_tokens: int | None = None,
             max_new_tokens: int = 512, concurrency: int = 8, max_tasks: int | None = None,
             tokenizer: str | None = None) -> dict[str, Any]:
    """Run the agent samples_per_task times on each task (kat_jax.rollout.runner.run_rollouts,
    the in-process sampler), write E.json and E.md atomically; returns the summary (E.json
    without the per-task list, plus the output paths)."""
    from kat_jax.rollout.agent import token_budget
    from kat_jax.rollout.runner import run_rollouts, tokenizer_for_checkpoint
    from kat_jax.rollout.sampler import SamplingParams, engine_from_checkpoint

    reported_ks(samples_per_task)  # K < 1 fails before any work
    if max_tasks is not None and max_tasks < 1:
        raise ValueError(f"--max-tasks must be >= 1, got {max_tasks}")
    md = markdown_path(output)
    check_output_file(output)
    check_output_file(md)
    tasks, split = eval_tasks(env_name, tasks_file, split)
    if max_tasks is not None:
        tasks = tasks[:max_tasks]
    if not tasks:
        raise ValueError(f"--env {env_name}: no tasks in split {split!r}")
    tok = tokenizer_for_checkpoint(checkpoint, tokenizer)
    engine = engine_from_checkpoint(checkpoint)
    sp = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    records = run_rollouts(engine, env_name, tasks, tok, samples_per_task, sp, max_turns,
                           max_tokens, concurrency=concurrency, seed=seed)
    metrics = evaluate_records(records, samples_per_task)
    per_task = metrics.pop("tasks")
    result = {**metrics, "env": env_name, "split": split, "tasks_file": tasks_file,
              "checkpoint": checkpoint, "temperature": temperature, "seed": seed,
              "max_turns": max_turns, "max_new_tokens": max_new_tokens,
              "max_tokens": token_budget(max_tokens, engine.context_length), "tasks": per_task}
    with atomic_file(md) as f:
        f.write(markdown_report(result))
    with atomic_file(output) as f:
        f.write(json.dumps(result, indent=1) + "\n")
    return {k: v for k, v in result.items() if k != "tasks"} | {"output": output, "markdown": md}
