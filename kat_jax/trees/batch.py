"""StepBatch: the one typed input of the train, eval and scoring steps, from the packer to the loss.

A StepBatch is a registered pytree (flax.struct dataclass): jit, shardings, tree.map and orbax see
its array fields as leaves; an optional field that is None is simply absent from the tree, so the
set of optional fields a run provides is part of its compiled signature (fixed per run by the
config, see kat_jax.data.pipeline.BatchShape.fields).

The packer (kat_jax.trees.packing.pack_trie) builds one per shard batch with numpy arrays; the data
pipeline stacks them into [M, S, ...] (M microbatches, S data shards: `stack_step_batches`); the
step and the losses read attributes. Shapes below omit those leading axes.

Rows: R rows of T tokens, a packed forest in depth-first pre-order (ARCHITECTURE.md):
    tokens, positions, parent, subtree_end   int32[R, T]   (positions = depth; parent -1 at a root)
    schedule                                 AttentionSchedule of int32[R, P] or None: the
                                             block-sparse attention pairs (None: computed on device)
Per trajectory: N slots of L tokens (padding slots are all False / 0):
    traj_index          int32[N, L]    row-local flat index row * T + column of token j of
                                       trajectory k (its primary placement); -1 past the end or
                                       where pruned
    valid               bool[N, L]     the token exists and was laid out
    trainable           bool[N, L]     a loss applies (generated tokens, j >= 1, not pruned)
    advantage           float32[N]     0 for stages without advantages
Optional (None when the batch does not carry them):
    pruned              bool[N, L]     trainable tokens removed by pruning (the keep mask's
                                       complement; the denominators may count them:
                                       loss.count_pruned_in_denominator)
    behaviour_logprobs  float32[N, L]  log-probs of the sampling (behaviour) policy
    old_logprobs        float32[N, L]  log-probs of the old policy of the PPO ratio when they differ
                                       from the behaviour ones (then truncated importance weights
                                       min(exp(old - behaviour), tis_cap) correct the mismatch)
    ref_logprobs        float32[N, L]  log-probs of the reference policy (KL penalty)
    teacher             bool[N, L]     the assistant tokens of teacher (demonstration) trajectories
                                       (RFT, rl.teacher_loss=sft): they take the teacher SFT term;
                                       a teacher trajectory has no trainable token
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import struct

# Per-trajectory fields a batch may or may not carry (float log-probs, except the pruning mask).
OPTIONAL_FIELDS = ("pruned", "behaviour_logprobs", "old_logprobs", "ref_logprobs", "teacher")
MASK_FIELDS = ("pruned", "teacher")  # the bool ones
LOGPROB_FIELDS = ("behaviour_logprobs", "old_logprobs", "ref_logprobs")


@struct.dataclass
class AttentionSchedule:
    """Block pairs a row's attention visits: int32[R, P] each (kat_jax.ops.block_sparse).
    q_block / k_block: the pair's block indices; kind: 0 padding (skipped), 1 partial, 2 full."""

    q_block: Any
    k_block: Any
    kind: Any

    def as_dict(self) -> dict[str, Any]:
        """The form the attention kernels take."""
        return {"q_block": self.q_block, "k_block": self.k_block, "kind": self.kind}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AttentionSchedule:
        return cls(q_block=d["q_block"], k_block=d["k_block"], kind=d["kind"])


@struct.dataclass
class StepBatch:
    """See the module docstring for every field's shape and meaning."""

    tokens: Any
    positions: Any
    parent: Any
    subtree_end: Any
    traj_index: Any
    valid: Any
    trainable: Any
    advantage: Any
    schedule: AttentionSchedule | None = None
    pruned: Any = None
    behaviour_logprobs: Any = None
    old_logprobs: Any = None
    ref_logprobs: Any = None
    teacher: Any = None

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[-2]

    @property
    def row_len(self) -> int:
        return self.tokens.shape[-1]

    @property
    def fields(self) -> tuple[str, ...]:
        """The optional per-trajectory fields this batch carries."""
        return tuple(f for f in OPTIONAL_FIELDS if getattr(self, f) is not None)


def empty_step_batch(rows: int, row_len: int, trajectories: int, traj_len: int,
                     fields: tuple[str, ...] = (), schedule_pairs: int | None = None,
                     pad_id: int = 0) -> StepBatch:
    """A batch of padding only (no loss terms): every token its own one-token tree, no trajectory.
    fields: the optional fields to carry (zeros); schedule_pairs: an all-padding schedule of that
    length (None: no schedule)."""
    unknown = set(fields) - set(OPTIONAL_FIELDS)
    if unknown:
        raise ValueError(f"unknown StepBatch fields {sorted(unknown)}; known: {OPTIONAL_FIELDS}")
    idx = np.arange(row_len, dtype=np.int32)
    n, length = trajectories, traj_len
    opt: dict[str, np.ndarray] = {}
    for f in fields:
        opt[f] = np.zeros((n, length), bool if f in MASK_FIELDS else np.float32)
    sched = None
    if schedule_pairs is not None:
        z = np.zeros((rows, schedule_pairs), np.int32)
        sched = AttentionSchedule(z, z.copy(), z.copy())
    return StepBatch(
        tokens=np.full((rows, row_len), pad_id, np.int32),
        positions=np.zeros((rows, row_len), np.int32),
        parent=np.full((rows, row_len), -1, np.int32),
        subtree_end=np.broadcast_to(idx + 1, (rows, row_len)).copy(),
        traj_index=np.full((n, length), -1, np.int32),
        valid=np.zeros((n, length), bool),
        trainable=np.zeros((n, length), bool),
        advantage=np.zeros(n, np.float32),
        schedule=sched, **opt)


def stack_step_batches(batches: list[StepBatch], *leading: int) -> StepBatch:
    """numpy-stack batches of one structure into leading axes, e.g. (M, S) for a train step:
    batches[m * S + s] lands at [m, s]."""
    if not batches:
        raise ValueError("stack_step_batches: no batches")
    if int(np.prod(leading)) != len(batches):
        raise ValueError(f"{len(batches)} batches cannot fill leading axes {leading}")
    fields = batches[0].fields
    for b in batches[1:]:
        if b.fields != fields:
            raise ValueError(f"batches carry different optional fields: {fields} vs {b.fields}")
    return jax.tree.map(lambda *xs: np.stack(xs).reshape(*leading, *xs[0].shape), *batches)


def merge_leading(batch: StepBatch) -> StepBatch:
    """Merge the first two axes of every field ([S, R, T] -> [S * R, T], [S, N] -> [S * N]).
    traj_index stays row-local: gather per shard (vmap) before merging."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), batch)
