"""Compile check of the online loop's rollout split (rl.rollout_devices > 0) for a Cloud TPU
topology, from this host (libtpu's abstract devices; nothing is materialised):

    report = split_compile_check(cfg, "v5p-16")      # or: kat-jax compile-check (rl.rollout_devices)

The topology's devices are split as the loop splits jax.devices() (kat_jax.flow.placement
.split_devices: the first N - R train, the last R sample). The train step is compiled on the
training sub-mesh (kat_jax.training.aot.compile_check with those devices: mesh.* over N - R
devices), and the sampler's two programs (kat_jax.rollout.sampler.lower_engine_programs: decode
of a full running batch over block tables for the whole context, prefill of one prompt) are
compiled for one rollout replica, each with its per-device memory against the chip's HBM (the
engine's KV pool, its parameters and their per-layer copies are arguments of both). Every
rollout replica holds the same, so one stands for all. With rl.rollout_replica_devices = K > 1
the replica is K devices, placed as kat_jax.flow.placement.EngineFleet places it (weights
sharded over a tensor axis by the training sharding rules, the KV pool over its KV heads when K
divides them), and the programs are compiled SPMD over those K devices. The report is the train report
with a "rollout" entry; "fits" holds when the train step and both sampler programs fit.

Not covered: the device-to-device weight copy itself (jax.device_put between the sub-meshes is
not a compiled program).
"""

from __future__ import annotations

import time
from typing import Any

import jax


def _memory(compiled) -> dict[str, int]:
    mem = compiled.memory_analysis()
    out = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "alias", "temp", "generated_code")}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + \
        out["generated_code"]
    return out


def split_compile_check(cfg, topology: str, top: int = 8) -> dict[str, Any]:
    """See the module docstring; ValueError for a split the topology cannot give."""
    from kat_jax.flow.placement import replica_groups, split_devices
    from kat_jax.rollout.sampler import EngineConfig, lower_engine_programs
    from kat_jax.training.aot import compile_check, compile_model_config
    from kat_jax.training.tpu_topologies import resolve_topology, topology_devices

    topo = resolve_topology(topology)
    devices = topology_devices(topo)
    r = cfg.rl.rollout_devices
    if not 0 < r < len(devices):
        raise ValueError(f"--config.rl.rollout_devices={r}: {topo.name} has {len(devices)} "
                         f"devices; the split needs 0 < rl.rollout_devices < {len(devices)}")
    train, rollout = split_devices(devices, len(devices) - r, r)
    report = compile_check(cfg, topology, top=top, devices=train)
    model_cfg = compile_model_config(cfg)
    engine_cfg = EngineConfig(max_batch=max(8, cfg.rl.concurrency))
    k = int(cfg.rl.get("rollout_replica_devices", 1))
    try:
        group = replica_groups(rollout, k)[0]
    except ValueError:
        raise ValueError(f"--config.rl.rollout_replica_devices={k} must divide "
                         f"rl.rollout_devices={r}") from None
    prompt = min(cfg.data.row_len, model_cfg.max_position_embeddings)
    t0 = time.perf_counter()
    if k == 1:
        lowered = lower_engine_programs(model_cfg, engine_cfg,
                                        jax.sharding.SingleDeviceSharding(group[0]),
                                        prompt_tokens=prompt)
    else:  # a tensor-parallel replica, placed as EngineFleet places it
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from kat_jax.flow.placement import replica_mesh, replica_targets

        param_sh, pool_sh = replica_targets(model_cfg, group)
        lowered = lower_engine_programs(model_cfg, engine_cfg,
                                        NamedSharding(replica_mesh(group), P()),
                                        prompt_tokens=prompt, param_shardings=param_sh,
                                        pool_sharding=pool_sh)
    programs = {}
    for name in ("decode", "prefill"):
        try:
            mem = _memory(lowered[name].compile())
        except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses programs that exceed HBM
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            mem = {"compiler_error": str(e).split("\n")[0], "total": None}
        programs[name] = {"memory_per_device": mem,
                          "fits": mem["total"] is not None and mem["total"] <= topo.hbm_bytes}
    report["train_devices"] = len(train)
    report["rollout"] = {
        "devices": len(rollout), "replica_devices": k, "replicas": len(rollout) // k,
        "replica_device": ", ".join(str(d) for d in group),
        "max_batch": engine_cfg.max_batch, "chunk_steps": engine_cfg.chunk_steps,
        "prompt_tokens": prompt, "kv_pool_blocks": lowered["num_blocks"],
        "kv_pool_bytes": lowered["pool_bytes"], "programs": programs,
        "compile_s": round(time.perf_counter() - t0, 2)}
    report["fits"] = bool(report["fits"] and all(p["fits"] for p in programs.values()))
    return report


def format_split(report: dict[str, Any]) -> str:
    """The rollout part of a split report, one line per sampler program."""
    ro = report["rollout"]
    k = ro.get("replica_devices", 1)
    per = "one replica each" if k == 1 else f"{ro['replicas']} replicas of {k}, tensor-parallel"
    lines = [f"rollout: {ro['devices']} devices ({per}), training mesh on "
             f"{report['train_devices']}; KV pool {ro['kv_pool_blocks']} blocks "
             f"({ro['kv_pool_bytes'] / 2**30:.2f} GiB); batch {ro['max_batch']}, prompt "
             f"{ro['prompt_tokens']}"]
    for name, p in ro["programs"].items():
        mem = p["memory_per_device"]
        if mem.get("total") is None:
            lines.append(f"  {name}: does not fit ({mem['compiler_error']})")
        else:
            lines.append(f"  {name}: {mem['total'] / 2**30:.2f} GiB per device (args "
                         f"{mem['argument'] / 2**30:.2f} + temp {mem['temp'] / 2**30:.2f}) of "
                         f"{report['hbm_per_device'] / 2**30:.0f} GiB: "
                         f"{'fits' if p['fits'] else 'does not fit'}")
    return "\n".join(lines)
