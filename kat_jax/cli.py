"""The `kat-jax` command: one entry point, one subcommand per job.

    kat-jax train      train a stage (mid, sft, rft, rl) or a pipeline of stages from a config
    kat-jax score      per-token log-probs and entropies of JSONL token sequences
    kat-jax import-hf  Hugging Face directory -> kat_jax (orbax) checkpoint
    kat-jax export-hf  kat_jax checkpoint -> Hugging Face directory (config.json + safetensors)
    kat-jax prune      what an entropy-pruning token budget keeps of groups of rollouts
    kat-jax rollout    sample agent trajectories in an environment (JSONL for prune / score / training)
    kat-jax serve      the built-in sampler as an OpenAI-compatible /v1/completions endpoint
    kat-jax env check  every bundled (or given) environment task scores 1 with its gold answer, 0 without
    kat-jax presets    list the model presets
    kat-jax compile-check  compile a train step for a Cloud TPU topology from this host (libtpu)

Every `--checkpoint` accepts a kat_jax checkpoint, a Hugging Face directory, or preset:NAME[@SEED]
(a randomly initialised preset; preset:tiny is the embedded default).
Errors print one line `kat-jax: error: ...` naming the file, line or key, and exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys

CHECKPOINT_HELP = ("kat_jax checkpoint dir, Hugging Face model dir (config.json + safetensors), "
                   "or preset:NAME[@SEED] (random init; e.g. preset:tiny)")


def _cmd_score(args: argparse.Namespace) -> int:
    from kat_jax.training.scoring import run_score

    summary = run_score(args.checkpoint, args.input, args.output, batch_tokens=args.batch_tokens,
                        dtype=args.dtype, attention_impl=args.attention_impl)
    print(json.dumps(summary))
    return 0


def _cmd_import_hf(args: argparse.Namespace) -> int:
    from kat_jax.models.checkpoint import import_hf

    cfg = import_hf(args.hf_dir, args.out_dir, param_dtype=args.param_dtype)
    print(json.dumps({"out_dir": args.out_dir, "family": cfg.family, "params": cfg.num_params(),
                      "param_dtype": cfg.param_dtype}))
    return 0


def _cmd_export_hf(args: argparse.Namespace) -> int:
    from kat_jax.models.checkpoint import export_hf

    files = export_hf(args.ckpt_dir, args.out_dir, dtype=args.dtype,
                      max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(json.dumps({"out_dir": args.out_dir, "files": files}))
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from kat_jax.prune_cmd import run_prune

    keep_tags = None if args.keep_tags is None else tuple(
        t for t in args.keep_tags.split(",") if t)
    summary = run_prune(args.input, args.output, args.budget, reach=args.reach,
                        keep_tags=keep_tags, fuse_tool_results=not args.no_fuse_tool_results,
                        checkpoint=args.checkpoint)
    print(json.dumps(summary))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import logging

    from kat_jax.training import config_lib
    from kat_jax.training.trainer import PREEMPTED_EXIT, Preempted, TrainingError, run_train

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_lib.load_train_config(args.config, args.overrides)
    try:
        summary = run_train(cfg, args.workdir)
    except Preempted as e:
        print(f"kat-jax: preempted: {e}", file=sys.stderr)
        return PREEMPTED_EXIT
    except TrainingError as e:
        raise ValueError(str(e)) from None
    print(json.dumps(summary, default=str))
    return 0


def _swe_env_kwargs(args: argparse.Namespace) -> dict:
    """``make_env`` kwargs from --backend / --sandbox-image (they apply to --env swe only)."""
    if args.sandbox_image and args.backend != "docker":
        raise ValueError("--sandbox-image needs --backend docker")
    if args.env != "swe":
        if args.backend != "local":
            raise ValueError(f"--backend applies to --env swe, not {args.env}")
        return {}
    sandbox = {"image": args.sandbox_image} if args.sandbox_image else {}
    return {"backend": args.backend, "sandbox_kwargs": sandbox}


def _cmd_rollout(args: argparse.Namespace) -> int:
    from kat_jax.rollout.runner import run_rollout_cmd

    env_kwargs = _swe_env_kwargs(args)
    summary = run_rollout_cmd(args.checkpoint, args.env, args.output, tasks_file=args.tasks,
                              samples_per_task=args.samples_per_task,
                              temperature=args.temperature, seed=args.seed,
                              max_turns=args.max_turns, max_tokens=args.max_tokens,
                              max_new_tokens=args.max_new_tokens, concurrency=args.concurrency,
                              max_tasks=args.max_tasks, tokenizer=args.tokenizer,
                              env_kwargs=env_kwargs)
    print(json.dumps(summary))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
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


def _cmd_env_check(args: argparse.Namespace) -> int:
    from kat_jax.envs.check import run

    return run(args)


def _cmd_compile_check(args: argparse.Namespace) -> int:
    import os

    # Abstract TPU devices come from libtpu's topology API; the host's own backend stays CPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from kat_jax.training import config_lib
    from kat_jax.training.aot import compile_check, format_report, summary_line
    from kat_jax.training.trainer import TrainingError

    cfg = config_lib.load_train_config(args.config, args.overrides)
    if "stages" in cfg:
        raise ValueError(f"{args.config} is a pipeline; compile-check takes one stage's config")
    try:
        report = compile_check(cfg, args.topology, top=args.top)
    except ImportError as e:
        print(f"kat-jax: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        raise ValueError(str(e)) from None
    print(format_report(report))
    print(summary_line(report))
    return 0 if report["fits"] else 3


def _cmd_presets(args: argparse.Namespace) -> int:
    from kat_jax.models.config import PRESETS

    for name, fn in sorted(PRESETS.items()):
        cfg = fn()
        print(f"{name:14s} {cfg.family}  params={cfg.num_params() / 1e9:.3f}B  layers={cfg.num_layers} "
              f"hidden={cfg.hidden_size} heads={cfg.num_heads}/{cfg.num_kv_heads} "
              f"head_dim={cfg.head_dim} vocab={cfg.vocab_size} tied={cfg.tie_word_embeddings}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kat-jax", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train", help="train from an ml_collections config (kat-jax train --config F.py:VARIANT)",
        description="Train a stage or a pipeline of stages. Overrides: --config.KEY=VALUE (e.g. "
        "--config.train.steps=20 --config.optimizer.learning_rate=1e-4); unknown keys and wrong "
        "types are errors. Running again on the same --workdir resumes.")
    p.add_argument("--config", required=True,
                   help="config file and variant, e.g. configs/sft.py:tiny or configs/quickstart.py")
    p.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics, model)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    p.set_defaults(fn=_cmd_train, overrides=[])

    p = sub.add_parser("score", help="per-token log-probs and entropies of token sequences",
                       description="Score JSONL lines {\"id\", \"tokens\"}; write {\"id\", "
                       "\"logprobs\", \"entropies\"} (len(tokens)-1 each) in the same order. The "
                       "last stdout line is a JSON summary.")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--input", required=True, help="input JSONL")
    p.add_argument("--output", required=True, help="output JSONL (written atomically)")
    p.add_argument("--batch-tokens", type=int, default=4096,
                   help="tokens per forward call (row capacity); default 4096")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--attention-impl", default=None,
                   choices=("auto", "xla_dense", "xla_block_sparse", "pallas"),
                   help="attention implementation (default: the checkpoint's config, auto)")
    p.set_defaults(fn=_cmd_score)

    p = sub.add_parser("import-hf", help="Hugging Face dir -> kat_jax checkpoint",
                       description="Convert config.json + safetensors (single or sharded) to an "
                       "orbax checkpoint with model_config.json beside it, tensor by tensor.")
    p.add_argument("hf_dir")
    p.add_argument("out_dir", help="must not exist (or be empty); written atomically")
    p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default=None,
                   help="stored dtype (default: the Hugging Face config's torch_dtype)")
    p.set_defaults(fn=_cmd_import_hf)

    p = sub.add_parser("export-hf", help="kat_jax checkpoint -> Hugging Face dir",
                       description="Write config.json + safetensors that transformers and vLLM load.")
    p.add_argument("ckpt_dir", help=CHECKPOINT_HELP)
    p.add_argument("out_dir", help="must not exist (or be empty); written atomically")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="dtype of the written tensors (default: the checkpoint's)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size limit, GiB")
    p.set_defaults(fn=_cmd_export_hf)

    p = sub.add_parser("prune", help="entropy-based tree pruning of rollouts under a budget",
                       description="Per group, keep the most informative nodes of the rollouts' "
                       "prefix tree within --budget tokens; write {\"id\", \"kept\"} per line "
                       "(leading tokens kept); the last stdout line is a JSON summary.")
    p.add_argument("--input", required=True,
                   help="JSONL {id, tokens, entropies (null where not sampled), tags?, group?}")
    p.add_argument("--output", required=True, help="output JSONL (written atomically)")
    p.add_argument("--budget", type=int, required=True, help="tokens kept per group, at most")
    p.add_argument("--reach", choices=("share", "prob"), default="share",
                   help="reach likelihood: share of trajectories through a node (default), or "
                   "product of sampling probabilities (needs behaviour log-probs)")
    p.add_argument("--keep-tags", default=None,
                   help="comma-separated tags kept first (default tool_call,tool_result,memory; "
                   "'' for none)")
    p.add_argument("--checkpoint", default=None,
                   help="compute entropies by a forward pass for lines without them; "
                   + CHECKPOINT_HELP)
    p.add_argument("--no-fuse-tool-results", action="store_true",
                   help="allow a tool call to be kept without its result")
    p.set_defaults(fn=_cmd_prune)

    p = sub.add_parser("rollout", help="sample agent trajectories in an environment",
                       description="Run --samples-per-task episodes per task (the policy, the "
                       "environment's tools, the reward); write one JSONL line per trajectory; the "
                       "last stdout line is a JSON summary.")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--env", required=True, help="environment: calculator, maths, swe")
    p.add_argument("--tasks", default=None, help="tasks file (default: the environment's bundled)")
    p.add_argument("--samples-per-task", type=int, default=4, help="G samples per task (a group)")
    p.add_argument("--output", required=True, help="output JSONL (written atomically)")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-turns", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=4096, help="trajectory length limit")
    p.add_argument("--max-new-tokens", type=int, default=512, help="per assistant turn")
    p.add_argument("--concurrency", type=int, default=8, help="episodes in flight")
    p.add_argument("--max-tasks", type=int, default=None, help="only the first N tasks")
    p.add_argument("--tokenizer", default=None,
                   help="'bytes' or a tokenizer.json dir (default: the checkpoint's, else bytes)")
    p.add_argument("--backend", default="local", choices=["local", "docker"],
                   help="sandbox backend of --env swe (default local)")
    p.add_argument("--sandbox-image", default=None,
                   help="with --backend docker: the image of tasks without their own `image` "
                   "(default $KAT_JAX_SANDBOX_IMAGE, else kat-jax-sandbox:latest)")
    p.set_defaults(fn=_cmd_rollout)

    p = sub.add_parser("serve", help="OpenAI-compatible /v1/completions server (token ids in/out)",
                       description="Serve the built-in sampler on HOST:PORT; prompts are token "
                       "ids; responses carry token ids, log-probs and entropies.")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1", help="default loopback only")
    p.add_argument("--tokenizer", default=None, help="for the 'text' field of responses")
    p.set_defaults(fn=_cmd_serve)

    p = sub.add_parser("env", help="environment tools (env check)",
                       description="Environment tools.")
    env_sub = p.add_subparsers(dest="env_command", required=True, metavar="ENV_COMMAND")
    pc = env_sub.add_parser("check", help="gold answers score 1 and empty ones 0 on every task",
                            description="Audit an environment's tasks: each must score 1 with its "
                            "gold answer (SWE: the gold patch) and 0 without; prints a table, exits "
                            "1 when any task is broken.")
    from kat_jax.envs.check import add_arguments

    add_arguments(pc)
    pc.set_defaults(fn=_cmd_env_check)

    p = sub.add_parser(
        "compile-check", help="compile a stage's train step for a Cloud TPU topology (no TPU)",
        description="Lower and compile the train step of --config for the abstract devices of a "
        "Cloud TPU topology (needs libtpu: pip install -e '.[aot]'), with abstract inputs (nothing "
        "is materialised); print per-device memory against the chip's HBM, the shardings of the "
        "largest arrays, the step's FLOPs, and a JSON summary line last. Exit status 0: fits, 3: "
        "does not fit, 2: libtpu missing, 1: bad config or topology. Overrides: "
        "--config.KEY=VALUE.")
    p.add_argument("--config", required=True,
                   help="config file and variant, e.g. configs/sft.py:kat_dev_32b")
    p.add_argument("--topology", required=True,
                   help="Cloud TPU slice (v5p-128, v5e-16, v6e-64, v4-32: v4/v5p count "
                   "TensorCores, v5e/v6e chips) or a libtpu topology string (v5p:2x2x1)")
    p.add_argument("--top", type=int, default=8, help="largest arrays listed (default 8)")
    p.set_defaults(fn=_cmd_compile_check, overrides=[])

    p = sub.add_parser("presets", help="list model presets")
    p.set_defaults(fn=_cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "compile-check"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return args.fn(args)
    except (ValueError, KeyError, OSError, NotImplementedError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"kat-jax: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
