"""Trajectory: one token sequence with per-token and per-trajectory annotations.

Free of training concerns: it says what was generated and observed, not how to weight it.

Per token (arrays of length L):
    tokens               int32    token ids
    trainable            bool     True where a loss may apply (assistant tokens); default all True
    roles                int8     ROLES (system, user, assistant, tool); default unknown (-1)
    tags                 int32    bit set of TAGS (tool_call, tool_result, memory); default 0
    behaviour_logprobs   float32  log-prob of the token under the sampling policy (optional)
    old_logprobs         float32  log-prob under the old policy of a PPO update, when it differs
                                  from the sampling policy (optional)
    ref_logprobs         float32  log-prob under the reference policy of the KL term (optional)
    entropies            float32  entropy of the distribution the token was sampled from (optional)
Per trajectory: id, reward, advantage, group_id, policy_version (all optional); teacher (a
ground-truth demonstration, RFT's rl.teacher_loss=sft: its trainable tokens take a supervised
term, never the policy loss; default False).

Token 0 of a trajectory has no prediction (nothing precedes it); its trainable flag is ignored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

ROLES = {"system": 0, "user": 1, "assistant": 2, "tool": 3}
TAGS = {"tool_call": 1, "tool_result": 2, "memory": 4}


def tag_mask(names: tuple[str, ...] | list[str]) -> int:
    """Bit set of the named tags; unknown names are errors."""
    mask = 0
    for name in names:
        if name not in TAGS:
            raise KeyError(f"unknown tag {name!r}; known: {sorted(TAGS)}")
        mask |= TAGS[name]
    return mask


@dataclasses.dataclass
class Trajectory:
    tokens: np.ndarray
    trainable: np.ndarray | None = None
    roles: np.ndarray | None = None
    tags: np.ndarray | None = None
    behaviour_logprobs: np.ndarray | None = None
    old_logprobs: np.ndarray | None = None
    ref_logprobs: np.ndarray | None = None
    entropies: np.ndarray | None = None
    reward: float | None = None
    advantage: float | None = None
    group_id: Any = None
    policy_version: int | None = None
    id: Any = None
    teacher: bool = False

    def __post_init__(self):
        self.tokens = np.asarray(self.tokens, np.int64)
        n = len(self.tokens)
        name = self.name()
        if self.tokens.ndim != 1 or n == 0:
            raise ValueError(f"{name}: tokens must be a non-empty 1-D sequence")
        if self.tokens.min() < 0 or self.tokens.max() >= 2**31:
            i = int(np.flatnonzero((self.tokens < 0) | (self.tokens >= 2**31))[0])
            raise ValueError(f"{name}: token id {int(self.tokens[i])} at index {i} is not a valid "
                             "id (0 <= id < 2^31)")
        self.tokens = self.tokens.astype(np.int32)
        defaults = {"trainable": (np.bool_, True), "roles": (np.int8, -1), "tags": (np.int32, 0)}
        for key, (dtype, fill) in defaults.items():
            value = getattr(self, key)
            arr = np.full(n, fill, dtype) if value is None else np.asarray(value).astype(dtype)
            if arr.shape != (n,):
                raise ValueError(f"{name}: '{key}' has shape {arr.shape}, expected ({n},)")
            setattr(self, key, arr)
        for key in ("behaviour_logprobs", "old_logprobs", "ref_logprobs", "entropies"):
            value = getattr(self, key)
            if value is not None:
                arr = np.asarray(value, np.float32)
                if arr.shape != (n,):
                    raise ValueError(f"{name}: '{key}' has shape {arr.shape}, expected ({n},)")
                if not np.all(np.isfinite(arr)):
                    raise ValueError(f"{name}: '{key}' has non-finite values")
                setattr(self, key, arr)
        for key in ("reward", "advantage"):
            value = getattr(self, key)
            if value is not None and not math.isfinite(float(value)):
                raise ValueError(f"{name}: '{key}' is {value} (must be finite)")

    def __len__(self) -> int:
        return len(self.tokens)

    def name(self) -> str:
        return f"trajectory {self.id!r}" if self.id is not None else "trajectory"

    def validate(self, vocab_size: int) -> None:
        """Errors name the trajectory: ids outside [0, vocab_size)."""
        bad = np.flatnonzero((self.tokens < 0) | (self.tokens >= vocab_size))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{self.name()}: token id {int(self.tokens[i])} at index {i} is "
                             f"outside the vocabulary [0, {vocab_size})")
