"""The Qwen2/Qwen3 decoder over packed token trees (Flax NNX).

    hidden = Decoder(cfg)(tokens, positions, subtree_end)      # [B, T, D], after the final norm
    head = model.head_kernel()                                  # [D, V] (tied: embedding transposed)

tokens, positions, subtree_end: int32[B, T]. positions is the depth of each token in its tree (RoPE uses
it); subtree_end[i] is one past the last token of the subtree rooted at i (the attention rule is
k <= q < subtree_end[k]). A plain causal sequence is positions = arange(T), subtree_end = T.

The layers are stacked on a leading axis and run with jax.lax.scan, so compile time does not grow with
depth; the scanned body is rematerialised according to cfg.remat_policy (kat_jax.models.remat).
Under a mesh set with jax.set_mesh the hidden state carried from layer to layer (what the scan keeps
for the backward pass, [L] x [B, T, D]) is sharded rows over ('data', 'fsdp'), tokens over
'context' and the model dim over 'tensor' (`shard_layer_carry`), so no device holds a whole row's
[T, D] per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from kat_jax.models.config import ModelConfig
from kat_jax.models.layers import DTYPE, DecoderLayer, RMSNorm, param
from kat_jax.models.remat import REMAT_POLICIES
from kat_jax.ops.paged_attention import paged_attention
from kat_jax.ops.tree_mask import BATCH_MESH_AXES

# hidden-state dimension -> the mesh axes `shard_layer_carry` splits it over
CARRY_AXES = (BATCH_MESH_AXES, ("context",), ("tensor",))


def shard_layer_carry(x_btd: jax.Array) -> jax.Array:
    """x_btd [B, T, D] constrained to the mesh set with jax.set_mesh: B over ('data', 'fsdp'), T
    over 'context', D over 'tensor' (MaxText's activation_embed rule), each only when the axes are
    there (size > 1, not manual) and divide the dimension; other dimensions are left to the
    partitioner (unconstrained). Unchanged without a mesh. The values are exact either way: only
    where they live changes (for the 32B model at 32k tokens the scan's saved carries are
    64 x 32k x 5120 bf16 = 20 GiB per device when replicated over a tensor axis of 4, 5 GiB split)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x_btd
    spec = []
    for dim, names in zip(x_btd.shape, CARRY_AXES):
        axes = tuple(a for a in names if a in mesh.axis_names and a not in mesh.manual_axes
                     and mesh.shape[a] > 1)
        size = 1
        for a in axes:
            size *= mesh.shape[a]
        spec.append(axes if axes and dim % size == 0 else P.UNCONSTRAINED)
    if all(s is P.UNCONSTRAINED for s in spec):
        return x_btd
    return jax.lax.with_sharding_constraint(x_btd, P(*spec))


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = DTYPE[cfg.param_dtype]
        self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd,
                                  0.02)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=cfg.num_layers)
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, rngs)

        self.layers = make_layers(rngs)  # every parameter has a leading [L] axis
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, "embed", rngs)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd,
                                 0.02)

    def head_kernel(self) -> jax.Array:
        """The output projection [D, V] in the compute dtype."""
        dtype = DTYPE[self.cfg.dtype]
        if self.lm_head is None:
            return self.embed_tokens[...].astype(dtype).T
        return self.lm_head[...].astype(dtype)

    def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array, subtree_end_bt: jax.Array,
                 attn_schedule: dict | None = None) -> jax.Array:
        """hidden [B, T, D]. attn_schedule: optional host-built block schedule
        (kat_jax.ops.block_sparse.build_block_schedule with effective_block_size(
        cfg.attention_block_size, T)) so block-sparse attention visits only visible blocks."""
        cfg = self.cfg
        dtype = DTYPE[cfg.dtype]
        x_btd = jnp.take(self.embed_tokens[...], tokens_bt, axis=0).astype(dtype)
        graphdef, layer_state = nnx.split(self.layers)

        def body(h_btd, state):
            layer = nnx.merge(graphdef, state)
            return shard_layer_carry(layer(h_btd, positions_bt, subtree_end_bt, attn_schedule)), None

        policy = REMAT_POLICIES[cfg.remat_policy]()
        if policy is not None:
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        x_btd, _ = jax.lax.scan(body, shard_layer_carry(x_btd), layer_state)
        return self.norm(x_btd)

    def init_kv_pool(self, num_blocks: int, block_size: int) -> list[tuple[jax.Array, jax.Array]]:
        """An empty paged KV cache (kat_jax.ops.paged_attention): per layer (k, v) pools
        [K, P, S_blk, H] in the compute dtype, one buffer each (block 0 is the trash block)."""
        cfg = self.cfg
        shape = (cfg.num_kv_heads, num_blocks, block_size, cfg.head_dim)
        return [(jnp.zeros(shape, DTYPE[cfg.dtype]), jnp.zeros(shape, DTYPE[cfg.dtype]))
                for _ in range(cfg.num_layers)]

    def unstacked_layer_states(self) -> list[nnx.State]:
        """The state of each layer as its own arrays (slices of the stacked parameters, copied
        once): the decode path takes these so a step never slices the stacked weights."""
        _, stacked = nnx.split(self.layers)
        return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(self.cfg.num_layers)]

    def paged(self, layers: list[DecoderLayer], tokens: jax.Array, positions: jax.Array,
              slots: jax.Array, kv_pool: list[tuple[jax.Array, jax.Array]],
              block_tables: jax.Array, attention=paged_attention
              ) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
        """Causal forward of new tokens int32[B, T] at positions int32[B, T] over a paged KV
        cache (prefill: T new tokens past a cached prefix; decode: T = 1). `layers`: the layers
        as separate modules (from unstacked_layer_states), run as a Python loop so each reads its
        own weight and pool buffers in place (a scan would slice the stacked weights and caches
        every step); slots int32[B, T]: where each token's keys and values go
        (kat_jax.ops.paged_attention.token_slots); block_tables int32[B, M]. Returns (hidden
        [B, T, D] after the final norm, the updated pools). attention: the paged attention
        function (Attention.paged). The same parameters and arithmetic as
        __call__, so a token's log-prob from here equals its score in the packed-tree forward (to
        float32 rounding). A list of attention functions gives each layer its own."""
        dtype = DTYPE[self.cfg.dtype]
        x = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(dtype)
        new_pool = []
        attentions = attention if isinstance(attention, (list, tuple)) else \
            [attention] * len(layers)
        for layer, (pool_k, pool_v), attend in zip(layers, kv_pool, attentions):
            x, pool_k, pool_v = layer.paged(x, positions, pool_k, pool_v, slots, block_tables,
                                            attend)
            new_pool.append((pool_k, pool_v))
        return self.norm(x), new_pool

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Full logits float32[..., V] of hidden [..., D] (decoding, tests; training and scoring use
        the vocabulary-chunked kat_jax.ops.logprobs instead). A tied head contracts the embedding
        table [V, D] in place (no transposed copy of it per call)."""
        dtype = DTYPE[self.cfg.dtype]
        if self.lm_head is None:
            return jnp.einsum("...d,vd->...v", hidden, self.embed_tokens[...].astype(dtype),
                              preferred_element_type=jnp.float32)
        return jnp.einsum("...d,dv->...v", hidden, self.lm_head[...].astype(dtype),
                          preferred_element_type=jnp.float32)


def init_model(cfg: ModelConfig, seed: int = 0) -> Decoder:
    return Decoder(cfg, nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig) -> Decoder:
    """The model with ShapeDtypeStructs instead of arrays (nothing materialised)."""
    return nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(params=0)))


def chain_inputs(tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions and subtree_end for plain causal rows: tokens int32[B, T]."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    subtree_end = jnp.full((b, t), t, jnp.int32)
    return positions, subtree_end
