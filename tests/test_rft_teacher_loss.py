"""RFT's teachers in the loss (rl.teacher_loss=sft, issue 18 part 4): the teacher transcripts join
their group's prefix tree and add teacher_coef x the mean NLL of their assistant tokens to the
rollouts' policy loss. Proven against the flat per-trajectory computation written here from the
definition (value and gradient, over two microbatches); the teachers share the prompt in the tree;
the key acts; bad values fail naming the key; the real online loop trains with it."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kat_jax.flow.online as online
from kat_jax.data.tokenizer import ByteTokenizer
from kat_jax.models.config import get_preset
from kat_jax.models.decoder import init_model
from kat_jax.ops.logprobs import tree_logprobs
from kat_jax.training import build, config_lib
from kat_jax.training.losses import LossSpec, PolicyLossConfig
from kat_jax.training.step import init_state, make_train_step
from kat_jax.trees.batch import stack_step_batches
from kat_jax.trees.packing import pack_trie
from kat_jax.trees.trajectory import Trajectory
from kat_jax.trees.trie import build_trie

CFG = get_preset("tiny", vocab_size=64, num_layers=1, attention_block_size=16,
                 attention_impl="xla_dense")
ROW_LEN, ROWS, TRAJ, L = 64, 2, 4, 32
PROMPT = 12
COEF = 0.3
EPS_LOW, EPS_HIGH = 0.2, 0.28
TOK_IM_END = ByteTokenizer().special("<|im_end|>")


# -- (a) the loss and its gradient vs the flat per-trajectory computation -----------------------

@functools.partial(jax.jit, static_argnums=0)
def _flat_logp(graphdef, params, tokens, lens):
    """Each trajectory as its own causal chain: log-probs [K, L] (0 past its end)."""
    m = nnx.merge(graphdef, params)
    k, length = tokens.shape
    idx = jnp.arange(length)
    positions = jnp.broadcast_to(idx, (k, length))
    subtree_end = jnp.where(idx < lens[:, None], lens[:, None], idx + 1)
    parent = jnp.broadcast_to(idx - 1, (k, length))
    hidden = m(tokens, positions, subtree_end)
    lp, _ = tree_logprobs(hidden, m.head_kernel(), tokens, parent, CFG.vocab_chunk_size,
                          entropy=False)
    return jnp.where(idx < lens[:, None], lp, 0.0)


def _groups(rng):
    """Two groups (one per microbatch): a shared prompt, two rollouts (advantages of both
    signs), one teacher whose middle tokens are a tool result (not assistant: no term)."""
    groups = []
    for g in range(2):
        prompt = rng.integers(0, CFG.vocab_size, PROMPT)
        trajs = []
        for k in range(2):
            gen = rng.integers(0, CFG.vocab_size, 6 + 3 * k + g)
            trajs.append(Trajectory(np.concatenate([prompt, gen]),
                                    trainable=np.r_[np.zeros(PROMPT, bool), np.ones(len(gen), bool)],
                                    advantage=(0.8 + g) * (-1) ** k, id=f"g{g}r{k}"))
        demo = rng.integers(0, CFG.vocab_size, 10 + g)
        assistant = np.ones(len(demo), bool)
        assistant[4:7] = False  # a tool result inside the teacher transcript
        trajs.append(Trajectory(np.concatenate([prompt, demo]),
                                trainable=np.r_[np.zeros(PROMPT, bool), assistant],
                                advantage=0.0, id=f"g{g}teacher", teacher=True))
        groups.append(trajs)
    return groups


@pytest.fixture(scope="module")
def setup():
    model = init_model(CFG, seed=1)
    graphdef = nnx.graphdef(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    rng = np.random.default_rng(0)
    groups = _groups(rng)
    flat = [t for g in groups for t in g]
    tokens = np.zeros((len(flat), L), np.int32)
    lens = np.array([len(t) for t in flat], np.int32)
    for i, t in enumerate(flat):
        tokens[i, :len(t)] = t.tokens
    lp0 = np.asarray(_flat_logp(graphdef, params, jnp.asarray(tokens), jnp.asarray(lens)))
    for i, t in enumerate(flat):  # behaviour log-probs away from the model: both clip sides act
        noise = rng.uniform(-0.5, 0.5, len(t)).astype(np.float32)
        t.behaviour_logprobs = np.minimum(lp0[i, :len(t)] + noise, 0.0) if not t.teacher else \
            np.zeros(len(t), np.float32)
    packed = [pack_trie(build_trie(g), ROW_LEN, num_rows=ROWS, num_traj=TRAJ, traj_len=L,
                        attention_block_size=CFG.attention_block_size,
                        fields=("behaviour_logprobs", "teacher")) for g in groups]
    batch = jax.tree.map(jnp.asarray, stack_step_batches([p.batch for p in packed], 2, 1))
    return graphdef, params, flat, tokens, lens, batch, packed


def _spec(coef):
    return LossSpec(stage="rft", agg_mode="seq-mean-token-mean", entropy=False,
                    policy=PolicyLossConfig(eps_low=EPS_LOW, eps_high=EPS_HIGH, dual_clip=None,
                                            tis_cap=None, old_policy="behaviour"),
                    teacher_coef=coef)


def _reference(lp, flat, coef, xp):
    """The objective from its definition on flat per-trajectory log-probs lp [K, L]: rollouts'
    clipped surrogate, mean over each one's generated tokens, mean over rollouts; plus coef x the
    mean NLL over every teacher assistant token (j >= 1) of the whole batch."""
    pg, nll, n_teacher = [], 0.0, 0
    for i, t in enumerate(flat):
        n = len(t)
        mask = np.asarray(t.trainable).copy()
        mask[0] = False
        lp_i = lp[i, :n]
        if t.teacher:
            nll = nll + xp.sum(xp.where(mask, -lp_i, 0.0))
            n_teacher += int(mask.sum())
            continue
        r = xp.exp(lp_i - t.behaviour_logprobs)
        a = t.advantage
        per = xp.maximum(-a * r, -a * xp.clip(r, 1 - EPS_LOW, 1 + EPS_HIGH))
        pg.append(xp.sum(xp.where(mask, per, 0.0)) / mask.sum())
    pg_loss = sum(pg) / len(pg)
    return pg_loss + coef * nll / n_teacher, nll / n_teacher, pg_loss


_STEPS: dict = {}


def _step(graphdef, params, batch, spec):
    """One train step with plain SGD at rate 1: (metrics, the gradient = params - new params);
    run once per spec (the tests share the setup batch)."""
    if spec not in _STEPS:
        tx = optax.sgd(1.0)
        step = jax.jit(make_train_step(graphdef, tx, lambda s: 1.0, spec))
        new, m = step(init_state(params, tx), batch)
        grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, new["params"])
        _STEPS[spec] = {k: float(v) for k, v in m.items()}, grads
    return _STEPS[spec]


def test_teacher_sft_term_and_gradient_equal_the_flat_computation(setup):
    graphdef, params, flat, tokens, lens, batch, _ = setup
    m, grads = _step(graphdef, params, batch, _spec(COEF))
    lp = np.asarray(_flat_logp(graphdef, params, jnp.asarray(tokens), jnp.asarray(lens)),
                    np.float64)
    want, want_nll, want_pg = _reference(lp, flat, COEF, np)
    assert m["teacher_nll"] == pytest.approx(want_nll, rel=1e-5)
    assert m["loss"] == pytest.approx(want, rel=1e-5)
    assert abs(m["loss"] - want_pg) > 0.1  # the term is not negligible here

    def ref_loss(p):
        return _reference(_flat_logp(graphdef, p, jnp.asarray(tokens), jnp.asarray(lens)), flat,
                          COEF, jnp)[0]

    ref_g = jax.jit(jax.grad(ref_loss))(params)
    for got, exp in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(got, np.asarray(exp), atol=2e-6, rtol=2e-4)


def test_teacher_tokens_are_never_trainable_and_take_no_policy_term(setup):
    *_, packed = setup
    for g, p in enumerate(packed):
        b = p.batch
        assert not b.trainable[2].any()
        assert b.teacher[2].sum() == 10 + g - 3  # its assistant tokens only
        assert not b.teacher[:2].any() and b.trainable[:2].any()


# -- (b) prefix sharing with the rollouts --------------------------------------------------------

class _AnswerEngine:
    """No model: every sample answers at once (a few bytes then <|im_end|>)."""

    context_length = 4096

    def generate(self, prompts, params, n=1, seeds=None):
        from kat_jax.rollout.sampler import Generation

        out = []
        for seed in seeds:
            ids = ByteTokenizer().encode(f"The answer is \\boxed{{{seed % 7}}}.") + [TOK_IM_END]
            out.append([Generation(ids, [-0.5] * len(ids), [1.0] * len(ids), "stop")] * n)
        return out


def _rft_cfg(extra=()):
    return config_lib.load_train_config("configs/rft.py:tiny_calculator", [
        "--config.rl.group_size=3", "--config.rl.concurrency=1", "--config.rl.max_turns=1",
        "--config.rl.divergence_threshold=0", *extra])


def test_teachers_share_the_prompt_with_the_rollouts_in_the_packed_tree():
    from kat_jax.data.pipeline import BatchShape, make_step_iterator
    from kat_jax.envs import load_env_tasks

    cfg = _rft_cfg(["--config.rl.teacher_loss=sft"])
    online.validate_online(cfg)
    tok = ByteTokenizer()
    tasks = load_env_tasks("calculator", None, split="train")[:2]
    teachers = online._load_teachers(cfg, tasks)
    groups, _, _ = online.run_round(_AnswerEngine(), cfg, tasks, tok, 0, "grpo", seed=0,
                                    teachers=teachers)
    advantages = [[r["advantage"] for r in g] for g in groups]
    with_teachers = online._teacher_records(cfg, teachers, tok)(groups)
    for g, adv in zip(with_teachers, advantages):
        rollouts, teacher = g[:-1], g[-1]
        assert teacher["teacher"] and len(rollouts) == 3
        # the teacher's rendering starts with the rollouts' whole prompt
        prompt = next(i for i, x in enumerate(rollouts[0]["logprobs"]) if x is not None)
        assert teacher["tokens"][:prompt] == rollouts[0]["tokens"][:prompt]
        trajs = [Trajectory(np.asarray(r["tokens"])) for r in g]
        alone = build_trie(trajs[:-1]).tree_tokens
        both = build_trie(trajs)
        # every token of the prompt is computed once for the four trajectories
        assert both.tree_tokens <= alone + len(teacher["tokens"]) - prompt
        assert both.tree_tokens < both.total_tokens - 3 * prompt
        assert [r["advantage"] for r in rollouts] == adv  # the teacher shifts no advantage
    shape = BatchShape(2, 1280, 8, 128, ("behaviour_logprobs", "teacher"))
    it = make_step_iterator(online.RecordGroups(with_teachers, "test"), "rft", tok, shape,
                            512, 1, 1, shuffle=False, epochs=1)
    batches = list(it)
    assert len(batches) == 1
    b, stats = batches[0]
    n_teacher = sum(sum(x is not None for x in g[-1]["logprobs"]) for g in with_teachers)
    assert int(b.teacher.sum()) == n_teacher > 0
    assert not (b.teacher & b.trainable).any()
    assert stats["computed_tokens"] < stats["total_tokens"] - 3 * prompt
    assert stats["trajectories"] == 8


# -- (c) the key acts ----------------------------------------------------------------------------

def test_teacher_loss_none_vs_sft_changes_the_loss_and_the_update(setup):
    graphdef, params, *_, batch, _ = setup
    coefs = {mode: build.loss_spec(_rft_cfg([f"--config.rl.teacher_loss={mode}"] + (
        [f"--config.rl.teacher_coef={COEF}"] if mode == "sft" else []))).teacher_coef
        for mode in ("none", "sft")}
    assert coefs == {"none": 0.0, "sft": COEF}
    specs = {mode: _spec(c) for mode, c in coefs.items()}  # the policy keys of test (a)
    m_none, g_none = _step(graphdef, params, batch, specs["none"])
    m_sft, g_sft = _step(graphdef, params, batch, specs["sft"])
    assert m_sft["loss"] == pytest.approx(m_none["loss"] + COEF * m_sft["teacher_nll"], rel=1e-5)
    assert m_none["teacher_nll"] == m_sft["teacher_nll"]  # logged either way, added with sft
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g_none),
                                                           jax.tree.leaves(g_sft)))
    assert diff > 1e-4


# -- (d) errors naming the key -------------------------------------------------------------------

@pytest.mark.parametrize("override,match", [
    (["--config.rl.teacher_loss=bogus"], r"rl.teacher_loss: must be one of \('none', 'sft'\)"),
    (["--config.rl.teacher_loss=off_policy"], r"rl.teacher_loss: off_policy .* not implemented"),
    (["--config.rl.teacher_coef=0.5"], r"rl.teacher_coef: acts only with rl.teacher_loss=sft"),
    (["--config.rl.teacher_loss=sft", "--config.rl.teacher_coef=0"],
     r"rl.teacher_coef: must be > 0"),
    (["--config.rl.teacher_loss=sft", "--config.prune.budget=2000"],
     r"rl.teacher_loss: sft does not combine with pruning"),
])
def test_bad_teacher_loss_settings_fail_naming_the_key(override, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        online.validate_online(_rft_cfg(override))


def test_teacher_loss_outside_the_online_rft_stage_fails_naming_the_key():
    rl = config_lib.load_train_config("configs/rl.py:tiny_calculator",
                                      ["--config.rl.teacher_loss=sft"])
    with pytest.raises(config_lib.ConfigError, match="rl.teacher_loss: acts only in the online rft"):
        online.validate_online(rl)
    offline = config_lib.load_train_config("configs/rft.py:tiny", ["--config.rl.teacher_coef=1.0"])
    with pytest.raises(config_lib.ConfigError, match="rl.teacher_coef: acts only in the online loop"):
        online.validate_online(offline)


# -- (e) the real online loop ------------------------------------------------------------------

def test_online_rft_loop_trains_with_the_teacher_sft_term(tmp_path):
    from kat_jax.training.trainer import run_train

    cfg = config_lib.load_train_config("configs/rft.py:tiny_calculator", [
        "--config.rl.teacher_loss=sft", "--config.rl.teacher_coef=0.5",
        "--config.rl.groups_per_round=1", "--config.rl.group_size=2",
        "--config.rl.minibatches=1", "--config.rl.max_turns=1", "--config.rl.max_new_tokens=8",
        "--config.rl.concurrency=2", "--config.rl.divergence_threshold=0",
        "--config.data.rows=1", "--config.data.trajectories=4",
        "--config.train.steps=2", "--config.train.checkpoint_every=2"])
    out = run_train(cfg, str(tmp_path / "w"))
    assert out["step"] == 2 and out["rounds"] == 2
    m = [json.loads(x) for x in open(tmp_path / "w" / "metrics.jsonl") if x.strip()]
    steps = [r for r in m if "teacher_nll" in r]
    assert len(steps) == 2
    # a byte-level random model: about log(vocab) nats per teacher token, finite
    assert all(3.0 < r["teacher_nll"] < 10.0 for r in steps)


# -- the pod presets (config only: no model is built) --------------------------------------------

@pytest.mark.parametrize("variant,preset", [("qwen3_8b_swe", "qwen3_8b"),
                                            ("kat_dev_32b_swe", "kat_dev_32b")])
def test_rft_swe_pod_variants_validate_with_the_bundled_swe_teachers(variant, preset):
    from kat_jax.envs import load_env_tasks
    from kat_jax.training.defaults import stage_config

    cfg = config_lib.load_train_config(f"configs/rft.py:{variant}", [])
    build.validate(cfg)
    online.validate_online(cfg)
    pod = stage_config("rft", preset)
    assert cfg.stage == "rft" and cfg.rl.env == "swe" and cfg.rl.split == "all"
    assert cfg.model.to_dict() == pod.model.to_dict() and cfg.mesh.to_dict() == pod.mesh.to_dict()
    assert (cfg.data.rows, cfg.data.row_len) == (pod.data.rows, pod.data.row_len)
    assert cfg.rl.teacher_loss == "sft" and build.loss_spec(cfg).teacher_coef == 0.1
    assert "teacher" in build.batch_fields(cfg)[0]  # the compile check's batch has the field
    assert cfg.rl.teachers == ""  # the bundled swe teachers: one for every bundled instance
    tasks = load_env_tasks("swe", None, split=None)
    assert set(online._load_teachers(cfg, tasks)) == {t.id for t in tasks}
