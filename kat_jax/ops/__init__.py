"""ops: the array kernels of a packed token tree, pure functions under jax.jit.

Owns tree attention (the rule `k <= q < subtree_end[k]`, the dense XLA reference, block-sparse XLA,
Pallas kernels for GPU and TPU, their block schedules, the registry of implementations by name)
and the chunked log-prob / entropy of tokens under their parents.

Inside: tree_mask (the rule, MASK_VALUE, block size, platform, batch / head mesh axis names) is the
bottom; the kernels (dense, block_sparse, pallas/) import it; attention_impls registers the kernels
by name (the names ModelConfig validates `attention_impl` against); attention (the dispatcher,
tree_attention) imports them all. No kernel imports the dispatcher.

May import: the root utilities of kat_jax (kat_jax/__init__, atomic_io, storage, jsonl) and
third-party libraries. Knows nothing of models, trees, data, training or RL
(tests/test_import_layers.py checks the layers).
"""
