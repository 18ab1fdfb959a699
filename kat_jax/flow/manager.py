"""The trajectory manager: the model calls of agent sessions -> grouped rollout records with
advantages, ready for the trainer (kat_jax.data.pipeline.RolloutConverter reads them as they are).

    manager = TrajectoryManager(estimator="grpo", norm_std=True)
    manager.start_session("t1#0", group="t1", task_id="t1")       # optional, see Groups
    manager.add_call("t1#0", input_ids, output_ids, logprobs, entropies, policy_version,
                     tags=None, task_id="t1")                     # once per model call
    manager.finish_session("t1#0", reward=1.0, status="ok", passed=True, tool_calls=2)
    for records in manager.pop_groups(group_size=8):             # complete groups only
        ...  # list of rollout records (kat_jax.data.records), each with "advantage"

Calls. One record per model call: `input_ids` (the whole context the model saw), `output_ids` (what
it generated), per output token `logprobs` (behaviour log-probs, finite, <= 0), `entropies` (finite,
>= 0, or None), `tags` (None or a name of kat_jax.trees.trajectory.TAGS, or None for all), and the
`policy_version` (an int) of the weights that sampled it. Calls of one session come in order (call
k + 1 is made after call k returned); calls of different sessions may interleave freely. Tokens the
environment appends (tool results) reach the manager as part of the next call's input.

Trajectories (per session, rebuilt by longest token prefix). Each session holds sequences, each the
input + output of its latest call. A call whose input extends a sequence (has it as a prefix; the
longest such) continues it: the new input tokens and then the output are appended. Otherwise the
agent rewrote its context (a summary, a truncation, a retry): the call starts a new sequence,
input + output, counted as a branch when its input shares a non-empty prefix with a sequence of the
session and as a new root when it shares none. Each sequence becomes one record. Tokens from inputs
(prompt, tool results, a rewritten context) have logprob, entropy and tag None; generated tokens keep
their call's values. A generated token is trainable in exactly one record, the sequence its call
extended: a branch's shared prefix is context in the branch (None there), so a tree of the records
trains each sampled token once. Per sequence, "policy_version" is the min and "policy_version_max"
the max version of the calls whose outputs it holds.

Groups. A session belongs to one group: the `group` passed to start_session or to its first
add_call, else its `task_id` (a str or an int either way; later calls may repeat them, never change
them). A group is ready when it has at least `group_size` sessions and all of them are finished;
pop_groups then returns all its sessions' records and forgets the group (a later session with the
same key starts a new group; a popped session id may be reused). Groups come out in the order they
completed (their last finish).

Records. Per session, its sequences in order of creation, ids "SESSION#k" (k = 0, 1, ...); every
record of a session carries the session's reward, status, passed, turns (default: its number of
calls), tool_calls, task_id, "session" and the session's advantage.

Advantages, per group over its sessions' rewards r[G] (ADVANTAGE_ESTIMATORS; exact in float64):
  grpo    A_i = r_i - mean(r); with norm_std, divided by (std(r, ddof=1) + eps) unless G == 1 or
          the std is 0 (no division then).
  drgrpo  A_i = r_i - mean(r) (Dr. GRPO: no std normalisation).
  rloo    A_i = r_i - mean_{j != i} r_j (leave-one-out baseline; G >= 2 or an error).

Masking. A group in which any session finished with status "env_error" (a broken environment, not
the policy's doing) is masked whole: all its records come out with status "env_error" (which the
pipeline excludes and counts), no advantage, and for the sessions that did not fail their own status
in "episode_status" and the reason in "error". Nothing is dropped. A session that made no call
yields no record and may only finish with status "env_error" (masking its group).

Errors (ManagerError, a ValueError) name the session and the field and leave the manager unchanged:
a per-token list of the wrong length, a non-finite or out-of-range value, an unknown status or tag,
finishing an unknown or finished session, a call after finish, a group or task that changes.

State. pending_state() is a JSON-serialisable dict of everything not yet popped (finished or not),
the configuration and the counters; TrajectoryManager.from_state(state) rebuilds an equal manager,
so a checkpoint can hold the sessions in flight.

stats: calls, sessions (started), continued, branched, new_roots (rewrites sharing nothing; a
session's first call is counted in neither), finished, groups (popped), masked_groups, records
(returned), masked_records. calls == sessions with a call + continued + branched + new_roots.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kat_jax.data.records import STATUSES, rollout_record
from kat_jax.trees.trajectory import TAGS

STATE_FORMAT = 1
STAT_KEYS = ("calls", "sessions", "continued", "branched", "new_roots", "finished", "groups",
             "masked_groups", "records", "masked_records")


class ManagerError(ValueError):
    """A bad call or outcome; `session` and `field` name what was wrong."""

    def __init__(self, msg: str, session: Any = None, field: str | None = None):
        super().__init__(msg)
        self.session, self.field = session, field


def _bad(session: Any, field: str, msg: str) -> ManagerError:
    return ManagerError(f"session {session!r}: {field}: {msg}", session, field)


# ---------------------------------------------------------------------------------------------
# Advantage estimators: float64[G] rewards of one group -> float64[G] advantages.


def grpo_advantages(r: np.ndarray, norm_std: bool = True, eps: float = 1e-6) -> np.ndarray:
    """r - mean(r); with norm_std divided by (unbiased std + eps) when G > 1 and the std > 0."""
    a = r - r.mean()
    if norm_std and r.size > 1:
        std = float(r.std(ddof=1))
        if std > 0:
            a = a / (std + eps)
    return a


def drgrpo_advantages(r: np.ndarray, norm_std: bool = True, eps: float = 1e-6) -> np.ndarray:
    """r - mean(r) (Dr. GRPO); norm_std and eps are ignored."""
    return r - r.mean()


def rloo_advantages(r: np.ndarray, norm_std: bool = True, eps: float = 1e-6) -> np.ndarray:
    """r_i - mean of the others' rewards; needs G >= 2. norm_std and eps are ignored."""
    if r.size < 2:
        raise ValueError(f"rloo needs at least 2 episodes per group, got {r.size}")
    return r - (r.sum() - r) / (r.size - 1)


ADVANTAGE_ESTIMATORS: dict[str, Callable[..., np.ndarray]] = {
    "grpo": grpo_advantages,
    "drgrpo": drgrpo_advantages,
    "rloo": rloo_advantages,
}
MIN_GROUP_SIZE = {"grpo": 1, "drgrpo": 1, "rloo": 2}


# ---------------------------------------------------------------------------------------------
# Input checks (before any state changes).


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _key(x: Any) -> bool:
    """A session id or group key: a str or an int (hashable and JSON-stable)."""
    return isinstance(x, str) or (isinstance(x, int) and not isinstance(x, bool))


def _token_ids(sid: Any, field: str, values: Any) -> list[int]:
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise _bad(sid, field, "must be a 1-D sequence of integer token ids")
    if arr.size and arr.min() < 0:
        i = int(np.flatnonzero(arr < 0)[0])
        raise _bad(sid, field, f"token id {int(arr[i])} at index {i} is negative")
    return [int(x) for x in arr.tolist()]


def _per_token_floats(sid: Any, field: str, values: Any, n: int, rule: str,
                      ok: Callable[[np.ndarray], np.ndarray]) -> list[float]:
    """n finite floats obeying `rule` (one per output token)."""
    try:
        values = list(values)
    except TypeError:
        raise _bad(sid, field, f"must be a sequence of {n} numbers (one per output token)") from None
    if len(values) != n:
        raise _bad(sid, field, f"{len(values)} values for {n} output tokens")
    for i, x in enumerate(values):
        if x is None or isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float,
                                                                              np.number)):
            raise _bad(sid, field, f"value {x!r} at index {i} is not a number")
    arr = np.asarray(values, np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise _bad(sid, field, f"value {arr[i]} at index {i} is not finite")
    bad = ~ok(arr)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise _bad(sid, field, f"value {arr[i]} at index {i} must be {rule}")
    return [float(x) for x in arr.tolist()]


def _tags(sid: Any, values: Any, n: int) -> list[str | None]:
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise _bad(sid, "tags", f"{len(values)} values for {n} output tokens")
    for i, t in enumerate(values):
        if t is not None and t not in TAGS:
            raise _bad(sid, "tags", f"unknown tag {t!r} at index {i}; known: {sorted(TAGS)}")
    return values


def _lcp(a: list[int], b: list[int]) -> int:
    m = min(len(a), len(b))
    neq = np.flatnonzero(np.asarray(a[:m]) != np.asarray(b[:m]))
    return int(neq[0]) if neq.size else m


# ---------------------------------------------------------------------------------------------
# Sessions.


@dataclasses.dataclass
class _Sequence:
    """One trajectory of a session: per token id, logprob, entropy and tag (None where not
    generated by a call of this sequence), and the min / max policy version of its calls."""

    tokens: list[int]
    logprobs: list[float | None]
    entropies: list[float | None]
    tags: list[str | None]
    version_min: int
    version_max: int

    def extend(self, context: list[int], output: list[int], logprobs: list[float],
               entropies: list[float] | None, tags: list[str | None], version: int) -> None:
        n, m = len(context), len(output)
        self.tokens += context + output
        self.logprobs += [None] * n + logprobs
        self.entropies += [None] * n + (entropies if entropies is not None else [None] * m)
        self.tags += [None] * n + tags
        self.version_min = min(self.version_min, version)
        self.version_max = max(self.version_max, version)


@dataclasses.dataclass
class _Session:
    id: Any
    group: Any
    task_id: Any
    sequences: list[_Sequence] = dataclasses.field(default_factory=list)
    calls: int = 0
    outcome: dict[str, Any] | None = None  # reward, status, passed, turns, tool_calls, error
    finished_at: int | None = None  # the manager's finish counter when it finished

    def to_state(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> _Session:
        d = dict(d)
        d["sequences"] = [_Sequence(**s) for s in d.get("sequences", [])]
        return cls(**d)


class TrajectoryManager:
    """Sessions -> trajectories by longest prefix -> groups -> rollout records with advantages
    (see the module docstring).

    estimator: a name of ADVANTAGE_ESTIMATORS ("grpo", "drgrpo", "rloo"); norm_std: grpo's
    division by the group's unbiased reward std; eps: added to that std."""

    def __init__(self, estimator: str = "grpo", norm_std: bool = True, eps: float = 1e-6):
        if estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"unknown advantage estimator {estimator!r}; known: "
                             f"{sorted(ADVANTAGE_ESTIMATORS)}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        self.estimator, self.norm_std, self.eps = estimator, bool(norm_std), float(eps)
        self._sessions: dict[Any, _Session] = {}
        self._groups: dict[Any, list[Any]] = {}  # group key -> session ids, in start order
        self._clock = 0  # finishes so far: orders groups by completion
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)

    # -- sessions ------------------------------------------------------------------------------

    def _resolve(self, session_id: Any, group: Any, task_id: Any) -> tuple[_Session | None, Any]:
        """(the session or None if new, its group key); checks without changing anything."""
        if not _key(session_id):
            raise ManagerError(f"session {session_id!r}: session_id must be a str or an int",
                               session_id, "session_id")
        s = self._sessions.get(session_id)
        if s is None:
            key = group if group is not None else task_id
            if not _key(key):
                raise _bad(session_id, "group",
                           f"no group key: pass group= or task_id= (a str or an int), got group="
                           f"{group!r}, task_id={task_id!r}")
            return None, key
        if s.outcome is not None:
            raise _bad(session_id, "session_id", "the session is finished (a call or start after "
                       "finish_session)")
        if group is not None and group != s.group:
            raise _bad(session_id, "group", f"{group!r} differs from the session's group "
                       f"{s.group!r}")
        if task_id is not None and s.task_id is not None and task_id != s.task_id:
            raise _bad(session_id, "task_id", f"{task_id!r} differs from the session's task "
                       f"{s.task_id!r}")
        return s, s.group

    def _new_session(self, session_id: Any, group: Any, task_id: Any) -> _Session:
        s = _Session(session_id, group, task_id)
        self._sessions[session_id] = s
        self._groups.setdefault(group, []).append(session_id)
        self.stats["sessions"] += 1
        return s

    def start_session(self, session_id: Any, group: Any = None, task_id: Any = None) -> None:
        """Register a session before its first call, so that its group is not complete without
        it. Starting a started (unfinished) session again is a no-op when group and task agree."""
        s, key = self._resolve(session_id, group, task_id)
        if s is None:
            self._new_session(session_id, key, task_id)
        elif s.task_id is None and task_id is not None:
            s.task_id = task_id

    def add_call(self, session_id: Any, input_ids: Sequence[int], output_ids: Sequence[int],
                 logprobs: Sequence[float], entropies: Sequence[float] | None,
                 policy_version: int, tags: Sequence[str | None] | None = None, *,
                 task_id: Any = None, group: Any = None) -> str:
        """One model call of the session (started here if new). Returns what it did: "root" (a
        session's first call or a new root), "continued" or "branched"."""
        s, key = self._resolve(session_id, group, task_id)
        inp = _token_ids(session_id, "input_ids", input_ids)
        if not inp:
            raise _bad(session_id, "input_ids", "is empty (a call needs a context)")
        out = _token_ids(session_id, "output_ids", output_ids)
        lp = _per_token_floats(session_id, "logprobs", logprobs, len(out), "<= 0",
                               lambda a: a <= 0)
        ent = None if entropies is None else _per_token_floats(
            session_id, "entropies", entropies, len(out), ">= 0", lambda a: a >= 0)
        tg = _tags(session_id, tags, len(out))
        if not _is_int(policy_version):
            raise _bad(session_id, "policy_version", f"must be an int, got {policy_version!r}")
        version = int(policy_version)

        if s is None:
            s = self._new_session(session_id, key, task_id)
        elif s.task_id is None and task_id is not None:
            s.task_id = task_id
        best, best_len, lcp = None, -1, 0
        for seq in s.sequences:
            n = len(seq.tokens)
            if n <= len(inp) and inp[:n] == seq.tokens:
                if n > best_len:
                    best, best_len = seq, n
            else:
                lcp = max(lcp, _lcp(seq.tokens, inp))
        self.stats["calls"] += 1
        s.calls += 1
        if best is not None:
            best.extend(inp[best_len:], out, lp, ent, tg, version)
            self.stats["continued"] += 1
            return "continued"
        seq = _Sequence([], [], [], [], version, version)
        seq.extend(inp, out, lp, ent, tg, version)
        first = not s.sequences
        s.sequences.append(seq)
        if first:
            return "root"
        if lcp > 0:
            self.stats["branched"] += 1
            return "branched"
        self.stats["new_roots"] += 1
        return "root"

    def finish_session(self, session_id: Any, reward: float | None, status: str,
                       passed: bool | None = None, turns: int | None = None,
                       tool_calls: int | None = None, error: str | None = None) -> None:
        """Attach the episode's outcome. status: one of kat_jax.data.records.STATUSES
        ("env_error": the environment broke; reward may then be None). turns defaults to the
        session's number of calls."""
        s = self._sessions.get(session_id)
        if s is None:
            raise ManagerError(f"session {session_id!r}: session_id: finish_session of an unknown "
                               "session (no start_session or add_call, or its group was popped)",
                               session_id, "session_id")
        if s.outcome is not None:
            raise _bad(session_id, "session_id", "the session is already finished")
        if status not in STATUSES:
            raise _bad(session_id, "status", f"unknown status {status!r}; known: {list(STATUSES)}")
        if reward is None and status == "env_error":
            reward = 0.0
        if isinstance(reward, (bool, np.bool_)) or not isinstance(reward, (int, float, np.number)) \
                or not math.isfinite(float(reward)):
            raise _bad(session_id, "reward", f"must be a finite number, got {reward!r}")
        if passed is not None and not isinstance(passed, (bool, np.bool_)):
            raise _bad(session_id, "passed", f"must be true, false or None, got {passed!r}")
        for name, v in (("turns", turns), ("tool_calls", tool_calls)):
            if v is not None and not (_is_int(v) and v >= 0):
                raise _bad(session_id, name, f"must be an int >= 0, got {v!r}")
        if error is not None and not isinstance(error, str):
            raise _bad(session_id, "error", f"must be a string, got {error!r}")
        if not s.sequences and status != "env_error":
            raise _bad(session_id, "status", f"{status!r} for a session without any model call "
                       "(nothing to train on); finish it with status 'env_error' if the "
                       "environment or the setup failed")
        self._clock += 1
        s.finished_at = self._clock
        s.outcome = {"reward": float(reward), "status": status,
                     "passed": None if passed is None else bool(passed),
                     "turns": s.calls if turns is None else int(turns),
                     "tool_calls": None if tool_calls is None else int(tool_calls),
                     "error": error}
        self.stats["finished"] += 1

    # -- groups --------------------------------------------------------------------------------

    def _check_group_size(self, group_size: int) -> None:
        need = MIN_GROUP_SIZE[self.estimator]
        if not (_is_int(group_size) and group_size >= need):
            raise ValueError(f"group_size must be an int >= {need} for the {self.estimator!r} "
                             f"estimator, got {group_size!r}")

    def ready_groups(self, group_size: int) -> list[Any]:
        """Keys of the groups with at least group_size sessions, all finished, in the order they
        completed."""
        self._check_group_size(group_size)
        done = []
        for key, ids in self._groups.items():
            sessions = [self._sessions[i] for i in ids]
            if len(sessions) >= group_size and all(s.outcome is not None for s in sessions):
                done.append((max(s.finished_at for s in sessions), key))
        return [key for _, key in sorted(done, key=lambda x: x[0])]

    def pop_groups(self, group_size: int, max_groups: int | None = None
                   ) -> list[list[dict[str, Any]]]:
        """The records of each ready group (at most max_groups, oldest first), which the manager
        then forgets."""
        keys = self.ready_groups(group_size)
        if max_groups is not None:
            keys = keys[:max_groups]
        out = []
        for key in keys:
            records, masked = self._group_records(key)
            for sid in self._groups.pop(key):
                del self._sessions[sid]
            self.stats["groups"] += 1
            self.stats["records"] += len(records)
            if masked:
                self.stats["masked_groups"] += 1
                self.stats["masked_records"] += len(records)
            out.append(records)
        return out

    def _group_records(self, key: Any) -> tuple[list[dict[str, Any]], bool]:
        sessions = [self._sessions[i] for i in self._groups[key]]
        failed = [s.id for s in sessions if s.outcome["status"] == "env_error"]
        adv = None
        if not failed:
            r = np.asarray([s.outcome["reward"] for s in sessions], np.float64)
            adv = ADVANTAGE_ESTIMATORS[self.estimator](r, norm_std=self.norm_std, eps=self.eps)
        records = []
        for i, s in enumerate(sessions):
            o = s.outcome
            extra: dict[str, Any] = {"task_id": s.task_id, "turns": o["turns"]}
            for name in ("passed", "tool_calls", "error"):
                if o[name] is not None:
                    extra[name] = o[name]
            status = o["status"]
            if failed:
                if status != "env_error":
                    why = (f"group {key!r} masked: env_error in session(s) "
                           f"{', '.join(repr(f) for f in failed)}")
                    extra["episode_status"] = status
                    extra["error"] = f"{o['error']}; {why}" if o["error"] else why
                status = "env_error"
            else:
                extra["advantage"] = float(adv[i])
            for k, seq in enumerate(s.sequences):
                records.append(rollout_record(
                    f"{s.id}#{k}", key, seq.tokens, seq.logprobs, seq.entropies, seq.tags,
                    o["reward"], status, **extra, session=s.id, policy_version=seq.version_min,
                    policy_version_max=seq.version_max))
        return records, bool(failed)

    # -- state ---------------------------------------------------------------------------------

    def pending_state(self) -> dict[str, Any]:
        """Everything not yet popped, as plain JSON types (see from_state)."""
        return {"format": STATE_FORMAT,
                "config": {"estimator": self.estimator, "norm_std": self.norm_std,
                           "eps": self.eps},
                "clock": self._clock, "stats": dict(self.stats),
                "sessions": [s.to_state() for s in self._sessions.values()]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TrajectoryManager:
        """The manager that wrote `state` (pending_state), with its sessions, groups and
        counters."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"trajectory manager state: expected format {STATE_FORMAT}, got "
                             f"{state.get('format') if isinstance(state, dict) else state!r}")
        m = cls(**state["config"])
        m._clock = int(state["clock"])
        m.stats.update(state["stats"])
        for d in state["sessions"]:
            s = _Session.from_state(d)
            m._sessions[s.id] = s
            m._groups.setdefault(s.group, []).append(s.id)
        return m
