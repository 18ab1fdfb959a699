"""Asynchronous online RL (kat_jax.flow.async_rollout): the staleness bound by admission control,
per-call policy versions under partial rollouts, nothing finished discarded, rounds in order,
staleness 0 = the synchronous loop (same losses), the flow metrics, the keys.

Most tests drive AsyncRollouts directly with a fake engine (no model) whose log-probs encode the
weights it holds, so that the version recorded for every generated token can be checked against
the weights that really produced it."""

import json
import random
import threading
import time

import pytest
from test_online_rl import _cfg, _metrics

import kat_jax.flow.online as online
from kat_jax.data.tokenizer import ByteTokenizer
from kat_jax.envs import register_env
from kat_jax.envs.base import Env, EvalResult, Task, tool_message
from kat_jax.flow.async_rollout import AsyncRollouts, staleness_metrics
from kat_jax.training import config_lib
from kat_jax.training.trainer import Preempted, run_train

TOK = ByteTokenizer()
IM_END = TOK.special("<|im_end|>")


class ThreeTurnEnv(Env):
    """Two tool turns, then an answer; the tool sleeps a long-tailed time (seeded per task)."""

    name = "three_turn"

    def reset(self, task):
        self.task, self.rng = task, random.Random(task.id)
        return [dict(m) for m in task.messages], []

    def step(self, tool_calls):
        time.sleep(self.rng.choice([0.001, 0.001, 0.002, 0.03]))
        return [tool_message(c["id"], "wait", "ok") for c in tool_calls]

    def evaluate(self, messages=()):
        return EvalResult(reward=float(len(messages) % 3) / 2, passed=True)


def _tasks(path=None):
    return [Task(f"t{i}", [{"role": "user", "content": f"Go {i}."}]) for i in range(4)]


register_env("three_turn", ThreeTurnEnv, _tasks)


class VersionedEngine:
    """No model: the weights are an int v (update_weights); every generated token's log-prob is
    -(v + 1) / 10, so a record's log-probs say which weights produced each token. Calls take a
    few ms (a long tail), tool calls for the first two turns, then an answer."""

    context_length = 4096

    def __init__(self):
        self.v, self.updates, self.lock = None, [], threading.Lock()

    def update_weights(self, params):
        with self.lock:
            self.v = int(params)  # an array: the loop copies the weights on device
            self.updates.append(self.v)

    def generate(self, prompts, params, n=1, seeds=None):
        from kat_jax.rollout.sampler import Generation

        with self.lock:
            v = self.v
        time.sleep(random.Random(seeds[0]).choice([0.001, 0.002, 0.004, 0.02]))
        out = []
        for p in prompts:
            turn = TOK.decode(p).count("<tool_response>")
            text = '<tool_call>\n{"name": "wait", "arguments": {}}\n</tool_call>' if turn < 2 \
                else "done"
            ids = TOK.encode(text) + [IM_END]
            lp = -(v + 1) / 10
            out.append([Generation(ids, [lp] * len(ids), [1.0] * len(ids), "stop")] * n)
        return out


def _flow_cfg(k, partial, extra=()):
    return _cfg(["--config.rl.env=three_turn", "--config.rl.max_turns=3",
                 "--config.rl.concurrency=3", "--config.rl.groups_per_round=2",
                 "--config.rl.group_size=3", f"--config.rl.max_staleness={k}",
                 f"--config.rl.partial_rollouts={partial}", *extra])


def _drive(k, partial, rounds=5, train_s=0.03):
    """A fake trainer: publish version r, take round r, 'train' for train_s. Returns the rounds'
    (groups, episodes, stats, metrics) and the engine."""
    cfg = _flow_cfg(k, partial)
    online.validate_online(cfg)
    eng = VersionedEngine()
    flow = AsyncRollouts(eng, cfg, _tasks(), TOK, "grpo", None, start_round=0)
    got = []
    try:
        for r in range(rounds):
            flow.publish(r, r)
            got.append(flow.get(r))
            time.sleep(train_s)
    finally:
        dropped = flow.close()
    return got, eng, dropped


def _versions_of(rec):
    """The weights that produced a record's generated tokens, read from their log-probs."""
    return {round(-lp * 10) - 1 for lp in rec["logprobs"] if lp is not None}


@pytest.mark.parametrize("k,partial", [(1, False), (2, False), (1, True), (2, True)])
def test_staleness_bound_holds_and_versions_are_exact(k, partial):
    got, eng, dropped = _drive(k, partial)
    spans = 0
    for r, (groups, episodes, _stats, m) in enumerate(got):
        # every episode of the round, every group, in task order: nothing discarded
        assert len(episodes) == 6 and len(groups) == 2
        assert [g[0]["group"] for g in groups] == [t.id for t in online.round_tasks(
            _tasks(), 2, 0, r)]
        for g in groups:
            for rec in g:
                vs = _versions_of(rec)
                # the recorded versions are the weights that produced the tokens
                assert rec["policy_version"] == min(vs) and rec["policy_version_max"] == max(vs)
                assert r - min(vs) <= k  # the bound, on the oldest token
                spans += len(vs) > 1
        assert m["staleness_max"] <= k and sum(
            v for key, v in m.items() if key.startswith("staleness_hist_")) == pytest.approx(1)
        assert m["queue_rounds_admitted_ahead"] <= k
    # sampling ran ahead of the trainer: some tokens are stale
    assert max(m["staleness_max"] for *_, m in got) >= 1
    if not partial:  # episodes never see a weight change
        assert spans == 0
    assert eng.updates == sorted(eng.updates)  # versions only grow
    assert dropped <= k * 6


def test_partial_rollouts_change_weights_inside_episodes():
    """A long train step, so that updates land while episodes are mid-way: with partial
    rollouts some trajectory holds tokens of two versions; without, none does (drain)."""
    def spans(partial):
        got, _, _ = _drive(1, partial, rounds=4, train_s=0.0)
        return sum(len(_versions_of(rec)) > 1 for g, *_ in got for grp in g for rec in grp), got

    n_partial, _ = spans(True)
    n_plain, got = spans(False)
    assert n_plain == 0
    assert n_partial > 0
    assert all(m["drain_time_s"] >= 0 for *_, m in got)


def test_a_slow_episode_is_waited_for_not_overtaken():
    class SlowEngine(VersionedEngine):
        def generate(self, prompts, params, n=1, seeds=None):
            if "Go 0." in TOK.decode(prompts[0]):
                time.sleep(0.15)  # one task's episodes are very slow
            return super().generate(prompts, params, n, seeds)

    cfg = _flow_cfg(2, True)
    eng = SlowEngine()
    flow = AsyncRollouts(eng, cfg, _tasks(), TOK, "grpo", None, start_round=0)
    try:
        for r in range(4):
            flow.publish(r, r)
            groups, episodes, _, m = flow.get(r)
            assert len(episodes) == 6 and m["staleness_max"] <= 2
    finally:
        flow.close()


class BlockingEnv(ThreeTurnEnv):
    """A tool call that blocks until released (a sandbox command still running at the stop)."""

    name = "blocking"
    release, entered, closed = threading.Event(), threading.Semaphore(0), []

    def step(self, tool_calls):
        BlockingEnv.entered.release()
        BlockingEnv.release.wait(30)
        return [tool_message(c["id"], "wait", "ok") for c in tool_calls]

    def close(self):
        BlockingEnv.closed.append(self.task.id)


register_env("blocking", BlockingEnv, _tasks)


def test_close_does_not_wait_for_episodes_in_flight(caplog):
    """At a stop the episodes in flight are dropped, not waited for: close() returns while their
    tool calls still run; each then ends at its next model call (no error handed to the trainer,
    no episode recorded as failed) and its environment is closed."""
    cfg = _cfg(["--config.rl.env=blocking", "--config.rl.max_turns=3",
                "--config.rl.concurrency=3", "--config.rl.groups_per_round=1",
                "--config.rl.group_size=3", "--config.rl.max_staleness=1",
                "--config.rl.partial_rollouts=true"])
    BlockingEnv.release.clear()
    BlockingEnv.closed.clear()
    flow = AsyncRollouts(VersionedEngine(), cfg, _tasks(), TOK, "grpo", None, start_round=0)
    flow.publish(0, 0)
    for _ in range(3):  # all three episodes are inside their first tool call
        assert BlockingEnv.entered.acquire(timeout=30)
    out = []
    closer = threading.Thread(target=lambda: out.append(flow.close()))
    closer.start()
    closer.join(10)
    try:
        assert not closer.is_alive(), "close() waited for the episodes in flight"
        assert out == [3]  # the three episodes in flight are dropped
    finally:
        BlockingEnv.release.set()
    deadline = time.monotonic() + 30
    while (flow.in_flight or len(BlockingEnv.closed) < 3) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert flow.in_flight == 0 and len(BlockingEnv.closed) == 3
    assert flow.error is None
    assert "failed" not in caplog.text


def test_staleness_metrics_histogram():
    m = staleness_metrics({3: 30, 2: 10}, 3)
    assert m == {"staleness_max": 1.0, "staleness_mean": 0.25, "staleness_hist_0": 0.75,
                 "staleness_hist_1": 0.25}
    assert staleness_metrics({}, 0) == {}


class WeightsEngine:
    """Stands in for the JaxEngine in the full-loop tests (no sampler compilation): the text it
    generates depends on the weights it holds (read at every call, so weights donated by the
    train step would fail here) and on the seed; its behaviour log-probs are made up."""

    def __init__(self, model, config=None):
        self.context_length = 4096
        self.params = None

    def update_weights(self, params):
        self.params = params

    def generate(self, prompts, params, n=1, seeds=None):
        import jax
        import numpy as np

        from kat_jax.rollout.sampler import Generation

        key = float(np.asarray(jax.tree.leaves(self.params)[0]).ravel()[:64].sum())
        out = []
        for seed in seeds:
            rng = random.Random(f"{key:.7f}/{seed}")
            ids = TOK.encode("".join(rng.choice("abcdefgh") for _ in range(5))) + [IM_END]
            lps = [-rng.uniform(0.5, 2.5) for _ in ids]
            out.append([Generation(ids, lps, [1.0] * len(ids), "stop")] * n)
        return out


@pytest.fixture
def fake_sampler(monkeypatch, tmp_path_factory):
    """The fake engine, no plots, and a persistent compilation cache so that the runs after the first
    reuse the train step's and the log-prob pass's executables."""
    import jax

    import kat_jax.rollout.sampler as sampler
    import kat_jax.training.plots as plots

    monkeypatch.setattr(sampler, "JaxEngine", WeightsEngine)
    monkeypatch.setattr(plots, "plot_metrics", lambda *a, **k: None)  # PNGs: seconds of CPU
    before = {k: getattr(jax.config, k) for k in (
        "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes")}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jit")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for k, v in before.items():
        jax.config.update(k, v)


FAST = ["--config.train.steps=2", "--config.rl.minibatches=1", "--config.rl.groups_per_round=1",
        "--config.loss.kl_coef=0", "--config.prune.budget=0", "--config.train.checkpoint_every=2",
        "--config.rl.max_new_tokens=6", "--config.train.log_entropy=false",
        "--config.data.row_len=64"]


def test_staleness_zero_through_the_async_machinery_gives_the_synchronous_losses(
        tmp_path, monkeypatch, fake_sampler):
    sync = run_train(_cfg(FAST), str(tmp_path / "sync"))
    monkeypatch.setattr(online, "_asynchronous", lambda cfg: True)  # k = 0, in background
    got = run_train(_cfg(FAST), str(tmp_path / "async0"))
    a, b = _metrics(tmp_path / "sync"), _metrics(tmp_path / "async0")
    assert sync["step"] == got["step"] == 2 and len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert x["loss"] == y["loss"] and x["reward"] == y["reward"]
    assert b[-1]["staleness_max"] == 0 and b[-1]["weight_updates"] == 2
    # the synchronous run logs its bubbles too: no overlap
    assert a[-1]["overlap"] == 0 and 0 < a[-1]["train_idle_fraction"] < 1


def test_async_run_trains_within_the_bound_and_logs_the_flow(tmp_path, fake_sampler):
    cfg = _cfg(FAST + ["--config.rl.max_staleness=1",
                       "--config.rl.partial_rollouts=true", "--config.rl.concurrency=2"])
    out = run_train(cfg, str(tmp_path / "w"))
    assert out["step"] == 2 and out["rounds"] == 2
    m = _metrics(tmp_path / "w")
    assert all(r["staleness_max"] <= 1 for r in m)
    for key in ("train_idle_fraction", "rollout_idle_fraction", "overlap", "queue_rounds_ready",
                "queue_episodes_in_flight", "weight_updates", "staleness_hist_0"):
        assert key in m[-1] or key in m[0], key
    assert all(0 <= r["overlap"] <= 1 and 0 <= r["train_idle_fraction"] <= 1 for r in m)
    json.dumps(m)


def test_an_async_run_restarted_mid_run_resumes_at_the_checkpointed_round(tmp_path, fake_sampler):
    """Staleness 1, stopped after round 1's update (checkpoint at step 2) while round 2 may be in
    flight, then restarted: the run ends at step 4 with rounds 2 and 3 trained once each (what
    was in flight is sampled again, from the restored weights: staleness 0 at the restart); the
    rounds before the stop are the uninterrupted run's (round 0 exactly: version 0 weights)."""
    cfg = FAST + ["--config.train.steps=4", "--config.rl.max_staleness=1",
                  "--config.rl.concurrency=2"]
    wd = tmp_path / "stopped"
    with pytest.raises(Preempted):
        run_train(_cfg(cfg + ["--config.train.stop_at_step=2"]), str(wd))
    assert [r["step"] for r in _metrics(wd)] == [1, 2]
    out = run_train(_cfg(cfg), str(wd))
    assert out["step"] == 4 and out["rounds"] == 4
    got = _metrics(wd)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [r["episodes"] for r in got] == [3, 3, 3, 3]      # nothing dropped, nothing doubled
    assert got[2]["staleness_max"] == 0                      # re-sampled from restored weights
    assert all(r["staleness_max"] <= 1 for r in got)
    full = run_train(_cfg(cfg), str(tmp_path / "full"))
    want = _metrics(tmp_path / "full")
    assert full["step"] == 4
    assert got[0]["loss"] == want[0]["loss"] and got[0]["reward"] == want[0]["reward"]


@pytest.mark.parametrize("override,match", [
    (["--config.rl.max_staleness=-1"], r"rl.max_staleness: must be >= 0"),
    (["--config.rl.partial_rollouts=true"], r"rl.partial_rollouts: acts only with "
                                            r"rl.max_staleness > 0"),
    (["--config.rl.max_staleness=1", "--config.rl.dynamic_sampling=true"],
     r"rl.max_staleness: the asynchronous loop does not do rl.dynamic_sampling"),
    (["--config.rl.max_staleness=1", "--config.loss.tis_cap=0"],
     r"rl.max_staleness: with loss.old_logprobs=record .* loss.tis_cap > 0"),
])
def test_flow_keys_fail_at_start_naming_the_key(override, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        online.validate_online(_cfg(override))


def test_flow_keys_are_errors_offline():
    cfg = config_lib.load_train_config("configs/rl.py:tiny", ["--config.rl.max_staleness=1"])
    with pytest.raises(config_lib.ConfigError, match="rl.max_staleness: acts only in the online"):
        online.validate_online(cfg)
