"""The rollout record: one JSON line per trajectory, written by `kat-jax rollout`, read by
`kat-jax prune`, `kat-jax score` (its "id" and "tokens") and the rft / rl data sources.

Fields (L = len(tokens); "per token" means a list of exactly L values):

  id            any JSON value. The trajectory's name in errors and outputs; required by prune
                (its output is keyed by id). The rollout writer uses "TASK_ID#SAMPLE".
  group         any JSON value (optional). Trajectories with equal groups share a prompt: one
                prefix tree and one GRPO advantage group. The rollout writer uses the task id.
  tokens        list of ints >= 0 (required; training needs >= 2). The exact ids: prompt, generated
                tokens and appended tool results, never a re-tokenisation.
  logprobs      per token: float <= 0 or null. Behaviour log-prob of each generated token under the
                sampling policy; null where the token was not generated (prompt, tool results),
                and such tokens are not trainable. Required for training.
  old_logprobs  per token: float <= 0 or null (optional). Old-policy log-probs, e.g. recomputed by
                the trainer's policy before an update (the PPO ratio's denominator); set wherever
                "logprobs" is (a generated token).
  ref_logprobs  per token: float <= 0 or null (optional). Reference-model log-probs (the KL term);
                set wherever "logprobs" is.
  entropies     per token: float >= 0 or null (optional; required by prune unless it computes
                them). Entropy of the distribution each token was sampled from; null where not
                sampled.
  tags          per token: null or a tag name of kat_jax.trees.trajectory.TAGS ("tool_call",
                "tool_result", "memory") (optional).
  reward        finite number (optional). The episode's reward.
  advantage     finite number (optional). Given, it replaces the group-computed advantage.
                Training needs "reward" or "advantage" unless status is "env_error".
  status        string (optional); the writer's: "ok", "max_turns", "max_tokens" (the episode's
                token budget ran out), "context_limit" (the model's context ran out: the prompt
                alone did not fit, or no room was left for another turn), "timeout",
                "env_error". "env_error" trajectories (a broken environment, not the policy's fault) are
                excluded from training and counted; the others are trained on with their reward
                (context_limit and max_tokens are truncated episodes, the policy's own doing).
  teacher       bool (optional). A ground-truth trajectory (RFT): it shapes its group's
                advantages but is not itself trained on.
  task_id       any JSON value (optional): the environment task.
  passed        bool (optional): the task's success test passed.
  turns         int >= 0 (optional): assistant turns taken.
  tool_calls    int >= 0 (optional): tool calls run.
  error         string (optional): why the episode ended as it did (env_error: what broke;
                context_limit: the engine's refusal of a request too long for its context).
  prompt_tokens int (optional): the length of a prompt that did not fit the context (status
                context_limit; "tokens" then holds its first context tokens).

Other keys are kept and ignored. Every per-token value is finite (NaN and infinities are errors).
validate_rollout raises a ValueError that starts with `where` (file:line) and names the trajectory
and the field.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from typing import Any

import numpy as np

from kat_jax.atomic_io import write_jsonl_atomic
from kat_jax.jsonl import read_jsonl
from kat_jax.trees.trajectory import TAGS

# Per-token float fields: (what one value is, the rule, a check of the rule).
PER_TOKEN_FLOATS = {
    "logprobs": ("log-prob", "<= 0", lambda x: x <= 0),
    "old_logprobs": ("old-policy log-prob", "<= 0", lambda x: x <= 0),
    "ref_logprobs": ("reference log-prob", "<= 0", lambda x: x <= 0),
    "entropies": ("entropy", ">= 0", lambda x: x >= 0),
}
STATUSES = ("ok", "max_turns", "max_tokens", "context_limit", "timeout", "env_error")
# What `require` may name: a field, or "outcome" (reward or advantage, unless status is env_error).
FOR_TRAINING = ("logprobs", "outcome")
FOR_PRUNING = ("id", "entropies")
WRITTEN = ("id", "logprobs", "entropies", "outcome")  # what the rollout writer always writes


class RolloutError(ValueError):
    """A bad rollout record; `field` names the offending key and `missing` says it was absent."""

    def __init__(self, msg: str, field: str | None = None, missing: bool = False):
        super().__init__(msg)
        self.field = field
        self.missing = missing


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_rollout(obj: Any, where: str, require: Collection[str] = FOR_TRAINING,
                     min_tokens: int = 2) -> None:
    """Check one record against the schema above; `require` lists fields that must be present
    (null counts as absent), "outcome" meaning reward or advantage. Errors start with `where`."""
    if not isinstance(obj, dict):
        raise RolloutError(f"{where}: expected a JSON object")
    prefix = f"{where}: trajectory {obj['id']!r}: " if "id" in obj else f"{where}: "

    def bad(field: str, msg: str, missing: bool = False) -> RolloutError:
        return RolloutError(prefix + msg, field, missing)

    if "id" in require and "id" not in obj:
        raise bad("id", "'id' is missing", missing=True)
    toks = obj.get("tokens")
    if not isinstance(toks, list) or len(toks) < min_tokens or not all(
            _is_int(t) and t >= 0 for t in toks):
        what = "non-empty list of" if min_tokens <= 1 else f"list of at least {min_tokens}"
        raise bad("tokens", f"'tokens' must be a {what} ids >= 0", missing=toks is None)
    n = len(toks)
    for key, (noun, rule, ok) in PER_TOKEN_FLOATS.items():
        values = obj.get(key)
        if values is None:
            if key in require:
                raise bad(key, f"'{key}' is missing (a list of {n} values: a {noun} per token, "
                          "null where not sampled)", missing=True)
            continue
        if not isinstance(values, list) or len(values) != n:
            raise bad(key, f"'{key}' must be a list of {n} values (one per token, null where not "
                      "sampled)")
        for j, x in enumerate(values):
            if x is not None and not (_is_number(x) and ok(x)):
                raise bad(key, f"'{key}': {noun} {x!r} at index {j} must be a finite number "
                          f"{rule} or null")
    generated = obj.get("logprobs")
    for key in ("old_logprobs", "ref_logprobs"):
        values = obj.get(key)
        if values is not None and isinstance(generated, list):
            for j, (g, x) in enumerate(zip(generated, values)):
                if g is not None and x is None:
                    raise bad(key, f"'{key}' is null at index {j}, a generated token (its "
                              "'logprobs' value is set): a loss would read it")
    tags = obj.get("tags")
    if tags is not None:
        if not isinstance(tags, list) or len(tags) != n:
            raise bad("tags", f"'tags' must be a list of {n} values (null or a tag name per token)")
        for j, tag in enumerate(tags):
            if tag is not None and (not isinstance(tag, str) or tag not in TAGS):
                raise bad("tags", f"'tags': unknown tag {tag!r} at index {j}; known: "
                          f"{sorted(TAGS)}")
    for key in ("reward", "advantage"):
        if obj.get(key) is not None and not _is_number(obj[key]):
            raise bad(key, f"'{key}' must be a finite number, got {obj[key]!r}")
    status = obj.get("status")
    if status is not None and not isinstance(status, str):
        raise bad("status", f"'status' must be a string (e.g. one of {list(STATUSES)}), got "
                  f"{status!r}")
    for key in ("teacher", "passed"):
        if obj.get(key) is not None and not isinstance(obj[key], bool):
            raise bad(key, f"'{key}' must be true or false, got {obj[key]!r}")
    for key in ("turns", "tool_calls"):
        if obj.get(key) is not None and not (_is_int(obj[key]) and obj[key] >= 0):
            raise bad(key, f"'{key}' must be an integer >= 0, got {obj[key]!r}")
    if "outcome" in require and obj.get("reward") is None and obj.get("advantage") is None \
            and status != "env_error":
        raise bad("reward", "a rollout needs 'reward' or 'advantage'", missing=True)


def read_rollouts(path: str, require: Collection[str] = FOR_TRAINING, min_tokens: int = 2
                  ) -> list[tuple[dict[str, Any], str]]:
    """(record, "path:line") per non-blank line, each validated (validate_rollout); an empty file
    is an error."""
    out = []
    for obj, where in read_jsonl(path):
        validate_rollout(obj, where, require, min_tokens)
        out.append((obj, where))
    if not out:
        raise ValueError(f"{path}: no rollouts")
    return out


def per_token_array(obj: dict[str, Any], key: str) -> np.ndarray | None:
    """float32[L] of a validated per-token float field (null -> 0); None when absent."""
    values = obj.get(key)
    if values is None:
        return None
    return np.asarray([0.0 if x is None else x for x in values], np.float32)


def tag_array(obj: dict[str, Any]) -> np.ndarray:
    """int32[L]: the TAGS bit of each token of a validated record (0 where null or no tags)."""
    out = np.zeros(len(obj["tokens"]), np.int32)
    for j, tag in enumerate(obj.get("tags") or []):
        if tag is not None:
            out[j] = TAGS[tag]
    return out


def rollout_record(id: Any, group: Any, tokens: list[int], logprobs: list[float | None],
                   entropies: list[float | None], tags: list[str | None], reward: float,
                   status: str = "ok", **extra: Any) -> dict[str, Any]:
    """One validated record (the written fields first, then `extra`: task_id, passed, turns,
    tool_calls, old_logprobs, ...). Floats are Python floats, so the line is plain JSON."""
    rec = {"id": id, "group": group, "tokens": [int(t) for t in tokens],
           "logprobs": [None if x is None else float(x) for x in logprobs],
           "entropies": [None if x is None else float(x) for x in entropies],
           "tags": list(tags), "reward": float(reward), "status": status, **extra}
    validate_rollout(rec, "rollout record", WRITTEN, min_tokens=1)
    return rec


def write_rollouts(path: str, records: Iterable[dict[str, Any]]) -> None:
    """Validate every record, then write them as JSONL atomically (whole or not at all)."""
    records = list(records)
    for i, rec in enumerate(records):
        validate_rollout(rec, f"{path}: record {i}", require=(), min_tokens=1)
    write_jsonl_atomic(path, records)
