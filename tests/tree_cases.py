"""Random trajectory sets with heavy prefix sharing (plain Python, shared by tree tests)."""

import numpy as np

from kat_jax.trees.trajectory import Trajectory


def random_trajectories(rng: np.random.Generator, n: int, max_len: int, vocab: int = 5,
                        n_prompts: int = 2) -> list[Trajectory]:
    """GRPO-like groups and multi-turn extensions: each trajectory extends a random prefix of an
    earlier one (or a prompt), so there are branches at any depth, single-token branches,
    duplicates and trajectories that are prefixes of others. Small vocab adds accidental sharing."""
    seqs: list[list[int]] = []
    for _ in range(n_prompts):
        seqs.append(rng.integers(0, vocab, rng.integers(1, max(2, max_len // 2))).tolist())
    out: list[list[int]] = []
    while len(out) < n:
        base = seqs[rng.integers(len(seqs))]
        cut = int(rng.integers(0, len(base) + 1))
        room = max_len - cut
        ext = rng.integers(0, vocab, int(rng.integers(0, room + 1))).tolist()
        s = (base[:cut] + ext)[:max_len] or [int(rng.integers(vocab))]
        if rng.random() < 0.1 and out:
            s = list(out[rng.integers(len(out))])  # duplicate
        seqs.append(s)
        out.append(s)
    trajs = []
    for k, s in enumerate(out):
        trainable = rng.random(len(s)) < 0.7
        blp = -rng.random(len(s)).astype(np.float32)
        trajs.append(Trajectory(np.asarray(s), trainable=trainable, id=f"t{k}",
                                behaviour_logprobs=blp, advantage=float(rng.normal()),
                                tags=rng.integers(0, 8, len(s))))
    return trajs
