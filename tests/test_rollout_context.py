"""Rollouts respect the model's context: the token budget defaults to it and is clamped to it, each
turn asks for at most what remains, an episode that reaches the end of the context is recorded with
status context_limit (never a failed job), and engines expose their context."""

import json
import threading

import pytest

from kat_jax.data.records import validate_rollout
from kat_jax.data.tokenizer import ByteTokenizer
from kat_jax.envs import Task, make_env
from kat_jax.rollout.agent import run_episode
from kat_jax.rollout.sampler import ContextLengthError, Generation, SamplingParams

TOK = ByteTokenizer()
IM_END = TOK.special("<|im_end|>")
SP = SamplingParams(max_new_tokens=512)
MATHS = Task(id="m1", messages=[{"role": "user", "content": "What is 2 + 2?"}],
             metadata={"answer": "4"})
CALC = Task(id="c1", messages=[{"role": "user", "content": "What is 2 + 3 * 4?"}],
            metadata={"answer": "14"})
CALL = ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 + 3 * 4"}}\n'
        '</tool_call><|im_end|>')


def prompt_len(env_name: str, task: Task) -> int:
    """Tokens of the episode's first prompt (what run_episode renders)."""
    return len(run_episode(ContextEngine(10**6, ["\\boxed{0}<|im_end|>"]), make_env(env_name),
                           task, TOK, SP)["tokens"]) - len(TOK.encode("\\boxed{0}<|im_end|>"))


class ContextEngine:
    """A fake engine with a context: every request must fit it (prompt + max_new_tokens), each is
    recorded; it answers the scripted turns (then rambles without end), cut at max_new_tokens with
    finish_reason "length" as the sampler does."""

    def __init__(self, context, turns=()):
        self.context_length = context
        self.turns = list(turns)
        self.asked = []  # (prompt length, max_new_tokens) of each call

    def generate(self, prompts, params, n=1, seeds=None):
        (prompt,) = prompts
        assert len(prompt) + params.max_new_tokens <= self.context_length, (len(prompt), params)
        self.asked.append((len(prompt), params.max_new_tokens))
        ids = TOK.encode(self.turns.pop(0)) if self.turns else [ord("x")] * 10**5
        out = ids[:params.max_new_tokens]
        reason = "stop" if len(out) == len(ids) and out[-1] == IM_END else "length"
        return [[Generation(out, [-0.5] * len(out), [1.0] * len(out), reason)]]


@pytest.mark.parametrize("max_tokens", [None, 10**6])
def test_the_budget_is_the_context_and_a_turn_cut_at_its_end_is_context_limit(max_tokens):
    n = prompt_len("maths", MATHS)
    eng = ContextEngine(n + 100)
    rec = run_episode(eng, make_env("maths"), MATHS, TOK, SP, max_tokens=max_tokens)
    assert eng.asked == [(n, 100)]  # max_new_tokens 512 clamped to what the context leaves
    assert rec["status"] == "context_limit" and len(rec["tokens"]) == n + 100
    assert rec["turns"] == 1 and rec["reward"] == 0.0  # graded: no answer was given
    validate_rollout(rec, "rec")  # a trainable record


def test_each_turn_is_clamped_to_what_remains_of_the_context():
    n = prompt_len("calculator", CALC)
    eng = ContextEngine(n + 300, [CALL])
    rec = run_episode(eng, make_env("calculator"), CALC, TOK, SP, max_turns=4)
    (p1, new1), (p2, new2) = eng.asked
    assert (p1, new1) == (n, 300) and p2 > p1 + len(TOK.encode(CALL)) and new2 == n + 300 - p2
    assert rec["status"] == "context_limit" and len(rec["tokens"]) == n + 300
    assert rec["turns"] == 2 and rec["tool_calls"] == 1


def test_a_budget_below_the_context_is_max_tokens_not_context_limit():
    n = prompt_len("maths", MATHS)
    eng = ContextEngine(n + 100)
    rec = run_episode(eng, make_env("maths"), MATHS, TOK, SP, max_tokens=n + 40)
    assert eng.asked == [(n, 40)]
    assert rec["status"] == "max_tokens" and len(rec["tokens"]) == n + 40
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        run_episode(eng, make_env("maths"), MATHS, TOK, SP, max_tokens=0)


def test_a_prompt_that_does_not_fit_is_context_limit_cut_at_the_context():
    n = prompt_len("calculator", CALC)
    eng = ContextEngine(n // 2)
    rec = run_episode(eng, make_env("calculator"), CALC, TOK, SP)
    assert eng.asked == [] and rec["status"] == "context_limit" and rec["turns"] == 0
    assert len(rec["tokens"]) == n // 2 and rec["prompt_tokens"] == n
    full = run_episode(ContextEngine(n), make_env("calculator"), CALC, TOK, SP)
    assert rec["tokens"] == full["tokens"][:n // 2]  # the prompt's first context tokens
    assert full["status"] == "context_limit" and full["turns"] == 0  # no room for one token
    validate_rollout(rec, "rec", require=())


def test_tool_results_that_do_not_fit_are_left_out_of_the_trace():
    n = prompt_len("calculator", CALC)
    after_call = n + len(TOK.encode(CALL))
    eng = ContextEngine(after_call + 5, [CALL])  # the result message needs more than 5 tokens
    rec = run_episode(eng, make_env("calculator"), CALC, TOK, SP, max_turns=4)
    assert len(eng.asked) == 1 and rec["status"] == "context_limit"
    assert len(rec["tokens"]) == after_call and rec["tokens"][-1] == IM_END
    assert rec["turns"] == 1 and rec["tool_calls"] == 1


class RefusingServer:
    """An engine that does not know its context (like OpenAIEngine without context_length) and
    refuses, as a server does, requests longer than `refuse_over`."""

    context_length = None

    def __init__(self, refuse_over):
        self.refuse_over = refuse_over
        self.lock = threading.Lock()
        self.asked = []

    def generate(self, prompts, params, n=1, seeds=None):
        (prompt,) = prompts
        with self.lock:
            self.asked.append(params.max_new_tokens)
        if len(prompt) + params.max_new_tokens > self.refuse_over:
            raise ContextLengthError("HTTP 400: This model's maximum context length is ...")
        ids = TOK.encode("\\boxed{4}<|im_end|>")
        return [[Generation(ids, [-0.5] * len(ids), [1.0] * len(ids), "stop")]]


def test_an_engine_refusal_for_length_is_that_episodes_status_never_a_failed_run():
    from kat_jax.rollout.runner import run_rollouts, summarize

    long_q = Task(id="long", messages=[{"role": "user", "content": "What is 2 + 2? " * 40}],
                  metadata={"answer": "4"})
    eng = RefusingServer(prompt_len("maths", MATHS) + 512)
    recs = run_rollouts(eng, "maths", [MATHS, long_q], TOK, 2, SP, concurrency=4,
                        progress=False)
    assert set(eng.asked) == {512}  # an unknown context: no budget, max_new_tokens as asked
    by_task = {r["id"]: r for r in recs}
    assert sorted(by_task) == ["long#0", "long#1", "m1#0", "m1#1"]
    assert by_task["m1#0"]["status"] == "ok" and by_task["m1#0"]["reward"] == 1.0
    assert by_task["long#1"]["status"] == "context_limit" and by_task["long#1"]["turns"] == 0
    assert "maximum context length" in by_task["long#1"]["error"]
    assert summarize(recs)["statuses"] == {"ok": 2, "context_limit": 2}


def test_batching_engine_passes_the_context_and_fails_only_the_request_that_does_not_fit():
    from kat_jax.rollout.engine import BatchingEngine, OpenAIEngine

    class Inner:
        context_length = 8
        calls = 0

        def generate(self, prompts, params, n=1, seeds=None):
            Inner.calls += 1
            if any(len(p) + params.max_new_tokens > self.context_length for p in prompts):
                raise ContextLengthError("too long")
            return [[Generation([1], [-1.0], [1.0], "length")] * n for _ in prompts]

    eng = BatchingEngine(Inner(), wait_s=0.2)
    assert eng.context_length == 8
    results = {}

    def worker(i, prompt):
        try:
            results[i] = eng.generate([prompt], SamplingParams(max_new_tokens=2))
        except ContextLengthError as e:
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i, [1] * length))
               for i, length in enumerate([3, 7, 4])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(results[1], ContextLengthError)
    assert results[0][0][0].tokens == [1] and results[2][0][0].tokens == [1]
    assert Inner.calls == 4  # the merged call, then each request alone
    assert OpenAIEngine("http://127.0.0.1:1").context_length is None
    assert OpenAIEngine("http://127.0.0.1:1", context_length=512).context_length == 512
    with pytest.raises(ValueError, match="context_length must be >= 1"):
        OpenAIEngine("http://127.0.0.1:1", context_length=0)


@pytest.fixture(scope="module")
def small_context_checkpoint(tmp_path_factory):
    """A tiny model (the tiny preset's shapes) whose context is 512 tokens, saved as a kat_jax
    checkpoint (no tokenizer: `kat-jax rollout` uses bytes)."""
    from kat_jax.models.checkpoint import params_to_pure_dict, save_checkpoint
    from kat_jax.models.config import get_preset
    from kat_jax.models.decoder import init_model

    cfg = get_preset("tiny", max_position_embeddings=512)
    path = str(tmp_path_factory.mktemp("ckpt") / "ctx512")
    save_checkpoint(path, params_to_pure_dict(init_model(cfg, seed=4)), cfg)
    return path


def test_the_sampler_fills_a_context_that_is_not_a_bucket_and_refuses_beyond_it():
    """prompt + max_new_tokens == context works even where the cache bucket (48) would exceed the
    context (40); one token more is a ContextLengthError; the server answers it with an HTTP 400
    that OpenAIEngine turns back into a ContextLengthError."""
    from kat_jax.models.config import get_preset
    from kat_jax.models.decoder import init_model
    from kat_jax.rollout.engine import OpenAIEngine
    from kat_jax.rollout.sampler import JaxEngine
    from kat_jax.rollout.server import serve_in_thread

    engine = JaxEngine(init_model(get_preset("tiny", max_position_embeddings=40), seed=1))
    assert engine.context_length == 40
    gen = engine.generate([list(range(1, 31))], SamplingParams(temperature=0.0,
                                                                max_new_tokens=10))[0][0]
    assert len(gen.tokens) == 10 and gen.finish_reason == "length"
    too_long = SamplingParams(max_new_tokens=11)
    with pytest.raises(ContextLengthError, match="41 exceeds max_position_embeddings 40"):
        engine.generate([list(range(1, 31))], too_long)
    server, url = serve_in_thread(engine, tokenizer=TOK)
    try:
        with pytest.raises(ContextLengthError, match="max_position_embeddings 40"):
            OpenAIEngine(url).generate([list(range(1, 31))], too_long)
    finally:
        server.shutdown()
        server.server_close()


def _rollout(checkpoint, out, *args):
    from kat_jax.cli import main

    assert main(["rollout", "--checkpoint", checkpoint, "--output", str(out), "--temperature",
                 "0", "--samples-per-task", "2", *args]) == 0


def test_rollout_with_a_512_token_checkpoint_runs_to_the_context_by_default(
        small_context_checkpoint, tmp_path, capsys):
    """The issue's case: the calculator's prompt (785 byte tokens) does not fit a 512-token
    context, a maths question does and the policy rambles to the end of it: with the default
    --max-tokens the command exits 0, writes every episode, each within the context."""
    _rollout(small_context_checkpoint, tmp_path / "calc.jsonl", "--env", "calculator",
             "--max-tasks", "2")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["statuses"] == {"context_limit": 4}
    assert summary["context"] == summary["max_tokens"] == 512
    recs = [json.loads(line) for line in (tmp_path / "calc.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all(len(r["tokens"]) == 512 and r["turns"] == 0 for r in recs)

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "short", "question": "What is 2 + 2?", "answer": "4"})
                     + "\n" + json.dumps({"id": "long", "question": "Add these: " + "1 + " * 200
                                          + "1.", "answer": "201"}) + "\n")
    out = tmp_path / "maths.jsonl"
    _rollout(small_context_checkpoint, out, "--env", "maths", "--tasks", str(tasks))
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(recs) == ["long#0", "long#1", "short#0", "short#1"]
    assert all(len(r["tokens"]) <= 512 for r in recs.values())
    assert recs["long#0"]["status"] == "context_limit" and recs["long#0"]["turns"] == 0
    short = recs["short#0"]
    assert short["status"] == "context_limit" and short["turns"] == 1
    assert len(short["tokens"]) == 512 and short["logprobs"][-1] is not None  # generated to the end
    assert summary["statuses"] == {"context_limit": 4}

    # --max-tokens below the context is the episode's own budget (status max_tokens); above it,
    # it is clamped to the context
    _rollout(small_context_checkpoint, out, "--env", "maths", "--tasks", str(tasks),
             "--max-tokens", "300", "--max-tasks", "1")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["statuses"] == {"max_tokens": 2} and summary["max_tokens"] == 300
    assert all(len(json.loads(r)["tokens"]) == 300 for r in out.read_text().splitlines())
