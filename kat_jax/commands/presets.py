"""`kat-jax presets`: the model presets, one line each."""

from __future__ import annotations

import argparse

NAME = "presets"


def add_parser(subparsers) -> argparse.ArgumentParser:
    return subparsers.add_parser(NAME, help="list model presets")


def run(args: argparse.Namespace) -> int:
    from kat_jax.models.config import PRESETS

    for name, fn in sorted(PRESETS.items()):
        cfg = fn()
        print(f"{name:14s} {cfg.family}  params={cfg.num_params() / 1e9:.3f}B  layers={cfg.num_layers} "
              f"hidden={cfg.hidden_size} heads={cfg.num_heads}/{cfg.num_kv_heads} "
              f"head_dim={cfg.head_dim} vocab={cfg.vocab_size} tied={cfg.tie_word_embeddings}")
    return 0
