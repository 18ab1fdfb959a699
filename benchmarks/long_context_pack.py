"""Host-side time to turn one long agent tree into a training row (issue 21 part 5).

One synthetic agent episode: a system prompt, then `turns` model calls; call k sees the whole
context so far (prompt, every earlier call's output and tool result) and adds its own output, so
the trajectories (one per call) are prefixes of one another, plus a few retried calls (a different
output at turns 1/4, 1/2 and 3/4: branches). Sized so that the tree holds ~`tokens` tokens and fits
one row of that many tokens. Stages timed (CPU seconds of this process, best of --repeat; wall
seconds in `wall`):

  trie          kat_jax.trees.trie.build_trie
  pack          kat_jax.trees.packing.pack_trie (no schedule): rows + per-trajectory arrays
  schedule      packing.attention_schedule (block-sparse pairs, fixed length schedule_length)
  kernel_lists  the Pallas kernels' lists (ops.pallas.schedule.kernel_schedule_host)
  context_layout  ops.context_parallel.context_layout on numpy (C = 4); context_balance: the
                most live block pairs on one of C = 4 / 8 context shards over the mean, balanced
                (the layout) and contiguous (shard s = the s-th slice of blocks)
  prune_nodes   the pruner's host part (trees.pruning.node_arrays)
  prune_jit     the jitted pruner on those arrays (compiled; compile time reported apart)
  pipeline      data.pipeline.TreeBatcher.next_batch: the data pipeline's whole row building
                (trie twice, pack, schedule), with the pruner on (prune.budget = 3/4 of the tree)

Each configuration (tokens, turns) is one line of the JSON; `ratios` compares 128k with 64k tokens
at the same turns (linear work: ~2x) and 100 with 50 turns at 128k tokens.

    python benchmarks/long_context_pack.py [--json FILE] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from kat_jax.trees.trajectory import TAGS, Trajectory

BLOCK = 128


def agent_episode(tokens: int, turns: int, seed: int = 0, branches: int = 3) -> list[Trajectory]:
    """Trajectories of one agent episode whose tree holds ~0.95 * tokens tokens."""
    rng = np.random.default_rng(seed)
    budget = int(tokens * 0.95)
    prompt = 1024
    per_turn = (budget - prompt) // (turns + branches)
    out_len, tool_len = per_turn // 2, per_turn - per_turn // 2
    seg_tokens, seg_train, seg_tags = [rng.integers(0, 50000, prompt)], [np.zeros(prompt, bool)], \
        [np.zeros(prompt, np.int32)]
    trajs = []
    branch_at = {turns * (i + 1) // (branches + 1) for i in range(branches)}

    def traj(extra_tok, extra_train, extra_tag, k):
        toks = np.concatenate(seg_tokens + [extra_tok])
        n = len(toks)
        return Trajectory(toks, trainable=np.concatenate(seg_train + [extra_train]),
                          tags=np.concatenate(seg_tags + [extra_tag]),
                          behaviour_logprobs=-rng.random(n).astype(np.float32),
                          entropies=rng.random(n).astype(np.float32), advantage=1.0, id=k)

    for k in range(turns):
        out = rng.integers(0, 50000, out_len)
        call_tag = np.full(out_len, TAGS["tool_call"], np.int32)
        trajs.append(traj(out, np.ones(out_len, bool), call_tag, f"turn{k}"))
        if k in branch_at:   # a retried call: another output from the same context
            alt = rng.integers(0, 50000, out_len)
            trajs.append(traj(alt, np.ones(out_len, bool), call_tag, f"retry{k}"))
        tool = rng.integers(0, 50000, tool_len)
        seg_tokens += [out, tool]
        seg_train += [np.ones(out_len, bool), np.zeros(tool_len, bool)]
        seg_tags += [call_tag, np.full(tool_len, TAGS["tool_result"], np.int32)]
    return trajs


class _Groups:
    """A one-group iterator with the state interface TreeBatcher reads."""

    def __init__(self, group):
        self.group, self.done = group, False

    def __next__(self):
        if self.done:
            raise StopIteration
        self.done = True
        return self.group

    def get_state(self):
        return {"done": self.done}

    def set_state(self, state):
        self.done = state["done"]


def _best(fn, repeat: int):
    """(best CPU seconds of this process, the result). CPU time, not wall time: on a shared
    host the wall clock counts other processes' work (wall seconds go to WALL)."""
    times, walls, out = [], [], None
    for _ in range(repeat):
        t0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        times.append(time.process_time() - t0)
        walls.append(time.perf_counter() - w0)
    WALL.append(min(walls))
    return min(times), out


WALL: list[float] = []


def measure(tokens: int, turns: int, repeat: int) -> dict:
    from kat_jax.data.pipeline import BatchShape, TreeBatcher
    from kat_jax.ops.context_parallel import context_layout
    from kat_jax.ops.pallas.schedule import kernel_schedule_host
    from kat_jax.trees.packing import attention_schedule, pack_trie, schedule_length
    from kat_jax.trees.pruning import PruneConfig, node_arrays, prune_keep_mask
    from kat_jax.trees.trie import build_trie

    t0 = time.process_time()
    trajs = agent_episode(tokens, turns)
    res = {"tokens": tokens, "turns": turns, "trajectories": len(trajs),
           "trajectory_tokens": int(sum(len(t) for t in trajs)),
           "build_trajectories_s": time.process_time() - t0}
    res["trie_s"], trie = _best(lambda: build_trie(trajs), repeat)
    res["tree_tokens"], res["nodes"] = trie.tree_tokens, trie.num_nodes
    n = len(trajs)
    res["pack_s"], packed = _best(lambda: pack_trie(trie, tokens, num_rows=1, num_traj=n,
                                                    traj_len=tokens), repeat)
    se = packed.batch.subtree_end
    pairs = schedule_length(tokens, BLOCK)
    res["schedule_s"], sched = _best(lambda: attention_schedule(se, BLOCK, pairs), repeat)
    res["schedule_pairs"], res["live_pairs"] = pairs, int((sched.kind > 0).sum())
    res["kernel_lists_s"], _ = _best(lambda: kernel_schedule_host(se, BLOCK), repeat)
    res["context_layout_s"], _ = _best(lambda: context_layout(se, BLOCK, 4), repeat)
    from kat_jax.ops.block_sparse import classify_block_pairs

    per_block = (classify_block_pairs(se, BLOCK)[0] > 0).sum(axis=1)       # live pairs per q block
    res["context_balance"] = {}
    for c in (4, 8):
        perm = context_layout(se, BLOCK, c)["block_perm"][0]
        m, mean = len(per_block) // c, per_block.sum() / c
        res["context_balance"][c] = {
            "balanced_max_over_mean": float(max(per_block[perm[s * m:(s + 1) * m]].sum()
                                                for s in range(c)) / mean),
            "contiguous_max_over_mean": float(max(per_block[s * m:(s + 1) * m].sum()
                                                  for s in range(c)) / mean)}
    pad = 1 << max(4, (trie.num_nodes - 1).bit_length())
    res["prune_nodes_s"], nodes = _best(lambda: node_arrays(trie, pad_to=pad), repeat)
    import jax
    import jax.numpy as jnp

    budget = int(trie.tree_tokens * 3 // 4)
    args = ({k: jnp.asarray(v) for k, v in nodes.as_dict().items()}, jnp.int32(budget))
    t0 = time.process_time()
    jax.block_until_ready(prune_keep_mask(*args))
    res["prune_compile_and_run_s"] = time.process_time() - t0
    res["prune_jit_s"], _ = _best(lambda: jax.block_until_ready(prune_keep_mask(*args)), repeat)

    def pipeline():
        shape = BatchShape(rows=1, row_len=tokens, trajectories=n, block_size=BLOCK,
                           fields=("pruned", "behaviour_logprobs"),
                           prune=PruneConfig(budget=budget))
        batch, stats = TreeBatcher(_Groups(trajs), shape).next_batch()
        return stats

    res["pipeline_s"], stats = _best(pipeline, repeat)
    res["pipeline_kept_tokens"] = stats["kept_tokens"]
    timed = [k for k in res if k.endswith("_s") and k not in ("build_trajectories_s",
                                                               "prune_compile_and_run_s")]
    res["wall"] = dict(zip(timed, WALL[-len(timed):]))
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "long_context_pack.json"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--configs", default="65536:100,131072:100,131072:50",
                    help="comma-separated TOKENS:TURNS")
    args = ap.parse_args(argv)
    rows = []
    for item in args.configs.split(","):
        tokens, turns = (int(x) for x in item.split(":"))
        rows.append(measure(tokens, turns, args.repeat))
        print(json.dumps(rows[-1]), flush=True)
    stages = [k for k in rows[0] if k.endswith("_s") and k != "prune_compile_and_run_s"]
    by = {(r["tokens"], r["turns"]): r for r in rows}
    ratios = {}
    for name, (a, b) in {"128k_over_64k_at_100_turns": ((131072, 100), (65536, 100)),
                         "100_over_50_turns_at_128k": ((131072, 100), (131072, 50))}.items():
        if a in by and b in by:
            ratios[name] = {s: by[a][s] / max(by[b][s], 1e-9) for s in stages}
    out = {"block_size": BLOCK, "results": rows, "ratios": ratios}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(ratios, indent=1))
    return out


if __name__ == "__main__":
    main()
