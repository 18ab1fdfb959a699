"""rollout: sampling from a policy and running agents in environments.

Owns the sampler with its KV cache (sampler), the batching engine that serves concurrent requests
(engine), the multi-turn agent loop with tool calls (agent), the OpenAI-compatible server (server)
and the `kat-jax rollout` job that writes one JSONL record per trajectory (runner).

May import: kat_jax.envs (environments by name), data (tokenizer, chat template), models
(checkpoints), trees, ops and the root utilities. Never kat_jax.training (the trainer never sees an
agent; weights reach the sampler through checkpoints or the flow layer) nor the commands
(tests/test_import_layers.py checks the layers).
"""
