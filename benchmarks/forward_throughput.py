"""Forward throughput on CPU: jitted kat_jax decoder vs Hugging Face transformers, same weights.

A Qwen3 shape scaled down to run in about a minute (defaults below). Both sides compute the full
logits of the same [batch, seq] token block in float32; each is timed over --reps runs after a
warm-up (JAX: after compilation), alternating the two so machine noise hits both alike.
Writes JSON (default benchmarks/results/forward_throughput.json) and prints it.

    python benchmarks/forward_throughput.py [--hidden 512 --layers 4 --seq 512 --batch 4 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "forward_throughput.json"))
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from kat_jax.models.checkpoint import load_model
    from kat_jax.models.decoder import chain_inputs

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_cfg = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         head_dim=args.head_dim, max_position_embeddings=max(4096, args.seq),
                         tie_word_embeddings=False)
    hf = Qwen3ForCausalLM(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model, cfg = load_model(d)
    graphdef, state = nnx.split(model)

    @jax.jit
    def jax_forward(state, tokens, positions, subtree_end):
        m = nnx.merge(graphdef, state)
        return m.logits(m(tokens, positions, subtree_end))

    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, (args.batch, args.seq)).astype(np.int32)
    tokens = jnp.asarray(ids)
    positions, subtree_end = chain_inputs(tokens)
    ids_t = torch.as_tensor(ids.astype(np.int64))

    def run_jax():
        jax_forward(state, tokens, positions, subtree_end).block_until_ready()

    def run_hf():
        with torch.no_grad():
            _ = hf(ids_t, use_cache=False).logits

    t0 = time.perf_counter()
    run_jax()
    compile_s = time.perf_counter() - t0
    run_hf()  # warm-up
    # Same numbers on both sides (sanity, not a timing):
    with torch.no_grad():
        ref = hf(ids_t[:1, :64]).logits.numpy()
    ours = np.asarray(jax_forward(state, tokens[:1, :64], *chain_inputs(tokens[:1, :64])))
    max_abs_diff = float(np.max(np.abs(ref - ours)))

    jax_t, hf_t = [], []
    for _ in range(args.reps):
        for fn, acc in ((run_jax, jax_t), (run_hf, hf_t)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    n_tok = args.batch * args.seq
    result = {
        "benchmark": "forward_throughput",
        "shape": {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "heads",
                                                "kv_heads", "head_dim", "vocab", "batch", "seq")},
        "params": cfg.num_params(),
        "dtype": "float32",
        "reps": args.reps,
        "jax_tokens_per_s": n_tok / statistics.median(jax_t),
        "transformers_tokens_per_s": n_tok / statistics.median(hf_t),
        "jax_median_s": statistics.median(jax_t),
        "transformers_median_s": statistics.median(hf_t),
        "jax_compile_s": compile_s,
        "speedup_jax_over_transformers": statistics.median(hf_t) / statistics.median(jax_t),
        "max_abs_logit_diff_64_tokens": max_abs_diff,
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "jax_backend": jax.default_backend(), "torch_threads": args.threads},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
