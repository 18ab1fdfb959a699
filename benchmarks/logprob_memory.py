"""Peak memory of tree log-probs + entropies: vocabulary-chunked custom VJP vs materialised logits.

Both variants compute, for T positions, log p(token | parent) and the entropy of each next-token
distribution from hidden [T, D] and the output head [D, V], and the gradient of a weighted sum of
both with respect to hidden and head (forward + backward, as in training). Memory is read from the
XLA-compiled programs (memory_analysis: temporaries + outputs + arguments), which is exact for the
compiled program and does not depend on machine noise. Values are checked equal by running both
variants at --check-t positions (the full-size naive program needs tens of GB to run).

    python benchmarks/logprob_memory.py [--t 8192 --v 151936 --d 1024 --chunk 4096] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--t", type=int, default=8192)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--check-t", type=int, default=512)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "logprob_memory.json"))
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from kat_jax.ops.logprobs import tree_logprobs

    def chunked(hidden, head, tokens, parent, w):
        lp, en = tree_logprobs(hidden[None], head, tokens[None], parent[None], args.chunk)
        return jnp.sum(w[0] * lp[0] + w[1] * en[0])

    def naive(hidden, head, tokens, parent, w):
        logits = jnp.einsum("td,dv->tv", hidden, head, preferred_element_type=jnp.float32)
        logq = jax.nn.log_softmax(logits, axis=-1)
        ent_pos = -jnp.sum(jnp.exp(logq) * logq, axis=-1)
        par = jnp.maximum(parent, 0)
        lp = jnp.where(parent >= 0, logq[par, tokens], 0.0)
        en = jnp.where(parent >= 0, ent_pos[par], 0.0)
        return jnp.sum(w[0] * lp + w[1] * en)

    def inputs(t, concrete):
        shapes = [((t, args.d), jnp.float32), ((args.d, args.v), jnp.float32), ((t,), jnp.int32),
                  ((t,), jnp.int32), ((2, t), jnp.float32)]
        if not concrete:
            return [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
        rng = np.random.default_rng(0)
        return [jnp.asarray(rng.standard_normal((t, args.d)), jnp.float32) * 0.1,
                jnp.asarray(rng.standard_normal((args.d, args.v)), jnp.float32) * 0.1,
                jnp.asarray(rng.integers(0, args.v, t), jnp.int32),
                jnp.asarray(np.arange(-1, t - 1), jnp.int32),
                jnp.asarray(rng.standard_normal((2, t)), jnp.float32)]

    def memory(fn, grad):
        f = jax.value_and_grad(fn, argnums=(0, 1)) if grad else fn
        compiled = jax.jit(f).lower(*inputs(args.t, False)).compile()
        m = compiled.memory_analysis()
        return {"temp_bytes": int(m.temp_size_in_bytes),
                "argument_bytes": int(m.argument_size_in_bytes),
                "output_bytes": int(m.output_size_in_bytes),
                "peak_bytes": int(m.temp_size_in_bytes + m.argument_size_in_bytes
                                  + m.output_size_in_bytes)}

    result = {"benchmark": "logprob_memory", "t": args.t, "v": args.v, "d": args.d,
              "chunk": args.chunk}
    for mode, grad in (("forward", False), ("forward_backward", True)):
        c, n = memory(chunked, grad), memory(naive, grad)
        result[mode] = {"chunked": c, "naive": n,
                        "peak_ratio_chunked_over_naive": c["peak_bytes"] / n["peak_bytes"],
                        "temp_ratio_chunked_over_naive": c["temp_bytes"] / max(1, n["temp_bytes"])}
    # Values: both variants run at check_t positions.
    small = inputs(args.check_t, True)
    t0 = time.perf_counter()
    vc, gc = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(*small)
    vn, gn = jax.jit(jax.value_and_grad(naive, argnums=(0, 1)))(*small)
    result["check"] = {
        "t": args.check_t,
        "value_rel_diff": float(abs(vc - vn) / max(abs(vn), 1e-30)),
        "grad_hidden_max_abs_diff": float(jnp.max(jnp.abs(gc[0] - gn[0]))),
        "grad_head_max_abs_diff": float(jnp.max(jnp.abs(gc[1] - gn[1]))),
        "seconds": time.perf_counter() - t0,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
