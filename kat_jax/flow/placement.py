"""Tag-driven placement of rollout and training work (SeamlessFlow), and rollout on its own
devices.

Resources carry capability tags: device groups (``train``, ``rollout``) and sandbox slots
(``env:swe``, ``env:maths``, ...). A work item requires a set of tags; one Scheduler places every
item on a resource that has all of them and a free slot. A resource may also *lend* tags while it
is idle: the training devices lend ``rollout`` while the trainer waits for data, so sampling uses
them too, as the source system does; they stop taking new rollout work as soon as the trainer
resumes (work already placed finishes). A resource's own tags are preferred over a lender's.

Device split. On one host (and on CPU) rollout and training time-share the same devices (the
online loop's default). On a pod, `split_devices` gives the training mesh and the rollout
devices separate sub-sets of the job's devices; an EngineFleet runs one sampler engine per
rollout device (a data-parallel replica each: the layout of sampling fleets for models that fit
one device) and, after each update, copies the trainer's weights to every replica device to
device (`jax.device_put` from the training mesh's shards; no host round trip, which
`reshard_params(..., no_host=True)` enforces with JAX's transfer guards on accelerators; on CPU,
device memory is host memory and the guards never fire). With ``replica_devices=k > 1`` each
replica spans k devices (tensor-parallel sampling of a model larger than one device): the
replica's mesh is tensor k (`replica_mesh`), its weights are resharded device to device onto the
training rules' tensor layout over that mesh (attention heads and MLP columns split, embeddings
whole), its KV pool is split over the KV heads when k divides them (else replicated), and XLA
partitions the sampler's programs (the XLA paged-attention path: the Pallas kernel is
single-device and is refused for such replicas).

Where a generation runs does not change what it samples: tokens depend on the weights, the prompt
and the seed only (tests/test_placement.py checks a fleet against one engine).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any


@dataclasses.dataclass
class Resource:
    """A place work can run: a device group or a sandbox host. ``slots``: how many items it runs
    at once. ``lends``: tags it also serves while marked idle (Scheduler.set_idle)."""

    name: str
    tags: frozenset[str]
    slots: int = 1
    lends: frozenset[str] = frozenset()
    handle: Any = None  # what the item runs on (an engine, a sandbox pool, ...)

    def __post_init__(self):
        self.tags, self.lends = frozenset(self.tags), frozenset(self.lends)
        if not self.name:
            raise ValueError("a resource needs a name")
        if self.slots < 1:
            raise ValueError(f"resource {self.name!r}: slots must be >= 1, got {self.slots}")


class PlacementError(ValueError):
    """No resource can ever serve a work item's tags."""


class Scheduler:
    """Places work items (a set of required tags) on resources; thread-safe.

    acquire(requires) blocks until a resource with every required tag (its own, or lent while it
    is idle) has a free slot, and returns it; release(resource) frees the slot. Among candidates,
    own tags beat lent ones, then the least loaded, then the order given. A requirement that no
    resource has, even lent, is a PlacementError naming the tags (at once, never a hang)."""

    def __init__(self, resources: Iterable[Resource]):
        self.resources = list(resources)
        names = [r.name for r in self.resources]
        if len(set(names)) != len(names):
            raise ValueError(f"resource names must be unique: {names}")
        self._busy = {r.name: 0 for r in self.resources}
        self._idle = {r.name: False for r in self.resources}
        self._cv = threading.Condition()
        self.placed = {r.name: 0 for r in self.resources}  # items placed per resource
        self.lent = {r.name: 0 for r in self.resources}    # of those, on lent tags
        self.wait_s = 0.0

    def _candidates(self, requires: frozenset[str]) -> list[tuple[int, int, int, Resource]]:
        out = []
        for i, r in enumerate(self.resources):
            if self._busy[r.name] >= r.slots:
                continue
            if requires <= r.tags:
                out.append((0, self._busy[r.name], i, r))
            elif self._idle[r.name] and requires <= r.tags | r.lends:
                out.append((1, self._busy[r.name], i, r))
        return sorted(out, key=lambda c: c[:3])

    def _servable(self, requires: frozenset[str]) -> bool:
        return any(requires <= r.tags | r.lends for r in self.resources)

    def acquire(self, requires: Iterable[str], timeout: float | None = None) -> Resource:
        requires = frozenset(requires)
        if not self._servable(requires):
            have = sorted({t for r in self.resources for t in r.tags | r.lends})
            raise PlacementError(f"no resource has the tags {sorted(requires)}; tags offered: "
                                 f"{have}")
        t0 = time.perf_counter()
        deadline = None if timeout is None else t0 + timeout
        with self._cv:
            while True:
                cands = self._candidates(requires)
                if cands:
                    lent, _, _, r = cands[0]
                    self._busy[r.name] += 1
                    self.placed[r.name] += 1
                    self.lent[r.name] += lent
                    self.wait_s += time.perf_counter() - t0
                    return r
                left = None if deadline is None else deadline - time.perf_counter()
                if left is not None and left <= 0:
                    raise TimeoutError(f"no free resource with tags {sorted(requires)} within "
                                       f"{timeout} s")
                self._cv.wait(left)

    def release(self, resource: Resource) -> None:
        with self._cv:
            if self._busy.get(resource.name, 0) <= 0:
                raise ValueError(f"release of {resource.name!r}, which runs nothing")
            self._busy[resource.name] -= 1
            self._cv.notify_all()

    def set_idle(self, name: str, idle: bool) -> None:
        """Mark a resource idle (it serves its lent tags too) or busy again (new items only go
        to its own tags; items already placed finish)."""
        with self._cv:
            if name not in self._idle:
                raise KeyError(f"unknown resource {name!r}")
            self._idle[name] = bool(idle)
            self._cv.notify_all()

    def busy(self, name: str) -> int:
        with self._cv:
            return self._busy[name]


# -- devices ------------------------------------------------------------------------------------
def split_devices(devices: Sequence[Any], train: int, rollout: int) -> tuple[list, list]:
    """The first ``train`` devices for the training mesh, the next ``rollout`` for sampling
    (disjoint). ``rollout=0``: none (rollout time-shares the training devices)."""
    devices = list(devices)
    if train < 1 or rollout < 0:
        raise ValueError(f"need train >= 1 and rollout >= 0 devices, got {train} and {rollout}")
    if train + rollout > len(devices):
        raise ValueError(f"{train} training + {rollout} rollout devices: only {len(devices)} "
                         f"available")
    return devices[:train], devices[train:train + rollout]


def replica_groups(devices: Sequence[Any], k: int) -> list[list]:
    """Consecutive groups of k devices, one sampler replica each (ValueError when k does not
    divide their number)."""
    devices = list(devices)
    if k < 1 or len(devices) % k:
        raise ValueError(f"{len(devices)} devices do not split into sampler replicas of {k}")
    return [devices[i:i + k] for i in range(0, len(devices), k)]


def replica_mesh(devices: Sequence[Any]):
    """The mesh of one sampler replica: tensor = len(devices) (data, fsdp, context 1)."""
    from kat_jax.training.sharding import make_mesh

    return make_mesh(1, 1, len(devices), devices=list(devices))


def replica_targets(model_cfg, devices: Sequence[Any]) -> tuple[Any, Any]:
    """Where one replica's weights and KV pool live: (the device, None) for a single device;
    for several, (a NamedSharding per parameter on the replica mesh, the pool's sharding)."""
    if len(devices) == 1:
        return devices[0], None
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from kat_jax.models.decoder import init_model
    from kat_jax.training.sharding import named, param_specs

    mesh = replica_mesh(devices)
    k = len(devices)
    specs = param_specs(_abstract_model(model_cfg, init_model), mesh)
    kv = "tensor" if model_cfg.num_kv_heads % k == 0 else None
    return named(mesh, specs), NamedSharding(mesh, P(kv, None, None, None))


def _abstract_model(model_cfg, init_model):
    from flax import nnx

    return nnx.eval_shape(lambda: init_model(model_cfg, 0))


def reshard_params(params: Any, target: Any, no_host: bool = True) -> Any:
    """``params`` (a pytree of arrays, e.g. sharded over the training mesh) placed on ``target``
    (a device or a sharding), device to device. no_host: JAX's transfer guards forbid any host
    round trip while copying (a violation raises)."""
    import jax

    if not no_host:
        return jax.device_put(params, target)
    with jax.transfer_guard_device_to_host("disallow"), \
            jax.transfer_guard_host_to_device("disallow"):
        out = jax.device_put(params, target)
        jax.block_until_ready(out)
    return out


def sampler_model(model_cfg, params):
    """A model object for a sampler engine holding ``params`` (a pure dict of arrays, wherever
    they are: the engine computes on their device)."""
    from flax import nnx

    from kat_jax.models.decoder import init_model

    model = nnx.eval_shape(lambda: init_model(model_cfg, 0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


class EngineFleet:
    """Sampler replicas on their own devices behind one engine interface (generate,
    update_weights, context_length), placed by a Scheduler.

    rollout_devices: one JaxEngine per device (per group of replica_devices devices, tensor
    parallel), tagged ``rollout``. lend_devices: training devices that also get replicas
    (grouped the same way), tagged ``train`` and lending ``rollout``: they sample only while
    `trainer_waiting(True)` (between the trainer's updates). slots: generate calls run at once per
    replica (each JaxEngine batches its concurrent calls continuously). make_engine(params,
    kv_sharding) builds one replica's engine (tests pass fakes).
    """

    continuous_batching = True

    def __init__(self, model_cfg, params, rollout_devices: Sequence[Any],
                 lend_devices: Sequence[Any] = (), engine_config=None, slots: int = 8,
                 no_host: bool = True, make_engine=None, replica_devices: int = 1):
        if not rollout_devices and not lend_devices:
            raise ValueError("EngineFleet needs at least one rollout (or lending) device")
        self.model_cfg, self.no_host = model_cfg, no_host
        if make_engine is None:  # (params where they compute, pool sharding) -> an engine
            from kat_jax.rollout.sampler import EngineConfig, JaxEngine

            cfg = engine_config or EngineConfig()
            if replica_devices > 1 and cfg.attention == "pallas":
                raise ValueError("sampler replicas over several devices (replica_devices="
                                 f"{replica_devices}) use the XLA paged-attention path; "
                                 "EngineConfig.attention='pallas' is single-device")
            if replica_devices > 1 and cfg.attention == "auto":
                cfg = dataclasses.replace(cfg, attention="xla")

            def make_engine(p, kv_sharding=None):
                return JaxEngine(sampler_model(model_cfg, p), cfg, kv_sharding=kv_sharding)
        resources = []
        self._targets = {}
        for tag, devs in (("rollout", rollout_devices), ("train", lend_devices)):
            for group in (replica_groups(devs, replica_devices) if devs else []):
                target, kv = replica_targets(model_cfg, group)
                name = f"{tag}:" + "+".join(str(d.id) for d in group)
                self._targets[name] = target
                # a one-device replica's engine puts its pool beside its weights by itself
                engine = make_engine(reshard_params(params, target, no_host),
                                     *(() if kv is None else (kv,)))
                resources.append(Resource(
                    name, frozenset({tag}), slots,
                    frozenset({"rollout"}) if tag == "train" else frozenset(),
                    handle=(group[0] if len(group) == 1 else tuple(group), engine)))
        self.scheduler = Scheduler(resources)
        self.version = 0

    @property
    def engines(self) -> list:
        return [r.handle[1] for r in self.scheduler.resources]

    @property
    def context_length(self) -> int:
        return self.engines[0].context_length

    def generate(self, prompts, params, n: int = 1, seeds=None):
        res = self.scheduler.acquire({"rollout"})
        try:
            return res.handle[1].generate(prompts, params, n=n, seeds=seeds)
        finally:
            self.scheduler.release(res)

    def update_weights(self, params) -> None:
        """The trainer's new weights to every replica, device to device."""
        for res in self.scheduler.resources:
            engine = res.handle[1]
            engine.update_weights(reshard_params(params, self._targets[res.name],
                                                 self.no_host))
        self.version += 1

    def trainer_waiting(self, waiting: bool) -> None:
        """The trainer waits for data (its devices lend themselves to rollout) or trains again."""
        for res in self.scheduler.resources:
            if "train" in res.tags:
                self.scheduler.set_idle(res.name, waiting)

    def stats(self) -> dict[str, Any]:
        s = self.scheduler
        return {"placed": dict(s.placed), "lent": dict(s.lent), "wait_s": s.wait_s}
