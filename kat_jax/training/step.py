"""The pure train and eval steps over packed tree batches.

    state, metrics = train_step(state, batch)

state: {"step": int32[], "params": pure param dict, "opt_state": optax state, "rng": uint32[2],
        "skipped": int32[] (non-finite updates so far), "consecutive_skips": int32[]}
batch: arrays with leading [M, S]: M microbatches (accumulated), S data shards (split over the mesh's
('data', 'fsdp') axes). Per shard, a TreeBatch of fixed shape (kat_jax.trees.packing):
    tokens, positions, parent, subtree_end   int32[M, S, R, T]   R rows of T tokens
    schedule_{q_block,k_block,kind}          int32[M, S, R, P]   block-sparse attention schedule
    traj_index                               int32[M, S, N, L]   row-local gather map
    traj_valid, traj_trainable, traj_pruned  bool[M, S, N, L]
    traj_behaviour_logprobs                  float32[M, S, N, L]
    traj_advantage                           float32[M, S, N]
    traj_has_behaviour                       bool[M, S, N]

The stage changes only the loss weights (kat_jax.training.losses.stage_loss). Losses are
(numerator, denominator) sums, so the accumulated gradient is sum(grad num) / sum(den): the same
global mean whatever M and S are (exact, up to float summation order).

A non-finite loss or gradient norm leaves params and optimizer state unchanged (the step counter
still advances with the data), and counts in `skipped` / `consecutive_skips`; the loop stops the run
after train.max_consecutive_skips of them. A batch with no trainable token (den == 0) is also not
applied (counted as `empty`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kat_jax.data.pipeline import SCHEDULE_PREFIX, TRAJ_KEYS
from kat_jax.ops.logprobs import tree_logprobs
from kat_jax.training.losses import PolicyLossConfig, stage_loss
from kat_jax.trees.packing import gather_per_trajectory


@dataclasses.dataclass(frozen=True)
class LossSpec:
    stage: str = "sft"
    agg_mode: str = "token-mean"
    temperature: float = 1.0
    count_pruned_in_denominator: bool = False
    policy: PolicyLossConfig = dataclasses.field(default_factory=PolicyLossConfig)


def microbatch_loss(graphdef: nnx.GraphDef, params: dict, mb: dict, spec: LossSpec,
                    constrain: Callable[[jax.Array], jax.Array] | None = None):
    """(num, den, metrics) of one microbatch (arrays [S, ...])."""
    model = nnx.merge(graphdef, params)
    s, r, t = mb["tokens"].shape
    flat = lambda x: x.reshape(s * r, *x.shape[2:])
    sched = {k[len(SCHEDULE_PREFIX):]: flat(v) for k, v in mb.items()
             if k.startswith(SCHEDULE_PREFIX)} or None
    tokens = flat(mb["tokens"])
    if constrain is not None:
        tokens = constrain(tokens)
    hidden = model(tokens, flat(mb["positions"]), flat(mb["subtree_end"]), sched)
    lp, ent = tree_logprobs(hidden, model.head_kernel(), tokens, flat(mb["parent"]),
                            model.cfg.vocab_chunk_size, spec.temperature)
    lp_traj = jax.vmap(gather_per_trajectory)(lp.reshape(s, r, t), mb["traj_index"])
    ent_traj = jax.vmap(gather_per_trajectory)(ent.reshape(s, r, t), mb["traj_index"])
    n, length = mb["traj_index"].shape[1:]
    per_traj = lambda x: x.reshape(s * n, *x.shape[2:])
    view = {k: per_traj(mb[k]) for k in TRAJ_KEYS if k in mb and k != "traj_index"}
    return stage_loss(spec.stage, per_traj(lp_traj), per_traj(ent_traj), view, spec.policy,
                      spec.agg_mode, spec.count_pruned_in_denominator)


def _sum_metrics(a: dict, b: dict) -> dict:
    return jax.tree.map(jnp.add, a, b)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, spec: LossSpec,
                    constrain: Callable[[jax.Array], jax.Array] | None = None):
    """The pure (state, batch) -> (state, metrics); jit it with shardings (kat_jax.training.loop)."""

    def loss_and_grad(params, mb):
        def f(p):
            num, den, metrics = microbatch_loss(graphdef, p, mb, spec, constrain)
            return num, (den, metrics)

        (num, (den, metrics)), grads = jax.value_and_grad(f, has_aux=True)(params)
        return num, den, metrics, grads

    def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
        params = state["params"]
        first = jax.tree.map(lambda x: x[0], batch)
        num0, den0, met0, g0 = loss_and_grad(params, first)

        def body(carry, mb):
            num, den, met, grads = carry
            n, d, m, g = loss_and_grad(params, mb)
            return (num + n, den + d, _sum_metrics(met, m), jax.tree.map(jnp.add, grads, g)), None

        rest = jax.tree.map(lambda x: x[1:], batch)
        (num, den, met, grads), _ = jax.lax.scan(body, (num0, den0, met0, g0), rest)
        safe_den = jnp.maximum(den, 1e-9)
        loss = num / safe_den
        grads = jax.tree.map(lambda g: g / safe_den.astype(g.dtype), grads)
        grad_norm = optax.tree_utils.tree_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        empty = den <= 0
        apply = finite & ~empty
        updates, new_opt = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)
        skipped = (~finite).astype(jnp.int32)
        new_state = {
            "step": state["step"] + 1,
            "params": pick(new_params, params),
            "opt_state": pick(new_opt, state["opt_state"]),
            "rng": jax.random.key_data(jax.random.fold_in(
                jax.random.wrap_key_data(state["rng"]), state["step"])),
            "skipped": state["skipped"] + skipped,
            "consecutive_skips": jnp.where(finite, 0, state["consecutive_skips"] + 1),
        }
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state["step"]),
            "loss_tokens": den,
            "skipped_update": skipped,
            "empty_batch": empty.astype(jnp.int32),
            "consecutive_skips": new_state["consecutive_skips"],
            "total_skipped": new_state["skipped"],
        }
        for k, (mn, md) in met.items():
            metrics[k] = mn / jnp.maximum(md, 1e-9)
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, spec: LossSpec,
                   constrain: Callable[[jax.Array], jax.Array] | None = None):
    """(params, batch) -> {"loss_num", "loss_den", ...}: sums, so a caller averages over batches."""

    def eval_step(params: dict, batch: dict) -> dict:
        def body(carry, mb):
            num, den, met = microbatch_loss(graphdef, params, mb, spec, constrain)
            return _sum_metrics(carry, {"loss": (num, den), **met}), None

        first = jax.tree.map(lambda x: x[0], batch)
        num, den, met = microbatch_loss(graphdef, params, first, spec, constrain)
        out, _ = jax.lax.scan(body, {"loss": (num, den), **met},
                              jax.tree.map(lambda x: x[1:], batch))
        return out

    return eval_step


def init_state(params: dict, tx: optax.GradientTransformation, seed: int = 0) -> dict[str, Any]:
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.key_data(jax.random.key(seed)),
        "skipped": jnp.zeros((), jnp.int32),
        "consecutive_skips": jnp.zeros((), jnp.int32),
    }
