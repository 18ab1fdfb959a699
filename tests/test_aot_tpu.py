"""Ahead-of-time compilation for Cloud TPU topologies on this CPU host (libtpu's abstract devices):
the Mosaic tree-attention kernel at real shapes, a whole train step, `kat-jax compile-check`.

Tests that need libtpu skip, with the reason, only when it cannot be imported (install it with
pip install -e ".[aot]"); the topology tables and the CLI's exit codes are tested without it.
"""

import json
import os

import pytest

from kat_jax.training.tpu_topologies import known_names, resolve_topology

SFT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "sft.py")


def test_slice_names_map_to_libtpu_topologies():
    expect = {"v5p-128": ("v5p:4x4x4", 64), "v5p-64": ("v5p:2x4x4", 32),
              "v5p-8": ("v5p:2x2x1", 4), "v4-32": ("v4:2x2x4", 16), "v4-8": ("v4:2x2x1", 4),
              "v5e-16": ("v5e:4x4", 16), "v5e-1": ("v5e:1x1", 1), "v6e-64": ("v6e:8x8", 64),
              "v6e-8": ("v6e:2x4", 8), "v5p:2x2x1": ("v5p:2x2x1", 4)}
    for name, (topo, chips) in expect.items():
        t = resolve_topology(name)
        assert (t.topology_string, t.chips) == (topo, chips), name
    assert resolve_topology("v5p-8").hbm_bytes == 95 * 2**30
    assert resolve_topology("v5e-4").hbm_bytes == 16 * 2**30
    assert resolve_topology("v6e-4").hbm_bytes == resolve_topology("v4-8").hbm_bytes == 32 * 2**30


@pytest.mark.parametrize("name", ["v7-8", "v5p-12", "v5p-7", "v5e-3", "v5e:2x2x2", "tpu"])
def test_unknown_topology_error_lists_known_names(name):
    with pytest.raises(ValueError, match="unknown TPU topology") as e:
        resolve_topology(name)
    assert "v5p-128" in str(e.value) and "v6e-64" in str(e.value)
    assert set(known_names("v5e")) >= {"v5e-1", "v5e-4", "v5e-16", "v5e-256"}


def test_cli_compile_check_exit_codes(monkeypatch, capsys):
    from kat_jax import cli
    from kat_jax.training import aot

    assert cli.main(["compile-check", "--config", f"{SFT}:tiny", "--topology",
                     "v9-8"]) == 1
    assert "unknown TPU topology" in capsys.readouterr().err

    def fake(cfg, topology, top=8):
        assert cfg.train.microbatches == 3  # --config.* overrides reach the config
        return {"fits": fits, "memory_per_device": {"total": 2}}

    monkeypatch.setattr(aot, "compile_check", fake)
    monkeypatch.setattr(aot, "format_report", lambda r: "report")
    args = ["compile-check", "--config", f"{SFT}:tiny", "--topology", "v5e-4",
            "--config.train.microbatches=3"]
    for fits, code in ((True, 0), (False, 3)):
        assert cli.main(args) == code
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["fits"] is fits


# ---------------------------------------------------------------------------------------------
# with libtpu


def _libtpu():
    return pytest.importorskip("libtpu", reason="libtpu is not installed (pip install -e "
                               "'.[aot]'): no abstract TPU devices to compile for")


def _one_chip_mesh(topology: str):
    import numpy as np
    from jax.sharding import Mesh

    from kat_jax.training.tpu_topologies import topology_devices

    devices = topology_devices(topology)[:1]
    return Mesh(np.asarray(devices).reshape(1), ("data",))


def test_auto_attention_resolves_to_the_tpu_kernel_under_an_abstract_tpu_mesh():
    _libtpu()
    import jax

    from kat_jax.ops.attention import resolve_attention_impl
    from kat_jax.ops.pallas.tree_attention import default_backend

    assert resolve_attention_impl("auto", head_dim=128) == "xla_block_sparse"  # CPU host
    with jax.set_mesh(_one_chip_mesh("v5e-1")):
        assert resolve_attention_impl("auto", head_dim=128) == "pallas"
        assert default_backend() == ("tpu", False)


@pytest.mark.parametrize("topology,row_len", [("v5e-1", 8192), ("v5p:1x1x1", 8192),
                                              ("v6e-1", 32768)])
def test_pallas_tree_attention_fwd_bwd_compiles_through_mosaic(topology, row_len):
    """head_dim 128, GQA group 8 (8 query heads per kv head), bf16, block 512, forward and
    backward (dQ, dK/dV kernels): XLA:TPU compiles the three Mosaic kernels."""
    _libtpu()
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from kat_jax.ops.pallas.tree_attention import pallas_tree_attention

    mesh = _one_chip_mesh(topology)
    rep = NamedSharding(mesh, P())
    b, t, n, k, h = 1, row_len, 8, 1, 128

    def loss(q, kk, v, end):
        out = pallas_tree_attention(q, kk, v, end, block_size=512, backend="tpu",
                                    interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    args = [jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16, sharding=rep),
            jax.ShapeDtypeStruct((b, t, k, h), jnp.bfloat16, sharding=rep),
            jax.ShapeDtypeStruct((b, t, k, h), jnp.bfloat16, sharding=rep),
            jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rep)]
    with jax.set_mesh(mesh):
        compiled = step.lower(*args).compile()
    assert compiled.as_text().count("tpu_custom_call") >= 3  # fwd, dQ, dK/dV
    assert compiled.memory_analysis().output_size_in_bytes > 0


@pytest.mark.parametrize("topology", ["v5e-1", "v6e-1"])
def test_pallas_paged_attention_compiles_through_mosaic(topology):
    """The sampler's paged-attention kernel (kat_jax.ops.pallas.paged, TPU lowering: block table
    scalar-prefetched): XLA:TPU compiles it for decode (GQA 4:1, head_dim 128, 16-token blocks)
    and for a 16-token prefill chunk (head_dim 64), bf16."""
    _libtpu()
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from kat_jax.ops.pallas.paged import pallas_paged_attention

    mesh = _one_chip_mesh(topology)
    rep = NamedSharding(mesh, P())
    fn = jax.jit(lambda q, pk, pv, tb, qp: pallas_paged_attention(
        q, pk, pv, tb, qp, backend="tpu", interpret=False))
    for b, t, n, k, h, s_blk, pool, m in [(8, 1, 32, 8, 128, 16, 256, 64),
                                          (4, 16, 16, 2, 64, 32, 128, 32)]:
        args = [jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16, sharding=rep),
                jax.ShapeDtypeStruct((k, pool, s_blk, h), jnp.bfloat16, sharding=rep),
                jax.ShapeDtypeStruct((k, pool, s_blk, h), jnp.bfloat16, sharding=rep),
                jax.ShapeDtypeStruct((b, m), jnp.int32, sharding=rep),
                jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rep)]
        with jax.set_mesh(mesh):
            compiled = fn.lower(*args).compile()
        assert compiled.as_text().count("tpu_custom_call") == 1


def test_tiny_train_step_compiles_and_fits_on_a_v5e_topology():
    """The whole SFT step (Pallas attention inside shard_map over a 2x2 mesh) for v5e-4, with
    abstract inputs: the report that `kat-jax compile-check` prints."""
    _libtpu()
    from kat_jax.training import aot, config_lib

    cfg = config_lib.load_train_config(f"{SFT}:tiny", [
        "--config.model.attention_impl=pallas", "--config.model.attention_block_size=128",
        "--config.data.row_len=512", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"])
    r = aot.compile_check(cfg, "v5e-4")
    assert r["fits"] and r["chips"] == 4 and r["device_kind"] == "TPU v5 lite"
    assert r["mesh"] == {"data": 1, "fsdp": 2, "context": 1, "tensor": 2}
    assert r["attention_impl"] == "pallas" and r["mosaic_kernels"] >= 3
    mem = r["memory_per_device"]
    assert 0 < mem["total"] < r["hbm_per_device"] and mem["argument"] > 0
    assert r["flops_per_device_xla"] > 0 and r["model_flops_per_step"] > 0
    specs = {a["name"]: a["spec"] for a in r["largest_arrays"]}
    assert any("fsdp" in s for s in specs.values())
    assert "fits" in aot.format_report(r) and json.loads(aot.summary_line(r))["fits"]


@pytest.mark.parametrize("mesh_args", [dict(data=1, fsdp=8, tensor=4), dict(data=1, fsdp=-1,
                                                                         tensor=1)])
def test_every_host_of_a_v5p_slice_reads_whole_shards_counted_once(mesh_args):
    """On a real slice the mesh orders devices by the torus, not by host: a host's shards need not
    be contiguous, and hosts share shards when a tensor group spans them. Every shard is read by
    each host holding it and counted by exactly one."""
    _libtpu()
    from kat_jax.training.sharding import (
        local_shard_ids,
        make_mesh,
        num_batch_shards,
        owned_shard_ids,
        shard_holders,
    )
    from kat_jax.training.tpu_topologies import topology_devices

    devices = topology_devices("v5p-64")
    mesh = make_mesh(devices=devices, **mesh_args)
    shards = 2 * num_batch_shards(mesh)
    hosts = sorted({d.process_index for d in devices})
    assert len(hosts) == 8
    holders = shard_holders(mesh, shards)
    assert sorted(holders) == list(range(shards))
    local = {h: local_shard_ids(mesh, shards, h) for h in hosts}
    owned = {h: owned_shard_ids(mesh, shards, h) for h in hosts}
    for h in hosts:
        assert set(owned[h]) <= set(local[h])
    assert sorted(i for h in hosts for i in owned[h]) == list(range(shards))
    for i, procs in holders.items():
        assert all(i in local[h] for h in procs)


def test_offload_remat_policies_keep_activations_in_tpu_host_memory():
    """model.remat_policy offload_*: the tiny decoder's gradient compiled for v5e-1 keeps the
    saved activations in pinned host memory (XLA's host temporaries): offload_attention_out
    exactly the attention outputs of both layers, offload_dots_no_batch the weight-matmul
    outputs (more)."""
    _libtpu()
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from kat_jax.models.config import get_preset
    from kat_jax.models.decoder import abstract_model, chain_inputs

    mesh = _one_chip_mesh("v5e-1")
    rep = NamedSharding(mesh, P())
    t = 256
    host_bytes = {}
    for policy in ("offload_attention_out", "offload_dots_no_batch"):
        cfg = get_preset("tiny").replace(remat_policy=policy, attention_impl="xla_dense")
        graphdef, state = nnx.split(abstract_model(cfg))
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                             state)

        def loss(st, tokens, graphdef=graphdef):
            return jnp.mean(nnx.merge(graphdef, st)(tokens, *chain_inputs(tokens)) ** 2)

        tokens = jax.ShapeDtypeStruct((1, t), jnp.int32, sharding=rep)
        with jax.set_mesh(mesh):
            compiled = jax.jit(jax.grad(loss)).lower(state, tokens).compile()
        host_bytes[policy] = compiled.memory_analysis().host_temp_size_in_bytes
    attention_out = cfg.num_layers * t * cfg.num_heads * cfg.head_dim * 4  # float32
    assert host_bytes["offload_attention_out"] == attention_out
    assert host_bytes["offload_dots_no_batch"] > attention_out


RL = os.path.join(os.path.dirname(SFT), "rl.py")


def test_online_rollout_split_compiles_train_and_sampler_sub_meshes(capsys):
    """rl.rollout_devices: the train step compiles on the first N - R devices, the sampler's decode
    and prefill programs for one rollout device, each with its memory against HBM."""
    _libtpu()
    from kat_jax import cli
    from kat_jax.flow.split_check import split_compile_check
    from kat_jax.training import config_lib

    cfg = config_lib.load_train_config(f"{RL}:tiny_calculator", ["--config.rl.rollout_devices=4"])
    with pytest.raises(ValueError, match="rl.rollout_devices=4: v5p-8 has 4 devices"):
        split_compile_check(cfg, "v5p-8")
    assert cli.main(["compile-check", "--config", f"{RL}:tiny_calculator", "--topology", "v5p-8",
                     "--config.rl.rollout_devices=2"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out.splitlines()[-1])
    assert report["fits"] and report["train_devices"] == 2 and report["rollout"]["devices"] == 2
    assert report["rollout"]["kv_pool_bytes"] > 0
    assert "rollout: 2 devices (one replica each), training mesh on 2" in out
    assert "decode:" in out and "prefill:" in out and "does not fit" not in out
    # a tensor-parallel replica over both rollout devices: the programs compile SPMD over 2
    # devices, with the weights and the KV pool split (less argument memory per device)
    tp = split_compile_check(config_lib.load_train_config(
        f"{RL}:tiny_calculator", ["--config.rl.rollout_devices=2",
                                  "--config.rl.rollout_replica_devices=2"]), "v5p-8")
    ro = tp["rollout"]
    assert tp["fits"] and (ro["replica_devices"], ro["replicas"]) == (2, 1)
    one = report["rollout"]["programs"]["decode"]["memory_per_device"]["argument"]
    two = ro["programs"]["decode"]["memory_per_device"]["argument"]
    assert 0.4 * one < two < 0.75 * one, (one, two)
    with pytest.raises(ValueError, match="rollout_replica_devices=3 must divide"):
        split_compile_check(config_lib.load_train_config(
            f"{RL}:tiny_calculator", ["--config.rl.rollout_devices=2",
                                      "--config.rl.rollout_replica_devices=3"]), "v5p-8")
