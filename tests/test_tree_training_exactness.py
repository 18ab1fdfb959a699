"""Trees vs the flat per-trajectory computation, through the model: log-probs, entropies, and every
stage's loss and gradient are equal (float32), also when trees are split across rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tree_cases import random_trajectories

from kat_jax.models.config import get_preset
from kat_jax.models.decoder import init_model
from kat_jax.ops.logprobs import tree_logprobs
from kat_jax.training.losses import LossSpec, PolicyLossConfig, gather, stage_loss
from kat_jax.trees.packing import pack_trie
from kat_jax.trees.trie import build_trie

ROW_LEN, NUM_ROWS, NUM_TRAJ, TRAJ_LEN = 64, 4, 8, 32
CFG = get_preset("tiny", vocab_size=64, attention_block_size=16)


@pytest.fixture(scope="module")
def model_parts():
    graphdef, state = nnx.split(init_model(CFG, seed=3))
    return graphdef, state


def tree_view(graphdef, state, b, flat):
    """Per-trajectory [N, L] log-probs and entropies computed on the packed rows."""
    m = nnx.merge(graphdef, state)
    hidden = m(b.tokens, b.positions, b.subtree_end, b.schedule.as_dict())
    lp, en = tree_logprobs(hidden, m.head_kernel(), b.tokens, b.parent, CFG.vocab_chunk_size)
    return gather(lp, b.traj_index), gather(en, b.traj_index)


def flat_view(graphdef, state, b, flat):
    """Each trajectory as its own causal chain (the reference)."""
    m = nnx.merge(graphdef, state)
    toks = flat["tokens"]
    n, length = toks.shape
    idx = jnp.arange(length)
    positions = jnp.broadcast_to(idx, (n, length))
    lens = flat["len"][:, None]
    subtree_end = jnp.where(idx < lens, lens, idx + 1)
    parent = jnp.broadcast_to(idx - 1, (n, length))
    hidden = m(toks, positions, subtree_end)
    lp, en = tree_logprobs(hidden, m.head_kernel(), toks, parent, CFG.vocab_chunk_size)
    valid = b.valid
    return jnp.where(valid, lp, 0.0), jnp.where(valid, en, 0.0)


def make_batch(seed):
    rng = np.random.default_rng(seed)
    while True:
        trajs = random_trajectories(rng, int(rng.integers(3, NUM_TRAJ + 1)), TRAJ_LEN - 2,
                                    vocab=CFG.vocab_size, n_prompts=2)
        try:
            tb = pack_trie(build_trie(trajs), ROW_LEN, num_rows=NUM_ROWS, num_traj=NUM_TRAJ,
                           traj_len=TRAJ_LEN, attention_block_size=CFG.attention_block_size)
            break
        except ValueError:  # needs more rows than the fixed shape allows: draw again
            continue
    flat = np.zeros((NUM_TRAJ, TRAJ_LEN), np.int32)
    lens = np.ones(NUM_TRAJ, np.int32)
    for k, t in enumerate(trajs):
        flat[k, :len(t)] = t.tokens
        lens[k] = len(t)
    b = jax.tree.map(jnp.asarray, tb.batch)
    b = b.replace(advantage=jnp.asarray(rng.normal(size=NUM_TRAJ).astype(np.float32)))
    flat = {"tokens": jnp.asarray(flat), "len": jnp.asarray(lens)}
    noise = rng.uniform(-0.4, 0.4, (3, NUM_TRAJ, TRAJ_LEN)).astype(np.float32)
    return b, flat, trajs, tb, noise


SEEDS = [0, 1, 2, 3]


@pytest.mark.parametrize("seed", SEEDS)
def test_tree_logprobs_and_entropies_equal_per_sequence(seed, model_parts):
    graphdef, state = model_parts
    b, flat, trajs, tb, _ = make_batch(seed)
    assert tb.tree_tokens < tb.total_tokens  # prefixes really are shared
    lp_t, en_t = jax.jit(tree_view, static_argnums=0)(graphdef, state, b, flat)
    lp_f, en_f = jax.jit(flat_view, static_argnums=0)(graphdef, state, b, flat)
    np.testing.assert_allclose(np.asarray(lp_t), np.asarray(lp_f), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(en_t), np.asarray(en_f), atol=1e-5, rtol=0)


STAGE_CASES = {
    "mid": ("mid", None, "token-mean"),
    "sft": ("sft", None, "seq-mean-token-mean"),
    "rft": ("rft", PolicyLossConfig(dual_clip=None, tis_cap=None), "seq-mean-token-sum"),
    "rl": ("rl", PolicyLossConfig(eps_low=0.2, eps_high=0.28, dual_clip=3.0, tis_cap=1.5,
                                  kl_coef=0.1, kl_type="k3", entropy_coef=0.01,
                                  old_policy="record"), None),
    "rl_k2_seq_mean": ("rl", PolicyLossConfig(kl_coef=0.05, kl_type="k2", entropy_coef=0.02,
                                              tis_cap=2.0, old_policy="record"),
                       "seq-mean-token-mean"),
    "rl_current": ("rl", PolicyLossConfig(tis_cap=2.0, old_policy="current"), None),
}


@pytest.mark.parametrize("case", sorted(STAGE_CASES))
def test_stage_loss_and_gradient_on_tree_equal_flat_computation(case, model_parts):
    graphdef, state = model_parts
    stage, pcfg, agg = STAGE_CASES[case]
    b, flat, _, _, noise = make_batch(sum(map(ord, case)))
    if stage in ("rft", "rl"):
        lp0, _ = jax.jit(flat_view, static_argnums=0)(graphdef, state, b, flat)
        b = b.replace(old_logprobs=lp0 + noise[0],  # ratios away from 1: both clip sides active
                      behaviour_logprobs=lp0 + noise[1], ref_logprobs=lp0 + noise[2])
    spec = LossSpec(stage=stage, agg_mode=agg or "token-mean", policy=pcfg or PolicyLossConfig())

    def loss(state, view):
        lp, en = view(graphdef, state, b, flat)
        num, den, _ = stage_loss(spec, lp, en, b)
        return num / den

    tree_l, tree_g = jax.jit(jax.value_and_grad(lambda s: loss(s, tree_view)))(state)
    flat_l, flat_g = jax.jit(jax.value_and_grad(lambda s: loss(s, flat_view)))(state)
    np.testing.assert_allclose(float(tree_l), float(flat_l), rtol=1e-5)
    for a, f in zip(jax.tree.leaves(tree_g), jax.tree.leaves(flat_g)):
        a, f = np.asarray(a), np.asarray(f)
        scale = max(np.max(np.abs(f)), 1e-12)
        assert np.max(np.abs(a - f)) / scale < 1e-5
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(tree_g))
