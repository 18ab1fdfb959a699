"""kat_jax model checkpoints (orbax) and one loader for every `--checkpoint` argument.

A kat_jax model checkpoint is a directory:
    model_config.json     the ModelConfig (JSON)
    params/               an orbax checkpoint of the parameters (nested dict, kat_jax layout)
    hf_config.json        the original Hugging Face config.json (import-hf), merged back on export
    tokenizer*.json ...   tokenizer files carried over from Hugging Face, when there were any

`load_model(spec)` accepts, alike:
    a kat_jax checkpoint directory (model_config.json + params/),
    a Hugging Face directory (config.json + safetensors), converted in memory tensor by tensor,
    "preset:NAME[@SEED]", a randomly initialised preset (the embedded default is preset:tiny).

Writes are all-or-nothing: everything goes to a temporary sibling directory that is renamed into
place at the end, so a failure never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import jax
from flax import nnx

from kat_jax import storage
from kat_jax.models.config import ModelConfig, get_preset, load_hf_config
from kat_jax.models.decoder import Decoder, abstract_model, init_model
from kat_jax.multihost import sync_processes

CONFIG_FILE = "model_config.json"
HF_CONFIG_FILE = "hf_config.json"  # the original Hugging Face config.json, kept by import-hf
PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "added_tokens.json")


def resolve_checkpoint_dir(spec: str) -> str:
    """A training workdir (kat-jax train) stands for the model it ended with (WORKDIR/model)."""
    if spec.startswith("preset:"):
        return spec
    inner = os.path.join(spec, "model")
    if not storage.isdir(os.path.join(spec, PARAMS_DIR)) and storage.isfile(
            os.path.join(inner, CONFIG_FILE)):
        return inner
    return spec


def is_kat_checkpoint(path: str) -> bool:
    return storage.isfile(os.path.join(path, CONFIG_FILE))


def is_hf_checkpoint(path: str) -> bool:
    return storage.isfile(os.path.join(path, "config.json"))


def check_output_directory(out_dir: str) -> str:
    """Absolute path of out_dir; an error unless it is absent or an empty directory."""
    out_dir = storage.absolute(out_dir)
    if storage.exists(out_dir) and (not storage.isdir(out_dir) or storage.listdir(out_dir)):
        raise FileExistsError(f"{out_dir}: already exists and is not an empty directory; "
                              "refusing to overwrite")
    return out_dir


@contextlib.contextmanager
def atomic_directory(out_dir: str) -> Iterator[str]:
    """Yield a temporary sibling directory; rename it to out_dir on success, delete it on failure.

    out_dir must not exist, or be an empty directory. With several JAX processes (multi-host),
    every process calls this together: they share one temporary directory (on a shared
    filesystem), write into it (orbax writes each host's array shards; files other than arrays
    should be written by the primary process only) and the primary process renames it.

    On cloud storage (gs://) there is no atomic rename: the directory is written in place, and a
    reader must treat it as complete only once its marker file exists (save_checkpoint writes
    model_config.json last); a failure removes it."""
    out_dir = check_output_directory(out_dir)
    parent = os.path.dirname(out_dir)
    primary = jax.process_index() == 0
    if storage.is_remote(out_dir):
        tmp = out_dir
    elif jax.process_count() == 1:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    else:
        tmp = os.path.join(parent, os.path.basename(out_dir) + ".tmp-multihost")
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run that died while writing
            os.makedirs(tmp)
        sync_processes(f"kat_jax atomic_directory start {out_dir}")
    try:
        yield tmp
        sync_processes(f"kat_jax atomic_directory written {out_dir}")
        if primary and tmp != out_dir:
            if os.path.isdir(out_dir):  # empty (checked above)
                os.rmdir(out_dir)
            os.rename(tmp, out_dir)
        sync_processes(f"kat_jax atomic_directory renamed {out_dir}")
    except BaseException:
        if primary:
            storage.rmtree(tmp)
        raise


def _to_pure_dict(state) -> dict:
    fn = getattr(nnx, "to_pure_dict", None)
    return fn(state) if fn else state.to_pure_dict()


def _replace_by_pure_dict(state, pure: dict) -> None:
    fn = getattr(nnx, "replace_by_pure_dict", None)
    fn(state, pure) if fn else state.replace_by_pure_dict(pure)


def params_to_pure_dict(model: Decoder) -> dict:
    return _to_pure_dict(nnx.state(model, nnx.Param))


def _save_params(params: dict, path: str) -> None:
    """Save a nested dict of numpy or jax arrays with orbax. Numpy leaves are written as they are
    (orbax's default handler deep-copies host arrays first, which would double host memory)."""
    import numpy as np
    import orbax.checkpoint as ocp

    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()),
    )
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(path, args=ocp.args.PyTreeSave(params))


def save_checkpoint(out_dir: str, params: dict, cfg: ModelConfig, hf_dir: str | None = None
                    ) -> None:
    """Write a kat_jax checkpoint (params: nested dict of arrays in kat_jax layout). hf_dir: the
    Hugging Face directory it came from; its config.json and tokenizer files are kept."""
    with atomic_directory(out_dir) as tmp:
        _save_params(params, os.path.join(tmp, PARAMS_DIR))  # every process: its array shards
        if jax.process_index() == 0:
            if hf_dir:
                storage.copy_file(os.path.join(hf_dir, "config.json"),
                                  os.path.join(tmp, HF_CONFIG_FILE))
                copy_tokenizer_files(hf_dir, tmp)
            cfg.save_json(os.path.join(tmp, CONFIG_FILE))  # last: the marker of a complete one


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        path = os.path.join(src, name)
        if storage.isfile(path):
            storage.copy_file(path, os.path.join(dst, name))
            copied.append(name)
    return copied


def abstract_params(cfg: ModelConfig, shardings: Any = None) -> dict:
    """Nested dict of ShapeDtypeStructs matching the checkpoint (nothing materialised)."""
    pure = _to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
    if shardings is None:
        device = jax.devices()[0]
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), pure)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), pure,
                        shardings)


def load_params(ckpt_dir: str, cfg: ModelConfig, shardings: Any = None) -> dict:
    import orbax.checkpoint as ocp

    path = storage.absolute(os.path.join(ckpt_dir, PARAMS_DIR))
    if not storage.isdir(path):
        raise FileNotFoundError(f"{ckpt_dir}: no '{PARAMS_DIR}/' directory (not a kat_jax checkpoint)")
    target = abstract_params(cfg, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            return ckptr.restore(path, target)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{ckpt_dir}: parameters do not match {CONFIG_FILE} ({e})") from e


def model_from_params(cfg: ModelConfig, params: dict) -> Decoder:
    model = abstract_model(cfg)
    state = nnx.state(model, nnx.Param)
    _replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def load_model_config(spec: str, **overrides: Any) -> ModelConfig:
    spec = resolve_checkpoint_dir(spec)
    if spec.startswith("preset:"):
        return get_preset(spec[len("preset:"):].split("@")[0], **overrides)
    if is_kat_checkpoint(spec):
        cfg = ModelConfig.load_json(os.path.join(spec, CONFIG_FILE))
        return cfg.replace(**overrides) if overrides else cfg
    if is_hf_checkpoint(spec):
        if storage.is_remote(spec):
            raise ValueError(f"{spec}: a Hugging Face checkpoint must be a local directory (its "
                             "safetensors are read in place); copy it here, or convert it with "
                             "kat-jax import-hf (whose output may be on gs://)")
        return load_hf_config(spec, **overrides)
    if not storage.exists(spec):
        raise FileNotFoundError(f"{spec}: checkpoint not found")
    raise ValueError(f"{spec}: neither a kat_jax checkpoint ({CONFIG_FILE}) nor a Hugging Face "
                     "directory (config.json), nor preset:NAME")


def load_model(spec: str, **overrides: Any) -> tuple[Decoder, ModelConfig]:
    """Load a model from a kat_jax checkpoint, a Hugging Face directory, or preset:NAME[@SEED].

    overrides replace ModelConfig keys (e.g. dtype='bfloat16', attention_impl='xla_dense'); a
    param_dtype override converts the stored parameters."""
    spec = resolve_checkpoint_dir(spec)
    cfg = load_model_config(spec, **overrides)
    if spec.startswith("preset:"):
        seed = int(spec.split("@")[1]) if "@" in spec else 0
        return init_model(cfg, seed), cfg
    if is_kat_checkpoint(spec):
        stored = ModelConfig.load_json(os.path.join(spec, CONFIG_FILE))
        params = load_params(spec, stored)
        if stored.param_dtype != cfg.param_dtype:
            from kat_jax.models.layers import DTYPE

            params = jax.tree.map(lambda x: x.astype(DTYPE[cfg.param_dtype]), params)
        return model_from_params(cfg, params), cfg
    from kat_jax.models.hf_io import read_hf_params

    params = read_hf_params(spec, cfg)
    _to_device_in_place(params)
    return model_from_params(cfg, params), cfg


def _to_device_in_place(tree: dict) -> None:
    """Replace numpy leaves by device arrays one at a time, so that host memory never holds the
    numpy copy and the device copy of the whole model at once."""
    for key, value in tree.items():
        if isinstance(value, dict):
            _to_device_in_place(value)
        else:
            tree[key] = jax.device_put(value)
            del value


def import_hf(hf_dir: str, out_dir: str, param_dtype: str | None = None) -> ModelConfig:
    """Hugging Face directory -> kat_jax checkpoint, tensor by tensor (one host copy of the model)."""
    from kat_jax.models.hf_io import read_hf_params

    check_output_directory(out_dir)  # fail before reading a large model, not after
    overrides = {"param_dtype": param_dtype, "dtype": param_dtype} if param_dtype else {}
    cfg = load_hf_config(hf_dir, **overrides)
    params = read_hf_params(hf_dir, cfg)  # numpy arrays: no device copy
    save_checkpoint(out_dir, params, cfg, hf_dir=hf_dir)
    return cfg


def export_hf(ckpt: str, out_dir: str, dtype: str | None = None,
              max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """kat_jax checkpoint (or any loadable spec) -> config.json + safetensors for transformers/vLLM."""
    import json

    from kat_jax.models.config import to_hf_config
    from kat_jax.models.hf_io import write_hf_safetensors

    if storage.is_remote(out_dir):
        raise ValueError(f"{out_dir}: export-hf writes a local directory (safetensors); copy it "
                         "to cloud storage afterwards")
    check_output_directory(out_dir)  # fail before loading a large model, not after
    ckpt = resolve_checkpoint_dir(ckpt)
    if is_kat_checkpoint(ckpt):
        cfg = ModelConfig.load_json(os.path.join(ckpt, CONFIG_FILE))
        params = load_params(ckpt, cfg)
    else:
        model, cfg = load_model(ckpt)
        params = params_to_pure_dict(model)
    out_cfg = cfg.replace(param_dtype=dtype) if dtype else cfg
    hf_config = to_hf_config(out_cfg)
    is_dir = not ckpt.startswith("preset:") and storage.isdir(ckpt)
    original = os.path.join(ckpt, HF_CONFIG_FILE) if is_dir else ""
    if is_dir and not storage.isfile(original) and is_hf_checkpoint(ckpt):
        original = os.path.join(ckpt, "config.json")
    if original and storage.isfile(original):
        # Keep what the original config.json said beyond the shapes (token ids, names, ...).
        merged = json.loads(storage.read_text(original))
        merged.pop("rope_parameters", None)  # superseded by the rope_theta / rope_scaling written
        merged.pop("layer_types", None)
        merged.update(hf_config)
        hf_config = merged
    with atomic_directory(out_dir) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        files = write_hf_safetensors(params, out_cfg, tmp, max_shard_bytes, dtype)
        if is_dir:
            copy_tokenizer_files(ckpt, tmp)
    return files
