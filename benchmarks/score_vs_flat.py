"""Scoring vs the flat computation: per-token log-probs of GRPO groups by kat_jax's tree scoring
(`kat_jax.training.scoring.score_records`, what `kat-jax score` runs) against a flat baseline
written here: each trajectory its own row of a padded batch, dense causal attention, the full
[B, L, V] log-softmax, the chosen tokens' log-probs (what a Tunix- or verl-style trainer
computes). Same float32 weights: a d256 two-layer Qwen3 (hidden 256, MLP 768, 4 query / 2 kv
heads of 64, tied embeddings, vocabulary --vocab, default 512: the tiny preset's byte vocabulary).

Workloads: GRPO-8 (one prompt, 8 completions of 128 tokens) with a 512-token prompt and with a
2048-token prompt. Per workload, compile excluded, medians of reps that alternate the sides:
  flat_s                    the flat baseline's jitted call (device compute only)
  tree_s / tree_entropy_s   score_records on the group's 8 sequences, host work included (trie,
                            packing, transfers, gathering), without / with entropies
  token_ideal_speedup       flat tokens / tree tokens (the 8 sequences' tokens / distinct prefixes)
  speedup                   flat_s / tree_s, and speedup_over_token_ideal = speedup / token ideal
                            (target on the 512-token workload: >= 0.8)
Log-probs of the two sides agree (max_abs_logprob_diff, float32).

Whole command (`command`): the `kat-jax score --no-entropies` process (log-probs only, as the flat
side; a checkpoint of the same weights, the default --batch-tokens) on inputs of N1 and N2 groups
of the 512-token workload, reps alternating; marginal_s_per_group = (median wall(N2) - median
wall(N1)) / (N2 - N1): reading, trie, packing, compute and writing of one more group, process
start and compilation excluded. speedup = flat_s_per_group (the flat baseline on one group, timed
between the command runs, under the same load) / marginal_s_per_group, and its ratio to the token
ideal.

    python benchmarks/score_vs_flat.py [--quick] [--json FILE] [--vocab V]

--quick: 3 reps, command over 2 vs 22 groups (1 rep each); about 2 minutes on 2 idle cores. Full:
7 reps, command over 5 vs 65 groups (3 reps each).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

WORKLOADS = {"grpo8_p512": (512, 8, 128), "grpo8_p2048": (2048, 8, 128)}


def model_config(vocab: int):
    from kat_jax.models.config import ModelConfig

    return ModelConfig(family="qwen3", vocab_size=vocab, hidden_size=256, intermediate_size=768,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                       tie_word_embeddings=True, max_position_embeddings=8192,
                       attention_block_size=128, vocab_chunk_size=4096)


def group(rng: np.random.Generator, vocab: int, prompt: int, samples: int, completion: int
          ) -> list[np.ndarray]:
    p = rng.integers(0, vocab, prompt)
    return [np.concatenate([p, rng.integers(0, vocab, completion)]).astype(np.int32)
            for _ in range(samples)]


def flat_logprobs_fn(cfg):
    """jitted (params, tokens int32[B, L]) -> float32[B, L - 1]: log p(tokens[:, i] | tokens[:, :i])
    by a plain causal transformer over the kat_jax parameter dict (independent of kat_jax's model
    code): dense causal attention (kv heads repeated to the query heads, [B, N, L, L] scores:
    the fastest of the dense layouts tried here, ahead of grouped einsums and
    jax.nn.dot_product_attention on CPU), full log-softmax over the vocabulary."""
    import jax
    import jax.numpy as jnp

    n, k, h, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps

    def rms(x, w):
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * w

    def rope(x, pos):
        inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
        f = pos[:, None].astype(jnp.float32) * inv
        cos, sin = jnp.cos(jnp.concatenate([f, f], -1)), jnp.sin(jnp.concatenate([f, f], -1))
        x1, x2 = x[..., : h // 2], x[..., h // 2:]
        return x * cos[:, None] + jnp.concatenate([-x2, x1], -1) * sin[:, None]

    def fn(params, tokens):
        b, length = tokens.shape
        pos = jnp.arange(length)
        causal = pos[:, None] >= pos[None, :]
        x = params["embed_tokens"][tokens]

        def layer(x, p):
            a = p["self_attn"]
            y = rms(x, p["input_layernorm"]["weight"])
            q = rms(jnp.einsum("bld,dnh->blnh", y, a["q_proj"]["kernel"]), a["q_norm"]["weight"])
            kk = rms(jnp.einsum("bld,dkh->blkh", y, a["k_proj"]["kernel"]), a["k_norm"]["weight"])
            v = jnp.einsum("bld,dkh->blkh", y, a["v_proj"]["kernel"])
            q, kk = rope(q, pos), rope(kk, pos)
            kk, v = jnp.repeat(kk, n // k, axis=2), jnp.repeat(v, n // k, axis=2)  # GQA
            s = jnp.einsum("blnh,bmnh->bnlm", q, kk) * h ** -0.5
            s = jnp.where(causal, s, -jnp.inf)
            o = jnp.einsum("bnlm,bmnh->blnh", jax.nn.softmax(s, -1), v)
            x = x + jnp.einsum("blnh,nhd->bld", o, a["o_proj"]["kernel"])
            m = p["mlp"]
            y = rms(x, p["post_attention_layernorm"]["weight"])
            g = jax.nn.silu(y @ m["gate_proj"]["kernel"]) * (y @ m["up_proj"]["kernel"])
            return x + g @ m["down_proj"]["kernel"], None

        x, _ = jax.lax.scan(layer, x, params["layers"])
        x = rms(x, params["norm"]["weight"])
        logp = jax.nn.log_softmax(jnp.einsum("bld,vd->blv", x, params["embed_tokens"]), -1)
        return jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]

    return jax.jit(fn)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_workload(name, model, params, flat_fn, rng, reps) -> dict:
    import jax

    from kat_jax.training.scoring import ScoreRecord, score_records

    prompt, samples, completion = WORKLOADS[name]
    seqs = group(rng, model.cfg.vocab_size, prompt, samples, completion)
    records = [ScoreRecord(i, s) for i, s in enumerate(seqs)]
    tokens = jax.device_put(np.stack(seqs))  # all the same length: no padding needed here
    sides = {
        "flat": lambda: jax.block_until_ready(flat_fn(params, tokens)),
        "tree": lambda: score_records(model, records, 4096, entropies=False),
        "tree_entropy": lambda: score_records(model, records, 4096),
    }
    flat_lp = np.asarray(sides["flat"]())  # compile
    tree_res, summary = sides["tree"]()
    sides["tree_entropy"]()
    diff = max(float(np.max(np.abs(flat_lp[k] - lp))) for k, (lp, _) in enumerate(tree_res))
    times: dict[str, list[float]] = {s: [] for s in sides}
    for _ in range(reps):
        for side, fn in sides.items():
            times[side].append(timed(fn))
    med = {s: statistics.median(v) for s, v in times.items()}
    total = sum(len(s) for s in seqs)
    ideal = total / summary["computed_tokens"]
    return {
        "name": name, "prompt": prompt, "samples": samples, "completion": completion,
        "flat_tokens": total, "tree_tokens": summary["computed_tokens"],
        "tree_rows": summary["computed_rows"], "tree_row_len": summary["row_len"],
        "tree_attention": summary["attention_impl"],
        "flat_s": med["flat"], "tree_s": med["tree"], "tree_entropy_s": med["tree_entropy"],
        "token_ideal_speedup": ideal,
        "speedup": med["flat"] / med["tree"],
        "speedup_over_token_ideal": med["flat"] / med["tree"] / ideal,
        "speedup_with_entropy": med["flat"] / med["tree_entropy"],
        "max_abs_logprob_diff": diff,
    }


def bench_command(model, cfg, flat_fn, params, ideal: float, n1: int, n2: int, reps: int,
                  vocab: int) -> dict:
    import jax

    from kat_jax.models.checkpoint import params_to_pure_dict, save_checkpoint

    prompt, samples, completion = WORKLOADS["grpo8_p512"]
    flat_tokens = jax.device_put(np.stack(group(np.random.default_rng(2), vocab, prompt, samples,
                                                completion)))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        save_checkpoint(ckpt, params_to_pure_dict(model), cfg)
        rng = np.random.default_rng(1)
        inputs = {}
        for n in (n1, n2):
            inputs[n] = os.path.join(tmp, f"in{n}.jsonl")
            with open(inputs[n], "w") as f:
                for g in range(n):
                    for i, s in enumerate(group(rng, vocab, prompt, samples, completion)):
                        f.write(json.dumps({"id": f"{g}-{i}", "tokens": s.tolist()}) + "\n")
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        walls: dict[int, list[float]] = {n1: [], n2: []}
        flat: list[float] = []
        for _ in range(reps):
            for n in (n1, n2):
                cmd = [sys.executable, "-m", "kat_jax.cli", "score", "--checkpoint", ckpt,
                       "--input", inputs[n], "--output", os.path.join(tmp, f"out{n}.jsonl"),
                       "--no-entropies"]
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
                walls[n].append(time.perf_counter() - t0)
                # the flat baseline timed between the runs, under the same machine load
                flat.append(timed(lambda: jax.block_until_ready(flat_fn(params, flat_tokens))))
    med = {n: statistics.median(v) for n, v in walls.items()}
    marginal = (med[n2] - med[n1]) / (n2 - n1)
    flat_s = statistics.median(flat)
    return {"workload": "grpo8_p512", "groups": [n1, n2], "reps": reps, "entropies": False,
            "wall_s": {str(n): med[n] for n in med},
            "marginal_s_per_group": marginal,
            "flat_s_per_group": flat_s,
            "speedup": flat_s / marginal,
            "speedup_over_token_ideal": flat_s / marginal / ideal}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 reps; command over 2 vs 22 groups")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-command", dest="command", action="store_false",
                    help="skip the whole-command measurement")
    ap.add_argument("--json", default=None, help="output JSON (default: "
                    "benchmarks/results/score_vs_flat[_quick].json)")
    args = ap.parse_args()

    import jax
    from flax import nnx

    from kat_jax.models.decoder import init_model

    reps = args.reps or (3 if args.quick else 7)
    cfg = model_config(args.vocab)
    model = init_model(cfg, seed=0)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat_fn = flat_logprobs_fn(cfg)
    rng = np.random.default_rng(0)
    results = []
    for name in WORKLOADS:
        res = bench_workload(name, model, params, flat_fn, rng, reps)
        results.append(res)
        print(json.dumps(res), flush=True)
    out = {"benchmark": "score_vs_flat", "quick": args.quick, "reps": reps,
           "model": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_layers",
                                                   "num_heads", "num_kv_heads", "head_dim",
                                                   "vocab_size", "attention_block_size",
                                                   "vocab_chunk_size")},
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "jax": jax.__version__, "backend": jax.default_backend()},
           "workloads": results}
    if args.command:
        n1, n2, creps = (2, 22, 1) if args.quick else (5, 65, 3)
        out["command"] = bench_command(model, cfg, flat_fn, params,
                                       results[0]["token_ideal_speedup"], n1, n2, creps,
                                       args.vocab)
        print(json.dumps(out["command"]), flush=True)
    path = args.json or os.path.join(os.path.dirname(__file__), "results",
                                     "score_vs_flat_quick.json" if args.quick
                                     else "score_vs_flat.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
