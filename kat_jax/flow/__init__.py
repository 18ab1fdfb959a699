"""flow: where agents and the trainer meet.

Owns the trajectory manager (manager): per-call records of agent sessions -> trajectories rebuilt
by longest token prefix, grouped by task, finished with the episode outcome and handed out as
rollout records (kat_jax.data.records) with per-group advantages (GRPO, Dr.GRPO, RLOO); and the
OpenAI-compatible chat proxy (proxy) through which agents outside the process are recorded into
it (it also imports kat_jax.rollout: the engines and the agent's tool-call parser).

May import: kat_jax.data, kat_jax.trees and the root utilities. The manager itself stays free of
kat_jax.rollout, kat_jax.training and jax: agents hand it plain token lists, the trainer reads plain
record dicts (tests/test_import_layers.py checks the layers).
"""
