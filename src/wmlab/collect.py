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
import multiprocessing as mp
import os
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wmlab import envs
from wmlab.agent import AgentPolicy
from wmlab.config import Config
from wmlab.data import Episode, EpisodeStore
from wmlab.errors import WmlabError
from wmlab.policies import AGENT_POLICY, PolicyConfig, make_policy
from wmlab.procs import init_worker_process, kill_process_group

# How long a worker waits for a task before checking that its parent is still alive.
_POLL_SECONDS = 1.0


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


def collection_policy(config: PolicyConfig, num_envs: int, outputs: int) -> Any:
    """The policy that collects: a random one, or a trained run's agent (``agent``)."""
    if config.name != AGENT_POLICY:
        return make_policy(config, num_envs, outputs)
    if not config.agent_run:
        raise WmlabError("policy 'agent' needs the run whose controller acts: set "
                         "collect.agent_run=RUN_DIR")
    return AgentPolicy(num_envs, outputs, config.agent_run)


class _Worker:
    """Runs tasks (lists of episode indices) with one env batch and one policy."""

    def __init__(self, job: CollectJob) -> None:
        self.job = job
        self.env_batch = envs.make_batch(job.env, job.envs_per_worker, job.backend,
                                         **_env_kwargs(job))
        self.policy = collection_policy(job.policy, job.envs_per_worker,
                                        self.env_batch.spec.controller_outputs)
        self.store = EpisodeStore.open(job.store_url)

    def run(self, indices: list[int]) -> Iterator[dict]:
        seeds = [episode_seeds(self.job.seed_prefix, i) for i in indices]
        for slot, episode in run_episodes(self.env_batch, self.policy, seeds,
                                          self.job.max_steps):
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


def _env_kwargs(job: CollectJob) -> dict:
    return {"max_steps": job.max_steps} if job.max_steps else {}


def worker_threads(workers: int, cpus: int | None = None) -> int:
    """Torch threads per collection worker: the cores shared out, at least one.

    Each worker would otherwise start one thread per core, and an agent policy's batch-1
    V and M inference then fights over the cores: measured 8x slower (30 against 251
    agent steps/s on 2 cores with 2 workers, docs/benchmarks.md)."""
    return max(1, (cpus or os.cpu_count() or 1) // max(1, workers))


def _worker_main(job: CollectJob, tasks: mp.Queue, results: mp.Queue,
                 threads: int = 1) -> None:
    """Entry point of a worker process: loop over tasks until told to stop or orphaned."""
    import torch

    init_worker_process()
    torch.set_num_threads(threads)
    parent = mp.parent_process()
    try:
        worker = _Worker(job)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        results.put({"error": f"{type(exc).__name__}: {exc}"})
        return
    try:
        while True:
            try:
                task = tasks.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    return  # the parent was killed: stop instead of running forever
                continue
            if task is None:
                return
            for result in worker.run(task):
                results.put(result)
    except BaseException as exc:  # noqa: BLE001
        results.put({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        worker.close()


class _Engine:
    """Runs tasks either inline (one worker, this process) or on a pool of processes."""

    def __init__(self, job: CollectJob, workers: int) -> None:
        self.job = job
        self.inline = workers <= 1
        self.workers = 1 if self.inline else workers
        self.outstanding: list[int] = []
        if self.inline:
            self._worker = _Worker(job)
            self._pending: list[list[int]] = []
            self._current: Iterator[dict] | None = None
            return
        ctx = mp.get_context("spawn")  # fork would copy pygame/vizdoom/torch state
        self.tasks: mp.Queue = ctx.Queue()
        self.results: mp.Queue = ctx.Queue()
        threads = worker_threads(workers)
        self.procs = [ctx.Process(target=_worker_main,
                                  args=(job, self.tasks, self.results, threads),
                                  daemon=True) for _ in range(workers)]
        for proc in self.procs:
            proc.start()

    def submit(self, indices: list[int]) -> None:
        self.outstanding.extend(indices)
        if self.inline:
            self._pending.append(indices)
        else:
            self.tasks.put(indices)

    def next_result(self) -> dict:
        """The next finished episode, from whichever worker finishes first."""
        result = self._next_inline() if self.inline else self._next_from_pool()
        self.outstanding.remove(result["index"])
        return result

    def _next_inline(self) -> dict:
        while True:
            if self._current is None:
                self._current = self._worker.run(self._pending.pop(0))
            try:
                return next(self._current)
            except StopIteration:
                self._current = None

    def _next_from_pool(self) -> dict:
        while True:
            try:
                result = self.results.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                dead = [p for p in self.procs if not p.is_alive()]
                if dead:
                    raise WmlabError(
                        f"a collection worker died (exit code {dead[0].exitcode}); finished "
                        "episodes are kept: re-run the same command to continue") from None
                continue
            if "error" in result:
                raise WmlabError(f"collection worker failed: {result['error']}")
            return result

    def close(self) -> None:
        """Stop at once: whatever is still running is surplus to the N episodes wanted."""
        if self.inline:
            self._worker.close()
            return
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(timeout=5)
            kill_process_group(proc.pid)  # env children of a worker that did not exit cleanly


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
    collection = c.collection or c.policy
    store_url = cfg.store_url()
    store = EpisodeStore.create_or_open(store_url, env=spec.name, backend=backend,
                                        action_dim=spec.action_dim,
                                        allow_mixed_backends=c.allow_mixed_backends)
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
                            agent_run=c.agent_run),
        seed_prefix=(cfg.run.seed, c.seed),
    )
    next_index = _index_source(existing)
    start = time.monotonic()
    bar = _progress_bar(progress, c.episodes, len(existing), collection)
    engine = _Engine(job, workers)
    # Filtered runs keep a task per worker of slack in flight, so dropped episodes are
    # replaced without the pool idling; otherwise exactly the missing episodes are run.
    slack = c.envs_per_worker * engine.workers if c.min_length > 0 else 0
    try:
        while summary.kept_now < c.episodes:
            missing = c.episodes - summary.kept_now
            in_flight = min(missing + slack, 2 * engine.workers * c.envs_per_worker)
            while len(engine.outstanding) < in_flight:
                engine.submit([next(next_index) for _ in range(c.envs_per_worker)])
            result = engine.next_result()
            summary.steps += result["length"]
            if result["length"] >= c.min_length and summary.kept_now < c.episodes:
                store.commit(result["tmp"], collection, result["index"])
                summary.kept_now += 1
                summary.new_episodes += 1
                summary.new_indices.append(result["index"])
                bar.update(1)
            else:
                store.fs.rm(result["tmp"])
                summary.rejected += result["length"] < c.min_length
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
