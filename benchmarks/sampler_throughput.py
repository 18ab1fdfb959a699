"""Sampler throughput (JSON, issue 23 part 6): the prefix cache over a multi-turn episode and a
group, and decode speed of the built-in engine (kat_jax.rollout.sampler.JaxEngine).

multi_turn: a scripted 20-turn episode (generation of --new-tokens per turn, then a scripted tool
  result of 50-500 tokens, --quick: 50-150): tokens prefilled over the episode vs its distinct
  tokens (target <= 1.05x), and the wall time with the prefix cache vs without it (prefix_cache
  False: every turn re-prefills the whole conversation, as the sampler did before), same run.
group: 8 episodes x 8 turns sharing a prompt, run concurrently (continuous batching): tokens
  prefilled vs the distinct tokens of the 8 trajectories (their prefix trie).
decode: tokens/s at batch 1, 8, 32 (tokens of the decode chunks / their wall time, compile
  excluded) for the tiny model and a ~100M Qwen3-shaped model; step_over_forward = the time of one
  decode step of batch B (the on-device loop, divided by its steps) over one forward of B new tokens
  of one row against a cache of the same length (the prefill program), both called directly.
peer: Tunix's sampler on the same weights needs google-tunix in a separate environment; the JSON
  records whether it was found and why not.

    python benchmarks/sampler_throughput.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import threading
import time

MODELS = {
    "tiny": dict(preset="tiny", overrides=dict(max_position_embeddings=16384)),
    "qwen3_100m": dict(preset="qwen3_0_6b", overrides=dict(
        hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64,
        intermediate_size=2048, vocab_size=32768, tie_word_embeddings=True,
        max_position_embeddings=8192, param_dtype="float32", dtype="float32")),
}
TUNIX_PYTHON = "/tmp/tunix-venv/bin/python"


def make_engine(name: str, **config):
    from kat_jax.models.config import get_preset
    from kat_jax.models.decoder import init_model
    from kat_jax.rollout.sampler import EngineConfig, JaxEngine

    spec = MODELS[name]
    cfg = get_preset(spec["preset"], **spec["overrides"])
    return JaxEngine(init_model(cfg, seed=0), EngineConfig(**config))


def distinct(seqs: list[list[int]]) -> int:
    nodes: dict[tuple[int, int], int] = {}
    for s in seqs:
        node = 0
        for t in s:
            node = nodes.setdefault((node, t), len(nodes) + 1)
    return len(nodes)


def episode(eng, rng, prompt_len, turns, new_tokens, tool_range, seed):
    """One scripted episode; returns its final tokens (what the model fed: the last generated
    token of the last turn excluded)."""
    from kat_jax.rollout.sampler import SamplingParams

    sp = SamplingParams(temperature=1.0, max_new_tokens=new_tokens)
    tokens = rng.integers(0, 256, prompt_len).tolist()
    for turn in range(turns):
        gen = eng.generate([tokens], sp, seeds=[seed * 1000 + turn])[0][0]
        tokens = tokens + gen.tokens
        if turn < turns - 1:
            tokens += rng.integers(0, 256, int(rng.integers(*tool_range))).tolist()
    return tokens[:-1]


def multi_turn(args) -> dict:
    import numpy as np

    out = {}
    for cached in (True, False):
        eng = make_engine("tiny", prefix_cache=cached, cache_tokens=32768)
        run = lambda s: episode(eng, np.random.default_rng(s), args.prompt_len, 20,
                                args.new_tokens, args.tool_range, s)
        run(0)  # compile every shape (the same lengths as the timed run)
        before = eng.stats["prefill_tokens"]
        t0 = time.perf_counter()
        tokens = run(1)
        seconds = time.perf_counter() - t0
        if cached:
            out.update(prefill_tokens=eng.stats["prefill_tokens"] - before,
                       distinct_tokens=len(tokens), seconds=round(seconds, 3))
        else:
            out.update(prefill_tokens_without_cache=eng.stats["prefill_tokens"] - before,
                       seconds_without_cache=round(seconds, 3))
    out["prefill_over_distinct"] = round(out["prefill_tokens"] / out["distinct_tokens"], 3)
    out["speedup"] = round(out["seconds_without_cache"] / out["seconds"], 2)
    return out


def group(args) -> dict:
    import numpy as np

    eng = make_engine("tiny", cache_tokens=65536)
    prompt = np.random.default_rng(5).integers(0, 256, args.prompt_len).tolist()
    finals: dict[int, list[int]] = {}

    def one(i):
        from kat_jax.rollout.sampler import SamplingParams

        rng = np.random.default_rng(100 + i)
        sp = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens)
        tokens = list(prompt)
        for turn in range(8):
            tokens += eng.generate([tokens], sp, seeds=[i * 1000 + turn])[0][0].tokens
            if turn < 7:
                tokens += rng.integers(0, 256, int(rng.integers(*args.tool_range))).tolist()
        finals[i] = tokens[:-1]

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    n = distinct(list(finals.values()))
    return {"prefill_tokens": eng.stats["prefill_tokens"], "distinct_tokens": n,
            "prefill_over_distinct": round(eng.stats["prefill_tokens"] / n, 3),
            "total_tokens": sum(map(len, finals.values())),
            "seconds_with_compile": round(time.perf_counter() - t0, 2)}


def step_over_forward(eng, batch: int, cache_len: int, reps: int) -> float:
    """Time of one decode step of `batch` rows over a cache of cache_len, over the time of one
    forward of `batch` new tokens of one row after a cache of cache_len (direct program calls)."""
    import jax
    import numpy as np

    bs, steps = eng.config.block_size, eng.config.chunk_steps
    m = 1 << (-(-(cache_len + batch + steps) // bs) - 1).bit_length()
    tables = np.zeros((batch, m), np.int32)
    for r in range(batch):  # distinct blocks per row, as live sequences have
        tables[r] = 1 + (r * m + np.arange(m)) % (eng.num_blocks - 1)
    z = np.zeros(batch, np.int32)
    ones = np.ones(batch, np.float32)
    dec_args = lambda: (eng.params, eng._layer_states, eng._pool, tables, z,
                        np.full(batch, cache_len, np.int32), np.zeros((batch, 2), np.uint32), z,
                        np.full(batch, 10**6, np.int32), np.ones(batch, bool),
                        np.full((batch, 1), -1, np.int32), ones * 0, ones, z, 0, steps)
    t1 = 1
    fwd_args = lambda: (eng.params, eng._layer_states, eng._pool,
                        np.zeros((1, batch), np.int32),
                        (cache_len + np.arange(batch, dtype=np.int32))[None],
                        np.ones((1, batch), bool), tables[:1], np.full(1, batch - 1, np.int32),
                        np.zeros(t1, np.int32), np.zeros(t1, np.int32), np.zeros(t1, np.int32),
                        np.zeros((t1, 2), np.uint32), np.zeros(t1, np.int32),
                        np.zeros(t1, np.float32), np.ones(t1, np.float32),
                        np.zeros(t1, np.int32), 0)

    def timed(fn, make):
        best = float("inf")
        for _ in range(reps + 1):  # the first call compiles
            t0 = time.perf_counter()
            out = fn(*make())
            jax.block_until_ready(out)
            eng._pool = out[0]
            best = min(best, time.perf_counter() - t0)
        return best

    step = timed(eng._decode, dec_args) / steps
    fwd = timed(eng._prefill, fwd_args)
    return round(step / fwd, 3)


def decode(args) -> list[dict]:
    import numpy as np

    from kat_jax.rollout.sampler import SamplingParams

    out = []
    for name in args.models.split(","):
        eng = make_engine(name, cache_tokens=32 * (args.decode_prompt + args.decode_tokens) + 256,
                          max_batch=32)
        rng = np.random.default_rng(0)
        sp = SamplingParams(temperature=0.0, max_new_tokens=args.decode_tokens)
        for b in args.batches:
            prompts = [rng.integers(0, 256, args.decode_prompt).tolist() for _ in range(b)]
            eng.generate(prompts, sp, seeds=list(range(b)))  # compile
            prompts = [rng.integers(0, 256, args.decode_prompt).tolist() for _ in range(b)]
            s0, t0 = eng.stats["decode_seconds"], eng.stats["decode_tokens"]
            eng.generate(prompts, sp, seeds=list(range(b)))
            tps = (eng.stats["decode_tokens"] - t0) / (eng.stats["decode_seconds"] - s0)
            out.append({"model": name, "batch": b, "prompt_len": args.decode_prompt,
                        "new_tokens": args.decode_tokens, "tokens_per_s": round(tps, 1),
                        "step_over_forward": step_over_forward(eng, b, args.decode_prompt,
                                                               args.reps)})
            print(json.dumps(out[-1]), flush=True)
    return out


def peer() -> dict:
    if not os.path.exists(TUNIX_PYTHON):
        return {"available": False, "reason": f"{TUNIX_PYTHON} not found: create it with `python3 -m "
                "venv /tmp/tunix-venv && /tmp/tunix-venv/bin/pip install google-tunix==0.1.7 "
                "jax==0.10.2`"}
    r = subprocess.run([TUNIX_PYTHON, "-c", "import tunix"], capture_output=True, text=True)
    if r.returncode:
        return {"available": False, "reason": "import tunix failed: " + r.stderr[-300:]}
    return {"available": False, "reason": "tunix imports, but the side-by-side runner (the same "
            "weights in Tunix's Qwen3 and its sampler) is not written yet"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,qwen3_100m")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=32, help="per turn (multi_turn, group)")
    ap.add_argument("--prompt-len", type=int, default=256, help="episode prompt (multi_turn, group)")
    ap.add_argument("--decode-prompt", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true",
                    help="CPU-sized: tool results of 50-150 tokens, 16 new tokens per turn, 32 "
                    "decode tokens")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "sampler_throughput.json"))
    args = ap.parse_args()
    args.tool_range = (50, 501)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        args.tool_range, args.new_tokens, args.decode_tokens = (50, 151), 16, 32
    t0 = time.time()
    out = {"benchmark": "sampler_throughput", "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()} {os.cpu_count()} cpus", "quick": args.quick,
           "multi_turn": multi_turn(args), "group": group(args)}
    print(json.dumps(out), flush=True)
    out["decode"] = decode(args)
    out["peer"] = peer()
    out["seconds"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
