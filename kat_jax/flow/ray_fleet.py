"""Sandbox fleets on Ray: environments (and the sandboxes they start) run as Ray actors on the
hosts that carry their env tag, and the rollout side uses them like local environments.

    fleet = RayEnvFleet("calculator", max_retries=2)     # ray.init() done by the caller
    env = fleet.env()                                     # an Env: reset / step / evaluate / close
    record = run_episode(engine, env, task, tokenizer, sp)   # the agent loop, unchanged
    env.close()                                           # the worker goes back to its pool
    fleet.stats()        # episodes_requeued, workers_dead, sandbox_utilisation, ...

Placement by tags: every worker actor asks for one unit of the custom resource ``env:NAME``
(``resource``), zero CPUs, so a host started with ``ray start --resources='{"env:swe": 8}'``
holds at most 8 SWE workers, and a host without the tag none. A fleet whose tag no alive host
carries fails at start with an error naming the resource.

Warm pool per host: at start the fleet creates ``workers_per_host`` actors on every alive host
that carries the tag (0: as many as the host's amount of the tag), pinned to that host; each
runs one episode at a time, and an idle one is waiting for the next episode (its process and
imports already paid for). ``env()`` takes an idle worker, health-checked first (``ping`` within
``ping_timeout_s``); a dead one is dropped (counted in ``workers_dead``) and replaced by a new
actor on the same host (or any host with the tag when that host is gone).

A worker lost mid-episode (its process killed, its host gone, a call not answered within
``call_timeout_s``): the episode is re-queued onto another worker by replaying its environment
calls there (the task's reset, then every earlier turn's tool calls, in order), checking that
the replayed results equal the ones the policy already read; the episode then goes on from
where it was, and the policy never sees the loss (``episodes_requeued``). The model's tokens are
not generated again, so a trajectory manager that records the model's calls sees one episode.
After ``max_retries`` re-queues of one episode, or when a replay gives different results (an
environment that is not deterministic under replay), the episode ends as env_error with the
reason (``env.env_error``; ``evaluate`` returns status env_error, details ``{"error": ...}``):
masked like any infrastructure failure (its group is not trained on), never a failure of the
policy (``episodes_masked``).

Utilisation: per worker, the seconds spent inside environment calls over the seconds it has
been alive (``sandbox_utilisation``: the mean over workers; ``sandbox_occupancy``: the share of
time a worker was held by an episode).

Config (``make_env_factory(cfg)``; ``cfg.fleet`` is optional, every key has a default below):
``fleet.backend`` "local" (make_env in this process) or "ray"; ``fleet.address`` the Ray
cluster to join ("" : the one this process already joined, else ``ray.init()`` starts a local
one; "auto": a running cluster on this host); ``fleet.resource`` (default ``env:<rl.env>``),
``fleet.workers_per_host``, ``fleet.max_retries``, ``fleet.ping_timeout_s``,
``fleet.call_timeout_s``, ``fleet.acquire_timeout_s``. A key not listed here, or a bad value, is
a ValueError naming it.

Ray is an optional extra (``pip install kat_jax[ray]``), imported only when a Ray fleet starts.
"""

from __future__ import annotations

import collections
import copy
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kat_jax.envs.base import (
    Env,
    EnvError,
    EpisodeStatus,
    EvalResult,
    Message,
    Task,
    ToolCall,
    ToolSchema,
    parse_tool_call,
    tool_message,
)
from kat_jax.training.defaults import FLEET_DEFAULTS

# the keys, their defaults and comments: kat_jax.training.defaults.FLEET_DEFAULTS
BACKENDS = ("local", "ray")


def _ray():
    try:
        import ray
    except ImportError as e:  # the optional extra
        raise ImportError("fleet.backend='ray' needs the ray extra: pip install 'kat_jax[ray]'"
                          ) from e
    return ray


class WorkerLost(EnvError):
    """A fleet worker died or stopped answering during an episode (infrastructure, not the
    policy)."""


class EnvWorker:
    """The actor body (wrapped with ray.remote by the fleet): one environment, one episode at a
    time. Every call returns plain data; the environment's own status travels with each answer."""

    def __init__(self, env_name: str, env_kwargs: dict[str, Any] | None = None):
        from kat_jax.envs import make_env

        self.env_name, self.env_kwargs = env_name, dict(env_kwargs or {})
        self._make = lambda: make_env(env_name, **self.env_kwargs)
        self.env: Env | None = None
        self.born = time.monotonic()
        self.busy_s = 0.0

    def _state(self) -> dict[str, Any]:
        e = self.env
        return {"done": bool(getattr(e, "done", False)),
                "status": str(getattr(getattr(e, "status", None), "value", "ok")),
                "env_error": getattr(e, "env_error", None)}

    def ping(self) -> dict[str, Any]:
        import os

        import ray

        return {"env": self.env_name, "node": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(), "busy_s": self.busy_s,
                "alive_s": time.monotonic() - self.born}

    def reset(self, task: Task) -> tuple[list[Message], list[ToolSchema], dict[str, Any]]:
        t = time.monotonic()
        try:
            if self.env is not None:
                self.env.close()
            self.env = self._make()
            messages, tools = self.env.reset(task)
            return messages, tools, self._state()
        finally:
            self.busy_s += time.monotonic() - t

    def step(self, tool_calls: list[ToolCall]) -> tuple[list[Message], dict[str, Any]]:
        t = time.monotonic()
        try:
            return self.env.step(tool_calls), self._state()
        finally:
            self.busy_s += time.monotonic() - t

    def evaluate(self, messages: list[Message]) -> EvalResult:
        t = time.monotonic()
        try:
            return self.env.evaluate(messages)
        finally:
            self.busy_s += time.monotonic() - t

    def close(self) -> None:
        if self.env is not None:
            try:
                self.env.close()
            finally:
                self.env = None


class _Worker:
    """The fleet's handle of one actor."""

    def __init__(self, actor, node: str | None, index: int):
        self.actor, self.node, self.index = actor, node, index
        self.born = time.monotonic()
        self.held_s = 0.0      # time held by episodes
        self.busy_s = 0.0      # time inside env calls (measured here, around the remote call)
        self.dead = False
        self.answered = False  # has answered a ping (its process is up)
        self.probe = None      # the start-up ping's object ref
        self.acquired_at = 0.0


class RayEnvFleet:
    """Workers of one environment kind on the hosts that carry ``resource`` (module docstring).

    env_name: a registered environment (kat_jax.envs.registry); env_kwargs: its factory's
    arguments (e.g. a SWE ``backend``), given to every worker."""

    def __init__(self, env_name: str, env_kwargs: dict[str, Any] | None = None, *,
                 resource: str = "", workers_per_host: int = 0, max_retries: int = 2,
                 ping_timeout_s: float = 10.0, call_timeout_s: float | None = 600.0,
                 acquire_timeout_s: float = 300.0):
        ray = _ray()
        if not ray.is_initialized():
            raise RuntimeError("RayEnvFleet: call ray.init(...) first (make_env_factory does it "
                               "from fleet.address)")
        self.env_name, self.env_kwargs = env_name, dict(env_kwargs or {})
        self.resource = resource or f"env:{env_name}"
        self.workers_per_host = int(workers_per_host)
        self.max_retries = int(max_retries)
        self.ping_timeout_s = float(ping_timeout_s)
        self.call_timeout_s = call_timeout_s
        self.acquire_timeout_s = float(acquire_timeout_s)
        self._remote = ray.remote(EnvWorker)
        self._cv = threading.Condition()
        self._idle: dict[str, collections.deque[_Worker]] = {}
        self._workers: list[_Worker] = []
        self._counts = collections.Counter()
        self._start = time.monotonic()
        hosts = self._hosts()
        if not hosts:
            raise ValueError(f"fleet.resource: no alive Ray host carries the resource "
                             f"{self.resource!r} (start hosts with ray start "
                             f"--resources='{{\"{self.resource}\": N}}')")
        for node, amount in hosts.items():
            n = self.workers_per_host or int(amount)
            if n > amount:
                raise ValueError(f"fleet.workers_per_host: {n} workers need {n} units of "
                                 f"{self.resource!r}; host {node} has {amount:g}")
            self._idle[node] = collections.deque(self._spawn(node) for _ in range(n))
        self._warm_up(list(self._workers))

    def _warm_up(self, workers: list[_Worker]) -> None:
        """Pings the new workers together: the warm pool is up (processes started, imports
        done) before the first episode; one that does not answer within acquire_timeout_s is
        dead (replaced, counted)."""
        ray = _ray()
        refs = {w.probe: w for w in workers}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=self.acquire_timeout_s)
        ready = set(ready)
        for ref, w in refs.items():
            try:
                if ref not in ready:
                    raise TimeoutError
                ray.get(ref)
                w.answered = True
            except Exception:  # noqa: BLE001 - any failure: the worker is gone
                self._bury(w)

    # -- pool ------------------------------------------------------------------------------------

    def _hosts(self) -> dict[str, float]:
        ray = _ray()
        return {n["NodeID"]: float(n["Resources"][self.resource]) for n in ray.nodes()
                if n.get("Alive") and n.get("Resources", {}).get(self.resource, 0) >= 1}

    def _spawn(self, node: str | None) -> _Worker:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts: dict[str, Any] = {"num_cpus": 0, "resources": {self.resource: 1},
                                "max_restarts": 0}
        if node is not None:
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
        actor = self._remote.options(**opts).remote(self.env_name, self.env_kwargs)
        w = _Worker(actor, node, self._counts["workers_started"])
        w.probe = actor.ping.remote()   # start-up ping: answered once the process is up
        with self._cv:
            self._workers.append(w)
            self._counts["workers_started"] += 1
        return w

    def _healthy(self, w: _Worker) -> bool:
        """Ping within ping_timeout_s (a new worker's first ping: acquire_timeout_s, its process
        may still be starting); a worker that fails is dead (killed, counted, replaced)."""
        ray = _ray()
        try:
            ray.get(w.actor.ping.remote(),
                    timeout=self.ping_timeout_s if w.answered else self.acquire_timeout_s)
            w.answered = True
            return True
        except Exception:  # noqa: BLE001 - any failure of the ping: the worker is gone
            self._bury(w)
            return False

    def _bury(self, w: _Worker) -> None:
        """Counts a dead worker once and puts a new one in its host's pool."""
        with self._cv:
            if w.dead:
                return
            w.dead = True
            self._counts["workers_dead"] += 1
        try:
            _ray().kill(w.actor)
        except Exception:  # noqa: BLE001 - already gone
            pass
        node = w.node if w.node in self._hosts() else None
        fresh = self._spawn(node)
        with self._cv:
            self._idle.setdefault(node if node is not None else next(iter(self._idle)),
                                  collections.deque()).append(fresh)
            self._cv.notify()

    def acquire(self) -> _Worker:
        """An idle, healthy worker (waits up to acquire_timeout_s for one)."""
        deadline = time.monotonic() + self.acquire_timeout_s
        while True:
            with self._cv:
                w = None
                while w is None:
                    # the host with the most idle workers first: spreads load over hosts
                    pools = [q for q in self._idle.values() if q]
                    if pools:
                        w = self._pick(pools)
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise EnvError(f"fleet {self.resource}: no idle worker within "
                                       f"fleet.acquire_timeout_s={self.acquire_timeout_s}")
                    self._cv.wait(left)
            if not w.dead and self._healthy(w):
                w.acquired_at = time.monotonic()
                return w

    def _pick(self, pools: list[collections.deque[_Worker]]) -> _Worker:
        """Takes an idle worker whose process is up (its start-up ping answered) when there is
        one, from the host with the most idle workers; else the oldest idle one (a replacement
        still starting: acquire then waits for it)."""
        ray = _ray()
        for q in sorted(pools, key=len, reverse=True):
            for w in q:
                if not w.answered and not w.dead and w.probe is not None:
                    if ray.wait([w.probe], timeout=0)[0]:
                        w.answered = True   # a failed probe is found by the health check
                if w.answered:
                    q.remove(w)
                    return w
        return max(pools, key=len).popleft()

    def release(self, w: _Worker) -> None:
        w.held_s += time.monotonic() - w.acquired_at
        if w.dead:
            return
        try:
            _ray().get(w.actor.close.remote(), timeout=self.ping_timeout_s)
        except Exception:  # noqa: BLE001
            self._bury(w)
            return
        with self._cv:
            self._idle.setdefault(w.node, collections.deque()).append(w)
            self._cv.notify()

    def call(self, w: _Worker, method: str, *args: Any) -> Any:
        """One remote call; WorkerLost (the worker buried) when it dies or times out."""
        ray = _ray()
        t = time.monotonic()
        try:
            return ray.get(getattr(w.actor, method).remote(*args), timeout=self.call_timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError,
                ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError) as e:
            self._bury(w)
            raise WorkerLost(f"worker {w.index} lost during {method}: "
                             f"{type(e).__name__}") from None
        finally:
            w.busy_s += time.monotonic() - t

    # -- the rollout side ------------------------------------------------------------------------

    def env(self) -> FleetEnv:
        """A new environment proxy (takes a worker at reset, gives it back at close)."""
        return FleetEnv(self)

    def factory(self) -> Callable[[], Env]:
        return self.env

    def count(self, key: str, n: int = 1) -> None:
        with self._cv:
            self._counts[key] += n

    def stats(self) -> dict[str, Any]:
        """Counters and utilisation (the ``fleet/`` metrics of a round)."""
        now = time.monotonic()
        with self._cv:
            ws = list(self._workers)
            counts = dict(self._counts)
            idle = sum(len(q) for q in self._idle.values())
        walls = [max(now - w.born, 1e-9) for w in ws]
        util = {w.index: w.busy_s / wall for w, wall in zip(ws, walls)}
        live = [w for w in ws if not w.dead]
        return {"episodes_requeued": counts.get("episodes_requeued", 0),
                "episodes_masked": counts.get("episodes_masked", 0),
                "replays_diverged": counts.get("replays_diverged", 0),
                "workers_dead": counts.get("workers_dead", 0),
                "workers_started": counts.get("workers_started", 0),
                "workers_alive": len(live), "workers_idle": idle,
                "hosts": len({w.node for w in live}),
                "sandbox_utilisation": sum(util.values()) / max(len(util), 1),
                "sandbox_occupancy": sum(w.held_s for w in ws) / max(sum(walls), 1e-9),
                "utilisation_per_worker": util}

    def shutdown(self) -> None:
        ray = _ray()
        with self._cv:
            ws, self._workers = self._workers, []
            self._idle = {}
        for w in ws:
            try:
                ray.kill(w.actor)
            except Exception:  # noqa: BLE001
                pass


class FleetEnv(Env):
    """An Env whose episode runs on a fleet worker; re-queues itself onto another worker when
    its worker is lost (module docstring). The agent loop uses it like any Env."""

    def __init__(self, fleet: RayEnvFleet):
        super().__init__()
        self.fleet = fleet
        self.name = fleet.env_name
        self.worker: _Worker | None = None
        self.requeued = 0
        self._task: Task | None = None
        self._reset_out: tuple[list[Message], list[ToolSchema]] | None = None
        self._steps: list[tuple[list[ToolCall], list[Message]]] = []
        self._lost = False

    def _apply(self, state: dict[str, Any]) -> None:
        self.done = state["done"]
        if state["status"] == EpisodeStatus.ENV_ERROR.value:
            self.mark_env_error(state["env_error"] or "environment error on the fleet worker")

    def _give_up(self, reason: str) -> None:
        self._lost = True
        self.done = True
        self.mark_env_error(reason)
        self.fleet.count("episodes_masked")

    def _requeue(self, why: str) -> bool:
        """Moves the episode to another worker by replaying it there; False when masked."""
        while True:
            if self.requeued >= self.fleet.max_retries:
                self._give_up(f"{why}; episode masked after {self.requeued} re-queue(s) "
                              f"(fleet.max_retries={self.fleet.max_retries})")
                return False
            self.requeued += 1
            self.fleet.count("episodes_requeued")
            self.fleet.release(self.worker)   # dead: only its held time is counted
            self.worker = self.fleet.acquire()
            try:
                messages, tools, state = self.fleet.call(self.worker, "reset", self._task)
                if (messages, tools) != self._reset_out:
                    return self._diverged("reset")
                for i, (calls, results) in enumerate(self._steps):
                    again, state = self.fleet.call(self.worker, "step", calls)
                    if again != results:
                        return self._diverged(f"turn {i + 1}")
                self._apply(state)
                return True
            except WorkerLost as e:
                why = str(e)

    def _diverged(self, where: str) -> bool:
        self.fleet.count("replays_diverged")
        self._give_up(f"worker lost; the replay on another worker gave different results at "
                      f"{where} (environment not deterministic under replay)")
        return False

    def reset(self, task: Task) -> tuple[list[Message], list[ToolSchema]]:
        self.close()
        super().__init__()
        self._task, self._steps, self._lost, self.requeued = task, [], False, 0
        self.worker = self.fleet.acquire()
        try:
            messages, tools, state = self.fleet.call(self.worker, "reset", task)
        except WorkerLost as e:
            self._reset_out = None
            while True:  # nothing was read yet: start afresh on another worker
                if self.requeued >= self.fleet.max_retries:
                    self._give_up(f"{e}; episode masked after {self.requeued} re-queue(s) "
                                  f"(fleet.max_retries={self.fleet.max_retries})")
                    return list(task.messages), []
                self.requeued += 1
                self.fleet.count("episodes_requeued")
                self.fleet.release(self.worker)
                self.worker = self.fleet.acquire()
                try:
                    messages, tools, state = self.fleet.call(self.worker, "reset", task)
                    break
                except WorkerLost as e2:
                    e = e2
        self._reset_out = copy.deepcopy((messages, tools))  # the agent appends to messages
        self._apply(state)
        return messages, tools

    def step(self, tool_calls: Sequence[ToolCall]) -> list[Message]:
        calls = list(tool_calls or [])
        while not self._lost:
            try:
                results, state = self.fleet.call(self.worker, "step", calls)
            except WorkerLost as e:
                if self._requeue(str(e)):
                    continue
                break
            self._steps.append(copy.deepcopy((calls, results)))
            self._apply(state)
            return results
        return [tool_message(*parse_tool_call(c)[:2],
                             f"Error: environment failure: {self.env_error}") for c in calls]

    def evaluate(self, messages: Sequence[Message] = ()) -> EvalResult:
        while not self._lost:
            try:
                result = self.fleet.call(self.worker, "evaluate", list(messages))
            except WorkerLost as e:
                if self._requeue(str(e)):
                    continue
                break
            if self.status == EpisodeStatus.ENV_ERROR and not result.masked:
                result = EvalResult(result.reward, result.passed, EpisodeStatus.ENV_ERROR,
                                    {**result.details, "error": self.env_error})
            return result
        return EvalResult(0.0, False, EpisodeStatus.ENV_ERROR,
                          {"error": self.env_error, "requeued": self.requeued})

    def close(self) -> None:
        w, self.worker = self.worker, None
        if w is not None:
            self.fleet.release(w)


def fleet_options(cfg) -> dict[str, Any]:
    """``cfg.fleet`` (absent: all defaults) checked: an unknown key or a bad value is a
    ValueError naming ``fleet.<key>``."""
    given = cfg.get("fleet") if hasattr(cfg, "get") else None
    given = dict(given or {})
    unknown = sorted(set(given) - set(FLEET_DEFAULTS))
    if unknown:
        raise ValueError(f"fleet.{unknown[0]}: unknown key; known: {sorted(FLEET_DEFAULTS)}")
    opts = {**FLEET_DEFAULTS, **given}
    if opts["backend"] not in BACKENDS:
        raise ValueError(f"fleet.backend must be one of {list(BACKENDS)}, got {opts['backend']!r}")
    for key in ("workers_per_host", "max_retries"):
        v = opts[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"fleet.{key} must be an int >= 0, got {v!r}")
    for key in ("ping_timeout_s", "call_timeout_s", "acquire_timeout_s"):
        v = opts[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"fleet.{key} must be a number > 0, got {v!r}")
    for key in ("address", "resource"):
        if not isinstance(opts[key], str):
            raise ValueError(f"fleet.{key} must be a string, got {opts[key]!r}")
    return opts


def make_env_factory(cfg, env_kwargs: dict[str, Any] | None = None
                     ) -> tuple[Callable[[], Env], RayEnvFleet | None]:
    """(a function that builds a fresh Env of ``cfg.rl.env``, the fleet or None).

    fleet.backend "local": ``make_env(cfg.rl.env, **env_kwargs)`` in this process; "ray": the
    environments run on a RayEnvFleet (joined or started from fleet.address) and the function
    returns FleetEnv proxies. Call ``fleet.stats()`` for the metrics, ``fleet.shutdown()`` at
    the end."""
    opts = fleet_options(cfg)
    env_name = cfg.rl.env
    if opts["backend"] == "local":
        from kat_jax.envs import make_env

        return (lambda: make_env(env_name, **(env_kwargs or {}))), None
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=opts["address"] or None, include_dashboard=False)
    fleet = RayEnvFleet(env_name, env_kwargs, resource=opts["resource"],
                        workers_per_host=opts["workers_per_host"],
                        max_retries=opts["max_retries"], ping_timeout_s=opts["ping_timeout_s"],
                        call_timeout_s=opts["call_timeout_s"],
                        acquire_timeout_s=opts["acquire_timeout_s"])
    return fleet.env, fleet


_SHARED: dict[tuple, tuple[Callable[[], Env], RayEnvFleet | None]] = {}
_SHARED_LOCK = threading.Lock()


def shared_env_factory(cfg) -> tuple[Callable[[], Env], RayEnvFleet | None]:
    """make_env_factory(cfg) once per process and (rl.env, cfg.fleet): every round of a run
    gets the same fleet (its warm pools and counters), not a new one."""
    opts = fleet_options(cfg)
    key = (cfg.rl.env, tuple(sorted(opts.items())))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = make_env_factory(cfg)
        return _SHARED[key]


def fleet_metrics(fleet: RayEnvFleet | None) -> dict[str, float]:
    """A round's ``fleet/`` metrics (empty for local environments): the counters so far and the
    utilisation (per-worker values left out)."""
    if fleet is None:
        return {}
    s = fleet.stats()
    s.pop("utilisation_per_worker")
    return {f"fleet/{k}": float(v) for k, v in s.items()}
