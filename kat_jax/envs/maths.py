"""Maths environment: one question, a final answer in ``\\boxed{}``, reward 1 iff it matches.

Tasks come from JSONL lines ``{"id", "question", "answer"}``; the bundled set
(kat_jax/assets/maths/problems.jsonl) is written by scripts/make_math_problems.py. No tools: the
episode is a single assistant reply, graded by :func:`kat_jax.envs.answers.answers_match`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from kat_jax.envs.answers import answers_match, extract_answer
from kat_jax.envs.base import Env, EvalResult, Message, Task, ToolSchema, register_env

BUNDLED_MATHS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "maths",
                             "problems.jsonl")
SYSTEM_PROMPT = ("Solve the problem. Reason step by step, then give the final answer as "
                 "\\boxed{answer}, e.g. \\boxed{42} or \\boxed{\\frac{3}{4}}.")


def last_assistant_text(messages: Sequence[Message]) -> str | None:
    """Content of the last assistant message (the final answer lives there), or None."""
    for m in reversed(list(messages)):
        if m.get("role") == "assistant" and isinstance(m.get("content"), str):
            return m["content"]
    return None


def load_tasks(path: str | None = None) -> list[Task]:
    """Tasks from JSONL ``{"id", "question", "answer"}`` (default: the bundled problem set)."""
    tasks = []
    with open(path or BUNDLED_MATHS) as f:
        for line in f:
            if line.strip():
                p = json.loads(line)
                tasks.append(Task(id=str(p["id"]), messages=[{"role": "user", "content": p["question"]}],
                                  metadata={"answer": str(p["answer"]), **p.get("metadata", {})}))
    return tasks


class AnswerEnv(Env):
    """Base of single-answer environments: the reward is 1 iff the final answer matches."""

    system_prompt = SYSTEM_PROMPT

    def __init__(self) -> None:
        super().__init__()
        self.task: Task | None = None

    def reset(self, task: Task) -> tuple[list[Message], list[ToolSchema]]:
        super().__init__()
        self.task = task
        return [{"role": "system", "content": self.system_prompt}, *task.messages], self.schemas()

    def schemas(self) -> list[ToolSchema]:
        return []

    def evaluate(self, messages: Sequence[Message] = ()) -> EvalResult:
        gold = str(self.task.metadata["answer"]) if self.task else ""
        pred = extract_answer(last_assistant_text(messages))
        ok = answers_match(pred, gold)
        return EvalResult(float(ok), ok, self.status, {"predicted": pred, "gold": gold})


@register_env("maths")
class MathEnv(AnswerEnv):
    """Maths problems with verifiable answers (see the module docstring)."""

    name = "maths"
