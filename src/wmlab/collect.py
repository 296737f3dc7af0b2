"""Parallel rollout collection into the episode store.

The parent process owns the plan: which episode indices exist, which to run next, and which
finished episodes to keep. Workers own an env batch and a policy; they run whole episodes,
write each one to the store's tmp/ area and report its metadata. Only the parent renames a
finished file into episodes/, and only while fewer than N are kept, so the store never holds
more than N, never a half-written file, and a killed collection (even kill -9) resumes by
re-running the same command: finished episodes are found by name and skipped.

Episode i of a collection is seeded by (run seed, collection seed, i) alone, so the same
command collects the same episodes whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wmlab import envs
from wmlab.agent import AgentPolicy, Exploration
from wmlab.config import Config
from wmlab.data import Episode, EpisodeStore
from wmlab.envs.binpacking_heuristics import HEURISTICS
from wmlab.envs.repeat import agent_steps
from wmlab.errors import WmlabError
from wmlab.evaluators import ProcessEngine, SerialEngine
from wmlab.policies import AGENT_POLICY, HeuristicPolicy, PolicyConfig, make_policy

# Seconds a worker may spend on one task (envs_per_worker episodes) before it counts as hung.
TASK_TIMEOUT = 1800.0


@dataclass(frozen=True)
class CollectJob:
    """Everything a worker needs: plain data, so it pickles into a spawned process."""

    env: str
    backend: str
    max_steps: int
    envs_per_worker: int
    store_url: str
    collection: str
    policy: PolicyConfig
    seed_prefix: tuple[int, ...]
    action_repeat: int = 1  # env frames per step (env.action_repeat)

    def build(self) -> _Worker:
        """What a worker process builds once: the env batch, the policy, the store."""
        return _Worker(self)


@dataclass
class CollectSummary:
    store_url: str
    collection: str
    target: int
    kept_before: int
    kept_now: int
    new_episodes: int = 0
    rejected: int = 0
    steps: int = 0
    seconds: float = 0.0
    new_indices: list[int] = field(default_factory=list)

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        if self.new_episodes == 0 and self.rejected == 0:
            return (f"{self.store_url}: collection '{self.collection}' already holds "
                    f"{self.kept_now}/{self.target} episodes; nothing to do")
        return (f"{self.store_url}: collection '{self.collection}' now holds "
                f"{self.kept_now}/{self.target} episodes (+{self.new_episodes} new, "
                f"{self.rejected} dropped by the length filter), {self.steps} env steps in "
                f"{self.seconds:.1f} s = {self.steps_per_second:.0f} steps/s")


def episode_seeds(seed_prefix: tuple[int, ...], index: int) -> tuple[int, int]:
    """(env seed, policy seed) of episode ``index``: independent streams of one SeedSequence."""
    env_seed, policy_seed = np.random.SeedSequence([*seed_prefix, index]).generate_state(2)
    return int(env_seed), int(policy_seed)


def run_episodes(env_batch: envs.EnvBatch, policy, seeds: list[tuple[int, int]],
                 max_steps: int) -> Iterator[tuple[int, Episode]]:
    """Run one episode per slot from the given seeds; yield (slot, episode) as each ends.

    Frames are kept per slot only until that slot's episode ends, so a worker holds at most
    one episode per env of its batch.
    """
    spec = env_batch.spec
    obs = env_batch.reset([env_seed for env_seed, _ in seeds])
    for slot, (_, policy_seed) in enumerate(seeds):
        policy.reset(slot, policy_seed)
    frames: list[list[np.ndarray]] = [[obs[i].copy()] for i in range(len(seeds))]
    actions: list[list[np.ndarray]] = [[] for _ in seeds]
    rewards: list[list[float]] = [[] for _ in seeds]
    running = np.ones(len(seeds), dtype=bool)
    while running.any():
        env_actions = spec.to_env_action(policy.act(obs))
        vectors = spec.action_vector(env_actions)
        obs, reward, terminated, truncated = env_batch.step(env_actions)
        for slot in np.flatnonzero(running):
            frames[slot].append(obs[slot].copy())
            actions[slot].append(vectors[slot])
            rewards[slot].append(float(reward[slot]))
            steps = len(rewards[slot])
            if terminated[slot] or truncated[slot] or (max_steps and steps >= max_steps):
                running[slot] = False
                dones = np.zeros(steps, dtype=bool)
                dones[-1] = bool(terminated[slot])
                episode = Episode(
                    frames=np.stack(frames[slot]),
                    actions=np.asarray(actions[slot], dtype=np.float32).reshape(steps, -1),
                    rewards=np.asarray(rewards[slot], dtype=np.float32),
                    dones=dones,
                    meta={"terminated": bool(terminated[slot]),
                          "truncated": not bool(terminated[slot])},
                )
                frames[slot], actions[slot], rewards[slot] = [], [], []
                yield slot, episode


def collection_policy(config: PolicyConfig, num_envs: int, outputs: int,
                      env_batch: Any = None) -> Any:
    """The policy that collects: a random one, a trained run's agent (``agent``), or one of
    bin packing's heuristics, which read the states of ``env_batch``'s envs."""
    if config.name in HEURISTICS:  # a batch without Gymnasium envs is refused as one
        return HeuristicPolicy(num_envs, outputs, config,
                               getattr(env_batch, "envs", [env_batch]))
    if config.name != AGENT_POLICY:
        return make_policy(config, num_envs, outputs)
    if not config.agent_run:
        raise WmlabError("policy 'agent' needs the run whose controller acts: set "
                         "collect.agent_run=RUN_DIR")
    return AgentPolicy.from_run(num_envs, outputs, config.agent_run,
                                Exploration.of(config, outputs))


class _Worker:
    """Runs tasks (lists of episode indices) with one env batch and one policy."""

    def __init__(self, job: CollectJob) -> None:
        self.job = job
        self.env_batch = envs.make_batch(job.env, job.envs_per_worker, job.backend,
                                         **envs.env_options(job.max_steps,
                                                            job.action_repeat))
        self.policy = collection_policy(job.policy, job.envs_per_worker,
                                        self.env_batch.spec.controller_outputs,
                                        self.env_batch)
        self.store = EpisodeStore.open(job.store_url)

    def run(self, indices: list[int]) -> list[dict]:
        """The task's episodes, each written to a temporary file of the store (the parent
        commits the ones it keeps)."""
        return list(self._episodes(indices))

    def _episodes(self, indices: list[int]) -> Iterator[dict]:
        seeds = [episode_seeds(self.job.seed_prefix, i) for i in indices]
        cap = agent_steps(self.job.max_steps, self.job.action_repeat)  # 0 stays 0
        for slot, episode in run_episodes(self.env_batch, self.policy, seeds, cap):
            index = indices[slot]
            env_seed, policy_seed = seeds[slot]
            episode.meta.update(env=self.job.env, backend=self.env_batch.backend,
                                policy=self.job.policy.name, collection=self.job.collection,
                                index=index, seed=env_seed, policy_seed=policy_seed)
            tmp = self.store.write_tmp(f"{self.job.collection}-{index:07d}-{os.getpid()}",
                                       episode)
            yield {"index": index, "tmp": tmp, "length": len(episode.rewards),
                   "return": float(episode.rewards.sum())}

    def close(self) -> None:
        self.env_batch.close()


def worker_threads(workers: int, cpus: int | None = None) -> int:
    """Torch threads per collection worker: the cores shared out, at least one.

    Each worker would otherwise start one thread per core, and an agent policy's batch-1
    V and M inference then fights over the cores: measured 8x slower (30 against 251
    agent steps/s on 2 cores with 2 workers, docs/benchmarks.md)."""
    return max(1, (cpus or os.cpu_count() or 1) // max(1, workers))


def _engine(job: CollectJob, workers: int) -> Any:
    """Workers that run collection tasks (lists of episode indices): the rollouts' process
    pool (a lost worker is replaced and its task retried), or this process for one worker."""
    if workers <= 1:
        return SerialEngine(job)
    # a task of a few episodes can take minutes (Doom at the step cap): a generous timeout
    return ProcessEngine(job, workers, TASK_TIMEOUT, threads=worker_threads(workers))


def resolve_workers(requested: int) -> int:
    return requested if requested > 0 else (os.cpu_count() or 1)


def collect(cfg: Config, *, progress: bool = True,
            on_episode: Callable[[dict], None] | None = None) -> CollectSummary:
    """Fill the store of ``cfg`` up to ``cfg.collect.episodes`` episodes of one collection."""
    c = cfg.collect
    spec = envs.get_spec(cfg.env.name)
    backend = cfg.env.backend or spec.default_backend
    if backend not in spec.backends:
        raise WmlabError(f"env '{spec.name}' has no backend '{backend}': choose one of "
                         f"{', '.join(spec.backends)}")
    if c.policy == AGENT_POLICY:  # the outputs it explores, checked before anything is written
        Exploration.of(c, spec.controller_outputs)
    collection = c.collection or c.policy
    store_url = cfg.store_url()
    store = EpisodeStore.create_or_open(store_url, env=spec.name, backend=backend,
                                        action_dim=spec.action_dim,
                                        allow_mixed_backends=c.allow_mixed_backends,
                                        action_repeat=cfg.env.action_repeat)
    store.clean_tmp()
    existing = store.existing_indices(collection)
    summary = CollectSummary(store_url=store_url, collection=collection, target=c.episodes,
                             kept_before=len(existing), kept_now=len(existing))
    if len(existing) >= c.episodes:
        return summary

    workers = resolve_workers(c.workers)
    if "memory" in _protocols(store):
        workers = 1  # an in-memory filesystem is private to this process
    job = CollectJob(
        env=spec.name, backend=backend, max_steps=cfg.env.max_steps,
        envs_per_worker=c.envs_per_worker, store_url=store_url, collection=collection,
        policy=PolicyConfig(name=c.policy, brown_sigma=c.brown_sigma, hold_min=c.hold_min,
                            hold_max=c.hold_max, weights_scale=c.weights_scale,
                            agent_run=c.agent_run, explore=c.explore,
                            explore_hold=c.explore_hold,
                            explore_outputs=tuple(c.explore_outputs)),
        seed_prefix=(cfg.run.seed, c.seed), action_repeat=cfg.env.action_repeat,
    )
    next_index = _index_source(existing)
    start = time.monotonic()
    bar = _progress_bar(progress, c.episodes, len(existing), collection)
    engine = _engine(job, workers)
    outstanding: list[int] = []  # episode indices in flight
    # Filtered runs keep a task per worker of slack in flight, so dropped episodes are
    # replaced without the pool idling; otherwise exactly the missing episodes are run.
    slack = c.envs_per_worker * workers if c.min_length > 0 else 0
    try:
        while summary.kept_now < c.episodes:
            missing = c.episodes - summary.kept_now
            in_flight = min(missing + slack, 2 * workers * c.envs_per_worker)
            while len(outstanding) < in_flight:
                task = [next(next_index) for _ in range(c.envs_per_worker)]
                engine.submit((task,))
                outstanding.extend(task)
            _, episodes = engine.next_completed()
            for result in episodes:
                outstanding.remove(result["index"])
                _keep_or_drop(store, summary, result, c.episodes, c.min_length, bar)
                if on_episode is not None:
                    on_episode(result)
            elapsed = time.monotonic() - start
            bar.set_postfix(steps_s=f"{summary.steps / max(elapsed, 1e-9):.0f}",
                            dropped=summary.rejected, refresh=False)
    finally:
        engine.close()
        bar.close()
        summary.seconds = time.monotonic() - start
        with contextlib.suppress(Exception):
            store.clean_tmp()
    return summary


def _keep_or_drop(store: EpisodeStore, summary: CollectSummary, result: dict, target: int,
                  min_length: int, bar: Any) -> None:
    """Commit a finished episode to the store, or drop it (too short, or surplus)."""
    summary.steps += result["length"]
    if result["length"] >= min_length and summary.kept_now < target:
        store.commit(result["tmp"], summary.collection, result["index"])
        summary.kept_now += 1
        summary.new_episodes += 1
        summary.new_indices.append(result["index"])
        bar.update(1)
    else:
        store.fs.rm(result["tmp"])
        summary.rejected += result["length"] < min_length


def _protocols(store: EpisodeStore) -> tuple[str, ...]:
    protocol = store.fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _index_source(existing: set[int]) -> Iterator[int]:
    """Episode indices not yet in the store, in increasing order, without end."""
    index = 0
    while True:
        if index not in existing:
            yield index
        index += 1


def _progress_bar(enabled: bool, total: int, initial: int, collection: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"collect {collection}", unit="ep",
                disable=not enabled, dynamic_ncols=True, smoothing=0.1, mininterval=0.5)


def collection_shares(cfg: Config) -> list[tuple[str, int]]:
    """(policy, episodes) of each collection a run's store holds: the previous agent's share
    (iterations), the fixed behaviours' share (collect.fixed_fraction), then
    collect.policy's."""
    total = cfg.collect.episodes
    by_agent = round(total * cfg.collect.agent_fraction) if cfg.collect.agent_run else 0
    by_fixed = min(round(total * cfg.collect.fixed_fraction), total - by_agent)
    shares = [("agent", by_agent), ("fixed", by_fixed),
              (cfg.collect.policy, total - by_agent - by_fixed)]
    return [(policy, count) for policy, count in shares if count > 0]


def collect_shares(cfg: Config, *, progress: bool = True
                   ) -> list[tuple[str, CollectSummary]]:
    """Fill every collection of ``collection_shares`` (one store, one collection each)."""
    shares = collection_shares(cfg)
    if len(shares) == 1 and shares[0][0] == cfg.collect.policy:
        return [(cfg.collect.policy, collect(cfg, progress=progress))]
    summaries = []
    for policy, count in shares:
        part = copy.deepcopy(cfg)
        part.collect.policy, part.collect.episodes = policy, count
        if cfg.collect.collection:  # one collection per share, or they would fill each other
            part.collect.collection = f"{cfg.collect.collection}-{policy}"
        summaries.append((policy, collect(part, progress=progress)))
    return summaries
