"""The JAX decoder equals Hugging Face transformers (float32, 1e-4) on chains, forests and trees."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import HF_CASES

from kat_jax.models.checkpoint import load_model
from kat_jax.models.decoder import chain_inputs

ATOL = 1e-4


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids))[None]).logits[0].numpy()


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_logits_match_transformers_on_chains(case, hf_dirs):
    path, hf = hf_dirs(case)
    model, cfg = load_model(path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, size=(2, 23)).astype(np.int32)
    t = jnp.asarray(ids)
    ours = np.asarray(model.logits(model(t, *chain_inputs(t))))
    for b in range(2):
        np.testing.assert_allclose(ours[b], hf_logits(hf, ids[b]), atol=ATOL, rtol=0)


def test_tree_and_forest_rows_match_per_sequence_transformers(hf_dirs):
    """One row holding a branching tree (prefix P, branches A and B) then an unrelated chain C:
    every token's logits equal transformers run on that token's own path."""
    path, hf = hf_dirs("qwen3_gqa2_untied_hd24")
    model, cfg = load_model(path)
    rng = np.random.default_rng(1)
    p, a, b, c = (rng.integers(0, cfg.vocab_size, n) for n in (7, 4, 5, 6))
    tokens = np.concatenate([p, a, b, c]).astype(np.int32)
    n_p, n_a, n_b = len(p), len(a), len(b)
    tree_end = n_p + n_a + n_b
    positions = np.concatenate([np.arange(n_p), n_p + np.arange(n_a), n_p + np.arange(n_b),
                                np.arange(len(c))])
    subtree_end = np.concatenate([np.full(n_p, tree_end), np.full(n_a, n_p + n_a),
                                  np.full(n_b, tree_end), np.full(len(c), len(tokens))])
    pad = 3  # padding tokens: their own one-token trees
    tokens = np.concatenate([tokens, np.zeros(pad, np.int32)])
    positions = np.concatenate([positions, np.zeros(pad)])
    subtree_end = np.concatenate([subtree_end, len(subtree_end) + 1 + np.arange(pad)])
    ours = np.asarray(model.logits(model(jnp.asarray(tokens)[None],
                                         jnp.asarray(positions, jnp.int32)[None],
                                         jnp.asarray(subtree_end, jnp.int32)[None])))[0]
    assert np.all(np.isfinite(ours))
    ref_pa = hf_logits(hf, np.concatenate([p, a]))
    ref_pb = hf_logits(hf, np.concatenate([p, b]))
    ref_c = hf_logits(hf, c)
    np.testing.assert_allclose(ours[:n_p + n_a], ref_pa, atol=ATOL, rtol=0)
    np.testing.assert_allclose(ours[n_p + n_a:tree_end], ref_pb[n_p:], atol=ATOL, rtol=0)
    np.testing.assert_allclose(ours[tree_end:tree_end + len(c)], ref_c, atol=ATOL, rtol=0)


def test_bfloat16_compute_stays_close_to_float32(hf_dirs):
    path, _ = hf_dirs("qwen3_mha_tied")
    m32, cfg = load_model(path)
    m16, _ = load_model(path, dtype="bfloat16", param_dtype="bfloat16")
    t = jnp.asarray(np.arange(40, dtype=np.int32)[None] % cfg.vocab_size)
    l32 = np.asarray(m32.logits(m32(t, *chain_inputs(t))))
    l16 = np.asarray(m16.logits(m16(t, *chain_inputs(t))), np.float32)
    assert l16.dtype == np.float32
    # bf16 keeps ~3 significant digits; the logits of a random tiny model are O(0.1-1).
    assert np.max(np.abs(l16 - l32)) < 5e-2
    assert not np.array_equal(l16, l32)
