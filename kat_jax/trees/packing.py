"""Packing prefix tries into fixed-length rows: the StepBatch of kat_jax.trees.batch.

A row is a forest laid out in depth-first pre-order (ARCHITECTURE.md). Per token i of a row:
    tokens[i], positions[i] (depth), parent[i] (-1 at a root), subtree_end[i].
Padding tokens are their own one-token trees (parent -1, subtree_end = i + 1): they see only
themselves, so no query ever has an empty softmax and padding never yields NaN.

Several trees share a row when they fit (first-fit decreasing). Row lengths are bucketed (2^k and
1.5 * 2^k) so a run compiles a handful of shapes.

Split rule (exact). A tree larger than a row is cut into *pieces*. A piece is a context path (ancestor
nodes, repeated as zero-weight context) followed by a node and those of its child subtrees that fit
whole, greedily in child order; every child subtree that does not fit becomes a piece of its own whose
context is the context path plus that node, and is split again if needed. Every node is laid out once
as *primary* (where its tokens carry loss weight and where the gather map points) and possibly again as
context in later pieces; in every piece each token sees exactly its ancestors, so every log-prob and
gradient equals the unsplit computation. A piece always fits when rows are at least as long as the
longest trajectory, which `pack_trajectories` ensures; otherwise the error names the trajectory.

The gather map traj_index[k, j] = row * T + column of token j of trajectory k (its primary
placement), -1 past the trajectory's end, recovers any per-trajectory quantity from the rows.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from kat_jax.trees.batch import LOGPROB_FIELDS, OPTIONAL_FIELDS, AttentionSchedule, StepBatch
from kat_jax.trees.trajectory import Trajectory
from kat_jax.trees.trie import Trie, build_trie

MIN_BUCKET = 16


def bucket_length(n: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest bucket >= max(n, minimum); buckets are 2^k and 1.5 * 2^k (16, 24, 32, 48, 64, ...),
    so a run compiles a handful of row shapes and padding stays under a third of a row."""
    n = max(int(n), minimum, 1)
    p = 1 << (n - 1).bit_length()  # smallest power of two >= n
    three_quarters = 3 * p // 4
    return three_quarters if n <= three_quarters and three_quarters % 2 == 0 else p


def assign_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: lists of item indices whose total length fits `capacity`.

    An item longer than `capacity` gets a row of its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        for r, f in enumerate(free):
            if n <= f:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(max(0, capacity - n))
    return rows


def empty_rows(num_rows: int, row_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    idx = np.arange(row_len, dtype=np.int32)
    return dict(
        tokens=np.full((num_rows, row_len), pad_id, np.int32),
        positions=np.zeros((num_rows, row_len), np.int32),
        parent=np.full((num_rows, row_len), -1, np.int32),
        subtree_end=np.broadcast_to(idx + 1, (num_rows, row_len)).copy(),
    )


def schedule_length(row_len: int, block_size: int) -> int:
    """A fixed schedule length for rows of row_len tokens: every lower-triangular block pair,
    rounded up to a multiple of 16 (and so of the block-sparse scan's step); entries past a row's
    own pairs are skipped padding. Fixed shapes: the train step compiles once."""
    from kat_jax.ops.attention import effective_block_size

    nb = -(-row_len // effective_block_size(block_size, row_len))
    return -(-(nb * (nb + 1) // 2) // 16) * 16


def attention_schedule(subtree_end: np.ndarray, block_size: int,
                       num_pairs: int | None = None) -> AttentionSchedule:
    """The block-sparse attention schedule of rows (block = ops.attention.effective_block_size),
    exactly as long as the rows need (num_pairs None) or padded / trimmed to num_pairs pairs (the
    fixed length of schedule_length). Training and scoring both build their schedules here."""
    from kat_jax.ops.attention import effective_block_size
    from kat_jax.ops.block_sparse import build_block_schedule

    row_len = subtree_end.shape[-1]
    bs = effective_block_size(block_size, row_len)
    sched = build_block_schedule(subtree_end, bs, min_pairs=1 if num_pairs else 8)
    if num_pairs is not None:
        width = sched["kind"].shape[1]
        if width >= num_pairs:
            if sched["kind"][:, num_pairs:].any():
                raise ValueError(f"rows need more than {num_pairs} attention block pairs")
            sched = {k: np.ascontiguousarray(v[:, :num_pairs]) for k, v in sched.items()}
        else:
            sched = {k: np.pad(v, ((0, 0), (0, num_pairs - width))) for k, v in sched.items()}
    return AttentionSchedule.from_dict(sched)


@dataclasses.dataclass
class PackedTrees:
    """What pack_trie returns: the StepBatch (numpy) and host-side facts about the layout.

    primary: bool[R, T], True where a token is laid out as itself (False for padding and for
    ancestors repeated as context in split pieces). total_tokens: sum of trajectory lengths;
    tree_tokens: distinct prefixes laid out (each computed once; after pruning if any);
    laid_out_tokens: non-padding tokens in the rows (tree tokens + repeated context); dropped: ids
    of trajectories left out (pack_trajectories with drop_overlong); used_rows: rows holding
    tokens (the rest of the R rows are padding)."""

    batch: StepBatch
    primary: np.ndarray
    used_rows: int = 0
    total_tokens: int = 0
    tree_tokens: int = 0
    laid_out_tokens: int = 0
    dropped: list = dataclasses.field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return self.batch.num_rows

    @property
    def row_len(self) -> int:
        return self.batch.row_len


@dataclasses.dataclass
class _Piece:
    context: list[int]  # ancestor nodes repeated as context (root first)
    root: int
    included: list[int]  # children of root whose whole subtrees are in this piece
    size: int


def kept_structure(trie: Trie, keep: np.ndarray | None) -> tuple[list[list[int]], np.ndarray,
                                                                 list[int]]:
    """(children, subtree tokens, roots) of the kept part of the trie (all of it when keep is None).
    keep must be closed under ancestors."""
    if keep is None:
        return trie.children, trie.node_subtree_tokens, trie.roots
    keep = np.asarray(keep, bool)
    par = trie.node_parent
    bad = np.flatnonzero(keep & (par >= 0) & ~keep[np.maximum(par, 0)])
    if bad.size:
        raise ValueError(f"keep mask: node {int(bad[0])} is kept but its parent is not")
    children = [[c for c in ch if keep[c]] for ch in trie.children]
    sub = np.where(keep, trie.node_len, 0).astype(np.int64)
    for n in range(trie.num_nodes - 1, 0, -1):
        if par[n] >= 0 and keep[n]:
            sub[par[n]] += sub[n]
    return children, sub, [r for r in trie.roots if keep[r]]


def make_pieces(trie: Trie, capacity: int, structure: tuple | None = None) -> list[_Piece]:
    """Cut the trie's trees into pieces of at most `capacity` tokens (see the module docstring).
    structure: kept_structure(trie, keep) to lay out only kept nodes (default: all nodes)."""
    children, sub, roots = structure or kept_structure(trie, None)
    nlen = trie.node_len
    pieces: list[_Piece] = []
    todo: list[tuple[list[int], int]] = [([], r) for r in reversed(roots)]
    while todo:
        ctx, root = todo.pop()
        ctx_len = int(sum(nlen[c] for c in ctx))
        if ctx_len + sub[root] <= capacity:
            pieces.append(_Piece(ctx, root, list(children[root]), int(ctx_len + sub[root])))
            continue
        used = ctx_len + int(nlen[root])
        if used > capacity:
            k = trie.node_rep[root]
            raise ValueError(f"{trie.trajectories[k].name()}: its path needs "
                             f"{used} tokens, more than the row capacity {capacity}")
        included, deferred = [], []
        for c in children[root]:
            if used + sub[c] <= capacity:
                included.append(c)
                used += int(sub[c])
            else:
                deferred.append(c)
        pieces.append(_Piece(ctx, root, included, used))
        todo.extend((ctx + [root], c) for c in reversed(deferred))
    return pieces


def _layout_piece(trie: Trie, piece: _Piece, rows: dict[str, np.ndarray], r: int, start: int,
                  node_flat: np.ndarray, row_len: int, children: list[list[int]],
                  sub: np.ndarray) -> int:
    """Write a piece at row r from column `start`; record primary placements in node_flat."""
    nlen = trie.node_len
    end_of_piece = start + piece.size
    col = start
    last = -1  # column of the previous token on the path (parent of the next node's first token)

    def put(n: int, parent_col: int, subtree_end: int, primary: bool) -> int:
        nonlocal col
        k, d, length = trie.node_rep[n], trie.node_depth[n], nlen[n]
        traj = trie.trajectories[k]
        sl = slice(col, col + length)
        rows["tokens"][r, sl] = traj.tokens[d:d + length]
        rows["positions"][r, sl] = np.arange(d, d + length)
        rows["parent"][r, col] = parent_col
        rows["parent"][r, col + 1:col + length] = np.arange(col, col + length - 1)
        rows["subtree_end"][r, sl] = subtree_end
        rows["primary"][r, sl] = primary
        if primary:
            node_flat[n] = r * row_len + col
        col += length
        return col - 1

    for c in piece.context:
        last = put(c, last, end_of_piece, False)
    root_last = put(piece.root, last, end_of_piece, True)
    # Included subtrees in DFS pre-order: explicit stack of (node, parent column).
    stack = [(c, root_last) for c in reversed(piece.included)]
    while stack:
        n, pcol = stack.pop()
        node_end = col + int(sub[n])
        n_last = put(n, pcol, node_end, True)
        stack.extend((c, n_last) for c in reversed(children[n]))
    assert col == end_of_piece, (col, end_of_piece)
    return col


def _fields_of(trajs: list[Trajectory], fields, keep) -> tuple[str, ...]:
    """The optional StepBatch fields to fill: `fields` as given, or (None) the log-prob fields any
    trajectory carries plus 'pruned' when a keep mask is given, plus 'teacher' when a trajectory
    is a teacher's. Every trajectory must then carry each log-prob field (an error names the
    first that does not)."""
    if fields is None:
        fields = tuple(f for f in LOGPROB_FIELDS if any(getattr(t, f) is not None for t in trajs))
        fields = (("pruned",) if keep is not None else ()) + fields + (
            ("teacher",) if any(t.teacher for t in trajs) else ())
    fields = tuple(fields)
    unknown = set(fields) - set(OPTIONAL_FIELDS)
    if unknown:
        raise ValueError(f"unknown StepBatch fields {sorted(unknown)}; known: {OPTIONAL_FIELDS}")
    for f in fields:
        if f in LOGPROB_FIELDS:
            for t in trajs:
                if getattr(t, f) is None:
                    raise ValueError(f"{t.name()}: has no '{f}', which this batch carries")
    return tuple(f for f in OPTIONAL_FIELDS if f in fields)


def pack_trie(trie: Trie, row_len: int, num_rows: int | None = None,
              num_traj: int | None = None, traj_len: int | None = None,
              pad_id: int = 0, attention_block_size: int | None = None,
              schedule_pairs: int | None = None, keep: np.ndarray | None = None,
              fields: tuple[str, ...] | None = None) -> PackedTrees:
    """Lay a trie out in rows of `row_len` tokens (see the module docstring) as a StepBatch.

    num_rows / num_traj / traj_len: pad to these sizes (fixed shapes under jit); errors when the
    content needs more. Defaults: as many rows as needed; N = number of trajectories;
    L = bucket_length(longest trajectory). attention_block_size: also build the block-sparse
    attention schedule of the rows (`attention_schedule`, padded to schedule_pairs when given).
    keep: bool[num_nodes] from the pruner (closed under ancestors): pruned nodes are not laid out,
    cost no compute, and their tokens get traj_index -1, valid and trainable False, and pruned True
    (a loss may still count them in its denominators: a config choice). A teacher trajectory
    (Trajectory.teacher) has no trainable token: its would-be trainable tokens are its `teacher`
    mask (the field must then be carried).
    fields: the optional StepBatch fields to fill (default: see _fields_of)."""
    trajs = trie.trajectories
    fields = _fields_of(trajs, fields, keep)
    structure = kept_structure(trie, keep)
    children, sub, _ = structure
    pieces = make_pieces(trie, row_len, structure)
    groups = assign_rows([p.size for p in pieces], row_len)
    n_rows = len(groups) if num_rows is None else num_rows
    if len(groups) > n_rows:
        raise ValueError(f"the trajectories need {len(groups)} rows of {row_len} tokens; only "
                         f"{n_rows} allowed")
    rows = empty_rows(n_rows, row_len, pad_id)
    rows["primary"] = np.zeros((n_rows, row_len), bool)
    node_flat = np.full(trie.num_nodes, -1, np.int64)
    for r, group in enumerate(groups):
        col = 0
        for i in sorted(group):  # keep pieces in creation order within a row
            col = _layout_piece(trie, pieces[i], rows, r, col, node_flat, row_len, children, sub)
    kept_nodes = np.ones(trie.num_nodes, bool) if keep is None else np.asarray(keep, bool)
    assert np.all(node_flat[kept_nodes] >= 0)

    n_traj = len(trajs) if num_traj is None else num_traj
    if len(trajs) > n_traj:
        raise ValueError(f"{len(trajs)} trajectories do not fit num_traj={n_traj}")
    longest = max(len(t) for t in trajs)
    l_max = bucket_length(longest) if traj_len is None else traj_len
    if longest > l_max:
        t = max(trajs, key=len)
        raise ValueError(f"{t.name()}: {longest} tokens exceed traj_len={l_max}")
    traj_index = np.full((n_traj, l_max), -1, np.int32)
    valid = np.zeros((n_traj, l_max), bool)
    trainable_nl = np.zeros((n_traj, l_max), bool)
    pruned = np.zeros((n_traj, l_max), bool)
    teacher_nl = np.zeros((n_traj, l_max), bool)
    logprobs = {f: np.zeros((n_traj, l_max), np.float32) for f in fields if f in LOGPROB_FIELDS}
    advantage = np.zeros(n_traj, np.float32)
    for k, traj in enumerate(trajs):
        flat = np.concatenate([node_flat[n] + np.arange(trie.node_len[n]) if kept_nodes[n]
                               else np.full(trie.node_len[n], -1)
                               for n in trie.traj_path[k]])
        n = len(traj)
        assert len(flat) == n
        kept = flat >= 0
        traj_index[k, :n] = flat
        valid[k, :n] = kept
        trainable = traj.trainable.copy()
        trainable[0] = False
        if traj.teacher:
            teacher_nl[k, :n] = trainable & kept
        else:
            trainable_nl[k, :n] = trainable & kept
            pruned[k, :n] = trainable & ~kept
        for f, arr in logprobs.items():
            arr[k, :n] = getattr(traj, f)
        advantage[k] = 0.0 if traj.advantage is None else traj.advantage
    if "pruned" not in fields and pruned.any():
        raise ValueError("pack_trie: pruned tokens need the 'pruned' field")
    if "teacher" not in fields and teacher_nl.any():
        raise ValueError("pack_trie: teacher trajectories need the 'teacher' field")
    schedule = None
    if attention_block_size:
        schedule = attention_schedule(rows["subtree_end"], attention_block_size, schedule_pairs)
    batch = StepBatch(
        tokens=rows["tokens"], positions=rows["positions"], parent=rows["parent"],
        subtree_end=rows["subtree_end"], traj_index=traj_index, valid=valid,
        trainable=trainable_nl, advantage=advantage, schedule=schedule,
        pruned=pruned if "pruned" in fields else None,
        teacher=teacher_nl if "teacher" in fields else None, **logprobs)
    return PackedTrees(batch=batch, primary=rows["primary"], used_rows=len(groups),
                       total_tokens=trie.total_tokens,
                       tree_tokens=int(sub[trie.roots].sum()),
                       laid_out_tokens=int(sum(p.size for p in pieces)))


def pack_trajectories(trajectories: list[Trajectory], row_len: int | None = None,
                      vocab_size: int | None = None, drop_overlong: bool = False,
                      **kwargs) -> PackedTrees:
    """Validate, build the trie, and pack. row_len defaults to bucket_length(longest trajectory).

    A trajectory longer than a given row_len is an error naming it, unless drop_overlong: then it
    is left out, and the ids of what was dropped are in `.dropped` and logged (never silent).
    """
    if not trajectories:
        raise ValueError("pack_trajectories: no trajectories")
    for t in trajectories:
        if vocab_size is not None:
            t.validate(vocab_size)
    dropped: list = []
    if row_len is not None:
        over = [t for t in trajectories if len(t) > row_len]
        if over and not drop_overlong:
            raise ValueError(f"{over[0].name()}: {len(over[0])} tokens do not fit rows of "
                             f"{row_len} ({len(over)} such trajectories; drop_overlong=True drops "
                             "and counts them)")
        if over:
            dropped = [t.id for t in over]
            logging.getLogger(__name__).warning(
                "dropped %d trajectories longer than the row length %d: %s", len(over), row_len,
                dropped[:10])
            trajectories = [t for t in trajectories if len(t) <= row_len]
            if not trajectories:
                raise ValueError(f"all {len(dropped)} trajectories are longer than rows of "
                                 f"{row_len}")
    else:
        row_len = bucket_length(max(len(t) for t in trajectories))
    packed = pack_trie(build_trie(trajectories), row_len, **kwargs)
    packed.dropped = dropped
    return packed


def gather_per_trajectory(values, traj_index):
    """values [R, T] (numpy or jax) -> [N, L] at each trajectory's tokens (0 where index < 0)."""
    if isinstance(values, np.ndarray):
        xp = np
    else:
        import jax.numpy as xp
    flat = values.reshape(-1)
    idx = xp.maximum(traj_index, 0)
    return xp.where(traj_index >= 0, flat[idx], xp.zeros((), values.dtype))
