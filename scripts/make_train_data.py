"""Generate the small training datasets bundled in kat_jax/assets/data (deterministic).

    python scripts/make_train_data.py            # rewrites the files below

  mid_tool_use.jsonl      tool-use transcripts and commit messages as plain text documents
  sft_trajectories.jsonl  agent trajectories in chat form (Qwen tool calls) spanning the eight task
                          types x eight scenarios of the KAT recipe; 2-3 trajectories per task share
                          the prompt (group), so they pack into trees
  rl_rollouts.jsonl       scored rollouts of arithmetic questions in byte-tokenizer ids (the tiny
                          model's tokenizer): groups of 4 samples with reward 1 (right) or 0, plus a
                          teacher trajectory per group for RFT; behaviour log-probs are those of a
                          uniform policy over the tiny vocabulary

Small on purpose: the tiny model trains on them on CPU in the quickstart and in tests.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kat_jax.data.chat import render_text  # noqa: E402
from kat_jax.data.tokenizer import ByteTokenizer  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "kat_jax", "assets", "data")

TASK_TYPES = ["feature implementation", "feature enhancement", "bug fixing", "refactoring",
              "performance optimisation", "test-case generation", "code understanding",
              "configuration & deployment"]
SCENARIOS = ["application development", "UI/UX", "data science & engineering", "ML & AI",
             "database systems", "infrastructure", "specialised domains", "security engineering"]
MODULES = ["orders", "ui/button", "etl/clean", "model/train", "db/query", "deploy/health", "geo/dist",
           "auth/token"]
FUNCS = ["total", "render", "dedupe", "step", "fetch_rows", "check", "haversine", "verify"]

TOOLS = [
    {"type": "function", "function": {"name": "bash", "description": "Run a shell command.",
                                      "parameters": {"type": "object", "properties": {
                                          "command": {"type": "string"}},
                                          "required": ["command"]}}},
    {"type": "function", "function": {"name": "str_replace_editor",
                                      "description": "View or edit a file.",
                                      "parameters": {"type": "object", "properties": {
                                          "command": {"type": "string"},
                                          "path": {"type": "string"},
                                          "old_str": {"type": "string"},
                                          "new_str": {"type": "string"}},
                                          "required": ["command", "path"]}}},
    {"type": "function", "function": {"name": "submit", "description": "Finish the task.",
                                      "parameters": {"type": "object", "properties": {}}}},
]


def call(name: str, **args) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def sft_records(rng: random.Random) -> list[dict]:
    out = []
    for ti, task in enumerate(TASK_TYPES):
        for si in range(2):
            scen = SCENARIOS[(ti + 3 * si) % len(SCENARIOS)]
            mod, fn = MODULES[(ti + si) % 8], FUNCS[(ti + 2 * si) % 8]
            path = f"src/{mod}.py"
            prompt = [
                {"role": "system", "content": "You are a software engineering agent."},
                {"role": "user", "content": f"[{task} / {scen}] In {path}, `{fn}` needs work: "
                                            f"please handle the empty input case and keep the tests "
                                            "green."},
            ]
            for variant in range(rng.choice([2, 3])):
                msgs = list(prompt)
                if variant != 1:
                    msgs.append({"role": "assistant", "content": "Let me look at the code.",
                                 "tool_calls": [call("bash", command=f"grep -n {fn} {path}")]})
                    msgs.append({"role": "tool", "content": f"3:def {fn}(items):\n4:    return "
                                                            "items[0]"})
                else:
                    msgs.append({"role": "assistant", "content": None,
                                 "tool_calls": [call("str_replace_editor", command="view",
                                                     path=path)]})
                    msgs.append({"role": "tool", "content": f"def {fn}(items):\n    return items[0]"})
                new = "    if not items:\n        return None\n    return items[0]"
                msgs.append({"role": "assistant", "content": "Guard the empty case.",
                             "tool_calls": [call("str_replace_editor", command="str_replace",
                                                 path=path, old_str="    return items[0]",
                                                 new_str=new)]})
                msgs.append({"role": "tool", "content": "The file was edited."})
                if variant == 2:
                    msgs.append({"role": "assistant", "content": None,
                                 "tool_calls": [call("bash", command="python -m pytest -q")]})
                    msgs.append({"role": "tool", "content": "3 passed"})
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call("submit")]})
                msgs.append({"role": "tool", "content": "Submitted."})
                msgs.append({"role": "assistant", "content": f"Done: `{fn}` returns None on empty "
                                                             "input."})
                out.append({"id": f"sft-{ti}-{si}-{variant}", "group": f"sft-{ti}-{si}",
                            "task_type": task, "scenario": scen, "tools": TOOLS, "messages": msgs})
    return out


def mid_records(rng: random.Random) -> list[dict]:
    out = []
    for i in range(48):
        mod, fn = MODULES[i % 8], FUNCS[(i * 3) % 8]
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        msgs = [{"role": "user", "content": f"What does {fn} in {mod} return for {a} and {b}?"},
                {"role": "assistant", "content": None,
                 "tool_calls": [call("bash", command=f"python -c 'from {mod.replace('/', '.')} "
                                                     f"import {fn}; print({fn}({a}, {b}))'")]},
                {"role": "tool", "content": str(a + b)},
                {"role": "assistant", "content": f"It returns {a + b}."}]
        out.append({"id": f"mid-chat-{i}", "text": render_text(msgs)})
    for i in range(16):
        mod, fn = MODULES[i % 8], FUNCS[(i * 5) % 8]
        out.append({"id": f"mid-commit-{i}",
                    "text": f"commit {rng.getrandbits(40):010x}\n\n    Fix {fn} in {mod} for empty "
                            f"input\n\ndiff --git a/src/{mod}.py b/src/{mod}.py\n-    return items[0]"
                            f"\n+    if not items:\n+        return None\n+    return items[0]\n"})
    return out


def rl_records(rng: random.Random, vocab: int = 512) -> list[dict]:
    tok = ByteTokenizer()
    uniform = -math.log(vocab)
    out = []
    for q in range(24):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        prompt = tok.encode(render_text([{"role": "user", "content": f"{a}+{b}="}],
                                        add_generation_prompt=True))
        answers = [a + b, a + b, a + b + rng.randint(1, 3), a + b - rng.randint(1, 3)]
        rng.shuffle(answers)
        for s, ans in enumerate(answers + [a + b]):
            teacher = s == len(answers)
            resp = tok.encode(f"{ans}<|im_end|>")
            out.append({"id": f"rl-{q}-{'teacher' if teacher else s}", "group": f"rl-{q}",
                        "tokens": prompt + resp,
                        "logprobs": [None] * len(prompt) + [uniform] * len(resp),
                        "reward": 1.0 if ans == a + b else 0.0, "status": "ok",
                        **({"teacher": True} if teacher else {})})
    return out


def write(name: str, records: list[dict]) -> None:
    path = os.path.join(OUT, name)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{path}: {len(records)} records")


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    write("mid_tool_use.jsonl", mid_records(random.Random(0)))
    write("sft_trajectories.jsonl", sft_records(random.Random(1)))
    write("rl_rollouts.jsonl", rl_records(random.Random(2)))


if __name__ == "__main__":
    main()
