"""`kat-jax score`: per-token log-probs and entropies of JSONL token sequences
(kat_jax.training.scoring)."""

from __future__ import annotations

import argparse
import json

from kat_jax.commands import CHECKPOINT_HELP
from kat_jax.ops.attention_impls import attention_impl_names  # light: no jax until a kernel runs

NAME = "score"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME, help="per-token log-probs and entropies of token sequences",
        description="Score JSONL lines {\"id\", \"tokens\"}; write {\"id\", \"logprobs\", "
        "\"entropies\"} (len(tokens)-1 each) in the same order (no \"entropies\" with "
        "--no-entropies). The last stdout line is a JSON summary.")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--input", required=True, help="input JSONL")
    p.add_argument("--output", required=True, help="output JSONL (written atomically)")
    p.add_argument("--batch-tokens", type=int, default=4096,
                   help="tokens per forward call (row capacity); default 4096")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--attention-impl", default=None,
                   choices=attention_impl_names(),
                   help="attention implementation (default: the checkpoint's config, auto)")
    p.add_argument("--no-entropies", dest="entropies", action="store_false",
                   help="log-probs only: entropies are not computed and the output lines have no "
                   "\"entropies\" key")
    return p


def run(args: argparse.Namespace) -> int:
    from kat_jax.training.scoring import run_score

    summary = run_score(args.checkpoint, args.input, args.output, batch_tokens=args.batch_tokens,
                        dtype=args.dtype, attention_impl=args.attention_impl,
                        entropies=args.entropies)
    print(json.dumps(summary))
    return 0
