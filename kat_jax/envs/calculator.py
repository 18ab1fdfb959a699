"""Calculator toy: arithmetic questions, a ``calculator`` tool, reward 1 for the right final answer.

Small enough for a tiny model to learn by RL on CPU: questions are generated from a seed (two to three
integers, ``+ - *``, and exact divisions at higher levels). The tool evaluates expressions safely with
``ast`` (numbers, ``+ - * / // % **`` with bounded exponents, parentheses; nothing else, no ``eval``).

Default tasks: 100 generated ones. Train/test split (`kat-jax eval`, registry.task_split): about
20% of the tasks are "test", chosen by a hash of the question; without a tasks file the split
partitions a pool of SPLIT_POOL = 400 generated tasks (the default 100 among them): 76 test, 324
train.

The compact family (environment ``calculator_small``, SmallCalculatorEnv): for the tiny byte-level
model, whose calculator prompt above (system prompt + the tool's JSON schema in the Qwen tools
header) is ~790 tokens. Questions "What is A*B?" with A, B in 32..99 (so the question, the tool
call and the 4-digit product have one fixed layout: a 2-layer model can learn to copy digits by
relative position), a one-line system prompt, and the same ``calculator`` tool offered without
its schema (no tools header: the model learns the call format from SFT data,
scripts/make_calculator_small_data.py). The prompt is 82 byte tokens, a teacher episode ~190.
Its split pool is SMALL_SPLIT_POOL = 400 distinct generated tasks (79 test, 321 train).
"""

from __future__ import annotations

import ast
import operator
import random
from fractions import Fraction
from typing import Any

from kat_jax.envs.base import Task, ToolSchema, function_schema
from kat_jax.envs.maths import AnswerEnv, read_answer_tasks

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_ABS = 10 ** 30
MAX_EXPONENT = 100
MAX_LEN = 500

SYSTEM_PROMPT = ("Answer the arithmetic question. You may call the `calculator` tool. Give the final "
                 "answer as \\boxed{number}.")
CALCULATOR_SCHEMA = function_schema(
    "calculator", "Evaluate an arithmetic expression (numbers, + - * / // % ** and parentheses).",
    {"expression": {"type": "string", "description": "e.g. (12 + 7) * 3"}}, ["expression"])


def safe_eval(expr: str) -> int | Fraction | float:
    """Value of an arithmetic expression; ``ValueError`` for anything else or out-of-range numbers.

    Division is exact (a Fraction) between integers; a float appears only when the input has one.
    """
    if not isinstance(expr, str) or len(expr) > MAX_LEN:
        raise ValueError(f"expression must be a string of at most {MAX_LEN} characters")
    try:
        tree = ast.parse(expr.replace("^", "**").replace("×", "*").replace("÷", "/"), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"invalid expression: {e.msg}") from None

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(b) > MAX_EXPONENT:
                raise ValueError(f"exponent larger than {MAX_EXPONENT}")
            if isinstance(node.op, ast.Div) and not isinstance(a, float) and not isinstance(b, float):
                a = Fraction(a)
            try:
                out = _BINOPS[type(node.op)](a, b)
            except ZeroDivisionError:
                raise ValueError("division by zero") from None
            except OverflowError:
                raise ValueError("number too large") from None
            if isinstance(out, complex) or abs(out) > MAX_ABS:
                raise ValueError("result out of range")
            return out
        raise ValueError(f"unsupported syntax: {type(node).__name__}")

    return ev(tree)


def format_number(x: int | Fraction | float) -> str:
    if isinstance(x, Fraction):
        return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(x) if isinstance(x, float) else str(x)


def make_question(rng: random.Random, level: int = 1) -> tuple[str, str]:
    """One (question, answer) pair. Level 1: a op b; 2: three operands; 3: with exact division."""
    hi = 10 ** min(level + 1, 4)
    ops = ["+", "-", "*"]
    a, b, c = (rng.randint(2, hi) for _ in range(3))
    if level <= 1:
        expr = f"{a} {rng.choice(ops)} {b}"
    elif level == 2:
        expr = f"{a} {rng.choice(ops)} {b} {rng.choice(ops)} {c}"
    else:
        q = rng.randint(2, 50)
        expr = f"({a * q} / {q}) {rng.choice(ops)} {b}"
    return f"What is {expr}?", format_number(safe_eval(expr))


def generate_tasks(n: int = 200, seed: int = 0, level: int = 1) -> list[Task]:
    """``n`` reproducible calculator tasks."""
    rng = random.Random(seed * 1000 + level)
    tasks = []
    for i in range(n):
        q, a = make_question(rng, level)
        tasks.append(Task(id=f"calc-{level}-{seed}-{i}", messages=[{"role": "user", "content": q}],
                          metadata={"answer": a}))
    return tasks


def load_tasks(path: str | None = None, n: int = 100) -> list[Task]:
    """Tasks from JSONL ``{"id", "question", "answer"}`` (maths.read_answer_tasks), or ``n``
    generated ones (seed 0; levels 1, 2, 3 get ceil(n/3), ceil(n/3) and the rest: 34, 34, 32 of
    the default 100). Generation is a prefix per level: the tasks of a smaller ``n`` are among
    those of a larger one, with the same ids."""
    if path is not None:
        return read_answer_tasks(path)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    per_level = -(-n // 3)
    sizes = (per_level, per_level, n - 2 * per_level)
    return [t for level, size in zip((1, 2, 3), sizes) for t in generate_tasks(size, 0, level)]


SPLIT_POOL = 400  # generated tasks behind the train/test split: 80 or so are test (at least 64)


def split_pool() -> list[Task]:
    """The generated tasks that the train/test split (kat_jax.envs.registry.task_split) partitions
    when no tasks file is given: ``load_tasks(None, SPLIT_POOL)``, the default 100 among them."""
    return load_tasks(None, SPLIT_POOL)


SMALL_SYSTEM_PROMPT = "Call calculator, then answer \\boxed{n}."
SMALL_SPLIT_POOL = 400
SMALL_RANGE = (32, 99)  # 32 * 32 = 1024, 99 * 99 = 9801: every product has 4 digits


def make_small_question(rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair of the compact family: "What is A*B?", A, B in SMALL_RANGE."""
    a, b = rng.randint(*SMALL_RANGE), rng.randint(*SMALL_RANGE)
    expr = f"{a}*{b}"
    return f"What is {expr}?", format_number(safe_eval(expr))


def small_tasks(n: int = SMALL_SPLIT_POOL, seed: int = 0) -> list[Task]:
    """``n`` reproducible compact tasks with distinct questions (ids calc-small-SEED-I); the
    tasks of a smaller ``n`` are the first ones of a larger one."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng, seen, tasks = random.Random(seed * 1000 + 7), set(), []
    while len(tasks) < n:
        q, a = make_small_question(rng)
        if q in seen:
            continue
        seen.add(q)
        tasks.append(Task(id=f"calc-small-{seed}-{len(tasks)}",
                          messages=[{"role": "user", "content": q}], metadata={"answer": a}))
    return tasks


def load_small_tasks(path: str | None = None) -> list[Task]:
    """Tasks from JSONL ``{"id", "question", "answer"}`` (maths.read_answer_tasks), or the
    SMALL_SPLIT_POOL generated compact ones (which are also its split pool)."""
    return read_answer_tasks(path) if path is not None else small_tasks()


class CalculatorEnv(AnswerEnv):
    """Arithmetic with a ``calculator`` tool; reward 1 iff the boxed final answer is right."""

    name = "calculator"
    system_prompt = SYSTEM_PROMPT

    def schemas(self) -> list[ToolSchema]:
        return [CALCULATOR_SCHEMA]

    def tools(self) -> dict[str, Any]:
        return {"calculator": self._calculator}

    @staticmethod
    def _calculator(args: dict[str, Any]) -> str:
        expr = args.get("expression")
        if not isinstance(expr, str):
            raise ValueError("`expression` must be a string")
        return format_number(safe_eval(expr))


class SmallCalculatorEnv(CalculatorEnv):
    """The compact family (module docstring): a one-line system prompt, and the ``calculator``
    tool callable but not described (no schema, hence no tools header in the prompt)."""

    name = "calculator_small"
    system_prompt = SMALL_SYSTEM_PROMPT

    def schemas(self) -> list[ToolSchema]:
        return []
