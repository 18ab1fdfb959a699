"""Loss details that the tree-vs-flat tests do not isolate."""

import jax.numpy as jnp
import numpy as np

from kat_jax.training.losses import PolicyLossConfig, aggregate, stage_loss


def _batch(rng, n=3, length=6):
    return {
        "traj_valid": jnp.ones((n, length), bool),
        "traj_trainable": jnp.asarray(rng.random((n, length)) < 0.8),
        "traj_advantage": jnp.asarray(rng.normal(size=n), jnp.float32),
        "traj_old_logprobs": jnp.asarray(-rng.random((n, length)), jnp.float32),
        "traj_behaviour_logprobs": jnp.zeros((n, length), jnp.float32),  # packer's "absent" fill
    }


def test_importance_correction_skips_trajectories_without_behaviour_logprobs():
    rng = np.random.default_rng(0)
    b = _batch(rng)
    logp = jnp.asarray(-rng.random((3, 6)), jnp.float32)
    cfg = PolicyLossConfig(tis_cap=2.0)
    b["traj_has_behaviour"] = jnp.zeros(3, bool)
    num, den, _ = stage_loss("rl", logp, logp, b, cfg)
    ref_num, ref_den, _ = stage_loss("rl", logp, logp, b, PolicyLossConfig(tis_cap=None))
    np.testing.assert_allclose(float(num), float(ref_num), rtol=1e-6)
    b["traj_has_behaviour"] = jnp.ones(3, bool)  # with (zero) behaviour log-probs it does apply
    num2, _, _ = stage_loss("rl", logp, logp, b, cfg)
    assert abs(float(num2) - float(ref_num)) > 1e-6


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
