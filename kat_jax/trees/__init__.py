"""trees: packed token trees, the one representation every batch reaches the model in.

Owns trajectories (trajectory), the prefix trie that merges them (trie), packing tries into fixed
rows with their attention schedules (packing), the typed step batch (batch) and the entropy-based
pruner (pruning).

May import: kat_jax.ops (block schedules and block sizes of tree attention) and the root
utilities. Never kat_jax.models (trees and models are independent), data, envs, rollout, training
or the commands: trees know nothing of training (tests/test_import_layers.py checks the layers).
"""
