"""`kat-jax score` equals transformers' log-probs and entropies; bad input is rejected by line; only
the rows needed are computed, and --no-entropies gives the same log-probs without entropies."""

import json

import numpy as np
import pytest
import torch

from kat_jax.cli import main


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _hf_logprobs_entropies(model, ids):
    with torch.no_grad():
        logits = model(torch.as_tensor(ids)[None]).logits[0].double()
    logp_all = torch.log_softmax(logits, -1)
    lp = logp_all[:-1].gather(-1, torch.as_tensor(ids[1:])[:, None])[:, 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)[:-1]
    return lp.numpy(), ent.numpy()


@pytest.mark.parametrize("case", ["qwen3_gqa2_untied_hd24", "qwen2_gqa4_untied"])
def test_score_matches_transformers_logprobs_and_entropies(case, hf_dirs, tmp_path, capsys):
    path, hf = hf_dirs(case)
    rng = np.random.default_rng(0)
    lengths = [1, 2, 5, 17, 30, 9, 64, 3]
    rows = [{"id": f"s{i}", "tokens": rng.integers(0, 300, n).tolist()}
            for i, n in enumerate(lengths)]
    rows[2]["id"] = 7  # ids may be any JSON value and come back unchanged
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(inp, rows)
    # 48-token rows: several sequences share a row, the 64-token one gets its own (bucketed) row.
    assert main(["score", "--checkpoint", path, "--input", str(inp), "--output", str(out),
                 "--batch-tokens", "48"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["sequences"] == len(rows)
    assert summary["total_tokens"] == summary["computed_tokens"] == sum(lengths)
    assert summary["reuse_ratio"] == 0.0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in results] == [r["id"] for r in rows]
    for row, res in zip(rows, results):
        ids = np.asarray(row["tokens"])
        assert len(res["logprobs"]) == len(res["entropies"]) == len(ids) - 1
        if len(ids) == 1:
            continue
        lp, ent = _hf_logprobs_entropies(hf, ids)
        np.testing.assert_allclose(res["logprobs"], lp, atol=1e-4, rtol=0)
        np.testing.assert_allclose(res["entropies"], ent, atol=1e-4, rtol=0)


BAD_LINES = {
    "not_json": ("{not json", "not valid JSON"),
    "missing_tokens": ({"id": "x"}, "missing key 'tokens'"),
    "empty_tokens": ({"id": "x", "tokens": []}, "non-empty"),
    "out_of_vocab": ({"id": "x", "tokens": [1, 2, 300]}, "outside the vocabulary"),
    "negative_id": ({"id": "x", "tokens": [-1]}, "outside the vocabulary"),
    "huge_id": ('{"id": "x", "tokens": [1, 1180591620717411303424]}', "outside the vocabulary"),
    "not_ints": ({"id": "x", "tokens": [1, 2.5]}, "integers"),
    "too_long": ({"id": "x", "tokens": [1] * 513}, "maximum of 512"),
    "missing_id": ({"tokens": [1, 2]}, "missing key 'id'"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_input_line_is_named_and_no_output_is_left(kind, hf_dirs, tmp_path, capsys):
    path, _ = hf_dirs("qwen3_mha_tied")
    bad, expected = BAD_LINES[kind]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(inp, [{"id": 0, "tokens": [1, 2, 3]}, {"id": 1, "tokens": [4, 5]}, bad])
    assert main(["score", "--checkpoint", path, "--input", str(inp), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{inp}:3:" in err and expected in err, err
    assert list(tmp_path.iterdir()) == [inp]


def test_score_embedded_default_runs(tmp_path, capsys):
    from importlib.resources import files

    sample = files("kat_jax") / "assets" / "sample_tokens.jsonl"
    out = tmp_path / "o.jsonl"
    assert main(["score", "--checkpoint", "preset:tiny", "--input", str(sample),
                 "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    n_lines = len(sample.read_text().splitlines())
    assert summary["sequences"] == n_lines == len(out.read_text().splitlines())
    for line in out.read_text().splitlines():
        res = json.loads(line)
        assert all(lp <= 0 for lp in res["logprobs"])
        assert all(0 <= e <= np.log(512) + 1e-4 for e in res["entropies"])


def test_score_shares_prefixes_and_still_matches_transformers(hf_dirs, tmp_path, capsys):
    """GRPO-like group and multi-turn extensions: one trie, each prefix computed once; every
    sequence's log-probs still equal transformers run on that sequence alone."""
    path, hf = hf_dirs("qwen3_gqa2_untied_hd24")
    rng = np.random.default_rng(7)
    prompt = rng.integers(0, 300, 20).tolist()
    seqs = [prompt + rng.integers(0, 300, n).tolist() for n in (5, 9, 1, 12)]
    seqs.append(seqs[1] + rng.integers(0, 300, 6).tolist())  # next turn extends a rollout
    seqs.append(list(seqs[0]))  # duplicate
    seqs.append(prompt[:7])  # a prefix of the others
    rows = [{"id": i, "tokens": s} for i, s in enumerate(seqs)]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(inp, rows)
    assert main(["score", "--checkpoint", path, "--input", str(inp), "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    distinct = len({tuple(s[:j + 1]) for s in seqs for j in range(len(s))})
    assert summary["total_tokens"] == sum(map(len, seqs))
    assert summary["computed_tokens"] == distinct < summary["total_tokens"]
    assert summary["reuse_ratio"] == pytest.approx(1 - distinct / summary["total_tokens"])
    for s, line in zip(seqs, out.read_text().splitlines()):
        res = json.loads(line)
        lp, ent = _hf_logprobs_entropies(hf, np.asarray(s))
        np.testing.assert_allclose(res["logprobs"], lp, atol=1e-4, rtol=0)
        np.testing.assert_allclose(res["entropies"], ent, atol=1e-4, rtol=0)


def test_score_splits_trees_larger_than_a_row(hf_dirs, tmp_path, capsys):
    path, hf = hf_dirs("qwen2_gqa4_untied")
    rng = np.random.default_rng(8)
    prompt = rng.integers(0, 300, 24).tolist()
    seqs = [prompt + rng.integers(0, 300, 30).tolist() for _ in range(5)]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(inp, [{"id": i, "tokens": s} for i, s in enumerate(seqs)])
    assert main(["score", "--checkpoint", path, "--input", str(inp), "--output", str(out),
                 "--batch-tokens", "128"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 2  # the tree (174 tokens) was split over 128-token rows
    assert summary["computed_rows"] == 2 and summary["calls"] == 2  # one 128-token row per call
    assert 24 + 150 < summary["computed_tokens"] < summary["total_tokens"]  # context repeated
    for s, line in zip(seqs, out.read_text().splitlines()):
        lp, _ = _hf_logprobs_entropies(hf, np.asarray(s))
        np.testing.assert_allclose(json.loads(line)["logprobs"], lp, atol=1e-4, rtol=0)


def _grpo_records(rng, groups, prompt, completion, samples=4, vocab=500):
    from kat_jax.training.scoring import ScoreRecord

    recs = []
    for g in range(groups):
        p = rng.integers(0, vocab, prompt)
        recs += [ScoreRecord(f"{g}-{i}", np.concatenate([p, rng.integers(0, vocab, completion)]))
                 for i in range(samples)]
    return recs


def test_only_the_rows_needed_are_computed_and_rows_fit_the_groups():
    """A group of 96 tree tokens with room for two 96-token rows per call: one row computed (the
    call is not padded to two); three groups at two rows per call: two calls, three rows. Rows
    are the bucket with least padding (96 = one group), not the --batch-tokens row (two groups
    in 256 tokens, a quarter padding). Log-probs equal the per-sequence computation."""
    from kat_jax.models.config import get_preset
    from kat_jax.models.decoder import init_model
    from kat_jax.training.scoring import score_records

    model = init_model(get_preset("tiny", attention_impl="xla_dense"), seed=0)
    rng = np.random.default_rng(0)
    one = _grpo_records(rng, 1, 32, 16)  # 32 + 4 x 16 = 96 tree tokens
    res, summary = score_records(model, one, 256)
    assert (summary["row_len"], summary["rows"], summary["computed_rows"], summary["calls"]) == \
        (96, 1, 1, 1)
    three = _grpo_records(rng, 3, 32, 16)
    res3, summary = score_records(model, three, 256)
    assert (summary["row_len"], summary["rows"], summary["computed_rows"], summary["calls"]) == \
        (96, 3, 3, 2)
    alone, _ = score_records(model, [three[5]], 256)  # a sequence on its own: a chain
    np.testing.assert_allclose(res3[5][0], alone[0][0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(res3[5][1], alone[0][1], atol=1e-5, rtol=0)


def test_no_entropies_gives_the_same_logprobs_and_no_entropies(tmp_path, capsys):
    from importlib.resources import files

    sample = files("kat_jax") / "assets" / "sample_tokens.jsonl"
    outs = {}
    for flag in ([], ["--no-entropies"]):
        out = tmp_path / f"o{len(flag)}.jsonl"
        assert main(["score", "--checkpoint", "preset:tiny", "--input", str(sample),
                     "--output", str(out), *flag]) == 0
        outs[len(flag)] = [json.loads(line) for line in out.read_text().splitlines()]
    capsys.readouterr()
    for full, lean in zip(outs[0], outs[1]):
        assert set(full) == {"id", "logprobs", "entropies"} and set(lean) == {"id", "logprobs"}
        assert lean["id"] == full["id"]
        np.testing.assert_allclose(lean["logprobs"], full["logprobs"], atol=1e-6, rtol=0)
