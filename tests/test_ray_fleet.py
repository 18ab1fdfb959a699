"""Sandbox fleets on Ray (kat_jax.flow.ray_fleet) on a local Ray instance started here: one
ray.init for the module (2 CPUs, custom resources env:calculator=2 and env:maths=1), workers with
0 CPUs placed by the env tags."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import ml_collections
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install "
                                        "'kat_jax[ray]'); CI installs it with the test extra")

from kat_jax.data.tokenizer import ByteTokenizer  # noqa: E402
from kat_jax.envs import make_env  # noqa: E402
from kat_jax.envs.base import EnvError, Task  # noqa: E402
from kat_jax.flow.ray_fleet import (  # noqa: E402
    RayEnvFleet,
    WorkerLost,
    fleet_metrics,
    fleet_options,
    make_env_factory,
    shared_env_factory,
)
from kat_jax.rollout.agent import run_episode  # noqa: E402
from kat_jax.rollout.sampler import Generation, SamplingParams  # noqa: E402

TOK = ByteTokenizer()


def _call(expr: str) -> str:
    return ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "' + expr
            + '"}}\n</tool_call><|im_end|>')


def _task(i: int) -> Task:
    a, b = 2 + i, 3 + 2 * i
    return Task(id=f"t{i}", messages=[{"role": "user", "content": f"What is {a} * {b} + 1?"}],
                metadata={"answer": str(a * b + 1)})


def _script(i: int) -> list[str]:
    a, b = 2 + i, 3 + 2 * i
    return [_call(f"{a} * {b}"), _call(f"{a * b} + 1"), f"So \\boxed{{{a * b + 1}}}.<|im_end|>"]


class ScriptedEngine:
    """Scripted assistant turns (byte ids), one per call; ``on_call[k]()`` runs before call k."""

    def __init__(self, turns, on_call=None):
        self.turns, self.on_call, self.calls = list(turns), dict(on_call or {}), 0

    def generate(self, prompts, params, n=1, seeds=None):
        hook = self.on_call.get(self.calls)
        self.calls += 1
        if hook is not None:
            hook()
        ids = TOK.encode(self.turns.pop(0))
        return [[Generation(ids, [-0.5] * len(ids), [1.0] * len(ids), "stop")]]


def _kill(actor) -> None:
    """ray.kill, then wait until the actor is really gone (the kill is asynchronous)."""
    ray.kill(actor)
    with pytest.raises(ray.exceptions.RayActorError):
        for _ in range(100):
            ray.get(actor.ping.remote(), timeout=30)


def _episode(env, i: int, on_call=None) -> dict:
    try:
        return run_episode(ScriptedEngine(_script(i), on_call), env, _task(i), TOK,
                           SamplingParams(), max_turns=6)
    finally:
        env.close()


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, resources={"env:calculator": 2, "env:maths": 1, "env:loop": 1},
             include_dashboard=False, log_to_driver=False)
    # the maths fleet (through make_env_factory's ray path) starts in the background while the
    # calculator tests run: its worker's process start overlaps them (test time)
    cfg = ml_collections.ConfigDict({"rl": {"env": "maths"},
                                     "fleet": {"backend": "ray", "max_retries": 1}})
    maths = ThreadPoolExecutor(1).submit(make_env_factory, cfg)
    yield maths
    if maths.exception() is None:
        maths.result()[1].shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def fleet(cluster):
    f = RayEnvFleet("calculator", max_retries=2, ping_timeout_s=30.0, call_timeout_s=60.0,
                    acquire_timeout_s=60.0)
    yield f
    f.shutdown()


def test_fleet_episodes_give_the_same_records_as_local_envs(fleet):
    local = [_episode(make_env("calculator"), i) for i in range(4)]
    with ThreadPoolExecutor(4) as ex:   # 4 concurrent episodes on 2 workers: 2 wait for one
        remote = list(ex.map(lambda i: _episode(fleet.env(), i), range(4)))
    assert remote == local
    assert all(r["status"] == "ok" and r["reward"] == 1.0 and r["tool_calls"] == 2
               for r in remote)
    s = fleet.stats()
    assert s["workers_alive"] == 2 and s["hosts"] == 1 and s["workers_idle"] == 2
    assert 0 < s["sandbox_utilisation"] < 1 and s["episodes_requeued"] == 0


def test_worker_killed_mid_episode_is_requeued_on_another_worker_and_counted(fleet):
    before = fleet.stats()
    env = fleet.env()
    seen = []

    def kill():  # before the second turn: the worker ran reset and one step
        seen.append(env.worker)
        _kill(env.worker.actor)

    rec = _episode(env, 1, on_call={1: kill})
    assert env.env_error is None, env.env_error
    assert rec == _episode(make_env("calculator"), 1)   # the policy never saw the loss
    assert rec["status"] == "ok" and rec["reward"] == 1.0
    after = fleet.stats()
    assert after["episodes_requeued"] == before["episodes_requeued"] + 1
    assert after["workers_dead"] == before["workers_dead"] + 1
    assert after["episodes_masked"] == before["episodes_masked"]
    assert seen[0].dead and env.requeued == 1
    assert after["workers_alive"] == 2     # the dead worker was replaced on its host


def test_retries_exhausted_mask_the_episode_as_env_error_with_the_reason(fleet):
    before = fleet.stats()
    fleet.max_retries = 0
    env = fleet.env()
    try:  # killed before turn 2, no re-queue allowed
        rec = _episode(env, 2, on_call={1: lambda: _kill(env.worker.actor)})
    finally:
        fleet.max_retries = 2
    assert rec["status"] == "env_error" and rec["reward"] == 0.0  # masked, not a policy failure
    assert rec["turns"] == 2       # the loss ended the episode: no further generation
    assert "fleet.max_retries=0" in env.env_error and "lost during step" in env.env_error
    after = fleet.stats()
    assert after["episodes_masked"] == before["episodes_masked"] + 1
    assert after["episodes_requeued"] == before["episodes_requeued"]
    assert after["workers_dead"] == before["workers_dead"] + 1


def test_a_replay_that_differs_masks_the_episode_instead_of_continuing(fleet):
    before = fleet.stats()
    env = fleet.env()

    def tamper_and_kill():  # what the policy read no longer matches what a replay gives
        env._steps[0][1][0]["content"] = "tampered"
        _kill(env.worker.actor)

    rec = _episode(env, 3, on_call={1: tamper_and_kill})
    assert rec["status"] == "env_error" and "different results at turn 1" in env.env_error
    after = fleet.stats()
    assert after["replays_diverged"] == before["replays_diverged"] + 1
    assert after["episodes_masked"] == before["episodes_masked"] + 1


def test_health_check_drops_a_dead_idle_worker_and_replaces_it(fleet):
    before = fleet.stats()
    victim = next(w for q in fleet._idle.values() for w in q if w.answered)  # picked first
    _kill(victim.actor)
    held = []
    while not victim.dead and len(held) < 2:   # the victim is pinged by the first acquire or the
        held.append(fleet.acquire())          # second (2 workers), dropped, never handed out
    assert victim.dead and victim not in held and not any(w.dead for w in held)
    for w in held:
        fleet.release(w)
    after = fleet.stats()
    assert after["workers_dead"] == before["workers_dead"] + 1
    assert after["workers_alive"] == 2      # a replacement joined the host's pool


def test_acquire_and_call_timeouts_act(fleet):
    held = [fleet.acquire(), fleet.acquire()]
    fleet.acquire_timeout_s, fleet.call_timeout_s = 0.2, 1e-4
    try:
        with pytest.raises(EnvError, match="fleet.acquire_timeout_s=0.2"):
            fleet.acquire()             # every worker is held by an episode
        with pytest.raises(WorkerLost, match="lost during reset: GetTimeoutError"):
            fleet.call(held[0], "reset", _task(0))  # a call not answered in time: worker lost
        assert held[0].dead
    finally:
        fleet.acquire_timeout_s, fleet.call_timeout_s = 60.0, 60.0
        for w in held:
            fleet.release(w)


def test_env_tags_route_work_to_the_actors_that_carry_the_resource(cluster, fleet):
    make, maths = cluster.result(timeout=120)   # make_env_factory(rl.env=maths, backend=ray)
    assert maths.resource == "env:maths" and maths.stats()["workers_alive"] == 1
    assert fleet_metrics(maths)["fleet/workers_alive"] == 1.0
    env = make()
    task = Task(id="m", messages=[{"role": "user", "content": "1+1?"}],
                metadata={"answer": "2"})
    rec = run_episode(ScriptedEngine(["\\boxed{2}<|im_end|>"]), env, task, TOK,
                      SamplingParams())
    assert ray.get(env.worker.actor.ping.remote())["env"] == "maths"
    env.close()
    assert rec["reward"] == 1.0
    # every unit of both tags is held by its fleet's warm pool
    free = ray.available_resources()
    assert free.get("env:calculator", 0) == 0 and free.get("env:maths", 0) == 0
    with pytest.raises(ValueError, match="fleet.resource.*env:swe"):
        RayEnvFleet("swe")
    with pytest.raises(ValueError, match="fleet.workers_per_host"):
        RayEnvFleet("calculator", workers_per_host=3)


def test_a_worker_lost_at_reset_without_retries_gives_an_env_error_record(fleet, monkeypatch):
    acquire = fleet.acquire

    def acquire_then_kill():
        w = acquire()
        _kill(w.actor)
        return w

    monkeypatch.setattr(fleet, "acquire", acquire_then_kill)
    monkeypatch.setattr(fleet, "max_retries", 0)
    env = fleet.env()
    rec = run_episode(ScriptedEngine(["\\boxed{7}<|im_end|>"]), env, _task(0), TOK,
                      SamplingParams())
    env.close()
    assert rec["status"] == "env_error" and "lost during reset" in env.env_error


def test_fleet_config_keys_act_or_fail_naming_the_key():
    cfg = ml_collections.ConfigDict({"rl": {"env": "calculator"}})
    make, fleet = make_env_factory(cfg)          # no cfg.fleet: local environments
    assert fleet is None and make().name == "calculator" and fleet_metrics(fleet) == {}
    assert shared_env_factory(cfg) is shared_env_factory(cfg)
    for fleet_cfg, key in (({"backend": "k8s"}, "fleet.backend"),
                           ({"max_retries": -1}, "fleet.max_retries"),
                           ({"ping_timeout_s": 0}, "fleet.ping_timeout_s"),
                           ({"workers": 2}, "fleet.workers")):
        cfg.fleet = fleet_cfg
        with pytest.raises(ValueError, match=key):
            fleet_options(cfg)


class _AnswerEngine:
    """Every call answers "ab" and ends the turn (no model): the online round's bookkeeping."""

    context_length = 4096

    def generate(self, prompts, params, n=1, seeds=None):
        ids = list(b"ab") + [ByteTokenizer().special("<|im_end|>")]
        return [[Generation(ids, [-0.5] * len(ids), [1.0] * len(ids), "stop")] * n
                for _ in prompts]


def test_the_online_loop_runs_its_episodes_on_the_fleet_with_fleet_backend_ray(cluster):
    """--config.fleet.backend=ray: a round of the online loop (kat_jax.flow.rounds) gets its
    environments from a Ray fleet (here on the resource env:loop) and logs the fleet's counters;
    the same round with local environments gives the same records."""
    from kat_jax.flow import online
    from kat_jax.training import config_lib

    base = ["--config.rl.groups_per_round=2", "--config.rl.group_size=2",
            "--config.rl.max_turns=1", "--config.rl.concurrency=2"]
    ray_cfg = config_lib.load_train_config("configs/rl.py:tiny_calculator", base + [
        "--config.fleet.backend=ray", "--config.fleet.resource=env:loop",
        "--config.fleet.call_timeout_s=60", "--config.fleet.acquire_timeout_s=60"])
    local_cfg = config_lib.load_train_config("configs/rl.py:tiny_calculator", base)
    online.validate_online(ray_cfg)
    from kat_jax.envs import load_env_tasks

    tasks = load_env_tasks("calculator", None, split="train")[:2]
    got = online.run_round(_AnswerEngine(), ray_cfg, tasks, ByteTokenizer(), 0, "grpo")
    want = online.run_round(_AnswerEngine(), local_cfg, tasks, ByteTokenizer(), 0, "grpo")
    strip = lambda groups: [[{k: v for k, v in r.items() if k != "session"} for r in g]
                            for g in groups]
    assert strip(got[0]) == strip(want[0]) and len(got[0]) == 2
    assert got[2]["fleet/workers_alive"] == 1 and got[2]["fleet/episodes_requeued"] == 0
    assert got[2]["fleet/sandbox_utilisation"] > 0
    assert not any(k.startswith("fleet/") for k in want[2])
    with pytest.raises(config_lib.ConfigError, match=r"--config\.fleet\.backend: acts only in "
                                                     r"the online loop"):
        online.validate_online(config_lib.load_train_config("configs/rl.py:tiny",
                                                            ["--config.fleet.backend=ray"]))
    with pytest.raises(config_lib.ConfigError, match=r"--config\.fleet\.max_retries: "):
        online.validate_online(config_lib.load_train_config(
            "configs/rl.py:tiny_calculator", ["--config.fleet.max_retries=-1"]))
