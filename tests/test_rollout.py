"""Rollouts: the KV-cache sampler agrees with scoring, is seeded, prefills a group's prompt once;
the agent loop is token-in-token-out; the OpenAI-compatible server and client."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.data.chat import render_text
from kat_jax.data.tokenizer import ByteTokenizer
from kat_jax.envs import Task, make_env
from kat_jax.models.config import get_preset
from kat_jax.models.decoder import chain_inputs, init_model
from kat_jax.ops.logprobs import tree_logprobs
from kat_jax.rollout.agent import parse_tool_calls, run_episode
from kat_jax.rollout.sampler import Generation, JaxEngine, SamplingParams

TOK = ByteTokenizer()
PROMPTS = [[5, 9, 200, 31, 7, 64, 3], [257, 1, 2]]


@pytest.fixture(scope="module")
def engine():
    return JaxEngine(init_model(get_preset("tiny"), seed=4))


def forward_logprobs(engine, seq, temperature=1.0):
    """Teacher-forced log-probs, entropies and logits of a chain (the scoring path)."""
    from flax import nnx

    m = nnx.merge(engine.graphdef, engine.params)
    toks = jnp.asarray([seq], jnp.int32)
    hidden = m(toks, *chain_inputs(toks))
    parent = jnp.arange(len(seq), dtype=jnp.int32)[None] - 1
    lp, ent = tree_logprobs(hidden, m.head_kernel(), toks, parent, 4096, temperature)
    return np.asarray(lp[0]), np.asarray(ent[0]), np.asarray(m.logits(hidden)[0])


def test_same_seed_same_tokens_and_the_group_prompt_is_prefilled_once(engine):
    sp = SamplingParams(temperature=1.0, max_new_tokens=8, seed=11)
    before = dict(engine.stats)
    a = engine.generate(PROMPTS, sp, n=2)
    assert engine.stats["prefill_tokens"] - before["prefill_tokens"] == sum(map(len, PROMPTS))
    b = engine.generate(PROMPTS[::-1], sp, n=2)  # other batch order, same seed: same samples
    assert [g.tokens for g in a[0]] == [g.tokens for g in b[1]]
    assert a[0][0].tokens != a[0][1].tokens  # the group's samples differ
    c = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=8, seed=12), n=2)
    assert c[0][0].tokens != a[0][0].tokens


def test_greedy_decode_is_the_argmax_of_scoring(engine):
    g = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=8), n=2)
    for prompt, (gen, _) in zip(PROMPTS, g):
        _, _, logits = forward_logprobs(engine, prompt + gen.tokens)
        argmax = logits[len(prompt) - 1:-1].argmax(-1)
        assert gen.tokens == argmax.tolist()


def test_sampled_logprobs_and_entropies_agree_with_scoring_at_temperature(engine):
    temperature = 0.7
    out = engine.generate(PROMPTS, SamplingParams(temperature=temperature, max_new_tokens=8,
                                                  seed=3), n=2)
    for prompt, gens in zip(PROMPTS, out):
        for g in gens:
            lp, ent, _ = forward_logprobs(engine, prompt + g.tokens, temperature)
            n = len(prompt)
            np.testing.assert_allclose(g.logprobs, lp[n:], atol=1e-4)
            np.testing.assert_allclose(g.entropies, ent[n:], atol=1e-4)


def test_score_command_path_agrees_at_temperature_one(engine):
    from flax import nnx

    from kat_jax.training.scoring import ScoreRecord, score_records

    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, seed=5), n=2)
    seqs = [p + g.tokens for p, (g, _) in zip(PROMPTS, out)]
    model = nnx.merge(engine.graphdef, engine.params)
    res, _ = score_records(model, [ScoreRecord(i, np.asarray(s)) for i, s in enumerate(seqs)],
                           4096)
    for prompt, (g, _), (lp, ent) in zip(PROMPTS, out, res):
        np.testing.assert_allclose(g.logprobs, lp[len(prompt) - 1:], atol=1e-4)
        np.testing.assert_allclose(g.entropies, ent[len(prompt) - 1:], atol=1e-4)


def test_top_k_one_is_greedy_stop_tokens_and_weights_swap_without_recompiling(engine):
    def gen(**kw):
        return [g[0] for g in engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, **kw), n=2)]

    greedy = gen(temperature=0.0)
    topk = gen(temperature=1.3, top_k=1, seed=9)
    assert [g.tokens for g in greedy] == [g.tokens for g in topk]
    assert all(abs(x) < 1e-6 for g in topk for x in g.logprobs)  # a one-token support
    assert [g.tokens for g in greedy] == [g.tokens for g in gen(top_p=1e-6, seed=9)]
    stop = greedy[0].tokens[2]
    s = gen(temperature=0.0, stop_tokens=(stop,))[0]
    first = greedy[0].tokens.index(stop)
    assert s.tokens == greedy[0].tokens[:first + 1] and s.finish_reason == "stop"
    size = engine._decode._cache_size()
    engine.update_weights(jax.tree.map(lambda x: x * 1.01, engine.params))
    moved = gen(temperature=0.0)
    assert engine._decode._cache_size() == size
    assert [g.logprobs for g in moved] != [g.logprobs for g in greedy]


class ScriptedEngine:
    """Generates scripted assistant turns (byte ids), one per call, with fake log-probs."""

    def __init__(self, turns):
        self.turns = list(turns)
        self.prompts = []

    def generate(self, prompts, params, n=1, seeds=None):
        self.prompts.append(list(prompts[0]))
        ids = TOK.encode(self.turns.pop(0))
        return [[Generation(ids, [-0.5] * len(ids), [1.0] * len(ids), "stop")]]


def test_agent_loop_calculator_scripted_policy_reward_and_exact_token_trace():
    task = Task(id="t1", messages=[{"role": "user", "content": "What is 2 + 3 * 4?"}],
                metadata={"answer": "14"})
    call = ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 + 3 * 4"}}\n'
            '</tool_call>')
    eng = ScriptedEngine([f"Let me compute.\n{call}<|im_end|>",
                          "The answer is \\boxed{14}.<|im_end|>"])
    env = make_env("calculator")
    rec = run_episode(eng, env, task, TOK, SamplingParams(), max_turns=4)
    assert rec["reward"] == 1.0 and rec["status"] == "ok" and rec["turns"] == 2
    assert rec["tool_calls"] == 1
    msgs, tools = make_env("calculator").reset(task)
    msgs += [{"role": "assistant", "content": "Let me compute.",
              "tool_calls": [{"type": "function", "function": {
                  "name": "calculator", "arguments": "{\"expression\": \"2 + 3 * 4\"}"}}]},
             {"role": "tool", "content": "14"},
             {"role": "assistant", "content": "The answer is \\boxed{14}."}]
    rendered = render_text(msgs, tools)
    assert rendered.endswith("<|im_end|>\n")  # the episode ends at the policy's <|im_end|>
    assert rec["tokens"] == TOK.encode(rendered[:-1])
    toks = np.asarray(rec["tokens"])
    gen = np.asarray([lp is not None for lp in rec["logprobs"]])
    assert TOK.decode(toks[gen]) == (f"Let me compute.\n{call}<|im_end|>"
                                     "The answer is \\boxed{14}.<|im_end|>")
    tags = np.asarray([t or "" for t in rec["tags"]])
    assert TOK.decode(toks[tags == "tool_call"]) == call
    assert TOK.decode(toks[tags == "tool_result"]) == "\n<tool_response>\n14\n</tool_response>"
    # the second turn's prompt is exactly the first's ids plus the generated and appended ids
    assert eng.prompts[1] == rec["tokens"][:len(eng.prompts[1])]


def test_malformed_tool_calls_go_back_to_the_model_as_errors():
    content, calls, errors = parse_tool_calls(
        'hm\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"}}\n</tool_call>'
        '\n<tool_call>\n{not json}\n</tool_call>\n<tool_call>{"arguments": {}}</tool_call>'
        '<tool_call>{"name": "x"')
    assert content == "hm" and len(calls) == 1 and len(errors) == 3
    assert all("malformed tool call" in e["content"] for e in errors)
    task = Task(id="t2", messages=[{"role": "user", "content": "What is 1 + 1?"}],
                metadata={"answer": "2"})
    eng = ScriptedEngine(["<tool_call>\n{oops}\n</tool_call><|im_end|>",
                          '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call><|im_end|>',
                          "\\boxed{2}<|im_end|>"])
    rec = run_episode(eng, make_env("calculator"), task, TOK, SamplingParams(), max_turns=5)
    text = TOK.decode(rec["tokens"])
    assert "malformed tool call" in text and "unknown tool 'nope'" in text
    assert rec["reward"] == 1.0 and rec["turns"] == 3
    eng = ScriptedEngine(["<tool_call>{}</tool_call><|im_end|>"] * 3)
    rec = run_episode(eng, make_env("calculator"), task, TOK, SamplingParams(), max_turns=2)
    assert rec["status"] == "max_turns" and rec["reward"] == 0.0


def test_openai_server_and_client_return_the_engines_tokens(engine):
    from kat_jax.rollout.engine import OpenAIEngine
    from kat_jax.rollout.server import serve_in_thread

    server, url = serve_in_thread(engine, tokenizer=TOK)
    try:
        client = OpenAIEngine(url)
        sp = SamplingParams(temperature=1.0, max_new_tokens=8, seed=21)
        got = client.generate(PROMPTS, sp, n=2)
        want = engine.generate(PROMPTS, sp, n=2)
        for g, w in zip(got, want):
            assert [x.tokens for x in g] == [x.tokens for x in w]
            for x, y in zip(g, w):
                np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-6)
        import json
        import urllib.error
        import urllib.request

        req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(
            {"prompt": "text"}).encode(), headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == 400 and b"'prompt'" in e.value.read()
    finally:
        server.shutdown()
        server.server_close()


def test_rollout_command_writes_lines_that_training_reads(tmp_path):
    from kat_jax.cli import main
    from kat_jax.data.sources import JsonlGroups
    from kat_jax.rollout.runner import run_rollout_cmd

    out = tmp_path / "r.jsonl"
    assert main(["rollout", "--checkpoint", "preset:tiny", "--env", "calculator", "--max-tasks",
                 "2", "--samples-per-task", "2", "--max-new-tokens", "8", "--max-turns", "2",
                 "--output", str(out)]) == 0
    src = JsonlGroups([str(out)], "rollouts")
    assert len(src) == 2 and src.num_records == 4  # grouped by task
    summary = run_rollout_cmd("preset:tiny", "calculator", str(tmp_path / "s.jsonl"),
                              samples_per_task=2, max_new_tokens=8, max_turns=2, max_tasks=1)
    # a group's two samples share their prompt: prefilled once, fewer tokens than the records'
    assert 0 < summary["prefill_tokens"] <= summary["distinct_tokens"]
    assert summary["decode_tokens_per_s"] > 0 and summary["generated_tokens"] > 0


def test_batching_engine_merges_concurrent_requests():
    import threading
    import time as _time

    from kat_jax.rollout.engine import BatchingEngine

    class Counting:
        calls = []

        def generate(self, prompts, params, n=1, seeds=None):
            self.calls.append((len(prompts), tuple(seeds)))
            _time.sleep(0.05)
            return [[Generation([p[0] + s], [-1.0], [1.0], "length") for s in range(n)]
                    for p in prompts]

    inner = Counting()
    eng = BatchingEngine(inner, wait_s=0.05)
    results = {}

    def worker(i):
        results[i] = eng.generate([[i]], SamplingParams(seed=i), n=2, seeds=[100 + i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i][0][1].tokens == [i + 1] for i in range(8))  # each got its own answer
    assert len(inner.calls) < 8 and sum(n for n, _ in inner.calls) == 8
    assert sorted(s for _, seeds in inner.calls for s in seeds) == [100 + i for i in range(8)]


def test_a_broken_server_or_environment_gives_an_env_error_record_not_a_failed_job():
    """A non-finite log-prob from the server, or a NaN reward from the environment, would make an
    invalid record: the episode is kept as env_error (valid, excluded from training, the reason
    in 'error') instead of aborting the rollout job and losing the other episodes."""
    from kat_jax.data.records import validate_rollout

    class NanServer(ScriptedEngine):
        def generate(self, prompts, params, n=1, seeds=None):
            (gen,), = super().generate(prompts, params, n, seeds)
            return [[Generation(gen.tokens, [float("nan")] * len(gen.tokens), gen.entropies,
                                gen.finish_reason)]]

    task = Task(id="t3", messages=[{"role": "user", "content": "What is 1 + 1?"}],
                metadata={"answer": "2"})
    rec = run_episode(NanServer(["\\boxed{2}<|im_end|>"]), make_env("calculator"), task, TOK,
                      SamplingParams(), max_turns=2)
    assert rec["status"] == "env_error" and "log-prob nan" in rec["error"]
    assert all(x is None for x in rec["logprobs"]) and rec["reward"] == 0.0
    validate_rollout(rec, "rec")
