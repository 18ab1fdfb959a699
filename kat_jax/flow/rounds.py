"""One round of online episodes (kat_jax.flow.online and its asynchronous mode,
kat_jax.flow.async_rollout, both use it): which tasks a round draws, the engine wrapper that
reports every model call to the trajectory manager, and the round's episodes as jobs."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kat_jax.training.build import TrainingError

log = logging.getLogger(__name__)

class _ReportingEngine:
    """What the agents call: the sampler, with every call reported to the manager under the
    calling thread's session (agents never import the trainer or the manager)."""

    def __init__(self, engine, manager, version: int):
        self.engine, self.manager, self.version = engine, manager, version
        self.local = threading.local()
        self.context_length = engine.context_length
        self.manager_s = 0.0  # time spent in the manager (all threads)
        self.token_versions: dict[int, int] = {}  # policy version -> generated tokens
        self._lock = threading.Lock()

    def generate(self, prompts, params, n=1, seeds=None):
        out = self.engine.generate(prompts, params, n=n, seeds=seeds)
        # the version of the weights that produced this call's tokens: the asynchronous loop's
        # gated engine knows it per call (kat_jax.flow.async_rollout), else the round's
        version = getattr(self.engine, "call_version", lambda: self.version)()
        session = self.local.session
        t = time.perf_counter()
        with self._lock:
            for prompt, gens in zip(prompts, out):
                for g in gens:
                    self.manager.add_call(session, list(prompt), list(g.tokens),
                                          list(g.logprobs), list(g.entropies), version)
                    self.token_versions[version] = self.token_versions.get(version, 0) + len(
                        g.tokens)
            self.manager_s += time.perf_counter() - t
        return out


def _task_order(num_tasks: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.RandomState((seed * 7919 + epoch) % (2**31)).permutation(num_tasks)


def draw_tasks(tasks: list, seed: int, start: int, n: int) -> list:
    """Tasks start .. start + n - 1 of the stream that walks the tasks in a fresh shuffle each
    epoch (seeded by `seed` and the epoch)."""
    out = []
    for k in range(start, start + n):
        epoch, i = divmod(k, len(tasks))
        out.append(tasks[int(_task_order(len(tasks), seed, epoch)[i])])
    return out


def round_tasks(tasks: list, groups: int, seed: int, round_index: int) -> list:
    """The tasks of a round without dynamic sampling: the round's `groups` of the stream."""
    return draw_tasks(tasks, seed, round_index * groups, groups)


def run_round(engine, cfg, tasks, tokenizer, round_index: int, advantage: str,
              seed: int | None = None, teachers: dict | None = None):
    """Episodes of `tasks` through a fresh manager: (groups of records in task order, episode
    records, manager stats). seed: the episodes' sampling seed (default: from train.seed and
    the round). teachers (online rft: task id -> transcripts): the reward is relative to them
    (kat_jax.envs.teachers.relative_reward; the episode record keeps the environment's own
    in "outcome_reward"), and with rl.divergence_threshold > 0 an episode whose tool calls
    diverge from every teacher's by more than the threshold for rl.patience turns in a row is
    terminated there: rl.on_terminate=mask drops its trajectories after the advantages
    (counted), penalty gives it the reward rl.termination_penalty."""
    jobs, one, finish = round_episodes(engine, cfg, tasks, tokenizer, round_index, advantage,
                                       seed, teachers)
    with ThreadPoolExecutor(max_workers=cfg.rl.concurrency) as ex:
        episodes = [r for r in ex.map(one, jobs) if r is not None]
    return finish(episodes)


def round_episodes(engine, cfg, tasks, tokenizer, round_index: int, advantage: str,
                   seed: int | None = None, teachers: dict | None = None):
    """A round's episodes as work items, for run_round and the asynchronous loop
    (kat_jax.flow.async_rollout): (jobs [(task, sample)], one(job) -> episode record or None
    (thread-safe), finish(episodes) -> (groups, episodes, stats) once every job ran)."""
    from kat_jax.flow.manager import TrajectoryManager
    from kat_jax.flow.ray_fleet import fleet_metrics, shared_env_factory
    from kat_jax.rollout.agent import run_episode
    from kat_jax.rollout.sampler import SamplingParams

    rl = cfg.rl
    new_env, fleet = shared_env_factory(cfg)  # fleet.backend: in this process, or on Ray
    manager = TrajectoryManager(estimator=advantage)
    eng = _ReportingEngine(engine, manager, round_index)
    sp = SamplingParams(temperature=rl.temperature, max_new_tokens=rl.max_new_tokens,
                        seed=cfg.train.seed)
    jobs = [(t, s) for t in tasks for s in range(rl.group_size)]
    if seed is None:
        seed = (cfg.train.seed * 1_000_003 + round_index) % (2**31)

    terminated: set = set()

    def supervise(task):
        """The turn check of one episode (None without supervision)."""
        if teachers is None or rl.divergence_threshold <= 0:
            return None
        from kat_jax.envs.teachers import divergence

        above = [0]

        def check(messages):
            d = divergence(messages, teachers[task.id])
            above[0] = above[0] + 1 if d > rl.divergence_threshold else 0
            if above[0] >= rl.patience:
                return f"divergence {d:.3f} > {rl.divergence_threshold} for {above[0]} turns"
            return None

        return check

    def one(job):
        task, sample = job
        session = f"r{round_index}/{task.id}#{sample}"
        with eng._lock:  # the manager is not thread-safe; the agents' threads share it
            manager.start_session(session, group=task.id, task_id=task.id)
        eng.local.session = session
        env = new_env()
        try:
            rec = run_episode(eng, env, task, tokenizer, sp, max_turns=rl.max_turns,
                              max_tokens=rl.max_tokens or cfg.data.row_len, seed=seed,
                              sample=sample, turn_check=supervise(task),
                              keep_messages=teachers is not None)
        except Exception as e:  # a crashed environment masks its group; the loop goes on
            log.warning("episode %s failed: %s", session, e)
            with eng._lock:
                manager.finish_session(session, reward=0.0, status="env_error", passed=False,
                                       turns=0, tool_calls=0)
            return None
        finally:
            env.close()
        if rec["turns"] == 0 and rec["status"] in ("max_tokens", "context_limit"):
            raise TrainingError(
                f"rl.max_tokens / data.row_len: the prompt of task {task.id} "
                f"({rec.get('prompt_tokens', len(rec['tokens']))} tokens) leaves no room for a "
                f"generated token within the episode's token budget "
                f"{rl.max_tokens or cfg.data.row_len}; raise data.row_len (and rl.max_tokens)")
        if teachers is not None:
            from kat_jax.envs.teachers import RelativeRewardConfig, relative_reward

            messages = rec.pop("messages")
            rec["outcome_reward"] = rec["reward"]
            if "terminated" in rec:
                rec["terminated"]["session"] = session
                with eng._lock:
                    terminated.add(session)
            if "terminated" in rec and rl.on_terminate == "penalty":
                rec["reward"] = float(rl.termination_penalty)
            else:
                rec["reward"] = relative_reward(messages, rec["outcome_reward"],
                                                teachers[task.id], RelativeRewardConfig(
                                                    w_outcome=rl.w_outcome,
                                                    w_process=rl.w_process,
                                                    w_answer=rl.w_answer))
        with eng._lock:
            manager.finish_session(session, reward=rec["reward"], status=rec["status"],
                                   passed=rec.get("passed"), turns=rec["turns"],
                                   tool_calls=rec["tool_calls"])
        return rec

    def finish(episodes):
        t = time.perf_counter()
        groups = manager.pop_groups(rl.group_size)
        manager.stats["manager_time_s"] = eng.manager_s + time.perf_counter() - t
        order = {t.id: i for i, t in enumerate(tasks)}  # completion order varies with threads
        groups.sort(key=lambda g: order.get(g[0].get("group"), len(order)))
        stats = dict(manager.stats)
        stats["terminated"] = len(terminated)
        if terminated and rl.on_terminate == "mask":  # after the advantages (the baseline)
            kept = [[r for r in g if r.get("session") not in terminated] for g in groups]
            stats["terminated_masked"] = sum(len(g) for g in groups) - sum(len(g) for g in kept)
            groups = [g for g in kept if g]
        stats["token_versions"] = dict(eng.token_versions)
        stats.update(fleet_metrics(fleet))
        return groups, episodes, stats

    return jobs, one, finish
