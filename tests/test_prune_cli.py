"""`kat-jax prune`: kept prefixes, summary, and errors that name the line and trajectory."""

import json

import numpy as np
import pytest

from kat_jax.cli import main


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_prune_reports_kept_prefixes_within_budget(tmp_path, capsys):
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 100, 10).tolist()
    rows = []
    for g in range(2):
        for i in range(4):
            cont = rng.integers(0, 100, 8).tolist()
            ent = [None] * 10 + [float(x) for x in rng.uniform(0, 3, 8)]
            tags = [None] * 10 + ["tool_call"] * 2 + ["tool_result"] * 2 + [None] * 4
            rows.append({"id": f"g{g}-{i}", "tokens": prompt + cont, "entropies": ent,
                         "tags": tags, "group": g})
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, rows)
    assert main(["prune", "--input", str(inp), "--output", str(out), "--budget", "26"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["groups"] == 2 and summary["trajectories"] == 8
    assert summary["tokens_before"] == 2 * (10 + 4 * 8)
    assert summary["tokens_after"] <= 2 * 26
    assert 0 < summary["entropy_mass_kept"] < 1
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [k["id"] for k in kept] == [r["id"] for r in rows]
    for g in range(2):
        ks = [k["kept"] for k in kept[4 * g:4 * g + 4]]
        assert all(k in (10, 18) for k in ks)  # the prompt, or the whole rollout
        assert 10 + 8 * sum(k == 18 for k in ks) <= 26


BAD = {
    "nan_entropy": ({"id": "x", "tokens": [1, 2], "entropies": [None, float("nan")]},
                    "entropy nan at index 1"),
    "negative": ({"id": "x", "tokens": [1, 2], "entropies": [None, -1.0]}, "finite number >= 0"),
    "ragged": ({"id": "x", "tokens": [1, 2, 3], "entropies": [0.5]}, "list of 3 values"),
    "bad_tag": ({"id": "x", "tokens": [1, 2], "entropies": [0, 0], "tags": [None, "oops"]},
                "unknown tag 'oops'"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_rollouts_are_named_and_nothing_is_written(kind, tmp_path, capsys):
    row, msg = BAD[kind]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, [{"id": "ok", "tokens": [1, 2], "entropies": [None, 1.0]},
                 json.dumps(row).replace("NaN", "NaN")])
    assert main(["prune", "--input", str(inp), "--output", str(out), "--budget", "4"]) == 1
    err = capsys.readouterr().err
    assert f"{inp}:2: trajectory 'x'" in err and msg in err, err
    assert not out.exists()


def test_budget_below_root_path_is_named(tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, [{"id": "a", "tokens": [1, 2, 3, 4], "entropies": [None, 1, 1, 1]},
                 {"id": "b", "tokens": [1, 2, 3, 5], "entropies": [None, 1, 1, 1]}])
    assert main(["prune", "--input", str(inp), "--output", str(out), "--budget", "2"]) == 1
    assert "smaller than its root path" in capsys.readouterr().err
    assert not out.exists()


def test_missing_entropies_come_from_a_forward_pass(hf_dirs, tmp_path, capsys):
    """Lines without entropies: an error naming the line, or computed with --checkpoint (equal to
    what `kat-jax score` reports for the same tokens)."""
    path, _ = hf_dirs("qwen3_mha_tied")
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 300, 8).tolist()
    rows = [{"id": i, "tokens": prompt + rng.integers(0, 300, 6).tolist()} for i in range(3)]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, rows)
    assert main(["prune", "--input", str(inp), "--output", str(out), "--budget", "14"]) == 1
    assert f"{inp}:1: trajectory 0" in capsys.readouterr().err
    assert main(["prune", "--input", str(inp), "--output", str(out), "--budget", "14",
                 "--checkpoint", path]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["tokens_after"] == 14 and 0 < summary["entropy_mass_kept"] < 1
    # the kept rollout is the one with the most entropy per token, as scored by the model
    scored = tmp_path / "scored.jsonl"
    assert main(["score", "--checkpoint", path, "--input", str(inp), "--output", str(scored)]) == 0
    capsys.readouterr()
    ents = [json.loads(line)["entropies"] for line in scored.read_text().splitlines()]
    best = int(np.argmax([np.mean(e[7:]) for e in ents]))  # the 6 tokens after the shared prompt
    kept = [json.loads(line)["kept"] for line in out.read_text().splitlines()]
    assert kept[best] == 14 and sorted(kept) == [8, 8, 14]
