"""Generate the bundled teacher transcripts of RFT (deterministic; issue 18).

    python scripts/make_teacher_data.py            # rewrites the files below

  teachers_calculator.jsonl  one ground-truth episode per task of the calculator's split pool (400
                             generated tasks, train and test): the env's system + user messages, a
                             `calculator` call on the question's expression, the tool's result as
                             the env returns it, then "The answer is \\boxed{N}."
  teachers_maths.jsonl       one per bundled maths problem (the env has no tools): the final answer
  teachers_swe.jsonl         one per bundled swe instance (local sandbox backend): `bash` runs
                             `git apply` on the gold patch, then `submit`; the sandbox directory
                             is written as the instance's workdir (/testbed, the docker backend's)

Records are SFT chat records (id, group, tools, messages) plus task_id, env, split and reward; the
generation is kat_jax.envs.teachers.teacher_records (tests/test_teachers.py compares the files with
it and replays every transcript through the environment).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kat_jax.envs.teachers import BUNDLED_TEACHERS, teacher_records  # noqa: E402


def render(env_name: str) -> str:
    """The file text of ``env_name``'s bundled teachers: one JSON record a line."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in teacher_records(env_name))


def main() -> None:
    for name, path in sorted(BUNDLED_TEACHERS.items()):
        text = render(name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"{path}: {text.count(chr(10))} teachers")


if __name__ == "__main__":
    main()
