"""Teacher transcripts (ground-truth agent episodes, one or more per task) and the relative reward
of RFT (issue 18): a rollout is scored by its difference from the teachers of its task.

Files. A teacher file is JSONL, one transcript a line, in the SFT chat record format (so the sft
stage reads it as ``chat`` data) plus the task it solves::

    {"id": "teacher-calc-1-0-0", "group": "calc-1-0-0", "task_id": "calc-1-0-0",
     "env": "calculator", "split": "train",
     "reward": 1.0,                                   # optional: the teacher's outcome, default 1
     "tools": [<OpenAI function schemas>],
     "messages": [system, user, assistant(tool_calls), tool, ..., assistant(final answer)]}

Required: task_id (non-empty string) and messages (non-empty, with an assistant message); the rest
is informative (split: the task's train/test split, registry.task_split).

The bundled files (kat_jax/assets/data/teachers_calculator.jsonl, teachers_maths.jsonl,
teachers_swe.jsonl) are written by scripts/make_teacher_data.py from :func:`teacher_records`:
every task of the calculator's split pool (400 generated tasks, train and test), every bundled
maths problem and every bundled swe instance (its gold patch applied with ``git apply``, then
``submit``), each solved by the real environment (its ``reset`` messages, its tool results via
``step``, its grading), sorted by task id.

The measure. Let a rollout's tool-call sequence be the list of ``(name, arguments)`` of the calls
in its assistant messages, in order, arguments canonicalised (JSON-parsed, keys sorted, every string
value's whitespace runs collapsed to one space and stripped). For two sequences ``a``, ``b``::

    call_distance(a, b) = Levenshtein distance with insert / delete cost 1 and substitution cost
                          0 (same name and arguments), 1/2 (same tool, other arguments), 1 (other tool)
    similarity(a, b)    = 1 - call_distance(a, b) / max(len(a), len(b))   (1 when both are empty)

``similarity`` is in [0, 1]. The nearest teacher is the one of highest similarity (the first such
in the teachers' order). With weights from :class:`RelativeRewardConfig`::

    relative_reward = w_outcome * (outcome - max over teachers of their outcome)
                    + w_process * similarity(rollout, nearest teacher)
                    + w_answer  * [final answer of the rollout matches the nearest teacher's]

The final answer is :func:`kat_jax.envs.answers.extract_answer` of the last assistant text, matched
with ``answers_match`` (no answer on either side: 0). With the defaults (1, 1/2, 1/2) a rollout
equal to a teacher scores 1, a correct rollout by another path between 1/2 and 1, a wrong answer
at most -1/2, an empty rollout -1 (against teachers of outcome 1). Rewards are then standardised per
group of rollouts of one task by :func:`normalize_group`: ``(r - mean) / (unbiased std + eps)``.

Divergence (to stop deviating rollouts early): for the ``k`` tool calls made so far,
``divergence(partial, teachers) = 1 - max over teachers of similarity(calls, teacher_calls[:k])``
(0 before any call, 1 when no teacher's first ``k`` calls share anything with them). It looks at
tool calls only; text without calls diverges from nothing.

Teachers in the loss (rl.teacher_loss=sft, kat_jax.flow.online): :func:`teacher_rollout_record`
renders a transcript with the rollouts' chat template (kat_jax.data.chat, the same segments the
agent tokenizes, so a teacher shares its task's prompt prefix in the group's tree) as a rollout
record with ``"teacher": true``, a behaviour log-prob of 0 on its assistant tokens (the tokens
the teacher SFT term reads: a deterministic demonstration, mu = 1) and null elsewhere, advantage
0 (it never shifts the rollouts' advantages, computed before it joins the group).

Exact: all of it is deterministic pure Python. Not covered: the "final diff" of swe episodes (the
answer term reads the final text answer only).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from kat_jax.envs.answers import answers_match, extract_answer
from kat_jax.envs.base import Message, Task
from kat_jax.envs.maths import last_assistant_text
from kat_jax.envs.registry import env_spec, make_env, task_split
from kat_jax.jsonl import JsonlError, read_jsonl

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "data")
BUNDLED_TEACHERS = {name: os.path.join(DATA_DIR, f"teachers_{name}.jsonl")
                    for name in ("calculator", "maths", "swe")}

Transcript = dict[str, Any]   # a teacher record: {"task_id", "messages", ...}
Call = tuple[str, str]        # (tool name, canonical arguments)

_QUESTION = re.compile(r"What is (.+)\?\s*$")


# -- generating teachers ------------------------------------------------------------------------
def _final(answer: str) -> Message:
    return {"role": "assistant", "content": f"The answer is \\boxed{{{answer}}}."}


def _call(turn: int, name: str, arguments: dict) -> dict[str, Any]:
    return {"id": f"call_{turn}_0", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}


SWE_DONE = "I applied the fix and submitted it."


def _swe_teacher(env, task: Task, messages: list[Message]) -> str:
    """The swe teacher's turns (appended to ``messages``): ``bash`` applies the instance's gold
    patch with ``git apply`` (a here-document), then ``submit``, then a closing sentence. Returns
    the sandbox's working directory (the caller writes the instance's ``workdir`` in its place)."""
    patch = task.metadata["instance"]["patch"]
    if not patch.endswith("\n"):
        patch += "\n"
    workdir = env.sb.workdir if getattr(env, "sb", None) is not None else ""
    for turn, (name, args) in enumerate(
            [("bash", {"command": f"git apply <<'KAT_JAX_PATCH'\n{patch}KAT_JAX_PATCH"}),
             ("submit", {})], 1):
        call = _call(turn, name, args)
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        messages.extend(env.step([call]))
    messages.append({"role": "assistant", "content": SWE_DONE})
    return workdir


def _replace_text(messages: list[Message], old: str, new: str) -> list[Message]:
    if not old or old == new:
        return messages
    out = []
    for m in messages:
        m = dict(m)
        if isinstance(m.get("content"), str):
            m["content"] = m["content"].replace(old, new)
        out.append(m)
    return out


def teacher_transcript(env_name: str, task: Task) -> Transcript:
    """One ground-truth transcript of ``task``, run through a fresh ``env_name`` environment.

    If the environment offers a ``calculator`` tool and the question is "What is EXPR?", the teacher
    calls it once on EXPR (call id ``call_1_0``, as the rollout agent numbers its first call) and
    states the tool's result. If it offers ``bash`` and ``submit`` and the task is an instance
    with a gold ``patch`` (swe), the teacher applies the patch with ``git apply`` in ``bash``,
    submits, and says so; the sandbox's working directory (a temporary directory on the local
    backend) is written as the instance's ``workdir`` (default /testbed, the docker backend's:
    what the rollouts of the pod presets see). Otherwise it states the gold answer directly.
    ValueError when the transcript does not pass the environment's own grading (the tool result
    is not the answer; the patch does not resolve the instance)."""
    env = make_env(env_name)
    sandbox_dir = ""
    try:
        messages, tools = env.reset(task)
        messages = [dict(m) for m in messages]
        names = {t["function"]["name"] for t in tools}
        question = task.messages[-1].get("content", "") if task.messages else ""
        m = _QUESTION.search(question) if isinstance(question, str) else None
        instance = task.metadata.get("instance") if isinstance(task.metadata, dict) else None
        if {"bash", "submit"} <= names and isinstance(instance, dict) and instance.get("patch"):
            sandbox_dir = _swe_teacher(env, task, messages)
        elif "calculator" in names and m:
            call = {"id": "call_1_0", "type": "function", "function": {
                "name": "calculator", "arguments": json.dumps({"expression": m.group(1)})}}
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            results = env.step([call])
            messages.extend(results)
            messages.append(_final(results[0]["content"]))
        else:
            messages.append(_final(str(task.metadata["answer"])))
        result = env.evaluate(messages)
    finally:
        env.close()
    if not result.passed:
        raise ValueError(f"task {task.id}: the teacher transcript does not pass ({result.details})")
    if sandbox_dir:
        messages = _replace_text(messages, sandbox_dir, instance.get("workdir", "/testbed"))
    return {"id": f"teacher-{task.id}", "group": task.id, "task_id": task.id, "env": env_name,
            "reward": float(result.reward), "tools": tools, "messages": messages}


def teacher_records(env_name: str) -> list[Transcript]:
    """The bundled teachers of ``env_name`` ("calculator": its split pool of 400 generated tasks;
    "maths": the bundled problems; "swe": the bundled instances, through the local sandbox
    backend), one per task, sorted by task id, each with its split ("all" for an environment
    without one)."""
    if env_name not in BUNDLED_TEACHERS:
        raise ValueError(f"no bundled teachers for {env_name!r}; known: {sorted(BUNDLED_TEACHERS)}")
    spec = env_spec(env_name)
    tasks = spec.split_pool() if spec.split_pool else spec.load_tasks(None)
    out = []
    for task in sorted(tasks, key=lambda t: t.id):
        rec = teacher_transcript(env_name, task)
        out.append({**{k: rec[k] for k in ("id", "group", "task_id", "env")},
                    "split": "all" if spec.test_fraction is None else task_split(
                        task, spec.test_fraction),
                    **{k: rec[k] for k in ("reward", "tools", "messages")}})
    return out


# -- loading ------------------------------------------------------------------------------------
def _check_record(obj: dict[str, Any], where: str) -> None:
    if not isinstance(obj.get("task_id"), str) or not obj["task_id"]:
        raise JsonlError(f"{where}: 'task_id' must be a non-empty string")
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise JsonlError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise JsonlError(f"{where}: message {i} must be an object with a 'role'")
    if not any(m["role"] == "assistant" for m in msgs):
        raise JsonlError(f"{where}: no assistant message")
    reward = obj.get("reward", 1.0)
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        raise JsonlError(f"{where}: 'reward' must be a finite number, got {reward!r}")


def load_teachers(env_or_path: str) -> dict[str, list[Transcript]]:
    """task id -> its teacher transcripts (in file order), from the bundled file of an environment
    ("calculator", "maths") or from a JSONL path (local or gs://). A bad record is a ValueError
    naming ``file:line``; a name that is neither a bundled environment nor a path, a ValueError."""
    path = BUNDLED_TEACHERS.get(env_or_path)
    if path is None:
        looks_like_path = (env_or_path.endswith(".jsonl") or "/" in env_or_path
                           or os.sep in env_or_path or os.path.exists(env_or_path))
        if not looks_like_path:
            raise ValueError(f"unknown environment {env_or_path!r} for teachers; bundled: "
                             f"{sorted(BUNDLED_TEACHERS)} (or give a JSONL path)")
        path = env_or_path
    out: dict[str, list[Transcript]] = {}
    for obj, where in read_jsonl(path):
        _check_record(obj, where)
        out.setdefault(obj["task_id"], []).append(obj)
    if not out:
        raise ValueError(f"{path}: no teacher records")
    return out


def teacher_rollout_record(transcript: Transcript, tokenizer, group: Any,
                           index: int = 0) -> dict[str, Any]:
    """A teacher transcript as a rollout record of ``group`` (module docstring): tokens of the
    Qwen chat rendering of its messages and tools, "logprobs" 0.0 on the assistant tokens (the
    trainable ones of kat_jax.data.chat) and null elsewhere, "teacher": true, advantage 0, its
    reward (default 1). A transcript that does not render is a ValueError naming its id."""
    from kat_jax.data.chat import ChatError, encode_chat
    from kat_jax.data.records import rollout_record
    from kat_jax.trees.trajectory import TAGS

    name = transcript.get("id", f"teacher-{group}-{index}")
    try:
        t = encode_chat(tokenizer, list(transcript["messages"]), transcript.get("tools") or None)
    except ChatError as e:
        raise ValueError(f"teacher {name!r}: {e}") from None
    tag_names = {v: k for k, v in TAGS.items()}
    return rollout_record(
        f"teacher/{group}#{index}", group, t.tokens.tolist(),
        [0.0 if x else None for x in t.trainable], [None] * len(t), [tag_names.get(int(x))
                                                                    for x in t.tags],
        float(transcript.get("reward", 1.0)), "ok", teacher=True, advantage=0.0,
        task_id=transcript.get("task_id", group))


# -- the measure --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RelativeRewardConfig:
    """Weights of the relative reward (module docstring): outcome difference, tool-call similarity
    to the nearest teacher, final answer equal to the nearest teacher's; ``eps`` of normalize_group;
    ``same_tool_cost``: the substitution cost of a call to the same tool with other arguments."""

    w_outcome: float = 1.0
    w_process: float = 0.5
    w_answer: float = 0.5
    same_tool_cost: float = 0.5
    eps: float = 1e-6


def _canon(value: Any) -> Any:
    if isinstance(value, str):
        return " ".join(value.split())
    if isinstance(value, dict):
        return {str(k): _canon(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canon(v) for v in value]
    return value


def _messages(t: Transcript | Sequence[Message]) -> Sequence[Message]:
    return t["messages"] if isinstance(t, Mapping) else t


def tool_call_sequence(messages: Sequence[Message]) -> list[Call]:
    """``(name, canonical arguments)`` of every tool call of the assistant messages, in order.
    Arguments that are not JSON are kept as their whitespace-collapsed text."""
    out: list[Call] = []
    for m in messages:
        if not isinstance(m, Mapping) or m.get("role") != "assistant":
            continue
        for call in m.get("tool_calls") or []:
            fn = call.get("function", call) if isinstance(call, Mapping) else {}
            name = str(fn.get("name", "")) if isinstance(fn, Mapping) else ""
            args = fn.get("arguments", {}) if isinstance(fn, Mapping) else {}
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError:
                    out.append((name, " ".join(args.split())))
                    continue
            out.append((name, json.dumps(_canon(args), sort_keys=True, separators=(",", ":"))))
    return out


def call_distance(a: Sequence[Call], b: Sequence[Call], same_tool_cost: float = 0.5) -> float:
    """Weighted Levenshtein distance (module docstring) between two tool-call sequences."""
    prev = [float(j) for j in range(len(b) + 1)]
    for i, x in enumerate(a, 1):
        cur = [float(i)]
        for j, y in enumerate(b, 1):
            sub = 0.0 if x == y else same_tool_cost if x[0] == y[0] else 1.0
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + sub))
        prev = cur
    return prev[-1]


def similarity(a: Sequence[Call], b: Sequence[Call], same_tool_cost: float = 0.5) -> float:
    """``1 - call_distance / max(len)``, in [0, 1]; 1 when both sequences are empty."""
    n = max(len(a), len(b))
    return 1.0 if n == 0 else 1.0 - call_distance(a, b, same_tool_cost) / n


def _nearest(calls: Sequence[Call], teachers: Sequence[Transcript | Sequence[Message]],
             cost: float) -> tuple[int, float]:
    if not teachers:
        raise ValueError("no teacher transcripts for this task")
    sims = [similarity(calls, tool_call_sequence(_messages(t)), cost) for t in teachers]
    best = max(range(len(sims)), key=lambda i: (sims[i], -i))
    return best, sims[best]


def relative_reward(rollout_messages: Sequence[Message], outcome_reward: float,
                    teachers: Sequence[Transcript | Sequence[Message]],
                    cfg: RelativeRewardConfig = RelativeRewardConfig()) -> float:
    """The rollout's reward relative to its task's teachers (module docstring). ``teachers``: the
    records of load_teachers (their optional "reward" is the teacher outcome, default 1) or bare
    message lists (outcome 1). ValueError when there are no teachers."""
    best, sim = _nearest(tool_call_sequence(rollout_messages), teachers, cfg.same_tool_cost)
    teacher_outcome = max(float(t.get("reward", 1.0)) if isinstance(t, Mapping) else 1.0
                          for t in teachers)
    pred = extract_answer(last_assistant_text(rollout_messages))
    gold = extract_answer(last_assistant_text(_messages(teachers[best])))
    same_answer = float(pred is not None and gold is not None and answers_match(pred, gold))
    return (cfg.w_outcome * (float(outcome_reward) - teacher_outcome) + cfg.w_process * sim
            + cfg.w_answer * same_answer)


def normalize_group(rewards: Sequence[float], eps: float = 1e-6) -> list[float]:
    """``(r - mean) / (std + eps)`` over one group, std unbiased (n - 1); a group of one has
    std 0 (its reward becomes 0)."""
    r = [float(x) for x in rewards]
    if not r:
        return []
    mean = sum(r) / len(r)
    var = sum((x - mean) ** 2 for x in r) / (len(r) - 1) if len(r) > 1 else 0.0
    return [(x - mean) / (math.sqrt(var) + eps) for x in r]


def divergence(partial_messages: Sequence[Message],
               teachers: Sequence[Transcript | Sequence[Message]],
               same_tool_cost: float = 0.5) -> float:
    """``1 - max over teachers of similarity(calls so far, teacher's first as many calls)``, in
    [0, 1]; 0 before the first tool call (module docstring). ValueError when there are no teachers."""
    calls = tool_call_sequence(partial_messages)
    if not teachers:
        raise ValueError("no teacher transcripts for this task")
    k = len(calls)
    if k == 0:
        return 0.0
    return 1.0 - max(similarity(calls, tool_call_sequence(_messages(t))[:k], same_tool_cost)
                     for t in teachers)
