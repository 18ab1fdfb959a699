"""Maths environment: one question, a final answer in ``\\boxed{}``, reward 1 iff it matches.

Tasks come from JSONL lines ``{"id", "question", "answer"}``; the bundled set
(kat_jax/assets/maths/problems.jsonl) is written by scripts/make_math_problems.py. No tools: the
episode is a single assistant reply, graded by :func:`kat_jax.envs.answers.answers_match`.
Train/test split (`kat-jax eval`, kat_jax.envs.registry.task_split): about 20% of the tasks,
chosen by a hash of the question, are "test" (23 of the bundled 120).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from kat_jax.envs.answers import answers_match, extract_answer, normalize
from kat_jax.envs.base import Env, EvalResult, Message, Task, ToolSchema
from kat_jax.jsonl import JsonlError, read_jsonl

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


def read_answer_tasks(path: str) -> list[Task]:
    """Tasks from JSONL lines ``{"id", "question", "answer", "metadata"?}`` (local or gs://): the
    question becomes the user message, the answer (as a string) and the optional metadata object
    go to ``Task.metadata``. A bad line is a ValueError naming ``file:line``."""
    tasks = []
    for p, where in read_jsonl(path):
        missing = [key for key in ("id", "question", "answer") if key not in p]
        if missing:
            raise JsonlError(f"{where}: missing key(s) {missing} (a task line has "
                             '"id", "question", "answer")')
        if not isinstance(p["question"], str):
            raise JsonlError(f"{where}: 'question' must be a string, got "
                             f"{type(p['question']).__name__}")
        extra = p.get("metadata", {})
        if not isinstance(extra, dict):
            raise JsonlError(f"{where}: 'metadata' must be an object, got {type(extra).__name__}")
        tasks.append(Task(id=str(p["id"]), messages=[{"role": "user", "content": p["question"]}],
                          metadata={"answer": str(p["answer"]), **extra}))
    return tasks


def load_tasks(path: str | None = None) -> list[Task]:
    """Tasks from JSONL ``{"id", "question", "answer"}`` (default: the bundled problem set)."""
    return read_answer_tasks(path or BUNDLED_MATHS)


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

    @classmethod
    def check_task(cls, task: Task, **options: Any) -> tuple[EvalResult, EvalResult]:
        """`env check`: the task graded with its gold answer boxed, then with no answer (each in a
        fresh environment); the gold result's ``details["gold_empty"]`` is True when the gold
        answer is blank (nothing left after normalisation: "", "  ", "$ $"), which `env check`
        reports as broken (a policy answering \\boxed{} would score 1). ``options`` (sandbox
        settings) do not apply."""
        answer = str(task.metadata["answer"])
        results = []
        for content in (f"The answer is \\boxed{{{answer}}}.", "I don't know."):
            env = cls()
            env.reset(task)
            results.append(env.evaluate([*task.messages, {"role": "assistant", "content": content}]))
            env.close()
        results[0].details["gold_empty"] = not normalize(answer)
        return results[0], results[1]


class MathEnv(AnswerEnv):
    """Maths problems with verifiable answers (see the module docstring)."""

    name = "maths"
