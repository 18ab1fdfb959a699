"""Loss details that the tree-vs-flat tests do not isolate."""

import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.training.losses import LossSpec, PolicyLossConfig, aggregate, stage_loss
from kat_jax.trees.batch import StepBatch


def _batch(rng, n=3, length=6, **optional):
    return StepBatch(
        tokens=None, positions=None, parent=None, subtree_end=None, traj_index=None,
        valid=jnp.ones((n, length), bool),
        trainable=jnp.asarray(rng.random((n, length)) < 0.8),
        advantage=jnp.asarray(rng.normal(size=n), jnp.float32),
        **{k: jnp.asarray(v, jnp.float32) for k, v in optional.items()})


def test_importance_correction_applies_only_with_old_logprobs_distinct_from_behaviour():
    rng = np.random.default_rng(0)
    logp = jnp.asarray(-rng.random((3, 6)), jnp.float32)
    old = -rng.random((3, 6))
    rl = lambda mode, tis_cap: LossSpec(stage="rl", policy=PolicyLossConfig(
        tis_cap=tis_cap, old_policy=mode))
    # behaviour as the old policy: no importance weight, whatever tis_cap says
    b = _batch(rng, behaviour_logprobs=old, old_logprobs=np.zeros((3, 6)))
    num, _, _ = stage_loss(rl("behaviour", 2.0), logp, logp, b)
    ref_num, _, _ = stage_loss(rl("behaviour", None), logp, logp, b)
    np.testing.assert_allclose(float(num), float(ref_num), rtol=1e-6)
    # the record's old log-probs: the truncated weight min(exp(old - behaviour), cap) applies
    b2 = b.replace(old_logprobs=jnp.asarray(old, jnp.float32),
                   behaviour_logprobs=jnp.zeros((3, 6), jnp.float32))
    num2, _, _ = stage_loss(rl("record", 2.0), logp, logp, b2)
    num3, _, _ = stage_loss(rl("record", None), logp, logp, b2)
    assert abs(float(num2) - float(num3)) > 1e-6


def test_policy_loss_without_old_or_behaviour_logprobs_is_an_error():
    rng = np.random.default_rng(1)
    logp = jnp.zeros((3, 6))
    with pytest.raises(ValueError, match="old-policy log-probs StepBatch.behaviour_logprobs"):
        stage_loss(LossSpec(stage="rl"), logp, logp, _batch(rng))
    with pytest.raises(ValueError, match="old-policy log-probs StepBatch.old_logprobs"):
        stage_loss(LossSpec(stage="rl", policy=PolicyLossConfig(old_policy="record")), logp, logp,
                   _batch(rng, behaviour_logprobs=np.zeros((3, 6))))
    with pytest.raises(ValueError, match="kl_coef"):
        stage_loss(LossSpec(stage="rl", policy=PolicyLossConfig(kl_coef=0.1)), logp, logp,
                   _batch(rng, behaviour_logprobs=np.zeros((3, 6))))
    with pytest.raises(ValueError, match="count_pruned_in_denominator"):
        stage_loss(LossSpec(stage="sft", count_pruned_in_denominator=True), logp, logp,
                   _batch(rng))


def test_aggregation_modes_against_hand_computation():
    per_token = jnp.asarray([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = jnp.asarray([[True, True, False], [True, False, False]])
    assert [float(x) for x in aggregate(per_token, mask, "token-mean")] == [7.0, 3.0]
    num, den = aggregate(per_token, mask, "seq-mean-token-mean")
    assert float(num) == 1.5 + 4.0 and float(den) == 2.0
    num, den = aggregate(per_token, mask, "seq-mean-token-sum")
    assert float(num) == 3.0 + 4.0 and float(den) == 2.0
    num, den = aggregate(per_token, mask, "token-mean", denom_mask=jnp.ones((2, 3), bool))
    assert float(num) == 7.0 and float(den) == 6.0
