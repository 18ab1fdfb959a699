"""Chat rendering, tokenizers, data sources and the packed-batch pipeline (host side, no model)."""

import json

import jax
import numpy as np
import pytest

from kat_jax.data.chat import encode_chat, render_text
from kat_jax.data.pipeline import BatchShape, make_step_iterator
from kat_jax.data.sources import JsonlGroups, expand_files
from kat_jax.data.tokenizer import ByteTokenizer, HFTokenizer
from kat_jax.trees.trajectory import ROLES, TAGS

TOK = ByteTokenizer()
MSGS = [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "fix it"},
    {"role": "assistant", "content": "looking",
     "tool_calls": [{"type": "function", "function": {"name": "bash",
                                                      "arguments": "{\"command\": \"ls\"}"}},
                    {"type": "function", "function": {"name": "bash",
                                                      "arguments": {"command": "pwd"}}}]},
    {"role": "tool", "content": "a.py"},
    {"role": "tool", "content": "/repo"},
    {"role": "assistant", "content": "done"},
]


def test_chat_render_matches_qwen_format_and_masks_only_assistant_output():
    text = render_text(MSGS)
    assert text == (
        "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nfix it<|im_end|>\n"
        "<|im_start|>assistant\nlooking\n<tool_call>\n{\"name\": \"bash\", \"arguments\": "
        "{\"command\": \"ls\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"bash\", \"arguments\": "
        "{\"command\": \"pwd\"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\na.py\n"
        "</tool_response>\n<tool_response>\n/repo\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\ndone<|im_end|>\n")
    t = encode_chat(TOK, MSGS)
    assert TOK.decode(t.tokens) == text
    trained = TOK.decode(t.tokens[t.trainable])
    assert trained == ("looking\n<tool_call>\n{\"name\": \"bash\", \"arguments\": {\"command\": "
                       "\"ls\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"bash\", \"arguments\": "
                       "{\"command\": \"pwd\"}}\n</tool_call><|im_end|>done<|im_end|>")
    assert np.all(t.roles[t.trainable] == ROLES["assistant"])
    calls = TOK.decode(t.tokens[(t.tags & TAGS["tool_call"]) > 0])
    assert calls.count("<tool_call>") == 2 and "looking" not in calls
    results = TOK.decode(t.tokens[(t.tags & TAGS["tool_result"]) > 0])
    assert "a.py" in results and "/repo" in results and "fix it" not in results


def test_chat_with_tools_header_and_generation_prompt():
    tools = [{"type": "function", "function": {"name": "bash", "parameters": {}}}]
    text = render_text(MSGS[1:2], tools, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n# Tools\n")
    assert "<tools>\n" + json.dumps(tools[0]) + "\n</tools>" in text
    assert text.endswith("<|im_start|>user\nfix it<|im_end|>\n<|im_start|>assistant\n")


def test_chat_errors_name_the_message():
    with pytest.raises(ValueError, match="message 1: unknown role"):
        encode_chat(TOK, [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}])
    bad = {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}
    with pytest.raises(ValueError, match="message 0: tool call 'f': arguments are not JSON"):
        encode_chat(TOK, [bad])


def test_byte_tokenizer_round_trip_with_specials():
    s = "héllo <|im_start|>user\n<tool_call>x</tool_call>"
    ids = TOK.encode(s)
    assert TOK.decode(ids) == s
    assert TOK.special("<|im_start|>") in ids and max(ids) < TOK.vocab_size <= 512


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz <>|_\n")}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="_"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    hf = HFTokenizer(str(tmp_path))
    assert hf.eos_id == hf.special("<|im_end|>") and hf.pad_id == hf.special("<|endoftext|>")
    t = encode_chat(hf, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert hf.decode(t.tokens[t.trainable]).replace(" ", "") == "yo<|im_end|>"


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_sources_reject_bad_lines_with_file_and_line(tmp_path):
    f = _write(tmp_path / "d.jsonl", [{"text": "ok"}, {"txt": "no"}])
    with pytest.raises(ValueError, match=r"d.jsonl:2: a mid-training document needs"):
        JsonlGroups([f], "mid")
    (tmp_path / "e.jsonl").write_text('{"messages": [{"role": "assistant", "content": "a"}]}\n{bad\n')
    with pytest.raises(ValueError, match=r"e.jsonl:2: not valid JSON"):
        JsonlGroups([str(tmp_path / "e.jsonl")], "chat")
    f = _write(tmp_path / "r.jsonl", [{"id": 1, "tokens": [1, 2], "logprobs": [None, 0.5],
                                       "reward": 1}])
    with pytest.raises(ValueError,
                       match=r"r.jsonl:1: trajectory 1: 'logprobs': log-prob 0.5 at index 1"):
        JsonlGroups([f], "rollouts")
    with pytest.raises(FileNotFoundError, match="data.train_files: .*nope.jsonl"):
        expand_files(str(tmp_path / "nope.jsonl"), "data.train_files")


def _mid_iter(files, m=2, s=2, **kw):
    return make_step_iterator(files, "mid", TOK, BatchShape(2, 32, 8, 16), 512, m, s, seed=3, **kw)


def test_pipeline_is_deterministic_and_resumes_exactly(tmp_path):
    rng = np.random.default_rng(0)
    docs = [{"id": i, "text": "x" * int(rng.integers(5, 80))} for i in range(40)]
    f = _write(tmp_path / "docs.jsonl", docs)
    a = _mid_iter([f])
    first = [next(a)[0] for _ in range(3)]
    state = a.get_state()
    json.dumps(state)  # checkpointable as JSON
    rest = [next(a)[0] for _ in range(4)]
    b = _mid_iter([f])
    same = lambda x, y: all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(x),
                                                                jax.tree.leaves(y), strict=True))
    for want in first:
        assert same(next(b)[0], want)
    c = _mid_iter([f])
    c.set_state(state)
    for want in rest:
        got = next(c)[0]
        assert same(got, want)
        assert got.tokens.shape == (2, 2, 2, 32) and got.traj_index.shape == (2, 2, 8, 32)
        assert got.schedule.kind.shape[:3] == (2, 2, 2) and got.fields == ()


def test_global_batch_does_not_depend_on_the_number_of_hosts(tmp_path):
    rng = np.random.default_rng(2)
    f = _write(tmp_path / "docs.jsonl",
               [{"id": i, "text": "y" * int(rng.integers(5, 60))} for i in range(50)])
    one = _mid_iter([f], m=2, s=4, epochs=1)  # one host feeding all 4 shards
    hosts = [_mid_iter([f], m=2, s=2, epochs=1, shard_ids=ids, num_shards=4, pad_exhausted=True)
             for ids in ([0, 1], [2, 3])]
    steps = 0
    for want, stats in one:
        parts = [next(h) for h in hosts]
        joined = jax.tree.map(lambda *xs: np.concatenate(xs, axis=1), *[p[0] for p in parts])
        for a, b in zip(jax.tree.leaves(joined), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)
        assert sum(p[1]["total_tokens"] for p in parts) == stats["total_tokens"]
        steps += 1
    assert steps >= 3
    # after the last step every host pads, flagged, instead of stopping on its own
    assert all(next(h)[1]["exhausted"] == 1 for h in hosts)
    with pytest.raises(ValueError, match=r"saved for shards \[0, 1\] of 4, but this process "
                                         r"feeds shards \[2, 3\] of 4"):
        hosts[1].set_state(hosts[0].get_state())


def test_pipeline_packs_every_trajectory_once_per_epoch_and_counts_drops(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for g in range(12):  # groups share a prompt; one group is larger than a shard batch holds
        prompt = [int(x) for x in rng.integers(0, 256, 10)]
        for k in range(12 if g == 0 else int(rng.integers(1, 4))):
            n = int(rng.integers(3, 20))
            toks = prompt + [int(x) for x in rng.integers(0, 256, n)]
            rows.append({"id": f"{g}-{k}", "group": g, "tokens": toks,
                         "logprobs": [None] * 10 + [-1.0] * n, "reward": float(k % 2)})
    rows.append({"id": "long", "group": 99, "tokens": list(range(100)),
                 "logprobs": [-1.0] * 100, "reward": 1.0})
    rows.append({"id": "err", "group": 98, "tokens": [1, 2, 3], "logprobs": [None, -1, -1],
                 "status": "env_error"})
    f = _write(tmp_path / "r.jsonl", rows)
    it = make_step_iterator([f], "rl", TOK, BatchShape(2, 48, 8, 16), 512, 1, 1, shuffle=True,
                            epochs=1)
    seen = []
    for _arrays, stats in it:
        n = int(stats["trajectories"])
        assert n <= 8
        seen.append(n)
    assert sum(seen) == len(rows) - 2
    assert stats["dropped_overlong"] == 1 and stats["excluded_env_error"] == 1


def test_repeated_data_with_nothing_that_fits_a_row_is_an_error_not_an_endless_loop(tmp_path):
    """data.epochs=-1 repeats the data forever: if no trajectory fits a row, a whole pass gives
    nothing, and the run stops with an error naming data.row_len instead of spinning."""
    rows = [{"id": f"t{g}", "group": g, "tokens": list(range(40 + g)),
             "logprobs": [-1.0] * (40 + g), "reward": 1.0} for g in range(3)]
    f = _write(tmp_path / "r.jsonl", rows)
    it = make_step_iterator([f], "rl", TOK, BatchShape(2, 32, 8, 16), 512, 1, 1, epochs=None)
    with pytest.raises(ValueError, match=r"every trajectory is longer than "
                                         r"--config\.data\.row_len=32 \(the longest has 42 tokens\)"):
        next(iter(it))
    # one trajectory that fits is enough: the others are dropped and counted, training goes on
    rows.append({"id": "short", "group": 9, "tokens": list(range(10)), "logprobs": [-1.0] * 10,
                 "reward": 1.0})
    f = _write(tmp_path / "r2.jsonl", rows)
    it = iter(make_step_iterator([f], "rl", TOK, BatchShape(2, 32, 8, 16), 512, 1, 1,
                                 epochs=None))
    for _ in range(4):  # passes reshuffled: up to 6 overlong groups in a row, no error
        _arrays, stats = next(it)
        assert stats["trajectories"] >= 1 and stats["dropped_overlong"] >= 3


def test_group_advantages_rl_and_rft(tmp_path):
    from kat_jax.data.pipeline import RolloutConverter as RecordConverter

    grp = [({"id": i, "tokens": [1, 2, 3], "logprobs": [None, -1.0, -1.0], "reward": r,
             "group": 0, **({"teacher": True} if i == 3 else {})}, f"f:{i}")
           for i, r in enumerate([1.0, 0.0, 0.0, 1.0])]
    rl = RecordConverter("rl", TOK, 16, 512)(grp[:3])
    r = np.array([1.0, 0.0, 0.0])
    std = np.sqrt(((r - r.mean()) ** 2).sum() / (len(r) - 1))  # unbiased
    np.testing.assert_allclose([t.advantage for t in rl], (r - r.mean()) / (std + 1e-6),
                               rtol=1e-6)
    # Dr. GRPO: no std; RLOO: the mean of the others' rewards
    dr = RecordConverter("rl", TOK, 16, 512, advantage="drgrpo")(grp[:3])
    np.testing.assert_allclose([t.advantage for t in dr], r - r.mean(), rtol=1e-6)
    loo = RecordConverter("rl", TOK, 16, 512, advantage="rloo")(grp[:3])
    np.testing.assert_allclose([t.advantage for t in loo],
                               [r[i] - (r.sum() - r[i]) / 2 for i in range(3)], rtol=1e-6)
    with pytest.raises(ValueError, match="rloo needs at least 2 trajectories"):
        RecordConverter("rl", TOK, 16, 512, advantage="rloo")(grp[:1])
    rft = RecordConverter("rft", TOK, 16, 512)(grp)
    assert len(rft) == 3  # the teacher is the baseline, not a training sample
    np.testing.assert_allclose([t.advantage for t in rft], (r - 1.0) / (std + 1e-6), rtol=1e-6)
    assert not rft[0].trainable[0] and rft[0].trainable[1:].all()


class _FakeDataset:
    def __init__(self, examples):
        self.examples = examples

    def as_numpy_iterator(self):
        return iter(self.examples)


class _FakeTask:
    """The part of the seqio Task / Mixture API the bridge uses."""

    name = "fake_task"

    def get_dataset(self, split, shuffle):
        assert split == "train" and shuffle is False
        return _FakeDataset([{"targets": np.arange(5 + i, dtype=np.int32)} for i in range(6)]
                            + [{"inputs": b"q: ", "targets": b"an answer"}])


def test_seqio_bridge_source_feeds_the_mid_pipeline():
    from kat_jax.data.seqio_source import SeqioGroups, parse_seqio_spec

    assert parse_seqio_spec("seqio:mix:validation") == ("mix", "validation")
    assert parse_seqio_spec("data.jsonl") is None
    src = SeqioGroups(_FakeTask())
    assert len(src) == 7 and src[6][0][0]["text"] == "q: an answer"
    total = sum(stats["total_tokens"] for _, stats in make_step_iterator(
        src, "mid", TOK, BatchShape(2, 16, 8, 16), 512, 1, 1, epochs=1))
    # every token of every example, once (the text example gains the tokenizer's eos)
    assert total == sum(5 + i for i in range(6)) + len("q: an answer") + 1
    with pytest.raises(ValueError, match="stage 'sft' reads 'chat' data"):
        make_step_iterator(src, "sft", TOK, BatchShape(2, 16, 8, 16), 512, 1, 1)


def test_seqio_registered_task_when_installed():
    seqio = pytest.importorskip("seqio", reason="the seqio extra is not installed")
    assert hasattr(seqio, "get_mixture_or_task")


def test_rollout_records_fill_the_batch_fields_the_run_asks_for(tmp_path):
    """behaviour / old-policy / reference log-probs of the records land in the StepBatch at each
    trajectory's tokens (null -> 0); fields the run does not ask for are not carried."""
    rows = []
    for k in range(3):
        toks = [1, 2, 3 + k, 4, 5 + k]
        lp = [None, None, -0.5 - k, -0.25, -1.0]
        rows.append({"id": k, "group": 0, "tokens": toks, "logprobs": lp, "reward": float(k),
                     "old_logprobs": [None, None, -0.4, -0.3 - k, -0.9],
                     "ref_logprobs": [None, -2.0, -0.6, -0.2, -1.1 - k]})
    f = _write(tmp_path / "r.jsonl", rows)
    fields = ("behaviour_logprobs", "old_logprobs", "ref_logprobs")
    it = make_step_iterator([f], "rl", TOK, BatchShape(1, 32, 4, 16, fields), 512, 1, 1,
                            shuffle=False, epochs=1)
    batch, stats = next(it)
    assert batch.fields == fields and stats["trajectories"] == 3
    want = {"behaviour_logprobs": "logprobs", "old_logprobs": "old_logprobs",
            "ref_logprobs": "ref_logprobs"}
    for k, row in enumerate(rows):
        for field, key in want.items():
            got = getattr(batch, field)[0, 0, k, :5]
            np.testing.assert_allclose(got, [0.0 if x is None else x for x in row[key]])
    plain, _ = next(make_step_iterator([f], "rl", TOK, BatchShape(1, 32, 4, 16,
                                                                  ("behaviour_logprobs",)),
                                       512, 1, 1, shuffle=False, epochs=1))
    assert plain.old_logprobs is None and plain.ref_logprobs is None


def test_a_registered_data_kind_is_validated_up_front_and_converted(tmp_path):
    """A user's data kind: its check runs on every line when the source opens (file:line), its
    converter feeds the batcher like the built-in ones."""
    from kat_jax.data.pipeline import (
        CONVERTERS,
        STAGE_KIND,
        RecordConverter,
        register_data_kind,
    )
    from kat_jax.data.sources import VALIDATORS
    from kat_jax.trees.trajectory import Trajectory

    def check(obj, where):
        if not isinstance(obj.get("ids"), list) or len(obj["ids"]) < 2:
            raise ValueError(f"{where}: 'ids' must list at least 2 token ids")

    class IdsConverter(RecordConverter):
        def __call__(self, group):
            return [self._checked(Trajectory(np.asarray(o["ids"]), id=w), w) for o, w in group]

    register_data_kind("ids_for_test", check, IdsConverter)
    STAGE_KIND["mid_ids_for_test"] = "ids_for_test"
    try:
        bad = _write(tmp_path / "bad.jsonl", [{"ids": [1, 2, 3]}, {"ids": [4]}])
        with pytest.raises(ValueError, match=r"bad.jsonl:2: 'ids' must list"):
            JsonlGroups([bad], "ids_for_test")
        good = _write(tmp_path / "good.jsonl", [{"ids": [1, 2, 3]}, {"ids": [4, 5]}])
        it = make_step_iterator([good], "mid_ids_for_test", TOK, BatchShape(1, 16, 4, 16), 512,
                                1, 1, shuffle=False, epochs=1)
        batch, stats = next(it)
        assert stats["trajectories"] == 2 and batch.tokens[0, 0, 0, :3].tolist() == [1, 2, 3]
    finally:
        for table, key in ((VALIDATORS, "ids_for_test"), (CONVERTERS, "ids_for_test"),
                           (STAGE_KIND, "mid_ids_for_test")):
            table.pop(key, None)
