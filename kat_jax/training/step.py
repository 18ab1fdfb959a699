"""The pure train and eval steps over packed tree batches.

    state, metrics = train_step(state, batch)

state: {"step": int32[], "params": pure param dict, "opt_state": optax state, "rng": uint32[2],
        "skipped": int32[] (non-finite updates so far), "consecutive_skips": int32[]}
batch: a kat_jax.trees.batch.StepBatch whose fields have leading axes [M, S]: M microbatches
(accumulated), S data shards (split over the mesh's batch axes). Per shard, rows [R, T], trajectory
fields [N, L] or [N], as documented there.

The stage changes only the loss (kat_jax.training.losses.STAGES). Losses are (numerator,
denominator) sums, so the accumulated gradient is sum(grad num) / sum(den): the same global mean
whatever M and S are (exact, up to float summation order). RFT's teacher SFT term (a second mean,
over the teacher tokens) joins the same way: teacher_weight.

Under a mesh with a 'context' axis of size > 1 (config mesh.context) the forward splits each row's
tokens over it (kat_jax.ops.context_parallel; `forward_logprobs`), with the same results.

A non-finite loss or gradient norm leaves params and optimizer state unchanged (the step counter
still advances with the data), and counts in `skipped` / `consecutive_skips`; the loop stops the run
after train.max_consecutive_skips of them. A batch with no trainable token (den == 0) is also not
applied (counted as `empty`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from kat_jax.ops.context_parallel import CONTEXT_AXIS, context_layout, context_shards, permute_parent
from kat_jax.ops.context_parallel import attention_schedule as context_attention_schedule
from kat_jax.ops.logprobs import tree_logprobs
from kat_jax.ops.tree_mask import BATCH_MESH_AXES as BATCH_AXES
from kat_jax.training.losses import TEACHER_METRIC, LossSpec, stage_loss
from kat_jax.trees.batch import StepBatch, merge_leading
from kat_jax.trees.packing import gather_per_trajectory


def forward_logprobs(model, rows: StepBatch, temperature: float = 1.0,
                     constrain: Callable[[jax.Array], jax.Array] | None = None,
                     entropy: bool = True):
    """(logp, entropy) float32[B, T] of every row token under `model` (token 0 of a tree: 0): one
    forward over rows [B, T] (rows.tokens etc.; trajectory fields unused). entropy=False: the
    entropy is not computed and comes back None. The train, eval and scoring steps all run
    this."""
    tokens_bt = rows.tokens if constrain is None else constrain(rows.tokens)
    if context_shards() > 1:
        return _context_forward_logprobs(model, rows, tokens_bt, temperature, entropy)
    sched = None if rows.schedule is None else rows.schedule.as_dict()
    hidden_btd = model(tokens_bt, rows.positions, rows.subtree_end, sched)
    return tree_logprobs(hidden_btd, model.head_kernel(), tokens_bt, rows.parent,
                         model.cfg.vocab_chunk_size, temperature, entropy)


def _context_forward_logprobs(model, rows: StepBatch, tokens_bt, temperature: float,
                              entropy: bool):
    """forward_logprobs under a mesh with a 'context' axis of size C > 1 (mesh.context): the rows'
    q blocks are permuted in jit so that each context shard holds a balanced share
    (kat_jax.ops.context_parallel.context_layout), the forward and the log-probs run in that
    order with tokens split over 'context', and logp / entropy come back in the original order
    (exact; the host-built schedule, if any, is replaced by each shard's own)."""
    layout = context_layout(rows.subtree_end, model.cfg.attention_block_size, context_shards())
    perm = layout["token_perm"]
    mesh = jax.sharding.get_abstract_mesh()
    batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    split = lambda x: jax.lax.with_sharding_constraint(x, P(batch_axes or None, CONTEXT_AXIS))
    take = lambda x: split(jnp.take_along_axis(x, perm, axis=1))
    tokens_p = take(tokens_bt)
    hidden_btd = model(tokens_p, take(rows.positions), take(rows.subtree_end),
                       context_attention_schedule(layout))
    logp, ent = tree_logprobs(hidden_btd, model.head_kernel(), tokens_p,
                              split(permute_parent(rows.parent, layout)),
                              model.cfg.vocab_chunk_size, temperature, entropy)
    back = lambda x: None if x is None else jnp.take_along_axis(x, layout["token_inv"], axis=1)
    return back(logp), back(ent)


def microbatch_loss(graphdef: nnx.GraphDef, params: dict, mb: StepBatch, spec: LossSpec,
                    constrain: Callable[[jax.Array], jax.Array] | None = None):
    """(num, den, metrics) of one microbatch (fields [S, ...]). The entropy is computed only when
    spec.entropy asks for it (else the loss sees None)."""
    model = nnx.merge(graphdef, params)
    s, r, t = mb.tokens.shape
    logp_bt, ent_bt = forward_logprobs(model, merge_leading(mb), spec.temperature, constrain,
                                       spec.entropy)
    n, length = mb.traj_index.shape[1:]

    def per_trajectory(values_bt):  # traj_index is shard-local: gather per shard, merge shards
        snl = jax.vmap(gather_per_trajectory)(values_bt.reshape(s, r, t), mb.traj_index)
        return snl.reshape(s * n, length)

    ent = None if ent_bt is None else per_trajectory(ent_bt)
    return stage_loss(spec, per_trajectory(logp_bt), ent, merge_leading(mb))


def teacher_weight(spec: LossSpec, batch: StepBatch) -> jax.Array | None:
    """lambda of RFT's teacher SFT term (spec.teacher_coef > 0 and a batch with teacher tokens;
    else None). The objective is loss = num / den + teacher_coef * t_num / t_den, each term over
    the whole batch [M, S, ...] (every microbatch and shard), so the step differentiates
    num + lambda * t_num per microbatch and divides by the global den as it always does, with
    lambda = teacher_coef * den / t_den (0 when the batch has no teacher token). den is the stage
    loss's denominator, which depends on the batch's masks only (true of every registered loss):
    it is computed here by the loss on zero log-probs (no model pass); t_den counts the teacher
    tokens. A batch whose den is 0 is not applied (empty), teachers or not."""
    if not spec.teacher_coef or batch.teacher is None:
        return None

    def den_of(mb: StepBatch) -> jax.Array:
        mb = merge_leading(mb)
        zeros = jnp.zeros(mb.traj_index.shape, jnp.float32)
        return stage_loss(spec, zeros, zeros if spec.entropy else None, mb)[1]

    den = jnp.sum(jax.vmap(den_of)(batch))
    t_den = jnp.sum(batch.teacher.astype(jnp.float32))
    return jnp.where(t_den > 0, spec.teacher_coef * den / jnp.maximum(t_den, 1.0), 0.0)


def _sum_metrics(a: dict, b: dict) -> dict:
    return jax.tree.map(jnp.add, a, b)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, spec: LossSpec,
                    constrain: Callable[[jax.Array], jax.Array] | None = None):
    """The pure (state, batch) -> (state, metrics); jit it with shardings
    (kat_jax.training.build.jit_train_step)."""

    def loss_and_grad(params, mb, lam=None):
        def f(p):
            num, den, metrics = microbatch_loss(graphdef, p, mb, spec, constrain)
            if lam is not None:  # the teacher SFT term (teacher_weight)
                num = num + lam * metrics[TEACHER_METRIC][0]
            return num, (den, metrics)

        (num, (den, metrics)), grads = jax.value_and_grad(f, has_aux=True)(params)
        return num, den, metrics, grads

    def train_step(state: dict, batch: StepBatch) -> tuple[dict, dict]:
        params = state["params"]
        lam = teacher_weight(spec, batch)
        first = jax.tree.map(lambda x: x[0], batch)
        num0, den0, met0, g0 = loss_and_grad(params, first, lam)

        def body(carry, mb):
            num, den, met, grads = carry
            n, d, m, g = loss_and_grad(params, mb, lam)
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
    """(params, batch) -> {"loss": (num, den), metric: (num, den), ...}: sums, so a caller
    averages over batches."""

    def eval_step(params: dict, batch: StepBatch) -> dict:
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
