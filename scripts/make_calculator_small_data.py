"""Generate the bundled data of the compact calculator family (``calculator_small``, for the
tiny byte-level model of the quickstart; deterministic).

    python scripts/make_calculator_small_data.py          # rewrites the two files below

  teachers_calculator_small.jsonl  one ground-truth episode per task of the family's split pool
                                   (400 tasks, train and test; kat_jax.envs.teachers format): the
                                   env's system + user messages, a `calculator` call on the
                                   question's expression, the tool's result as the env returns
                                   it, then "\\boxed{N}"; the online rft stage's teachers
  sft_calculator_small.jsonl       SFT chat records, train split only: COPIES per train task,
                                   each the teacher's transcript, or with probability GIVE_UP one
                                   that gives up without calling the tool ("I don't know."), so
                                   the SFT model calls the tool only part of the time and RL has
                                   something to learn: call it (README, quickstart)

Every record is replayed through the real environment here (its ``reset`` messages, its tool
results via ``step``, its grading): a teacher must pass, a give-up must fail.
"""

from __future__ import annotations

import json
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kat_jax.envs.calculator import small_tasks  # noqa: E402
from kat_jax.envs.registry import TEST_FRACTION, make_env, task_split  # noqa: E402

ENV = "calculator_small"
DATA = os.path.join(os.path.dirname(__file__), "..", "kat_jax", "assets", "data")
TEACHERS = os.path.join(DATA, "teachers_calculator_small.jsonl")
SFT = os.path.join(DATA, "sft_calculator_small.jsonl")
GIVE_UP = 0.4   # share of the SFT records that give up without the tool
GIVE_UP_TEXT = "I don't know."
COPIES = 2      # SFT records per train task (each drawn independently)
SEED = 0


def _expression(task) -> str:
    return task.messages[-1]["content"][len("What is "):-1]


def transcript(task, kind: str = "teacher") -> dict:
    """One episode of ``task`` through a fresh environment. kind: teacher (the `calculator`
    call on the question's expression, then the tool's result boxed) or give_up (no call, no
    answer: GIVE_UP_TEXT)."""
    env = make_env(ENV)
    try:
        messages, tools = env.reset(task)
        messages = [dict(m) for m in messages]
        if kind == "teacher":
            call = {"id": "call_1_0", "type": "function", "function": {
                "name": "calculator", "arguments": json.dumps({"expression": _expression(task)})}}
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            results = env.step([call])
            messages.extend(results)
            messages.append({"role": "assistant", "content": f"\\boxed{{{results[0]['content']}}}"})
        else:
            messages.append({"role": "assistant", "content": GIVE_UP_TEXT})
        result = env.evaluate(messages)
    finally:
        env.close()
    if result.passed != (kind == "teacher"):
        raise ValueError(f"task {task.id}: a {kind} transcript graded {result.details}")
    return {"tools": tools, "messages": messages, "reward": float(result.reward)}


def teacher_records() -> list[dict]:
    out = []
    for task in small_tasks():
        t = transcript(task)
        out.append({"id": f"teacher-{task.id}", "group": task.id, "task_id": task.id, "env": ENV,
                    "split": task_split(task, TEST_FRACTION), "reward": t["reward"],
                    "tools": t["tools"], "messages": t["messages"]})
    return sorted(out, key=lambda r: r["task_id"])


def sft_records(give_up: float = GIVE_UP, copies: int = COPIES, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for task in small_tasks():
        if task_split(task, TEST_FRACTION) != "train":
            continue
        for c in range(copies):
            kind = "give_up" if rng.random() < give_up else "teacher"
            t = transcript(task, kind)
            out.append({"id": f"sft-{task.id}-{c}", "group": task.id, "kind": kind,
                        "tools": t["tools"], "messages": t["messages"]})
    return out


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main() -> None:
    for path, records in ((TEACHERS, teacher_records()), (SFT, sft_records())):
        text = render(records)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        kinds = {}
        for r in records:
            kinds[r.get("kind", "teacher")] = kinds.get(r.get("kind", "teacher"), 0) + 1
        print(f"{os.path.normpath(path)}: {len(records)} records {kinds}")


if __name__ == "__main__":
    main()
