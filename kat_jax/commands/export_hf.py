"""`kat-jax export-hf CKPT OUT_DIR`: kat_jax checkpoint -> Hugging Face directory (config.json +
safetensors)."""

from __future__ import annotations

import argparse
import json

from kat_jax.commands import CHECKPOINT_HELP

NAME = "export-hf"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME, help="kat_jax checkpoint -> Hugging Face dir",
        description="Write config.json + safetensors that transformers and vLLM load.")
    p.add_argument("ckpt_dir", help=CHECKPOINT_HELP)
    p.add_argument("out_dir", help="must not exist (or be empty); written atomically")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="dtype of the written tensors (default: the checkpoint's)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size limit, GiB")
    return p


def run(args: argparse.Namespace) -> int:
    from kat_jax.models.checkpoint import export_hf

    files = export_hf(args.ckpt_dir, args.out_dir, dtype=args.dtype,
                      max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(json.dumps({"out_dir": args.out_dir, "files": files}))
    return 0
