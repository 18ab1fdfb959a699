"""The OpenAI-compatible chat proxy (kat_jax.flow.proxy) driven by scripted agents that use only
the `openai` client package: calls are recorded token-exactly (the same ids as the built-in agent
loop for the same conversation), tool calls come back parsed, rewards arrive, groups come out (over
HTTP and as rollout JSONL), and the faults: an agent that never reports (timed out, masked), a
reused session id (409), malformed requests (400 naming the field).

One tiny random model (preset tiny) serves every test. A test engine in front of it answers from
a script when a test queues a turn (a random model does not write tool calls) and samples from the
model otherwise; either way the proxy records what the engine returned."""

import threading
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")

from kat_jax.data.chat import continuation_segments, render_segments  # noqa: E402
from kat_jax.data.records import read_rollouts  # noqa: E402
from kat_jax.data.tokenizer import ByteTokenizer  # noqa: E402
from kat_jax.envs import Task, make_env  # noqa: E402
from kat_jax.flow.proxy import ChatProxy, serve_chat  # noqa: E402
from kat_jax.rollout.agent import run_episode  # noqa: E402
from kat_jax.rollout.sampler import Generation, SamplingParams  # noqa: E402

TOK = ByteTokenizer()
TASK = Task(id="add", messages=[{"role": "user", "content": "What is 2 + 3?"}],
            metadata={"answer": "5"})
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 + 3"}}\n</tool_call>'


class ScriptableEngine:
    """The tiny model, except that a queued text (or list of n texts) answers the next call
    (fake log-probs -0.25, entropies 0.5). Every call's prompt and generations are logged. The
    model itself is sampled once per test file run (a compile per new shape: CI time)."""

    continuous_batching = True  # the JaxEngine behind it batches concurrent calls itself

    def __init__(self, engine):
        self.engine, self.script, self.log = engine, [], []
        self._lock = threading.Lock()

    @property
    def context_length(self):
        return self.engine.context_length

    def generate(self, prompts, params, n=1, seeds=None):
        with self._lock:
            text = self.script.pop(0) if self.script else None
        if text is None:
            out = self.engine.generate(prompts, params, n, seeds)
        else:  # a text, or a list of n texts (the n samples)
            texts = [text] * n if isinstance(text, str) else text
            gens = [Generation(ids, [-0.25] * len(ids), [0.5] * len(ids),
                               "stop" if ids[-1] == TOK.special("<|im_end|>") else "length")
                    for ids in map(TOK.encode, texts)]
            out = [gens for _ in prompts]
        with self._lock:
            self.log.append((prompts[0], params, out[0]))
        return out


class Replay:
    """Hands back recorded generations in order (the built-in agent loop's engine)."""

    def __init__(self, gens):
        self.gens, self.prompts = list(gens), []

    def generate(self, prompts, params, n=1, seeds=None):
        self.prompts.append(list(prompts[0]))
        return [[self.gens.pop(0)]]


@pytest.fixture(scope="module")
def engine():
    """The tiny preset with random weights drawn by numpy (an eager or jitted flax init takes
    10-20 s on 2 busy cores; this takes one)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from kat_jax.models.config import get_preset
    from kat_jax.models.decoder import abstract_model
    from kat_jax.rollout.sampler import EngineConfig, JaxEngine

    graphdef, state = nnx.split(abstract_model(get_preset("tiny")))
    rng = np.random.default_rng(4)

    def draw(path, x):
        if any("norm" in str(getattr(p, "key", p)) for p in path):
            return jnp.ones(x.shape, x.dtype)
        return jnp.asarray(rng.normal(0.0, 0.05, x.shape), x.dtype)

    model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))
    return ScriptableEngine(JaxEngine(model, EngineConfig(max_batch=4, cache_tokens=8192)))


@pytest.fixture(scope="module")
def served(engine):
    server, url, proxy = serve_chat(engine, TOK, group_size=2)
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    yield client, proxy
    server.shutdown()
    proxy.close()


def _ids(choice):
    return choice.model_extra["token_ids"]


def _finish(client, session, **outcome):
    return client.post(f"/sessions/{session}/finish", cast_to=object, body=outcome)


def _agent_episode(client, session, env, max_turns=3, **kw):
    """A scripted external agent: the environment's task, the openai client, tools run by the
    environment, the reward reported at the end. Returns (messages, responses, reward)."""
    messages, tools = env.reset(TASK)
    responses = []
    for _ in range(max_turns):
        r = client.chat.completions.create(
            model="kat_jax", messages=messages, tools=tools, max_tokens=6, logprobs=True,
            extra_headers={"X-Session-Id": session}, metadata={"group": "add-g"},
            extra_body={"return_token_ids": True}, **kw)
        responses.append(r)
        msg = r.choices[0].message
        messages.append(msg.model_dump(exclude_none=True, include={"role", "content",
                                                                   "tool_calls"}))
        if not msg.tool_calls:
            break
        messages.extend(env.step([c.model_dump() for c in msg.tool_calls]))
    reward = float(env.evaluate(messages).reward)
    assert _finish(client, session, reward=reward, status="ok") == {
        "session": session, "finished": True, "groups_written": 0}
    return messages, responses, reward


def test_tool_episodes_are_recorded_token_exactly_as_the_builtin_agent_renders_them(served,
                                                                                     engine):
    client, proxy = served
    # session 0: the "model" calls the calculator (scripted), then the tiny model answers
    engine.script.append(f"Let me compute.\n{CALL}<|im_end|>")
    start = len(engine.log)
    msgs0, resp0, reward0 = _agent_episode(client, "ep-0", make_env("calculator"), seed=3)
    gens0 = [g[0] for _, _, g in engine.log[start:]]
    # session 1: answers right away (scripted)
    engine.script.append("The answer is \\boxed{5}.<|im_end|>")
    start = len(engine.log)
    _, resp1, reward1 = _agent_episode(client, "ep-1", make_env("calculator"))
    gens1 = [g[0] for _, _, g in engine.log[start:]]

    # the tool call came back parsed, in the OpenAI format
    first = resp0[0].choices[0]
    assert first.finish_reason == "tool_calls" and first.message.content == "Let me compute."
    (call,) = first.message.tool_calls
    assert call.type == "function" and call.function.name == "calculator"
    assert call.function.arguments == '{"expression": "2 + 3"}' and call.id.startswith("call_")
    assert msgs0[3] == {"role": "tool", "tool_call_id": call.id, "name": "calculator",
                        "content": "5"}
    assert len(resp0) == 2 and resp0[1].choices[0].message.tool_calls is None
    assert (reward0, reward1) == (0.0, 1.0)
    # what the server returned is what the engine sampled
    for resp, gens in ((resp0, gens0), (resp1, gens1)):
        for r, g in zip(resp, gens, strict=True):
            ch = r.choices[0]
            assert _ids(ch) == g.tokens
            assert [c.logprob for c in ch.logprobs.content] == g.logprobs
            assert r.usage.completion_tokens == len(g.tokens)
            assert r.usage.prompt_tokens == len(r.model_extra["prompt_token_ids"])
            assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    # the finished group, out of process (GET /v1/groups), popped once
    groups = client.get("/groups", cast_to=object)["groups"]
    assert client.get("/groups", cast_to=object) == {"groups": []}
    (group,) = groups
    recs = {r["session"]: r for r in group}
    assert set(recs) == {"ep-0", "ep-1"} and all(r["group"] == "add-g" for r in group)
    assert recs["ep-0"]["reward"] == 0.0 and recs["ep-1"]["reward"] == 1.0
    assert recs["ep-0"]["advantage"] < 0 < recs["ep-1"]["advantage"]

    # the built-in agent loop, replaying the same generations, renders the same ids
    for sid, gens in (("ep-0", gens0), ("ep-1", gens1)):
        ref = run_episode(Replay(gens), make_env("calculator"), TASK, TOK, SamplingParams(),
                          max_turns=3)
        rec = recs[sid]
        assert rec["tokens"] == ref["tokens"]
        assert rec["logprobs"] == ref["logprobs"] and rec["entropies"] == ref["entropies"]
        gen = [lp is not None for lp in rec["logprobs"]]
        assert [t for t, g in zip(rec["tags"], gen) if g] == [t for t, g in zip(ref["tags"], gen)
                                                              if g]
    # and by hand: prompt, sampled ids, the tool result and the next header, sampled ids
    messages, tools = make_env("calculator").reset(TASK)
    enc = lambda segs: [t for text, *_ in segs for t in TOK.encode(text)]  # noqa: E731
    want = (enc(render_segments(messages, tools, add_generation_prompt=True)) + gens0[0].tokens
            + enc(continuation_segments([msgs0[3]])) + gens0[1].tokens)
    assert recs["ep-0"]["tokens"] == want
    assert resp0[1].model_extra["prompt_token_ids"] == want[:-len(gens0[1].tokens)]
    tags = np.asarray([t or "" for t in recs["ep-0"]["tags"]])
    assert TOK.decode(np.asarray(want)[tags == "tool_call"]) == CALL


def test_follow_up_turns_continue_the_sampled_ids_and_a_rewritten_context_branches(served,
                                                                                  engine):
    client, proxy = served
    before = dict(proxy.manager.stats)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    # the session id in the "user" field; two samples of the first turn (n=2)
    engine.script += [["Hello!<|im_end|>", "Hey"], "Sure.<|im_end|>", "Again?<|im_end|>"]
    r1 = client.chat.completions.create(model="kat_jax", messages=msgs, max_tokens=4, n=2,
                                        seed=7, user="ep-u", temperature=0.8, top_p=0.9,
                                        extra_body={"return_token_ids": True})
    assert [c.message.content for c in r1.choices] == ["Hello!", "Hey"]
    assert [c.finish_reason for c in r1.choices] == ["stop", "length"]
    assert r1.usage.completion_tokens == sum(len(_ids(c)) for c in r1.choices)
    prompt = TOK.encode("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                        "<|im_start|>assistant\n")
    assert r1.model_extra["prompt_token_ids"] == prompt
    out1 = _ids(r1.choices[1])  # the agent goes on with the second sample
    msgs2 = msgs + [r1.choices[1].message.model_dump(exclude_none=True,
                                                     include={"role", "content"}),
                    {"role": "user", "content": "More"}]
    r2 = client.chat.completions.create(model="kat_jax", messages=msgs2, max_tokens=4, seed=8,
                                        user="ep-u", extra_body={"return_token_ids": True})
    close = [] if out1[-1] == TOK.special("<|im_end|>") else TOK.encode("<|im_end|>")
    assert r2.model_extra["prompt_token_ids"] == prompt + out1 + close + TOK.encode(
        "\n<|im_start|>user\nMore<|im_end|>\n<|im_start|>assistant\n")
    # a rewritten context (the first answer dropped): rendered whole, recorded as a branch
    r3 = client.chat.completions.create(
        model="kat_jax", messages=msgs + [{"role": "user", "content": "Again"}], max_tokens=4,
        seed=9, user="ep-u", extra_body={"return_token_ids": True})
    assert r3.model_extra["prompt_token_ids"] == TOK.encode(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n")
    proxy.finish("ep-u", 0.5, passed=False)  # the Python call
    stats = {k: proxy.manager.stats[k] - before[k] for k in before}
    assert stats["calls"] == 4 and stats["continued"] == 1 and stats["branched"] == 2
    # the group is the session itself: one session of the 2 the fixture's groups need
    assert proxy.manager.ready_groups(1) and not proxy.pop_groups()
    (recs,) = proxy.manager.pop_groups(1)
    seqs = {tuple(r["tokens"]) for r in recs}
    assert tuple(prompt + _ids(r1.choices[0])) in seqs
    assert tuple(r2.model_extra["prompt_token_ids"] + _ids(r2.choices[0])) in seqs
    assert all(r["reward"] == 0.5 and r["passed"] is False for r in recs)


def test_tool_choice_none_malformed_calls_and_stop_strings(served, engine):
    client, _ = served
    _, tools = make_env("calculator").reset(TASK)
    msgs = [{"role": "user", "content": "2 + 3?"}]
    engine.script.append(f"{CALL}<|im_end|>")
    r = client.chat.completions.create(model="kat_jax", messages=msgs, tools=tools,
                                       tool_choice="none", max_tokens=80)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == CALL
    assert r.choices[0].finish_reason == "stop"
    engine.script.append("oops <tool_call>\n{not json}\n</tool_call><|im_end|>")
    r = client.chat.completions.create(model="kat_jax", messages=msgs, tools=tools,
                                       max_tokens=80)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == "oops <tool_call>\n{not json}\n</tool_call>"
    engine.script.append("abc STOP def<|im_end|>")
    r = client.chat.completions.create(model="kat_jax", messages=msgs, max_tokens=80,
                                       stop=["STOP", "zzz"], extra_body={"return_token_ids": True})
    assert r.choices[0].message.content == "abc " and r.choices[0].finish_reason == "stop"
    assert _ids(r.choices[0]) == TOK.encode("abc STOP")  # sampled through the stop string


def test_a_streamed_answer_carries_the_same_content_tool_calls_and_usage(served, engine):
    client, proxy = served
    _, tools = make_env("calculator").reset(TASK)
    engine.script.append(f"Let me compute.\n{CALL}<|im_end|>")
    stream = client.chat.completions.create(
        model="kat_jax", messages=[{"role": "user", "content": "2 + 3?"}], tools=tools,
        max_tokens=80, stream=True, stream_options={"include_usage": True},
        extra_headers={"X-Session-Id": "ep-s"})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    assert content == "Let me compute." and finish == "tool_calls"
    assert [(tc.function.name, tc.function.arguments) for tc in calls] == [
        ("calculator", '{"expression": "2 + 3"}')]
    assert chunks[-1].usage.completion_tokens == len(TOK.encode(f"Let me compute.\n{CALL}"
                                                                 "<|im_end|>"))
    proxy.finish("ep-s", 1.0)  # recorded like any call
    assert [r["tokens"][-1] for g in proxy.manager.pop_groups(1) for r in g] == [
        TOK.special("<|im_end|>")]


@pytest.mark.parametrize("body, param", [
    (dict(messages=[{"content": "hi"}]), "messages[0].role"),
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "user", "content": "hi"}], temperature="hot"), "temperature"),
    (dict(messages=[{"role": "user", "content": "hi"}], top_p=0), "top_p"),
    (dict(messages=[{"role": "user", "content": "hi"}], n=0), "n"),
    (dict(messages=[{"role": "user", "content": "hi"}], max_tokens=0), "max_tokens"),
    (dict(messages=[{"role": "user", "content": "hi"}], tool_choice="required"), "tool_choice"),
    (dict(messages=[{"role": "user", "content": "hi"}], tools=[{"type": "function"}]),
     "tools[0]"),
    (dict(messages=[{"role": "user", "content": "hi"}], stop=[1]), "stop"),
    (dict(messages=[{"role": "user", "content": "hi"}], stream="yes"), "stream"),
    (dict(messages=[{"role": "user", "content": "hi"}], metadata=["g"]), "metadata"),
    (dict(messages=[{"role": "assistant", "tool_calls": [{"function": {
        "name": "f", "arguments": "{bad"}}]}]), "messages[0].tool_calls[0].function.arguments"),
])
def test_a_malformed_chat_request_is_refused_with_400_naming_the_field(served, body, param):
    client, proxy = served
    calls = proxy.stats["chat_calls"]
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/chat/completions", cast_to=object, body={"model": "kat_jax", **body})
    assert e.value.status_code == 400 and e.value.param == param
    assert f"'{param}'" in e.value.message
    assert proxy.stats["chat_calls"] == calls


def test_a_reused_session_id_is_refused_with_409_and_bad_outcomes_with_400(served, engine):
    client, proxy = served
    msgs = [{"role": "user", "content": "hi"}]
    engine.script.append("hello<|im_end|>")
    client.chat.completions.create(model="kat_jax", messages=msgs, max_tokens=8,
                                   extra_headers={"X-Session-Id": "ep-r", "X-Task-Id": "t-r"})
    with pytest.raises(openai.BadRequestError, match="reward: must be a finite number") as e:
        _finish(client, "ep-r", reward="high")
    assert e.value.param == "reward"
    with pytest.raises(openai.BadRequestError, match="unknown status") as e:
        _finish(client, "ep-r", reward=1.0, status="great")
    assert e.value.param == "status"
    with pytest.raises(openai.NotFoundError, match="unknown"):
        _finish(client, "ep-nobody", reward=1.0)
    _finish(client, "ep-r", reward=1.0)
    with pytest.raises(openai.ConflictError, match="already finished.*new session id"):
        client.chat.completions.create(model="kat_jax", messages=msgs, max_tokens=8,
                                       extra_headers={"X-Session-Id": "ep-r"})
    with pytest.raises(openai.ConflictError, match="already finished"):
        _finish(client, "ep-r", reward=0.0)
    assert proxy.stats["refused_reused"] == 2
    # its group (the task t-r) still waits for a second session
    assert [r["task_id"] for g in proxy.manager.pop_groups(1) for r in g] == ["t-r"]


def test_an_agent_that_never_reports_is_timed_out_masked_and_its_group_written(engine, tmp_path):
    server, url, proxy = serve_chat(engine, TOK, group_size=2, session_timeout_s=1.0,
                                    record_dir=str(tmp_path))
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        msgs = [{"role": "user", "content": "hi"}]
        for sid in ("ep-silent", "ep-good"):
            engine.script.append("hello<|im_end|>")
            client.chat.completions.create(model="kat_jax", messages=msgs, max_tokens=8,
                                           extra_headers={"X-Session-Id": sid,
                                                          "X-Group-Id": "g-t"})
        _finish(client, "ep-good", reward=1.0)  # well within the timeout
        deadline = time.monotonic() + 20
        while not list(tmp_path.glob("group-*.jsonl")) and time.monotonic() < deadline:
            time.sleep(0.1)
        (path,) = tmp_path.glob("group-*.jsonl")
        recs = {r["session"]: r for r, _ in read_rollouts(str(path))}  # the trainer's reader
        assert set(recs) == {"ep-good", "ep-silent"}
        assert all(r["status"] == "env_error" and "advantage" not in r for r in recs.values())
        assert "timeout" in recs["ep-silent"]["error"]
        assert recs["ep-good"]["episode_status"] == "ok"
        status = client.get("/sessions", cast_to=object)
        assert status["stats"]["timed_out"] == 1 and status["stats"]["groups_written"] == 1
        assert status["manager"]["masked_groups"] == 1 and status["open_sessions"] == []
        with pytest.raises(openai.ConflictError, match="timed out"):
            client.chat.completions.create(model="kat_jax", messages=msgs, max_tokens=8,
                                           extra_headers={"X-Session-Id": "ep-silent"})
    finally:
        server.shutdown()
        proxy.close()


def test_chat_proxy_rejects_bad_settings(engine):
    with pytest.raises(ValueError, match="session_timeout_s"):
        ChatProxy(engine, TOK, session_timeout_s=0)
    with pytest.raises(ValueError, match="group_size"):
        ChatProxy(engine, TOK, group_size=0)


def test_serve_help_documents_the_chat_route_and_sessions(capsys):
    from kat_jax.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for word in ("/v1/chat/completions", "X-Session-Id", "/v1/sessions/ID/finish", "--record-dir",
                 "--session-timeout", "--group-size"):
        assert word in out
