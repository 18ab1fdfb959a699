"""training: the four stages' losses and the sharded training loop.

Owns the stage losses and their registry (losses), the pure train / eval steps and the forward
that scoring shares (step), the optimizer (optim), mesh and shardings (sharding), configs
(config_lib: files, overrides; defaults: every key), a run's pieces built from its config (build:
config checks, model, tokenizer, parameters, the jitted step), checkpoints and model/ export
(checkpointing), what a run shows and records (progress, metrics), the loop itself (trainer),
the watchdog, ahead-of-time TPU compile checks (aot, tpu_topologies) and `kat-jax score`
(scoring).

May import: the root utilities (storage, atomic_io, jsonl, multihost), ops, models, trees and
data. Never rollout, envs, flow or commands (agents never meet the trainer).
"""
