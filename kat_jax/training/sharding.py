"""Device mesh, logical-axis rules and the shardings of parameters, optimizer state and batches.

The mesh has four axes ('data', 'fsdp', 'context', 'tensor'), sized from config keys mesh.data,
mesh.fsdp, mesh.context, mesh.tensor (one of them may be -1: it takes what the others leave).
Batches are split over ('data', 'fsdp') (every device of both axes sees different rows);
parameters are split over 'fsdp' (ZeRO-3 style: gathered per layer inside the scan) and over
'tensor' (Megatron style heads / MLP). 'context' (default 1) splits each row's tokens inside the
step (kat_jax.ops.context_parallel: balanced q blocks, K / V all-gathered for attention).

Every parameter carries `logical_axes` (kat_jax.models.layers); LOGICAL_RULES map each name to a
mesh axis (or None). A dimension whose size the mesh axis does not divide stays unsharded on it,
and `check_sharded_fraction` fails when more than a tolerance of parameter bytes end up fully
replicated on a multi-device mesh (MaxText's guard against silently unsharded models).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kat_jax.ops.context_parallel import CONTEXT_AXIS
from kat_jax.ops.tree_mask import BATCH_MESH_AXES, HEAD_MESH_AXES

log = logging.getLogger(__name__)

# The mesh axis names are defined once, in kat_jax.ops.tree_mask (attention shards its kernels
# over the same axes); BATCH_AXES is that tuple under the name the training code uses.
BATCH_AXES = BATCH_MESH_AXES
MESH_AXES = (*BATCH_MESH_AXES, CONTEXT_AXIS, *HEAD_MESH_AXES)  # ('data', 'fsdp', 'context', 'tensor')

# logical axis name -> mesh axis (or None). Stacked layers keep their leading axis unsharded
# (the scan walks it); the model dim is FSDP-sharded; heads, MLP hidden and vocab are tensor-split.
LOGICAL_RULES: dict[str, str | None] = {
    "layers": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
}


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int,
               context: int = 1) -> tuple[int, int, int, int]:
    """(data, fsdp, context, tensor) with -1 (at most one) resolved so the product equals
    num_devices; errors name the key."""
    sizes = {"mesh.data": int(data), "mesh.fsdp": int(fsdp), "mesh.context": int(context),
             "mesh.tensor": int(tensor)}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1; got {', '.join(free)}")
    for k, v in sizes.items():
        if v == 0 or v < -1:
            raise ValueError(f"{k} must be a positive size or -1, got {v}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"{num_devices} devices cannot be split with "
                             f"{', '.join(f'{k}={v}' for k, v in sizes.items())}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh {tuple(sizes.values())} needs {math.prod(sizes.values())} devices; "
                         f"{num_devices} available ({', '.join(f'{k}={v}' for k, v in sizes.items())})")
    return tuple(sizes.values())


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None,
              context: int = 1) -> Mesh:
    """A ('data', 'fsdp', 'context', 'tensor') mesh over `devices` (default: all), tensor
    innermost so that tensor-parallel groups are neighbours on the interconnect, context next."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices), context)
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # abstract or unusual device sets: plain reshape
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES)


def mesh_from_config(mesh_cfg, devices=None) -> Mesh:
    """The mesh of config keys mesh.data / fsdp / context / tensor, or of the variant's row of
    TOPOLOGY_MESHES for the devices' TPU slice (mesh.topology_table, kat_jax.training.defaults):
    the trainer's, compile-check's and the online loop's one way to build it."""
    from kat_jax.training.defaults import topology_mesh
    from kat_jax.training.tpu_topologies import slice_name

    devices = jax.devices() if devices is None else list(devices)
    topology = slice_name(devices)
    axes, source = topology_mesh(mesh_cfg, topology)
    if source != "mesh.*":
        log.info("mesh %s from %s=%s for %s", axes, source, mesh_cfg.topology_table, topology)
    return make_mesh(axes["data"], axes["fsdp"], axes["tensor"], devices=devices,
                     context=axes["context"])


def _logical_axes(var: nnx.Variable) -> tuple:
    axes = tuple(getattr(var, "logical_axes", None) or ())
    ndim = len(var.shape)
    if len(axes) == ndim - 1:  # stacked by nnx.vmap: the leading axis is the layer axis
        axes = ("layers", *axes)
    if len(axes) != ndim:
        raise ValueError(f"parameter of shape {var.shape} has logical axes {axes}")
    return axes


def spec_for(shape: tuple[int, ...], axes: tuple, mesh: Mesh,
             rules: dict[str, str | None] | None = None) -> P:
    """PartitionSpec of one array: each logical axis through the rules, kept only when the mesh
    axis divides the dimension and was not used by an earlier dimension."""
    rules = LOGICAL_RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, axes):
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        mesh_axis = rules[name]
        if mesh_axis and mesh_axis not in used and mesh.shape[mesh_axis] > 1 \
                and dim % mesh.shape[mesh_axis] == 0:
            out.append(mesh_axis)
            used.add(mesh_axis)
        else:
            out.append(None)
    return P(*out)


def param_specs(model: nnx.Module, mesh: Mesh, rules=None) -> dict:
    """Pure dict (same structure as the parameter dict) of PartitionSpecs."""
    state = nnx.state(model, nnx.Param)
    specs = jax.tree.map(lambda v: spec_for(tuple(v.shape), _logical_axes(v), mesh, rules), state,
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    return _pure(specs)


def _pure(state) -> dict:
    fn = getattr(nnx, "to_pure_dict", None)
    return fn(state) if fn else state.to_pure_dict()


def named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


def sharded_fraction(abstract: dict, specs: dict, mesh: Mesh) -> float:
    """Share of parameter bytes that are split over at least one mesh axis of size > 1."""
    total = split = 0
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda v: isinstance(v, P))
    for x, s in zip(jax.tree.leaves(abstract), spec_leaves):
        nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        total += nbytes
        if any(a is not None and mesh.shape[a] > 1 for a in s):
            split += nbytes
    return split / max(total, 1)


def check_sharded_fraction(abstract: dict, specs: dict, mesh: Mesh, tolerance: float = 0.02) -> float:
    """Fail when more than `tolerance` of parameter bytes are fully replicated on a mesh whose
    parameter axes (fsdp, tensor) have more than one device. Returns the sharded fraction."""
    frac = sharded_fraction(abstract, specs, mesh)
    if mesh.shape["fsdp"] * mesh.shape["tensor"] > 1 and 1.0 - frac > tolerance:
        raise ValueError(
            f"{100 * (1 - frac):.1f}% of parameter bytes are unsharded on mesh {dict(mesh.shape)} "
            f"(tolerance {100 * tolerance:.1f}%): the model's dimensions are not divisible by the "
            "fsdp / tensor sizes; change mesh.fsdp / mesh.tensor or raise mesh.unsharded_tolerance")
    return frac


def batch_sharding(mesh: Mesh, ndim: int, axis: int = 1) -> NamedSharding:
    """Arrays of a step's batch are [M, S, ...]: microbatches, then data shards split over
    ('data', 'fsdp')."""
    spec = [None] * ndim
    spec[axis] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def num_batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def shard_holders(mesh: Mesh, shards: int) -> dict[int, list[int]]:
    """Global shard index (axis 1 of a step's [M, S, ...] batch) -> the processes whose devices
    hold it. On a real slice the mesh orders devices by their place on the interconnect, so a
    process's shards need not be contiguous, and processes share shards when a tensor-parallel
    group spans hosts."""
    index_map = batch_sharding(mesh, 2).devices_indices_map((1, shards))
    holders: dict[int, set[int]] = {}
    for device, idx in index_map.items():
        for i in range(*idx[1].indices(shards)):
            holders.setdefault(i, set()).add(device.process_index)
    return {i: sorted(p) for i, p in sorted(holders.items())}


def local_shard_ids(mesh: Mesh, shards: int, process: int | None = None) -> list[int]:
    """The shards whose data this process (or `process`) reads: those its devices hold, sorted."""
    process = jax.process_index() if process is None else process
    return [i for i, procs in shard_holders(mesh, shards).items() if process in procs]


def owned_shard_ids(mesh: Mesh, shards: int, process: int | None = None) -> list[int]:
    """The local shards this process counts in logged statistics: each shard is counted by the
    lowest-numbered process that holds it (so sums over hosts count every shard once)."""
    process = jax.process_index() if process is None else process
    return [i for i, procs in shard_holders(mesh, shards).items() if procs[0] == process]


def _path_keys(path) -> tuple:
    out = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                out.append(getattr(p, attr))
                break
        else:
            out.append(str(p))
    return tuple(out)


def like_params(tree: Any, params: dict, param_values: Any, default: Any) -> Any:
    """Map every leaf of `tree` (e.g. an optimizer state) whose key path ends with a parameter's
    key path and has that parameter's shape to the parameter's entry of `param_values` (e.g. its
    sharding); every other leaf (step counts, ...) to `default`."""
    by_path = {}
    for (path, p), v in zip(jax.tree_util.tree_leaves_with_path(params),
                            jax.tree.leaves(param_values, is_leaf=lambda x: x is None or
                                            isinstance(x, (P, jax.sharding.Sharding)))):
        by_path[_path_keys(path)] = (tuple(p.shape), v)

    def pick(path, leaf):
        keys = _path_keys(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == tuple(getattr(leaf, "shape", ())):
                return hit[1]
        return default

    return jax.tree_util.tree_map_with_path(pick, tree)


def global_batch(local, mesh, shard_ids: list[int], shards: int):
    """Host-local [M, S_local, ...] arrays (a StepBatch) holding the global shards `shard_ids`
    (sorted; see sharding.local_shard_ids) -> global [M, shards, ...] arrays split over the batch
    axes. Each device takes its shards' rows from the local arrays, whichever shards the mesh
    gives it."""
    pos = {sid: i for i, sid in enumerate(shard_ids)}

    def to_global(v):
        def rows(index):
            return v[:, [pos[i] for i in range(*index[1].indices(shards))]]

        return jax.make_array_from_callback((v.shape[0], shards, *v.shape[2:]),
                                            batch_sharding(mesh, v.ndim), rows)

    return jax.tree.map(to_global, local)
