"""Asynchronous rollouts for the online loop (kat_jax.flow.online): sampling goes on in background
threads while the trainer trains on earlier rounds, within a staleness bound.

    flow = AsyncRollouts(engine, cfg, tasks, tokenizer, advantage, teachers, start_round=r0)
    flow.publish(r, params)            # the trainer's weights after r rounds: policy version r
    groups, episodes, stats, fm = flow.get(r)   # round r's groups (blocks until they are done)
    flow.close()

Versions. Policy version v = the trainer's parameters after v rounds of updates. Round r is
trained by the trainer at version r; a token sampled with version v has staleness r - v.

Admission control (rl.max_staleness = k). Episodes are work items in a fixed order (round r's
tasks are the same ones, with the same seeds, as in the synchronous loop: round_episodes), started
first in, first out on rl.concurrency worker threads. An episode of round r starts only when the
sampler holds version >= r - k, so every token it generates (with or without partial rollouts:
versions only grow) has staleness <= k when round r is trained: the bound holds by construction
(AReaL's capacity rule at round granularity: at most (k + v + 1) x rl.groups_per_round groups
admitted while the sampler holds version v). Nothing finished is ever discarded; a round is
handed to the trainer when all of its episodes are done, rounds in order, so a slow episode is
waited for, never overtaken or dropped (its round and the k - 1 after it keep sampling meanwhile).

Weight updates. publish(v, params) copies the arrays on device (the train step donates its state)
and the sampler switches to them:
  rl.partial_rollouts=False  at an episode boundary: no new episode starts while an update is
                             pending; when the episodes in flight finished (a drain: the rollout
                             bubble), the weights change and admission resumes. Every token of an
                             episode has the version the episode started with.
  rl.partial_rollouts=True   at a model-call boundary: new model calls wait while an update is
                             pending; once the calls in flight returned, the weights change and
                             the paused episodes resume with the next turn on the new weights
                             (their earlier turns keep their tokens and behaviour log-probs). The
                             granularity is one model call (one assistant turn), not one token.
Each model call is recorded with the version that produced it (TrajectoryManager add_call's
policy_version; per sequence the min / max; per round a histogram of generated tokens by
version). The off-policy correction uses each token's own behaviour log-probs, i.e. those of the
version that produced it: loss.old_logprobs=record is decoupled PPO (the ratio against the
trainer's proximal policy, recomputed before the round's first update, times the truncated
importance weight min(exp(proximal - behaviour), loss.tis_cap)); loss.old_logprobs=behaviour is
PPO clipped directly against the stale behaviour policy.

k = 0 reproduces the synchronous loop exactly (round r starts only with version r; same tasks,
seeds and managers: tested); the online loop runs its synchronous code then.

Metrics (per round, from get()): staleness_max / staleness_mean (generated tokens, against the
trainer's version r), staleness_hist_<s> (share of the round's generated tokens with staleness
s), queue_rounds_ready (finished rounds waiting for the trainer), queue_episodes_in_flight,
queue_rounds_admitted_ahead, weight_updates (sampler weight swaps so far), drain_time_s (time
admission was held for a non-partial update), rollout_round_s (first start to last finish of the
round's episodes). The loop adds train_wait_s, train_idle_fraction, rollout_idle_fraction (no
episode in flight) and overlap (share of the trainer's busy time during which episodes ran).

Stop (close(): the end of the run, a preemption, an error): admission stops and close() returns
without waiting for the episodes in flight. Each of them ends at its next model call
(RolloutsStopped, raised in its thread: not an environment error, nothing recorded as a policy
failure); the environment step it is in (a tool call, a sandbox command) runs to its end, and
the environment is closed. An agentic episode can take minutes, and a run sampling ahead should
not wait for work it will never train on (nor spend a preemption's grace period on it).

Resume: checkpoints hold the loop position (rounds trained); rounds sampled ahead and episodes in
flight at a stop are dropped (counted in the log as episodes_dropped_at_stop) and sampled again
after the resume with the restored weights, so an asynchronous run resumes at the right round but
not bit for bit like one that never stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)


class RolloutsStopped(BaseException):
    """Raised by an episode's next model call once the loop has stopped (AsyncRollouts.close):
    the episode is abandoned, its round will not be trained. A BaseException, so that the
    episode runner's handler of crashed environments (an env_error) lets it through."""


class GatedEngine:
    """The sampler as the asynchronous loop's agents see it: each call is counted (so a weight
    update can wait for the calls in flight) and knows the version that produced it
    (call_version, per thread)."""

    def __init__(self, engine, flow: AsyncRollouts):
        self.engine, self.flow = engine, flow
        self.context_length = engine.context_length
        self._local = threading.local()

    def generate(self, prompts, params, n=1, seeds=None):
        version = self.flow._enter_call()
        try:
            out = self.engine.generate(prompts, params, n=n, seeds=seeds)
        finally:
            self.flow._leave_call()
        self._local.version = version
        return out

    def call_version(self) -> int:
        return self._local.version


@dataclasses.dataclass
class _Round:
    jobs: list
    one: Any
    finish: Any
    done: int = 0
    episodes: dict = dataclasses.field(default_factory=dict)
    started: float | None = None


class AsyncRollouts:
    """Background sampling for the online loop (see the module docstring)."""

    def __init__(self, engine, cfg, tasks, tokenizer, advantage: str, teachers, start_round: int,
                 clock=time.perf_counter):
        self.engine, self.cfg, self.tasks, self.tokenizer = engine, cfg, tasks, tokenizer
        self.advantage, self.teachers, self.clock = advantage, teachers, clock
        self.k = int(cfg.rl.max_staleness)
        self.partial = bool(cfg.rl.partial_rollouts)
        self.concurrency = int(cfg.rl.concurrency)
        self.gated = GatedEngine(engine, self)
        self.cv = threading.Condition()
        self.version = -1  # the sampler's weights (-1: none yet)
        self.published: int = -1
        self._params = None
        self.in_flight = 0  # episodes
        self.calls = 0  # model calls in flight
        self.next_round, self.next_job = start_round, 0
        self.rounds: dict[int, _Round] = {}
        self.done: dict[int, tuple] = {}
        self.error: BaseException | None = None
        self.stopping = False
        self.weight_updates = 0
        self._busy_s, self._busy_since = 0.0, None
        self._drain_s, self._drain_since = 0.0, None
        self.pool = ThreadPoolExecutor(max_workers=self.concurrency,
                                       thread_name_prefix="kat-jax-episode")
        self.thread = threading.Thread(target=self._schedule, name="kat-jax-rollouts",
                                       daemon=True)
        self.thread.start()

    # -- the trainer's side ----------------------------------------------------------------

    def publish(self, version: int, params) -> None:
        """The trainer's parameters after `version` rounds (copied on device: the train step
        donates its state)."""
        if self.k > 0:
            params = jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x,
                                  params)
        with self.cv:
            self.published, self._params = version, params
            self.cv.notify_all()

    def get(self, r: int) -> tuple[list, list, dict, dict]:
        """Round r's (groups, episodes, stats) as run_round gives them, and the flow metrics."""
        with self.cv:
            while r not in self.done:
                if self.error is not None:
                    raise self.error
                self.cv.wait(0.5)
            groups, episodes, stats, rollout_s = self.done.pop(r)
            m = {"queue_rounds_ready": float(len(self.done)),
                 "queue_episodes_in_flight": float(self.in_flight),
                 "queue_rounds_admitted_ahead": float(max(self.next_round - r - 1, 0)
                                                      + (self.next_job > 0)),
                 "weight_updates": float(self.weight_updates),
                 "drain_time_s": self._drain_s, "rollout_round_s": rollout_s}
        m.update(staleness_metrics(stats.pop("token_versions", {}), r))
        return groups, episodes, stats, m

    def busy_s(self) -> float:
        """Seconds so far during which at least one episode was in flight."""
        with self.cv:
            now = self.clock()
            return self._busy_s + (now - self._busy_since if self._busy_since is not None else 0)

    def close(self) -> int:
        """Stop admitting; the episodes in flight end at their next model call (not waited for:
        see the module docstring). Returns the number of episodes sampled, or in flight, for
        rounds the trainer never took (dropped)."""
        with self.cv:
            self.stopping = True
            self.cv.notify_all()
        self.thread.join()
        self.pool.shutdown(wait=False, cancel_futures=True)
        with self.cv:
            dropped = sum(len(d[1]) for d in self.done.values()) + sum(
                len(st.episodes) for st in self.rounds.values()) + self.in_flight
        if dropped:
            log.info("episodes_dropped_at_stop: %d (sampled ahead, not trained)", dropped)
        return dropped

    # -- the sampler's side (all under self.cv) ---------------------------------------------

    def _pending(self) -> bool:
        return self.published > self.version and self._params is not None

    def _swap(self) -> None:
        self.engine.update_weights(self._params)
        self.version, self._params = self.published, None
        self.weight_updates += 1
        if self._drain_since is not None:
            self._drain_s += self.clock() - self._drain_since
            self._drain_since = None
        self.cv.notify_all()

    def _enter_call(self) -> int:
        with self.cv:
            if self.partial:
                while self._pending() and not self.stopping:
                    if self.calls == 0:
                        self._swap()
                        break
                    self.cv.wait()
            if self.stopping:
                raise RolloutsStopped
            self.calls += 1
            return self.version

    def _leave_call(self) -> None:
        with self.cv:
            self.calls -= 1
            self.cv.notify_all()

    def _set_in_flight(self, delta: int) -> None:
        now = self.clock()
        if self.in_flight == 0 and delta > 0:
            self._busy_since = now
        self.in_flight += delta
        if self.in_flight == 0 and self._busy_since is not None:
            self._busy_s += now - self._busy_since
            self._busy_since = None

    def _schedule(self) -> None:
        try:
            with self.cv:
                while not self.stopping:
                    if self._pending() and (self.calls if self.partial else self.in_flight) == 0:
                        self._swap()
                    if not self._admit():
                        self.cv.wait(0.5)
        except BaseException as e:  # noqa: BLE001  (handed to the trainer by get)
            with self.cv:
                self.error = e
                self.cv.notify_all()

    def _admit(self) -> bool:
        """Start the next episode if the bound and a free worker allow it."""
        if self.version < 0 or self.in_flight >= self.concurrency:
            return False
        if self._pending() and not self.partial:  # drain, then update
            if self._drain_since is None:
                self._drain_since = self.clock()
            return False
        r = self.next_round
        if r > self.version + self.k:
            return False
        st = self.rounds.get(r)
        if st is None:
            st = self.rounds[r] = self._new_round(r)
        i = self.next_job
        self.next_job += 1
        if self.next_job == len(st.jobs):
            self.next_round, self.next_job = r + 1, 0
        if st.started is None:
            st.started = self.clock()
        self._set_in_flight(+1)
        self.pool.submit(self._run, r, i)
        return True

    def _new_round(self, r: int) -> _Round:
        from kat_jax.flow.rounds import draw_tasks, round_episodes

        gpr, seed = self.cfg.rl.groups_per_round, self.cfg.train.seed
        start = r * gpr  # as the synchronous loop draws (no dynamic sampling)
        tasks = draw_tasks(self.tasks, seed, start, gpr)
        jobs, one, finish = round_episodes(self.gated, self.cfg, tasks, self.tokenizer, r,
                                           self.advantage,
                                           seed=(seed * 1_000_003 + start) % (2**31),
                                           teachers=self.teachers)
        return _Round(jobs, one, finish)

    def _run(self, r: int, i: int) -> None:
        st = self.rounds[r]
        try:
            rec = st.one(st.jobs[i])
        except BaseException as e:  # noqa: BLE001  (handed to the trainer by get)
            with self.cv:
                if not isinstance(e, RolloutsStopped):  # abandoned at the stop: counted there
                    self.error = e
                self._set_in_flight(-1)
                self.cv.notify_all()
            return
        with self.cv:
            self._set_in_flight(-1)
            st.done += 1
            if rec is not None:
                st.episodes[i] = rec
            if st.done == len(st.jobs):
                episodes = [st.episodes[j] for j in sorted(st.episodes)]  # job order, as map
                try:
                    groups, episodes, stats = st.finish(episodes)
                except BaseException as e:  # noqa: BLE001  (handed to the trainer by get)
                    self.error = e
                else:
                    self.done[r] = (groups, episodes, stats, self.clock() - st.started)
                del self.rounds[r]
            self.cv.notify_all()


def staleness_metrics(token_versions: dict[int, int], trained_version: int) -> dict[str, float]:
    """staleness_max / mean and staleness_hist_<s> (shares) of generated tokens, from
    {policy version: tokens} and the version the trainer trains them at."""
    total = sum(token_versions.values())
    if not total:
        return {}
    hist: dict[int, int] = {}
    for v, n in token_versions.items():
        s = trained_version - int(v)
        hist[s] = hist.get(s, 0) + n
    m = {"staleness_max": float(max(hist)),
         "staleness_mean": sum(s * n for s, n in hist.items()) / total}
    for s, n in sorted(hist.items()):
        m[f"staleness_hist_{s}"] = n / total
    return m


__all__ = ["AsyncRollouts", "GatedEngine", "staleness_metrics"]
