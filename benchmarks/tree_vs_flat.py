"""Tree vs flat training cost: the same model and loss, each trajectory as its own chain vs the
packed prefix tree (log-probability prefix caching).

Workloads (token counts scaled down 4x by --quick):
  grpo       a GRPO group of 8 rollouts sharing a long prompt;
  agent      a 20-turn agent rollout where each model call's context extends the previous one
             (one trajectory per call);
  branching  an agent rollout that forks into branches at intermediate turns.
Both sides run forward + backward of the mid-training loss (next-token NLL over every trajectory's
tokens, per-trajectory denominators) with the same attention implementation (xla_block_sparse with
host-built block schedules, block 128), rows of the same length (long enough for the whole tree),
chains packed first-fit decreasing on the flat side. Reported per workload:
  token_ideal_speedup = total tokens / tree tokens,
  flop_ideal_speedup  = model FLOPs flat / tree, counting per-token matmuls (layers + output head)
                        and attention over visible (q, k) pairs only,
  measured_speedup    = median step time flat / tree (reps alternate the two).

    python benchmarks/tree_vs_flat.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np


def workloads(scale: int, rng: np.random.Generator, vocab: int) -> dict[str, list[np.ndarray]]:
    def toks(n):
        return rng.integers(0, vocab, max(1, n // scale))

    grpo_prompt = toks(4096)
    grpo = [np.concatenate([grpo_prompt, toks(1024)]) for _ in range(8)]
    agent, ctx = [], toks(1024)
    for _ in range(20):
        ctx = np.concatenate([ctx, toks(256)])  # tool result + next assistant turn
        agent.append(ctx)
    branching, main = [], toks(1024)
    for turn in range(9):
        main = np.concatenate([main, toks(256)])
        if turn in (2, 5):
            for _ in range(2):
                branch = main
                for _ in range(3):
                    branch = np.concatenate([branch, toks(256)])
                branching.append(branch)
    branching.append(main)
    return {"grpo": grpo, "agent": agent, "branching": branching}


def pack_flat(trajs, row_len: int):
    """Each trajectory its own chain; chains packed into rows first-fit decreasing."""
    from kat_jax.trees.batch import StepBatch
    from kat_jax.trees.packing import assign_rows, empty_rows

    groups = assign_rows([len(t) for t in trajs], row_len)
    rows = empty_rows(len(groups), row_len)
    l_max = max(len(t.tokens) for t in trajs)
    traj_index = np.full((len(trajs), l_max), -1, np.int32)
    for r, g in enumerate(groups):
        col = 0
        for k in g:
            n = len(trajs[k])
            sl = slice(col, col + n)
            rows["tokens"][r, sl] = trajs[k].tokens
            rows["positions"][r, sl] = np.arange(n)
            rows["parent"][r, sl] = np.arange(col - 1, col + n - 1)
            rows["parent"][r, col] = -1
            rows["subtree_end"][r, sl] = col + n
            traj_index[k, :n] = r * row_len + np.arange(col, col + n)
            col += n
    valid = traj_index >= 0
    return StepBatch(**rows, traj_index=traj_index, valid=valid, trainable=valid,
                     advantage=np.zeros(len(trajs), np.float32))


def model_flops(cfg, n_tokens: int, n_pairs: int) -> float:
    """Forward FLOPs: 2 per multiply-add of every per-token matmul, attention on visible pairs."""
    d, f, n, k, h = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                     cfg.head_dim)
    per_token_layer = 2 * (d * n * h + 2 * d * k * h + n * h * d + 3 * d * f)
    per_token = cfg.num_layers * per_token_layer + 2 * d * cfg.vocab_size
    per_pair = cfg.num_layers * 2 * 2 * n * h
    return float(n_tokens) * per_token + float(n_pairs) * per_pair


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4x fewer tokens, 2 reps")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--workloads", nargs="+", default=["grpo", "agent", "branching"])
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "tree_vs_flat.json"))
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from kat_jax.models.config import ModelConfig
    from kat_jax.models.decoder import init_model
    from kat_jax.ops.logprobs import tree_logprobs
    from kat_jax.training.losses import LossSpec, gather, stage_loss
    from kat_jax.trees.packing import attention_schedule, bucket_length, pack_trie
    from kat_jax.trees.trajectory import Trajectory
    from kat_jax.trees.trie import build_trie

    scale = 4 if args.quick else 1
    reps = args.reps or (2 if args.quick else 3)
    cfg = ModelConfig(family="qwen3", vocab_size=16384, hidden_size=512, intermediate_size=1536,
                      num_layers=4, num_heads=8, num_kv_heads=4, head_dim=64,
                      max_position_embeddings=16384, attention_impl="xla_block_sparse",
                      attention_block_size=128, vocab_chunk_size=4096)
    graphdef, params = nnx.split(init_model(cfg, seed=0))

    def loss_fn(params, b):
        m = nnx.merge(graphdef, params)
        hidden = m(b.tokens, b.positions, b.subtree_end, b.schedule.as_dict())
        lp, en = tree_logprobs(hidden, m.head_kernel(), b.tokens, b.parent, cfg.vocab_chunk_size)
        lp_t, en_t = gather(lp, b.traj_index), gather(en, b.traj_index)
        spec = LossSpec(stage="mid", agg_mode="seq-mean-token-mean")
        num, den, _ = stage_loss(spec, lp_t, en_t, b)
        return num / den

    step = jax.jit(jax.value_and_grad(loss_fn))

    def device_batch(b):
        b = b.replace(schedule=attention_schedule(b.subtree_end, cfg.attention_block_size))
        return jax.tree.map(jnp.asarray, b), b.schedule

    rng = np.random.default_rng(0)
    results = []
    for name, seqs in workloads(scale, rng, cfg.vocab_size).items():
        if name not in args.workloads:
            continue
        trajs = [Trajectory(s, id=f"{name}-{i}") for i, s in enumerate(seqs)]
        trie = build_trie(trajs)
        # Rows long enough for the whole tree (no repeated context), the same length both ways.
        row_len = bucket_length(max(max(len(t) for t in trajs), trie.tree_tokens))
        tree = pack_trie(trie, row_len)
        flat = pack_flat(trajs, row_len)
        b_tree, s_tree = device_batch(tree.batch)
        b_flat, s_flat = device_batch(flat)
        total = trie.total_tokens
        tree_tokens = trie.tree_tokens
        flat_pairs = sum(len(t) * (len(t) + 1) // 2 for t in trajs)
        depth_sum = sum(int(trie.node_len[n]) * int(trie.node_depth[n])
                        + int(trie.node_len[n]) * (int(trie.node_len[n]) + 1) // 2
                        for n in range(trie.num_nodes))
        t0 = time.perf_counter()
        l_tree, _ = step(params, b_tree)
        l_flat, _ = step(params, b_flat)
        jax.block_until_ready((l_tree, l_flat))
        compile_s = time.perf_counter() - t0
        times = {"flat": [], "tree": []}
        for _ in range(reps):
            for side, b in (("flat", b_flat), ("tree", b_tree)):
                t0 = time.perf_counter()
                jax.block_until_ready(step(params, b))
                times[side].append(time.perf_counter() - t0)
        flop_ideal = (model_flops(cfg, total, flat_pairs)
                      / model_flops(cfg, tree_tokens, depth_sum))
        med = {k: statistics.median(v) for k, v in times.items()}
        res = {
            "name": name,
            "trajectories": len(trajs),
            "total_tokens": total,
            "tree_tokens": tree_tokens,
            "row_len": row_len,
            "flat_rows": flat.num_rows,
            "tree_rows": tree.num_rows,
            "tree_laid_out_tokens": tree.laid_out_tokens,
            "token_ideal_speedup": total / tree_tokens,
            "flop_ideal_speedup": flop_ideal,
            "measured_speedup": med["flat"] / med["tree"],
            "measured_over_flop_ideal": med["flat"] / med["tree"] / flop_ideal,
            "flat_step_s": med["flat"],
            "tree_step_s": med["tree"],
            "block_pairs_flat": int((s_flat.kind > 0).sum()),
            "block_pairs_tree": int((s_tree.kind > 0).sum()),
            "loss_flat": float(l_flat),
            "loss_tree": float(l_tree),
            "compile_s": compile_s,
        }
        results.append(res)
        print(json.dumps(res), flush=True)
    out = {"benchmark": "tree_vs_flat", "quick": args.quick, "reps": reps,
           "model": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_layers",
                                                   "num_heads", "num_kv_heads", "head_dim",
                                                   "vocab_size", "attention_block_size")},
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "jax": jax.__version__, "backend": jax.default_backend()},
           "workloads": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
