"""models: the Qwen2 / Qwen3 decoder over packed token trees, and everything about its weights.

Owns the model config and presets (config), the layers and the decoder (layers, decoder), the
rematerialisation policies by name (remat), Hugging Face import / export (hf_io) and kat_jax
checkpoints (checkpoint: orbax parameters + model_config.json, written atomically).

May import: kat_jax.ops (attention, log-probs, the attention_impl registry) and the root
utilities (storage, multihost, atomic_io, jsonl). Never kat_jax.trees (models and trees are
independent), data, envs, rollout, training or the commands: models know nothing of RL or of the
training loop (tests/test_import_layers.py checks the layers).
"""
