"""Tag-driven placement (kat_jax.flow.placement): the scheduler's rules, and the two-sub-mesh mode
on 8 simulated CPU devices (4 train, 4 rollout)."""

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from kat_jax.flow.placement import PlacementError, Resource, Scheduler, split_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _res(name, tags, slots=1, lends=()):
    return Resource(name, frozenset(tags), slots, frozenset(lends))


def test_items_go_to_resources_with_every_required_tag_least_loaded_first():
    s = Scheduler([_res("a", {"rollout"}, 2), _res("b", {"rollout"}, 2),
                   _res("sbx", {"env:swe", "env:maths"}, 1)])
    got = [s.acquire({"rollout"}).name for _ in range(4)]
    assert got == ["a", "b", "a", "b"]  # least loaded, then the order given
    assert s.acquire({"env:maths"}).name == "sbx"
    with pytest.raises(TimeoutError, match=r"no free resource with tags \['env:swe'\]"):
        s.acquire({"env:swe"}, timeout=0.05)  # sbx's one slot is taken
    with pytest.raises(PlacementError, match=r"no resource has the tags \['env:calculator'\]; "
                                             r"tags offered: \['env:maths', 'env:swe', 'rollout'\]"):
        s.acquire({"env:calculator"})
    with pytest.raises(PlacementError):
        s.acquire({"rollout", "env:swe"})  # no single resource has both
    assert s.placed == {"a": 2, "b": 2, "sbx": 1}


def test_a_training_device_lends_rollout_only_while_the_trainer_waits():
    s = Scheduler([_res("train", {"train"}, 1, lends={"rollout"}), _res("roll", {"rollout"}, 1)])
    r1 = s.acquire({"rollout"})
    assert r1.name == "roll"
    with pytest.raises(TimeoutError):  # the trainer is busy: it lends nothing
        s.acquire({"rollout"}, timeout=0.05)
    s.set_idle("train", True)
    r2 = s.acquire({"rollout"})
    assert r2.name == "train" and s.lent == {"train": 1, "roll": 0}
    s.release(r1)
    s.release(r2)
    # own tags first: with both free and the trainer idle, rollout work goes to the rollout device
    assert s.acquire({"rollout"}).name == "roll"
    s.set_idle("train", False)
    assert s.acquire({"train"}).name == "train"  # its own tag, idle or not


def test_acquire_waits_for_a_release_and_errors_name_what_is_wrong():
    s = Scheduler([_res("a", {"rollout"})])
    first = s.acquire({"rollout"})
    got = []
    t = threading.Thread(target=lambda: got.append(s.acquire({"rollout"}).name))
    t.start()
    time.sleep(0.05)
    assert not got  # blocked while the one slot is busy
    s.release(first)
    t.join(5)
    assert got == ["a"] and s.wait_s > 0
    s.release(first)
    with pytest.raises(ValueError, match="release of 'a', which runs nothing"):
        s.release(first)
    with pytest.raises(ValueError, match="resource names must be unique"):
        Scheduler([_res("a", {"x"}), _res("a", {"y"})])
    with pytest.raises(ValueError, match="slots must be >= 1"):
        _res("z", {"x"}, 0)
    with pytest.raises(KeyError, match="unknown resource 'nope'"):
        s.set_idle("nope", True)
    assert split_devices(list(range(8)), 4, 4) == ([0, 1, 2, 3], [4, 5, 6, 7])
    assert split_devices(list(range(8)), 8, 0) == (list(range(8)), [])
    with pytest.raises(ValueError, match="5 training \\+ 4 rollout devices: only 8 available"):
        split_devices(list(range(8)), 5, 4)


class _FakeEngine:
    """Samples "its device id, then the weights' version": shows where a call ran and with
    which weights."""

    context_length = 64

    def __init__(self, params):
        self.params = params

    def generate(self, prompts, sp, n=1, seeds=None):
        time.sleep(0.05)
        return [[(self.params["device"], self.params["v"])] * n for _ in prompts]

    def update_weights(self, params):
        self.params = params


def test_engine_fleet_places_calls_by_tags_and_updates_every_replica(monkeypatch):
    from kat_jax.flow import placement

    class Dev:
        def __init__(self, i):
            self.id = i

    monkeypatch.setattr(placement, "reshard_params",
                        lambda p, d, no_host=True: {**p, "device": d.id})
    fleet = placement.EngineFleet(None, {"v": 0}, [Dev(4), Dev(5)], lend_devices=[Dev(0)],
                                  slots=1, make_engine=_FakeEngine)
    assert fleet.context_length == 64
    assert [r.name for r in fleet.scheduler.resources] == ["rollout:4", "rollout:5", "train:0"]

    def burst(k):
        out = [None] * k
        ts = [threading.Thread(target=lambda i=i: out.__setitem__(
            i, fleet.generate([[1]], None)[0][0])) for i in range(k)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        return out

    assert {d for d, _ in burst(6)} == {4, 5}  # the trainer is busy: its device samples nothing
    fleet.update_weights({"v": 1})  # every replica, the lender's too
    assert fleet.version == 1
    assert all(e.params == {"v": 1, "device": e.params["device"]} for e in fleet.engines)
    fleet.trainer_waiting(True)
    got = burst(6)
    assert {d for d, _ in got} == {0, 4, 5} and {v for _, v in got} == {1}
    assert fleet.stats()["lent"]["train:0"] >= 1
    fleet.trainer_waiting(False)
    assert {d for d, _ in burst(4)} == {4, 5}
    with pytest.raises(ValueError, match="at least one rollout"):
        placement.EngineFleet(None, {}, [], make_engine=_FakeEngine)


SUBMESH = textwrap.dedent("""
    import os, sys, threading
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, {root!r})
    import jax, numpy as np
    from flax import nnx
    from kat_jax.flow.placement import EngineFleet, split_devices
    from kat_jax.models.config import get_preset
    from kat_jax.models.decoder import init_model
    from kat_jax.rollout.sampler import EngineConfig, SamplingParams
    from kat_jax.training.sharding import make_mesh, named, param_specs

    assert jax.device_count() == 8
    cfg = get_preset("tiny")
    model = init_model(cfg, 0)
    train_devs, roll_devs = split_devices(jax.devices(), 4, 4)
    mesh = make_mesh(1, 4, 1, devices=train_devs)
    shard = named(mesh, param_specs(model, mesh))
    host = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params = jax.device_put(host, shard)  # the trainer's parameters, sharded over 4 devices
    q = params["layers"]["self_attn"]["q_proj"]["kernel"]
    assert set(q.devices()) == set(train_devs) and not q.sharding.is_fully_replicated
    fleet = EngineFleet(cfg, params, roll_devs, slots=1,
                        engine_config=EngineConfig(max_batch=4, cache_tokens=512))

    def check_weights(want):
        for res in fleet.scheduler.resources:  # each replica: its own device, the exact weights
            dev, eng = res.handle
            leaves = jax.tree.leaves(nnx.to_pure_dict(nnx.state(nnx.merge(eng.graphdef,
                                                                          eng.params),
                                                                 nnx.Param)))
            assert {{d for a in leaves for d in a.devices()}} == {{dev}}
            for a, b in zip(leaves, jax.tree.leaves(want)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    sp = SamplingParams(temperature=1.0, max_new_tokens=4, seed=5)
    prompts = [[[1 + i, 2, 3 + i]] for i in range(6)]

    def run_all():
        out = [None] * len(prompts)
        def one(i):
            out[i] = [g.tokens for g in fleet.generate(prompts[i], sp, n=2)[0]]
        ts = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        [t.start() for t in ts]
        [t.join() for t in ts]
        return out

    def same_on_every_replica(out):  # where a generation runs does not change it
        for res in fleet.scheduler.resources:
            got = [g.tokens for g in res.handle[1].generate(prompts[0], sp, n=2)[0]]
            assert got == out[0], (res.name, got, out[0])

    check_weights(host)
    out = run_all()
    placed = fleet.stats()["placed"]
    assert sum(placed.values()) == 6 and sum(1 for v in placed.values() if v) >= 2, placed
    same_on_every_replica(out)
    # an update on the training mesh, then its weights to the replicas, device to device
    update = jax.jit(lambda p: jax.tree.map(lambda x: x * 1.5 + 0.01, p),
                     in_shardings=(shard,), out_shardings=shard)
    params2 = update(params)
    fleet.update_weights(params2)
    check_weights(jax.device_get(params2))
    out2 = run_all()
    assert out2 != out
    same_on_every_replica(out2)

    # tensor-parallel replicas: the 4 rollout devices as 2 replicas of 2 devices each
    tp = EngineFleet(cfg, params2, roll_devs, slots=1, replica_devices=2,
                     engine_config=EngineConfig(max_batch=4, cache_tokens=512))
    assert [r.name for r in tp.scheduler.resources] == [
        "rollout:" + "+".join(str(d.id) for d in roll_devs[i:i + 2]) for i in (0, 2)]
    for i, res in enumerate(tp.scheduler.resources):
        eng, group = res.handle[1], set(roll_devs[2 * i:2 * i + 2])
        qr = eng.params["layers"]["self_attn"]["q_proj"]["kernel"]
        assert set(qr.devices()) == group and "tensor" in str(qr.sharding.spec), qr.sharding
        k_pool = eng._pool[0][0]
        assert set(k_pool.devices()) == group and k_pool.sharding.spec[0] == "tensor"
        assert k_pool.addressable_shards[0].data.shape[0] == cfg.num_kv_heads // 2
        np.testing.assert_array_equal(np.asarray(qr), np.asarray(
            params2["layers"]["self_attn"]["q_proj"]["kernel"]))
    for res in tp.scheduler.resources:  # what a single-device replica samples, log-probs too
        gens = res.handle[1].generate(prompts[0], sp, n=2)[0]
        ref = fleet.scheduler.resources[0].handle[1].generate(prompts[0], sp, n=2)[0]
        assert [g.tokens for g in gens] == [g.tokens for g in ref]
        np.testing.assert_allclose([g.logprobs for g in gens], [g.logprobs for g in ref],
                                   atol=1e-5)
        pool = res.handle[1]._pool[0][0]  # still split over the heads after decoding
        assert pool.sharding.spec[0] == "tensor", pool.sharding
    tp.update_weights(params)  # back to the first weights: the first samples again
    assert [g.tokens for g in tp.generate(prompts[0], sp, n=2)[0]] == out[0]
    print("OK", fleet.stats())
""")


def test_two_sub_meshes_train_on_four_devices_sample_on_four_with_device_to_device_weights():
    """8 simulated CPU devices: the trainer's parameters sharded (fsdp) over devices 0-3, one
    sampler replica on each of devices 4-7. Every replica holds exactly the trainer's weights on
    its own device, before and after an update on the training mesh that is copied device to
    device, and samples the same tokens for the same prompt and seed as every other replica.
    (reshard_params also forbids host transfers with JAX's transfer guards, which act on
    accelerators; on CPU, device memory is host memory and they never fire.)"""
    proc = subprocess.run([sys.executable, "-c", SUBMESH.format(root=ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout


ONLINE_SPLIT = textwrap.dedent('''
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    sys.path.insert(0, {root!r})
    import jax
    from kat_jax.envs.base import Env, EvalResult, Task
    from kat_jax.envs.registry import register_env
    from kat_jax.training import config_lib
    import kat_jax.flow.online  # noqa: F401  (registers the online loop)
    from kat_jax.training.trainer import run_train

    class Parity(Env):
        name = "parity_split"
        def reset(self, task):
            return [dict(m) for m in task.messages], []
        def evaluate(self, messages=()):
            text = next((m.get("content") or "" for m in reversed(messages)
                         if m["role"] == "assistant"), "")
            share = sum(ord(c) % 2 == 0 for c in text) / max(len(text), 1)
            return EvalResult(reward=float(share), passed=share > 0.5)

    register_env("parity_split", Parity,
                 lambda path=None: [Task(f"v{{i}}", [{{"role": "user", "content": f"Say {{i}}."}}])
                                    for i in range(4)])
    small = ["--config.rl.env=parity_split", "--config.rl.split=all",
             "--config.rl.groups_per_round=2", "--config.rl.group_size=3",
             "--config.rl.minibatches=2", "--config.rl.max_turns=1",
             "--config.rl.max_new_tokens=8", "--config.rl.concurrency=3",
             "--config.data.rows=2", "--config.data.row_len=64", "--config.data.trajectories=4",
             "--config.train.steps=2", "--config.train.log_every=1",
             "--config.train.checkpoint_every=2"]
    out = {{}}
    for name, extra in (("shared", []), ("split", ["--config.rl.rollout_devices=2",
                                                  "--config.rl.lend_train_devices=true"]),
                        ("tp", ["--config.rl.rollout_devices=2",
                                "--config.rl.rollout_replica_devices=2"])):
        cfg = config_lib.load_train_config("configs/rl.py:tiny_calculator", small + extra)
        wd = os.path.join(sys.argv[1], name)
        res = run_train(cfg, wd)
        out[name] = dict(res=res.get("mesh"),
                         metrics=[json.loads(x) for x in open(wd + "/metrics.jsonl") if x.strip()])
    try:
        config_lib.load_train_config("configs/rl.py:tiny_calculator",
                                     small + ["--config.rl.rollout_devices=4"])
        run_train(config_lib.load_train_config("configs/rl.py:tiny_calculator",
                                               small + ["--config.rl.rollout_devices=4"]),
                  os.path.join(sys.argv[1], "bad"))
    except Exception as e:
        out["error"] = str(e)
    try:
        run_train(config_lib.load_train_config("configs/rl.py:tiny_calculator", small + [
            "--config.rl.rollout_devices=2", "--config.rl.rollout_replica_devices=3"]),
                  os.path.join(sys.argv[1], "bad_tp"))
    except Exception as e:
        out["error_tp"] = str(e)
    print("RESULT" + json.dumps(out))
''')


def test_online_loop_samples_on_its_own_devices_and_lends_training_devices(tmp_path):
    """rl.rollout_devices=2 and rl.lend_train_devices on 4 simulated devices: the trainer's mesh
    holds the other 2 devices, the sampler replicas (2 own + 2 lent) serve the round's calls on
    both kinds of device, and the round samples what the time-shared loop samples (same weights,
    same seeds: same rewards and tokens; losses equal up to the meshes' summation order);
    rl.rollout_devices that leaves the trainer no device is an error naming the key. With
    rl.rollout_replica_devices=2 the 2 rollout devices form one tensor-parallel replica that
    samples the same round; a replica size that does not divide them is an error naming the key."""
    proc = subprocess.run([sys.executable, "-c", ONLINE_SPLIT.format(root=ROOT), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    shared, split = out["shared"], out["split"]
    assert shared["res"] == {"data": 1, "fsdp": 4, "context": 1, "tensor": 1}
    assert split["res"] == {"data": 1, "fsdp": 2, "context": 1, "tensor": 1}
    a, b = shared["metrics"], split["metrics"]
    assert "placement/replicas" not in a[-1]
    rnd = b[-1]
    assert rnd["placement/replicas"] == 4
    assert rnd["placement/calls_rollout_devices"] > 0 and rnd["placement/calls_lent_train_devices"] > 0
    assert rnd["placement/calls_rollout_devices"] + rnd["placement/calls_lent_train_devices"] == 6
    assert a[-1]["reward"] == b[-1]["reward"]
    assert a[-1]["generated_tokens"] == b[-1]["generated_tokens"]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
    assert "rl.rollout_devices" in out["error"] and "[0, 4)" in out["error"]
    # rl.rollout_replica_devices=2: one tensor-parallel replica over the 2 rollout devices
    tp = out["tp"]["metrics"]
    assert tp[-1]["placement/replicas"] == 1
    assert tp[-1]["placement/calls_rollout_devices"] == 6
    assert tp[-1]["reward"] == a[-1]["reward"]
    assert tp[-1]["generated_tokens"] == a[-1]["generated_tokens"]
    assert "rl.rollout_replica_devices" in out["error_tp"] and "divide" in out["error_tp"]
