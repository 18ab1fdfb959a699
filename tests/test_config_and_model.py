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
