"""`auto` attention picks by platform and row shape: dense where block sparsity cannot pay (rows of
at most 4 blocks), block-sparse for longer rows on CPU, the Pallas kernel on GPU/TPU; the compiled
program follows the choice (shapes only, no timing)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.ops.attention import dense_is_cheaper, resolve_attention_impl, tree_attention


@pytest.mark.parametrize("row_len,block,want", [
    (128, 128, "xla_dense"),          # 1 block
    (384, 128, "xla_dense"),          # 3 blocks
    (512, 128, "xla_dense"),          # 4 blocks: 16 pairs = one scan step
    (768, 128, "xla_block_sparse"),   # 6 blocks
    (1536, 128, "xla_block_sparse"),
    (96, 128, "xla_dense"),           # block 32 (largest power of two dividing 96): 3 blocks
    (256, 32, "xla_block_sparse"),    # 8 blocks of 32
    (64, 16, "xla_dense"),            # 4 blocks of 16
])
def test_auto_on_cpu_is_dense_for_short_rows_and_block_sparse_for_long(row_len, block, want):
    assert resolve_attention_impl("auto", "cpu", 64, row_len=row_len, block_size=block) == want
    assert dense_is_cheaper(row_len, block) == (want == "xla_dense")


def test_auto_on_devices_and_explicit_names_ignore_the_shape():
    for platform in ("gpu", "tpu"):
        assert resolve_attention_impl("auto", platform, 128, row_len=128) == "pallas"
        # head dims the kernels are not built for: the XLA paths, by shape
        assert resolve_attention_impl("auto", platform, 24, row_len=128) == "xla_dense"
        assert resolve_attention_impl("auto", platform, 24, row_len=4096) == "xla_block_sparse"
    assert resolve_attention_impl("auto", "cpu", 64) == "xla_block_sparse"  # shape unknown
    for name in ("xla_dense", "xla_block_sparse", "pallas"):
        assert resolve_attention_impl(name, "cpu", 64, row_len=128) == name


def _program(row_len: int) -> str:
    """The jaxpr of auto tree attention over one causal row of row_len tokens (block 128)."""
    q = jnp.zeros((1, row_len, 4, 64), jnp.float32)
    k = jnp.zeros((1, row_len, 2, 64), jnp.float32)
    end = jnp.full((1, row_len), row_len, jnp.int32)
    return str(jax.make_jaxpr(lambda q, k, v, e: tree_attention(
        q, k, v, e, impl="auto", block_size=128))(q, k, k, end))


def test_auto_compiles_the_chosen_implementation():
    """Short rows compile to the dense path (no block loop), long rows to the block-sparse scan
    (a while loop over chunks of block pairs); both equal the dense reference."""
    assert "while" not in _program(512)
    assert "while" in _program(1024)
    rng = np.random.default_rng(0)
    t = 1024
    q = jnp.asarray(rng.standard_normal((1, t, 4, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, t, 2, 64)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, t, 2, 64)), jnp.float32)
    end = jnp.full((1, t), t, jnp.int32)
    got = tree_attention(q, k, v, end, impl="auto", block_size=128)
    ref = tree_attention(q, k, v, end, impl="xla_dense")
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
