"""Agents outside the process: an OpenAI-compatible /v1/chat/completions proxy that records every
call of an episode, token-exactly, into the trajectory manager.

    proxy = ChatProxy(engine, tokenizer, group_size=8, session_timeout_s=600,
                      record_dir="/tmp/rollouts")
    server = make_server(proxy.engine, tokenizer=tokenizer, routes=[proxy])   # or serve_chat
    ...  # any OpenAI client: headers X-Session-Id (or the "user" field), X-Group-Id / X-Task-Id
    proxy.finish("ep-1", reward=1.0)      # or POST /v1/sessions/ep-1/finish {"reward": 1.0}
    groups = proxy.pop_groups()           # or GET /v1/groups, or the files in record_dir

Routes (mounted on `kat-jax serve`, kat_jax.rollout.server.make_server(routes=...)):

  POST /v1/chat/completions   OpenAI chat format: "messages" (system, user, assistant with
      "tool_calls", tool), "tools", "tool_choice" ("auto" or "none"), "temperature", "top_p",
      "top_k", "max_tokens" (or "max_completion_tokens"; default and ceiling: what is left of the
      context), "n", "seed", "stop" (strings), "logprobs", "return_token_ids" (vLLM's flag: the
      response then carries "prompt_token_ids" and each choice's "token_ids"), "user",
      "metadata" ({"group", "task_id"} strings), "stream" (the answer is generated whole, then
      sent as chat.completion.chunk events; "stream_options": {"include_usage"}). Response:
      "chat.completion" with per choice
      message {"role": "assistant", "content", "tool_calls"?}, "finish_reason" ("stop",
      "length", "tool_calls"), "logprobs" ({"content": [{"token", "logprob", "bytes",
      "top_logprobs": []}]} when asked) and "usage" (prompt, completion, total tokens).
  POST /v1/sessions/{id}/finish   {"reward", "status"? (default "ok"), "passed"?, "turns"?,
      "tool_calls"?, "error"?} -> {"session", "finished": true, "groups_written"}.
  GET  /v1/groups[?max_groups=N]  the finished groups' rollout records (popped: each once).
  GET  /v1/sessions               counters and the open sessions.

Rendering (the same as the built-in agent, kat_jax.rollout.agent.run_episode). A session's first
call is the conversation rendered in the Qwen format (kat_jax.data.chat.render_segments with the
tools and the generation prompt), each segment tokenized on its own. A later call whose messages
repeat an earlier call's messages followed by the assistant message this proxy answered (as the
client echoes it back: compared by their rendering, so a null vs empty content or a tool call id
do not matter) continues that call token-exactly: its input is the earlier input, then the ids
that were sampled (never a re-tokenisation of their text), then the ids of what the template puts
after them (the closing <|im_end|> when the turn was cut, the newline, the tool results or user
message, the next assistant header): what continuation_segments appends in the built-in agent.
Any other call (a rewritten or truncated context) is rendered whole, and the manager records it
as a branch or a new root. Tool calls are parsed back with the built-in agent's parser
(kat_jax.rollout.agent.parse_tool_calls), as vLLM's and SGLang's hermes parsers do: the text
before the first <tool_call> is the content; a malformed call leaves the whole text as content
and no tool call. tool_choice "none" keeps the tools in the prompt (the prompt is unchanged) and
parses no call. Generation stops at <|im_end|> (kept in the recorded ids) or a "stop" string
(the ids through the token that completes it are recorded; the text ends before it).

Sessions. A call names its session by the X-Session-Id header or the "user" field; a call naming
none is served and not recorded. The group (the advantage group) is X-Group-Id or
metadata.group, else the task (X-Task-Id or metadata.task_id), else the session itself. Each
choice of each call is one manager call (input ids, sampled ids, their log-probs and entropies,
tool_call tags, `policy_version`). The episode's outcome arrives by finish (Python) or the finish
route. A session id is used once: a call or a finish naming a finished session is refused (HTTP
409), also after its group was handed out. A session that reports nothing for
`session_timeout_s` after its last call returned (no call in flight) is finished with status
env_error and the reason in "error": its group is masked (excluded from training and counted, as
for a broken environment: the agent, not the policy, failed); counted as `timed_out`.

Groups. A group is ready when it has group_size sessions, all finished
(TrajectoryManager.ready_groups). With record_dir each ready group is written at once as
DIR/group-NNNNNN.jsonl (rollout records, kat_jax.data.records; written whole or not at all), which
the rl stage reads as `--config.data.train_files='DIR/*.jsonl'`; without it, groups wait for
pop_groups or GET /v1/groups.

Bad requests get HTTP 400 whose error names the field ("param", and in the message).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import threading
import time
import urllib.parse
import uuid
from typing import Any

from kat_jax.data.chat import ChatError, render_segments, render_text
from kat_jax.data.records import STATUSES, write_rollouts
from kat_jax.flow.manager import ManagerError, TrajectoryManager
from kat_jax.rollout.agent import parse_tool_calls
from kat_jax.rollout.engine import BatchingEngine
from kat_jax.rollout.sampler import ContextLengthError, SamplingParams

ROLES = ("system", "user", "assistant", "tool")
THREADS_KEPT = 8  # answered calls per session a later call may continue
STAT_KEYS = ("chat_calls", "recorded_calls", "continued_calls", "rendered_calls", "finished",
             "timed_out", "refused_reused", "bad_requests", "groups_written")


class ProxyError(ValueError):
    """A refused request: HTTP `code`, `param` the offending field (or None)."""

    def __init__(self, msg: str, param: str | None = None, code: int = 400):
        super().__init__(msg)
        self.param, self.code = param, code


def _bad(param: str, msg: str) -> ProxyError:
    return ProxyError(f"'{param}': {msg}", param)


# ---------------------------------------------------------------------------------------------
# Request parsing.


@dataclasses.dataclass
class ChatRequest:
    messages: list[dict]
    tools: list[dict] | None
    tool_choice: str
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int | None
    n: int
    seed: int | None
    stop: list[str]
    logprobs: bool
    return_token_ids: bool
    stream: bool = False
    stream_usage: bool = False


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open=False) -> float:
    x = body.get(key)
    if x is None:
        return default
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise _bad(key, f"must be a number, got {x!r}")
    if not (lo < x if lo_open else lo <= x) or x > hi:
        raise _bad(key, f"{x} is out of range ({'(' if lo_open else '['}{lo:g}, {hi:g}])")
    return float(x)


def _int(body: dict, key: str, lo: int | None) -> int | None:
    x = body.get(key)
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, int):
        raise _bad(key, f"must be an integer, got {x!r}")
    if lo is not None and x < lo:
        raise _bad(key, f"must be >= {lo}, got {x}")
    return x


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, "must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role", f"unknown role {role!r}; known: {list(ROLES)}")
        c = m.get("content")
        if c is not None and not isinstance(c, (str, list)):
            raise _bad(f"{where}.content", "must be a string, a list of parts or null")
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                raise _bad(f"{where}.tool_calls", "a list, on assistant messages only")
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                        or not fn["name"]:
                    raise _bad(f"{where}.tool_calls[{j}].function.name",
                               "each tool call needs {\"function\": {\"name\", \"arguments\"}}")
                args = fn.get("arguments", "{}")
                if isinstance(args, str):
                    try:
                        json.loads(args)
                    except json.JSONDecodeError as e:
                        raise _bad(f"{where}.tool_calls[{j}].function.arguments",
                                   f"not JSON ({e.msg})") from None
                elif not isinstance(args, dict):
                    raise _bad(f"{where}.tool_calls[{j}].function.arguments",
                               "a JSON string or an object")
    return messages


def parse_chat_request(body: Any) -> ChatRequest:
    """The request's fields, checked (ProxyError naming the field otherwise)."""
    if not isinstance(body, dict):
        raise ProxyError("the request body must be a JSON object")
    for key in ("stream", "logprobs", "return_token_ids"):
        if body.get(key) is not None and not isinstance(body[key], bool):
            raise _bad(key, f"must be true or false, got {body[key]!r}")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise _bad("stream_options", "must be an object such as {\"include_usage\": true}")
    messages = _check_messages(body.get("messages"))
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("tools", "must be a list of {\"type\": \"function\", \"function\": {...}}")
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise _bad(f"tools[{i}]", "must be {\"type\": \"function\", \"function\": "
                           "{\"name\", \"description\", \"parameters\"}}")
    tool_choice = body.get("tool_choice")
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if tool_choice not in ("auto", "none"):
        raise _bad("tool_choice", f"only 'auto' and 'none' are supported, got {tool_choice!r}")
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise _bad("max_tokens", "give max_tokens or max_completion_tokens, not both")
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop", "must be a non-empty string or a list of them")
    return ChatRequest(
        messages=messages, tools=tools or None, tool_choice=tool_choice,
        temperature=_number(body, "temperature", 1.0, 0.0, 100.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=max(_int(body, "top_k", -1) or 0, 0),
        max_tokens=_int(body, max_key, 1), n=_int(body, "n", 1) or 1,
        seed=_int(body, "seed", None), stop=stop, logprobs=bool(body.get("logprobs")),
        return_token_ids=bool(body.get("return_token_ids")), stream=bool(body.get("stream")),
        stream_usage=bool((opts or {}).get("include_usage")))


# ---------------------------------------------------------------------------------------------
# The proxy.


@dataclasses.dataclass
class _Thread:
    """An answered call: the rendering of its messages + the assistant answer, their ids (input
    + sampled), and whether the sampled ids end with <|im_end|>."""

    text: str
    n_messages: int
    ids: list[int]
    closed: bool


@dataclasses.dataclass
class _Session:
    group: Any
    task_id: Any
    threads: list[_Thread] = dataclasses.field(default_factory=list)
    last_active: float = 0.0
    in_flight: int = 0


class ChatProxy:
    """The chat route, sessions and groups over an engine (see the module docstring).

    engine: any kat_jax engine (wrapped in a BatchingEngine unless it batches continuously; use
    `proxy.engine` for the completions server too). tokenizer: the model's (ByteTokenizer or
    HFTokenizer). manager: where calls are recorded (default TrajectoryManager()). group_size: the
    sessions a group needs to be ready. session_timeout_s: None = sessions wait forever.
    record_dir: write each ready group there. policy_version: recorded with every call; whoever
    updates the engine's weights sets it."""

    def __init__(self, engine, tokenizer, manager: TrajectoryManager | None = None,
                 model_name: str = "kat_jax", group_size: int = 1,
                 session_timeout_s: float | None = None, record_dir: str | None = None,
                 policy_version: int = 0):
        self.engine = engine if getattr(engine, "continuous_batching", False) or isinstance(
            engine, BatchingEngine) else BatchingEngine(engine)
        self.tokenizer, self.model_name = tokenizer, model_name
        self.manager = manager if manager is not None else TrajectoryManager()
        self.manager._check_group_size(group_size)
        if session_timeout_s is not None and not session_timeout_s > 0:
            raise ValueError(f"session_timeout_s must be > 0 or None, got {session_timeout_s!r}")
        self.group_size, self.timeout_s = group_size, session_timeout_s
        self.record_dir, self.policy_version = record_dir, policy_version
        self.im_end = tokenizer.special("<|im_end|>")
        self._specials = {}
        for name in ("<|im_end|>", "<|endoftext|>"):
            try:
                self._specials[name] = tokenizer.special(name)
            except KeyError:
                pass
        try:
            self._call_open = tokenizer.special("<tool_call>")
            self._call_close = tokenizer.special("</tool_call>")
        except KeyError:
            self._call_open = self._call_close = None
        self._sessions: dict[Any, _Session] = {}
        self._finished: set[Any] = set()
        self._lock = threading.Lock()
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._written = 0
        if record_dir is not None:
            os.makedirs(record_dir, exist_ok=True)
            self._written = sum(f.startswith("group-") for f in os.listdir(record_dir))
        self._stop = threading.Event()
        if session_timeout_s is not None:
            threading.Thread(target=self._reaper, daemon=True, name="session-reaper").start()

    def close(self) -> None:
        self._stop.set()

    # -- rendering -----------------------------------------------------------------------------

    def _encode(self, segments) -> list[int]:
        return [t for text, *_ in segments for t in self.tokenizer.encode(text)]

    def _input_ids(self, s: _Session | None, req: ChatRequest) -> tuple[list[int], bool]:
        """(the call's input ids, whether it continues an answered call of the session)."""
        try:
            segs = render_segments(req.messages, req.tools, add_generation_prompt=True)
            best = None
            for th in (s.threads if s is not None else []):
                k = th.n_messages
                if len(req.messages) > k and req.messages[k - 1].get("role") == "assistant" and (
                        best is None or k > best.n_messages) and render_text(
                            req.messages[:k], req.tools) == th.text:
                    best = th
            if best is not None:
                n = len(render_segments(req.messages[:best.n_messages], req.tools))
                return best.ids + self._encode(segs[n - 1 if best.closed else n - 2:]), True
        except ChatError as e:
            raise _bad("messages", str(e)) from None
        return self._encode(segs), False

    def _tags(self, ids: list[int]) -> list[str | None]:
        out, inside = [], False
        for t in ids:
            if t == self._call_open:
                inside = True
            out.append("tool_call" if inside else None)
            if t == self._call_close:
                inside = False
        return out

    def _cut_at_stop(self, ids: list[int], stop: list[str]) -> tuple[int, str] | None:
        """(tokens kept, text before the stop string) at the first stop string, or None."""
        text, first = self.tokenizer.decode(ids), None
        for s in stop:
            i = text.find(s)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, s)
        if first is None:
            return None
        end = first[0] + len(first[1])
        for k in range(1, len(ids) + 1):  # the first token whose text completes the stop string
            if len(self.tokenizer.decode(ids[:k])) >= end:
                return k, text[:first[0]]
        return len(ids), text[:first[0]]

    # -- the chat route ------------------------------------------------------------------------

    def chat(self, body: Any, headers: Any = None) -> dict[str, Any]:
        """One /v1/chat/completions request (headers: a mapping with .get, or None) -> the
        response object; ProxyError when refused."""
        headers = headers if headers is not None else {}
        try:
            req = parse_chat_request(body)
            sid, group, task_id = self._session_keys(body, headers)
        except ProxyError:
            with self._lock:
                self.stats["bad_requests"] += 1
            raise
        with self._lock:
            s = None
            if sid is not None:
                self._refuse_finished(sid)
                s = self._sessions.get(sid)
                if s is None:
                    key = group if group is not None else (task_id if task_id is not None
                                                           else sid)
                    try:
                        self.manager.start_session(sid, group=key, task_id=task_id)
                    except ManagerError as e:
                        raise ProxyError(str(e), e.field) from None
                    s = self._sessions[sid] = _Session(key, task_id)
                elif group is not None and group != s.group:
                    raise _bad("metadata.group", f"{group!r} (X-Group-Id or metadata.group) "
                               f"differs from the session's group {s.group!r}")
                s.in_flight += 1
            try:
                input_ids, continued = self._input_ids(s, req)
            except ProxyError:
                if s is not None:
                    s.in_flight -= 1
                self.stats["bad_requests"] += 1
                raise
        try:
            gens = self._generate(input_ids, req)
        finally:
            if s is not None:
                with self._lock:
                    s.in_flight -= 1
                    s.last_active = time.monotonic()
        choices, usage_out = [], 0
        records = []
        for j, g in enumerate(gens):
            ids, lps, ents, finish = list(g.tokens), list(g.logprobs), list(g.entropies), \
                g.finish_reason
            cut = self._cut_at_stop(ids, req.stop) if req.stop else None
            if cut is not None:
                k, text = cut
                ids, lps, ents, finish = ids[:k], lps[:k], ents[:k], "stop"
            else:
                body_ids = ids[:-1] if ids and ids[-1] == self.im_end else ids
                text = self.tokenizer.decode(body_ids)
            message: dict[str, Any] = {"role": "assistant", "content": text or None}
            if req.tools and req.tool_choice == "auto":
                content, calls, errors = parse_tool_calls(text)
                if calls and not errors:
                    for call in calls:
                        call["id"] = f"call_{uuid.uuid4().hex[:24]}"
                    message = {"role": "assistant", "content": content or None,
                               "tool_calls": calls}
                    if finish == "stop":
                        finish = "tool_calls"
            choice = {"index": j, "message": message, "finish_reason": finish,
                      "logprobs": None}
            if req.logprobs:
                choice["logprobs"] = {"content": [
                    {"token": (tok := self.tokenizer.decode([t])), "logprob": lp,
                     "bytes": list(tok.encode()), "top_logprobs": []}
                    for t, lp in zip(ids, lps)]}
            if req.return_token_ids:
                choice["token_ids"] = ids
            choices.append(choice)
            usage_out += len(ids)
            records.append((ids, lps, ents, message))
        if sid is not None:
            self._record(sid, s, req, input_ids, records, continued)
        out = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
               "created": int(time.time()), "model": self.model_name, "choices": choices,
               "usage": {"prompt_tokens": len(input_ids), "completion_tokens": usage_out,
                         "total_tokens": len(input_ids) + usage_out}}
        if req.return_token_ids:
            out["prompt_token_ids"] = input_ids
        with self._lock:
            self.stats["chat_calls"] += 1
        return out

    def _session_keys(self, body: dict, headers) -> tuple[Any, Any, Any]:
        sid = headers.get("X-Session-Id") or body.get("user")
        meta = body.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            raise _bad("metadata", "must be an object of strings")
        meta = meta or {}
        group = headers.get("X-Group-Id") or meta.get("group")
        task_id = headers.get("X-Task-Id") or meta.get("task_id")
        for name, v in (("user", sid), ("metadata.group", group), ("metadata.task_id", task_id)):
            if v is not None and not isinstance(v, str):
                raise _bad(name, f"must be a string, got {v!r}")
        return sid or None, group or None, task_id or None

    def _refuse_finished(self, sid: Any) -> None:
        if sid in self._finished:
            self.stats["refused_reused"] += 1
            raise ProxyError(f"session {sid!r} is already finished (its reward was reported or it "
                             "timed out); use a new session id for each episode", "session_id",
                             409)

    def _generate(self, input_ids: list[int], req: ChatRequest):
        context = getattr(self.engine, "context_length", None)
        room = None if context is None else context - len(input_ids)
        if room is not None and room < 1:
            raise _bad("messages", f"the prompt ({len(input_ids)} tokens) does not fit the "
                       f"model's context length (max_position_embeddings {context})")
        max_new = req.max_tokens or room or 256
        if room is not None:
            max_new = min(max_new, room)
        stops = {self.im_end} | {self._specials[s] for s in req.stop if s in self._specials}
        seed = req.seed if req.seed is not None else secrets.randbits(31)
        try:
            sp = SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                max_new_tokens=max_new, stop_tokens=tuple(sorted(stops)),
                                seed=seed)
            return self.engine.generate([input_ids], sp, n=req.n, seeds=[seed])[0]
        except ContextLengthError as e:
            raise _bad("messages", str(e)) from None

    def _record(self, sid, s: _Session, req: ChatRequest, input_ids, records, continued) -> None:
        with self._lock:
            self._refuse_finished(sid)  # finished while the call ran
            for ids, lps, ents, message in records:
                # float rounding may put a log-prob a hair above 0 or an entropy below it;
                # an engine that reports no entropies (a remote server) records None
                ents = None if any(x is None for x in ents) else [max(x, 0.0) for x in ents]
                try:
                    self.manager.add_call(sid, input_ids, ids, [min(x, 0.0) for x in lps], ents,
                                          self.policy_version, self._tags(ids))
                except ManagerError as e:
                    raise ProxyError(str(e), e.field, 500 if e.field != "session_id" else 409
                                     ) from None
                text = render_text(req.messages + [message], req.tools)
                s.threads.append(_Thread(text, len(req.messages) + 1, input_ids + ids,
                                         bool(ids) and ids[-1] == self.im_end))
            del s.threads[:-THREADS_KEPT]
            self.stats["recorded_calls"] += len(records)
            self.stats["continued_calls" if continued else "rendered_calls"] += 1

    # -- outcomes and groups -------------------------------------------------------------------

    def finish(self, session_id: Any, reward: float | None, status: str = "ok",
               passed: bool | None = None, turns: int | None = None,
               tool_calls: int | None = None, error: str | None = None) -> int:
        """The episode's outcome (TrajectoryManager.finish_session); returns the number of group
        files written (record_dir). ProxyError: 404 unknown session, 409 finished, 400 bad
        field."""
        with self._lock:
            self._refuse_finished(session_id)
            s = self._sessions.get(session_id)
            if s is None:
                raise ProxyError(f"session {session_id!r} is unknown (no chat call named it)",
                                 "session_id", 404)
            if s.in_flight:
                raise ProxyError(f"session {session_id!r} has a call in flight; finish it after "
                                 "its last call returned", "session_id", 409)
            if status not in STATUSES:
                raise _bad("status", f"unknown status {status!r}; known: {list(STATUSES)}")
            try:
                self.manager.finish_session(session_id, reward, status, passed, turns,
                                            tool_calls, error)
            except ManagerError as e:
                raise ProxyError(str(e), e.field) from None
            self._close(session_id)
            return self._write_ready()

    def _close(self, session_id: Any) -> None:
        del self._sessions[session_id]
        self._finished.add(session_id)
        self.stats["finished"] += 1

    def expire(self, now: float | None = None) -> list[Any]:
        """Finish (status env_error) every session idle for more than session_timeout_s; returns
        their ids."""
        if self.timeout_s is None:
            return []
        now = time.monotonic() if now is None else now
        with self._lock:
            late = [sid for sid, s in self._sessions.items()
                    if not s.in_flight and now - s.last_active > self.timeout_s]
            for sid in late:
                self.manager.finish_session(
                    sid, None, "env_error", error=f"timeout: the agent reported no reward within "
                    f"{self.timeout_s:g} s of the session's last call (session masked)")
                self._close(sid)
                self.stats["timed_out"] += 1
            if late:
                self._write_ready()
        return late

    def _reaper(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            self.expire()

    def _write_ready(self) -> int:
        """Write the ready groups to record_dir (lock held); how many."""
        if self.record_dir is None:
            return 0
        groups = self.manager.pop_groups(self.group_size)
        for records in groups:
            write_rollouts(os.path.join(self.record_dir, f"group-{self._written:06d}.jsonl"),
                           records)
            self._written += 1
        self.stats["groups_written"] += len(groups)
        return len(groups)

    def pop_groups(self, max_groups: int | None = None) -> list[list[dict[str, Any]]]:
        """The ready groups' records (TrajectoryManager.pop_groups with group_size)."""
        with self._lock:
            return self.manager.pop_groups(self.group_size, max_groups)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"stats": dict(self.stats), "manager": dict(self.manager.stats),
                    "open_sessions": sorted(map(str, self._sessions)),
                    "group_size": self.group_size, "session_timeout_s": self.timeout_s}

    # -- HTTP ----------------------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: Any, body: bytes
               ) -> tuple[int, dict] | None:
        """A route of make_server: (HTTP code, JSON object), or None when the path is not ours."""
        url = urllib.parse.urlsplit(path)
        parts = url.path.rstrip("/").split("/")
        try:
            if method == "POST" and url.path.rstrip("/") == "/v1/chat/completions":
                obj = _json(body)
                out = self.chat(obj, headers)
                if obj.get("stream"):
                    return 200, stream_chunks(out, bool((obj.get("stream_options") or {}).get(
                        "include_usage")))
                return 200, out
            if method == "POST" and len(parts) == 5 and parts[:3] == ["", "v1", "sessions"] \
                    and parts[4] == "finish":
                sid = urllib.parse.unquote(parts[3])
                obj = _json(body)
                if not isinstance(obj, dict):
                    raise ProxyError("the body must be {\"reward\": ..., \"status\": ...}")
                unknown = set(obj) - {"reward", "status", "passed", "turns", "tool_calls",
                                      "error"}
                if unknown:
                    raise _bad(sorted(unknown)[0], "unknown field; known: reward, status, "
                               "passed, turns, tool_calls, error")
                if "reward" not in obj and obj.get("status") != "env_error":
                    raise _bad("reward", "is missing")
                written = self.finish(sid, obj.get("reward"), obj.get("status", "ok"),
                                      obj.get("passed"), obj.get("turns"), obj.get("tool_calls"),
                                      obj.get("error"))
                return 200, {"session": sid, "finished": True, "groups_written": written}
            if method == "GET" and url.path.rstrip("/") == "/v1/groups":
                q = urllib.parse.parse_qs(url.query)
                try:
                    max_groups = int(q["max_groups"][0]) if "max_groups" in q else None
                except ValueError:
                    raise _bad("max_groups", "must be an integer") from None
                return 200, {"groups": self.pop_groups(max_groups)}
            if method == "GET" and url.path.rstrip("/") == "/v1/sessions":
                return 200, self.status()
        except ProxyError as e:
            return e.code, {"error": {"message": str(e), "type": "invalid_request_error",
                                      "param": e.param, "code": None}}
        return None


def stream_chunks(out: dict[str, Any], include_usage: bool = False) -> list[dict[str, Any]]:
    """A chat.completion as the chat.completion.chunk events of a stream (stream=true: the
    whole answer is generated first, then sent as one burst of server-sent events): per choice
    the role, the content, the tool calls, then the finish reason; the usage last when asked."""
    base = {"id": out["id"], "object": "chat.completion.chunk", "created": out["created"],
            "model": out["model"]}
    chunk = lambda choices, **kw: {**base, "choices": choices, **kw}  # noqa: E731
    events = []
    for ch in out["choices"]:
        i, msg = ch["index"], ch["message"]
        first = {"role": "assistant", "content": msg["content"] or ""}
        events.append(chunk([{"index": i, "delta": first, "logprobs": ch["logprobs"],
                              "finish_reason": None}]))
        if msg.get("tool_calls"):
            calls = [{"index": k, **c} for k, c in enumerate(msg["tool_calls"])]
            events.append(chunk([{"index": i, "delta": {"tool_calls": calls}, "logprobs": None,
                                  "finish_reason": None}]))
        extra = {"token_ids": ch["token_ids"]} if "token_ids" in ch else {}
        events.append(chunk([{"index": i, "delta": {}, "logprobs": None,
                              "finish_reason": ch["finish_reason"], **extra}]))
    if include_usage:
        events.append(chunk([], usage=out["usage"]))
    return events


def _json(body: bytes) -> Any:
    try:
        return json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProxyError(f"the body is not JSON ({e})") from None


def serve_chat(engine, tokenizer, host: str = "127.0.0.1", port: int = 0, **proxy_kw):
    """(server, base_url, proxy): `kat-jax serve` with the chat proxy, running in a daemon thread
    (tests, notebooks). base_url ends with /v1 (what OpenAI clients take)."""
    from kat_jax.rollout.server import make_server

    proxy = ChatProxy(engine, tokenizer, **proxy_kw)
    server = make_server(proxy.engine, host, port, model_name=proxy.model_name,
                         tokenizer=tokenizer, routes=[proxy])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}/v1", proxy
