"""The trajectory manager (kat_jax.flow.manager): interleaved model calls of many sessions come back
as the sessions' true trajectories (by longest prefix, through context rewrites), with the group
advantages of their definitions, env_error groups masked whole, bad inputs refused by name, and
its pending state surviving a JSON round trip. Pure numpy, no jax."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kat_jax.data.pipeline import RolloutConverter
from kat_jax.flow.manager import ManagerError, TrajectoryManager
from kat_jax.trees.trajectory import TAGS, Trajectory
from kat_jax.trees.trie import build_trie

VOCAB = 1 << 20
STATUSES_OK = ("ok", "max_turns", "max_tokens", "context_limit", "timeout")


# ---------------------------------------------------------------------------------------------
# A random generator of sessions with their ground truth.


def _chunk(rng, lo, hi):
    return rng.randint(0, VOCAB, rng.randint(lo, hi + 1)).tolist()


def _session(rng, sid, prompt, max_calls=6):
    """(calls, truth, counts): the add_call arguments of a random multi-turn session and the
    trajectories they must rebuild (tokens, logprobs, entropies, tags, versions per trajectory)."""
    truth, calls = [], []
    counts = {"continued": 0, "branched": 0, "new_roots": 0}
    for c in range(rng.randint(1, max_calls + 1)):
        u = rng.rand()
        if c == 0:
            inp = list(prompt)
            t = None
        elif u < 0.65:  # continue a trajectory (any of them) with tool-result tokens
            t = truth[rng.randint(len(truth))]
            tool = _chunk(rng, 0, 4)
            inp = t["tokens"] + tool
            counts["continued"] += 1
        elif u < 0.85:  # rewrite: keep a strict prefix of a trajectory, then diverge
            src = truth[rng.randint(len(truth))]["tokens"]
            m = rng.randint(1, len(src))
            rewrite = _chunk(rng, 1, 4)
            while rewrite[0] == src[m]:
                rewrite[0] = int(rng.randint(VOCAB))
            inp, t = src[:m] + rewrite, None
            counts["branched"] += 1
        else:  # rewrite from scratch: nothing shared with the session's trajectories
            firsts = {x["tokens"][0] for x in truth}
            inp = _chunk(rng, 1, 6)
            while inp[0] in firsts:
                inp[0] = int(rng.randint(VOCAB))
            t = None
            counts["new_roots"] += 1
        out = _chunk(rng, 1, 5)
        lp = (-rng.exponential(size=len(out))).tolist()
        ent = None if rng.rand() < 0.25 else rng.exponential(size=len(out)).tolist()
        tags = None if rng.rand() < 0.5 else [
            [None, "tool_call", "memory"][k] for k in rng.randint(0, 3, len(out))]
        version = int(rng.randint(0, 5))
        calls.append({"input_ids": list(inp), "output_ids": out, "logprobs": lp,
                      "entropies": ent, "policy_version": version, "tags": tags})
        if t is None:
            t = {"tokens": [], "logprobs": [], "entropies": [], "tags": [], "versions": []}
            truth.append(t)
        new_ctx = len(inp) - len(t["tokens"])
        t["tokens"] += inp[len(t["tokens"]):] + out
        t["logprobs"] += [None] * new_ctx + lp
        t["entropies"] += [None] * new_ctx + (ent or [None] * len(out))
        t["tags"] += [None] * new_ctx + (tags or [None] * len(out))
        t["versions"].append(version)
    return calls, truth, counts


def _events(rng, sessions):
    """The calls and finishes of all sessions, interleaved at random (each session's in order)."""
    queues = {sid: [("call", c) for c in s["calls"]] + [("finish", None)]
              for sid, s in sessions.items()}
    out = []
    while queues:
        sid = list(queues)[rng.randint(len(queues))]
        out.append((sid, *queues[sid].pop(0)))
        if not queues[sid]:
            del queues[sid]
    return out


def _node_arrays(trie):
    """The trie as order-independent data: per pre-order node its parent, depth, length, subtree
    tokens and token ids."""
    return (trie.node_parent.tolist(), trie.node_depth.tolist(), trie.node_len.tolist(),
            trie.node_subtree_tokens.tolist(),
            [trie.node_tokens(n).tolist() for n in range(trie.num_nodes)])


def _random_world(rng):
    groups, sessions = {}, {}
    n_groups, size = rng.randint(1, 5), rng.randint(1, 5)
    for g in range(n_groups):
        key = f"task{g}" if rng.rand() < 0.5 else g
        prompt = _chunk(rng, 1, 6)
        groups[key] = []
        for j in range(size):
            sid = f"{key}/{j}"
            calls, truth, counts = _session(rng, sid, prompt)
            status = str(rng.choice(STATUSES_OK)) if rng.rand() < 0.9 else "env_error"
            sessions[sid] = {"group": key, "calls": calls, "truth": truth, "counts": counts,
                             "reward": float(rng.randint(0, 3)) + float(rng.rand() < 0.5) * 0.5,
                             "status": status, "explicit": rng.rand() < 0.5,
                             "started": rng.rand() < 0.5}
            groups[key].append(sid)
    return groups, sessions, size


def _play(manager, rng, sessions, events, size, popped, finished):
    for sid, kind, call in events:
        s = sessions[sid]
        if kind == "call":
            kw = {"group": s["group"]} if s["explicit"] else {"task_id": s["group"]}
            manager.add_call(sid, call["input_ids"], call["output_ids"], call["logprobs"],
                             call["entropies"], call["policy_version"], call["tags"], **kw)
        else:
            manager.finish_session(sid, s["reward"], s["status"], passed=s["reward"] > 1,
                                   tool_calls=len(s["calls"]) - 1)
            finished.add(sid)
        if rng.rand() < 0.15:
            popped += manager.pop_groups(size)


@pytest.mark.parametrize("seed", range(50))
def test_interleaved_calls_rebuild_each_sessions_trajectories_and_the_groups_trie(seed):
    rng = np.random.RandomState(seed)
    groups, sessions, size = _random_world(rng)
    manager = TrajectoryManager("grpo")
    for sid, s in sessions.items():
        if s["started"]:
            manager.start_session(sid, group=s["group"], task_id=s["group"])
    popped, finished = [], set()
    _play(manager, rng, sessions, _events(rng, sessions), size, popped, finished)
    popped += manager.pop_groups(size)
    assert manager.pending_state()["sessions"] == []

    assert sorted(str(recs[0]["group"]) for recs in popped) == sorted(str(g) for g in groups)
    for recs in popped:
        key = recs[0]["group"]
        assert all(r["group"] == key for r in recs)
        sids = list(dict.fromkeys(r["session"] for r in recs))  # in start order, contiguous
        assert sorted(sids) == sorted(groups[key])
        truth = [(sid, k, t) for sid in sids for k, t in enumerate(sessions[sid]["truth"])]
        assert [r["id"] for r in recs] == [f"{sid}#{k}" for sid, k, _ in truth]
        for r, (sid, _, t) in zip(recs, truth):
            s = sessions[sid]
            assert r["tokens"] == t["tokens"]
            assert r["logprobs"] == t["logprobs"]  # the call's values where generated, else None
            assert r["entropies"] == t["entropies"]
            assert r["tags"] == t["tags"]
            assert (r["policy_version"], r["policy_version_max"]) == (min(t["versions"]),
                                                                      max(t["versions"]))
            assert (r["reward"], r["session"], r["task_id"]) == (s["reward"], sid, (
                None if s["explicit"] and not s["started"] else key))
            assert (r["turns"], r["tool_calls"]) == (len(s["calls"]), len(s["calls"]) - 1)
        masked = any(sessions[sid]["status"] == "env_error" for sid in sids)
        assert all(r["status"] == ("env_error" if masked else sessions[r["session"]]["status"])
                   for r in recs)
        assert all(("advantage" in r) != masked for r in recs)

        # The records' trie is the trie of the true trajectories (built in another order).
        flat = [t["tokens"] for _, _, t in truth]
        order = rng.permutation(len(flat))
        want = build_trie([Trajectory(np.asarray(flat[i])) for i in order])
        got = build_trie([Trajectory(np.asarray(r["tokens"]), id=r["id"]) for r in recs])
        assert _node_arrays(got) == _node_arrays(want)

        # The pipeline reads the records as they are: masked groups excluded, the rest trained
        # exactly where a token was generated, with the manager's advantages.
        conv = RolloutConverter("rl", None, row_len=10**6, vocab_size=VOCAB)
        trajs = conv([(r, f"rec {i}") for i, r in enumerate(recs)])
        if masked:
            assert trajs == [None] * len(recs)
        else:
            for t, r in zip(trajs, recs):
                assert t.id == r["id"] and t.advantage == r["advantage"]
                np.testing.assert_array_equal(t.trainable[1:],
                                              [x is not None for x in r["logprobs"][1:]])
                np.testing.assert_array_equal(
                    t.tags, [0 if x is None else TAGS[x] for x in r["tags"]])

    want = {k: sum(s["counts"][k] for s in sessions.values())
            for k in ("continued", "branched", "new_roots")}
    st = manager.stats
    assert {k: st[k] for k in want} == want
    n_calls = sum(len(s["calls"]) for s in sessions.values())
    assert st["calls"] == n_calls == len(sessions) + sum(want.values())
    assert st["sessions"] == st["finished"] == len(sessions)
    assert st["groups"] == len(groups)
    n_masked = sum(any(sessions[s]["status"] == "env_error" for s in sids)
                   for sids in groups.values())
    assert st["masked_groups"] == n_masked
    assert st["records"] == sum(len(s["truth"]) for s in sessions.values())


def test_a_rewrite_branches_or_starts_a_root_and_shared_prefixes_are_context():
    m = TrajectoryManager()
    assert m.add_call("s", [1, 2], [3, 4], [-0.1, -0.2], [0.5, 0.6], 1, task_id="t") == "root"
    # continues: the tool result [5] is context, then the output
    assert m.add_call("s", [1, 2, 3, 4, 5], [6], [-0.3], None, 2, ["tool_call"]) == "continued"
    # rewrite keeping [1, 2, 3]: a branch; its prefix was generated by an earlier call but is
    # context here (trained once, in the record its call extended)
    assert m.add_call("s", [1, 2, 3, 9], [7], [-0.4], [0.1], 3) == "branched"
    assert m.add_call("s", [8], [7], [-0.5], [0.2], 0) == "root"
    assert m.add_call("s", [1, 2, 3, 9, 7, 5], [6], [-0.6], [0.3], 4) == "continued"
    m.finish_session("s", 1.0, "ok")
    [recs] = m.pop_groups(1)
    assert [r["id"] for r in recs] == ["s#0", "s#1", "s#2"]
    assert [r["tokens"] for r in recs] == [[1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 7, 5, 6], [8, 7]]
    assert recs[0]["logprobs"] == [None, None, -0.1, -0.2, None, -0.3]
    assert recs[0]["entropies"] == [None, None, 0.5, 0.6, None, None]
    assert recs[0]["tags"] == [None] * 5 + ["tool_call"]
    assert recs[1]["logprobs"] == [None] * 4 + [-0.4, None, -0.6]
    assert [(r["policy_version"], r["policy_version_max"]) for r in recs] == [(1, 2), (3, 4),
                                                                               (0, 0)]
    assert all(r["advantage"] == 0.0 and r["reward"] == 1.0 and r["turns"] == 5 for r in recs)
    assert {k: m.stats[k] for k in ("calls", "continued", "branched", "new_roots")} == {
        "calls": 5, "continued": 2, "branched": 1, "new_roots": 1}


def test_a_call_extending_two_sequences_continues_the_longest():
    m = TrajectoryManager()
    m.add_call("s", [1, 2], [3], [-0.1], None, 0, task_id="t")
    # a retry from the same context generates [3, 4]: a branch that [1, 2, 3] is a prefix of
    assert m.add_call("s", [1, 2], [3, 4], [-0.2, -0.3], None, 1) == "branched"
    assert m.add_call("s", [1, 2, 3, 4, 5], [6], [-0.4], None, 2) == "continued"
    m.finish_session("s", 0.0, "ok")
    [recs] = m.pop_groups(1)
    assert [r["tokens"] for r in recs] == [[1, 2, 3], [1, 2, 3, 4, 5, 6]]
    assert [r["logprobs"] for r in recs] == [[None, None, -0.1],
                                             [None, None, -0.2, -0.3, None, -0.4]]


# ---------------------------------------------------------------------------------------------
# Advantages against their definitions.


def _reference(estimator, rewards, norm_std, eps):
    r = [float(x) for x in rewards]
    n = len(r)
    mean = sum(r) / n
    if estimator == "rloo":
        return [r[i] - sum(r[j] for j in range(n) if j != i) / (n - 1) for i in range(n)]
    adv = [x - mean for x in r]
    if estimator == "grpo" and norm_std and n > 1:
        std = (sum((x - mean) ** 2 for x in r) / (n - 1)) ** 0.5  # unbiased
        if std > 0:
            adv = [a / (std + eps) for a in adv]
    return adv


def _run_groups(manager, reward_groups, group_size, extra_branch=True):
    """One group per reward list; session 0 of each also rewrites its context (two records)."""
    for g, rewards in enumerate(reward_groups):
        for i, r in enumerate(rewards):
            sid = f"g{g}/{i}"
            manager.add_call(sid, [g, i], [7, 8], [-1.0, -2.0], None, 0, task_id=f"g{g}")
            if i == 0 and extra_branch:
                manager.add_call(sid, [g, 99], [7], [-1.0], None, 0)
            manager.finish_session(sid, r, "ok")
    return manager.pop_groups(group_size)


REWARDS = [[0.0, 1.0, 1.0, 0.0, 0.5], [2.0, 2.0, 2.0], [3.0, -1.0], [0.25, 4.0, -3.5, 1.0]]


@pytest.mark.parametrize("estimator,norm_std", [("grpo", True), ("grpo", False),
                                                ("drgrpo", True), ("rloo", False)])
def test_advantages_match_the_definitions(estimator, norm_std):
    rng = np.random.RandomState(0)
    groups = [*REWARDS, rng.randn(6).round(3).tolist()]
    if estimator != "rloo":
        groups.append([0.7])  # a group of one: grpo gives 0, no division
    eps = 1e-3
    m = TrajectoryManager(estimator, norm_std=norm_std, eps=eps)
    out = _run_groups(m, groups, group_size=1 if estimator != "rloo" else 2)
    assert len(out) == len(groups)
    for recs, rewards in zip(out, groups):
        want = _reference(estimator, rewards, norm_std, eps)
        by_session = [want[0], *want]  # session 0 has two records, both with its advantage
        np.testing.assert_allclose([r["advantage"] for r in recs], by_session, rtol=1e-12,
                                   atol=1e-12)
        assert [r["reward"] for r in recs] == [rewards[0], *rewards]
    if estimator == "grpo":  # identical rewards (std 0) and a group of one: all zeros
        assert [r["advantage"] for r in out[1]] == [0.0] * 4
        assert [r["advantage"] for r in out[-1]] == [0.0, 0.0]


def test_the_estimators_differ_where_their_definitions_do():
    def advs(est, norm_std=True):
        m = TrajectoryManager(est, norm_std=norm_std, eps=0.0)
        return [r["advantage"] for r in _run_groups(m, [[0.0, 1.0, 5.0]], 2, False)[0]]
    assert advs("grpo", norm_std=False) == advs("drgrpo") == pytest.approx([-2, -1, 3])
    std = np.std([0.0, 1.0, 5.0], ddof=1)
    assert advs("grpo") == pytest.approx([-2 / std, -1 / std, 3 / std])
    assert advs("rloo") == pytest.approx([-3, -1.5, 4.5])


def test_rloo_refuses_groups_of_one():
    m = TrajectoryManager("rloo")
    with pytest.raises(ValueError, match=r"group_size must be an int >= 2 for the 'rloo'"):
        m.ready_groups(1)
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        TrajectoryManager("ppo")


def test_groups_wait_for_every_session():
    m = TrajectoryManager()
    m.start_session("a", task_id="t")
    m.add_call("b", [1], [2], [-1.0], None, 0, task_id="t")
    m.finish_session("b", 1.0, "ok")
    assert m.ready_groups(2) == [] and m.pop_groups(1) == []  # "a" not finished
    m.add_call("a", [1], [3], [-1.0], None, 0)
    m.finish_session("a", 0.0, "ok")
    assert m.ready_groups(3) == []  # not enough sessions yet
    assert m.ready_groups(2) == ["t"]
    [recs] = m.pop_groups(2)
    assert [r["id"] for r in recs] == ["a#0", "b#0"] and m.ready_groups(1) == []


# ---------------------------------------------------------------------------------------------
# Masking and input errors.


def test_an_env_error_masks_its_whole_group_and_nothing_is_dropped():
    m = TrajectoryManager()
    for g, statuses in (("bad", ["ok", "env_error", "timeout"]), ("good", ["ok", "ok"])):
        for i, status in enumerate(statuses):
            sid = f"{g}{i}"
            m.add_call(sid, [1, 2], [3], [-0.5], [0.1], 0, task_id=g)
            m.add_call(sid, [1, 9], [4], [-0.5], [0.1], 0)  # two records each
            m.finish_session(sid, 10.0 * i, status, error="sandbox died" if i == 1 else None)
    out = {recs[0]["group"]: recs for recs in m.pop_groups(2)}
    bad = out["bad"]
    assert [r["id"] for r in bad] == ["bad0#0", "bad0#1", "bad1#0", "bad1#1", "bad2#0", "bad2#1"]
    assert all(r["status"] == "env_error" and "advantage" not in r for r in bad)
    assert [r.get("episode_status") for r in bad] == ["ok", "ok", None, None, "timeout", "timeout"]
    assert bad[0]["error"] == "group 'bad' masked: env_error in session(s) 'bad1'"
    assert bad[2]["error"] == "sandbox died"
    # the other group's advantages are its own (rewards 0 and 10)
    assert [r["advantage"] for r in out["good"]] == pytest.approx(
        [-5 / (np.std([0, 10], ddof=1) + 1e-6)] * 2 + [5 / (np.std([0, 10], ddof=1) + 1e-6)] * 2)
    assert {k: m.stats[k] for k in ("groups", "masked_groups", "records", "masked_records")} == {
        "groups": 2, "masked_groups": 1, "records": 10, "masked_records": 6}
    conv = RolloutConverter("rl", None, row_len=100, vocab_size=100)
    assert conv([(r, "x") for r in bad]) == [None] * 6


def test_a_session_without_calls_may_only_fail_and_then_masks_its_group():
    m = TrajectoryManager()
    m.start_session("a", task_id="t")
    with pytest.raises(ManagerError, match=r"session 'a': status: 'ok' for a session without any "
                                           r"model call"):
        m.finish_session("a", 1.0, "ok")
    m.finish_session("a", None, "env_error")
    m.add_call("b", [1], [2], [-1.0], None, 0, task_id="t")
    m.finish_session("b", 1.0, "ok")
    [recs] = m.pop_groups(2)
    assert [(r["id"], r["status"]) for r in recs] == [("b#0", "env_error")]
    assert m.stats["masked_groups"] == 1


def _call(**kw):
    args = {"session_id": "s", "input_ids": [1, 2], "output_ids": [3, 4, 5],
            "logprobs": [-0.1, -0.2, -0.3], "entropies": [0.1, 0.2, 0.3], "policy_version": 0}
    args.update(kw)
    return lambda m: m.add_call(**args)


BAD_INPUTS = [
    (_call(logprobs=[-0.1, -0.2]), r"session 's': logprobs: 2 values for 3 output tokens"),
    (_call(logprobs=[-0.1, float("nan"), -0.3]), r"session 's': logprobs: value nan at index 1 "
                                                 r"is not finite"),
    (_call(logprobs=[-0.1, 0.5, -0.3]), r"session 's': logprobs: value 0.5 at index 1 must be "
                                        r"<= 0"),
    (_call(logprobs=[-0.1, None, -0.3]), r"session 's': logprobs: value None at index 1 is not a "
                                         r"number"),
    (_call(entropies=[0.1, float("inf"), 0.3]), r"session 's': entropies: value inf at index 1 "
                                                r"is not finite"),
    (_call(entropies=[0.1]), r"session 's': entropies: 1 values for 3 output tokens"),
    (_call(tags=[None, "thinking", None]), r"session 's': tags: unknown tag 'thinking' at index 1"),
    (_call(tags=[None]), r"session 's': tags: 1 values for 3 output tokens"),
    (_call(input_ids=[1, -2]), r"session 's': input_ids: token id -2 at index 1 is negative"),
    (_call(input_ids=[]), r"session 's': input_ids: is empty"),
    (_call(output_ids=[1.5, 2, 3]), r"session 's': output_ids: must be a 1-D sequence of integer"),
    (_call(policy_version="v1"), r"session 's': policy_version: must be an int, got 'v1'"),
    (_call(session_id="new", task_id=None), r"session 'new': group: no group key"),
    (_call(group="other"), r"session 's': group: 'other' differs from the session's group 't'"),
    (_call(session_id="done"), r"session 'done': session_id: the session is finished"),
    (lambda m: m.finish_session("nope", 1.0, "ok"), r"session 'nope': session_id: finish_session "
                                                    r"of an unknown session"),
    (lambda m: m.finish_session("done", 1.0, "ok"), r"session 'done': session_id: the session is "
                                                    r"already finished"),
    (lambda m: m.finish_session("s", 1.0, "done"), r"session 's': status: unknown status 'done'"),
    (lambda m: m.finish_session("s", float("inf"), "ok"), r"session 's': reward: must be a finite "
                                                          r"number"),
    (lambda m: m.finish_session("s", None, "ok"), r"session 's': reward: must be a finite number"),
    (lambda m: m.finish_session("s", 1.0, "ok", turns=-1), r"session 's': turns: must be an int "
                                                           r">= 0"),
    (lambda m: m.finish_session("s", 1.0, "ok", passed="yes"), r"session 's': passed: must be"),
]


@pytest.mark.parametrize("bad,match", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_inputs_are_refused_by_session_and_field_and_change_nothing(bad, match):
    m = TrajectoryManager()
    m.add_call("s", [1, 2], [3], [-0.1], None, 0, task_id="t")
    m.add_call("done", [1, 2], [3], [-0.1], None, 0, task_id="t")
    m.finish_session("done", 1.0, "ok")
    before = json.dumps(m.pending_state())
    with pytest.raises(ManagerError, match=match):
        bad(m)
    assert json.dumps(m.pending_state()) == before


# ---------------------------------------------------------------------------------------------
# Checkpointing the sessions in flight.


@pytest.mark.parametrize("seed", range(5))
def test_pending_state_round_trips_through_json_and_resumes_identically(seed):
    rng = np.random.RandomState(100 + seed)
    groups, sessions, size = _random_world(rng)
    events = _events(rng, sessions)
    cut = len(events) // 2
    a = TrajectoryManager("rloo" if size >= 2 else "drgrpo", eps=1e-4)
    popped_a, finished = [], set()
    _play(a, np.random.RandomState(seed), sessions, events[:cut], size, popped_a, finished)
    state = json.loads(json.dumps(a.pending_state()))
    b = TrajectoryManager.from_state(state)
    assert b.pending_state() == state
    assert (b.estimator, b.norm_std, b.eps) == (a.estimator, a.norm_std, a.eps)
    popped_b = list(popped_a)
    _play(a, np.random.RandomState(1), sessions, events[cut:], size, popped_a, set(finished))
    _play(b, np.random.RandomState(1), sessions, events[cut:], size, popped_b, set(finished))
    popped_a += a.pop_groups(size)
    popped_b += b.pop_groups(size)
    assert popped_b == popped_a and len(popped_a) == len(groups)
    assert b.stats == a.stats


def test_from_state_refuses_an_unknown_format():
    with pytest.raises(ValueError, match="trajectory manager state: expected format 1"):
        TrajectoryManager.from_state({"format": 99})
