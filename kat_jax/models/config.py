"""Model configuration for the Qwen2 / Qwen3 decoder family, and named presets.

A `ModelConfig` is a frozen dataclass. It serialises to and from JSON (the file `model_config.json`
beside every kat_jax checkpoint) and converts from a Hugging Face `config.json`.

Shapes of the presets are those of the public `config.json` files of the Hugging Face repositories
named in each preset's docstring.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

from kat_jax.models.remat import remat_policy_names
from kat_jax.models.rope import YARN_DEFAULTS, rope_from_hf, rope_to_hf, rope_type_names
from kat_jax.ops.attention_impls import attention_impl_names

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a decoder.

    family: "qwen2" (bias on q/k/v, no q/k norm) or "qwen3" (RMSNorm on q and k per head).
    head_dim is explicit: Qwen3 has num_heads * head_dim != hidden_size.
    param_dtype: storage dtype of the parameters; dtype: compute dtype of activations and matmuls.
    Norms, RoPE, softmax and log-softmax always run in float32.
    rope_type: "default", "linear" or "yarn" (kat_jax.models.rope; as transformers computes them).
    rope_factor is read by linear and yarn; the other rope_* keys by yarn only (a non-default value
    for another type is an error). rope_original_max_position_embeddings 0 means
    max_position_embeddings; rope_attention_factor None means derived from the factor (and
    rope_mscale / rope_mscale_all_dim when both are set).
    """

    family: str = "qwen3"
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    qkv_bias: bool = False
    qk_norm: bool = True
    max_position_embeddings: int = 2048
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_original_max_position_embeddings: int = 0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_attention_factor: float | None = None
    rope_mscale: float = 0.0
    rope_mscale_all_dim: float = 0.0
    rope_truncate: bool = True
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat_policy: str = "none"
    attention_impl: str = "auto"
    # Block size of block-sparse attention (a power of two; rows shorter than it use their length).
    attention_block_size: int = 128
    # Tokens the output head is evaluated on at a time when computing log-probs (memory bound).
    vocab_chunk_size: int = 4096

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def bad(key: str, why: str):
            raise ValueError(f"model config: key '{key}' {why}")

        if self.family not in ("qwen2", "qwen3"):
            bad("family", f"must be 'qwen2' or 'qwen3', got {self.family!r}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "max_position_embeddings", "vocab_chunk_size",
                    "attention_block_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                bad(key, f"must be a positive integer, got {value!r}")
        if self.attention_block_size & (self.attention_block_size - 1):
            bad("attention_block_size", f"must be a power of two, got {self.attention_block_size}")
        if self.num_heads % self.num_kv_heads:
            bad("num_kv_heads", f"({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        if self.param_dtype not in DTYPES:
            bad("param_dtype", f"must be one of {DTYPES}, got {self.param_dtype!r}")
        if self.dtype not in DTYPES:
            bad("dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        if self.remat_policy not in remat_policy_names():
            bad("remat_policy", f"must be one of {remat_policy_names()}, got {self.remat_policy!r}")
        if self.attention_impl not in attention_impl_names():
            bad("attention_impl",
                f"must be one of {attention_impl_names()}, got {self.attention_impl!r}")
        if self.family == "qwen2" and (not self.qkv_bias or self.qk_norm):
            bad("family", "qwen2 has bias on q/k/v and no q/k norm (qkv_bias=True, qk_norm=False)")
        if self.family == "qwen3" and (self.qkv_bias or not self.qk_norm):
            bad("family", "qwen3 has q/k RMSNorm and no attention bias (qk_norm=True, "
                "qkv_bias=False)")
        if not self.rope_theta > 0:
            bad("rope_theta", f"must be positive, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            bad("rms_norm_eps", f"must be positive, got {self.rms_norm_eps!r}")
        self._validate_rope(bad)

    def _validate_rope(self, bad: Callable[[str, str], None]) -> None:
        if self.rope_type not in rope_type_names():
            bad("rope_type", f"must be one of {rope_type_names()}, got {self.rope_type!r}")
        if self.head_dim % 2:
            bad("head_dim", f"must be even for RoPE, got {self.head_dim}")
        if (isinstance(self.rope_factor, bool) or not isinstance(self.rope_factor, (int, float))
                or not self.rope_factor > 0):
            bad("rope_factor", f"must be a positive number, got {self.rope_factor!r}")
        if self.rope_type == "default" and self.rope_factor != 1.0:
            bad("rope_factor", f"is {self.rope_factor!r} but rope_type 'default' does not scale "
                "(set rope_type to 'linear' or 'yarn')")
        if self.rope_type != "yarn":
            for key, default in YARN_DEFAULTS.items():
                if getattr(self, key) != default:
                    bad(key, f"is {getattr(self, key)!r} but only rope_type 'yarn' reads it "
                        f"(rope_type is {self.rope_type!r})")
            return
        orig = self.rope_original_max_position_embeddings
        if not isinstance(orig, int) or isinstance(orig, bool) or orig < 0:
            bad("rope_original_max_position_embeddings",
                f"must be a non-negative integer (0: max_position_embeddings), got {orig!r}")
        for key in ("rope_beta_fast", "rope_beta_slow"):
            if not getattr(self, key) > 0:
                bad(key, f"must be positive, got {getattr(self, key)!r}")
        if self.rope_attention_factor is not None and not self.rope_attention_factor > 0:
            bad("rope_attention_factor", f"must be positive or null, got "
                f"{self.rope_attention_factor!r}")
        mscales = (self.rope_mscale, self.rope_mscale_all_dim)
        if any(mscales) and not all(mscales):
            key = "rope_mscale" if self.rope_mscale else "rope_mscale_all_dim"
            bad(key, "acts only together with the other of rope_mscale / rope_mscale_all_dim "
                "(transformers ignores one alone)")
        if any(mscales) and self.rope_attention_factor is not None:
            bad("rope_mscale", "is ignored when rope_attention_factor is set (transformers)")

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **kwargs: Any) -> ModelConfig:
        unknown = set(kwargs) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise KeyError(f"model config: unknown key(s) {sorted(unknown)}")
        return dataclasses.replace(self, **kwargs)

    def num_params(self) -> int:
        d, f, v, n, k, h = (self.hidden_size, self.intermediate_size, self.vocab_size,
                            self.num_heads, self.num_kv_heads, self.head_dim)
        attn = d * n * h + 2 * d * k * h + n * h * d
        if self.qkv_bias:
            attn += n * h + 2 * k * h
        if self.qk_norm:
            attn += 2 * h
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + self.num_layers * layer + d + head

    # ---- serialisation ----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model config") -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise KeyError(f"{source}: unknown key(s) {unknown}")
        return cls(**data)

    def save_json(self, path: str) -> None:
        from kat_jax import storage

        storage.write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load_json(cls, path: str) -> ModelConfig:
        from kat_jax import storage

        try:
            data = json.loads(storage.read_text(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(data, source=path)


# ---------------------------------------------------------------------------------------------
# Presets: a registry of named constructors (no if/else chains).
PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def register_preset(name: str):
    def deco(fn: Callable[[], ModelConfig]):
        PRESETS[name] = fn
        return fn

    return deco


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg


@register_preset("tiny")
def tiny() -> ModelConfig:
    """CPU tests and the embedded default: byte-level vocabulary (256 bytes + specials)."""
    return ModelConfig(family="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                       tie_word_embeddings=True, max_position_embeddings=4096, vocab_chunk_size=256,
                       attention_block_size=32)


def _qwen3(**kw: Any) -> ModelConfig:
    base = dict(family="qwen3", vocab_size=151936, head_dim=128, rope_theta=1_000_000.0,
                rms_norm_eps=1e-6, qkv_bias=False, qk_norm=True, max_position_embeddings=40960,
                param_dtype="bfloat16", dtype="bfloat16")
    base.update(kw)
    return ModelConfig(**base)


def _qwen2(**kw: Any) -> ModelConfig:
    base = dict(family="qwen2", vocab_size=152064, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                qkv_bias=True, qk_norm=False, tie_word_embeddings=False,
                max_position_embeddings=131072, param_dtype="bfloat16", dtype="bfloat16")
    base.update(kw)
    return ModelConfig(**base)


@register_preset("qwen3_0_6b")
def qwen3_0_6b() -> ModelConfig:
    """Qwen/Qwen3-0.6B."""
    return _qwen3(hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16,
                  num_kv_heads=8, tie_word_embeddings=True)


@register_preset("qwen3_1_7b")
def qwen3_1_7b() -> ModelConfig:
    """Qwen/Qwen3-1.7B."""
    return _qwen3(hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16,
                  num_kv_heads=8, tie_word_embeddings=True)


@register_preset("qwen3_8b")
def qwen3_8b() -> ModelConfig:
    """Qwen/Qwen3-8B."""
    return _qwen3(hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
                  num_kv_heads=8, tie_word_embeddings=False)


@register_preset("qwen3_32b")
def qwen3_32b() -> ModelConfig:
    """Qwen/Qwen3-32B."""
    return _qwen3(hidden_size=5120, intermediate_size=25600, num_layers=64, num_heads=64,
                  num_kv_heads=8, tie_word_embeddings=False)


@register_preset("kat_dev_32b")
def kat_dev_32b() -> ModelConfig:
    """Kwaipilot/KAT-Dev: a Qwen3-32B decoder (same shapes)."""
    return qwen3_32b()


@register_preset("qwen2_5_7b")
def qwen2_5_7b() -> ModelConfig:
    """Qwen/Qwen2.5-7B (head_dim = hidden / heads = 128)."""
    return _qwen2(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                  num_kv_heads=4, head_dim=128)


@register_preset("qwen2_5_32b")
def qwen2_5_32b() -> ModelConfig:
    """Qwen/Qwen2.5-32B (head_dim = 128)."""
    return _qwen2(hidden_size=5120, intermediate_size=27648, num_layers=64, num_heads=40,
                  num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5)


# ---------------------------------------------------------------------------------------------
# Hugging Face config.json <-> ModelConfig
HF_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


def from_hf_config(hf: dict[str, Any], path: str = "config.json", **overrides: Any) -> ModelConfig:
    """Convert a Hugging Face Qwen2/Qwen3 `config.json` dict. Unknown architectures are errors."""
    archs = hf.get("architectures") or []
    family = None
    for arch in archs:
        family = HF_ARCHITECTURES.get(arch)
        if family:
            break
    if family is None:
        model_type = hf.get("model_type")
        family = model_type if model_type in ("qwen2", "qwen3") else None
    if family is None:
        raise ValueError(f"{path}: unsupported architecture {archs or hf.get('model_type')!r}; "
                         f"supported: {sorted(HF_ARCHITECTURES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: key 'hidden_act' is {hf['hidden_act']!r}; only 'silu' is supported")
    if family == "qwen3" and hf.get("attention_bias", False):
        raise ValueError(f"{path}: key 'attention_bias' is true; Qwen3 with attention biases "
                         "(also on o_proj) is not supported")
    if hf.get("use_sliding_window", False):
        raise ValueError(f"{path}: key 'use_sliding_window' is true; sliding-window attention is "
                         "not supported")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    for key in required:
        if key not in hf:
            raise ValueError(f"{path}: missing key '{key}'")
    heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    dtype = dtype if dtype in DTYPES else "float32"
    kw = dict(
        family=family,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        **rope_from_hf(hf, path),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        param_dtype=dtype,
        dtype=dtype,
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """A Hugging Face `config.json` dict that transformers and vLLM load."""
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[cfg.family]
    hf: dict[str, Any] = {
        "architectures": [arch],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        **rope_to_hf(cfg),
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_sliding_window": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": cfg.param_dtype,
        "dtype": cfg.param_dtype,
    }
    if cfg.family == "qwen3":
        hf["attention_bias"] = cfg.qkv_bias
    elif cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        raise ValueError("qwen2 checkpoints require head_dim * num_heads == hidden_size "
                         f"(got {cfg.head_dim} * {cfg.num_heads} != {cfg.hidden_size})")
    return hf


def load_hf_config(hf_dir: str, **overrides: Any) -> ModelConfig:
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: not found (not a Hugging Face model directory)") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return from_hf_config(hf, path, **overrides)
