"""Hugging Face safetensors <-> kat_jax parameters, one tensor at a time.

The conversion is a table: each kat_jax parameter path names its Hugging Face tensor (per layer for
the stacked layers) and a pair of layout transforms. Import fills one preallocated host array per
kat_jax parameter from one Hugging Face tensor at a time, so host memory holds one copy of the model
plus one tensor; export writes shards of at most `max_shard_bytes` one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator

import ml_dtypes
import numpy as np

from kat_jax.models.config import ModelConfig

NP_DTYPE = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# Buffers some exporters include that carry no parameters.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Entry:
    path: tuple[str, ...]  # kat_jax parameter path (nested dict keys)
    hf_name: str  # may contain {i} for the layer index
    per_layer: bool
    to_ours: Callable[[np.ndarray, ModelConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, ModelConfig], np.ndarray]
    hf_shape: Callable[[ModelConfig], tuple[int, ...]]


def _ident(x, cfg):
    return x


def _t(x, cfg):
    return np.ascontiguousarray(x.T)


def _in_heads(heads_attr: str):
    """HF [heads*H, D] <-> ours [D, heads, H]."""

    def to_ours(x, cfg):
        return np.ascontiguousarray(x.T.reshape(cfg.hidden_size, getattr(cfg, heads_attr),
                                                cfg.head_dim))

    def to_hf(x, cfg):
        return np.ascontiguousarray(x.reshape(cfg.hidden_size, -1).T)

    return to_ours, to_hf


def _bias_heads(heads_attr: str):
    def to_ours(x, cfg):
        return x.reshape(getattr(cfg, heads_attr), cfg.head_dim)

    def to_hf(x, cfg):
        return x.reshape(-1)

    return to_ours, to_hf


def _o_to_ours(x, cfg):  # HF [D, N*H] -> ours [N, H, D]
    return np.ascontiguousarray(x.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size))


def _o_to_hf(x, cfg):
    return np.ascontiguousarray(x.reshape(-1, cfg.hidden_size).T)


def conversion_table(cfg: ModelConfig) -> list[Entry]:
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    nh, kh = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    lp = "model.layers.{i}."
    q_to, q_from = _in_heads("num_heads")
    kv_to, kv_from = _in_heads("num_kv_heads")
    table = [
        Entry(("embed_tokens",), "model.embed_tokens.weight", False, _ident, _ident,
              lambda c: (v, d)),
        Entry(("norm", "weight"), "model.norm.weight", False, _ident, _ident, lambda c: (d,)),
        Entry(("layers", "input_layernorm", "weight"), lp + "input_layernorm.weight", True,
              _ident, _ident, lambda c: (d,)),
        Entry(("layers", "post_attention_layernorm", "weight"),
              lp + "post_attention_layernorm.weight", True, _ident, _ident, lambda c: (d,)),
        Entry(("layers", "self_attn", "q_proj", "kernel"), lp + "self_attn.q_proj.weight", True,
              q_to, q_from, lambda c: (nh, d)),
        Entry(("layers", "self_attn", "k_proj", "kernel"), lp + "self_attn.k_proj.weight", True,
              kv_to, kv_from, lambda c: (kh, d)),
        Entry(("layers", "self_attn", "v_proj", "kernel"), lp + "self_attn.v_proj.weight", True,
              kv_to, kv_from, lambda c: (kh, d)),
        Entry(("layers", "self_attn", "o_proj", "kernel"), lp + "self_attn.o_proj.weight", True,
              _o_to_ours, _o_to_hf, lambda c: (d, nh)),
        Entry(("layers", "mlp", "gate_proj", "kernel"), lp + "mlp.gate_proj.weight", True, _t, _t,
              lambda c: (f, d)),
        Entry(("layers", "mlp", "up_proj", "kernel"), lp + "mlp.up_proj.weight", True, _t, _t,
              lambda c: (f, d)),
        Entry(("layers", "mlp", "down_proj", "kernel"), lp + "mlp.down_proj.weight", True, _t, _t,
              lambda c: (d, f)),
    ]
    if cfg.qkv_bias:
        qb_to, qb_from = _bias_heads("num_heads")
        kb_to, kb_from = _bias_heads("num_kv_heads")
        table += [
            Entry(("layers", "self_attn", "q_proj", "bias"), lp + "self_attn.q_proj.bias", True,
                  qb_to, qb_from, lambda c: (nh,)),
            Entry(("layers", "self_attn", "k_proj", "bias"), lp + "self_attn.k_proj.bias", True,
                  kb_to, kb_from, lambda c: (kh,)),
            Entry(("layers", "self_attn", "v_proj", "bias"), lp + "self_attn.v_proj.bias", True,
                  kb_to, kb_from, lambda c: (kh,)),
        ]
    if cfg.qk_norm:
        table += [
            Entry(("layers", "self_attn", "q_norm", "weight"), lp + "self_attn.q_norm.weight", True,
                  _ident, _ident, lambda c: (c.head_dim,)),
            Entry(("layers", "self_attn", "k_norm", "weight"), lp + "self_attn.k_norm.weight", True,
                  _ident, _ident, lambda c: (c.head_dim,)),
        ]
    if not cfg.tie_word_embeddings:
        table.append(Entry(("lm_head",), "lm_head.weight", False, _t, _t, lambda c: (v, d)))
    return table


def hf_names(entry: Entry, cfg: ModelConfig) -> list[str]:
    if entry.per_layer:
        return [entry.hf_name.format(i=i) for i in range(cfg.num_layers)]
    return [entry.hf_name]


# ---------------------------------------------------------------------------------------------
class SafetensorsReader:
    """Name -> tensor access over a single file or a sharded checkpoint (index.json)."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        self._safe_open = safe_open
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        self.name_to_file: dict[str, str] = {}
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a valid safetensors index ({e})") from e
            for name, fname in weight_map.items():
                path = os.path.join(hf_dir, fname)
                if not os.path.exists(path):
                    raise FileNotFoundError(f"{index}: tensor '{name}' is in missing file {path}")
                self.name_to_file[name] = path
        elif os.path.exists(single):
            with safe_open(single, "numpy") as f:
                for name in f.keys():
                    self.name_to_file[name] = single
        else:
            raise FileNotFoundError(f"{hf_dir}: no model.safetensors or "
                                    "model.safetensors.index.json")
        self._handles: dict[str, object] = {}

    def names(self) -> set[str]:
        return set(self.name_to_file)

    def get(self, name: str) -> np.ndarray:
        if name not in self.name_to_file:
            raise KeyError(name)
        path = self.name_to_file[name]
        if path not in self._handles:
            self._handles[path] = self._safe_open(path, "numpy").__enter__()
        return self._handles[path].get_tensor(name)

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()


def read_hf_params(hf_dir: str, cfg: ModelConfig) -> dict:
    """Nested dict of numpy arrays (dtype cfg.param_dtype) in kat_jax layout, read tensor by tensor.

    Errors name the missing, unexpected or mis-shaped tensor and the directory.
    """
    reader = SafetensorsReader(hf_dir)
    try:
        table = conversion_table(cfg)
        expected = {n for e in table for n in hf_names(e, cfg)}
        present = reader.names()
        tied_extra = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
        unexpected = sorted(n for n in present - expected - tied_extra
                            if not n.endswith(IGNORED_SUFFIXES))
        if unexpected:
            raise ValueError(f"{hf_dir}: unexpected tensor(s) {unexpected[:5]}"
                             f"{' ...' if len(unexpected) > 5 else ''} for a {cfg.family} model "
                             "(unsupported architecture variant?)")
        missing = sorted(expected - present)
        if missing:
            raise ValueError(f"{hf_dir}: missing tensor(s) {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")
        dtype = NP_DTYPE[cfg.param_dtype]
        params: dict = {}
        for entry in table:
            names = hf_names(entry, cfg)
            out = None
            for i, name in enumerate(names):
                x = reader.get(name)
                if tuple(x.shape) != entry.hf_shape(cfg):
                    raise ValueError(f"{hf_dir}: tensor '{name}' has shape {tuple(x.shape)}, "
                                     f"expected {entry.hf_shape(cfg)} from config.json")
                y = entry.to_ours(x, cfg).astype(dtype)
                if not entry.per_layer:
                    out = y
                    break
                if out is None:
                    out = np.empty((cfg.num_layers, *y.shape), dtype)
                out[i] = y
                del x, y
            node = params
            for key in entry.path[:-1]:
                node = node.setdefault(key, {})
            node[entry.path[-1]] = out
        return params
    finally:
        reader.close()


def iter_hf_tensors(params: dict, cfg: ModelConfig, dtype: str | None = None
                    ) -> Iterator[tuple[str, np.ndarray]]:
    """(hf_name, tensor) pairs in Hugging Face layout, one at a time."""
    np_dtype = NP_DTYPE[dtype or cfg.param_dtype]
    for entry in conversion_table(cfg):
        node = params
        for key in entry.path:
            node = node[key]
        arr = node
        for i, name in enumerate(hf_names(entry, cfg)):
            x = np.asarray(arr[i] if entry.per_layer else arr)
            yield name, np.ascontiguousarray(entry.to_hf(x, cfg).astype(np_dtype))


def write_hf_safetensors(params: dict, cfg: ModelConfig, out_dir: str,
                         max_shard_bytes: int = 5 * 2**30, dtype: str | None = None) -> list[str]:
    """Write model*.safetensors (+ index.json when sharded) into an existing directory."""
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = []
    current: dict[str, np.ndarray] = {}
    size = 0
    tmp_names: list[str] = []

    def flush():
        nonlocal current, size
        if current:
            name = f"shard-{len(tmp_names):05d}.safetensors.tmp"
            save_file(current, os.path.join(out_dir, name), metadata={"format": "pt"})
            tmp_names.append(name)
            shards.append({k: None for k in current})
            current, size = {}, 0

    total = 0
    for name, x in iter_hf_tensors(params, cfg, dtype):
        if current and size + x.nbytes > max_shard_bytes:
            flush()
        current[name] = x
        size += x.nbytes
        total += x.nbytes
    flush()
    n = len(tmp_names)
    if n == 1:
        final = ["model.safetensors"]
    else:
        final = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for tmp, fin, names in zip(tmp_names, final, shards):
        os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, fin))
        weight_map.update({k: fin for k in names})
    if n > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return final
