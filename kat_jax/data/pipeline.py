"""The input pipeline: JSONL groups -> trajectories -> fixed-shape packed tree batches per step.

    grain.MapDataset.source(JsonlGroups) -> shuffle(seed) -> repeat(epochs)
      -> per global shard s of S: [s::S] -> map(records -> list[Trajectory]) -> iterator
                                                             (grain: deterministic, checkpointable)
    -> TreeBatcher (one per shard this host feeds): groups packed into shard batches of R rows x
       T tokens, N trajectories (kat_jax.trees.batch.StepBatch)
    -> StepIterator: M microbatches x S_local shards, stacked into one StepBatch [M, S_local, ...]

A step's global batch depends only on the data, the seed and S, not on how many hosts share it.

Shapes are fixed by the config (data.rows, data.row_len, data.trajectories per shard batch), so the
train step compiles once. Groups are packed greedily in order; a group that does not fit the current
shard batch waits for the next one (never dropped). A trajectory longer than a row cannot be laid
out and is dropped, counted in `dropped_overlong` and logged with its id (never silently); RL
trajectories with status env_error are excluded and counted in `excluded_env_error`.

State (saved in checkpoints): per shard, the grain iterator state from before the first group still
waiting to be packed, so a restored iterator yields exactly the batches the original would have.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from typing import Any

import numpy as np

from kat_jax.data.chat import ChatError, encode_chat
from kat_jax.data.records import per_token_array, tag_array
from kat_jax.data.sources import VALIDATORS, JsonlGroups
from kat_jax.trees.batch import StepBatch, empty_step_batch, stack_step_batches
from kat_jax.trees.packing import PackedTrees, attention_schedule, pack_trie, schedule_length
from kat_jax.trees.trajectory import Trajectory
from kat_jax.trees.trie import build_trie

log = logging.getLogger(__name__)

STAGE_KIND = {"mid": "mid", "sft": "chat", "rft": "rollouts", "rl": "rollouts"}


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """The fixed shape of one shard batch (so the train step compiles once)."""

    rows: int  # R rows per shard batch
    row_len: int  # T tokens per row (also the longest trajectory)
    trajectories: int  # N trajectory slots per shard batch
    block_size: int  # attention block size (for the schedule)
    fields: tuple[str, ...] = ()  # optional StepBatch fields every batch carries
    # Pruning on the training path (config prune.*; None = off): each group's trie goes through
    # the entropy pruner (kat_jax.trees.pruning) under prune.budget tokens before packing
    prune: Any = None
    # rl: how a group's rewards become advantages when records carry none (config
    # loss.advantage_estimator): grpo ((r - mean) / unbiased std), drgrpo (r - mean), rloo
    advantage: str = "grpo"

    @property
    def num_pairs(self) -> int:
        """Schedule length (kat_jax.trees.packing.schedule_length)."""
        return schedule_length(self.row_len, self.block_size)


def _group_advantages(trajs: list[Trajectory], rewards: list[float | None],
                      teacher: list[bool], stage: str, eps: float = 1e-6,
                      estimator: str = "grpo") -> None:
    """Fill missing advantages: rl -> by `estimator`: grpo (r - mean) / (std + eps) over the
    group, drgrpo r - mean (Dr. GRPO), rloo r_i - mean of the others (leave-one-out; a group of
    one is an error); rft -> reward relative to the group's teacher trajectories,
    (r - mean teacher r) / (std + eps). std is the unbiased sample std (ddof 1, as the online
    loop's kat_jax.flow manager); a group of one or of equal rewards is not divided.
    Trajectories that already carry an advantage keep it."""
    need = [i for i, t in enumerate(trajs) if t.advantage is None and not teacher[i]]
    if not need:
        return
    r = np.array([rewards[i] for i in range(len(trajs)) if not teacher[i]], np.float64)
    std = float(r.std(ddof=1)) if r.size > 1 else 0.0
    if stage == "rft" and any(teacher):
        base = float(np.mean([rewards[i] for i in range(len(trajs)) if teacher[i]]))
    else:
        base = float(r.mean())
    if stage == "rl" and estimator == "rloo":
        if r.size < 2:
            raise ValueError(f"group {trajs[need[0]].group_id!r}: loss.advantage_estimator=rloo "
                             "needs at least 2 trajectories per group")
        for i in need:
            trajs[i].advantage = rewards[i] - (float(r.sum()) - rewards[i]) / (r.size - 1)
        return
    if stage == "rl" and estimator not in ("grpo", "drgrpo"):
        raise ValueError(f"unknown advantage estimator {estimator!r}")
    divide = std > 0 and not (stage == "rl" and estimator == "drgrpo")
    for i in need:
        trajs[i].advantage = (rewards[i] - base) / (std + eps) if divide else rewards[i] - base


# Record fields that fill the optional StepBatch log-prob fields (rollout records).
RECORD_FIELD = {"behaviour_logprobs": "logprobs", "old_logprobs": "old_logprobs",
                "ref_logprobs": "ref_logprobs"}


def missing_field(where: str, field: str, why: dict[str, str]) -> ValueError:
    """The error for a record without the key that fills the StepBatch `field`, naming the record's
    file:line and the config key that needs it (why[field])."""
    return ValueError(f"{where}: no '{RECORD_FIELD[field]}' in the record, which "
                      f"{why.get(field, 'this run')} needs")


class RecordConverter(abc.ABC):
    """records of one group -> list[Trajectory] (a picklable grain map function). Subclasses
    convert one data kind; CONVERTERS maps kinds to them.

    fields: the optional StepBatch fields the batches carry; a record that cannot fill one is an
    error naming its file:line and `why[field]` (the config key that needs it)."""

    def __init__(self, stage: str, tokenizer, row_len: int, vocab_size: int,
                 fields: tuple[str, ...] = (), why: dict[str, str] | None = None,
                 advantage: str = "grpo"):
        self.stage, self.tok, self.row_len, self.vocab = stage, tokenizer, row_len, vocab_size
        self.fields, self.why = tuple(fields), dict(why or {})
        self.advantage = advantage

    @abc.abstractmethod
    def __call__(self, group: list[tuple[dict, str]]) -> list[Trajectory | None]:
        """The group's trajectories, in order (None for an excluded record)."""

    def _checked(self, t: Trajectory, where: str) -> Trajectory:
        try:
            t.validate(self.vocab)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        return t


class MidConverter(RecordConverter):
    """{"text"} or {"tokens"} documents -> chains of at most row_len tokens."""

    def __call__(self, group):
        out = []
        for obj, where in group:
            ids = obj["tokens"] if "tokens" in obj else self.tok.encode(obj["text"]) + [
                self.tok.eos_id]
            for c, start in enumerate(range(0, len(ids), self.row_len)):
                piece = ids[start:start + self.row_len]
                if len(piece) >= 2:
                    out.append(self._checked(
                        Trajectory(np.asarray(piece), id=f"{obj.get('id', where)}#{c}"), where))
        return out


class ChatConverter(RecordConverter):
    """OpenAI-style chat transcripts -> Qwen-format trajectories (kat_jax.data.chat)."""

    def __call__(self, group):
        out = []
        for obj, where in group:
            try:
                t = encode_chat(self.tok, obj["messages"], obj.get("tools"),
                                id=obj.get("id", where))
            except ChatError as e:
                raise ValueError(f"{where}: {e}") from None
            out.append(self._checked(t, where))
        return out


class RolloutConverter(RecordConverter):
    """Scored rollouts -> trajectories with behaviour (and, as `fields` ask, old-policy and
    reference) log-probs and advantages (missing ones from the group's rewards). env_error
    rollouts become None (excluded and counted by the batcher); teacher rollouts serve as the
    rft baseline, and are dropped then unless the batches carry the 'teacher' field (RFT's
    rl.teacher_loss=sft): then they stay in their group's tree as teacher trajectories (their
    generated tokens, "logprobs" not null, take the teacher SFT term; never the policy loss)."""

    def __call__(self, group):
        out: list[Trajectory | None] = []
        rewards, teacher = [], []
        for obj, where in group:
            if obj.get("status") == "env_error":
                out.append(None)
                continue
            gen = np.array([x is not None for x in obj["logprobs"]])
            per_token = {}
            for f in self.fields:
                if f in RECORD_FIELD:
                    values = per_token_array(obj, RECORD_FIELD[f])
                    if values is None:
                        raise missing_field(where, f, self.why)
                    per_token[f] = values
            is_teacher = bool(obj.get("teacher", False))
            as_teacher = is_teacher and "teacher" in self.fields
            t = Trajectory(np.asarray(obj["tokens"]), trainable=gen & (as_teacher or not is_teacher),
                           tags=tag_array(obj), entropies=per_token_array(obj, "entropies"),
                           reward=obj.get("reward"), advantage=obj.get("advantage"),
                           group_id=obj.get("group"), id=obj.get("id", where),
                           teacher=as_teacher, **per_token)
            out.append(self._checked(t, where))
            rewards.append(obj.get("reward") if obj.get("reward") is not None else 0.0)
            teacher.append(is_teacher)
        kept = [t for t in out if t is not None]
        _group_advantages(kept, rewards, teacher, self.stage, estimator=self.advantage)
        return [t for t, te in zip(kept, teacher) if t.teacher or not te] + [None] * (
            len(out) - len(kept))


# Data kind -> converter class, registered explicitly (with each kind's record check in
# kat_jax.data.sources.VALIDATORS); a new kind is added with register_data_kind.
CONVERTERS: dict[str, type[RecordConverter]] = {
    "mid": MidConverter,
    "chat": ChatConverter,
    "rollouts": RolloutConverter,
}


def register_data_kind(kind: str, check, converter: type[RecordConverter]) -> None:
    """A new data kind: `check(obj, where)` validates one record up front (raise ValueError
    starting with `where`), `converter` turns a group of records into trajectories."""
    if kind in CONVERTERS or kind in VALIDATORS:
        raise ValueError(f"data kind {kind!r} is already registered")
    VALIDATORS[kind] = check
    CONVERTERS[kind] = converter


def check_record_fields(source, fields: tuple[str, ...], why: dict[str, str]) -> None:
    """Before training: every record of a rollouts source carries the record keys that `fields`
    need (an error names the first file:line without one, and the config key that needs it)."""
    needed = [(f, RECORD_FIELD[f]) for f in fields if f in RECORD_FIELD and f != "behaviour_logprobs"]
    if not needed or getattr(source, "kind", None) != "rollouts":
        return
    for i in range(len(source)):
        for obj, where in source[i]:
            if obj.get("status") == "env_error":
                continue
            for f, key in needed:
                if obj.get(key) is None:
                    raise missing_field(where, f, why)


class TreeBatcher:
    """Packs groups of trajectories into fixed-shape shard batches (numpy StepBatches)."""

    def __init__(self, groups_iter, shape: BatchShape, pad_id: int = 0,
                 epoch_groups: int | None = None):
        self.it = groups_iter
        # groups in one pass over this batcher's data (E): 2E - 1 groups in a row with nothing
        # to train on (every trajectory overlong or env_error) hold a whole pass, whatever the
        # shuffle of each pass, so none ever will and a run on repeated data would spin
        # forever: an error naming data.row_len instead
        self.epoch_groups = epoch_groups
        self._barren = 0  # groups in a row that gave nothing
        self._longest = 0
        self.shape = shape
        self.pad_id = pad_id
        # (trajectories, iterator state before their group, how many of the group came before)
        self.pending: list[tuple[list[Trajectory], Any, int]] = []
        self.exhausted = False
        self._skip = 0
        self.counters = {"dropped_overlong": 0, "excluded_env_error": 0, "packed": 0}
        self._kept: dict[int, int] = {}  # id(trajectory) -> tokens the pruner keeps

    def get_state(self) -> dict:
        """{"grain": iterator state before the first waiting group, "skip": trajectories of that
        group already packed, "counters": ...} (JSON-serialisable)."""
        if self.pending:
            _, state, offset = self.pending[0]
        else:
            state, offset = self.it.get_state(), 0
        return {"grain": state, "skip": offset, "counters": dict(self.counters)}

    def set_state(self, state: dict) -> None:
        self.it.set_state(state["grain"])
        self._skip = int(state.get("skip", 0))
        self.counters.update(state.get("counters", {}))
        self.pending = []
        self.exhausted = False

    def _fetch(self) -> tuple[list[Trajectory], Any, int] | None:
        if self.pending:
            return self.pending.pop(0)
        if self.exhausted:
            return None
        state = self.it.get_state()
        try:
            group = next(self.it)
        except StopIteration:
            self.exhausted = True
            return None
        trajs = []
        for t in group:
            if t is None:
                self.counters["excluded_env_error"] += 1
            elif len(t) > self.shape.row_len:
                self.counters["dropped_overlong"] += 1
                log.warning("dropped %s: %d tokens exceed the row length %d", t.name(), len(t),
                            self.shape.row_len)
            else:
                trajs.append(t)
        if trajs:
            self._barren = 0
        else:
            self._barren += 1
            self._longest = max([self._longest] + [len(t) for t in group if t is not None])
            if self.epoch_groups is not None and self._barren >= 2 * self.epoch_groups - 1:
                raise ValueError(
                    f"nothing to train on in a whole pass over the data ({self._barren} groups "
                    f"in a row): every trajectory is longer than --config.data.row_len="
                    f"{self.shape.row_len} (the longest has {self._longest} tokens) or an "
                    f"env_error rollout; raise data.row_len")
        if self.shape.prune is not None and trajs:
            self._prune_group(trajs)
        skip, self._skip = self._skip, 0  # restored mid-group: its first `skip` were packed
        # A group with more trajectories than a shard batch holds is split (in order).
        n = self.shape.trajectories
        parts = [(trajs[i:i + n], state, i) for i in range(skip, len(trajs), n)] or [([], state, 0)]
        self.pending[:0] = parts[1:]
        return parts[0]

    def _prune_group(self, trajs: list[Trajectory]) -> None:
        """Per trajectory of one group, the length of the prefix the pruner keeps under
        prune.budget (self._kept, by object id). A budget that cannot hold the group's shared
        prompt would keep nothing of it: an error naming the key."""
        from kat_jax.trees.pruning import kept_lengths, prune_group

        cfg = self.shape.prune
        trie = build_trie(trajs)
        roots = [n for n in range(trie.num_nodes) if trie.node_parent[n] < 0]
        if len(roots) == 1 and trie.node_len[roots[0]] > cfg.budget:
            raise ValueError(f"--config.prune.budget={cfg.budget} is below the shared prompt of "
                             f"group {trajs[0].group_id!r} ({int(trie.node_len[roots[0]])} "
                             "tokens): nothing of it could be trained; raise prune.budget")
        keep, _ = prune_group(trie, cfg)
        for t, n_kept in zip(trajs, kept_lengths(trie, keep)):
            self._kept[id(t)] = n_kept

    def _keep_mask(self, trie) -> np.ndarray | None:
        """The combined trie's keep mask from each trajectory's kept prefix (closed under
        ancestors: a node is kept when a trajectory through it keeps all of its tokens)."""
        if self.shape.prune is None:
            return None
        keep = np.zeros(trie.num_nodes, bool)
        for k, t in enumerate(trie.trajectories):
            kept = self._kept[id(t)]
            for n in trie.traj_path[k]:
                if trie.node_depth[n] + trie.node_len[n] > kept:
                    break
                keep[n] = True
        return keep

    def _group_tokens(self, group: list[Trajectory]) -> int:
        """Tokens the group costs in rows (after pruning)."""
        trie = build_trie(group)
        keep = self._keep_mask(trie)
        return trie.tree_tokens if keep is None else int(trie.node_len[keep].sum())

    def _pack(self, trajs: list[Trajectory]) -> PackedTrees:
        s = self.shape
        trie = build_trie(trajs)
        keep = self._keep_mask(trie)
        return pack_trie(trie, s.row_len, num_rows=s.rows, num_traj=s.trajectories,
                         traj_len=s.row_len, pad_id=self.pad_id,
                         attention_block_size=s.block_size, schedule_pairs=s.num_pairs,
                         keep=keep, fields=s.fields)

    def next_batch(self) -> tuple[StepBatch, dict[str, int]] | None:
        """One shard batch and its token statistics; None when the data is exhausted."""
        s = self.shape
        taken: list[tuple[list[Trajectory], Any, int]] = []
        n_traj, tokens = 0, 0
        while True:
            item = self._fetch()
            if item is None:
                break
            group = item[0]
            if not group:
                continue
            g_tokens = self._group_tokens(group)
            if taken and (n_traj + len(group) > s.trajectories
                          or tokens + g_tokens > s.rows * s.row_len):
                self.pending.insert(0, item)
                break
            taken.append(item)
            n_traj += len(group)
            tokens += g_tokens
        if not taken:
            return None
        while True:
            trajs = [t for g, _, _ in taken for t in g]
            try:
                tb = self._pack(trajs)
                break
            except ValueError:
                if len(taken) == 1:  # one group that needs more rows: split it in halves
                    group, state, offset = taken[0]
                    half = len(group) // 2
                    if half == 0:
                        raise
                    taken = [(group[:half], state, offset)]
                    self.pending.insert(0, (group[half:], state, offset + half))
                else:
                    self.pending.insert(0, taken.pop())
        self.counters["packed"] += len(trajs)
        for t in trajs:
            self._kept.pop(id(t), None)
        unpruned = build_trie(trajs).tree_tokens if s.prune is not None else tb.tree_tokens
        stats = {"total_tokens": tb.total_tokens, "computed_tokens": tb.laid_out_tokens,
                 "tree_tokens": unpruned, "kept_tokens": tb.tree_tokens,
                 "trajectories": len(trajs)}
        return tb.batch, stats

    def empty_batch(self) -> StepBatch:
        """A shard batch of padding only (no loss terms): fills the shards of a last step. Its
        schedule is the padding rows' own (each token sees itself), as packed rows have."""
        s = self.shape
        empty = empty_step_batch(s.rows, s.row_len, s.trajectories, s.row_len, s.fields,
                                 s.num_pairs, self.pad_id)
        return empty.replace(schedule=attention_schedule(empty.subtree_end, s.block_size,
                                                         s.num_pairs))


class StepIterator:
    """Yields (StepBatch [M, S_local, ...], stats) per train step; checkpointable.

    One TreeBatcher per local shard: global shard s of S reads its own stream (every S-th group,
    starting at s), so a step's global batch is the same however the shards are spread over
    hosts (1 process x S shards or P processes x S/P shards)."""

    def __init__(self, batchers: list[TreeBatcher], microbatches: int, shard_ids: list[int],
                 num_shards: int, pad_exhausted: bool = False,
                 count_shard_ids: list[int] | None = None):
        if len(batchers) != len(shard_ids):
            raise ValueError(f"{len(batchers)} batchers for {len(shard_ids)} shards")
        self.batchers, self.m = batchers, microbatches
        self.shard_ids, self.num_shards = list(shard_ids), num_shards
        # Statistics (tokens, trajectories, counters) come from these shards only: when hosts
        # share shards, each shard is counted by one host, so sums over hosts count it once.
        counted = set(self.shard_ids if count_shard_ids is None else count_shard_ids)
        self._counted = [sid in counted for sid in self.shard_ids]
        # Multi-host: a host whose streams are done keeps yielding padding (stats["exhausted"]=1)
        # so that every host runs the same steps; the trainer stops when all hosts are exhausted.
        self.pad_exhausted = pad_exhausted

    @property
    def counters(self) -> dict[str, int]:
        out: dict[str, int] = {k: 0 for k in self.batchers[0].counters}
        for b, counted in zip(self.batchers, self._counted):
            if not counted:
                continue
            for k, v in b.counters.items():
                out[k] = out.get(k, 0) + v
        return out

    def get_state(self) -> dict:
        return {"num_shards": self.num_shards, "shard_ids": self.shard_ids,
                "shards": [b.get_state() for b in self.batchers]}

    def set_state(self, state: dict) -> None:
        if "shards" not in state:
            raise ValueError("data iterator state: not a per-shard state (saved by an older "
                             "kat_jax?); start a new workdir")
        if state.get("num_shards") != self.num_shards or state.get("shard_ids") != self.shard_ids:
            raise ValueError(
                f"data iterator state: saved for shards {state.get('shard_ids')} of "
                f"{state.get('num_shards')}, but this process feeds shards {self.shard_ids} of "
                f"{self.num_shards}; resume with the same data.shards, mesh and process count")
        for b, st in zip(self.batchers, state["shards"], strict=True):
            b.set_state(st)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[StepBatch, dict[str, int]]:
        shards, stats = [], {"total_tokens": 0, "computed_tokens": 0, "tree_tokens": 0,
                             "kept_tokens": 0, "trajectories": 0}
        got_any = False
        for _ in range(self.m):
            for b, counted in zip(self.batchers, self._counted):
                got = b.next_batch()
                if got is None:  # this shard's stream is exhausted: padding only
                    shards.append(b.empty_batch())
                    continue
                got_any = True
                arrays, st = got
                shards.append(arrays)
                if counted:
                    for k in stats:
                        stats[k] += st[k]
        if not got_any and not self.pad_exhausted:
            raise StopIteration
        stats["exhausted"] = int(not got_any)
        stats.update(self.counters)
        return stack_step_batches(shards, self.m, len(self.batchers)), stats


def make_step_iterator(files: list[str] | Any, stage: str, tokenizer, shape: BatchShape,
                       vocab_size: int, microbatches: int, local_shards: int, seed: int = 0,
                       shuffle: bool = True, epochs: int | None = None,
                       shard_ids: list[int] | None = None, num_shards: int | None = None,
                       pad_exhausted: bool = False,
                       count_shard_ids: list[int] | None = None,
                       why: dict[str, str] | None = None) -> StepIterator:
    """The whole pipeline for one stage. epochs=None repeats forever (train.steps decides).
    files: JSONL paths, or a source object (e.g. kat_jax.data.seqio_source.SeqioGroups).
    num_shards: the global shard batches per microbatch (default local_shards); shard_ids: which of
    them this process feeds, in the order of its local data (default 0..local_shards-1). Shard s
    reads groups s, s+S, s+2S, ... of the shuffled, repeated dataset. pad_exhausted,
    count_shard_ids: see StepIterator (for multi-host runs)."""
    import grain

    num_shards = local_shards if num_shards is None else int(num_shards)
    shard_ids = list(range(local_shards)) if shard_ids is None else [int(i) for i in shard_ids]
    if len(shard_ids) != local_shards or not all(0 <= i < num_shards for i in shard_ids):
        raise ValueError(f"shard_ids {shard_ids}: need {local_shards} ids in [0, {num_shards})")
    if isinstance(files, (list, tuple)):
        source = JsonlGroups(list(files), STAGE_KIND[stage])
    else:
        source = files
        if source.kind != STAGE_KIND[stage]:
            raise ValueError(f"stage {stage!r} reads {STAGE_KIND[stage]!r} data; the source gives "
                             f"{source.kind!r}")
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(epochs)
    convert = CONVERTERS[STAGE_KIND[stage]](stage, tokenizer, shape.row_len, vocab_size,
                                            shape.fields, why, shape.advantage)
    batchers = []
    for sid in shard_ids:
        part = ds[sid::num_shards] if num_shards > 1 else ds
        it = iter(part.map(convert).to_iter_dataset())
        batchers.append(TreeBatcher(it, shape, pad_id=tokenizer.pad_id,
                                    epoch_groups=None if epochs is not None
                                    else -(-len(source) // num_shards)))
    return StepIterator(batchers, microbatches, shard_ids, num_shards, pad_exhausted,
                        count_shard_ids)
