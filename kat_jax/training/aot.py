"""`kat-jax compile-check`: the train step compiled ahead of time for a Cloud TPU topology.

    report = compile_check(cfg, "v5p-128")
    print(format_report(report)); print(summary_line(report))

The step, its shardings and its abstract inputs come from kat_jax.training.build, exactly as the
training loop builds them.

compile_check builds the mesh over a Cloud TPU topology's abstract devices (libtpu, no TPU:
kat_jax.training.tpu_topologies), lowers the jitted train step with ShapeDtypeStruct inputs that
carry their shardings (no parameter, optimizer state or batch is materialised) and compiles it with
the real TPU compiler (XLA:TPU, Mosaic for the Pallas attention kernel, which runs inside shard_map
because the mesh is set with jax.set_mesh). It reports compiled.memory_analysis() per device against
the chip's HBM, the shardings of the largest arrays, and compiled.cost_analysis() FLOPs.

Memory per device: arguments + outputs - aliased (donated state) + temporaries + generated code.
This is XLA's static buffer assignment, what the runtime allocates for the step; it leaves out the
runtime's own reserve (a few hundred MiB), so treat > ~95% of HBM as not fitting in practice.
FLOPs: XLA's cost analysis of the partitioned program (per device). It does not see inside Pallas
kernels (custom calls), so attention FLOPs are missing from it; the analytic model FLOPs of the
global step (kat_jax.training.metrics.step_flops, 6 N D + attention) are reported beside it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

import jax
import ml_collections
import numpy as np

from kat_jax.training.build import abstract_train_setup, model_config_for, validate
from kat_jax.training.sharding import mesh_from_config

# ---------------------------------------------------------------------------------------------
# compile check


def _per_device_bytes(x: jax.ShapeDtypeStruct) -> int:
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return math.prod(shape) * np.dtype(x.dtype).itemsize


def largest_arrays(tree: Any, n: int = 8) -> list[dict]:
    """The n largest inputs (global bytes): path, shape, dtype, partition spec, bytes per device."""
    rows = []
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        spec = getattr(x.sharding, "spec", None)
        rows.append({"name": jax.tree_util.keystr(path), "shape": list(x.shape),
                     "dtype": str(np.dtype(x.dtype)), "spec": str(spec), "bytes": nbytes,
                     "bytes_per_device": _per_device_bytes(x)})
    rows.sort(key=lambda r: -r["bytes"])
    return rows[:n]


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def compile_model_config(cfg: ml_collections.ConfigDict):
    """The checkpoint's model config with the overrides, attention 'auto'/'' forced to pallas (the
    TPU kernel) when the head dim allows it: the model a TPU run would train."""
    from kat_jax.ops.attention import resolve_attention_impl

    model_cfg = model_config_for(cfg)
    impl = resolve_attention_impl(model_cfg.attention_impl, "tpu", model_cfg.head_dim)
    if impl != model_cfg.attention_impl:
        model_cfg = dataclasses.replace(model_cfg, attention_impl=impl)
    return model_cfg


def compile_check(cfg: ml_collections.ConfigDict, topology: str, top: int = 8,
                  devices=None) -> dict:
    """Lower and compile cfg's train step for a TPU topology (see the module docstring); returns
    the report (JSON-serialisable). ValueError for unknown topologies and bad configs. devices:
    the topology's devices the training mesh uses (default all; the online loop's rollout split
    gives it the training sub-set, kat_jax.flow.split_check)."""
    import time

    from kat_jax.training.metrics import step_flops
    from kat_jax.training.tpu_topologies import resolve_topology, topology_devices

    validate(cfg)
    topo = resolve_topology(topology)
    devices = topology_devices(topo) if devices is None else list(devices)
    mesh = mesh_from_config(cfg.mesh, devices=devices)
    model_cfg = compile_model_config(cfg)
    jit_step, (state, batch), setup = abstract_train_setup(cfg, mesh, model_cfg)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):  # Pallas attention then runs inside shard_map over the mesh
        lowered = jit_step.lower(state, batch)
    t1 = time.perf_counter()
    hbm = topo.hbm_bytes
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses programs that exceed HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        compiled, oom = None, str(e).split("\n")[0]
    t2 = time.perf_counter()
    if compiled is not None:
        mem = compiled.memory_analysis()
        fields = {"argument": "argument_size_in_bytes", "output": "output_size_in_bytes",
                  "alias": "alias_size_in_bytes", "temp": "temp_size_in_bytes",
                  "generated_code": "generated_code_size_in_bytes"}
        memory = {k: int(getattr(mem, attr, 0) or 0) for k, attr in fields.items()}
        memory["total"] = (memory["argument"] + memory["output"] - memory["alias"]
                           + memory["temp"] + memory["generated_code"])
        hlo, cost, oom = compiled.as_text() or "", _cost(compiled), None
    else:  # what the compiler's message says: temporaries (or total) required vs available
        memory = {"compiler_error": oom}
        need = re.search(r"required for [^(]*\(([\d.]+)([GMK])\) exceeds available HBM "
                         r"\(([\d.]+)([GMK])\)", oom)
        unit = {"G": 2**30, "M": 2**20, "K": 2**10}
        if need:
            memory["temp"] = int(float(need.group(1)) * unit[need.group(2)])
            memory["compiler_available_hbm"] = int(float(need.group(3)) * unit[need.group(4)])
        args = sum(_per_device_bytes(x) for x in jax.tree.leaves((state, batch)))
        memory["argument"] = args
        memory["total"] = args + memory.get("temp", 0)  # a lower bound: the compiler stopped
        hlo, cost = "", {}
    shards = batch.tokens.shape[1]
    tokens = cfg.train.microbatches * shards * cfg.data.rows * cfg.data.row_len
    model_flops = step_flops(model_cfg, tokens, cfg.data.row_len)
    return {
        "topology": topo.name, "libtpu_topology": topo.topology_string, "chips": topo.chips,
        "device_kind": devices[0].device_kind, "stage": cfg.stage,
        "model": cfg.model.checkpoint,
        "params": model_cfg.num_params(), "attention_impl": model_cfg.attention_impl,
        "attention_block_size": model_cfg.attention_block_size,
        "remat_policy": model_cfg.remat_policy, "dtype": model_cfg.dtype,
        "param_dtype": model_cfg.param_dtype, "mesh": dict(mesh.shape),
        "sharded_fraction": setup.sharded_fraction,
        "microbatches": cfg.train.microbatches, "data_shards": shards, "rows": cfg.data.rows,
        "row_len": cfg.data.row_len, "tokens_per_step": tokens,
        "memory_per_device": memory, "hbm_per_device": hbm,
        "hbm_fraction": memory["total"] / hbm, "fits": oom is None and memory["total"] <= hbm,
        "compiled": compiled is not None,
        "flops_per_device_xla": float(cost.get("flops", 0.0)),
        "model_flops_per_step": float(model_flops),
        "step_time_at_100pct_mfu_s": float(model_flops) / (topo.chips * topo.chip.peak_bf16_flops),
        "mosaic_kernels": hlo.count("tpu_custom_call"),
        "largest_arrays": largest_arrays({"state": state, "batch": batch}, top),
        "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
    }


def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB"


def format_report(r: dict) -> str:
    """Human-readable lines of a compile_check report (the JSON summary comes after them)."""
    mem = r["memory_per_device"]
    lines = [
        f"{r['stage']} step of {r['model']} ({r['params'] / 1e9:.2f}B params) on {r['topology']} "
        f"({r['libtpu_topology']}, {r['chips']} x {r['device_kind']})",
        f"mesh {r['mesh']}  sharded params {100 * r['sharded_fraction']:.1f}%  attention "
        f"{r['attention_impl']} (block {r['attention_block_size']}, {r['mosaic_kernels']} Mosaic "
        f"calls)  remat {r['remat_policy']}  dtype {r['dtype']} / params {r['param_dtype']}",
        f"batch: {r['microbatches']} microbatches x {r['data_shards']} shards x {r['rows']} rows x "
        f"{r['row_len']} tokens = {r['tokens_per_step']} tokens / step",
        f"compile: lower {r['lower_s']} s, compile {r['compile_s']} s",
        "memory per device (compiled.memory_analysis()):",
    ]
    if "compiler_error" in mem:
        lines.append(f"  XLA:TPU refused the program: {mem['compiler_error']}")
        lines.append("  (total below = inputs per device + the temporaries the compiler asked for)")
    for k in ("argument", "output", "alias", "temp", "generated_code"):
        if k in mem:
            lines.append(f"  {k:15s}{_gib(mem[k])}")
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    lines.append(f"  {'total':15s}{_gib(mem['total'])}  of {_gib(r['hbm_per_device']).strip()} HBM "
                 f"({100 * r['hbm_fraction']:.1f}%): {verdict}")
    lines.append("largest arrays (global shape, partition spec, per device):")
    for a in r["largest_arrays"]:
        lines.append(f"  {a['name'][:60]:60s} {str(tuple(a['shape'])):22s} {a['dtype']:8s} "
                     f"{a['spec']:40s} {_gib(a['bytes_per_device'])}")
    lines.append(f"FLOPs: {r['flops_per_device_xla']:.3e} per device (XLA cost analysis, no Pallas "
                 f"kernels); model {r['model_flops_per_step']:.3e} per step (6ND + attention) = "
                 f"{r['step_time_at_100pct_mfu_s']:.2f} s at 100% MFU")
    return "\n".join(lines)


def summary_line(r: dict) -> str:
    keep = {k: v for k, v in r.items() if k != "largest_arrays"}
    return json.dumps(keep, default=str)
