"""Speed and quality of the jitted entropy pruner on random trees of 10^4, 10^5 and 10^6 nodes.

Trees are random (pre-order, branching at any depth), with per-node token counts 1-50, entropy sums,
reach = share of the trajectories (leaves) through the node, 2% tagged nodes and 5% tool-result
nodes fused with their parent. Reported per size: compile time (first call), median run time of the
compiled pruner, the plain Python best-first reference's time (a heap, as in the tests; same
selection), their ratio, and quality: the share of reach-weighted entropy sum(reach * entropy) kept
at 25/50/75% budgets, for the pruner and two baselines (keep-shallowest: nodes by depth; random-
subtree: best-first expansion with random priorities).

    python benchmarks/prune_speed.py [--sizes 10000 100000 1000000] [--json FILE]
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import statistics
import time

import numpy as np


def random_tree(m: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    raw_parent = np.empty(m, np.int64)
    raw_parent[0] = -1
    window = rng.integers(1, 40, m)
    raw_parent[1:] = np.maximum(0, np.arange(1, m) - window[1:])
    raw_parent[1:] = rng.integers(raw_parent[1:], np.arange(1, m))
    children = [[] for _ in range(m)]
    for i in range(1, m):
        children[raw_parent[i]].append(i)
    order, stack = [], [0]
    while stack:  # DFS pre-order renumbering
        n = stack.pop()
        order.append(n)
        stack.extend(reversed(children[n]))
    new_id = np.empty(m, np.int64)
    new_id[order] = np.arange(m)
    parent = np.full(m, -1, np.int32)
    parent[new_id[1:]] = new_id[raw_parent[1:]]
    length = rng.integers(1, 51, m).astype(np.int32)
    size = np.ones(m, np.int64)
    depth = np.zeros(m, np.int64)
    leaves = np.zeros(m, np.int64)
    for i in range(1, m):
        depth[i] = depth[parent[i]] + length[parent[i]]
    is_leaf = np.ones(m, bool)
    is_leaf[parent[1:]] = False
    leaves[is_leaf] = 1
    for i in range(m - 1, 0, -1):
        size[parent[i]] += size[i]
        leaves[parent[i]] += leaves[i]
    share = (leaves / leaves[0]).astype(np.float32)  # share of trajectories (leaves) through
    entropy = (rng.gamma(1.0, 1.0, m) * length).astype(np.float32)
    fuse = rng.random(m) < 0.05
    fuse[0] = False
    return dict(parent=parent, end=(np.arange(m) + size).astype(np.int32),
                depth=depth.astype(np.int32), length=length, entropy=entropy, share=share,
                logp=np.zeros(m, np.float32), tier=(rng.random(m) < 0.02).astype(np.int32),
                fuse=fuse, valid=np.ones(m, bool))


def reference(nodes, budget):
    """Plain Python best-first expansion (keys by a reverse pass, groups fused, heap)."""
    par, length = nodes["parent"], nodes["length"]
    m = len(par)
    prio = nodes["share"] * nodes["entropy"] / np.maximum(length, 1).astype(np.float32)
    bits = prio.astype(np.float32).view(np.int32) >> 1  # as the pruner: lowest bit dropped
    key = [(int(nodes["tier"][i]), int(bits[i])) for i in range(m)]
    for i in range(m - 1, 0, -1):
        if key[i] > key[par[i]]:
            key[par[i]] = key[i]
    root = list(range(m))
    for i in range(m):
        if nodes["fuse"][i]:
            root[i] = root[par[i]]
    members, kids = {}, [[] for _ in range(m)]
    for i in range(m):
        members.setdefault(root[i], []).append(i)
        if i and not nodes["fuse"][i]:
            kids[par[i]].append(i)
    heap = [((-key[0][0], -key[0][1], 0), 0)]
    keep, used = np.zeros(m, bool), 0
    while heap:
        _, g = heapq.heappop(heap)
        cost = sum(int(length[n]) for n in members[g])
        if used + cost > budget:
            break
        used += cost
        for n in members[g]:
            keep[n] = True
            for c in kids[n]:
                heapq.heappush(heap, ((-key[c][0], -key[c][1], c), c))
    return keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "prune_speed.json"))
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from kat_jax.trees.pruning import prune_keep_mask

    rng = np.random.default_rng(0)
    results = []
    for m in args.sizes:
        nodes = random_tree(m, rng)
        dev = {k: jnp.asarray(v) for k, v in nodes.items()}
        total = int(nodes["length"].sum())
        mass = nodes["share"] * nodes["entropy"]
        budget = jnp.int32(total // 2)
        t0 = time.perf_counter()
        keep, _ = prune_keep_mask(dev, budget)
        keep.block_until_ready()
        compile_s = time.perf_counter() - t0
        runs = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            prune_keep_mask(dev, budget)[0].block_until_ready()
            runs.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = reference(nodes, total // 2)
        ref_s = time.perf_counter() - t0
        same = bool(np.array_equal(ref, np.asarray(keep)))
        quality = {}
        depth_order = np.lexsort((np.arange(m), nodes["depth"]))
        for frac in (0.25, 0.5, 0.75):
            b = int(frac * total)
            ours = np.asarray(prune_keep_mask(dev, jnp.int32(b))[0])
            cum = np.cumsum(nodes["length"][depth_order])
            shallow = np.zeros(m, bool)
            shallow[depth_order[cum <= b]] = True
            rand = dict(dev, entropy=jnp.asarray(rng.random(m).astype(np.float32)),
                        share=jnp.ones(m, jnp.float32), tier=jnp.zeros(m, jnp.int32))
            rnd = np.asarray(prune_keep_mask(rand, jnp.int32(b))[0])
            quality[f"{int(frac * 100)}%"] = {
                "pruner": float(mass[ours].sum() / mass.sum()),
                "keep_shallowest": float(mass[shallow].sum() / mass.sum()),
                "random_subtree": float(mass[rnd].sum() / mass.sum()),
            }
        res = {"nodes": m, "tokens": total, "compile_s": compile_s,
               "run_ms": 1000 * statistics.median(runs), "python_reference_s": ref_s,
               "speedup_over_python": ref_s / statistics.median(runs),
               "same_selection_as_reference": same, "entropy_mass_kept": quality}
        results.append(res)
        print(json.dumps(res), flush=True)
    out = {"benchmark": "prune_speed", "backend": jax.default_backend(), "cpus": os.cpu_count(),
           "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
