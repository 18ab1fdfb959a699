"""ml_collections configs: `path.py[:variant]` files with get_config(variant), and `--config.a.b=v`
overrides.

    cfg = load_train_config("configs/sft.py:tiny", ["--config.train.steps=20",
                                                    "--config.mesh.fsdp", "4"])
    cfg = load_train_config("sft.py:tiny")  # from any directory: the configs installed with kat_jax

A path that exists (relative to the current directory, or absolute) wins; otherwise a bare name
(`sft.py`, or `configs/sft.py`) resolves from the configs shipped with the package (the repository's
configs/ directory, installed as kat_jax.configs by setup.py).

The loaded ConfigDict is locked: an override of an unknown key, or of a value that cannot be
converted to the key's type, is an error naming the key. Values are parsed by the type of the
existing field (bool: true/false/1/0/yes/no; int; float; str; tuples and lists through
ast.literal_eval; None-able fields declared with config_dict.placeholder(type)).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from typing import Any

import ml_collections
from ml_collections import config_dict


class ConfigError(ValueError):
    pass


def installed_config_dirs() -> list[str]:
    """Where bare config names are looked up: the configs installed with the package
    (kat_jax.configs, the repository's configs/ directory shipped by setup.py), and the
    repository's configs/ beside the kat_jax package of a source checkout."""
    dirs = []
    try:
        spec = importlib.util.find_spec("kat_jax.configs")
    except ImportError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        dirs += list(spec.submodule_search_locations)
    import kat_jax

    root = os.path.dirname(os.path.dirname(os.path.abspath(kat_jax.__file__)))
    if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "configs")):
        dirs.append(os.path.join(root, "configs"))  # a source checkout
    return list(dict.fromkeys(os.path.realpath(d) for d in dirs))


def available_configs() -> list[str]:
    """File names of the installed configs (sft.py, quickstart.py, ...)."""
    return sorted({f for d in installed_config_dirs() for f in os.listdir(d)
                   if f.endswith(".py") and not f.startswith("_")})


def resolve_config_path(path: str) -> str:
    """A config file: `path` when it exists (relative to the current directory or absolute);
    otherwise a bare name (sft.py, or configs/sft.py as the README writes it) from the installed
    configs. An error lists where it looked and the available names."""
    if os.path.isfile(path):
        return path
    looked = [os.path.abspath(path)]
    if os.path.dirname(os.path.normpath(path)) in ("", "configs"):
        name = os.path.basename(path)
        for d in installed_config_dirs():
            candidate = os.path.join(d, name)
            if os.path.isfile(candidate):
                return candidate
            looked.append(candidate)
    raise ConfigError(f"--config: {path}: no such file (looked in: {', '.join(looked)}); "
                      f"installed configs: {', '.join(available_configs()) or 'none'}")


def _load_module(path: str):
    path = resolve_config_path(path)
    name = "kat_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config: {path}: defines no get_config(variant)")
    return module


def config_from_file(spec: str) -> ml_collections.ConfigDict:
    """'path.py' or 'path.py:variant' -> locked ConfigDict. A path that does not exist may be the
    bare name of an installed config ('sft.py:tiny'; resolve_config_path)."""
    path, _, variant = spec.partition(":") if not os.path.isfile(spec) else (spec, "", "")
    module = _load_module(path)
    try:
        cfg = module.get_config(variant) if variant else module.get_config()
    except TypeError:
        cfg = module.get_config(variant or None)
    except KeyError as e:
        raise ConfigError(f"--config: {path}: unknown variant {variant!r} ({e})") from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"--config: {path}: get_config must return an ml_collections.ConfigDict")
    cfg.lock()
    return cfg


def _parse_bool(text: str, key: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"--config.{key}: {text!r} is not a boolean (true/false)")


def parse_value(cfg: ml_collections.ConfigDict, key: str, text: str) -> Any:
    """The override `text` converted to the type of cfg's field `key` (dotted)."""
    *parents, leaf = key.split(".")
    node = cfg
    for i, p in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or p not in node:
            raise ConfigError(f"--config.{key}: unknown key "
                              f"'{'.'.join(parents[:i + 1])}'")
        node = node[p]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigError(f"--config.{key}: unknown key (known at this level: {known})")
    field_type = node.get_ref(leaf).get_type() if hasattr(node, "get_ref") else type(node[leaf])
    if isinstance(node[leaf], ml_collections.ConfigDict):
        raise ConfigError(f"--config.{key}: is a group of keys; set one of {sorted(node[leaf])}")
    if text.strip().lower() in ("none", "null") and node[leaf] is None:
        return None
    try:
        if field_type is bool:
            return _parse_bool(text, key)
        if field_type is int:
            return int(text)
        if field_type is float:
            return float(text)
        if field_type is str:
            return text
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise ConfigError(f"--config.{key}: {text!r} is not a valid "
                          f"{getattr(field_type, '__name__', field_type)} ({e})") from None


def set_value(cfg: ml_collections.ConfigDict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    try:
        setattr(node, leaf, value)
    except (TypeError, AttributeError, KeyError) as e:
        raise ConfigError(f"--config.{key}: {e}") from None


def split_overrides(args: list[str]) -> list[tuple[str, str]]:
    """['--config.a.b=1', '--config.c', '2'] -> [('a.b', '1'), ('c', '2')]; anything else is an
    error naming it."""
    out = []
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--config."):
            raise ConfigError(f"unrecognised argument {a!r} (overrides look like "
                              "--config.train.steps=20)")
        body = a[len("--config."):]
        if "=" in body:
            k, v = body.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"--config.{body}: missing value")
            k, v = body, args[i + 1]
            i += 2
        out.append((k, v))
    return out


def load_train_config(spec: str, overrides: list[str] | None = None) -> ml_collections.ConfigDict:
    cfg = config_from_file(spec)
    for key, text in split_overrides(overrides or []):
        set_value(cfg, key, parse_value(cfg, key, text))
    return cfg


def save_config(cfg: ml_collections.ConfigDict, path: str) -> None:
    """The resolved config as JSON, written atomically (local or gs://)."""
    from kat_jax import storage

    storage.write_text(path, cfg.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def to_dict(cfg: ml_collections.ConfigDict) -> dict:
    return json.loads(cfg.to_json_best_effort())


def placeholder(kind: type) -> Any:
    return config_dict.placeholder(kind)
