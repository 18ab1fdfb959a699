"""Rotary position embedding (RoPE) and its context-extension scalings, as transformers computes them.

    inv_freq, scale = rope_frequencies(cfg)           # float32[H/2], float: fixed by the config
    x = apply_rope(x, positions, inv_freq, scale)     # x [B, T, heads, H], positions int32[B, T]

`cfg.rope_type` names an entry of ROPE_TYPES (the one registry of the values ModelConfig accepts):

- `default`: inv_freq[i] = 1 / theta^(2i/H).
- `linear` (position interpolation): the default inv_freq divided by `rope_factor`.
- `yarn` (Peng et al. 2023, "YaRN"): per frequency, a ramp between interpolation (inv_freq /
  factor) for wavelengths longer than the original context and extrapolation (unchanged) for short
  ones, the ramp's ends set by `rope_beta_fast` / `rope_beta_slow` rotations over
  `rope_original_max_position_embeddings` (floored / ceiled unless `rope_truncate` is false); cos and
  sin are multiplied by the attention factor (`rope_attention_factor`, or 0.1 ln(factor) + 1, or the
  ratio of the two mscale terms when `rope_mscale` and `rope_mscale_all_dim` are both set).

The frequencies are computed on the host in float32 with the operations and order of
transformers.modeling_rope_utils (5.x), so they equal transformers' buffers (to float32 rounding of
the power function); applying them runs in float32 like the rest of RoPE. Dynamic NTK scaling
(`dynamic`) is not provided: transformers recomputes its frequencies from the longest position of
each forward call (and keeps them in module state), so no fixed embedding reproduces it for packed
rows or a KV cache; a config.json asking for it is rejected on import.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import jax

# the model's config (kat_jax.models.config.ModelConfig, which imports this module: not imported
# here, to keep the import graph acyclic); only its rope_* / head_dim / max_position keys are read
ModelConfig = Any

# ModelConfig keys only yarn reads, with their defaults (any other value is an error for other types).
YARN_DEFAULTS: dict[str, Any] = {
    "rope_original_max_position_embeddings": 0,
    "rope_beta_fast": 32.0,
    "rope_beta_slow": 1.0,
    "rope_attention_factor": None,
    "rope_mscale": 0.0,
    "rope_mscale_all_dim": 0.0,
    "rope_truncate": True,
}


def _default(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    h = cfg.head_dim
    exponent = np.arange(0, h, 2, dtype=np.float32) / np.float32(h)
    return (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32), 1.0


def _linear(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    inv_freq, _ = _default(cfg)
    return (inv_freq / np.float32(cfg.rope_factor)).astype(np.float32), 1.0


def yarn_original_max_positions(cfg: ModelConfig) -> int:
    """The pre-extension context yarn's ramp uses (0 in the config: max_position_embeddings, as
    transformers defaults it)."""
    return cfg.rope_original_max_position_embeddings or cfg.max_position_embeddings


def yarn_attention_factor(cfg: ModelConfig) -> float:
    """The factor yarn multiplies cos and sin by (transformers' `attention_scaling`)."""
    if cfg.rope_attention_factor is not None:
        return float(cfg.rope_attention_factor)

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    factor = cfg.rope_factor
    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
        return float(get_mscale(factor, cfg.rope_mscale) / get_mscale(factor, cfg.rope_mscale_all_dim))
    return get_mscale(factor)


def _yarn(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    dim, base, factor = cfg.head_dim, cfg.rope_theta, cfg.rope_factor
    original = yarn_original_max_positions(cfg)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers: prevent a singular ramp
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low))
                   / np.float32(high - low), 0, 1).astype(np.float32)
    extrapolation_factor = np.float32(1.0) - ramp
    inv_freq = (interpolation * (np.float32(1.0) - extrapolation_factor)
                + extrapolation * extrapolation_factor)
    return inv_freq.astype(np.float32), yarn_attention_factor(cfg)


# name -> (config -> (inv_freq float32[H/2], cos/sin factor)). The single source of the names.
ROPE_TYPES: dict[str, Callable[[ModelConfig], tuple[np.ndarray, float]]] = {
    "default": _default,
    "linear": _linear,
    "yarn": _yarn,
}


def rope_type_names() -> tuple[str, ...]:
    """Every value `rope_type` accepts."""
    return tuple(ROPE_TYPES)


def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inv_freq float32[head_dim / 2], attention_scaling) of the config's RoPE."""
    return ROPE_TYPES[cfg.rope_type](cfg)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray | jax.Array,
               attention_scaling: float = 1.0) -> jax.Array:
    """Rotary embedding in Hugging Face's rotate_half layout at explicit positions.

    x: [B, T, heads, H]; positions: int32[B, T] (tree depth); inv_freq: float32[H/2]. cos and sin are
    multiplied by attention_scaling (yarn; 1 otherwise). Computed in float32, returned in x's dtype.
    """
    import jax.numpy as jnp

    h = x.shape[-1]
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if attention_scaling != 1.0:
        cos, sin = cos * attention_scaling, sin * attention_scaling
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : h // 2], x32[..., h // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Hugging Face config.json <-> ModelConfig rope keys
def rope_from_hf(hf: dict[str, Any], path: str) -> dict[str, Any]:
    """The ModelConfig rope keys of a config.json, read as transformers reads them: the scaling block
    is `rope_scaling` (older files) or else `rope_parameters` (transformers 5), its type is
    `rope_type` or `type`, rope_theta comes from the block or the top level (10000 when absent).
    Only values transformers acts on are kept. Unsupported types (dynamic, longrope, llama3, ...) and
    partial rotary factors are errors naming the key."""
    scaling, params = hf.get("rope_scaling"), hf.get("rope_parameters")
    key, block = ("rope_scaling", scaling) if scaling else ("rope_parameters", params or {})
    if not isinstance(block, dict):
        raise ValueError(f"{path}: key '{key}' must be an object, got {block!r}")
    kind = block.get("rope_type", block.get("type")) or "default"
    theta = block.get("rope_theta", hf.get("rope_theta"))
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    out: dict[str, Any] = {"rope_theta": float(10000.0 if theta is None else theta)}
    if kind == "dynamic":
        raise ValueError(
            f"{path}: key '{key}' has rope_type 'dynamic' (dynamic NTK scaling), which is not "
            "supported: transformers recomputes its frequencies from the longest position of each "
            "forward call, which no fixed embedding reproduces for packed rows or a KV cache; "
            f"supported rope types: {list(ROPE_TYPES)}")
    if kind not in ROPE_TYPES:
        raise ValueError(f"{path}: key '{key}' has rope_type {kind!r}; supported rope types: "
                         f"{list(ROPE_TYPES)}")
    if kind == "default":
        return out
    partial = block.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"{path}: key 'partial_rotary_factor' is {partial!r}; only full rotary "
                         "embeddings (1.0) are supported")
    out["rope_type"] = kind
    factor = block.get("factor")
    max_pos = int(hf.get("max_position_embeddings", 32768))
    if kind == "linear":
        if factor is None:
            raise ValueError(f"{path}: key '{key}' (rope_type 'linear') is missing 'factor'")
        out["rope_factor"] = float(factor)
        return out
    # yarn: a top-level original_max_position_embeddings takes priority (transformers, Phi3 style)
    original = hf.get("original_max_position_embeddings",
                      block.get("original_max_position_embeddings")) or max_pos
    out["rope_original_max_position_embeddings"] = int(original)
    out["rope_factor"] = float(max_pos / original if factor is None else factor)
    out["rope_beta_fast"] = float(block.get("beta_fast") or 32.0)
    out["rope_beta_slow"] = float(block.get("beta_slow") or 1.0)
    out["rope_truncate"] = bool(block.get("truncate", True))
    attention_factor = block.get("attention_factor")
    if attention_factor is not None:
        out["rope_attention_factor"] = float(attention_factor)
    elif block.get("mscale") and block.get("mscale_all_dim"):  # transformers ignores one alone
        out["rope_mscale"] = float(block["mscale"])
        out["rope_mscale_all_dim"] = float(block["mscale_all_dim"])
    return out


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """`rope_theta` and `rope_scaling` for config.json (read by transformers 4.x and 5.x and vLLM);
    rope_scaling is null for the default RoPE."""
    out: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_scaling": None}
    if cfg.rope_type == "default":
        return out
    block: dict[str, Any] = {"rope_type": cfg.rope_type, "factor": cfg.rope_factor}
    if cfg.rope_type == "yarn":
        block["original_max_position_embeddings"] = yarn_original_max_positions(cfg)
        block["beta_fast"] = cfg.rope_beta_fast
        block["beta_slow"] = cfg.rope_beta_slow
        if cfg.rope_attention_factor is not None:
            block["attention_factor"] = cfg.rope_attention_factor
        if cfg.rope_mscale and cfg.rope_mscale_all_dim:
            block["mscale"] = cfg.rope_mscale
            block["mscale_all_dim"] = cfg.rope_mscale_all_dim
        if not cfg.rope_truncate:
            block["truncate"] = False
    out["rope_scaling"] = block
    return out
