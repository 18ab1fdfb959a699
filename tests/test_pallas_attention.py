"""Pallas tree attention (GPU/Triton and TPU/Mosaic lowerings, interpreted on CPU) against the
dense reference: forward and dQ, dK, dV; its block schedules against brute force; the lowerings
to Triton and Mosaic IR; selection and sharding through tree_attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_block_sparse_attention import brute_force_kinds, make_ends

from kat_jax.ops.attention import (
    resolve_attention_impl,
    sharded_tree_attention,
    tree_attention,
    xla_dense_attention,
)
from kat_jax.ops.block_sparse import KIND_FULL, build_block_schedule
from kat_jax.ops.pallas import (
    KERNEL_KEYS,
    kernel_schedule,
    kernel_schedule_host,
    pallas_tree_attention,
    tpu_schedule,
    tpu_schedule_host,
)
from kat_jax.ops.pallas import gpu as pallas_gpu
from kat_jax.ops.pallas import schedule as pallas_schedule

H = 64


def make_inputs(seed, case, b, t, n, kv, h=H, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    ends = make_ends(case, rng, b, t)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, heads, h)), dtype)
               for heads in (n, kv, kv))
    dout = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
    return q, k, v, jnp.asarray(ends), dout


def out_and_grads(fn, q, k, v, dout):
    """(out, dq, dk, dv) of fn(q, k, v) with cotangent dout, in one jitted call."""
    def run(q, k, v, dout):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(dout))
    return jax.jit(run)(q, k, v, dout)


def assert_matches_dense(got, q, k, v, ends, dout, tol):
    want = out_and_grads(lambda q, k, v: xla_dense_attention(q, k, v, ends), q, k, v, dout)
    for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == w.shape and a.dtype == w.dtype, name
        a, w = np.asarray(a, np.float32), np.asarray(w, np.float32)
        if tol < 1e-4:
            np.testing.assert_allclose(a, w, rtol=tol, atol=tol, err_msg=name)
        else:  # bfloat16: relative to the norm of the reference
            assert np.linalg.norm(a - w) <= tol * np.linalg.norm(w), name


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("case", ["forest", "tree", "chain", "packed_chains", "padding"])
@pytest.mark.parametrize("bs", [4, 16])
def test_kernel_schedule_host_and_jit_agree_with_brute_force(case, bs):
    ends = make_ends(case, np.random.default_rng(bs), 3, 64)
    host = kernel_schedule_host(ends, bs)
    traced = jax.jit(kernel_schedule, static_argnums=1)(jnp.asarray(ends), bs)
    for key in KERNEL_KEYS:
        assert host[key].dtype == np.int32
        np.testing.assert_array_equal(host[key], np.asarray(traced[key]), err_msg=key)
    kinds = brute_force_kinds(ends, bs)                                  # [B, nb, nb]
    b, nb, _ = kinds.shape
    lists = host["q_kv_blocks"].reshape(b, nb, nb)
    for r in range(b):
        for i in range(nb):
            c = host["q_kv_count"][r, i]
            assert list(lists[r, i, :c]) == list(np.nonzero(kinds[r, i])[0])
            assert (lists[r, i, c:] == (lists[r, i, c - 1] if c else 0)).all()
        for j in range(nb):   # kv block j is seen by exactly the q blocks j .. kv_q_last[j]
            assert list(np.nonzero(kinds[r, :, j])[0]) == list(range(j, host["kv_q_last"][r, j] + 1))
            for i in range(j, host["kv_q_last"][r, j] + 1):
                full = j < i and (i + 1) * bs <= host["kv_min_end"][r, j]
                assert full == (kinds[r, i, j] == KIND_FULL)


def test_build_block_schedule_adds_kernel_lists_on_request():
    ends = make_ends("forest", np.random.default_rng(0), 2, 64)
    plain = build_block_schedule(ends, 16)
    both = build_block_schedule(ends, 16, kernel_lists=True)
    assert set(plain) == {"q_block", "k_block", "kind"}
    assert set(both) == set(plain) | set(KERNEL_KEYS)
    for key, value in kernel_schedule_host(ends, 16).items():
        np.testing.assert_array_equal(both[key], value)


# ---------------------------------------------------------------- GPU (Triton) lowering


@pytest.mark.parametrize("case,t,n,kv,bs,h", [
    ("forest", 96, 8, 8, 32, H),         # G = 1
    ("tree", 80, 8, 2, 32, H),           # G = 4, T not a multiple of the block
    ("packed_chains", 64, 8, 1, 32, H),  # G = 8
    ("chain", 64, 2, 2, 64, 256),        # causal, head_dim 256: the chosen tiles split the block
])
def test_gpu_lowering_forward_and_grads_equal_dense_f32(case, t, n, kv, bs, h):
    """Padded rows and subdivided tiles: test_gpu_kernel_in_subdivided_tiles_equals_dense_..."""
    if h == 256:
        assert pallas_gpu.choose_tiles(h, jnp.float32, bs).fwd_kv < bs
    q, k, v, ends, dout = make_inputs(t + n + kv, case, 2, t, n, kv, h=h)
    fn = lambda q, k, v: pallas_tree_attention(q, k, v, ends, block_size=bs,  # noqa: E731
                                               backend="gpu", interpret=True)
    assert_matches_dense(out_and_grads(fn, q, k, v, dout), q, k, v, ends, dout, 1e-5)


def test_gpu_lowering_bfloat16_within_one_percent_of_dense():
    q, k, v, ends, dout = make_inputs(5, "forest", 2, 64, 4, 1, dtype=jnp.bfloat16)
    fn = lambda q, k, v: pallas_tree_attention(q, k, v, ends, block_size=32,  # noqa: E731
                                               backend="gpu", interpret=True)
    assert_matches_dense(out_and_grads(fn, q, k, v, dout), q, k, v, ends, dout, 1e-2)


@pytest.mark.parametrize("h", [64, 128, 256])
def test_gpu_tiles_for_each_head_dim_and_dtype_obey_the_register_and_smem_budget(h):
    for dtype in (jnp.bfloat16, jnp.float32):
        for bs in (16, 64, 128, 512, 1024):
            tiles = pallas_gpu.choose_tiles(h, dtype, bs)
            sizes = [v for k, v in vars(tiles).items() if not k.startswith("num_")]
            assert all(s & (s - 1) == 0 and bs % s == 0 and 16 <= s <= 128 for s in sizes)
            for name, (regs, smem) in pallas_gpu.tile_budget(
                    tiles, h, jnp.dtype(dtype).itemsize).items():
                assert regs <= pallas_gpu.REGS_PER_THREAD, (h, dtype, bs, name, regs)
                assert smem <= pallas_gpu.SMEM_BYTES, (h, dtype, bs, name, smem)
        # the tiles do not grow with the packer's block size (a 512-row block is subdivided)
        assert pallas_gpu.choose_tiles(h, dtype, 512) == pallas_gpu.choose_tiles(h, dtype, 128)
    assert pallas_gpu.choose_tiles(256, jnp.bfloat16, 512).fwd_q == 64


def _mixed_rows(rng, t):
    """A tree, a causal chain and a padded row (a forest then one-token trees)."""
    return np.concatenate([make_ends("tree", rng, 1, t), make_ends("chain", rng, 1, t),
                           make_ends("padding", rng, 1, t)]).astype(np.int32)


def test_gpu_kernel_in_subdivided_tiles_equals_dense_on_trees_chains_padding_gqa():
    """16-row tiles inside 32-row blocks: q tiles split the schedule's blocks, kv sub-tiles split
    the listed blocks, the diagonal block stops at the tile's last query."""
    rng = np.random.default_rng(3)
    t, n, kv, h = 64, 4, 1, 32
    ends = jnp.asarray(_mixed_rows(rng, t))
    q, k, v, dout = (jnp.asarray(rng.standard_normal((3, t, heads, h)), jnp.float32)
                     for heads in (n, kv, kv, n))
    tiles = pallas_gpu.GpuTiles(16, 16, 16, 16, 16, 16, 4, 4, 2)
    fn = lambda q, k, v: pallas_tree_attention(q, k, v, ends, block_size=32,  # noqa: E731
                                               backend="gpu", interpret=True, gpu_tiles=tiles)
    assert_matches_dense(out_and_grads(fn, q, k, v, dout), q, k, v, ends, dout, 1e-5)


def test_gpu_kernels_compile_for_an_h100_target_or_skip_with_the_reason():
    """Part 2 of issue 20: compile the Triton kernels for compute capability 9.0 from this host.
    JAX 0.10.2 without the CUDA PJRT plugin has no compile-only GPU topology; the lowering to
    Triton IR is tested above (test_kernels_lower_to_triton_and_mosaic)."""
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc("1x1", platform="cuda")
    except Exception as e:  # noqa: BLE001 - the reason is the skip message
        pytest.skip(f"no GPU compile target from this host: {type(e).__name__}: {e}")
    q = jax.ShapeDtypeStruct((1, 256, 4, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    e = jax.ShapeDtypeStruct((1, 256), jnp.int32)
    mesh = topologies.make_mesh(topo, (1,), ("x",))
    loss = lambda q, k, v, e: pallas_tree_attention(q, k, v, e, backend="gpu",  # noqa: E731
                                                    interpret=False).sum()
    with jax.set_mesh(mesh):
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, e).lower().compile()


def test_gpu_lowering_takes_the_host_schedule_through_tree_attention():
    q, k, v, ends, dout = make_inputs(6, "forest", 2, 64, 4, 2)
    sched = {key: jnp.asarray(a)
             for key, a in build_block_schedule(np.asarray(ends), 16, kernel_lists=True).items()}
    fn = jax.jit(lambda q, k, v, s: tree_attention(q, k, v, ends, impl="pallas", schedule=s,
                                                   block_size=16))
    got = fn(q, k, v, sched)
    np.testing.assert_allclose(got, xla_dense_attention(q, k, v, ends), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- TPU (Mosaic) lowering


def test_tpu_schedule_lists_exactly_the_live_pairs_in_both_orders():
    rng = np.random.default_rng(1)
    ends = np.concatenate([_mixed_rows(rng, 64), np.zeros((1, 64), np.int32)])   # + a filler row
    host = tpu_schedule_host(ends, 16)
    traced = jax.jit(tpu_schedule, static_argnums=1)(jnp.asarray(ends), 16)
    for key, value in host.items():
        np.testing.assert_array_equal(value, np.asarray(traced[key]), err_msg=key)
    kinds = brute_force_kinds(ends, 16)
    b, nb, _ = kinds.shape
    assert host["tpu_pairs"].shape == (b, nb * (nb + 1) // 2)
    for r in range(b):
        live = (kinds[r] > 0) | np.eye(nb, dtype=bool)        # + the diagonal: every output
        n = host["tpu_num_pairs"][r]
        assert n == live.sum()
        by_q, by_kv = host["tpu_pairs"][r], host["tpu_pairs_t"][r]
        assert list(by_q[:n]) == [i * nb + j for i, j in zip(*np.nonzero(live))]
        assert list(by_kv[:n]) == [j * nb + i for j, i in zip(*np.nonzero(live.T))]
        assert (by_q[n:] == by_q[n - 1]).all() and (by_kv[n:] == by_kv[n - 1]).all()
    tight = int(host["tpu_num_pairs"].max())
    assert tpu_schedule_host(ends, 16, max_pairs=tight)["tpu_pairs"].shape == (b, tight)
    with pytest.raises(ValueError, match=f"over max_pairs={tight - 1}"):
        tpu_schedule_host(ends, 16, max_pairs=tight - 1)
    short = tpu_schedule(jnp.asarray(ends), 16, max_pairs=tight - 1)   # in jit: the true count,
    assert int(short["tpu_num_pairs"].max()) == tight                 # so the row's output is NaN
    with pytest.raises(ValueError, match="TPU_SMEM_WORDS"):
        pallas_schedule.check_tpu_smem(4, 256, 256 * 257 // 2)    # 4 rows of 32k at block 128


@pytest.mark.parametrize("case,n,kv,dtype", [("forest", 4, 1, jnp.float32),
                                             ("packed_chains", 2, 2, jnp.bfloat16)])
def test_tpu_lowering_forward_and_grads_equal_dense(case, n, kv, dtype):
    """The grid steps over live pairs only; the float32 case takes a host schedule as tight as the
    row allows (max_pairs = its live pairs)."""
    q, k, v, ends, dout = make_inputs(n * kv, case, 1, 256, n, kv, dtype=dtype)
    sched = None
    if dtype == jnp.float32:
        live = int(tpu_schedule_host(np.asarray(ends), 128)["tpu_num_pairs"].max())
        sched = {key: jnp.asarray(a) for key, a in
                 tpu_schedule_host(np.asarray(ends), 128, max_pairs=live).items()}
    fn = lambda q, k, v: pallas_tree_attention(q, k, v, ends, block_size=128,  # noqa: E731
                                               backend="tpu", interpret=True, schedule=sched)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert_matches_dense(out_and_grads(fn, q, k, v, dout), q, k, v, ends, dout, tol)


# ---------------------------------------------------------------- lowering to device IR


@pytest.mark.parametrize("backend,platform,h,kv", [("gpu", "cuda", 128, 2), ("gpu", "cuda", 64, 8),
                                                   ("tpu", "tpu", 128, 2), ("tpu", "tpu", 64, 8)])
def test_kernels_lower_to_triton_and_mosaic(backend, platform, h, kv):
    """Forward and backward lower for the real backends (Triton IR, Mosaic MLIR) from a CPU host;
    compiling that IR needs the device."""
    q = jax.ShapeDtypeStruct((1, 384, 8, h), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 384, kv, h), jnp.bfloat16)
    e = jax.ShapeDtypeStruct((1, 384), jnp.int32)

    def loss(q, k, v, e):
        out = pallas_tree_attention(q, k, v, e, block_size=128, backend=backend, interpret=False)
        return out.astype(jnp.float32).sum()

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, e).lower(
        lowering_platforms=(platform,)).as_text()
    assert text.count("tree_attention_") >= 3          # forward, dQ and dK/dV kernels


# ---------------------------------------------------------------- selection and sharding


def test_auto_picks_pallas_on_accelerators_and_block_sparse_on_cpu():
    assert resolve_attention_impl("auto", "cpu") == "xla_block_sparse"
    assert resolve_attention_impl("auto", "gpu") == "pallas"
    assert resolve_attention_impl("auto", "cuda", head_dim=128) == "pallas"
    assert resolve_attention_impl("auto", "tpu", head_dim=64) == "pallas"
    assert resolve_attention_impl("auto", "gpu", head_dim=24) == "xla_block_sparse"
    assert resolve_attention_impl("pallas", "cpu") == "pallas"
    assert resolve_attention_impl("auto") == "xla_block_sparse"         # this CPU host


def test_sharded_tree_attention_equals_unsharded():
    q, k, v, ends, _ = make_inputs(9, "forest", 2, 64, 4, 2)
    mesh = jax.make_mesh((1, 1), ("data", "tensor"))
    sched = {key: jnp.asarray(a) for key, a in build_block_schedule(np.asarray(ends), 32).items()}
    fn = jax.jit(lambda q, k, v, s: sharded_tree_attention(mesh, "data", "tensor")(
        q, k, v, ends, schedule=s, block_size=32))
    np.testing.assert_allclose(fn(q, k, v, sched), xla_dense_attention(q, k, v, ends),
                               rtol=1e-5, atol=1e-5)


SHARDED_SCRIPT = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType
from kat_jax.ops.attention import tree_attention, xla_dense_attention
rng = np.random.default_rng(0)
ends = np.stack([np.full(64, 64), np.repeat(np.arange(16, 65, 16), 16)]).astype(np.int32)
q = jnp.asarray(rng.standard_normal((2, 64, 4, 16)), jnp.float32)
k, v = (jnp.asarray(rng.standard_normal((2, 64, 2, 16)), jnp.float32) for _ in range(2))
want = xla_dense_attention(q, k, v, jnp.asarray(ends))
for types in ((AxisType.Auto,) * 2, (AxisType.Explicit,) * 2):
    mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=types)
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda q, k, v, e: tree_attention(q, k, v, e, impl="pallas", block_size=16))
        text = fn.trace(q, k, v, jnp.asarray(ends)).jaxpr.pretty_print()
        assert "shard_map" in text, types
        got = fn(q, k, v, jnp.asarray(ends))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
print("OK")
"""


def test_pallas_under_a_mesh_runs_in_shard_map_and_equals_dense():
    """tree_attention under jax.set_mesh((data=2, tensor=2)) shards the kernel over rows and heads
    (4 host devices, so in a subprocess)."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
