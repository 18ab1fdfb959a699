"""The one environment interface: tasks, episodes, tool calls (the registry of environments by
name is kat_jax.envs.registry).

An episode is driven by an agent loop (kat_jax.rollout, issue 6)::

    env = make_env("calculator")
    messages, tools = env.reset(task)          # chat messages + OpenAI function schemas
    while not done:
        reply = policy(messages, tools)        # assistant message, maybe with tool_calls
        results = env.step(reply["tool_calls"])  # one {"role": "tool", ...} message per call
    result = env.evaluate(messages)            # EvalResult(reward, passed, status, details)
    env.close()

Tool calls arrive in OpenAI style, ``{"id", "type": "function", "function": {"name", "arguments"}}``
with ``arguments`` a JSON string (a dict is accepted too). A malformed call or an unknown tool yields an
error tool-result message, never an exception. Several calls of one turn run concurrently.

Infrastructure failures (a sandbox that does not start, a grader that crashes) are reported with
``EpisodeStatus.ENV_ERROR`` so training masks the episode instead of rewarding it 0.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

Message = dict[str, Any]
ToolSchema = dict[str, Any]
ToolCall = dict[str, Any]


class EpisodeStatus(str, enum.Enum):
    """How an episode ended. Only ``ENV_ERROR`` is masked in training; the others are scored.

    ``MAX_TOKENS``: the episode's token budget ran out; ``CONTEXT_LIMIT``: the model's context ran
    out (the prompt alone does not fit, or no room is left for another turn); both are set by the
    agent loop (kat_jax.rollout.agent), never by an environment's ``evaluate``."""

    OK = "ok"
    MAX_TURNS = "max_turns"
    MAX_TOKENS = "max_tokens"
    CONTEXT_LIMIT = "context_limit"
    TIMEOUT = "timeout"
    ENV_ERROR = "env_error"


@dataclasses.dataclass
class Task:
    """One task: ``messages`` start the conversation; ``metadata`` holds what the env needs to grade."""

    id: str
    messages: list[Message]
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class EvalResult:
    """The grade of an episode. ``masked`` episodes (env_error) must not enter the loss."""

    reward: float
    passed: bool
    status: EpisodeStatus = EpisodeStatus.OK
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def masked(self) -> bool:
        return self.status == EpisodeStatus.ENV_ERROR


class EnvError(RuntimeError):
    """An infrastructure failure (not the agent's fault): the episode's status becomes env_error."""


def function_schema(name: str, description: str, properties: dict[str, Any],
                    required: Sequence[str] = ()) -> ToolSchema:
    """A tool in OpenAI function format: ``{"type": "function", "function": {name, ...}}``."""
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": list(required)}}}


def tool_message(call_id: str, name: str, content: str) -> Message:
    """A tool-result message answering the tool call ``call_id``."""
    return {"role": "tool", "tool_call_id": call_id, "name": name, "content": content}


def parse_tool_call(call: Any) -> tuple[str, str, dict[str, Any] | None, str | None]:
    """Splits an OpenAI tool call into ``(id, name, arguments, error)``; ``error`` is None when valid."""
    if not isinstance(call, dict):
        return "", "", None, f"tool call must be an object, got {type(call).__name__}"
    call_id = str(call.get("id") or "")
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        return call_id, "", None, "tool call has no function name"
    name, raw = fn["name"], fn.get("arguments", {})
    if raw is None or raw == "":
        raw = {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            return call_id, name, None, f"arguments are not valid JSON: {e}"
    if not isinstance(raw, dict):
        return call_id, name, None, "arguments must be a JSON object"
    return call_id, name, raw, None


ToolFn = Callable[[dict[str, Any]], str]


class Env:
    """Base class of environments. Subclasses implement ``reset``, ``evaluate`` and tool functions.

    ``step`` dispatches each tool call to ``self.tools()[name]`` (a function of the parsed arguments that
    returns the result text; a raised ``ValueError``/``TypeError``/``KeyError`` becomes an error
    message). An ``EnvError`` raised by a tool marks the episode env_error. One Env instance runs one
    episode at a time; run many episodes concurrently with many instances.
    """

    name: str = "base"
    max_parallel_tools: int = 8

    def __init__(self) -> None:
        self.status = EpisodeStatus.OK
        self.env_error: str | None = None
        self.done = False   # the env ended the episode (e.g. the agent called ``submit``)
        self._lock = threading.Lock()

    # -- to implement -------------------------------------------------------------------------
    def reset(self, task: Task) -> tuple[list[Message], list[ToolSchema]]:
        """Starts an episode on ``task``: returns the initial messages and the tool schemas."""
        raise NotImplementedError

    def tools(self) -> dict[str, ToolFn]:
        """Tool name -> implementation of the current episode."""
        return {}

    def evaluate(self, messages: Sequence[Message] = ()) -> EvalResult:
        """Grades the episode; ``messages`` is the whole conversation (the final answer is in it)."""
        raise NotImplementedError

    def close(self) -> None:
        """Releases the episode's resources; idempotent."""

    # -- shared -------------------------------------------------------------------------------
    def mark_env_error(self, reason: str) -> None:
        with self._lock:
            self.status = EpisodeStatus.ENV_ERROR
            self.env_error = self.env_error or reason

    def _run_one(self, call: Any) -> Message:
        call_id, name, args, err = parse_tool_call(call)
        if err is not None:
            return tool_message(call_id, name, f"Error: {err}")
        fn = self.tools().get(name)
        if fn is None:
            known = ", ".join(sorted(self.tools())) or "none"
            return tool_message(call_id, name, f"Error: unknown tool {name!r} (tools: {known})")
        try:
            return tool_message(call_id, name, fn(args))
        except EnvError as e:
            self.mark_env_error(str(e))
            return tool_message(call_id, name, f"Error: environment failure: {e}")
        except (ValueError, TypeError, KeyError) as e:
            return tool_message(call_id, name, f"Error: {e}")

    def step(self, tool_calls: Sequence[ToolCall]) -> list[Message]:
        """Runs one assistant turn's tool calls concurrently; one result message per call, in order."""
        calls = list(tool_calls or [])
        if len(calls) <= 1:
            return [self._run_one(c) for c in calls]
        with ThreadPoolExecutor(max_workers=min(len(calls), self.max_parallel_tools)) as ex:
            return list(ex.map(self._run_one, calls))

    def __enter__(self) -> Env:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
