"""Teacher transcripts and the relative reward of RFT (kat_jax.envs.teachers, issue 18)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from kat_jax.data.chat import encode_chat
from kat_jax.data.sources import JsonlGroups, check_chat
from kat_jax.data.tokenizer import ByteTokenizer
from kat_jax.envs import teachers as T
from kat_jax.envs.base import Task
from kat_jax.envs.registry import env_spec, make_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "make_teacher_data.py"


def _script():
    spec = importlib.util.spec_from_file_location("make_teacher_data", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _records(name: str) -> list[dict]:
    with open(T.BUNDLED_TEACHERS[name], encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _tasks(name: str) -> dict:
    spec = env_spec(name)
    tasks = spec.split_pool() if spec.split_pool else spec.load_tasks(None)
    return {t.id: t for t in tasks}


# -- the bundled files ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["calculator", "maths", "swe"])
def test_bundled_files_are_what_the_script_generates(name):
    with open(T.BUNDLED_TEACHERS[name], encoding="utf-8") as f:
        assert f.read() == _script().render(name)


@pytest.mark.parametrize("name, n_tasks, n_test", [("calculator", 400, 76), ("maths", 120, 23)])
def test_one_teacher_per_task_of_the_pool_sorted_by_id(name, n_tasks, n_test):
    recs = _records(name)
    ids = [r["task_id"] for r in recs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) == n_tasks
    assert set(ids) == set(_tasks(name))
    assert sum(r["split"] == "test" for r in recs) == n_test
    assert all(r["env"] == name and r["reward"] == 1.0 for r in recs)


@pytest.mark.parametrize("name", ["calculator", "maths"])
def test_every_teacher_replays_through_the_real_env_and_passes(name):
    tasks = _tasks(name)
    for rec in _records(name):
        env = make_env(name)
        start, tools = env.reset(tasks[rec["task_id"]])
        msgs = rec["messages"]
        assert msgs[:len(start)] == start and rec["tools"] == tools, rec["id"]
        i = len(start)
        while i < len(msgs):
            m = msgs[i]
            assert m["role"] == "assistant", rec["id"]
            i += 1
            calls = m.get("tool_calls") or []
            if calls:
                results = env.step(calls)
                assert msgs[i:i + len(calls)] == results, rec["id"]
                i += len(calls)
        assert msgs[-1]["role"] == "assistant" and not msgs[-1].get("tool_calls")
        result = env.evaluate(msgs)
        env.close()
        assert result.passed and result.reward == 1.0, (rec["id"], result.details)
        if name == "calculator":   # the tool path: one calculator call on the question
            assert [c[0] for c in T.tool_call_sequence(msgs)] == ["calculator"]


@pytest.mark.parametrize("name", ["calculator", "maths", "swe"])
def test_bundled_teachers_are_valid_sft_chat_records(name):
    tok = ByteTokenizer()
    for k, rec in enumerate(_records(name)):
        check_chat(rec, f"{name}:{k + 1}")
        traj = encode_chat(tok, rec["messages"], rec.get("tools"), id=rec["id"])
        assert traj.trainable.any()
    groups = JsonlGroups([T.BUNDLED_TEACHERS[name]], "chat")   # the sft stage's reader
    assert len(groups) == len(_records(name))


def test_swe_teachers_apply_the_gold_patch_and_submit_in_the_docker_workdir():
    # generated through the local backend and graded there (the file test above regenerates
    # them); the sandbox's temporary directory is written as the instance's workdir
    recs = _records("swe")
    tasks = _tasks("swe")
    assert [r["task_id"] for r in recs] == sorted(tasks)
    for r in recs:
        assert r["reward"] == 1.0 and r["split"] == "all"
        assert "/testbed" in r["messages"][0]["content"]
        assert [c[0] for c in T.tool_call_sequence(r["messages"])] == ["bash", "submit"]
        cmd = json.loads(r["messages"][2]["tool_calls"][0]["function"]["arguments"])["command"]
        assert tasks[r["task_id"]].metadata["instance"]["patch"] in cmd


def test_teacher_transcript_of_a_calculator_task_calls_the_tool_on_the_expression():
    task = _tasks("calculator")["calc-1-0-0"]
    rec = T.teacher_transcript("calculator", task)
    call = rec["messages"][2]["tool_calls"][0]
    assert call["function"] == {"name": "calculator", "arguments": '{"expression": "19 + 74"}'}
    assert rec["messages"][3]["content"] == "93"
    assert rec["messages"][4]["content"] == "The answer is \\boxed{93}."


def test_a_teacher_that_does_not_pass_is_an_error():
    # the calculator says 4, the gold answer says 5: the teacher would be graded 0
    bad = Task(id="x", messages=[{"role": "user", "content": "What is 2 + 2?"}],
                     metadata={"answer": "5"})
    with pytest.raises(ValueError, match="task x: the teacher transcript does not pass"):
        T.teacher_transcript("calculator", bad)


# -- loading --------------------------------------------------------------------------------------
def test_load_teachers_by_env_name_and_by_path(tmp_path):
    calc = T.load_teachers("calculator")
    assert len(calc) == 400 and all(len(v) == 1 for v in calc.values())
    assert calc["calc-1-0-0"][0]["messages"][-1]["content"] == "The answer is \\boxed{93}."
    p = tmp_path / "mine.jsonl"
    rec = {"task_id": "t", "messages": [{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": "\\boxed{1}"}]}
    p.write_text(json.dumps(rec) + "\n\n" + json.dumps({**rec, "reward": 0.5}) + "\n")
    got = T.load_teachers(str(p))
    assert list(got) == ["t"] and [t.get("reward", 1.0) for t in got["t"]] == [1.0, 0.5]


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "'task_id' must be"),
    ('{"task_id": "t", "messages": []}', "'messages' must be a non-empty list"),
    ('{"task_id": "t", "messages": ["x"]}', "message 0 must be an object"),
    ('{"task_id": "t", "messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
    ('{"task_id": "t", "reward": "1", "messages": [{"role": "assistant", "content": "x"}]}',
     "'reward' must be a finite number"),
])
def test_a_bad_teacher_record_names_file_and_line(tmp_path, line, message):
    good = '{"task_id": "t", "messages": [{"role": "assistant", "content": "x"}]}'
    p = tmp_path / "bad.jsonl"
    p.write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=f"{p}:2: .*{message}"):
        T.load_teachers(str(p))


def test_load_teachers_rejects_an_unknown_env_and_an_empty_file(tmp_path):
    with pytest.raises(ValueError, match="unknown environment 'nope'.*calculator"):
        T.load_teachers("nope")
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    with pytest.raises(ValueError, match="no teacher records"):
        T.load_teachers(str(p))
    with pytest.raises(FileNotFoundError):
        T.load_teachers(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="no bundled teachers for 'nope'"):
        T.teacher_records("nope")


# -- the relative reward on hand-built cases ------------------------------------------------------
PROMPT = [{"role": "system", "content": "s"}, {"role": "user", "content": "What is 19 + 74?"}]


def calc(expr, call_id="c"):
    return {"id": call_id, "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": expr})}}


def tool_path(*exprs, answer="93"):
    msgs = list(PROMPT)
    for e in exprs:
        msgs += [{"role": "assistant", "content": None, "tool_calls": [calc(e)]},
                 {"role": "tool", "tool_call_id": "c", "name": "calculator", "content": "?"}]
    return msgs + [{"role": "assistant", "content": f"So \\boxed{{{answer}}}."}]


TEACHER = {"task_id": "t", "reward": 1.0, "messages": tool_path("19 + 74")}


def test_relative_reward_of_a_rollout_identical_to_the_teacher():
    # outcome 1 - teacher 1 = 0; similarity 1; same answer 1: 1*0 + 0.5*1 + 0.5*1 = 1
    assert T.relative_reward(tool_path("19 + 74"), 1.0, [TEACHER]) == pytest.approx(1.0)
    # whitespace in arguments is not a difference
    assert T.relative_reward(tool_path("19   +  74 "), 1.0, [TEACHER]) == pytest.approx(1.0)


def test_relative_reward_of_a_different_but_correct_path():
    # no tool call, right answer: distance 1 (one deletion) / max len 1 -> similarity 0:
    # 0 + 0.5*0 + 0.5*1 = 0.5
    direct = [*PROMPT, {"role": "assistant", "content": "It is \\boxed{93}"}]
    assert T.relative_reward(direct, 1.0, [TEACHER]) == pytest.approx(0.5)
    # calculator("19+74") then calculator("93"): same tool other args (0.5) + one insertion (1):
    # distance 1.5 / max len 2 -> similarity 0.25: 0 + 0.5*0.25 + 0.5*1 = 0.625
    assert T.relative_reward(tool_path("19+74", "93"), 1.0, [TEACHER]) == pytest.approx(0.625)


def test_relative_reward_of_a_wrong_answer():
    # outcome 0 - 1 = -1; similarity 1; answer 94 != 93: -1 + 0.5 + 0 = -0.5
    assert T.relative_reward(tool_path("19 + 74", answer="94"), 0.0, [TEACHER]) == pytest.approx(-0.5)
    # a call to another tool, wrong answer: substitution 1 / 1 -> 0: -1 + 0 + 0 = -1
    other = [*PROMPT, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "python", "arguments": {"code": "19+74"}}}]},
        {"role": "assistant", "content": "\\boxed{92}"}]
    assert T.relative_reward(other, 0.0, [TEACHER]) == pytest.approx(-1.0)


def test_relative_reward_of_an_empty_rollout():
    # no calls (similarity 0), no answer (0), outcome 0: -1 + 0 + 0 = -1
    assert T.relative_reward(list(PROMPT), 0.0, [TEACHER]) == pytest.approx(-1.0)
    assert T.relative_reward([], 0.0, [TEACHER]) == pytest.approx(-1.0)


def test_relative_reward_takes_the_nearest_teacher_and_the_best_teacher_outcome():
    direct_teacher = {"task_id": "t", "reward": 0.5,
                      "messages": [*PROMPT, {"role": "assistant", "content": "\\boxed{93}"}]}
    direct = [*PROMPT, {"role": "assistant", "content": "\\boxed{93}"}]
    # nearest: the direct teacher (similarity 1, same answer); teacher outcome max(1, 0.5) = 1:
    # 0 + 0.5 + 0.5 = 1
    assert T.relative_reward(direct, 1.0, [TEACHER, direct_teacher]) == pytest.approx(1.0)
    # against the direct teacher alone (outcome 0.5): 1*(1 - 0.5) + 0.5 + 0.5 = 1.5
    assert T.relative_reward(direct, 1.0, [direct_teacher]) == pytest.approx(1.5)
    # bare message lists are teachers of outcome 1
    assert T.relative_reward(direct, 1.0, [direct_teacher["messages"]]) == pytest.approx(1.0)


def test_relative_reward_weights_are_configurable():
    cfg = T.RelativeRewardConfig(w_outcome=2.0, w_process=1.0, w_answer=0.0, same_tool_cost=1.0)
    # calculator("19+74") vs the teacher's "19 + 74": substitution 1 -> similarity 0;
    # 2*(0 - 1) + 1*0 + 0 = -2
    assert T.relative_reward(tool_path("19+74"), 0.0, [TEACHER], cfg) == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="no teacher"):
        T.relative_reward(tool_path("1"), 1.0, [])


def test_call_distance_and_similarity():
    a, b, c = ("calc", "x"), ("calc", "y"), ("py", "x")
    assert T.call_distance([a, b], [a, b]) == 0
    assert T.call_distance([a], [b]) == 0.5 and T.call_distance([a], [c]) == 1
    assert T.call_distance([a, b, c], [b, c]) == 1          # one deletion
    assert T.similarity([], []) == 1.0 and T.similarity([a], []) == 0.0
    assert T.similarity([a, b], [a, c]) == pytest.approx(1 - 1 / 2)


# -- normalisation and divergence -----------------------------------------------------------------
@pytest.mark.parametrize("rewards", [[1.0, -0.5, 0.625, -1.0], [0.3, 0.3, 0.3], [2.0, 0.0],
                                     [5.0]])
def test_normalize_group_matches_numpy(rewards):
    r = np.asarray(rewards)
    std = r.std(ddof=1) if len(r) > 1 else 0.0
    ref = (r - r.mean()) / (std + 1e-6)
    np.testing.assert_allclose(T.normalize_group(rewards), ref, rtol=1e-12, atol=1e-12)
    assert T.normalize_group([]) == []


def test_divergence_over_tool_call_prefixes():
    two = {"task_id": "t", "messages": tool_path("19 + 74", "93")}
    first = lambda *exprs: tool_path(*exprs)[:-1]   # no final answer yet
    assert T.divergence(list(PROMPT), [two]) == 0.0               # nothing called yet
    assert T.divergence(first("19 + 74"), [two]) == 0.0           # on the teacher's path
    assert T.divergence(first("19 + 74", "93"), [two]) == 0.0
    assert T.divergence(first("19+74"), [two]) == pytest.approx(0.5)   # same tool, other args
    # second call off the path: distance 0.5 over 2 calls -> similarity 0.75
    assert T.divergence(first("19 + 74", "92"), [two]) == pytest.approx(0.25)
    # more calls than the teacher made: one insertion over 3 -> 1 - 2/3
    assert T.divergence(first("19 + 74", "93", "1"), [two]) == pytest.approx(1 / 3)
    other = [*PROMPT, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "python", "arguments": "{}"}}]}]
    assert T.divergence(other, [two]) == 1.0
    # the closest teacher counts
    assert T.divergence(other, [two, {"task_id": "t", "messages": other}]) == 0.0
    with pytest.raises(ValueError, match="no teacher"):
        T.divergence(other, [])
