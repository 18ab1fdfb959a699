"""The online rl loop (kat_jax.flow.online): rollouts from the model being trained, through the
trajectory manager, trees, old / reference log-probs, minibatch updates, weight sync; its keys;
exact resume at round boundaries.

The environment here is a toy registered by this file ("parity": one turn, reward = the share of
characters of the answer with an even code point), so that rewards differ within a group from the
first round on and the policy loss, the clip and the KL act with a tiny random model."""

import json

import numpy as np
import pytest

import kat_jax.flow.online as online
from kat_jax.data.tokenizer import ByteTokenizer
from kat_jax.envs import register_env
from kat_jax.envs.base import Env, EvalResult, Task
from kat_jax.training import config_lib
from kat_jax.training.trainer import Preempted, run_train

RL = "configs/rl.py"
TOK_IM_END = ByteTokenizer().special("<|im_end|>")


class ParityEnv(Env):
    name = "parity"

    def reset(self, task):
        self.task = task
        return [dict(m) for m in task.messages], []

    def evaluate(self, messages=()):
        text = next((m.get("content") or "" for m in reversed(messages)
                     if m["role"] == "assistant"), "")
        share = sum(ord(c) % 2 == 0 for c in text) / max(len(text), 1)
        return EvalResult(reward=float(share), passed=share > 0.5)


def _parity_tasks(path=None):
    return [Task(f"v{i}", [{"role": "user", "content": f"Say {i}."}]) for i in range(6)]


register_env("parity", ParityEnv, _parity_tasks)

SMALL = ["--config.rl.env=parity", "--config.rl.split=all", "--config.rl.groups_per_round=2",
         "--config.rl.group_size=3", "--config.rl.minibatches=2", "--config.rl.max_turns=1",
         "--config.rl.max_new_tokens=12", "--config.rl.concurrency=1",
         "--config.data.rows=2", "--config.data.row_len=128", "--config.data.trajectories=4",
         "--config.train.steps=4", "--config.train.log_every=1",
         "--config.train.checkpoint_every=2", "--config.optimizer.learning_rate=0.02",
         # a narrow clip range, so that the clip visibly acts after one update
         "--config.loss.eps_low=0.001", "--config.loss.eps_high=0.001",
         "--config.loss.kl_coef=0.01",
         # pruning on the training path: each group's tree keeps at most 48 tokens
         "--config.prune.budget=48"]


def _cfg(extra=()):
    return config_lib.load_train_config(f"{RL}:tiny_calculator", SMALL + list(extra))


def _metrics(workdir):
    return [json.loads(x) for x in open(f"{workdir}/metrics.jsonl") if x.strip()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("online") / "a"
    out = run_train(_cfg(), str(wd))
    return wd, out, _metrics(wd)


def test_online_loop_trains_on_its_own_samples(full_run):
    wd, out, m = full_run
    assert out["step"] == 4 and out["rounds"] == 2
    assert (wd / "model" / "model_config.json").exists()
    rounds = [r for r in m if "policy_version" in r]  # a round's metrics ride on its last step
    assert [r["step"] for r in rounds] == [2, 4]
    assert [r["policy_version"] for r in rounds] == [0, 1]
    for r in rounds:
        assert r["episodes"] == 6 and r["round_steps"] == 2
        assert 0 <= r["reward"] <= 1 and r["generated_tokens"] > 0
        # the trainer's old-policy log-probs and the sampler's behaviour log-probs of the same
        # tokens under the same parameters agree: the weights reached the sampler
        assert r["old_behaviour_max_abs"] < 1e-4
        assert r["rollout_time_s"] > 0 and r["train_time_s"] > 0
    # rewards differ within groups: the policy loss acts
    assert any(abs(r["loss"]) > 0 for r in m) and all(r["grad_norm"] > 0 for r in m)
    # the first minibatch of a round has ratio 1 (old = current parameters); the second was
    # trained after an update, so its ratio moved and the narrow clip acts
    assert m[0]["clip_fraction"] == 0 and m[2]["clip_fraction"] == 0
    assert m[1]["clip_fraction"] > 0 and m[3]["clip_fraction"] > 0
    # the reference is the starting model: no divergence in round 0, some after updates
    assert rounds[0]["kl_ref"] == pytest.approx(0.0, abs=1e-6)
    assert rounds[1]["kl_ref"] > 1e-6
    assert all("kl" in r for r in m)  # the KL term of the loss (loss.kl_coef > 0)
    # pruning: each step holds one group (3 trajectories) whose tree keeps <= 48 tokens
    assert all(r["kept_tokens"] <= 48 and r["kept_tokens"] <= r["tree_tokens"] <= r["total_tokens"]
               for r in m)
    assert any(r["kept_tokens"] < r["tree_tokens"] for r in m)


def test_online_loop_resumes_exactly_at_a_round_boundary(full_run, tmp_path):
    _, _, want = full_run
    wd = tmp_path / "b"
    with pytest.raises(Preempted, match="end of round 0"):
        run_train(_cfg(["--config.train.stop_at_step=2"]), str(wd))
    out = run_train(_cfg(), str(wd))
    assert out["step"] == 4
    got = _metrics(wd)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(got, want):  # the same rollouts, the same updates
        assert a["loss"] == b["loss"] and a.get("reward") == b.get("reward")
    assert run_train(_cfg(), str(wd))["status"] == "already finished"


def test_round_tasks_walk_shuffled_epochs():
    tasks = list(range(5))
    seen = [online.round_tasks(tasks, 2, seed=3, round_index=r) for r in range(5)]
    flat = [t for r in seen for t in r]
    assert sorted(flat[:5]) == tasks and sorted(flat[5:10]) == tasks  # each epoch: every task
    assert seen == [online.round_tasks(tasks, 2, seed=3, round_index=r) for r in range(5)]
    assert seen != [online.round_tasks(tasks, 2, seed=4, round_index=r) for r in range(5)]


@pytest.mark.parametrize("override,match", [
    (["--config.rl.env=nope"], r"rl.env: unknown environment"),
    (["--config.data.train_files=pkg:data/rl_rollouts.jsonl"], r"data.train_files: is not read"),
    (["--config.data.shuffle=false"], r"data.shuffle: is not read by the online loop"),
    (["--config.rl.minibatches=4"], r"rl.minibatches: must divide rl.groups_per_round=2"),
    (["--config.rl.temperature=0.7"], r"rl.temperature: must equal loss.temperature"),
    (["--config.rl.max_tokens=4096"], r"rl.max_tokens: must be in \[0, data.row_len=128\]"),
    (["--config.rl.split=train"], r"rl.split: environment 'parity' has no train/test split"),
    (["--config.rl.groups_per_round=8", "--config.rl.minibatches=1"],
     r"rl.groups_per_round: exceeds the 6 tasks"),
    (["--config.rl.reference=/x", "--config.loss.kl_coef=0"], r"rl.reference: acts only with"),
    (["--config.rl.tasks_file=/no/such.jsonl"], r"rl.tasks_file: no such file"),
    (["--config.rl.reference=/no/such/model"], r"rl.reference: no such checkpoint"),
])
def test_online_keys_fail_at_start_naming_the_key(override, match, tmp_path):
    with pytest.raises((config_lib.ConfigError, ValueError), match=match):
        run_train(_cfg(override), str(tmp_path / "w"))
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_rl_keys_are_errors_offline(tmp_path):
    cfg = config_lib.load_train_config(f"{RL}:tiny", ["--config.rl.group_size=8"])
    with pytest.raises(config_lib.ConfigError, match="rl.group_size: acts only in the online"):
        run_train(cfg, str(tmp_path / "w"))
    cfg = config_lib.load_train_config("configs/sft.py:tiny", ["--config.rl.env=parity",
                                                                "--config.data.train_files="])
    with pytest.raises(config_lib.ConfigError,
                       match="rl.env: the online loop trains the rl or rft stage; stage is 'sft'"):
        run_train(cfg, str(tmp_path / "w2"))


def test_a_prompt_longer_than_the_budget_is_a_clear_error(tmp_path):
    cfg = _cfg(["--config.rl.max_tokens=8"])
    with pytest.raises(Exception, match=r"rl.max_tokens / data.row_len: the prompt of task v\d"):
        run_train(cfg, str(tmp_path / "w"))


def test_record_groups_validate_records():
    with pytest.raises(ValueError, match="round 3:group 0:record 0"):
        online.RecordGroups([[{"id": "x", "tokens": [1, 2], "logprobs": [None, 0.5]}]],
                            "round 3")
    ok = online.RecordGroups([[{"id": "x", "tokens": [1, 2], "logprobs": [None, -0.5],
                                "reward": 1.0}]], "r")
    assert len(ok) == 1 and ok[0][0][1] == "r:group 0:record 0"
    assert np.isclose(ok[0][0][0]["logprobs"][1], -0.5)


def _group(task, rewards, statuses=None):
    statuses = statuses or ["ok"] * len(rewards)
    return [{"id": f"{task}#{i}", "group": task, "tokens": [1, 2, 3], "logprobs": [None, -1., -1.],
             "reward": r, "status": s, "advantage": r - float(np.mean(rewards))}
            for i, (r, s) in enumerate(zip(rewards, statuses))]


def _fake_rounds(monkeypatch, rewards_of):
    """run_round replaced: each task's group gets rewards_of(task, draw seed)."""
    calls = []

    def fake(engine, cfg, tasks, tokenizer, round_index, advantage, seed=None, teachers=None):
        calls.append([t.id for t in tasks])
        groups = [_group(t.id, *rewards_of(t.id)) for t in tasks]
        return groups, [r for g in groups for r in g], {"masked_groups": 0}

    monkeypatch.setattr(online, "run_round", fake)
    return calls


def test_dynamic_sampling_draws_until_the_round_has_groups_that_differ(monkeypatch):
    cfg = _cfg(["--config.rl.dynamic_sampling=true", "--config.rl.max_draws=5"])
    tasks = _parity_tasks()
    uniform = {"v0", "v2", "v4"}  # these tasks always give equal rewards
    calls = _fake_rounds(monkeypatch, lambda t: ([1.0, 1.0, 1.0],) if t in uniform
                         else ([0.0, 1.0, 0.5],))
    pos = online._RoundState()
    groups, episodes, stats = online.collect_groups(None, cfg, tasks, None, pos, "grpo")
    assert len(groups) == 2 and all(g[0]["group"] not in uniform for g in groups)
    drawn = [t for c in calls for t in c]
    assert stats["dropped_uniform_groups"] == sum(t in uniform for t in drawn)
    assert stats["draws"] == len(calls) and pos.drawn == len(drawn)
    ids = lambda n: [t.id for t in online.draw_tasks(tasks, 0, 0, n)]
    assert drawn == ids(len(drawn)) and len(calls) == 2 and len(calls[1]) == 1
    assert len(episodes) == 3 * len(drawn)  # every episode is counted, dropped or not
    # the next round continues the stream where this one stopped
    online.collect_groups(None, cfg, tasks, None, pos, "grpo")
    assert [t for c in calls for t in c] == ids(pos.drawn)


def test_dynamic_sampling_that_can_never_fill_is_an_error(monkeypatch):
    cfg = _cfg(["--config.rl.dynamic_sampling=true", "--config.rl.max_draws=3"])
    calls = _fake_rounds(monkeypatch, lambda t: ([0.0, 0.0, 0.0],))
    with pytest.raises(Exception, match=r"rl.dynamic_sampling: after 3 draws \(rl.max_draws\) "
                                        r"only 0 of rl.groups_per_round=2"):
        online.collect_groups(None, cfg, _parity_tasks(), None, online._RoundState(), "grpo")
    assert len(calls) == 3


def test_overlong_filter_drops_truncated_trajectories_after_the_advantages(monkeypatch):
    cfg = _cfg(["--config.rl.overlong_filter=true"])
    first = online.draw_tasks(_parity_tasks(), 0, 0, 1)[0].id
    _fake_rounds(monkeypatch, lambda t: ([0.0, 1.0, 0.5], ["ok", "max_tokens", "context_limit"])
                 if t == first else ([0.0, 1.0, 0.5],))
    groups, _, stats = online.collect_groups(None, cfg, _parity_tasks(), None,
                                             online._RoundState(), "grpo")
    assert [r["id"] for r in groups[0]] == [f"{first}#0"] and stats["overlong_filtered"] == 2
    assert groups[0][0]["advantage"] == pytest.approx(0.0 - 0.5)  # the whole group's baseline
    assert [len(g) for g in groups[1:]] == [3]
    with pytest.raises(config_lib.ConfigError, match="rl.max_draws: acts only with"):
        online.validate_online(_cfg(["--config.rl.max_draws=2"]))


class _FakeEngine:
    """Answers every call with the same short text (no model): for the round's bookkeeping."""

    context_length = 4096

    def generate(self, prompts, params, n=1, seeds=None):
        from kat_jax.rollout.sampler import Generation

        ids = list(b"ab") + [TOK_IM_END]
        return [[Generation(ids, [-0.5] * len(ids), [1.0] * len(ids), "stop")] * n
                for _ in prompts]


class CrashyEnv(ParityEnv):
    name = "crashy"

    def evaluate(self, messages=()):
        if self.task.id == "v1":
            raise RuntimeError("the sandbox died")
        return super().evaluate(messages)


register_env("crashy", CrashyEnv, _parity_tasks)


def test_a_crashing_environment_masks_its_group_and_the_round_goes_on():
    tok = ByteTokenizer()
    cfg = _cfg(["--config.rl.env=crashy", "--config.rl.concurrency=3"])
    tasks = [t for t in _parity_tasks() if t.id in ("v0", "v1", "v2")]
    groups, episodes, stats = online.run_round(_FakeEngine(), cfg, tasks, tok, 0, "grpo")
    assert [g[0]["group"] for g in groups] == ["v0", "v1", "v2"]  # task order, every group
    assert stats["masked_groups"] == 1 and stats["calls"] == 9
    assert all(r["status"] == "env_error" for r in groups[1])
    assert all(r["status"] == "ok" and r["advantage"] == 0.0 for g in (groups[0], groups[2])
               for r in g)  # identical answers: equal rewards, zero advantages
    assert len(episodes) == 6  # the crashed episodes are not episode records
    rec = groups[0][0]
    assert rec["tokens"][-3:] == [*b"ab", TOK_IM_END] and rec["logprobs"][-3:] == [-0.5] * 3
    assert stats["manager_time_s"] >= 0


@pytest.mark.parametrize("variant", ["rl.py:tiny_calculator", "rl.py:tiny_maths",
                                     "rl.py:qwen3_8b_swe", "rl.py:kat_dev_32b_swe",
                                     "rft.py:tiny_calculator", "rft.py:tiny_maths"])
def test_online_variants_are_valid_configs(variant):
    from kat_jax.training.build import validate

    cfg = config_lib.load_train_config(f"configs/{variant}", [])
    validate(cfg)
    online.validate_online(cfg)
    assert online.is_online(cfg) and cfg.loss.old_logprobs == "record"
    assert cfg.rl.max_tokens <= cfg.data.row_len


def test_rounds_without_a_trainable_group_stop_the_run(monkeypatch, tmp_path):
    calls = []

    def nothing(engine, cfg, tasks, tokenizer, position, advantage, teachers=None):
        calls.append(position.rounds)
        return [], [], {"masked_groups": 2, "draws": 1}

    monkeypatch.setattr(online, "collect_groups", nothing)
    with pytest.raises(Exception, match=r"rl.env: 3 rounds in a row had no trainable group"):
        run_train(_cfg(), str(tmp_path / "w"))
    assert calls == [0, 1, 2]


class _TeacherLikeEngine:
    """No model: odd samples call an unknown tool (they diverge from the calculator teachers);
    even samples do what the teacher does (call the calculator with the question's expression,
    then answer with its result). The sample is read from the agent's turn seed (seed 0)."""

    context_length = 4096

    def generate(self, prompts, params, n=1, seeds=None):
        import re

        from kat_jax.rollout.sampler import Generation

        out = []
        for prompt, seed in zip(prompts, seeds):
            text = ByteTokenizer().decode(prompt)
            if (seed // 10_007) % 2:
                reply = '<tool_call>\n{"name": "search", "arguments": {"q": "x"}}\n</tool_call>'
            elif "<tool_response>" not in text:
                expr = re.search(r"What is (.+?)\?", text).group(1)
                reply = ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "'
                         + expr + '"}}\n</tool_call>')
            else:
                result = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", text, re.S)[-1]
                reply = "The answer is \\boxed{" + result + "}."
            ids = ByteTokenizer().encode(reply) + [TOK_IM_END]
            out.append([Generation(ids, [-0.5] * len(ids), [1.0] * len(ids), "stop")] * n)
        return out


def _rft_cfg(extra=()):
    return config_lib.load_train_config("configs/rft.py:tiny_calculator", [
        "--config.rl.group_size=4", "--config.rl.concurrency=2", "--config.rl.max_turns=3",
        *extra])


@pytest.mark.parametrize("mode", ["mask", "penalty"])
def test_online_rft_rewards_relative_to_teachers_and_stops_diverging_episodes(mode):
    from kat_jax.envs import load_env_tasks

    extra = [] if mode == "mask" else ["--config.rl.on_terminate=penalty",
                                       "--config.rl.termination_penalty=-2.0"]
    cfg = _rft_cfg(extra)
    online.validate_online(cfg)
    tasks = load_env_tasks("calculator", None, split="train")[:2]
    teachers = online._load_teachers(cfg, tasks)
    groups, episodes, stats = online.run_round(_TeacherLikeEngine(), cfg, tasks, ByteTokenizer(),
                                               0, "grpo", seed=0, teachers=teachers)
    assert stats["terminated"] == 4  # samples 1 and 3 of both tasks
    by_sample = {e["id"]: e for e in episodes}
    for t in tasks:
        good, bad = by_sample[f"{t.id}#0"], by_sample[f"{t.id}#1"]
        # the teacher's path: outcome 1 - 1, similarity 1 x 0.5, same answer x 0.5
        assert good["outcome_reward"] == 1.0 and good["reward"] == pytest.approx(1.0)
        assert "terminated" not in good and good["turns"] == 2
        assert bad["terminated"]["turn"] == 1 and bad["turns"] == 1  # stopped after turn 1
        assert bad["outcome_reward"] == 0.0
        # relative: -1 (outcome) + 0.5 x similarity 0 + 0.5 x no answer; or the penalty
        assert bad["reward"] == pytest.approx(-1.0 if mode == "mask" else -2.0)
    # grpo over [good, bad, good, bad], unbiased std: |A| = 0.866 in both modes
    a = 1.0 / np.sqrt(4 / 3) if mode == "mask" else 1.5 / np.sqrt(3.0)
    for g in groups:
        if mode == "mask":  # the terminated trajectories shaped the baseline, then were dropped
            assert [r["id"].split("/")[-1].split("#")[1] for r in g] == ["0", "2"]
            assert all(r["advantage"] == pytest.approx(a) for r in g)
        else:
            assert sorted(round(r["advantage"], 6) for r in g) == \
                sorted([round(a, 6)] * 2 + [round(-a, 6)] * 2)
    assert stats.get("terminated_masked", 0) == (4 if mode == "mask" else 0)
    m = online._round_metrics(episodes, stats, 0, 1.0, 1.0)
    assert m["termination_rate"] == 0.5 and m["termination_turn"] == 1.0
    assert m["outcome_reward"] == 0.5
    # tokens saved: each episode stopped after turn 1 would have generated, in turn 2, what its
    # task's full episodes generated in their turn 2 (their tokens after the first sampled run)
    def after_first_turn(e):
        lp = e["logprobs"]
        first = next(i for i, x in enumerate(lp) if x is not None)
        gap = next(i for i in range(first, len(lp)) if lp[i] is None)
        return sum(x is not None for x in lp[gap:])

    gen = {e["id"]: len([x for x in e["logprobs"] if x is not None]) for e in episodes}
    want = sum((after_first_turn(by_sample[f"{t.id}#0"]) + after_first_turn(by_sample[f"{t.id}#2"]))
               / 2 for t in tasks for _ in (1, 3))
    assert want > 0 and m["generated_tokens_saved"] == pytest.approx(want)
    assert m["generated_tokens_saved_fraction"] == pytest.approx(
        want / (sum(gen.values()) + want))


@pytest.mark.parametrize("override,match", [
    (["--config.rl.divergence_threshold=1.5"], r"rl.divergence_threshold: must be in \[0, 1\)"),
    (["--config.rl.on_terminate=drop"], r"rl.on_terminate: must be mask or penalty"),
    (["--config.rl.termination_penalty=-3"], r"rl.termination_penalty: acts only with "
                                              r"rl.on_terminate=penalty"),
    (["--config.rl.divergence_threshold=0", "--config.rl.patience=2"],
     r"rl.patience: acts only with rl.divergence_threshold > 0"),
    (["--config.rl.teachers=/no/such.jsonl"], r"rl.teachers: no such file"),
])
def test_online_rft_keys_fail_naming_the_key(override, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        online.validate_online(_rft_cfg(override))


def test_teacher_keys_are_errors_on_the_rl_stage():
    with pytest.raises(config_lib.ConfigError, match="rl.w_process: acts only in the online rft"):
        online.validate_online(_cfg(["--config.rl.w_process=1.0"]))
