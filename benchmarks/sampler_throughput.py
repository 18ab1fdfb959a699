"""Sampler throughput (JSON): decode tokens/s of the built-in KV-cache sampler for the tiny model and
a ~100M-parameter Qwen3-shaped model at batch 1 / 8 / 32, and the speedup of prefilling a GRPO
group's 1k-token prompt once (then sharing its cache with the 8 samples) vs prefilling it eight
times (eight distinct prompts of the same length).

Decode tokens/s = batch x decode steps / time of the decode loop (prefill excluded; measured after a
warm-up call so compilation is excluded). Group prefill: time to prefill 8 distinct prompts and
sample one token each, over the time to prefill one prompt, share its cache with 8 rows and sample
one token each; the ideal speedup is 8 (prefill dominates at 1k tokens), and `fraction_of_ideal_8x`
is the measured speedup / 8 (target >= 0.9). Runs on whatever devices JAX sees (CPU here).

    python benchmarks/sampler_throughput.py [--models tiny,qwen3_100m] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

MODELS = {
    "tiny": dict(preset="tiny"),
    "qwen3_100m": dict(preset="qwen3_0_6b", overrides=dict(
        hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64,
        intermediate_size=2048, vocab_size=32768, tie_word_embeddings=True)),
}


def _time(fn, reps):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(name: str, batches: list[int], new_tokens: int, prompt_len: int, reps: int) -> dict:
    import jax.numpy as jnp
    import numpy as np

    from kat_jax.models.config import get_preset
    from kat_jax.models.decoder import init_model
    from kat_jax.rollout.sampler import JaxEngine, SamplingParams

    spec = MODELS[name]
    cfg = get_preset(spec["preset"], **spec.get("overrides", {}))
    eng = JaxEngine(init_model(cfg, seed=0))
    rng = np.random.default_rng(0)
    out = {"model": name, "params": cfg.num_params(), "decode": []}
    sp = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, seed=1)
    for b in batches:
        prompts = [rng.integers(0, 256, 16).tolist() for _ in range(b)]
        eng.generate(prompts, sp)  # compile
        # decode-only time: total minus a 1-token call (prefill + first sample)
        one = SamplingParams(temperature=1.0, max_new_tokens=1, seed=1)
        eng.generate(prompts, one)
        t_total = _time(lambda p=prompts: eng.generate(p, sp), reps)
        t_pre = _time(lambda p=prompts: eng.generate(p, one), reps)
        steps = new_tokens - 1
        out["decode"].append({"batch": b, "decode_tokens_per_s": round(b * steps / max(
            t_total - t_pre, 1e-9), 1), "step_ms": round(1e3 * (t_total - t_pre) / steps, 2)})
    # group prefill: 1 prompt x 8 samples vs 8 distinct prompts, 1 new token each
    group = rng.integers(0, 256, prompt_len).tolist()
    distinct = [rng.integers(0, 256, prompt_len).tolist() for _ in range(8)]
    one = SamplingParams(temperature=1.0, max_new_tokens=1, seed=1)
    eng.generate([group], one, n=8)
    eng.generate(distinct, one)
    t_shared = _time(lambda: eng.generate([group], one, n=8), reps)
    t_each = _time(lambda: eng.generate(distinct, one), reps)
    out["group_prefill"] = {"prompt_len": prompt_len, "samples": 8,
                            "shared_s": round(t_shared, 4), "eight_prefills_s": round(t_each, 4),
                            "speedup": round(t_each / t_shared, 2),
                            "fraction_of_ideal_8x": round(t_each / t_shared / 8, 3)}
    del jnp
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,qwen3_100m")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny model only, fewer tokens")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "sampler_throughput.json"))
    args = ap.parse_args()
    if args.quick:
        args.models, args.new_tokens, args.prompt_len = "tiny", 8, 256
    batches = [int(b) for b in args.batches.split(",")]
    results = [bench(m, batches, args.new_tokens, args.prompt_len, args.reps)
               for m in args.models.split(",") if m]
    out = {"benchmark": "sampler_throughput", "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()} {os.cpu_count()} cpus", "results": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
