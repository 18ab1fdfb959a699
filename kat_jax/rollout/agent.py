"""The multi-turn tool-calling agent loop, token in, token out.

    result = run_episode(engine, env, task, tokenizer, SamplingParams(...), max_turns=8)

The prompt is the environment's messages and tool schemas rendered in the Qwen format
(kat_jax.data.chat); the policy generates to the end of its turn (<|im_end|>); tool calls in the
Qwen format (<tool_call>{"name": ..., "arguments": {...}}</tool_call>, several per turn) are parsed
and run by the environment (concurrently); the results, the next assistant header and nothing else
are appended as ids (chat.continuation_segments). The trajectory holds the exact generated ids and
the exact ids of what was appended, never a re-tokenisation of generated text. A malformed call
(bad JSON, no name, an unclosed tag) goes back to the model as an error tool message.

The episode ends when the policy answers without a tool call, the environment is done (submit),
or at max_turns, max_tokens (the trajectory's length), the end of the model's context or the
timeout. Output: a rollout record (one JSONL line of `kat-jax rollout`,
kat_jax.data.records.rollout_record): tokens, per token logprobs / entropies (null where not
generated) and tags, reward, status (ok, max_turns, max_tokens, context_limit, timeout,
env_error), turns, tool calls.

The context: `engine.context_length` (None: unknown). The token budget is max_tokens, None meaning
the context (and no budget when the context is unknown); a budget larger than the context is
clamped to it, and each turn's max_new_tokens to what remains of the budget, so no request exceeds
the context. The episode ends with status context_limit when the context is what ran out: the
prompt alone leaves no room for a generated token, a turn is cut at the end of the context, the
tool results of a turn do not fit (they are then left out of the trace: the model never read
them), or the engine refuses a request for its length (ContextLengthError, e.g. a server whose
context was not given). Running out of a max_tokens below the context is max_tokens. Either way the
environment grades what was done, and the record's tokens never exceed the context (a prompt that
does not fit is cut at the context; the record's "prompt_tokens" says how long it was).
context_limit episodes are trained like max_tokens ones (a legitimate truncated episode, the
policy's own doing): only env_error is masked.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from typing import Any

from kat_jax.data.chat import continuation_segments, render_segments
from kat_jax.data.records import RolloutError, rollout_record
from kat_jax.rollout.sampler import ContextLengthError, SamplingParams
from kat_jax.trees.trajectory import TAGS

TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
TAG_NAMES = {v: k for k, v in TAGS.items()}


def parse_tool_calls(text: str, turn: int = 0) -> tuple[str, list[dict], list[dict]]:
    """(content before the first call, OpenAI-style calls, error tool messages for malformed ones)
    of one generated assistant turn (without <|im_end|>)."""
    calls: list[dict] = []
    errors: list[dict] = []
    first = text.find("<tool_call>")
    content = text if first < 0 else text[:first]
    if content.endswith("\n") and first >= 0:
        content = content[:-1]
    for i, m in enumerate(TOOL_CALL_RE.finditer(text)):
        call_id = f"call_{turn}_{i}"
        try:
            obj = json.loads(m.group(1).strip())
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                raise ValueError("expected {\"name\": ..., \"arguments\": {...}}")
            args = obj.get("arguments", {})
            if isinstance(args, str):
                json.loads(args)
                args_text = args
            elif isinstance(args, dict):
                args_text = json.dumps(args, ensure_ascii=False)
            else:
                raise ValueError("'arguments' must be an object")
        except (json.JSONDecodeError, ValueError) as e:
            errors.append({"role": "tool", "tool_call_id": call_id, "name": "invalid",
                           "content": f"Error: malformed tool call ({e}); write "
                                      "<tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>"})
            continue
        calls.append({"id": call_id, "type": "function",
                      "function": {"name": obj["name"], "arguments": args_text}})
    if text.count("<tool_call>") > text.count("</tool_call>"):
        errors.append({"role": "tool", "tool_call_id": f"call_{turn}_unclosed", "name": "invalid",
                       "content": "Error: malformed tool call (missing </tool_call>)"})
    return content, calls, errors


@dataclasses.dataclass
class Episode:
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float | None] = dataclasses.field(default_factory=list)
    entropies: list[float | None] = dataclasses.field(default_factory=list)
    tags: list[int] = dataclasses.field(default_factory=list)

    def add(self, tokenizer, text: str, tag: int = 0) -> None:
        ids = tokenizer.encode(text)
        self.tokens += ids
        self.logprobs += [None] * len(ids)
        self.entropies += [None] * len(ids)
        self.tags += [tag] * len(ids)

    def truncate(self, n: int) -> None:
        """Keep the first n tokens (and their per-token values)."""
        for values in (self.tokens, self.logprobs, self.entropies, self.tags):
            del values[n:]


def _generated_tags(ids: list[int], tokenizer) -> list[int]:
    """tool_call on every generated token from <tool_call> through </tool_call>."""
    try:
        open_id, close_id = tokenizer.special("<tool_call>"), tokenizer.special("</tool_call>")
    except KeyError:
        return [0] * len(ids)
    out, inside = [], False
    for t in ids:
        if t == open_id:
            inside = True
        out.append(TAGS["tool_call"] if inside else 0)
        if t == close_id:
            inside = False
    return out


def token_budget(max_tokens: int | None, context: int | None) -> int | None:
    """The episode's token limit: max_tokens clamped to the context; None means the context (no
    limit when both are None)."""
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None (the model's context), got {max_tokens}")
    if context is None or (max_tokens is not None and max_tokens < context):
        return max_tokens
    return context


def run_episode(engine, env, task, tokenizer, sp: SamplingParams, max_turns: int = 8,
                max_tokens: int | None = None, timeout_s: float | None = None, seed: int = 0,
                group: Any = None, sample: int = 0, turn_check=None,
                keep_messages: bool = False) -> dict[str, Any]:
    """One episode of `task` in `env` (reset here; closing it is the caller's), its rollout record
    (see the module docstring). max_tokens: the trajectory's token budget, None = the engine's
    context.

    turn_check(messages) -> str | None: called after every assistant turn that called tools (its
    results appended); a string stops the episode there (supervision during generation, e.g. RFT's
    divergence from the teachers): the record gets "terminated": {"turn", "reason"} and the
    environment grades what was done. keep_messages: the record also holds the conversation
    ("messages")."""
    start_time = time.monotonic()
    context = getattr(engine, "context_length", None)
    limit = token_budget(max_tokens, context)
    messages, tools = env.reset(task)
    ep = Episode()
    for text, _role, _train, tag in render_segments(messages, tools, add_generation_prompt=True):
        ep.add(tokenizer, text, tag)
    extra: dict[str, Any] = {}
    im_end = tokenizer.special("<|im_end|>")
    status, turns, n_calls = "ok", 0, 0

    def out_of_room() -> str:
        return "context_limit" if context is not None and len(ep.tokens) >= context else "max_tokens"

    if context is not None and len(ep.tokens) > context:  # the prompt alone does not fit
        extra["prompt_tokens"] = len(ep.tokens)
        ep.truncate(context)
    while True:
        if turns >= max_turns:
            status = "max_turns"
            break
        room = None if limit is None else limit - len(ep.tokens)
        if room is not None and room <= 0:
            status = out_of_room()
            break
        if timeout_s is not None and time.monotonic() - start_time > timeout_s:
            status = "timeout"
            break
        new_tokens = sp.max_new_tokens if room is None else min(sp.max_new_tokens, room)
        params = dataclasses.replace(sp, max_new_tokens=new_tokens,
                                     stop_tokens=tuple(sorted({*sp.stop_tokens, im_end})))
        turn_seed = (seed * 1_000_003 + sample * 10_007 + turns) % (2**31)
        try:
            gen = engine.generate([ep.tokens], params, n=1, seeds=[turn_seed])[0][0]
        except ContextLengthError as e:  # the engine's own limit (e.g. a server's)
            status, extra["error"] = "context_limit", str(e)
            break
        ep.tokens += gen.tokens
        ep.logprobs += gen.logprobs
        ep.entropies += gen.entropies
        ep.tags += _generated_tags(gen.tokens, tokenizer)
        turns += 1
        ids = gen.tokens[:-1] if gen.tokens and gen.tokens[-1] == im_end else gen.tokens
        content, calls, errors = parse_tool_calls(tokenizer.decode(ids), turns)
        messages.append({"role": "assistant", "content": content or None,
                         **({"tool_calls": calls} if calls else {})})
        if gen.finish_reason != "stop":
            status = out_of_room()
            break
        if not calls and not errors:
            break  # a final answer
        results = env.step(calls) if calls else []
        n_calls += len(calls)
        results = results + errors
        messages.extend(results)
        generated = len(ep.tokens)
        for text, _role, _train, tag in continuation_segments(results):
            ep.add(tokenizer, text, tag)
        if context is not None and len(ep.tokens) > context:
            ep.truncate(generated)  # results the model will never read stay out of the trace
            status = "ok" if getattr(env, "done", False) else "context_limit"
            break
        if getattr(env, "done", False):
            break
        if turn_check is not None:
            reason = turn_check(messages)
            if reason:
                extra["terminated"] = {"turn": turns, "reason": str(reason)}
                break
    result = env.evaluate(messages)
    if getattr(result, "status", None) is not None and str(getattr(result.status, "value",
                                                                   result.status)) == "env_error":
        status = "env_error"
    rid, gid = f"{task.id}#{sample}", group if group is not None else task.id
    tags = [TAG_NAMES.get(t) if t else None for t in ep.tags]
    extra.update(task_id=task.id, turns=turns, tool_calls=n_calls, passed=bool(result.passed))
    if keep_messages:
        extra["messages"] = messages
    try:
        return rollout_record(rid, gid, ep.tokens, ep.logprobs, ep.entropies, tags,
                              float(result.reward), status, **extra)
    except RolloutError as e:
        # A broken environment or server (a NaN reward, a non-finite log-prob): the episode is
        # kept as env_error (excluded from training, counted), with the values that broke it
        # nulled and the reason in "error"; one bad episode never aborts the job.
        ok = lambda x, rule: x if x is not None and math.isfinite(x) and rule(x) else None
        return rollout_record(rid, gid, ep.tokens, [ok(x, lambda v: v <= 0) for x in ep.logprobs],
                              [ok(x, lambda v: v >= 0) for x in ep.entropies], tags, 0.0,
                              "env_error", **{**extra, "error": str(e)})
