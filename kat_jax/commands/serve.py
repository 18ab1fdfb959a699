"""`kat-jax serve`: the built-in sampler as an OpenAI-compatible /v1/completions endpoint
(kat_jax.rollout.server)."""

from __future__ import annotations

import argparse
import json

from kat_jax.commands import CHECKPOINT_HELP

NAME = "serve"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME, help="OpenAI-compatible /v1/completions server (token ids in/out)",
        description="Serve the built-in sampler on HOST:PORT; prompts are token ids; responses "
        "carry token ids, log-probs and entropies.")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1", help="default loopback only")
    p.add_argument("--tokenizer", default=None, help="for the 'text' field of responses")
    return p


def run(args: argparse.Namespace) -> int:
    from kat_jax.rollout.runner import tokenizer_for_checkpoint
    from kat_jax.rollout.sampler import engine_from_checkpoint
    from kat_jax.rollout.server import make_server

    engine = engine_from_checkpoint(args.checkpoint)
    server = make_server(engine, args.host, args.port,
                         tokenizer=tokenizer_for_checkpoint(args.checkpoint, args.tokenizer))
    print(json.dumps({"url": f"http://{args.host}:{server.server_address[1]}/v1"}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
