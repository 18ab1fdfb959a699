"""Pallas tree attention: one custom VJP over the GPU (Triton) and TPU (Mosaic) kernels.

Rule (ARCHITECTURE.md): query q may see key k iff  k <= q < subtree_end[k]  (queries and keys are
the same tokens of a row, DFS pre-order; padding tokens are one-token trees).

Shapes: q: [B, T, N, H], k and v: [B, T, K, H] (GQA: query head n reads kv head n // G,
G = N // K), subtree_end: int32[B, T]. Output [B, T, N, H] in q's dtype; bfloat16 or float32
inputs; scores, softmax statistics and all accumulators are float32. Forward saves the
log-sum-exp (float32) for the backward, which computes dQ, dK and dV in Pallas kernels
(kat_jax.ops.pallas.gpu / .tpu describe them); subtree_end and the schedule get no gradient.

Exact: the block classification (empty / partial / full) is exact, so the result and its
gradients equal the dense reference `xla_dense_attention` up to float rounding (the online
softmax reorders float32 sums). A query that sees no key (impossible for valid trees) gets 0.

Block size bs: `effective_block_size(block_size, T)` (as the data packer uses) when it suits the
backend (>= 16 on GPU, a multiple of 128 on TPU), else T is padded with one-token trees up to a
multiple of a suitable bs. The kernel schedule (kat_jax.ops.pallas.schedule) comes from
`schedule` when it holds the KERNEL_KEYS arrays (GPU; build_block_schedule adds them with
kernel_lists=True) or the TPU_KEYS arrays (TPU; schedule.tpu_schedule_host) for that bs, and is
otherwise computed inside jit from subtree_end (cheap: O(B * nb^2)). The GPU kernels subdivide
each block into tiles chosen per head_dim and dtype (gpu.choose_tiles); the TPU kernels step over
the live block pairs only.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from kat_jax.ops.pallas.schedule import KERNEL_KEYS, TPU_KEYS, kernel_schedule, tpu_schedule
from kat_jax.ops.tree_mask import current_platform, effective_block_size

BACKENDS = ("gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class _Static:
    backend: str
    bs: int
    scale: float
    interpret: bool
    gpu_tiles: object = None       # kat_jax.ops.pallas.gpu.GpuTiles, None: choose_tiles


def _module(backend: str):
    if backend == "gpu":
        import kat_jax.ops.pallas.gpu as gpu
        return gpu
    import kat_jax.ops.pallas.tpu as tpu
    return tpu


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st: _Static, q, k, v, end, sched):
    return _attention_fwd(st, q, k, v, end, sched)[0]


def _options(st: _Static) -> dict:
    return {"tiles": st.gpu_tiles} if st.backend == "gpu" else {}


def _attention_fwd(st: _Static, q, k, v, end, sched):
    out, lse = _module(st.backend).forward(q, k, v, end, sched, bs=st.bs, scale=st.scale,
                                           interpret=st.interpret, **_options(st))
    return out, (q, k, v, end, sched, out, lse)


def _attention_bwd(st: _Static, res, dout):
    q, k, v, end, sched, out, lse = res
    dq, dk, dv = _module(st.backend).backward(q, k, v, end, sched, out, lse, dout, bs=st.bs,
                                              scale=st.scale, interpret=st.interpret,
                                              **_options(st))
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def default_backend(platform: str | None = None) -> tuple[str, bool]:
    """(kernel lowering, interpret) for a platform ('cpu', 'gpu'/'cuda', 'tpu'; default: the
    platform of the mesh set with jax.set_mesh, else JAX's default backend). CPU runs the GPU
    lowering interpreted (the faster interpreter)."""
    platform = current_platform(platform)
    if platform == "tpu":
        return "tpu", False
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu", False
    return "gpu", True


def _block_size(backend: str, block_size: int, t: int) -> int:
    bs = effective_block_size(block_size, t)
    if backend == "tpu":
        return bs if bs % 128 == 0 else max(128, block_size // 128 * 128)
    if bs >= 16:
        return bs
    return max(16, min(int(block_size), 1 << max(0, t - 1).bit_length()))


def pallas_tree_attention(q: jax.Array, k: jax.Array, v: jax.Array, subtree_end: jax.Array, *,
                          scale: float | None = None, schedule: dict | None = None,
                          block_size: int = 128, backend: str | None = None,
                          interpret: bool | None = None, gpu_tiles=None,
                          max_pairs: int | None = None) -> jax.Array:
    """Tree attention by the Pallas kernels (see module docstring). Jittable, differentiable.

    backend: 'gpu' (Triton) or 'tpu' (Mosaic); default from the platform (CPU: 'gpu').
    interpret: run the kernels interpreted on CPU (default: True on CPU only; the TPU lowering
    then uses the TPU interpret mode, pltpu.InterpretParams).
    gpu_tiles: a kat_jax.ops.pallas.gpu.GpuTiles (default: gpu.choose_tiles from head_dim, dtype
    and the block size).
    max_pairs: TPU only: the most live block pairs of a row (default: the causal count, never
    exceeded); the grid has B * N * max_pairs steps. A row with more gets NaN output (build the
    schedule with schedule.tpu_schedule_host to get an error naming the limit instead)."""
    if backend is None:
        backend, auto_interpret = default_backend()
    else:
        auto_interpret = default_backend()[1]
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    interpret = auto_interpret if interpret is None else bool(interpret)
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    if k.shape != (b, t, kv_heads, h) or v.shape != k.shape or subtree_end.shape != (b, t):
        raise ValueError(f"q, k, v and subtree_end must share B, T (and k, v the shape): q {q.shape}"
                         f", k {k.shape}, v {v.shape}, subtree_end {subtree_end.shape}")
    if n % kv_heads:
        raise ValueError(f"query heads ({n}) must be a multiple of kv heads ({kv_heads})")
    if not interpret and backend == "gpu" and (h & (h - 1) or h < 16):
        raise ValueError(f"the Triton kernels need a power-of-two head dim >= 16, got {h}")
    scale = float(h ** -0.5 if scale is None else scale)
    bs = _block_size(backend, int(block_size), t)
    end = subtree_end.astype(jnp.int32)
    t_pad = -(-t // bs) * bs
    if t_pad != t:
        pad = ((0, 0), (0, t_pad - t), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
        own = jnp.broadcast_to(jnp.arange(t + 1, t_pad + 1, dtype=jnp.int32), (b, t_pad - t))
        end = jnp.concatenate([end, own], axis=1)
    nb = t_pad // bs
    keys, given = (TPU_KEYS, "tpu_num_pairs") if backend == "tpu" else (KERNEL_KEYS, "q_kv_count")
    if (t_pad == t and schedule is not None and all(key in schedule for key in keys)
            and schedule["kv_min_end"].shape == (b, nb) and schedule[given].shape[0] == b):
        sched = {key: jnp.asarray(schedule[key], jnp.int32) for key in keys}
    elif backend == "tpu":
        sched = tpu_schedule(end, bs, max_pairs)
    else:
        sched = kernel_schedule(end, bs)
    out = _attention(_Static(backend, bs, scale, interpret, gpu_tiles), q, k, v, end, sched)
    if backend == "tpu":   # rows with more live pairs than the schedule holds: NaN, never wrong
        over = sched["tpu_num_pairs"] > sched["tpu_pairs"].shape[1]
        out = jnp.where(over[:, None, None, None], jnp.nan, out)
    return out[:, :t]
