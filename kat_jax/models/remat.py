"""Rematerialisation policies of the decoder's scanned layer, by name: the one registry of
`model.remat_policy` values (ModelConfig validates against it, the decoder applies it).

Each entry is a function of no arguments that returns the `jax.checkpoint` policy (what the
backward pass may keep from the forward instead of recomputing it), or None for no
rematerialisation at all. Entries import JAX when called, so reading the names (config
validation, the command line) stays cheap. A new policy is one more entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

RematPolicy = Callable[..., Any]   # a jax.checkpoint_policies policy


def _none() -> RematPolicy | None:
    return None   # no jax.checkpoint: every activation of every layer is kept


def _full() -> RematPolicy:
    import jax

    return jax.checkpoint_policies.nothing_saveable   # recompute the whole layer


def _dots() -> RematPolicy:
    import jax

    return jax.checkpoint_policies.dots_saveable   # keep matmul outputs


def _dots_no_batch() -> RematPolicy:
    import jax

    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable   # keep weight matmuls


def _save_attention_out() -> RematPolicy:
    import jax

    # keep the attention output (named "attention_out" in kat_jax.models.layers)
    return jax.checkpoint_policies.save_only_these_names("attention_out")


def _offload_dots_no_batch() -> RematPolicy:
    import jax

    # as dots_no_batch, but the kept weight-matmul outputs wait in pinned host memory (moved there
    # in the forward, back for the backward) instead of device memory
    return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")


def _offload_attention_out() -> RematPolicy:
    import jax

    # as save_attention_out, with the attention output kept in pinned host memory
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["attention_out"],
        offload_src="device", offload_dst="pinned_host")


# name -> policy builder (module docstring). The single source of the names.
REMAT_POLICIES: dict[str, Callable[[], RematPolicy | None]] = {
    "none": _none,
    "full": _full,
    "dots": _dots,
    "dots_no_batch": _dots_no_batch,
    "save_attention_out": _save_attention_out,
    "offload_dots_no_batch": _offload_dots_no_batch,
    "offload_attention_out": _offload_attention_out,
}


def remat_policy_names() -> tuple[str, ...]:
    """Every value `remat_policy` accepts."""
    return tuple(REMAT_POLICIES)
