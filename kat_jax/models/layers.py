"""Building blocks of the Qwen2/Qwen3 decoder (Flax NNX).

Modules are named like their Hugging Face counterparts (self_attn.q_proj, mlp.gate_proj, ...) so that
checkpoint conversion is a table. Weights are stored input-major for einsums, with shape suffixes in
the names of locals: q kernel [D, N, H], k/v kernels [D, K, H], o kernel [N, H, D], MLP kernels [D, F]
and [F, D]. Every parameter carries `logical_axes` metadata (names, one per dimension) that the
training issue maps to mesh axes with a short rule table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from kat_jax.models.config import ModelConfig
from kat_jax.models.rope import apply_rope, rope_frequencies
from kat_jax.ops.attention import tree_attention
from kat_jax.ops.paged_attention import paged_attention, paged_write

DTYPE = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype, std: float | None,
          fill: float = 0.0) -> nnx.Param:
    """A parameter drawn from N(0, std^2) (or filled with `fill` when std is None)."""
    assert len(shape) == len(axes), (shape, axes)
    if std is None:
        value = jnp.full(shape, fill, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 (as Hugging Face does), cast back
    to the input dtype before the weight is applied."""

    def __init__(self, dim: int, eps: float, param_dtype, axis_name: str, rngs: nnx.Rngs):
        self.weight = param(rngs, (dim,), (axis_name,), param_dtype, None, fill=1.0)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return self.weight[...].astype(x.dtype) * y


class Projection(nnx.Module):
    """y = einsum(spec, x, kernel) (+ bias): a dense layer with a named einsum."""

    def __init__(self, spec: str, shape: tuple[int, ...], axes: tuple[str, ...], cfg: ModelConfig,
                 rngs: nnx.Rngs, bias_shape: tuple[int, ...] | None = None,
                 bias_axes: tuple[str, ...] | None = None):
        pd = DTYPE[cfg.param_dtype]
        self.spec = spec
        self.kernel = param(rngs, shape, axes, pd, 0.02)
        self.bias = param(rngs, bias_shape, bias_axes, pd, None) if bias_shape else None
        self.dtype = DTYPE[cfg.dtype]

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum(self.spec, x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Attention(nnx.Module):
    """Grouped-query self-attention with explicit head_dim, RoPE at `positions`, tree mask."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.qkv_bias
        self.q_proj = Projection("btd,dnh->btnh", (d, n, h), ("embed", "q_heads", "head_dim"), cfg,
                                 rngs, (n, h) if bias else None, ("q_heads", "head_dim"))
        self.k_proj = Projection("btd,dkh->btkh", (d, k, h), ("embed", "kv_heads", "head_dim"), cfg,
                                 rngs, (k, h) if bias else None, ("kv_heads", "head_dim"))
        self.v_proj = Projection("btd,dkh->btkh", (d, k, h), ("embed", "kv_heads", "head_dim"), cfg,
                                 rngs, (k, h) if bias else None, ("kv_heads", "head_dim"))
        self.o_proj = Projection("btnh,nhd->btd", (n, h, d), ("q_heads", "head_dim", "embed"), cfg,
                                 rngs)
        pd = DTYPE[cfg.param_dtype]
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg.rms_norm_eps, pd, "head_dim", rngs)
            self.k_norm = RMSNorm(h, cfg.rms_norm_eps, pd, "head_dim", rngs)
        else:
            self.q_norm = self.k_norm = None
        inv_freq, self.rope_scaling = rope_frequencies(cfg)  # fixed by the config (host)
        self.rope_inv_freq = tuple(float(f) for f in inv_freq)  # static: float32 values exactly
        self.attention_impl = cfg.attention_impl
        self.block_size = cfg.attention_block_size

    def rope(self, x_bthh: jax.Array, positions_bt: jax.Array) -> jax.Array:
        """The config's RoPE (kat_jax.models.rope) of q or k [B, T, heads, H] at positions [B, T]:
        the one path of the packed-tree forward and the KV-cached sampler."""
        return apply_rope(x_bthh, positions_bt, np.asarray(self.rope_inv_freq, np.float32),
                          self.rope_scaling)

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, subtree_end_bt: jax.Array,
                 schedule: dict | None = None) -> jax.Array:
        q_btnh, k_btkh, v_btkh = self.q_proj(x_btd), self.k_proj(x_btd), self.v_proj(x_btd)
        if self.q_norm is not None:
            q_btnh, k_btkh = self.q_norm(q_btnh), self.k_norm(k_btkh)
        q_btnh, k_btkh = self.rope(q_btnh, positions_bt), self.rope(k_btkh, positions_bt)
        out_btnh = tree_attention(q_btnh, k_btkh, v_btkh, subtree_end_bt, impl=self.attention_impl,
                                  schedule=schedule, block_size=self.block_size)
        out_btnh = checkpoint_name(out_btnh, "attention_out")
        return self.o_proj(out_btnh)

    def paged(self, x_btd: jax.Array, positions_bt: jax.Array, pool_k: jax.Array,
              pool_v: jax.Array, slots_bt: jax.Array, block_tables: jax.Array,
              attention=paged_attention) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Causal attention of new tokens x [B, T, D] (at positions [B, T]) over a paged KV cache
        (kat_jax.ops.paged_attention): the new keys and values are written at slots [B, T] first,
        then the query at position p of row b sees the row's positions 0 .. p through its block
        table int32[B, M]. attention: paged_attention (the XLA gather path) or a function of the
        same signature (kat_jax.ops.pallas.paged.pallas_paged_attention). Returns
        (out [B, T, D], pool_k, pool_v)."""
        q_btnh, k_btkh, v_btkh = self.q_proj(x_btd), self.k_proj(x_btd), self.v_proj(x_btd)
        if self.q_norm is not None:
            q_btnh, k_btkh = self.q_norm(q_btnh), self.k_norm(k_btkh)
        q_btnh, k_btkh = self.rope(q_btnh, positions_bt), self.rope(k_btkh, positions_bt)
        pool_k = paged_write(pool_k, k_btkh, slots_bt)
        pool_v = paged_write(pool_v, v_btkh, slots_bt)
        out_btnh = attention(q_btnh, pool_k, pool_v, block_tables, positions_bt)
        # o_proj as one [B, T, N * H] x [N * H, D] contraction (a reshape of the kernel, no copy):
        # with two contracting dims XLA:CPU transposed the kernel inside the decode loop, every
        # step. The same products and sums as self.o_proj(out_btnh).
        b, t, n, h = out_btnh.shape
        dtype = self.o_proj.dtype
        kernel = self.o_proj.kernel[...].astype(dtype).reshape(n * h, -1)
        out_btd = jnp.einsum("btf,fd->btd", out_btnh.reshape(b, t, n * h).astype(dtype), kernel)
        return out_btd, pool_k, pool_v


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Projection("btd,df->btf", (d, f), ("embed", "mlp"), cfg, rngs)
        self.up_proj = Projection("btd,df->btf", (d, f), ("embed", "mlp"), cfg, rngs)
        self.down_proj = Projection("btf,fd->btd", (f, d), ("mlp", "embed"), cfg, rngs)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x_btd)) * self.up_proj(x_btd))


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = DTYPE[cfg.param_dtype]
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, "embed", rngs)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, "embed", rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, subtree_end_bt: jax.Array,
                 schedule: dict | None = None) -> jax.Array:
        x_btd = x_btd + self.self_attn(self.input_layernorm(x_btd), positions_bt, subtree_end_bt,
                                       schedule)
        return x_btd + self.mlp(self.post_attention_layernorm(x_btd))

    def paged(self, x, positions, pool_k, pool_v, slots, block_tables, attention=paged_attention):
        """As __call__ for new tokens over a paged KV cache (Attention.paged); returns
        (x, pool_k, pool_v)."""
        a, pool_k, pool_v = self.self_attn.paged(self.input_layernorm(x), positions, pool_k,
                                                 pool_v, slots, block_tables, attention)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), pool_k, pool_v
