"""Tunix's sampler on a Hugging Face Qwen3 directory (run by benchmarks/sampler_throughput.py with
TUNIX_PYTHON, a separate environment holding google-tunix; this file imports nothing of kat_jax).

    TUNIX_PYTHON sampler_tunix_peer.py --hf-dir DIR --cases CASES.json --out OUT.json

CASES.json: [{"name", "prompts": [[ids...], ...], "new_tokens"}]. Per case: greedy generation of
new_tokens tokens for the prompts as one batch (tunix.generate.sampler.Sampler, a dense KV cache of
prompt + new_tokens slots), a first call to compile, then --reps timed calls with the same prompts
(the best counts): OUT.json gets each case's tokens (per prompt), seconds and generated tokens /
second. Token ids are passed through an identity tokenizer (no BOS; pad and eos: the last
vocabulary id).
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=1, help="timed calls per case (the best counts)")
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
    for case in cases:
        prompts, new = case["prompts"], case["new_tokens"]
        cache = sampler_lib.CacheConfig(cache_size=max(map(len, prompts)) + new,
                                        num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                                        head_dim=cfg.head_dim)
        sampler = sampler_lib.Sampler(model, tok, cache)
        texts = [tok.decode(p) for p in prompts]
        call = lambda: sampler(texts, max_generation_steps=new, temperature=0.0)  # noqa: E731
        t0 = time.perf_counter()
        call()
        compile_s = time.perf_counter() - t0
        seconds = float("inf")
        for _ in range(args.reps):
            t0 = time.perf_counter()
            res = call()
            seconds = min(seconds, time.perf_counter() - t0)
        tokens = [[int(t) for t in row] for row in res.tokens]
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
