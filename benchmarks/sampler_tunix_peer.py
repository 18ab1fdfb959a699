"""Tunix's sampler on a Hugging Face Qwen3 directory (run by benchmarks/sampler_throughput.py with
TUNIX_PYTHON, a separate environment holding google-tunix; this file imports nothing of kat_jax).

    TUNIX_PYTHON sampler_tunix_peer.py --hf-dir DIR --cases CASES.json --out OUT.json

CASES.json: [{"name", "prompts": [[ids...], ...], "new_tokens"}]. Per case: greedy generation of
new_tokens tokens for the prompts as one batch (tunix.generate.sampler.Sampler, a dense KV cache of
prompt + new_tokens slots), a first call to compile, then --reps timed calls with the same prompts
(the best counts): OUT.json gets each case's tokens (per prompt), seconds and generated tokens /
second. A case with "kind": "episodes" (and "turns", "tools": per episode, per turn but the last, the
scripted tool result's ids) runs multi-turn episodes instead: each turn one call over every
episode's whole conversation so far (Tunix's sampler keeps no cache between calls), once, timed
(its warm-up is a case of the same shapes before it). Token ids are passed through an identity
tokenizer (no BOS; pad and eos: the last vocabulary id).

    TUNIX_PYTHON sampler_tunix_peer.py --hf-dir DIR --cases CASES.json --out X --interleave

compiles every (non-episode) case, prints READY, then runs case i once per line i on stdin and
prints {"seconds", "tokens"}: the caller alternates Tunix's calls with its own, so both sides see
the same moments of a shared machine's load.
"""

from __future__ import annotations

import argparse
import json
import time


class IdTokenizer:
    """Token ids as text: '5 17 3' <-> [5, 17, 3]."""

    def __init__(self, vocab_size: int):
        self.last = vocab_size - 1

    def encode(self, text, **_):
        return [int(t) for t in text.split()]

    def decode(self, ids, **_):
        return " ".join(str(int(t)) for t in ids)

    def bos_id(self):
        return None

    def eos_id(self):
        return self.last

    def pad_id(self):
        return self.last


def run_episodes(case, model, cfg, tok, sampler_lib, samplers) -> dict:
    """An episodes case: per turn one sampler call over each episode's whole conversation, then
    its scripted tool result. One sampler per case family: its cache holds the longest final
    conversation (as Tunix pads it: the next power of two) plus one turn's tokens."""
    family = case["name"].rsplit("_", 1)[0]
    turns, new = case["turns"], case["new_tokens"]
    longest = max(len(p) + sum(map(len, t)) for p, t in zip(case["prompts"], case["tools"]))
    if family not in samplers:
        # Tunix pads a call's prompts to the next power of two of the longest
        longest = 1 << (longest + turns * new - 1).bit_length()
        cache = sampler_lib.CacheConfig(cache_size=longest + new,
                                        num_layers=cfg.num_layers,
                                        num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
        samplers[family] = sampler_lib.Sampler(model, tok, cache)
    sampler = samplers[family]
    contexts = [list(p) for p in case["prompts"]]
    generated = [[] for _ in contexts]
    prompt_tokens = 0
    turn_seconds = []
    t0 = time.perf_counter()
    for turn in range(turns):
        t1 = time.perf_counter()
        prompt_tokens += sum(map(len, contexts))
        res = sampler([tok.decode(c) for c in contexts], max_generation_steps=new,
                      temperature=0.0)
        for i, row in enumerate(res.tokens):
            row = [int(t) for t in row]
            contexts[i] += row
            generated[i] += row
            if turn < turns - 1:
                contexts[i] += case["tools"][i][turn]
        turn_seconds.append(round(time.perf_counter() - t1, 3))
    seconds = time.perf_counter() - t0
    return {"name": case["name"], "seconds": round(seconds, 3), "prompt_tokens": prompt_tokens,
            "turn_seconds": turn_seconds,
            "tokens_per_s": round(sum(map(len, generated)) / seconds, 1), "tokens": generated}


def make_call(case, model, cfg, tok, sampler_lib, logprobs):
    """One non-episode case as a zero-argument call (its own sampler, a dense cache of the
    longest prompt + new_tokens) returning the result's tokens per prompt."""
    prompts, new = case["prompts"], case["new_tokens"]
    cache = sampler_lib.CacheConfig(cache_size=max(map(len, prompts)) + new,
                                    num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                                    head_dim=cfg.head_dim)
    sampler = sampler_lib.Sampler(model, tok, cache)
    texts = [tok.decode(p) for p in prompts]

    def call():
        res = sampler(texts, max_generation_steps=new, temperature=0.0, return_logprobs=logprobs)
        return [[int(t) for t in row] for row in res.tokens]
    return call


def serve_interleaved(cases, model, cfg, tok, sampler_lib, logprobs, header) -> None:
    """--interleave: warm every case, print READY (with the header), then run case i once per
    stdin line i, one JSON line each."""
    import sys

    calls = [make_call(c, model, cfg, tok, sampler_lib, logprobs) for c in cases]
    for call in calls:
        call()  # compile
    print("READY " + json.dumps(header), flush=True)
    for line in sys.stdin:
        i = int(line)
        t0 = time.perf_counter()
        tokens = calls[i]()
        seconds = time.perf_counter() - t0
        print(json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=1, help="timed calls per case (the best counts)")
    ap.add_argument("--logprobs", action="store_true",
                    help="return_logprobs=True (kat_jax's engine always returns per-token "
                    "log-probs and entropies)")
    ap.add_argument("--interleave", action="store_true",
                    help="for the caller to alternate with its own runs: build and warm (compile) "
                    "every non-episode case, print READY, then per stdin line i run case i once and "
                    "print one JSON line {seconds, tokens}; --reps and --out are not used")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import tunix
    from tunix.generate import sampler as sampler_lib
    from tunix.models.qwen3 import model as qwen3_model
    from tunix.models.qwen3 import params as qwen3_params

    with open(f"{args.hf_dir}/config.json") as f:
        hf = json.load(f)
    cfg = qwen3_model.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
        num_heads=hf["num_attention_heads"], head_dim=hf["head_dim"],
        num_kv_heads=hf["num_key_value_heads"], rope_theta=int(hf["rope_theta"]),
        norm_eps=hf["rms_norm_eps"], use_tied_embedding=hf["tie_word_embeddings"])
    t0 = time.perf_counter()
    model = qwen3_params.create_model_from_safe_tensors(args.hf_dir, cfg, dtype=jnp.float32)
    load_s = time.perf_counter() - t0
    with open(args.cases) as f:
        cases = json.load(f)
    out = {"tunix_version": getattr(tunix, "__version__", "unknown"), "jax": jax.__version__,
           "load_seconds": round(load_s, 2), "cases": []}
    tok = IdTokenizer(cfg.vocab_size)
    if args.interleave:
        serve_interleaved(cases, model, cfg, tok, sampler_lib, args.logprobs, out)
        return
    samplers = {}
    for case in cases:
        if case.get("kind") == "episodes":
            out["cases"].append(run_episodes(case, model, cfg, tok, sampler_lib, samplers))
            print(json.dumps({k: v for k, v in out["cases"][-1].items() if k != "tokens"}),
                  flush=True)
            continue
        call = make_call(case, model, cfg, tok, sampler_lib, args.logprobs)
        t0 = time.perf_counter()
        call()
        compile_s = time.perf_counter() - t0
        seconds = float("inf")
        for _ in range(args.reps):
            t0 = time.perf_counter()
            tokens = call()
            seconds = min(seconds, time.perf_counter() - t0)
        out["cases"].append({"name": case["name"], "seconds": round(seconds, 3),
                             "first_call_seconds": round(compile_s, 2),
                             "tokens_per_s": round(sum(map(len, tokens)) / seconds, 1),
                             "tokens": tokens})
        print(json.dumps({k: v for k, v in out["cases"][-1].items() if k != "tokens"}),
              flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
