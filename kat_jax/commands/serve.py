"""`kat-jax serve`: the built-in sampler as an OpenAI-compatible server: /v1/completions over
token ids (kat_jax.rollout.server) and /v1/chat/completions with tools and recorded sessions
(kat_jax.flow.proxy)."""

from __future__ import annotations

import argparse
import json

from kat_jax.commands import CHECKPOINT_HELP

NAME = "serve"
DESCRIPTION = """\
Serve the built-in sampler on HOST:PORT.

/v1/completions       prompts are token ids; responses carry token ids, log-probs, entropies.
/v1/chat/completions  OpenAI chat with tools, rendered in the Qwen chat format, tool calls
                      parsed back (as vLLM and SGLang serve them).

Training an external agent: a chat call that names a session (header X-Session-Id, or the
'user' field) is recorded token-exactly; its group is X-Group-Id or metadata.group, else the
task (X-Task-Id or metadata.task_id), else the session. The agent ends its episode with
    POST /v1/sessions/ID/finish {"reward": R, "status": "ok"}
A session id is used once (a reused one gets HTTP 409). Finished groups (--group-size
sessions, all finished): GET /v1/groups (each handed out once), or with --record-dir written
as DIR/group-NNNNNN.jsonl rollout records, which the rl stage trains on with
--config.data.train_files='DIR/*.jsonl'. GET /v1/sessions: counters and open sessions.
Details: kat_jax/flow/proxy.py.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME, help="OpenAI-compatible server: /v1/completions (token ids) and "
        "/v1/chat/completions (tools, sessions recorded for training)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION)
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1", help="default loopback only")
    p.add_argument("--tokenizer", default=None,
                   help="the model's tokenizer (default: the checkpoint's, or bytes for presets)")
    p.add_argument("--record-dir", default=None,
                   help="write each finished group of sessions here as group-NNNNNN.jsonl "
                   "(rollout records); default: keep them for GET /v1/groups")
    p.add_argument("--group-size", type=int, default=1,
                   help="sessions a group needs before it is handed out (default 1)")
    p.add_argument("--session-timeout", type=float, default=None, metavar="SECONDS",
                   help="a session that reports no reward this long after its last call is "
                   "finished as env_error (its group masked, counted as timed_out); default: "
                   "wait forever")
    p.add_argument("--advantage-estimator", default="grpo", choices=("grpo", "drgrpo", "rloo"),
                   help="advantages of the recorded groups (default grpo)")
    return p


def run(args: argparse.Namespace) -> int:
    from kat_jax.flow.manager import TrajectoryManager
    from kat_jax.flow.proxy import ChatProxy
    from kat_jax.rollout.runner import tokenizer_for_checkpoint
    from kat_jax.rollout.sampler import engine_from_checkpoint
    from kat_jax.rollout.server import make_server

    tokenizer = tokenizer_for_checkpoint(args.checkpoint, args.tokenizer)
    manager = TrajectoryManager(estimator=args.advantage_estimator)
    proxy = ChatProxy(engine_from_checkpoint(args.checkpoint), tokenizer, manager,
                      group_size=args.group_size, session_timeout_s=args.session_timeout,
                      record_dir=args.record_dir)
    server = make_server(proxy.engine, args.host, args.port, tokenizer=tokenizer, routes=[proxy])
    print(json.dumps({"url": f"http://{args.host}:{server.server_address[1]}/v1"}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        proxy.close()
        server.server_close()
    return 0
