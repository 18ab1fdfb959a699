"""The compact calculator family (calculator_small) and its bundled data."""

from __future__ import annotations

import importlib.util
import json
import pathlib

from kat_jax.data.chat import render_text
from kat_jax.data.tokenizer import ByteTokenizer
from kat_jax.envs.registry import load_env_tasks, make_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "make_calculator_small_data.py"


def _script():
    spec = importlib.util.spec_from_file_location("make_calculator_small_data", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_test_split_has_at_least_64_tasks_disjoint_from_train():
    test, train = (load_env_tasks("calculator_small", split=s) for s in ("test", "train"))
    assert len(test) >= 64 and len(test) + len(train) == 400
    assert not {t.messages[0]["content"] for t in test} & {t.messages[0]["content"] for t in train}


def test_prompt_is_short_and_the_tool_works_without_a_schema():
    task = load_env_tasks("calculator_small", split="test")[0]
    env = make_env("calculator_small")
    messages, tools = env.reset(task)
    assert tools == []
    assert len(ByteTokenizer().encode(render_text(messages, tools, True))) == 82  # vs ~790
    expr = task.messages[0]["content"][len("What is "):-1]
    a, b = (int(x) for x in expr.split("*"))
    out = env.step([{"id": "c", "type": "function", "function": {
        "name": "calculator", "arguments": json.dumps({"expression": expr})}}])
    assert out[0]["content"] == str(a * b) == task.metadata["answer"]


def test_bundled_files_are_what_the_script_generates():
    mod = _script()
    for path, records in ((mod.TEACHERS, mod.teacher_records()), (mod.SFT, mod.sft_records())):
        with open(path, encoding="utf-8") as f:
            assert f.read() == mod.render(records)


def test_sft_data_is_train_only_and_mixes_teachers_with_give_ups():
    mod = _script()
    train = {t.id for t in load_env_tasks("calculator_small", split="train")}
    recs = mod.sft_records()
    assert {r["group"] for r in recs} <= train
    share = sum(r["kind"] == "give_up" for r in recs) / len(recs)
    assert 0.3 < share < 0.5
