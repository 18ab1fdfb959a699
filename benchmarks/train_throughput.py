"""Train-step throughput: tokens/s and step time of the jitted train step (forward, backward, AdamW)
for the tiny model and a ~100M-parameter Qwen3-shaped model, on whatever devices JAX sees.

The step is the trainer's (kat_jax.training.step.make_train_step, SFT loss, the trainer's sharded
jit with donation) on the bundled SFT data packed by the trainer's pipeline, so the numbers include
tree packing's savings: `tokens_per_s` counts trajectory tokens (what a flat trainer would have to
compute), `computed_tokens_per_s` the tokens laid out in rows. `mfu` follows
kat_jax.training.metrics (null on CPU, where no peak FLOP/s is defined). Each model is timed over
--steps steps after one compile-and-warm-up step. Writes JSON and prints it.

    python benchmarks/train_throughput.py [--models tiny,qwen3_100m] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

MODELS = {
    "tiny": dict(preset="tiny", rows=2, row_len=2048, trajectories=6),
    # Qwen3 shapes, ~100M parameters: d=768, 12 layers, 12/4 heads of 64, MLP 2048, vocab 32768.
    "qwen3_100m": dict(preset="qwen3_0_6b", overrides=dict(
        hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64,
        intermediate_size=2048, vocab_size=32768, tie_word_embeddings=True,
        attention_block_size=128), rows=1, row_len=2048, trajectories=3),
}


def bench(name: str, steps: int) -> dict:
    import jax
    from flax import nnx

    from kat_jax.data.pipeline import BatchShape, make_step_iterator
    from kat_jax.data.sources import expand_files
    from kat_jax.data.tokenizer import ByteTokenizer
    from kat_jax.models.config import get_preset
    from kat_jax.models.decoder import init_model
    from kat_jax.training.build import loss_spec
    from kat_jax.training.defaults import stage_config
    from kat_jax.training.metrics import peak_flops, step_flops
    from kat_jax.training.optim import make_optimizer
    from kat_jax.training.sharding import batch_sharding, like_params, make_mesh, named, param_specs
    from kat_jax.training.step import init_state, make_train_step

    spec = MODELS[name]
    mcfg = get_preset(spec["preset"], **spec.get("overrides", {}))
    cfg = stage_config("sft", "tiny")
    mesh = make_mesh(1, -1, 1)
    model = init_model(mcfg, seed=0)
    graphdef = nnx.graphdef(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    p_shard = named(mesh, param_specs(model, mesh))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    tx, schedule = make_optimizer(cfg.optimizer, 100)
    state = init_state(params, tx)
    shard = {k: rep for k in state}
    shard["params"] = p_shard
    shard["opt_state"] = like_params(state["opt_state"], params, p_shard, rep)
    state = jax.device_put(state, shard)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    shape = BatchShape(spec["rows"], spec["row_len"], spec["trajectories"], mcfg.attention_block_size)
    it = make_step_iterator(expand_files(cfg.data.train_files, "data"), "sft", ByteTokenizer(),
                            shape, mcfg.vocab_size, 1, shards)
    batches = [next(it) for _ in range(steps + 1)]
    bs = jax.tree.map(lambda v: batch_sharding(mesh, v.ndim), batches[0][0])
    step = jax.jit(make_train_step(graphdef, tx, schedule, loss_spec(cfg)),
                   in_shardings=(shard, bs), out_shardings=(shard, rep), donate_argnums=0)
    t0 = time.perf_counter()
    state, m = step(state, jax.device_put(batches[0][0], bs))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    total = computed = 0
    t0 = time.perf_counter()
    for arrays, stats in batches[1:]:
        state, m = step(state, jax.device_put(arrays, bs))
        total += stats["total_tokens"]
        computed += stats["computed_tokens"]
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    peak = peak_flops()
    flops = step_flops(mcfg, computed / steps, spec["row_len"])
    return {
        "model": name, "params": mcfg.num_params(), "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind, "row_len": spec["row_len"],
        "rows_per_step": spec["rows"] * shards, "steps_timed": steps,
        "compile_and_first_step_s": round(compile_s, 2), "step_time_s": round(dt, 4),
        "tokens_per_s": round(total / steps / dt, 1),
        "computed_tokens_per_s": round(computed / steps / dt, 1),
        "flops_per_step": flops, "mfu": None if peak is None else flops / (dt * peak *
                                                                           jax.device_count()),
        "final_loss": float(m["loss"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,qwen3_100m")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "train_throughput.json"))
    args = ap.parse_args()
    results = [bench(n, args.steps) for n in args.models.split(",") if n]
    out = {"benchmark": "train_throughput", "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()} {os.cpu_count()} cpus", "results": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
