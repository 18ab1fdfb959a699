"""No loss config key is inert: each one, set away from its default, changes the loss or the
gradient of a real (jitted, sharded-signature) training step on data that exercises it; a key that
cannot act, or that needs data a run does not have, stops the run at start with an error naming it."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tree_cases import random_trajectories

from kat_jax.models.config import get_preset
from kat_jax.models.decoder import init_model
from kat_jax.training import build
from kat_jax.training.config_lib import ConfigError
from kat_jax.training.defaults import stage_config
from kat_jax.training.losses import ppo_loss
from kat_jax.training.optim import make_optimizer
from kat_jax.training.step import forward_logprobs, init_state, make_train_step
from kat_jax.trees.batch import stack_step_batches
from kat_jax.trees.packing import gather_per_trajectory, pack_trie
from kat_jax.trees.pruning import PruneConfig, prune_trie
from kat_jax.trees.trie import build_trie

CFG = get_preset("tiny", vocab_size=64, num_layers=1, attention_block_size=16,
                 attention_impl="xla_dense")
ROW_LEN, ROWS, TRAJ = 64, 3, 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rl_config(**loss):
    cfg = stage_config("rl", "tiny")
    cfg.loss.update(loss)
    return cfg


@pytest.fixture(scope="module")
def setup():
    """The model, and one [1, 1, ...] batch of a GRPO-like tree with behaviour, old-policy and
    reference log-probs away from the model's own (ratios from ~0.2 to ~5: both PPO clip sides
    and the dual clip act), advantages of both signs, and a pruned subtree."""
    model = init_model(CFG, seed=0)
    rng = np.random.default_rng(0)
    trajs = random_trajectories(rng, TRAJ, 30, vocab=CFG.vocab_size, n_prompts=2)
    trie = build_trie(trajs)
    plain = pack_trie(trie, ROW_LEN, num_rows=ROWS, num_traj=TRAJ, traj_len=ROW_LEN).batch
    lp0 = gather_per_trajectory(np.asarray(forward_logprobs(model, plain)[0]), plain.traj_index)
    for k, t in enumerate(trajs):
        n = len(t)
        t.behaviour_logprobs = lp0[k, :n] + rng.uniform(-1.6, 1.6, n).astype(np.float32)
        t.old_logprobs = lp0[k, :n] + rng.uniform(-1.6, 1.6, n).astype(np.float32)
        t.ref_logprobs = lp0[k, :n] + rng.uniform(-1.0, 1.0, n).astype(np.float32)
        t.advantage = float((-1) ** k * (0.5 + k / 4))
        t.entropies = rng.random(n).astype(np.float32)  # what the pruner ranks by
    keep = prune_trie(trie, PruneConfig(budget=int(trie.tree_tokens * 0.7)))
    assert not keep.all()
    packed = pack_trie(trie, ROW_LEN, num_rows=ROWS, num_traj=TRAJ, traj_len=ROW_LEN,
                       attention_block_size=CFG.attention_block_size, keep=keep,
                       fields=("pruned", "behaviour_logprobs", "old_logprobs", "ref_logprobs"))
    assert packed.batch.pruned.any()
    return model, stack_step_batches([packed.batch], 1, 1)


_RESULTS: dict = {}


def _step(setup, cfg, drop=()):
    """loss and gradient norm of one train step under cfg's loss keys (each distinct setting
    compiled and run once per session)."""
    key = (cfg.stage, cfg.loss.to_json(), cfg.train.log_entropy, tuple(drop))
    if key not in _RESULTS:
        _RESULTS[key] = _run_step(setup, cfg, drop)
    return _RESULTS[key]


def _run_step(setup, cfg, drop):
    model, batch = setup
    batch = batch.replace(**{f: None for f in drop})
    graphdef = nnx.graphdef(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx, sched = make_optimizer(cfg.optimizer, 10)
    step = jax.jit(make_train_step(graphdef, tx, sched, build.loss_spec(cfg)))
    _, m = step(init_state(params, tx), jax.tree.map(jnp.asarray, batch))
    return float(m["loss"]), float(m["grad_norm"]), {k: float(v) for k, v in m.items()}


CHANGES = {  # key: (non-default value, data fields the run then reads beyond behaviour)
    "eps_low": (0.05, ()),
    "eps_high": (0.05, ()),
    "dual_clip": (1.5, ()),
    "tis_cap": (1.2, ("old_logprobs",)),
    "behaviour_clip": (0.1, ("old_logprobs",)),
    "tis_level": ("sequence", ("old_logprobs",)),
    "kl_coef": (0.5, ("ref_logprobs",)),
    "entropy_coef": (0.3, ()),
    "agg_mode": ("seq-mean-token-sum", ()),
    "temperature": (0.7, ()),
    "count_pruned_in_denominator": (True, ()),
}


def _baseline(setup, fields):
    """The default rl loss keys, on a batch carrying `fields` (behaviour log-probs always)."""
    extra = {"old_logprobs": "record"} if "old_logprobs" in fields else {}
    if "ref_logprobs" in fields:
        extra["kl_coef"] = 0.0
    drop = tuple(f for f in ("old_logprobs", "ref_logprobs") if f not in fields)
    return _rl_config(**extra), drop


@pytest.mark.parametrize("key", sorted(CHANGES))
def test_each_loss_key_changes_the_training_step(setup, key):
    value, fields = CHANGES[key]
    cfg, drop = _baseline(setup, fields)
    base = _step(setup, cfg, drop)
    changed = cfg.copy_and_resolve_references()
    changed.loss[key] = value
    if key in ("tis_cap", "behaviour_clip", "tis_level"):  # they act against old-policy
        # log-probs distinct from behaviour (tis_level: on the weight that tis_cap turns on)
        changed.loss.old_logprobs = "record"
        if key == "tis_level":
            cfg.loss.tis_cap = changed.loss.tis_cap = 2.0
            base = _step(setup, cfg, drop)
    got = _step(setup, changed, drop)
    assert abs(got[0] - base[0]) > 1e-4 * abs(base[0]) or \
        abs(got[1] - base[1]) > 1e-4 * abs(base[1]), (key, base[:2], got[:2])


def test_kl_type_changes_the_step_and_old_logprobs_source_changes_the_ratio(setup):
    cfg = _rl_config(kl_coef=0.5)
    k3 = _step(setup, cfg)
    cfg.loss.kl_type = "k1"
    k1 = _step(setup, cfg)
    assert abs(k1[0] - k3[0]) > 1e-4 and abs(k1[2]["kl"] - k3[2]["kl"]) > 1e-4
    behaviour = _step(setup, _rl_config(), drop=("ref_logprobs", "old_logprobs"))
    record = _step(setup, _rl_config(old_logprobs="record"), drop=("ref_logprobs",))
    assert abs(record[0] - behaviour[0]) > 1e-4
    # the clip acts: ratios far from 1 are clipped, and the dual clip binds some tokens
    assert 0.05 < behaviour[2]["clip_fraction"] < 0.95
    # 'current': ratio 1 (nothing clipped); the truncated importance weight against behaviour acts
    current = _step(setup, _rl_config(old_logprobs="current"), drop=("ref_logprobs",
                                                                     "old_logprobs"))
    weighted = _step(setup, _rl_config(old_logprobs="current", tis_cap=1.5),
                     drop=("ref_logprobs", "old_logprobs"))
    assert current[2]["clip_fraction"] == 0.0 and abs(current[0] - behaviour[0]) > 1e-4
    assert abs(weighted[0] - current[0]) > 1e-4


def test_clip_keys_with_the_current_policy_as_old_policy_fail_at_start():
    cfg = stage_config("rl", "tiny")
    cfg.loss.update(dict(old_logprobs="current", eps_high=0.4))
    with pytest.raises(ConfigError, match="loss.eps_high: acts only when the ratio's old policy"):
        build.validate(cfg)
    cfg.loss.update(dict(eps_high=0.28, tis_cap=2.0))
    build.validate(cfg)  # the importance cap acts against the behaviour log-probs


def test_the_policy_loss_matches_a_numpy_ppo_written_from_the_definition(setup):
    """PPO (Schulman et al. 2017) with clip-higher (DAPO), dual clip (Ye et al. 2020), truncated
    importance weights and a k3 KL (Schulman 2020), token-mean: recomputed in numpy from the
    model's own log-probs and compared with the training step's loss."""
    model, batch = setup
    b = jax.tree.map(lambda x: np.asarray(x)[0, 0], batch)
    lp_rt, _ = forward_logprobs(model, jax.tree.map(jnp.asarray, b))
    lp = gather_per_trajectory(np.asarray(lp_rt), b.traj_index).astype(np.float64)
    old, beh, ref = (np.asarray(x, np.float64) for x in (b.old_logprobs, b.behaviour_logprobs,
                                                          b.ref_logprobs))
    eps_lo, eps_hi, c, cap, beta = 0.2, 0.28, 3.0, 1.5, 0.1
    a = np.asarray(b.advantage, np.float64)[:, None]
    r = np.exp(lp - old)
    pg = np.maximum(-a * r, -a * np.clip(r, 1 - eps_lo, 1 + eps_hi))
    pg = np.where(a < 0, np.minimum(pg, -c * a), pg)
    pg = pg * np.minimum(np.exp(old - beh), cap)
    kl = np.exp(ref - lp) - (ref - lp) - 1
    per_token = pg + beta * kl
    mask = np.asarray(b.trainable)
    want = per_token[mask].sum() / mask.sum()
    got, _, metrics = _step(setup, _rl_config(old_logprobs="record", tis_cap=cap, kl_coef=beta))
    np.testing.assert_allclose(got, want, rtol=2e-5)
    # the importance weights' diagnostics: mean truncated weight, share truncated
    iw = np.exp(old - beh)[mask]
    assert 0 < (iw > cap).mean() < 1  # the cap acts on some tokens, not all
    np.testing.assert_allclose(metrics["tis_weight"], np.minimum(iw, cap).mean(), rtol=2e-5)
    np.testing.assert_allclose(metrics["tis_truncated_fraction"], (iw > cap).mean(), rtol=2e-5)


def test_log_entropy_key_adds_or_removes_the_entropy_computation(setup):
    """train.log_entropy=False: no entropy is computed (no `entropy` metric, the compiled step
    differs) and the loss and gradient are unchanged; True logs it on every stage, sft too."""
    on = _step(setup, _rl_config(), drop=("old_logprobs", "ref_logprobs"))
    cfg = _rl_config()
    cfg.train.log_entropy = False
    off = _step(setup, cfg, drop=("old_logprobs", "ref_logprobs"))
    assert "entropy" in on[2] and on[2]["entropy"] > 0 and "entropy" not in off[2]
    np.testing.assert_allclose(off[:2], on[:2], rtol=1e-6)
    sft = stage_config("sft", "tiny")
    assert "entropy" in _step(setup, sft)[2]
    sft.train.log_entropy = False
    assert "entropy" not in _step(setup, sft)[2]


def test_log_entropy_off_with_an_entropy_bonus_fails_at_start():
    cfg = _rl_config(entropy_coef=0.1)
    cfg.train.log_entropy = False
    with pytest.raises(ConfigError, match=r"train.log_entropy: False skips the entropy, which "
                                          r"the entropy bonus \(loss.entropy_coef=0.1\) needs"):
        build.validate(cfg)


def test_the_sequence_importance_weight_matches_numpy_from_the_definition(setup):
    """loss.tis_level=sequence: each trajectory's tokens are weighted by its probability ratio
    pi_old(y) / pi_behaviour(y) = exp(sum over its generated tokens of old - behaviour),
    truncated at tis_cap (decoupled PPO's correction of whole trajectories)."""
    model, batch = setup
    b = jax.tree.map(lambda x: np.asarray(x)[0, 0], batch)
    lp_rt, _ = forward_logprobs(model, jax.tree.map(jnp.asarray, b))
    lp = gather_per_trajectory(np.asarray(lp_rt), b.traj_index).astype(np.float64)
    old, beh = (np.asarray(x, np.float64) for x in (b.old_logprobs, b.behaviour_logprobs))
    mask = np.asarray(b.trainable)
    cap = 1.5
    a = np.asarray(b.advantage, np.float64)[:, None]
    r = np.exp(lp - old)
    pg = np.maximum(-a * r, -a * np.clip(r, 1 - 0.2, 1 + 0.28))
    pg = np.where(a < 0, np.minimum(pg, -3.0 * a), pg)
    seq = np.array([(old[i] - beh[i])[mask[i]].sum() for i in range(len(old))])
    w = np.minimum(np.exp(seq), cap)[:, None] * np.ones_like(pg)
    assert 0 < (np.exp(seq)[mask.any(1)] > cap).mean() < 1  # the cap acts on some, not all
    want = (pg * w)[mask].sum() / mask.sum()
    got, _, metrics = _step(setup, _rl_config(old_logprobs="record", tis_cap=cap,
                                              tis_level="sequence"))
    np.testing.assert_allclose(got, want, rtol=2e-5)
    np.testing.assert_allclose(metrics["tis_weight"], w[mask].mean(), rtol=2e-5)
    np.testing.assert_allclose(metrics["tis_sequence_log_ratio_abs"],
                               np.abs(seq[mask.any(1)]).mean(), rtol=2e-5)


def test_the_behaviour_clip_matches_a_numpy_gradient_written_from_the_definition(setup):
    """The trust region around the behaviour policy (loss.behaviour_clip c) on top of decoupled
    PPO (Hilton et al. 2022; AReaL's objective): d loss / d logp per token, written in numpy from
    the definition. PPO's per-token gradient is -A r w where the unclipped branch is taken (zero
    where clipped or dual-clipped), w the truncated importance weight; the behaviour clip zeroes
    it where exp(logp - behaviour) > 1 + c with A > 0 or < 1 - c with A < 0. The loss value is
    the same as without the clip."""
    model, batch = setup
    b = jax.tree.map(lambda x: np.asarray(x)[0, 0], batch)
    eps_lo, eps_hi, dual, cap, clip_b = 0.2, 0.28, 3.0, 2.0, 0.3
    old, beh = (np.asarray(x, np.float64) for x in (b.old_logprobs, b.behaviour_logprobs))
    mask = np.asarray(b.trainable)
    a = np.broadcast_to(np.asarray(b.advantage, np.float64)[:, None], mask.shape)
    lp_rt, _ = forward_logprobs(model, jax.tree.map(jnp.asarray, b))
    lp = gather_per_trajectory(np.asarray(lp_rt), b.traj_index).astype(np.float64)
    r, r_b, w = np.exp(lp - old), np.exp(lp - beh), np.minimum(np.exp(old - beh), cap)
    unclipped = -a * r >= -a * np.clip(r, 1 - eps_lo, 1 + eps_hi)
    unclipped &= ~((a < 0) & (-a * r > -dual * a))
    outside = ((a > 0) & (r_b > 1 + clip_b)) | ((a < 0) & (r_b < 1 - clip_b))
    assert 0 < outside[mask].mean() < 0.9 and (outside & unclipped)[mask].any()
    want = {}
    for c in (None, clip_b):
        keep = unclipped & ~outside if c else unclipped
        want[c] = np.where(mask & keep, -a * r * w, 0.0) / mask.sum()

    def per_token_grad(c):
        cfg = _rl_config(old_logprobs="record", tis_cap=cap, behaviour_clip=c or 0.0)
        spec = build.loss_spec(cfg)
        jb = jax.tree.map(jnp.asarray, b)

        def loss(lp_nl):
            num, den, metrics = ppo_loss(spec, lp_nl, None, jb)
            return num / den, metrics
        g, metrics = jax.grad(loss, has_aux=True)(jnp.asarray(lp, jnp.float32))
        return np.asarray(g), float(loss(jnp.asarray(lp, jnp.float32))[0]), metrics

    g0, v0, _ = per_token_grad(None)
    g1, v1, metrics = per_token_grad(clip_b)
    np.testing.assert_allclose(g0, want[None], atol=1e-7, rtol=1e-4)
    np.testing.assert_allclose(g1, want[clip_b], atol=1e-7, rtol=1e-4)
    assert np.abs(g1 - g0).max() > 1e-5  # it acts
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    num, den = metrics["behaviour_clip_fraction"]  # the step divides the pair's sums
    np.testing.assert_allclose(float(num / den), outside[mask].mean(), rtol=1e-5)


@pytest.mark.parametrize("stage,key,value,match", [
    ("sft", "eps_low", 0.1, "loss.eps_low: applies to the policy stages"),
    ("mid", "kl_coef", 0.1, "loss.kl_coef: applies to the policy stages"),
    ("rl", "tis_cap", 2.0, "loss.tis_cap: acts only when the old-policy log-probs differ"),
    ("rl", "behaviour_clip", 0.2, "loss.behaviour_clip: bounds the ratio to the behaviour"),
    ("rl", "tis_level", "sequence", "loss.tis_level: acts only with the truncated importance"),
    ("rl", "tis_level", "trajectory", "loss.tis_level: must be one of"),
    ("rl", "behaviour_clip", 1.0, r"loss.behaviour_clip: must be in \[0, 1\)"),
    ("rl", "kl_type", "k2", "loss.kl_type: acts only with loss.kl_coef > 0"),
    ("sft", "count_pruned_in_denominator", True, "loss.count_pruned_in_denominator: needs"),
    ("rl", "old_logprobs", "newest", "loss.old_logprobs: must be one of"),
    ("rl", "kl_type", "k9", "loss.kl_type: must be one of"),
])
def test_keys_that_cannot_act_fail_at_start_naming_the_key(stage, key, value, match):
    cfg = stage_config(stage, "tiny")
    cfg.loss[key] = value
    with pytest.raises(ConfigError, match=match):
        build.validate(cfg)


@pytest.mark.parametrize("key,value,record_key", [("kl_coef", 0.1, "ref_logprobs"),
                                                  ("old_logprobs", "record", "old_logprobs")])
def test_keys_that_need_data_fail_at_start_when_the_records_lack_it(tmp_path, key, value,
                                                                    record_key):
    from kat_jax.training.config_lib import load_train_config
    from kat_jax.training.trainer import run_train

    cfg = load_train_config(os.path.join(ROOT, "configs", "rl.py:tiny"),
                            [f"--config.loss.{key}={value}"])
    with pytest.raises(ValueError, match=rf"rl_rollouts.jsonl:\d+: no '{record_key}' in the "
                                         rf"record, which --config.loss.{key}"):
        run_train(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("group,key,value,match", [
    ("train", "eval_every", 5, "train.eval_every: needs data.eval_files"),
    ("train", "profile_start", 3, "train.profile_start: acts only with train.profile_steps > 0"),
    ("train", "profile_steps", 2, "train.profile_steps: needs train.profile_start >= 0"),
    ("data", "eval_files", "pkg:data/sft_trajectories.jsonl",
     "data.eval_files: is read only with train.eval_every > 0"),
])
def test_train_keys_that_cannot_act_fail_at_start(group, key, value, match):
    cfg = stage_config("sft", "tiny")
    cfg[group][key] = value
    with pytest.raises(ConfigError, match=match):
        build.validate(cfg)


def test_a_pipeline_checks_every_stage_before_the_first_trains(tmp_path):
    import kat_jax.flow.online  # noqa: F401 - registers the online loop (the rft / rl stages)
    from kat_jax.training.config_lib import load_train_config
    from kat_jax.training.trainer import run_train

    cfg = load_train_config(os.path.join(ROOT, "configs", "quickstart.py"),
                            ["--config.rl.rl.max_draws=2"])
    with pytest.raises(ConfigError, match=r"--config\.rl\.rl\.max_draws: acts only with"):
        run_train(cfg, str(tmp_path))
    assert not (tmp_path / "mid").exists()  # nothing trained
    cfg = load_train_config(os.path.join(ROOT, "configs", "quickstart.py"),
                            ["--config.rft.rl.teachers=/nonexistent/teachers.jsonl"])
    with pytest.raises(ConfigError, match=r"--config\.rft\.rl\.teachers: no such file"):
        run_train(cfg, str(tmp_path))
    assert not (tmp_path / "mid").exists()


def test_a_registered_stage_is_validated_and_reads_its_data_kind():
    from kat_jax.data.pipeline import STAGE_KIND
    from kat_jax.training.losses import STAGES, register_stage, sft_loss

    register_stage("sft_copy_for_test", sft_loss, "chat")
    try:
        assert STAGE_KIND["sft_copy_for_test"] == "chat" and not STAGES["sft_copy_for_test"].policy
        cfg = stage_config("sft", "tiny")
        cfg.stage = "sft_copy_for_test"
        build.validate(cfg)
        cfg.loss.eps_low = 0.1  # not a policy stage: the policy keys cannot act
        with pytest.raises(ConfigError, match="loss.eps_low: applies to the policy stages"):
            build.validate(cfg)
        with pytest.raises(ValueError, match="unknown data kind 'pictures'"):
            register_stage("other_for_test", sft_loss, "pictures")
    finally:
        STAGES.pop("sft_copy_for_test", None)
        STAGE_KIND.pop("sft_copy_for_test", None)
