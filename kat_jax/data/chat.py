"""Chat transcripts -> token trajectories in the Qwen chat format (ChatML + Hermes tool calls).

The rendering is Qwen3's chat template (non-thinking), written out segment by segment so that every
token knows its role, whether it is trainable, and its tags:

    <|im_start|>system\n{system}\n\n# Tools\n\n...<tools>\n{tool json}...\n</tools>...<|im_end|>\n
    <|im_start|>user\n{content}<|im_end|>\n
    <|im_start|>assistant\n{content}[\n]<tool_call>\n{"name": N, "arguments": A}\n</tool_call>
        <|im_end|>\n
    <|im_start|>user\n<tool_response>\n{result}\n</tool_response>[\n<tool_response>...]<|im_end|>\n

Trainable: what the assistant generates after its header "<|im_start|>assistant\n" (content, tool
calls, and its closing <|im_end|>); never system, user or tool tokens. Tags: tool_call on the tokens
of each <tool_call>...</tool_call> block; tool_result on each <tool_response>...</tool_response>.
Each segment is tokenized separately (token boundaries never cross a segment), the same way the
rollout agent appends generated ids and tool-result ids (token-in-token-out).

Messages: {"role": system|user|assistant|tool, "content": str or null, "tool_calls": [{"type":
"function", "function": {"name": str, "arguments": JSON string or object}}] (assistant only)}.
A message may set "train": false to exclude an assistant turn from the loss.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from kat_jax.trees.trajectory import ROLES, TAGS, Trajectory

TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and "
                "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": "
                "<function-name>, \"arguments\": <args-json-object>}\n</tool_call>")


class ChatError(ValueError):
    pass


def _content(msg: dict, i: int) -> str:
    c = msg.get("content")
    if c is None:
        return ""
    if isinstance(c, list):  # OpenAI content parts: keep the text parts
        parts = [p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text"]
        return "".join(parts)
    if not isinstance(c, str):
        raise ChatError(f"message {i}: 'content' must be a string, a list of parts or null")
    return c


def _tool_call_text(call: Any, i: int) -> str:
    if not isinstance(call, dict):
        raise ChatError(f"message {i}: each tool call must be an object")
    fn = call.get("function", call)
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name:
        raise ChatError(f"message {i}: tool call without a function name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            json.loads(args)
        except json.JSONDecodeError as e:
            raise ChatError(f"message {i}: tool call {name!r}: arguments are not JSON ({e.msg})"
                            ) from None
        args_text = args
    else:
        args_text = json.dumps(args, ensure_ascii=False)
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args_text}}}\n</tool_call>'


def render_segments(messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = False) -> list[tuple[str, str, bool, int]]:
    """(text, role, trainable, tags) segments of a transcript in the Qwen format."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("'messages' must be a non-empty list")
    segs: list[tuple[str, str, bool, int]] = []
    add = lambda text, role, train=False, tags=0: segs.append((text, role, train, tags))
    start = 0
    first = messages[0] if isinstance(messages[0], dict) else {}
    if tools:
        add("<|im_start|>system\n", "system")
        if first.get("role") == "system":
            add(_content(first, 0) + "\n\n", "system")
            start = 1
        body = TOOLS_HEADER + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
        add(body + TOOLS_FOOTER + "<|im_end|>\n", "system")
    elif first.get("role") == "system":
        add("<|im_start|>system\n" + _content(first, 0) + "<|im_end|>\n", "system")
        start = 1
    for i in range(start, len(messages)):
        msg = messages[i]
        if not isinstance(msg, dict):
            raise ChatError(f"message {i}: must be an object")
        role = msg.get("role")
        if role not in ROLES:
            raise ChatError(f"message {i}: unknown role {role!r}; known: {sorted(ROLES)}")
        text = _content(msg, i)
        if role in ("user", "system"):
            add(f"<|im_start|>{role}\n{text}<|im_end|>\n", role)
        elif role == "assistant":
            train = bool(msg.get("train", True))
            add("<|im_start|>assistant\n", "assistant")
            if text:
                add(text, "assistant", train)
            calls = msg.get("tool_calls") or []
            if not isinstance(calls, list):
                raise ChatError(f"message {i}: 'tool_calls' must be a list")
            for j, call in enumerate(calls):
                if j > 0 or text:
                    add("\n", "assistant", train)
                add(_tool_call_text(call, i), "assistant", train, TAGS["tool_call"])
            add("<|im_end|>", "assistant", train)
            add("\n", "assistant")
        else:  # tool
            prev = messages[i - 1].get("role") if i > 0 and isinstance(messages[i - 1], dict) else None
            nxt = messages[i + 1].get("role") if i + 1 < len(messages) and isinstance(
                messages[i + 1], dict) else None
            if prev != "tool":
                add("<|im_start|>user", "tool")
            add(f"\n<tool_response>\n{text}\n</tool_response>", "tool", False, TAGS["tool_result"])
            if nxt != "tool":
                add("<|im_end|>\n", "tool")
    if add_generation_prompt:
        add("<|im_start|>assistant\n", "assistant")
    return segs


def render_text(messages: list[dict], tools: list[dict] | None = None,
                add_generation_prompt: bool = False) -> str:
    return "".join(s[0] for s in render_segments(messages, tools, add_generation_prompt))


def encode_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                id: Any = None, **traj_fields: Any) -> Trajectory:
    """Trajectory with tokens, trainable mask, roles and tags of a transcript."""
    toks: list[int] = []
    trainable: list[bool] = []
    roles: list[int] = []
    tags: list[int] = []
    for text, role, train, tag in render_segments(messages, tools):
        ids = tokenizer.encode(text)
        toks.extend(ids)
        trainable.extend([train] * len(ids))
        roles.extend([ROLES[role]] * len(ids))
        tags.extend([tag] * len(ids))
    return Trajectory(np.asarray(toks), trainable=np.asarray(trainable), roles=np.asarray(roles),
                      tags=np.asarray(tags), id=id, **traj_fields)


def continuation_segments(tool_messages: list[dict]) -> list[tuple[str, str, bool, int]]:
    """What follows a generated assistant turn (which ends with <|im_end|>) in render_segments: the
    newline, the tool results (if any) and the next assistant header. Appending these ids to the
    generated ids yields exactly the ids of the rendered transcript (token-in-token-out)."""
    segs: list[tuple[str, str, bool, int]] = [("\n", "assistant", False, 0)]
    if tool_messages:
        segs.append(("<|im_start|>user", "tool", False, 0))
        for i, msg in enumerate(tool_messages):
            segs.append((f"\n<tool_response>\n{_content(msg, i)}\n</tool_response>", "tool", False,
                         TAGS["tool_result"]))
        segs.append(("<|im_end|>\n", "tool", False, 0))
    segs.append(("<|im_start|>assistant\n", "assistant", False, 0))
    return segs
