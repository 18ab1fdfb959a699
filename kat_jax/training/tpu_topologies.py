"""Cloud TPU slice names -> libtpu topologies, and the chips' memory, for ahead-of-time compiles.

    topo = resolve_topology("v5p-128")   # TpuTopology(generation='v5p', chips=64, shape=(4, 4, 4))
    devices = topology_devices(topo)    # abstract TPU devices (libtpu needed, no TPU)

Slice names follow Cloud TPU's accelerator types, GENERATION-N:
  v4-N, v5p-N    N counts TensorCores, 2 per chip (one megacore device per chip): v5p-128 = 64 chips
                 = v5p:4x4x4, v5p-64 = 32 chips = 2x4x4, v5p-8 = 4 chips = 2x2x1, v4-32 = 2x2x4.
                 3D tori from 4 chips (2x2x1) upwards, doubling the smallest dimension (the last of
                 equals): 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, 4x8x8, 8x8x8, ...
  v5e-N, v6e-N   N counts chips (one TensorCore each): v5e-16 = v5e:4x4, v6e-64 = v6e:8x8.
                 2D: 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16.
A libtpu topology string (e.g. "v5p:2x2x1", "v6e:2x2") is accepted as is.

HBM per chip (GiB, as JAX reports it): v4 32, v5e 16, v5p 95, v6e 32. Peak dense bf16 FLOP/s per
chip (public figures): v4 275T, v5e 197T, v5p 459T, v6e 918T.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    libtpu_name: str  # the generation prefix of libtpu topology strings
    hbm_gib: float  # HBM per chip (= per device: one device per chip)
    peak_bf16_flops: float  # per chip
    cores_in_name: int  # TensorCores per chip counted by the slice name (v4-8 = 4 chips)
    dims: int  # torus dimensions
    max_chips: int  # the largest slice


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32, 275e12, 2, 3, 4096),
    "v5e": Chip("v5e", 16, 197e12, 1, 2, 256),
    "v5p": Chip("v5p", 95, 459e12, 2, 3, 8960),
    "v6e": Chip("v6e", 32, 918e12, 1, 2, 256),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}


@dataclasses.dataclass(frozen=True)
class TpuTopology:
    name: str  # as the user gave it
    generation: str  # key of CHIPS
    shape: tuple[int, ...]  # chips per torus dimension

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def topology_string(self) -> str:
        return f"{self.chip.libtpu_name}:{'x'.join(map(str, self.shape))}"

    @property
    def hbm_bytes(self) -> int:
        return int(self.chip.hbm_gib * GIB)


def slice_shape(generation: str, chips: int) -> tuple[int, ...] | None:
    """The torus shape of a standard slice of `chips` chips, or None when there is none."""
    chip = CHIPS[generation]
    if chips == 1 and chip.dims == 2:
        return (1, 1)
    shape, n = ([2, 2] if chip.dims == 2 else [2, 2, 1]), 4
    while n < chips:
        smallest = min(shape)
        i = max(j for j, d in enumerate(shape) if d == smallest)
        shape[i] *= 2
        n *= 2
    return tuple(shape) if n == chips and chips <= chip.max_chips else None


def known_names(generation: str | None = None, up_to_chips: int = 256) -> list[str]:
    """Standard slice names (GENERATION-N) up to `up_to_chips` chips."""
    out = []
    for gen, chip in CHIPS.items():
        if generation not in (None, gen):
            continue
        n = 1
        while n <= min(up_to_chips, chip.max_chips):
            if slice_shape(gen, n) is not None:
                out.append(f"{gen}-{n * chip.cores_in_name}")
            n *= 2
    return out


def resolve_topology(name: str) -> TpuTopology:
    """'v5p-128' (slice name) or 'v5p:4x4x4' (libtpu string) -> TpuTopology; ValueError listing
    the known names otherwise."""
    text = name.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", text)
    if m:
        gen = ALIASES.get(m.group(1), m.group(1))
        shape = tuple(int(d) for d in m.group(2).split("x"))
        if gen in CHIPS and len(shape) == CHIPS[gen].dims and all(d >= 1 for d in shape):
            return TpuTopology(name, gen, shape)
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if m:
        gen = ALIASES.get(m.group(1), m.group(1))
        if gen in CHIPS:
            cores, chip = int(m.group(2)), CHIPS[gen]
            shape = (slice_shape(gen, cores // chip.cores_in_name)
                     if cores % chip.cores_in_name == 0 else None)
            if shape is not None:
                return TpuTopology(name, gen, shape)
    raise ValueError(
        f"unknown TPU topology {name!r}: use a Cloud TPU slice name ({', '.join(known_names())}, "
        "... ; v4/v5p count TensorCores, 2 per chip, v5e/v6e count chips) or a libtpu topology "
        "string such as v5p:2x2x1, v6e:2x2 (3D for v4/v5p, 2D for v5e/v6e)")


# device_kind (as JAX reports it, lower-cased) -> generation (key of CHIPS)
DEVICE_KINDS = {"tpu v4": "v4", "tpu v5 lite": "v5e", "tpu v5e": "v5e", "tpu v5": "v5p",
                "tpu v5p": "v5p", "tpu v6 lite": "v6e", "tpu v6e": "v6e"}


def slice_name(devices) -> str | None:
    """The Cloud TPU slice name ('v6e-64') of a full slice's devices (real ones from
    jax.devices(), or topology_devices' abstract ones), from their device_kind and count; None
    for other devices (CPU, GPU, an unknown kind, a count that is no standard slice)."""
    devices = list(devices)
    kind = str(getattr(devices[0], "device_kind", "")).strip().lower() if devices else ""
    gen = DEVICE_KINDS.get(kind)
    if gen is None or slice_shape(gen, len(devices)) is None:
        return None
    return f"{gen}-{len(devices) * CHIPS[gen].cores_in_name}"


def topology_devices(topo: TpuTopology | str) -> list:
    """Abstract (compile-only) devices of the topology, one per chip; needs libtpu, no TPU.
    ImportError / RuntimeError with the reason when libtpu is missing or refuses."""
    if isinstance(topo, str):
        topo = resolve_topology(topo)
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise ImportError(f"libtpu is not installed ({e}); pip install -e '.[aot]' (or "
                          "'libtpu==<the version jax[tpu] pins>')") from None
    # Compile-only: no TPU is opened, so several processes (tests, the benchmark) may load libtpu
    # at once; without this libtpu refuses while another process holds /tmp/libtpu_lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    kwargs = {}
    if topo.chip.cores_in_name == 2:  # one device per chip (megacore), as on the real slices
        kwargs["chip_config_name"] = "megacore"
    if topo.shape[0] < 2 or topo.shape[1] < 2:  # less than one host's 2x2x1 chips
        kwargs["chips_per_host_bounds"] = (min(topo.shape[0], 2), min(topo.shape[1], 2), 1)
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.topology_string,
                                        **kwargs)
    devices = list(desc.devices)
    if len(devices) != topo.chips:
        raise RuntimeError(f"{topo.topology_string}: libtpu gave {len(devices)} devices for "
                           f"{topo.chips} chips")
    return devices
