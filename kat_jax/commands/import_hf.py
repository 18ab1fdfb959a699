"""`kat-jax import-hf HF_DIR OUT_DIR`: Hugging Face directory -> kat_jax (orbax) checkpoint."""

from __future__ import annotations

import argparse
import json

NAME = "import-hf"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME, help="Hugging Face dir -> kat_jax checkpoint",
        description="Convert config.json + safetensors (single or sharded) to an orbax checkpoint "
        "with model_config.json beside it, tensor by tensor.")
    p.add_argument("hf_dir")
    p.add_argument("out_dir", help="must not exist (or be empty); written atomically")
    p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default=None,
                   help="stored dtype (default: the Hugging Face config's torch_dtype)")
    return p


def run(args: argparse.Namespace) -> int:
    from kat_jax.models.checkpoint import import_hf

    cfg = import_hf(args.hf_dir, args.out_dir, param_dtype=args.param_dtype)
    print(json.dumps({"out_dir": args.out_dir, "family": cfg.family, "params": cfg.num_params(),
                      "param_dtype": cfg.param_dtype}))
    return 0
