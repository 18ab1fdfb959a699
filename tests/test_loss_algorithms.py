"""The policy-loss algorithms (PPO / GRPO token clip with dual clip, DAPO clip-higher, GSPO and
GSPO-token, Dr. GRPO's constant-length aggregation), the KL estimators and the log-ratio clamps,
each against a numpy (or, for gradients, a small jnp) re-implementation written here from the
papers' definitions; and the loss.* keys behind them: each one changes the loss or stops the run
at start with an error naming it, and loss.algorithm presets set the papers' keys."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.training import build
from kat_jax.training.config_lib import ConfigError, load_train_config
from kat_jax.training.losses import (
    AGG_MODES,
    PolicyLossConfig,
    aggregate,
    kl_penalty,
    policy_loss,
    stage_loss,
)
from kat_jax.trees.batch import StepBatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, L = 4, 7


def _data(seed=0, spread=1.6):
    """logp, old [N, L] float32 with log-ratios in +-spread, advantages [N] of both signs, and a
    loss mask with rows of different lengths (one row without loss tokens)."""
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.1, 3.0, (N, L)).astype(np.float32)
    old = (logp + rng.uniform(-spread, spread, (N, L))).astype(np.float32)
    adv = np.array([1.3, -0.7, 0.4, -1.1], np.float32)
    mask = rng.random((N, L)) < 0.75
    mask[0, :2] = True
    mask[3] = False
    return logp, old, adv, mask


# ---------------------------------------------------------------------------------------------
# numpy references, from the definitions


def np_aggregate(x, mask, mode):
    """verl's aggregation modes; seq-mean-token-sum-norm: Dr. GRPO's 1/G sum_i sum_t x / L."""
    m = mask.astype(np.float64)
    if mode == "token-mean":
        return (x * m).sum() / m.sum()
    rows = m.sum(1) > 0
    sums, counts = (x * m).sum(1)[rows], m.sum(1)[rows]
    seq = {"seq-mean-token-mean": sums / np.maximum(counts, 1), "seq-mean-token-sum": sums,
           "seq-mean-token-sum-norm": sums / x.shape[1]}[mode]
    return seq.mean()


def np_ppo(logp, old, adv, eps_low, eps_high, dual_clip=None):
    """PPO clipped surrogate (Schulman et al. 2017) per token, with clip-higher (DAPO) and the
    dual clip (Ye et al. 2020) for negative advantages."""
    a = np.asarray(adv, np.float64)[:, None]
    r = np.exp(np.clip(np.float64(logp) - old, -20, 20))
    loss = np.maximum(-a * r, -a * np.clip(r, 1 - eps_low, 1 + eps_high))
    if dual_clip is not None:
        loss = np.where(a < 0, np.minimum(loss, -dual_clip * a), loss)
    return loss


def np_gspo(logp, old, adv, mask, eps_low, eps_high):
    """GSPO (Zheng et al. 2025): s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|); per sequence
    -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i), broadcast to its tokens."""
    m = mask.astype(np.float64)
    log_s = ((np.float64(logp) - old) * m).sum(1) / np.maximum(m.sum(1), 1)
    s = np.exp(log_s)
    a = np.asarray(adv, np.float64)
    per_seq = -np.minimum(s * a, np.clip(s, 1 - eps_low, 1 + eps_high) * a)
    return np.broadcast_to(per_seq[:, None], logp.shape), per_seq


def _loss(cfg, logp, old, adv, mask, agg="token-mean", **kw):
    num, den, metrics = policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv),
                                    jnp.asarray(mask), cfg, agg, **kw)
    return float(num) / float(den), metrics


# ---------------------------------------------------------------------------------------------
# formulas


@pytest.mark.parametrize("agg", AGG_MODES)
def test_token_ppo_with_dual_clip_matches_numpy_in_every_aggregation_mode(agg):
    logp, old, adv, mask = _data()
    cfg = PolicyLossConfig(eps_low=0.2, eps_high=0.2, dual_clip=1.5)
    got, metrics = _loss(cfg, logp, old, adv, mask, agg)
    want = np_aggregate(np_ppo(logp, old, adv, 0.2, 0.2, 1.5), mask, agg)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # the data exercises every branch: clipped tokens, and the dual clip binding
    r = np.exp(np.float64(logp) - old)
    assert 0 < float(metrics["clip_fraction"][0]) < float(metrics["clip_fraction"][1])
    assert ((r > 1.5) & (adv[:, None] < 0) & mask).any()


def test_dual_clip_bounds_the_loss_of_negative_advantages():
    logp, old, adv, mask = _data()
    on, _ = _loss(PolicyLossConfig(dual_clip=1.5), logp, old, adv, mask)
    off, _ = _loss(PolicyLossConfig(dual_clip=None), logp, old, adv, mask)
    np.testing.assert_allclose(off, np_aggregate(np_ppo(logp, old, adv, 0.2, 0.28), mask,
                                                 "token-mean"), rtol=1e-5)
    assert on < off


def test_clip_higher_matches_numpy_and_differs_from_the_symmetric_clip():
    logp, old, adv, mask = _data(1)
    higher, _ = _loss(PolicyLossConfig(eps_low=0.2, eps_high=0.28, dual_clip=None), logp, old,
                      adv, mask)
    np.testing.assert_allclose(higher, np_aggregate(np_ppo(logp, old, adv, 0.2, 0.28), mask,
                                                    "token-mean"), rtol=1e-5)
    symmetric, _ = _loss(PolicyLossConfig(eps_low=0.2, eps_high=0.2, dual_clip=None), logp, old,
                         adv, mask)
    assert abs(higher - symmetric) > 1e-4


@pytest.mark.parametrize("agg", AGG_MODES)
def test_gspo_sequence_ratio_matches_numpy(agg):
    logp, old, adv, mask = _data(2, spread=0.3)
    cfg = PolicyLossConfig(eps_low=0.05, eps_high=0.08, dual_clip=None, ratio_level="sequence")
    got, _ = _loss(cfg, logp, old, adv, mask, agg)
    per_token, per_seq = np_gspo(logp, old, adv, mask, 0.05, 0.08)
    np.testing.assert_allclose(got, np_aggregate(per_token, mask, agg), rtol=1e-5)
    if agg == "seq-mean-token-mean":  # the paper's objective: 1/G sum_i of the sequence terms
        np.testing.assert_allclose(got, per_seq[mask.any(1)].mean(), rtol=1e-5)
    token, _ = _loss(PolicyLossConfig(eps_low=0.05, eps_high=0.08, dual_clip=None), logp, old,
                     adv, mask, agg)
    assert abs(got - token) > 1e-4


def _paper_gspo_token(logp, old, adv_nl, mask, eps_low, eps_high):
    """-J_GSPO-token (Zheng et al. 2025, eq. 13-14) in jnp: s_i,t = sg[s_i] pi(y_t) / sg[pi(y_t)],
    1/G sum_i 1/|y_i| sum_t min(s_i,t A_i,t, clip(s_i,t) A_i,t) over the rows with tokens."""
    m = mask.astype(jnp.float32)
    n_tok = m.sum(1)
    s = jnp.exp(((logp - old) * m).sum(1) / jnp.maximum(n_tok, 1))
    p = jnp.exp(logp)
    s_t = jax.lax.stop_gradient(s)[:, None] * p / jax.lax.stop_gradient(p)
    term = jnp.minimum(s_t * adv_nl, jnp.clip(s_t, 1 - eps_low, 1 + eps_high) * adv_nl)
    rows = n_tok > 0
    per_seq = (term * m).sum(1) / jnp.maximum(n_tok, 1)
    return -jnp.sum(jnp.where(rows, per_seq, 0.0)) / rows.sum()


def _kat_grad(level, logp, old, adv, mask, eps=(0.05, 0.08)):
    cfg = PolicyLossConfig(eps_low=eps[0], eps_high=eps[1], dual_clip=None, ratio_level=level)

    def f(lp):
        num, den, _ = policy_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), cfg,
                                  "seq-mean-token-mean")
        return num / den

    return jax.value_and_grad(f)(jnp.asarray(logp))


def test_gspo_token_equals_gspo_in_value_and_its_gradient_is_the_papers():
    logp, old, adv, mask = _data(3, spread=0.3)
    adv_nl = jnp.broadcast_to(jnp.asarray(adv)[:, None], (N, L))
    v_seq, g_seq = _kat_grad("sequence", logp, old, adv, mask)
    v_tok, g_tok = _kat_grad("sequence_token", logp, old, adv, mask)
    v_ref, g_ref = jax.value_and_grad(
        lambda lp: _paper_gspo_token(lp, jnp.asarray(old), adv_nl, jnp.asarray(mask), 0.05,
                                     0.08))(jnp.asarray(logp))
    np.testing.assert_allclose(float(v_tok), float(v_seq), rtol=1e-6)
    np.testing.assert_allclose(float(v_tok), float(v_ref), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_tok), np.asarray(g_ref), rtol=1e-5, atol=1e-7)
    # with A_i,t = A_i the paper shows GSPO-token and GSPO have the same gradient
    np.testing.assert_allclose(np.asarray(g_tok), np.asarray(g_seq), rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(g_tok)).max() > 1e-3  # not all clipped away
    # and the gradient is not the token-level PPO one
    _, g_ppo = _kat_grad("token", logp, old, adv, mask)
    assert np.abs(np.asarray(g_ppo) - np.asarray(g_tok)).max() > 1e-4


def test_gspo_token_with_per_token_advantages_matches_the_paper_gradient():
    logp, old, _, mask = _data(4, spread=0.3)
    adv_nl = np.random.default_rng(4).normal(size=(N, L)).astype(np.float32)
    v, g = _kat_grad("sequence_token", logp, old, adv_nl, mask)
    v_ref, g_ref = jax.value_and_grad(
        lambda lp: _paper_gspo_token(lp, jnp.asarray(old), jnp.asarray(adv_nl),
                                     jnp.asarray(mask), 0.05, 0.08))(jnp.asarray(logp))
    np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="ratio_level=sequence.*one advantage per trajectory"):
        _kat_grad("sequence", logp, old, adv_nl, mask)


def test_kl_estimators_match_numpy_with_verls_clamps():
    lp = np.array([-1.0, -0.5, -2.0, -0.1, -40.0, -0.2], np.float32)
    ref = np.array([-1.2, -0.1, -0.3, -3.5, -0.5, -30.0], np.float32)
    d = np.float64(ref) - lp
    want = {"k1": -d, "k2": 0.5 * d ** 2,
            "k3": np.clip(np.exp(np.clip(d, -20, 20)) - np.clip(d, -20, 20) - 1, -10, 10)}
    for kind, w in want.items():
        got = np.asarray(kl_penalty(jnp.asarray(lp), jnp.asarray(ref), kind))
        np.testing.assert_allclose(got, w, rtol=1e-5, err_msg=kind)
    # the clamps bind on this data: k3 of d = 39.5 without them is e^39.5 (inf in float32)
    assert want["k3"][4] == 10.0 and np.isfinite(kl_penalty(jnp.asarray(lp), jnp.asarray(ref),
                                                             "k3")).all()
    loose = np.asarray(kl_penalty(jnp.asarray(lp), jnp.asarray(ref), "k3", 5.0, 100.0))
    d5 = np.clip(d, -5, 5)
    np.testing.assert_allclose(loose, np.clip(np.exp(d5) - d5 - 1, -100, 100), rtol=1e-5)


def test_kl_in_the_policy_loss_is_the_clamped_k3_times_its_coefficient():
    logp, old, adv, mask = _data(5)
    ref = logp + np.random.default_rng(5).uniform(-4, 4, (N, L)).astype(np.float32)
    cfg = PolicyLossConfig(dual_clip=None, kl_coef=0.3, kl_type="k3", kl_clamp=2.0)
    got, metrics = _loss(cfg, logp, old, adv, mask, ref_logp=jnp.asarray(ref))
    d = np.float64(ref) - logp
    k3 = np.clip(np.exp(d) - d - 1, -2, 2)
    want = np_aggregate(np_ppo(logp, old, adv, 0.2, 0.28) + 0.3 * k3, mask, "token-mean")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"][0]) / float(metrics["kl"][1]),
                               np_aggregate(k3, mask, "token-mean"), rtol=1e-5)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_each_aggregation_mode_matches_numpy(mode):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(N, L)).astype(np.float32)
    _, _, _, mask = _data(6)
    num, den = aggregate(jnp.asarray(x), jnp.asarray(mask), mode)
    np.testing.assert_allclose(float(num) / float(den), np_aggregate(x, mask, mode), rtol=1e-5)


def test_extreme_log_ratios_give_a_finite_loss_and_gradient():
    logp, old, adv, mask = _data(7)
    old = old.copy()
    old[1, :] = -300.0  # log-ratio ~ +300 on a negative-advantage row, no dual clip
    old[2, :] = 200.0
    cfg = PolicyLossConfig(dual_clip=None, ratio_level="token")
    for level in ("token", "sequence", "sequence_token"):
        v, g = _kat_grad(level, logp, old, adv, mask, (0.2, 0.28))
        assert np.isfinite(float(v)) and np.isfinite(np.asarray(g)).all(), level
    clamped, _ = _loss(cfg, logp, old, adv, mask)
    want = np_aggregate(np_ppo(logp, old, adv, 0.2, 0.28), mask, "token-mean")
    np.testing.assert_allclose(clamped, want, rtol=1e-5)
    unclamped, _ = _loss(PolicyLossConfig(dual_clip=None, log_ratio_clamp=np.inf), logp, old, adv,
                         mask)
    assert not np.isfinite(unclamped)


# ---------------------------------------------------------------------------------------------
# config keys


def _cfg(*overrides, config="rl.py:tiny"):
    return load_train_config(os.path.join(ROOT, "configs", config),
                             [f"--config.loss.{o}" for o in overrides])


def _batch(seed=8):
    logp, old, adv, mask = _data(seed)
    ref = logp + np.random.default_rng(seed).uniform(-3, 3, (N, L)).astype(np.float32)
    batch = StepBatch(tokens=None, positions=None, parent=None, subtree_end=None,
                      traj_index=None, valid=jnp.ones((N, L), bool), trainable=jnp.asarray(mask),
                      advantage=jnp.asarray(adv), behaviour_logprobs=jnp.asarray(old),
                      ref_logprobs=jnp.asarray(ref))
    return jnp.asarray(logp), batch


def _stage_loss(cfg):
    logp, batch = _batch()
    num, den, _ = stage_loss(build.loss_spec(cfg), logp, None, batch)
    return float(num) / float(den)


@pytest.mark.parametrize("base,override", [
    ((), "ratio_level=sequence"),
    ((), "ratio_level=sequence_token"),
    ((), "log_ratio_clamp=0.5"),
    (("kl_coef=0.5",), "kl_clamp=0.05"),
    ((), "agg_mode=seq-mean-token-sum-norm"),
    ((), "algorithm=grpo"),
    ((), "algorithm=dapo"),
    ((), "algorithm=drgrpo"),
    ((), "algorithm=gspo"),
    ((), "algorithm=rloo"),
])
def test_each_new_loss_key_changes_the_loss(base, override):
    before = _stage_loss(_cfg(*base))
    after = _stage_loss(_cfg(*base, override))
    assert abs(after - before) > 1e-4 * abs(before), (override, before, after)


@pytest.mark.parametrize("override,match", [
    ("dual_clip=0.5", "loss.dual_clip: must be 0 \\(off\\) or > 1"),
    ("eps_low=1.0", "loss.eps_low: must be in \\[0, 1\\)"),
    ("eps_low=-0.1", "loss.eps_low: must be in \\[0, 1\\)"),
    ("eps_high=-0.1", "loss.eps_high: must be >= 0"),
    ("ratio_level=seq", "loss.ratio_level: must be one of"),
    ("algorithm=ppo2", "loss.algorithm: must be one of"),
    ("advantage_estimator=gae", "loss.advantage_estimator: must be one of"),
    ("log_ratio_clamp=0", "loss.log_ratio_clamp: must be > 0"),
    ("kl_clamp=0", "loss.kl_clamp: must be > 0"),
    ("kl_clamp=5", "loss.kl_clamp: bounds the k3 KL only"),
])
def test_bad_or_inert_loss_keys_fail_at_validate_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        build.validate(_cfg(override))


@pytest.mark.parametrize("config,override,match", [
    ("sft.py:tiny", "algorithm=gspo", "loss.algorithm: applies to the policy stages"),
    ("sft.py:tiny", "ratio_level=sequence", "loss.ratio_level: applies to the policy stages"),
    ("rft.py:tiny", "log_ratio_clamp=5", "loss.log_ratio_clamp: acts on the ratio"),
    ("rft.py:tiny", "advantage_estimator=drgrpo", "loss.advantage_estimator: applies to the rl"),
])
def test_loss_keys_that_cannot_act_on_the_stage_fail_at_validate(config, override, match):
    with pytest.raises(ConfigError, match=match):
        build.validate(_cfg(override, config=config))


@pytest.mark.parametrize("override,estimator", [("algorithm=rloo", "rloo"),
                                                ("algorithm=drgrpo", "drgrpo"),
                                                ("advantage_estimator=rloo", "rloo")])
def test_advantage_estimator_acts_offline_and_online(override, estimator):
    from kat_jax.models.config import get_preset

    cfg = _cfg(override)
    build.validate(cfg)
    assert cfg.loss.advantage_estimator == estimator
    # offline: the data feed's converter computes it (tests/test_data_pipeline.py checks the
    # values); online: the trajectory manager (tests/test_flow_manager.py)
    assert build.batch_shape(cfg, get_preset("tiny")).advantage == estimator


# what each paper uses: (eps_low, eps_high, dual_clip, agg_mode, ratio_level, estimator)
PAPERS = {
    "grpo": (0.2, 0.2, None, "seq-mean-token-mean", "token", "grpo"),
    "dapo": (0.2, 0.28, None, "token-mean", "token", "grpo"),
    "drgrpo": (0.2, 0.2, None, "seq-mean-token-sum-norm", "token", "drgrpo"),
    "gspo": (3e-4, 4e-4, None, "seq-mean-token-mean", "sequence", "grpo"),
    "rloo": (0.2, 0.2, None, "seq-mean-token-sum", "token", "rloo"),
}


@pytest.mark.parametrize("algorithm", sorted(PAPERS))
def test_each_algorithm_preset_sets_the_papers_keys(algorithm):
    eps_low, eps_high, dual, agg, level, estimator = PAPERS[algorithm]
    cfg = _cfg(f"algorithm={algorithm}")
    spec = build.loss_spec(cfg)
    p = spec.policy
    assert (p.eps_low, p.eps_high, p.dual_clip, spec.agg_mode, p.ratio_level) == \
        (eps_low, eps_high, dual, agg, level)
    assert p.kl_coef == 0.0
    assert cfg.loss.eps_low == 0.2 and cfg.loss.agg_mode == "token-mean"  # loss_spec: no change
    if estimator == "grpo":  # offline: validate writes the effective keys into the config
        build.validate(cfg)
        assert (cfg.loss.eps_low, cfg.loss.eps_high, cfg.loss.agg_mode, cfg.loss.ratio_level) == \
            (eps_low, eps_high, agg, level)
        assert build.loss_spec(cfg) == spec
        build.validate(cfg)  # idempotent
        assert build.loss_spec(cfg) == spec


def test_an_explicit_key_wins_over_the_preset():
    cfg = _cfg("algorithm=gspo", "eps_high=0.3", "kl_coef=0.1")
    build.validate(cfg)
    assert (cfg.loss.eps_low, cfg.loss.eps_high, cfg.loss.kl_coef, cfg.loss.ratio_level) == \
        (3e-4, 0.3, 0.1, "sequence")
    dapo = build.loss_spec(_cfg("algorithm=dapo", "kl_coef=0.2"))
    assert dapo.policy.kl_coef == 0.2 and dapo.agg_mode == "token-mean"


def test_with_the_current_policy_as_old_policy_a_preset_leaves_the_clip_keys():
    cfg = _cfg("algorithm=gspo", config="rft.py:tiny")  # tiny rft: old_logprobs=current
    build.validate(cfg)
    assert (cfg.loss.eps_low, cfg.loss.eps_high, cfg.loss.dual_clip) == (0.2, 0.28, 3.0)
    assert cfg.loss.ratio_level == "sequence" and cfg.loss.agg_mode == "seq-mean-token-mean"
