"""kat_jax: JAX-native training of agentic coding models over packed token trees.

Layers, bottom to top (a package imports only from layers below it; tests/test_import_layers.py
checks it): root utilities (atomic_io, storage, jsonl, multihost) < ops < models, trees < data,
envs < rollout, training < flow < commands, cli. See each package's docstring for what it owns.
"""
