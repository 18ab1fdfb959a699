"""Presets against published parameter counts; config validation; remat and layer scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kat_jax.models.config import ModelConfig, get_preset
from kat_jax.models.decoder import chain_inputs, init_model

# Parameter counts published on the Hugging Face model cards (billions).
PUBLISHED = {"qwen3_0_6b": 0.6, "qwen3_1_7b": 1.7, "qwen3_8b": 8.2, "qwen3_32b": 32.8,
             "kat_dev_32b": 32.8, "qwen2_5_7b": 7.61, "qwen2_5_32b": 32.5}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts_match_model_cards(name):
    cfg = get_preset(name)
    assert abs(cfg.num_params() / 1e9 - PUBLISHED[name]) / PUBLISHED[name] < 0.03


def test_tiny_model_has_the_counted_parameters_and_a_stacked_layer_axis():
    cfg = get_preset("tiny")
    model = init_model(cfg)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert sum(x.size for x in leaves) == cfg.num_params()
    q = model.layers.self_attn.q_proj.kernel
    assert q.shape == (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim)
    assert q.get_metadata()["logical_axes"] == ("embed", "q_heads", "head_dim")


def test_config_rejects_unknown_and_invalid_keys():
    with pytest.raises(KeyError, match="unknown key"):
        ModelConfig.from_dict({"hidden_size": 64, "hiden_layers": 2})
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="remat_policy"):
        ModelConfig(remat_policy="sometimes")
    with pytest.raises(ValueError, match="qwen2 has bias"):
        ModelConfig(family="qwen2", qkv_bias=False, qk_norm=False)
    with pytest.raises(ValueError, match="qwen3 has q/k RMSNorm"):
        ModelConfig(family="qwen3", qkv_bias=True)
    with pytest.raises(KeyError, match="unknown model preset"):
        get_preset("llama")


def test_config_accepts_exactly_the_registered_attention_impls_and_remat_policies():
    from kat_jax.models.remat import REMAT_POLICIES
    from kat_jax.ops.attention_impls import ATTENTION_IMPLS, attention_impl_names

    assert attention_impl_names() == ("auto", *ATTENTION_IMPLS)
    for name in attention_impl_names():
        assert ModelConfig(attention_impl=name).attention_impl == name
    for name in REMAT_POLICIES:
        assert ModelConfig(remat_policy=name).remat_policy == name
    with pytest.raises(ValueError, match="attention_impl.*xla_block_sparse"):
        ModelConfig(attention_impl="flash")
    assert REMAT_POLICIES["none"]() is None   # 'none': no jax.checkpoint at all
    assert all(REMAT_POLICIES[name]() is not None for name in REMAT_POLICIES if name != "none")


@pytest.mark.parametrize("policy", ["full", "dots_no_batch"])
def test_remat_policies_leave_values_and_gradients_unchanged(policy):
    cfg = get_preset("tiny")
    base, remat = init_model(cfg), init_model(cfg.replace(remat_policy=policy))
    tokens = jnp.asarray(np.arange(24, dtype=np.int32)[None] % 97)
    pos, end = chain_inputs(tokens)

    def loss(model):
        return jnp.mean(model(tokens, pos, end) ** 2)

    def jaxpr_of_grad(model):
        graphdef, state = nnx.split(model)
        return str(jax.make_jaxpr(jax.grad(lambda st: loss(nnx.merge(graphdef, st))))(state))

    assert "remat" not in jaxpr_of_grad(base)
    assert "remat" in jaxpr_of_grad(remat)  # the policy is really applied to the scanned body
    l1, g1 = nnx.value_and_grad(loss)(base)
    l2, g2 = nnx.value_and_grad(loss)(remat)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_pod_presets_take_the_topology_tables_mesh_unless_a_mesh_key_is_set():
    """mesh.topology_table: the variant's TOPOLOGY_MESHES row for the devices' slice (kind and
    count, as the trainer's jax.devices() and compile-check's abstract devices give them) replaces
    its mesh; other slices, a changed mesh key or topology_table '' keep mesh.* as set."""
    from types import SimpleNamespace

    from kat_jax.training import config_lib
    from kat_jax.training.defaults import TOPOLOGY_MESHES, VARIANT_MESH, stage_config, topology_mesh
    from kat_jax.training.tpu_topologies import slice_name

    v5e_16 = [SimpleNamespace(device_kind="TPU v5 lite")] * 16
    assert slice_name(v5e_16) == "v5e-16"
    assert slice_name([SimpleNamespace(device_kind="TPU v6 lite")] * 64) == "v6e-64"
    assert slice_name([SimpleNamespace(device_kind="TPU v5")] * 32) == "v5p-64"
    assert slice_name([SimpleNamespace(device_kind="cpu")] * 16) is None
    assert slice_name([SimpleNamespace(device_kind="TPU v5 lite")] * 3) is None
    for stage in ("sft", "rl"):
        cfg = stage_config(stage, "qwen3_8b")
        assert cfg.mesh.topology_table == "qwen3_8b"
        row = TOPOLOGY_MESHES["qwen3_8b"]["v5e-16"]
        assert topology_mesh(cfg.mesh, slice_name(v5e_16)) == (row, "mesh.topology_table")
        assert row != VARIANT_MESH["qwen3_8b"]
        for other in ("v5p-8", "v6e-64", None):  # not in the table: the variant's own mesh
            assert topology_mesh(cfg.mesh, other) == (VARIANT_MESH["qwen3_8b"], "mesh.*")
    # a mesh key set on the command line wins over the table; topology_table '' turns it off
    cfg = config_lib.load_train_config("configs/sft.py:qwen3_8b", ["--config.mesh.tensor=4"])
    assert topology_mesh(cfg.mesh, "v5e-16")[0]["tensor"] == 4
    cfg = config_lib.load_train_config("configs/sft.py:qwen3_8b", ["--config.mesh.topology_table="])
    assert topology_mesh(cfg.mesh, "v5e-16") == (VARIANT_MESH["qwen3_8b"], "mesh.*")
    cfg = stage_config("sft", "qwen3_8b")
    cfg.mesh.topology_table = "llama"
    with pytest.raises(ValueError, match="mesh.topology_table='llama'"):
        topology_mesh(cfg.mesh, "v5e-16")
    assert stage_config("sft").mesh.topology_table == ""  # tiny: mesh.* as set
    # the mesh the trainer and compile-check build (libtpu's abstract devices when installed)
    try:
        from kat_jax.training.tpu_topologies import topology_devices

        devices = topology_devices("v5e-16")
    except ImportError:
        return
    from kat_jax.training.sharding import mesh_from_config

    mesh = mesh_from_config(stage_config("sft", "qwen3_8b").mesh, devices=devices)
    assert dict(mesh.shape) == TOPOLOGY_MESHES["qwen3_8b"]["v5e-16"]
