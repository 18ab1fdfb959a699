"""Optional bridge: a seqio Task or Mixture as a mid-training source (extra `seqio`).

    data.train_files = "seqio:my_task"            # split 'train'
    data.train_files = "seqio:my_mixture:validation"

Each example becomes one mid-training document: its "targets" feature (token ids, or text that the
kat_jax tokenizer encodes), preceded by "inputs" when the example has them. seqio (and TensorFlow)
are imported only here, when such a source is asked for. The examples are read once, in seqio's
deterministic order without seqio's own shuffling, into a random-access list, so grain's shuffling,
per-host sharding and checkpointable iterator state apply exactly as for JSONL files; this suits
the corpora a CPU-to-pod run of this trainer reads per stage, not unbounded streams.
"""

from __future__ import annotations

from typing import Any


def _to_record(example: dict[str, Any], where: str) -> dict[str, Any]:
    def value(key):
        v = example.get(key)
        if v is None:
            return None
        if isinstance(v, bytes):
            return v.decode("utf-8")
        if hasattr(v, "tolist"):
            v = v.tolist()
            if isinstance(v, bytes):
                return v.decode("utf-8")
        return v

    targets, inputs = value("targets"), value("inputs")
    if targets is None:
        raise ValueError(f"{where}: example has no 'targets' feature (keys: {sorted(example)})")
    if isinstance(targets, str):
        return {"text": (inputs or "") + targets, "id": where}
    toks = list(inputs or []) + list(targets)
    if len(toks) < 2:
        raise ValueError(f"{where}: fewer than 2 tokens")
    return {"tokens": [int(t) for t in toks], "id": where}


class SeqioGroups:
    """Random-access source with the interface of kat_jax.data.sources.JsonlGroups (kind 'mid').

    task: a seqio Task or Mixture object, or its registered name; any object with
    get_dataset(split=..., shuffle=False) returning a dataset with as_numpy_iterator() works."""

    kind = "mid"

    def __init__(self, task: Any, split: str = "train"):
        if isinstance(task, str):
            try:
                import seqio
            except ImportError as e:
                raise ImportError("data.train_files 'seqio:...' needs the seqio extra: "
                                  "pip install 'kat_jax[seqio]'") from e
            task = seqio.get_mixture_or_task(task)
        name = getattr(task, "name", type(task).__name__)
        ds = task.get_dataset(split=split, shuffle=False)
        self._records = [_to_record(ex, f"seqio:{name}:{split}:{i}")
                         for i, ex in enumerate(ds.as_numpy_iterator())]
        if not self._records:
            raise ValueError(f"seqio:{name}:{split}: no examples")

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> list[tuple[dict, str]]:
        r = self._records[i]
        return [(r, r["id"])]

    @property
    def num_records(self) -> int:
        return len(self._records)


def parse_seqio_spec(spec: str) -> tuple[str, str] | None:
    """'seqio:NAME[:SPLIT]' -> (NAME, SPLIT); anything else -> None."""
    if not isinstance(spec, str) or not spec.startswith("seqio:"):
        return None
    name, _, split = spec[len("seqio:"):].partition(":")
    if not name:
        raise ValueError(f"data.train_files: {spec!r} names no seqio task")
    return name, split or "train"
