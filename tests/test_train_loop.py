"""The training loop: configs, sharded step == single-device step, stop + resume == uninterrupted
(also across meshes), checkpoints load into score / export-hf, every stage learns."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kat_jax.training import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MID = os.path.join(ROOT, "configs", "mid_training.py")
# Small and fast: rows of 64 tokens, dense attention (one compile is the cost of a test).
FAST = ["--config.data.row_len=64", "--config.data.rows=2", "--config.data.trajectories=8",
        "--config.train.log_every=1", "--config.train.checkpoint_every=2",
        "--config.train.steps=4", "--config.optimizer.warmup_steps=1",
        "--config.train.async_checkpointing=false", "--config.data.shards=4"]


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


# ---------------------------------------------------------------------------------------------
# configs


def test_config_overrides_parse_by_type_and_unknown_keys_fail():
    cfg = config_lib.load_train_config(f"{MID}:tiny", [
        "--config.train.steps=7", "--config.optimizer.learning_rate", "1e-4",
        "--config.data.shuffle=false", "--config.model.checkpoint=preset:tiny@3"])
    assert cfg.train.steps == 7 and cfg.optimizer.learning_rate == 1e-4
    assert cfg.data.shuffle is False and cfg.model.checkpoint == "preset:tiny@3"
    with pytest.raises(config_lib.ConfigError, match=r"--config.train.stepz: unknown key"):
        config_lib.load_train_config(f"{MID}:tiny", ["--config.train.stepz=3"])
    with pytest.raises(config_lib.ConfigError, match=r"--config.nope.steps: unknown key 'nope'"):
        config_lib.load_train_config(f"{MID}:tiny", ["--config.nope.steps=3"])
    with pytest.raises(config_lib.ConfigError, match=r"--config.train.steps: 'ten' is not a valid int"):
        config_lib.load_train_config(f"{MID}:tiny", ["--config.train.steps=ten"])
    with pytest.raises(config_lib.ConfigError, match=r"--config.data.shuffle: 'maybe' is not a bool"):
        config_lib.load_train_config(f"{MID}:tiny", ["--config.data.shuffle=maybe"])
    with pytest.raises(config_lib.ConfigError, match="unknown variant 'huge'"):
        config_lib.load_train_config(f"{MID}:huge")
    with pytest.raises(config_lib.ConfigError, match="unrecognised argument '--steps'"):
        config_lib.load_train_config(f"{MID}:tiny", ["--steps", "3"])


def test_every_stage_config_has_the_common_keys_and_presets():
    for name in ("mid_training", "sft", "rft", "rl"):
        for variant in ("tiny", "qwen3_8b", "kat_dev_32b"):
            cfg = config_lib.load_train_config(os.path.join(ROOT, "configs", f"{name}.py:{variant}"))
            for key in ("steps", "checkpoint_every", "log_every", "microbatches"):
                assert key in cfg.train
    q = config_lib.load_train_config(os.path.join(ROOT, "configs", "quickstart.py"),
                               ["--config.sft.train.steps=3"])
    assert q.stages == "mid,sft,rft,rl" and q.sft.train.steps == 3


def test_train_cli_rejects_bad_values_naming_the_key(tmp_path, capsys):
    from kat_jax.cli import main

    rc = main(["train", "--config", f"{MID}:tiny", "--workdir", str(tmp_path / "w"),
               "--config.train.steps=0"])
    assert rc == 1 and "--config.train.steps: must be >= 1" in capsys.readouterr().err
    rc = main(["train", "--config", f"{MID}:tiny", "--workdir", str(tmp_path / "w"),
               "--config.mesh.fsdp=3"])
    assert rc == 1 and "mesh" in capsys.readouterr().err


def test_sharding_rules_and_the_unsharded_parameter_check():
    from flax import nnx
    from jax.sharding import AbstractMesh
    from jax.sharding import PartitionSpec as P

    from kat_jax.models.config import get_preset
    from kat_jax.models.decoder import abstract_model
    from kat_jax.training.sharding import check_sharded_fraction, param_specs

    def mesh(fsdp, tensor):
        return AbstractMesh((1, fsdp, tensor), ("data", "fsdp", "tensor"))

    model = abstract_model(get_preset("tiny"))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    specs = param_specs(model, mesh(4, 2))
    assert specs["layers"]["self_attn"]["q_proj"]["kernel"] == P(None, "fsdp", "tensor", None)
    assert specs["layers"]["mlp"]["down_proj"]["kernel"] == P(None, "tensor", "fsdp")
    assert specs["embed_tokens"] == P("tensor", "fsdp")
    assert check_sharded_fraction(params, specs, mesh(4, 2)) > 0.99
    # fsdp 3 divides nothing in the tiny model (d=64): most bytes would stay replicated
    bad = param_specs(model, mesh(3, 1))
    with pytest.raises(ValueError, match=r"unsharded on mesh .*fsdp.*: 3"):
        check_sharded_fraction(params, bad, mesh(3, 1))


# ---------------------------------------------------------------------------------------------
# stop / resume / meshes


def _run(workdir, extra=()):
    from kat_jax.training.trainer import run_train

    return run_train(config_lib.load_train_config(f"{MID}:tiny", FAST + list(extra)), str(workdir))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    w = tmp_path_factory.mktemp("ref")
    _run(w)
    return w


def test_stop_and_resume_equals_uninterrupted(reference_run, tmp_path):
    from kat_jax.models.checkpoint import load_params
    from kat_jax.models.config import ModelConfig
    from kat_jax.training.trainer import Preempted

    with pytest.raises(Preempted, match="train.stop_at_step at step 2"):
        _run(tmp_path, ["--config.train.stop_at_step=2"])
    assert sorted(losses(tmp_path)) == [1, 2]
    os.makedirs(tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1")  # a save killed midway
    out = _run(tmp_path)
    assert out["step"] == 4
    assert losses(tmp_path) == losses(reference_run)  # bit-identical, step by step
    cfg = ModelConfig.load_json(str(reference_run / "model" / "model_config.json"))
    a = load_params(str(reference_run / "model"), cfg)
    b = load_params(str(tmp_path / "model"), cfg)
    for x, y in zip(jax_leaves(a), jax_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert _run(tmp_path)["status"] == "already finished"


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_checkpoint_loads_into_score_and_export_hf(reference_run, tmp_path):
    from kat_jax.cli import main

    src = os.path.join(ROOT, "kat_jax", "assets", "sample_tokens.jsonl")
    assert main(["score", "--checkpoint", str(reference_run), "--input", src,
                 "--output", str(tmp_path / "s.jsonl")]) == 0
    assert (tmp_path / "s.jsonl").read_text().count("\n") >= 1
    assert main(["export-hf", str(reference_run), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").exists()


SHARDED = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    from flax import nnx
    sys.path.insert(0, {root!r})
    from kat_jax.training import config_lib
    from kat_jax.training.trainer import run_train, Preempted
    from kat_jax.training.build import loss_spec
    from kat_jax.training.sharding import make_mesh, param_specs, named, like_params, batch_sharding
    from kat_jax.training.optim import make_optimizer
    from kat_jax.training.step import init_state, make_train_step
    from kat_jax.models.config import get_preset
    from kat_jax.models.decoder import init_model
    from kat_jax.data.pipeline import BatchShape, make_step_iterator
    from kat_jax.data.sources import expand_files
    from kat_jax.data.tokenizer import ByteTokenizer

    assert jax.device_count() == 8
    # 1) one train step (2 microbatches x 8 shard batches) on fsdp 4 x tensor 2 == on one device
    cfg = config_lib.load_train_config({mid!r} + ":tiny", {fast!r} + ["--config.train.microbatches=2"])
    mcfg = get_preset("tiny", attention_block_size=16)
    model = init_model(mcfg, seed=1)
    graphdef = nnx.graphdef(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx, sched = make_optimizer(cfg.optimizer, 10)
    it = make_step_iterator(expand_files(cfg.data.train_files, "f"), "mid", ByteTokenizer(),
                            BatchShape(2, 64, 8, 16), 512, 2, 8)
    batch, _ = next(it)
    step = make_train_step(graphdef, tx, sched, loss_spec(cfg))
    outs = []
    for mesh_args in [dict(data=1, fsdp=4, tensor=2), dict(data=1, fsdp=1, tensor=1)]:
        devs = jax.devices() if mesh_args["fsdp"] > 1 else jax.devices()[:1]
        mesh = make_mesh(devices=devs, **mesh_args)
        ps = named(mesh, param_specs(model, mesh))
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        state = init_state(params, tx)
        shard = {{k: rep for k in state}}
        shard["params"] = ps
        shard["opt_state"] = like_params(state["opt_state"], params, ps, rep)
        state = jax.device_put(state, shard)
        bs = jax.tree.map(lambda v: batch_sharding(mesh, v.ndim), batch)
        f = jax.jit(step, in_shardings=(shard, bs), out_shardings=(shard, rep))
        new, m = f(state, jax.device_put(batch, bs))
        if mesh_args["fsdp"] > 1:
            q = new["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
            want = jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
            assert q.sharding.spec == want, q.sharding
            mu = new["opt_state"][1][0].mu["layers"]["self_attn"]["q_proj"]["kernel"]
            assert mu.sharding.spec == q.sharding.spec, mu.sharding
        outs.append((jax.device_get(new["params"]), jax.device_get(m)))
    (p8, m8), (p1, m1) = outs
    assert abs(m8["loss"] - m1["loss"]) < 1e-5, (m8["loss"], m1["loss"])
    assert abs(m8["grad_norm"] - m1["grad_norm"]) < 1e-4 * m1["grad_norm"]
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)
    # the same 16 shard batches as 1 microbatch of 16 shards: the same global mean and update
    flat = jax.tree.map(lambda v: v.reshape(1, 16, *v.shape[2:]), batch)
    state = jax.device_put(init_state(params, tx), shard)
    new, m = jax.jit(step)(state, jax.device_put(flat, bs))
    assert abs(float(m["loss"]) - m1["loss"]) < 1e-5, (float(m["loss"]), m1["loss"])
    for a, b in zip(jax.tree.leaves(jax.device_get(new["params"])), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)
    # 2) a run on fsdp 4 x tensor 2 stopped at step 2; the test resumes it on one device
    cfg = config_lib.load_train_config({mid!r} + ":tiny", {fast!r} + [
        "--config.mesh.fsdp=4", "--config.mesh.tensor=2", "--config.train.stop_at_step=2"])
    try:
        run_train(cfg, sys.argv[1])
        raise SystemExit("did not stop")
    except Preempted:
        pass
    print("OK", m8["loss"], m1["loss"])
""")


def test_sharded_step_equals_single_device_and_restore_onto_another_mesh(reference_run, tmp_path):
    """fsdp 4 x tensor 2 on 8 simulated devices: one step equals the single-device step (loss,
    gradient norm, updated params); a run saved there at step 2 resumes on one device and logs
    the losses of the uninterrupted single-device run."""
    script = SHARDED.format(root=ROOT, mid=MID, fast=FAST)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = _run(tmp_path, ["--config.mesh.fsdp=1"])
    assert out["step"] == 4 and out["mesh"] == {"data": 1, "fsdp": 1, "context": 1, "tensor": 1}
    got, want = losses(tmp_path), losses(reference_run)
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in range(1, 5)], [want[s] for s in range(1, 5)],
                               rtol=2e-5)


# ---------------------------------------------------------------------------------------------
# every stage learns (the quickstart pipeline, shortened)


def test_quickstart_pipeline_every_stage_learns(tmp_path):
    """The quickstart, shortened: mid and sft lower their loss; rft and rl run the online loop on
    calculator_small (rft against its bundled teachers); every stage exports its model; a second
    run resumes (all finished). The RL learning itself is measured by the README's run."""
    from kat_jax.cli import main

    q = os.path.join(ROOT, "configs", "quickstart.py")
    online = ["--config.{s}.train.steps=2", "--config.{s}.rl.groups_per_round=2",
              "--config.{s}.rl.group_size=2", "--config.{s}.rl.minibatches=1",
              "--config.{s}.rl.concurrency=4", "--config.{s}.rl.max_new_tokens=16"]
    args = ["train", "--config", q, "--workdir", str(tmp_path),
            "--config.mid.train.steps=12", "--config.mid.data.row_len=256",
            "--config.mid.train.log_every=1", "--config.sft.train.steps=6",
            "--config.sft.data.rows=1", "--config.sft.train.log_every=1",
            "--config.sft.train.eval_every=3",
            "--config.sft.data.eval_files=pkg:data/sft_calculator_small.jsonl",
            "--config.sft.train.eval_batches=1"]
    args += [a.format(s=s) for s in ("rft", "rl") for a in online]
    assert main(args) == 0
    for stage in ("mid", "sft"):
        got = losses(tmp_path / stage)
        first, last = got[min(got)], got[max(got)]
        assert last < first, (stage, got)
    for stage in ("mid", "sft", "rft", "rl"):
        assert (tmp_path / stage / "model" / "model_config.json").exists()
        assert os.listdir(tmp_path / stage / "tensorboard")
    with open(tmp_path / "sft" / "metrics.jsonl") as f:
        evals = [r["eval_loss"] for r in map(json.loads, f) if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]  # steps 3 and 6, same held-out batch
    for stage in ("rft", "rl"):
        with open(tmp_path / stage / "metrics.jsonl") as f:
            rows = [r for r in map(json.loads, f) if "pass_rate" in r]
        assert rows and all(r["episodes"] == 4 for r in rows), stage
        assert ("outcome_reward" in rows[0]) == (stage == "rft")
    # a second run on the same workdir resumes: every stage is already finished
    assert main(args) == 0


def test_non_finite_updates_are_skipped_then_stop_the_run(tmp_path):
    """A learning rate of 1e30 blows the parameters up after one update; from then on every loss
    is non-finite: those updates are skipped (params unchanged, counted), and the run stops after
    train.max_consecutive_skips of them with an error naming the key."""
    from kat_jax.training.trainer import TrainingError

    with pytest.raises(TrainingError, match=r"2 consecutive non-finite updates .*"
                                            r"train.max_consecutive_skips=2"):
        _run(tmp_path, ["--config.optimizer.learning_rate=1e30",
                        "--config.optimizer.warmup_steps=0", "--config.train.steps=8",
                        "--config.train.max_consecutive_skips=2"])
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert rows[0]["skipped_update"] == 0
    assert [r["skipped_update"] for r in rows[-2:]] == [1, 1]
    assert rows[-1]["total_skipped"] == 2
