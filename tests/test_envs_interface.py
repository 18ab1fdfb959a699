"""Environment interface: tool-call parsing, registry, concurrent steps, maths answers, calculator."""

import json
import re
import threading
import time
from fractions import Fraction

import pytest

from kat_jax.envs import EpisodeStatus, EvalResult, Task, list_envs, make_env, parse_tool_call
from kat_jax.envs.answers import answers_match, extract_answer, normalize
from kat_jax.envs.base import Env, function_schema
from kat_jax.envs.calculator import generate_tasks, safe_eval
from kat_jax.envs.maths import load_tasks as load_maths


def call(name, args, cid="c1"):
    return {"id": cid, "type": "function",
            "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}}


def test_registry_lists_builtin_envs_and_rejects_unknown():
    assert {"calculator", "maths", "swe"} <= set(list_envs())
    with pytest.raises(KeyError):
        make_env("no-such-env")


def test_malformed_and_unknown_tool_calls_give_error_messages_not_exceptions():
    env = make_env("calculator")
    env.reset(generate_tasks(1)[0])
    msgs = env.step([call("calculator", "{not json", "a"), call("nope", {}, "b"), "garbage",
                     {"id": "d", "function": {"name": "calculator", "arguments": "[1]"}},
                     call("calculator", {"expression": "__import__('os')"}, "e")])
    assert [m["role"] for m in msgs] == ["tool"] * 5
    assert [m["tool_call_id"] for m in msgs] == ["a", "b", "", "d", "e"]
    assert all(m["content"].startswith("Error") for m in msgs)
    assert "unknown tool" in msgs[1]["content"]
    assert env.status == EpisodeStatus.OK


def test_parse_tool_call_accepts_dict_arguments():
    assert parse_tool_call({"id": "x", "function": {"name": "f", "arguments": {"a": 1}}}) == \
        ("x", "f", {"a": 1}, None)


def test_step_runs_calls_of_one_turn_concurrently_and_keeps_order():
    class Slow(Env):
        def reset(self, task):
            return task.messages, [function_schema("sleep", "sleeps", {"s": {"type": "number"}})]

        def tools(self):
            def sleep(a):
                time.sleep(a["s"])
                return f"{a['s']} {threading.get_ident()}"
            return {"sleep": sleep}

    env = Slow()
    t = time.monotonic()
    out = env.step([call("sleep", {"s": 0.3}, str(i)) for i in range(4)])
    assert time.monotonic() - t < 1.0
    assert [m["tool_call_id"] for m in out] == ["0", "1", "2", "3"]
    assert len({m["content"].split()[1] for m in out}) > 1


def test_calculator_episode_rewards_the_right_boxed_answer():
    task = Task("t", [{"role": "user", "content": "What is 12 * 34 + 5?"}], {"answer": "413"})
    env = make_env("calculator")
    messages, tools = env.reset(task)
    assert tools[0]["function"]["name"] == "calculator" and messages[0]["role"] == "system"
    [res] = env.step([call("calculator", {"expression": "12 * 34 + 5"})])
    assert res["content"] == "413"
    good = env.evaluate([*messages, {"role": "assistant", "content": "It is \\boxed{413}."}])
    bad = env.evaluate([*messages, {"role": "assistant", "content": "\\boxed{412}"}])
    assert (good.reward, good.passed, bad.reward, bad.passed) == (1.0, True, 0.0, False)


def test_safe_eval_is_exact_and_refuses_anything_but_arithmetic():
    assert safe_eval("(12 + 7) * 3") == 57
    assert safe_eval("7 / 2") == Fraction(7, 2)
    assert safe_eval("2 ^ 10") == 1024
    assert safe_eval("-3 % 5") == 2
    for bad in ["__import__('os').system('true')", "x + 1", "[1][0]", "2 ** 1000", "1 / 0",
                "(lambda: 1)()", "10 ** 20 * 10 ** 20", "a" * 600]:
        with pytest.raises(ValueError):
            safe_eval(bad)


def test_generated_calculator_tasks_are_reproducible_and_correct():
    a, b = generate_tasks(20, seed=3, level=3), generate_tasks(20, seed=3, level=3)
    assert [t.messages for t in a] == [t.messages for t in b]
    for t in a:
        expr = t.messages[0]["content"][len("What is "):-1]
        assert answers_match(str(safe_eval(expr)), t.metadata["answer"])


@pytest.mark.parametrize("pred,gold", [
    ("\\boxed{\\frac{3}{4}}", "3/4"), ("0.75", "3/4"), ("$\\dfrac{6}{8}$", "0.75"), ("1,000", "1000"),
    ("\\boxed{-16}", "-16"), ("85.50", "85.5"), ("1e3", "1000"), ("\\left( 5 \\right)", "5"),
    ("The answer is 27.8.", "27.8"), ("Answer: \\frac{5}{6}", "5/6"), ("\\boxed{x = 9}", "x=9"),
])
def test_answers_match_normalised_exact_or_numeric(pred, gold):
    assert answers_match(extract_answer(pred) or pred, gold)


@pytest.mark.parametrize("pred,gold", [("0.74", "3/4"), ("\\boxed{5}", "-5"), (None, "1"), ("abc", "1"),
                                       ("1/0", "1")])
def test_answers_mismatch(pred, gold):
    assert not answers_match(extract_answer(pred) if pred else None, gold)


def test_extract_answer_prefers_the_last_boxed_with_nested_braces():
    assert extract_answer("first \\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert normalize("\\frac{1}{2}") == "1/2"
    assert extract_answer("so 3 apples and 4 pears: 7") == "7"


def test_bundled_maths_problems_gold_scores_1_and_wrong_0():
    tasks = load_maths()
    assert 50 <= len(tasks) <= 200
    env = make_env("maths")
    for t in tasks:
        env.reset(t)
        gold = env.evaluate([{"role": "assistant", "content": f"\\boxed{{{t.metadata['answer']}}}"}])
        none = env.evaluate([{"role": "assistant", "content": "no idea"}])
        assert gold.reward == 1.0 and none.reward == 0.0, t


class _EchoEnv(Env):
    """A user's environment: reward 1 iff the last message repeats the task's answer."""

    name = "echo_test"

    def __init__(self, greeting: str = "hi") -> None:
        super().__init__()
        self.greeting = greeting

    def reset(self, task):
        super().__init__()
        self.task = task
        return list(task.messages), []

    def evaluate(self, messages=()):
        ok = bool(messages) and messages[-1].get("content") == self.task.metadata["answer"]
        return EvalResult(float(ok), ok)

    @classmethod
    def check_task(cls, task, **options):
        env = cls()
        env.reset(task)
        gold = env.evaluate([{"role": "assistant", "content": task.metadata["answer"]}])
        return gold, env.evaluate([{"role": "assistant", "content": ""}])


def _echo_tasks(path):
    return [Task(id=f"echo-{i}", messages=[{"role": "user", "content": "say it"}],
                 metadata={"answer": a}) for i, a in enumerate(["hi", "bye"])]


def test_user_env_registered_explicitly_reaches_make_env_rollout_tasks_and_env_check():
    from kat_jax.envs import ENVS, register_env
    from kat_jax.envs.check import check, checkable_envs
    from kat_jax.rollout.runner import env_tasks

    assert "echo_test" not in list_envs()        # nothing is registered by importing a module
    try:
        register_env("echo_test", _EchoEnv, load_tasks=_echo_tasks, check_task=_EchoEnv.check_task)
        assert "echo_test" in list_envs() and "echo_test" in checkable_envs()
        env = make_env("echo_test", greeting="hello")
        assert isinstance(env, _EchoEnv) and env.greeting == "hello"
        assert [t.id for t in env_tasks("echo_test", None)] == ["echo-0", "echo-1"]
        rows = check("echo_test")
        assert [(r["id"], r["gold"], r["empty"], r["ok"]) for r in rows] == [
            ("echo-0", 1.0, 0.0, True), ("echo-1", 1.0, 0.0, True)]
        with pytest.raises(ValueError, match="already registered"):
            register_env("echo_test", Env)
    finally:
        ENVS.pop("echo_test", None)
    with pytest.raises(ValueError, match="unknown environment 'echo_test'"):
        env_tasks("echo_test", None)


@pytest.mark.parametrize("line,why", [
    ('{"id": "a", "question": "Q?"}', "missing key"),
    ('{"id": "a", "question": 3, "answer": "1"}', "'question' must be a string"),
    ('{"id": "a", "question": "Q?", "answer": "1", "metadata": [1]}', "'metadata' must be"),
    ("[1, 2]", "expected a JSON object"),
    ('{"id": "a", "question": "Q?",', "not valid JSON"),
])
@pytest.mark.parametrize("env", ["calculator", "maths"])
def test_a_bad_task_line_is_an_error_naming_file_and_line(env, line, why, tmp_path):
    from kat_jax.envs import load_env_tasks

    path = tmp_path / "tasks.jsonl"
    path.write_text('{"id": "ok", "question": "1 + 1?", "answer": "2"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:3: .*{why}"):
        load_env_tasks(env, str(path))


def test_a_bad_swe_instance_line_is_an_error_naming_file_and_line(tmp_path):
    from kat_jax.envs.swe import load_instances

    good = {"instance_id": "x", "problem_statement": "fix it", "FAIL_TO_PASS": "[\"t\"]"}
    path = tmp_path / "instances.jsonl"
    for bad, why in [({"problem_statement": "p"}, "'instance_id' must be a string"),
                     ({**good, "PASS_TO_PASS": "not json"}, "'PASS_TO_PASS' must be a list"),
                     ({**good, "FAIL_TO_PASS": 7}, "'FAIL_TO_PASS' must be a list")]:
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:2: {why}"):
            load_instances(str(path))
    path.write_text(json.dumps(good) + "\n")
    assert load_instances(str(path))[0]["FAIL_TO_PASS"] == ["t"]
