"""RoPE scaling (linear, yarn) equals transformers: frequencies and cos/sin factor for every config
key, logits of tiny Qwen2/Qwen3 models on sequences longer than the original context (packed-tree
forward and the KV-cached sampler path), and config.json import/export keeps the scaling."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import saved_hf_models
from flax import nnx

from kat_jax.models.checkpoint import export_hf, load_model
from kat_jax.models.config import ModelConfig, from_hf_config, to_hf_config
from kat_jax.models.decoder import chain_inputs
from kat_jax.models.rope import rope_frequencies
from kat_jax.ops.paged_attention import token_slots

T = 80  # tokens per test sequence: beyond every original context below (32)
YARN = dict(rope_type="yarn", rope_factor=4.0, rope_original_max_position_embeddings=32)


def _hf_frequencies(cfg: ModelConfig):
    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = Qwen3Config(**{k: v for k, v in to_hf_config(cfg).items()
                        if k not in ("architectures", "model_type")})
    inv_freq, scale = ROPE_INIT_FUNCTIONS[cfg.rope_type](hf)
    return inv_freq.numpy(), scale


# One config per key: each must change the frequencies or the cos/sin factor, and equal transformers.
# (An original context of 2048 puts yarn's ramp inside head_dim 32 so that beta_* move it.)
BIG = {**YARN, "rope_original_max_position_embeddings": 2048}
VARIANTS = {
    "linear": dict(rope_type="linear", rope_factor=2.5),
    "yarn": BIG,
    "yarn_factor": {**BIG, "rope_factor": 2.0},
    "yarn_original_max": {**BIG, "rope_original_max_position_embeddings": 1024},
    "yarn_beta_fast": {**BIG, "rope_beta_fast": 8.0},
    "yarn_beta_slow": {**BIG, "rope_beta_slow": 0.25},
    "yarn_attention_factor": {**BIG, "rope_attention_factor": 1.3},
    "yarn_mscale": {**BIG, "rope_mscale": 1.0, "rope_mscale_all_dim": 0.5},
    "yarn_no_truncate": {**BIG, "rope_truncate": False},
}


def test_every_rope_key_acts_and_equals_transformers_frequencies_and_round_trips():
    base = ModelConfig(head_dim=32, rope_theta=10000.0, max_position_embeddings=8192)
    seen = [rope_frequencies(base)]
    for name, kw in VARIANTS.items():
        cfg = base.replace(**kw)
        inv_freq, scale = rope_frequencies(cfg)
        hf_inv_freq, hf_scale = _hf_frequencies(cfg)
        np.testing.assert_allclose(inv_freq, hf_inv_freq, rtol=1e-6, err_msg=name)
        assert scale == pytest.approx(hf_scale, rel=1e-12), name
        for other_freq, other_scale in seen:
            assert not (np.array_equal(inv_freq, other_freq) and scale == other_scale), name
        seen.append((inv_freq, scale))
        assert from_hf_config(json.loads(json.dumps(to_hf_config(cfg)))) == cfg, name


def test_rope_config_errors_name_the_key():
    with pytest.raises(ValueError, match="'rope_beta_fast'"):
        ModelConfig(rope_type="linear", rope_factor=2.0, rope_beta_fast=16.0)
    with pytest.raises(ValueError, match="'rope_factor'"):
        ModelConfig(rope_factor=2.0)
    with pytest.raises(ValueError, match="'rope_mscale'"):
        ModelConfig(**YARN, rope_mscale=1.0)
    with pytest.raises(ValueError, match="'rope_type'"):
        ModelConfig(rope_type="ntk")
    hf = to_hf_config(ModelConfig())
    with pytest.raises(ValueError, match="'rope_scaling' has rope_type 'dynamic'"):
        from_hf_config({**hf, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="'rope_parameters' has rope_type 'longrope'"):
        from_hf_config({**hf, "rope_scaling": None, "rope_parameters": {"rope_type": "longrope"}})
    with pytest.raises(ValueError, match="'partial_rotary_factor'"):
        from_hf_config({**hf, "rope_scaling": {"rope_type": "linear", "factor": 2.0,
                                               "partial_rotary_factor": 0.5}})


def test_legacy_rope_scaling_and_rope_parameters_import_alike():
    hf = to_hf_config(ModelConfig(rope_theta=5000.0))
    legacy = {**hf, "max_position_embeddings": 128,
              "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}
    new = {**hf, "max_position_embeddings": 128, "rope_scaling": None,
           "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 5000.0,
                               "original_max_position_embeddings": 32}}
    del new["rope_theta"]
    assert from_hf_config(legacy) == from_hf_config(new)
    assert from_hf_config(new).rope_theta == 5000.0
    assert from_hf_config(new).rope_type == "yarn"


# Both families with yarn, linear on qwen3 (the families share the RoPE code; the per-key test
# above covers linear's frequencies; the test time budget allows four compiled models).
HF_SCALED = {
    # name: (family, HF kwargs)
    "qwen3_yarn": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 max_position_embeddings=128, rope_parameters=dict(
                                     rope_type="yarn", factor=4.0, rope_theta=10000.0,
                                     original_max_position_embeddings=32))),
    "qwen2_yarn": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=128, rope_scaling=dict(
                                     type="yarn", factor=4.0, original_max_position_embeddings=32,
                                     beta_fast=8, beta_slow=0.5, attention_factor=1.2),
                                 rope_theta=1000.0)),
    "qwen3_linear": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                   max_position_embeddings=32, rope_parameters=dict(
                                       rope_type="linear", factor=3.0, rope_theta=500.0))),
}


@pytest.fixture(scope="module")
def scaled_dirs(tmp_path_factory):
    return saved_hf_models(tmp_path_factory, HF_SCALED)


@nnx.jit
def _forward(model, ids):
    return model.logits(model(ids, *chain_inputs(ids)))


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids)[None]).logits[0].numpy()


@pytest.mark.parametrize("name", sorted(HF_SCALED))
def test_scaled_rope_logits_match_transformers_beyond_the_original_context(name, scaled_dirs):
    path, hf = scaled_dirs(name)
    model, cfg = load_model(path)
    assert cfg.rope_type == name.split("_")[1]
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, T)).astype(np.int32)
    ours = np.asarray(_forward(model, jnp.asarray(ids)))[0]
    np.testing.assert_allclose(ours, _hf_logits(hf, ids[0]), atol=1e-4, rtol=0)


def test_yarn_sampler_prefill_equals_the_tree_forward(scaled_dirs):
    """The KV-cached path (Decoder.paged, what the sampler runs) uses the same scaled RoPE."""
    path, _ = scaled_dirs("qwen3_yarn")
    model, cfg = load_model(path)
    bs, blocks = 16, T // 16
    ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, T)), jnp.int32)
    positions, _ = chain_inputs(ids)
    want = np.asarray(_forward(model, ids))
    graphdef = nnx.split(model.layers)[0]
    layers = [nnx.merge(graphdef, s) for s in model.unstacked_layer_states()]
    tables = jnp.arange(1, blocks + 1, dtype=jnp.int32)[None]
    slots = token_slots(tables, positions, jnp.ones_like(ids, bool), bs)

    @nnx.jit
    def prefill(model, layers, ids, positions, slots):
        pool = model.init_kv_pool(blocks + 1, bs)
        return model.logits(model.paged(layers, ids, positions, slots, pool, tables)[0])

    got = prefill(model, layers, ids, positions, slots)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_export_hf_keeps_the_rope_scaling(scaled_dirs, tmp_path):
    path, _ = scaled_dirs("qwen2_yarn")
    _, cfg = load_model(path)
    export_hf(path, str(tmp_path / "out"))
    with open(tmp_path / "out" / "config.json") as f:
        exported = json.load(f)
    assert exported["rope_scaling"]["rope_type"] == "yarn"
    assert exported["rope_scaling"]["attention_factor"] == 1.2
    assert "rope_parameters" not in exported
    _, again = load_model(str(tmp_path / "out"))
    assert again == cfg
