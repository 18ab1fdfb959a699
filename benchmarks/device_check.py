"""One device check for a machine with one NVIDIA H200 (issue 20, part 3): JSON + a short markdown
summary, every section time-boxed and failure-isolated (a section runs in its own Python process
with a timeout; a failing, crashing or hanging section records its error and the others still run).

Sections (sizes on the device; --smoke: CPU, kernels interpreted, tiny shapes, same code):
  kernels      Pallas tree attention forward + backward (out, dQ, dK, dV) against the dense
               reference on the device: a random forest (trees), packed chains, a causal chain,
               a padded row, GQA groups 1/4/8, head_dim 64/128/256, float32 and bfloat16; max abs
               error and ||a - b|| / ||b|| per array (helpers of benchmarks/attention_device.py).
  attention    causal rows at 8k and 32k tokens: tree kernel TFLOP/s on visible pairs against
               jax.nn.dot_product_attention(implementation='cudnn') and JAX's Pallas GPU flash
               attention (jax.experimental.pallas.ops.gpu.attention.mha), forward and fwd + bwd.
               Visible-pair FLOPs: forward 4 * pairs * H * N, fwd + bwd 14 * pairs * H * N.
  sparsity     a 16k row of packed chains / GRPO trees: time per visible pair over the chain's
               (1.0 = time proportional to visible pairs).
  tree_vs_flat forward + backward of the mid-training loss, tree vs each trajectory as its own
               chain, for benchmarks/tree_vs_flat.py's grpo / agent / branching workloads at full
               size (2-8k-token trajectories), the Pallas kernel; measured speedup / FLOP-ideal.
  train        the trainer's jitted train step (benchmarks/train_throughput.py) for qwen3_1_7b in
               bfloat16 on 8k-token rows: tokens/s, MFU.
  sampler      JaxEngine decode tokens/s for qwen3_1_7b at batch 1, 32, 128 (compile excluded).

    bash benchmarks/device_check.sh                  # on the H200: < 8 minutes
    python benchmarks/device_check.py --smoke --out /tmp/dc     # CPU proof of the script

Writes OUT/device_check.json and OUT/device_check.md (default OUT: benchmarks/results/device_check,
_smoke with --smoke).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

# Seconds per section on the device (their sum, with process starts, stays under 8 minutes).
TIMEOUTS = {"kernels": 70, "attention": 90, "sparsity": 45, "tree_vs_flat": 85, "train": 85,
            "sampler": 65}
SMOKE_TIMEOUT = 120
TARGETS = {"tree_over_flash_tflops": 0.90, "tree_vs_flat_over_flop_ideal": 0.95, "train_mfu": 0.50}


def _timed(fn, args, reps: int) -> float:
    from attention_device import timed

    return timed(fn, args, reps)


def _fwd_bwd(fn):
    import jax

    def run(q, k, v, do):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(do))
    return jax.jit(run)


def _pallas(ends, smoke: bool, block_size: int = 128):
    from kat_jax.ops.pallas import pallas_tree_attention

    return lambda q, k, v: pallas_tree_attention(q, k, v, ends, block_size=block_size,
                                                 interpret=True if smoke else None)


def _inputs(seed, b, t, n, kv, h, dtype):
    import jax

    ks = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(ks[0], (b, t, n, h), dtype),
            jax.random.normal(ks[1], (b, t, kv, h), dtype),
            jax.random.normal(ks[2], (b, t, kv, h), dtype),
            jax.random.normal(ks[3], (b, t, n, h), dtype))


# ------------------------------------------------------------------------------------- sections


def section_kernels(smoke: bool) -> dict:
    """One batch of four rows (trees, packed chains, a causal chain, a padded row) per head dim
    and dtype, GQA groups 8 / 2 / 1 at head_dim 64 / 128 / 256; errors per row kind. The dense
    reference runs in float32 at 'highest' matmul precision; float32 kernel inputs use the GPU's
    default (TF32) dots, hence the 5e-3 bound."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from attention_device import chain_ends, forest_ends

    from kat_jax.ops.attention import xla_dense_attention

    t = 32 if smoke else 2048
    rng = np.random.default_rng(0)
    pad = np.arange(1, t + 1, dtype=np.int32)
    pad[: t // 2] = forest_ends(rng, t // 2)
    kinds = {"trees": forest_ends(rng, t), "packed_chains": chain_ends(t, t // 4),
             "chain": np.full(t, t, np.int32), "padding": pad}
    if smoke:
        kinds = {"padding": pad}
    ends = jnp.asarray(np.stack(list(kinds.values())))
    b = len(kinds)
    # (query heads, kv heads, head_dim, dtype)
    cases = ([(2, 1, 32, "float32")] if smoke else
             [(16, kv, h, d) for h, kv in ((64, 2), (128, 8), (256, 16))
              for d in ("float32", "bfloat16")])
    out = []
    for n, kv, h, dt in cases:
        q, k, v, do = _inputs(len(out), b, t, n, kv, h, getattr(jnp, dt))
        head = {"T": t, "heads": n, "kv_heads": kv, "head_dim": h, "dtype": dt}
        try:
            got = _fwd_bwd(_pallas(ends, smoke))(q, k, v, do)
            with jax.default_matmul_precision("highest"):
                want = _fwd_bwd(lambda q, k, v: xla_dense_attention(q, k, v, ends))(
                    *(x.astype(jnp.float32) for x in (q, k, v, do)))
            got = [np.asarray(a, np.float32) for a in got]
            want = [np.asarray(w, np.float32) for w in want]
            limit = 5e-3 if dt == "float32" else 2e-2
            for r, case in enumerate(kinds):
                row = {"case": case, **head}
                for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
                    row[f"{name}_max_abs"] = float(np.abs(a[r] - w[r]).max())
                    row[f"{name}_rel"] = float(np.linalg.norm(a[r] - w[r])
                                               / max(np.linalg.norm(w[r]), 1e-30))
                row["ok"] = all(row[f"{x}_rel"] < limit for x in ("out", "dq", "dk", "dv"))
                out.append(row)
                print("kernels", json.dumps(row), flush=True)
        except Exception as e:  # noqa: BLE001 - one case failing is a result, not the end
            out.append({"case": "all", **head, "ok": False,
                        "error": f"{type(e).__name__}: {e}"[:500]})
            print("kernels", json.dumps(out[-1]), flush=True)
    return {"cases": out, "all_ok": all(r["ok"] for r in out)}


def _flash_baselines(smoke: bool, n: int, kv: int, h: int):
    """name -> fn(q, k, v) causal attention baselines available here."""
    import jax
    import jax.numpy as jnp

    out = {}
    if not smoke:
        out["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn")
    else:
        out["xla"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
    try:
        from jax.experimental.pallas.ops.gpu import attention as pallas_gpu

        g = n // kv

        def mha(q, k, v):
            k, v = (jnp.repeat(x, g, axis=2) for x in (k, v))
            return pallas_gpu.mha(q, k, v, None, sm_scale=h ** -0.5, causal=True,
                                  interpret=smoke, block_sizes=pallas_gpu.BlockSizes(
                                      block_q=16 if smoke else 128, block_k=16 if smoke else 64,
                                      block_q_dkv=16 if smoke else 64,
                                      block_kv_dkv=16 if smoke else 64,
                                      block_q_dq=16 if smoke else 64,
                                      block_kv_dq=16 if smoke else 64))
        out["pallas_flash"] = mha
    except Exception as e:  # noqa: BLE001 - an API change in JAX's example kernel
        print(f"pallas flash attention unavailable: {type(e).__name__}: {e}"[:300])
    return out


def section_attention(smoke: bool) -> dict:
    import jax.numpy as jnp
    import numpy as np
    from attention_device import visible_pairs

    n, kv, h = (2, 1, 64) if smoke else (16, 8, 128)
    reps = 1 if smoke else 5
    rows = []
    for t in ((64,) if smoke else (8192, 32768)):
        ends_np = np.full((1, t), t, np.int32)
        pairs = visible_pairs(ends_np[0])
        q, k, v, do = _inputs(t, 1, t, n, kv, h, jnp.bfloat16)
        fns = {"tree_pallas": _pallas(jnp.asarray(ends_np), smoke)}
        fns.update(_flash_baselines(smoke, n, kv, h))
        for name, f in fns.items():
            row = {"T": t, "impl": name, "visible_pairs": pairs}
            import jax

            fwd = jax.jit(lambda q, k, v, do, f=f: f(q, k, v))
            for label, fn, flops in (("fwd", fwd, 4), ("fwd_bwd", _fwd_bwd(f), 14)):
                try:
                    s = _timed(fn, (q, k, v, do), reps)
                    row[f"{label}_ms"] = round(s * 1e3, 3)
                    row[f"{label}_tflops"] = float(f"{flops * pairs * h * n / s / 1e12:.4g}")
                except Exception as e:  # noqa: BLE001
                    row[f"{label}_error"] = f"{type(e).__name__}: {e}"[:400]
            rows.append(row)
            print("attention", json.dumps(row), flush=True)
    for r in rows:
        mine = next(x for x in rows if x["T"] == r["T"] and x["impl"] == "tree_pallas")
        for label in ("fwd", "fwd_bwd"):
            if r["impl"] != "tree_pallas" and r.get(f"{label}_tflops") and mine.get(
                    f"{label}_tflops"):
                r[f"tree_over_this_{label}"] = round(mine[f"{label}_tflops"]
                                                     / r[f"{label}_tflops"], 3)
    return {"heads": n, "kv_heads": kv, "head_dim": h, "dtype": "bfloat16", "rows": rows}


def section_sparsity(smoke: bool) -> dict:
    import jax.numpy as jnp
    import numpy as np
    from attention_device import chain_ends, grpo_ends, visible_pairs

    n, kv, h = (2, 1, 64) if smoke else (16, 8, 128)
    t = 64 if smoke else 16384
    reps = 1 if smoke else 5
    shapes = [("chain", np.full(t, t, np.int32))]
    shapes += [(f"packed_chains_{c}", chain_ends(t, c)) for c in
               (() if smoke else (t // 4, t // 16, t // 64))]
    shapes += [(f"grpo_p{p}_g{g}", grpo_ends(t, p, g)) for p, g in
               (((32, 4),) if smoke else ((t // 2, 8), (t // 8, 16)))]
    import jax

    from kat_jax.ops.pallas import pallas_tree_attention

    def attn(q, k, v, e):
        return pallas_tree_attention(q, k, v, e, block_size=128, interpret=True if smoke else None)

    def fwd_bwd(q, k, v, do, e):
        out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, e), q, k, v)
        return (out, *vjp(do))

    fwd_j = jax.jit(lambda q, k, v, do, e: attn(q, k, v, e))
    fb_j = jax.jit(fwd_bwd)                        # subtree_end is an argument: one compile each
    q, k, v, do = _inputs(1, 1, t, n, kv, h, jnp.bfloat16)
    rows, base = [], None
    for name, ends_np in shapes:
        pairs = visible_pairs(ends_np)
        e = jnp.asarray(ends_np[None])
        row = {"case": name, "T": t, "visible_share": round(pairs / t ** 2, 5)}
        for label, fn in (("fwd", fwd_j), ("fwd_bwd", fb_j)):
            s = _timed(fn, (q, k, v, do, e), reps)
            row[f"{label}_ms"] = round(s * 1e3, 3)
            row[f"{label}_ns_per_pair"] = s * 1e9 / pairs / n
        base = base or row
        for label in ("fwd", "fwd_bwd"):
            row[f"{label}_time_per_pair_vs_chain"] = round(
                row[f"{label}_ns_per_pair"] / base[f"{label}_ns_per_pair"], 3)
        rows.append(row)
        print("sparsity", json.dumps(row), flush=True)
    return {"rows": rows}


def section_tree_vs_flat(smoke: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from tree_vs_flat import model_flops, pack_flat, workloads

    from kat_jax.models.config import ModelConfig
    from kat_jax.models.decoder import init_model
    from kat_jax.ops.logprobs import tree_logprobs
    from kat_jax.training.losses import LossSpec, gather, stage_loss
    from kat_jax.trees.packing import attention_schedule, bucket_length, pack_trie
    from kat_jax.trees.trajectory import Trajectory
    from kat_jax.trees.trie import build_trie

    impl = "xla_block_sparse" if smoke else "pallas"
    cfg = ModelConfig(family="qwen3", vocab_size=512 if smoke else 32768,
                      hidden_size=64 if smoke else 1024, intermediate_size=128 if smoke else 3072,
                      num_layers=1 if smoke else 4, num_heads=2 if smoke else 16,
                      num_kv_heads=1 if smoke else 8, head_dim=32 if smoke else 128,
                      max_position_embeddings=65536, attention_impl=impl,
                      attention_block_size=16 if smoke else 128, vocab_chunk_size=256 if smoke
                      else 8192, param_dtype="float32" if smoke else "bfloat16",
                      dtype="float32" if smoke else "bfloat16")
    graphdef, params = nnx.split(init_model(cfg, seed=0))

    def loss_fn(params, b):
        m = nnx.merge(graphdef, params)
        hidden = m(b.tokens, b.positions, b.subtree_end, b.schedule.as_dict())
        lp, en = tree_logprobs(hidden, m.head_kernel(), b.tokens, b.parent, cfg.vocab_chunk_size)
        num, den, _ = stage_loss(LossSpec(stage="mid", agg_mode="seq-mean-token-mean"),
                                 gather(lp, b.traj_index), gather(en, b.traj_index), b)
        return num / den

    step = jax.jit(jax.value_and_grad(loss_fn))
    reps = 1 if smoke else 3
    out = []
    for name, seqs in workloads(128 if smoke else 1, np.random.default_rng(0),
                                cfg.vocab_size).items():
        if smoke and name != "grpo":
            continue
        trajs = [Trajectory(s, id=f"{name}-{i}") for i, s in enumerate(seqs)]
        trie = build_trie(trajs)
        row_len = bucket_length(max(max(len(t) for t in trajs), trie.tree_tokens))
        batches = {}
        for side, b in (("tree", pack_trie(trie, row_len).batch), ("flat", pack_flat(trajs,
                                                                                     row_len))):
            b = b.replace(schedule=attention_schedule(b.subtree_end, cfg.attention_block_size))
            batches[side] = jax.tree.map(jnp.asarray, b)
            jax.block_until_ready(step(params, batches[side]))            # compile
        times = {"flat": [], "tree": []}
        for _ in range(reps):
            for side in ("flat", "tree"):
                t0 = time.perf_counter()
                jax.block_until_ready(step(params, batches[side]))
                times[side].append(time.perf_counter() - t0)
        flat_pairs = sum(len(t) * (len(t) + 1) // 2 for t in trajs)
        tree_pairs = sum(int(trie.node_len[n]) * int(trie.node_depth[n])
                         + int(trie.node_len[n]) * (int(trie.node_len[n]) + 1) // 2
                         for n in range(trie.num_nodes))
        ideal = (model_flops(cfg, trie.total_tokens, flat_pairs)
                 / model_flops(cfg, trie.tree_tokens, tree_pairs))
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"workload": name, "trajectories": len(trajs), "total_tokens": trie.total_tokens,
               "tree_tokens": trie.tree_tokens, "row_len": row_len,
               "flop_ideal_speedup": round(ideal, 3),
               "measured_speedup": round(med["flat"] / med["tree"], 3),
               "measured_over_flop_ideal": round(med["flat"] / med["tree"] / ideal, 3),
               "flat_s": round(med["flat"], 4), "tree_s": round(med["tree"], 4)}
        out.append(row)
        print("tree_vs_flat", json.dumps(row), flush=True)
    return {"attention_impl": impl, "model": {"layers": cfg.num_layers, "hidden":
                                               cfg.hidden_size, "head_dim": cfg.head_dim},
            "rows": out}


def section_train(smoke: bool) -> dict:
    import train_throughput

    if smoke:
        name = "tiny_smoke"
        # rows of 2048: the bundled SFT transcripts are ~1.8k tokens (shorter rows drop them all)
        train_throughput.MODELS[name] = dict(preset="tiny", overrides=dict(num_layers=1),
                                             rows=1, row_len=2048, trajectories=2)
    else:
        name = "qwen3_1_7b_8k"
        train_throughput.MODELS[name] = dict(
            preset="qwen3_1_7b", overrides=dict(attention_impl="auto", attention_block_size=128,
                                                max_position_embeddings=8192),
            rows=1, row_len=8192, trajectories=16)
    return train_throughput.bench(name, 1 if smoke else 3)


def section_sampler(smoke: bool) -> dict:
    import numpy as np
    import sampler_throughput

    from kat_jax.rollout.sampler import SamplingParams

    name = "tiny" if smoke else "qwen3_1_7b"
    if not smoke:
        sampler_throughput.MODELS[name] = dict(preset="qwen3_1_7b", overrides=dict(
            max_position_embeddings=4096))
    batches = (2,) if smoke else (1, 32, 128)
    prompt, new = (8, 4) if smoke else (128, 128)
    eng = sampler_throughput.make_engine(name, max_batch=max(batches),
                                         cache_tokens=max(batches) * (prompt + new + 32) + 256)
    sp = SamplingParams(temperature=0.0, max_new_tokens=new)
    rng = np.random.default_rng(0)
    rows = []
    for b in batches:
        for _ in range(2):                                    # the first run compiles
            prompts = [rng.integers(0, 256, prompt).tolist() for _r in range(b)]
            s0, t0 = eng.stats["decode_seconds"], eng.stats["decode_tokens"]
            eng.generate(prompts, sp, seeds=list(range(b)))
        tps = (eng.stats["decode_tokens"] - t0) / (eng.stats["decode_seconds"] - s0)
        rows.append({"model": name, "batch": b, "prompt_len": prompt, "new_tokens": new,
                     "decode_tokens_per_s": round(tps, 1)})
        print("sampler", json.dumps(rows[-1]), flush=True)
    return {"rows": rows}


def section_selftest_error(smoke: bool) -> dict:
    """Not run by default: a section that fails, to prove the others still run (tests)."""
    raise RuntimeError("selftest: this section always fails")


SECTIONS = {"kernels": section_kernels, "attention": section_attention,
            "sparsity": section_sparsity, "tree_vs_flat": section_tree_vs_flat,
            "train": section_train, "sampler": section_sampler}
EXTRA_SECTIONS = {"selftest_error": section_selftest_error}


# ------------------------------------------------------------------------------------- driver


def run_one(name: str, smoke: bool, out_json: str) -> None:
    """Child process: one section, its result (or error) written to out_json."""
    t0 = time.perf_counter()
    res: dict = {"section": name}
    try:
        import jax

        dev = jax.devices()[0]
        res.update(device=f"{dev.platform}: {dev.device_kind}", jax=jax.__version__)
        res["result"] = {**SECTIONS, **EXTRA_SECTIONS}[name](smoke)
        res["ok"] = True
    except Exception as e:  # noqa: BLE001 - recorded for the report
        res.update(ok=False, error=f"{type(e).__name__}: {e}"[:1000],
                   traceback=traceback.format_exc()[-3000:])
    res["seconds"] = round(time.perf_counter() - t0, 1)
    with open(out_json, "w") as f:
        json.dump(res, f, indent=1)


def run_section(name: str, smoke: bool, out_dir: str, timeout: float,
                script: str | None = None) -> dict:
    """Parent: run section `name` in a child process (script: this file) within timeout s."""
    path = os.path.join(out_dir, f"section_{name}.json")
    if os.path.exists(path):
        os.remove(path)
    cmd = [sys.executable, script or os.path.abspath(__file__), "--section", name,
           "--section-json", path]
    if smoke:
        cmd.append("--smoke")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        tail = (proc.stdout + proc.stderr)[-2000:]
        rc = proc.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"") + (e.stderr or b"")
        tail = out.decode(errors="replace")[-2000:] if isinstance(out, bytes) else str(out)[-2000:]
        return {"section": name, "ok": False, "error": f"timed out after {timeout:.0f} s",
                "seconds": round(time.perf_counter() - t0, 1), "log_tail": tail}
    if rc or not os.path.exists(path):
        return {"section": name, "ok": False, "error": f"process exited with {rc}",
                "seconds": round(time.perf_counter() - t0, 1), "log_tail": tail}
    with open(path) as f:
        res = json.load(f)
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if not res.get("ok"):
        res["log_tail"] = tail
    return res


def _fmt(x, nd=3):
    return "-" if x is None else (f"{x:.{nd}g}" if isinstance(x, float) else str(x))


def summary_markdown(report: dict) -> str:
    lines = [f"# Device check {report['date']}", "",
             f"{report['device']}, JAX {report['jax']}, smoke={report['smoke']}, "
             f"{report['seconds']} s in all", ""]
    lines += ["| section | ok | s | note |", "| --- | --- | --- | --- |"]
    for name, s in report["sections"].items():
        lines.append(f"| {name} | {'yes' if s.get('ok') else 'NO'} | {s.get('seconds')} | "
                     f"{(s.get('error') or '')[:120]} |")
    sec = report["sections"]
    k = sec.get("kernels", {}).get("result")
    if k:
        lines += ["", "## Kernels vs dense (fwd + bwd)", "",
                  "| case | N/K | H | dtype | out max abs | dq | dk | dv | ok |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in k["cases"]:
            lines.append(f"| {r['case']} | {r['heads']}/{r['kv_heads']} | {r['head_dim']} | "
                         f"{r['dtype']} | " + " | ".join(_fmt(r.get(f"{x}_max_abs")) for x in
                                                         ("out", "dq", "dk", "dv"))
                         + f" | {r['ok']} |")
    a = sec.get("attention", {}).get("result")
    if a:
        lines += ["", f"## Causal attention TFLOP/s on visible pairs (target: tree >= "
                  f"{TARGETS['tree_over_flash_tflops']:.0%} of flash)", "",
                  "| T | impl | fwd TFLOP/s | fwd+bwd TFLOP/s | tree / this fwd | fwd+bwd |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in a["rows"]:
            lines.append(f"| {r['T']} | {r['impl']} | {_fmt(r.get('fwd_tflops'))} | "
                         f"{_fmt(r.get('fwd_bwd_tflops'))} | {_fmt(r.get('tree_over_this_fwd'))}"
                         f" | {_fmt(r.get('tree_over_this_fwd_bwd'))} |")
    s = sec.get("sparsity", {}).get("result")
    if s:
        lines += ["", "## Time per visible pair vs the chain's (1.0 = proportional)", "",
                  "| case | visible share | fwd | fwd+bwd |", "| --- | --- | --- | --- |"]
        for r in s["rows"]:
            lines.append(f"| {r['case']} | {r['visible_share']} | "
                         f"{r['fwd_time_per_pair_vs_chain']} | {r['fwd_bwd_time_per_pair_vs_chain']} |")
    t = sec.get("tree_vs_flat", {}).get("result")
    if t:
        lines += ["", f"## Tree vs flat fwd+bwd (target >= "
                  f"{TARGETS['tree_vs_flat_over_flop_ideal']} of the FLOP-ideal)", "",
                  "| workload | FLOP-ideal | measured | / ideal |", "| --- | --- | --- | --- |"]
        for r in t["rows"]:
            lines.append(f"| {r['workload']} | {r['flop_ideal_speedup']} | "
                         f"{r['measured_speedup']} | {r['measured_over_flop_ideal']} |")
    tr = sec.get("train", {}).get("result")
    if tr:
        lines += ["", f"## Train step ({tr['model']}, rows of {tr['row_len']}): "
                  f"{tr['tokens_per_s']} tokens/s, computed {tr['computed_tokens_per_s']}/s, "
                  f"MFU {_fmt(tr['mfu'])} (target {TARGETS['train_mfu']})"]
    sa = sec.get("sampler", {}).get("result")
    if sa:
        lines += ["", "## Sampler decode tokens/s", "", "| model | batch | tokens/s |",
                  "| --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['batch']} | {r['decode_tokens_per_s']} |"
                  for r in sa["rows"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, interpreted kernels, tiny shapes")
    ap.add_argument("--out", default=None, help="output folder")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--budget", type=float, default=450.0,
                    help="seconds for all sections (later ones are skipped when it is spent)")
    ap.add_argument("--section", help=argparse.SUPPRESS)
    ap.add_argument("--section-json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.section:
        run_one(args.section, args.smoke, args.section_json)
        return 0
    # No JAX backend in this process: on a GPU it would hold memory the sections need.
    out_dir = args.out or os.path.join(HERE, "results",
                                       "device_check" + ("_smoke" if args.smoke else ""))
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": None, "jax": None, "smoke": args.smoke, "targets": TARGETS, "sections": {}}
    for name in args.sections.split(","):
        left = args.budget - (time.perf_counter() - t0)
        timeout = min(SMOKE_TIMEOUT if args.smoke else TIMEOUTS.get(name, 30), left)
        if timeout < 10:
            res = {"section": name, "ok": False, "error": f"skipped: the {args.budget:.0f} s "
                   "budget is spent"}
        else:
            res = run_section(name, args.smoke, out_dir, timeout)
        report["sections"][name] = res
        report["device"] = report["device"] or res.get("device")
        report["jax"] = report["jax"] or res.get("jax")
        print(f"== {name}: ok={res.get('ok')} {res.get('seconds')} s {res.get('error', '')}",
              flush=True)
        report["seconds"] = round(time.perf_counter() - t0, 1)
        with open(os.path.join(out_dir, "device_check.json"), "w") as f:   # after every section
            json.dump(report, f, indent=1)
        with open(os.path.join(out_dir, "device_check.md"), "w") as f:
            f.write(summary_markdown(report))
    print(f"wrote {out_dir}/device_check.json and device_check.md")
    return 0 if all(s.get("ok") for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
