"""Evaluators: one interface, three engines that run jobs on workers that live long.

A *workload* is a picklable description (which V, M, env or dream) whose ``build()`` gives a
*runner* with ``run(params (p, n), seeds (p, R)) -> returns (p, R)``; workers build it once
and keep it (V and M loaded once, env batches reused). Collection runs on the same engines
(its runner's ``run(indices)`` writes episodes), through ``submit`` / ``next_completed``. A generation is split into jobs of
``members_per_job`` members: the split depends only on the population, never on the engine
or the number of workers, so every engine computes the same batches and returns the same
numbers for the same seeds.

Engines:

- ``serial``: jobs one after another in this process.
- ``process`` (default): persistent local worker processes (spawned, one torch thread each).
- ``ray``: one Ray actor per worker, on a local Ray instance or a cluster (``ray_address``;
  ``wmlab.raycluster`` connects, token authentication included); each job's record says
  on which node it ran.

A worker that dies (its process ends, or its actor is lost) or stays silent longer than
``timeout`` seconds on a job is detected, replaced, and the job is retried on another worker;
a job that fails ``max_attempts`` times stops the run with a message. Nothing waits forever.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Protocol

import numpy as np
import torch

from wmlab.closing import Closing
from wmlab.errors import WmlabError
from wmlab.procs import init_worker_process, kill_process_group
from wmlab.raycluster import connect, import_ray

ENGINES = ("serial", "process", "ray")
POLL_SECONDS = 0.2


@dataclass
class Rollouts:
    """What a runner may return instead of bare returns: each rollout's return and the
    env (or dream) steps it took, both (p, R)."""

    returns: np.ndarray
    steps: np.ndarray


class Runner(Protocol):
    """Rollouts: ``run(params, seeds)``; collection: ``run(indices)``. ``close`` is optional
    (workers call it when they stop: env batches shut their games down)."""

    def run(self, *job: Any) -> Any: ...


class Workload(Protocol):
    def build(self) -> Runner: ...


Job = tuple[Any, ...]  # the arguments of one ``Runner.run`` call


def split_jobs(params: np.ndarray, seeds: np.ndarray, members_per_job: int) -> list[Job]:
    """Chunks of ``members_per_job`` members (the unit that runs as one batch, and retries)."""
    step = max(1, members_per_job)
    return [(params[i:i + step], seeds[i:i + step]) for i in range(0, len(params), step)]


def _result(out: Any) -> np.ndarray | Rollouts:
    return out if isinstance(out, Rollouts) else np.asarray(out)


def warn(message: str) -> None:
    print(f"wmlab: warning: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Serial


class SerialEngine:
    def __init__(self, workload: Workload, threads: int = 0) -> None:
        self.threads = threads
        self.runner = workload.build()
        self.retries = 0
        self._queue: deque[tuple[int, Job]] = deque()  # (id, job), in submission order
        self._next_id = 0

    def map(self, jobs: Sequence[Job]) -> list[np.ndarray]:
        with _torch_threads(self.threads):
            return [_result(self.runner.run(*job)) for job in jobs]

    def submit(self, job: Job) -> int:
        job_id, self._next_id = self._next_id, self._next_id + 1
        self._queue.append((job_id, job))
        return job_id

    def next_completed(self) -> tuple[int, Any]:
        """The oldest submitted job, run now (in this process, in submission order)."""
        job_id, job = self._queue.popleft()
        with _torch_threads(self.threads):
            return job_id, _result(self.runner.run(*job))

    def worker_pids(self) -> list[int]:
        return [os.getpid()]

    def close(self) -> None:
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()


@contextlib.contextmanager
def _torch_threads(threads: int):
    if threads <= 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Local processes


def _worker_main(workload: Workload, conn: Any, threads: int) -> None:
    """A persistent worker: build the runner once, then run jobs until told to stop."""
    # Ctrl-C reaches the whole process group: the parent alone decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    init_worker_process()  # own process group: a killed worker's env children go with it
    torch.set_num_threads(max(1, threads))
    try:
        runner = workload.build()
    except BaseException as exc:  # reported to the parent, which stops with the message
        conn.send(("fatal", str(exc) if isinstance(exc, WmlabError) else
                   traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    try:
        _serve(runner, conn)
    finally:
        close = getattr(runner, "close", None)
        if close is not None:
            close()  # e.g. env batches: their games shut down rather than being killed


def _serve(runner: Runner, conn: Any) -> None:
    """Run the jobs the parent sends until it says stop (None) or goes away."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        job_id, *job = message
        try:
            conn.send(("done", job_id, _result(runner.run(*job))))
        except WmlabError as exc:
            conn.send(("error", job_id, str(exc)))
        except Exception:
            conn.send(("error", job_id, traceback.format_exc()))


@dataclass
class _Slot:
    proc: Any
    conn: Any
    ready: bool = False
    job: int | None = None
    since: float = 0.0


class ProcessEngine:
    """Persistent worker processes fed job by job through pipes."""

    def __init__(self, workload: Workload, workers: int, timeout: float, threads: int = 1,
                 max_attempts: int = 3, startup_timeout: float = 300.0) -> None:
        self.workload, self.threads, self.timeout = workload, threads, timeout
        self.max_attempts = max_attempts
        self.startup_timeout = max(startup_timeout, timeout)
        self.ctx = mp.get_context("spawn")  # fork would copy torch's thread pools unsafely
        self.retries = 0
        self.startup_failures = 0
        self.jobs: dict[int, Job] = {}  # submitted, not yet handed back
        self.pending: deque[int] = deque()  # waiting for a worker
        self.attempts: dict[int, int] = {}
        self.completed: dict[int, Any] = {}  # results not yet handed back, in finishing order
        self.next_id = 0
        self.slots = [self._start() for _ in range(max(1, workers))]

    def _start(self) -> _Slot:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker_main, args=(self.workload, child, self.threads),
                                daemon=True)
        proc.start()
        child.close()
        return _Slot(proc=proc, conn=parent, since=time.monotonic())

    def worker_pids(self) -> list[int]:
        return [slot.proc.pid for slot in self.slots]

    def wait_ready(self) -> None:
        """Block until every worker has built its runner (benchmarks time jobs, not start-up)."""
        while not all(slot.ready for slot in self.slots):
            self._poll()

    def submit(self, job: Job) -> int:
        """Queue one job (the arguments of ``Runner.run``); returns its id."""
        job_id, self.next_id = self.next_id, self.next_id + 1
        self.jobs[job_id], self.attempts[job_id] = job, 0
        self.pending.append(job_id)
        self._dispatch()  # an idle worker starts at once
        return job_id

    def next_completed(self) -> tuple[int, Any]:
        """(id, result) of the next job to finish, on whichever worker finishes first; lost
        workers are replaced and their jobs retried on the way."""
        while not self.completed:
            self._dispatch()
            self._poll()
        job_id = next(iter(self.completed))
        del self.jobs[job_id], self.attempts[job_id]
        return job_id, self.completed.pop(job_id)

    def map(self, jobs: Sequence[Job]) -> list[np.ndarray]:
        ids = [self.submit(job) for job in jobs]
        results: dict[int, Any] = {}
        while len(results) < len(ids):
            job_id, result = self.next_completed()
            results[job_id] = result
        return [results[i] for i in ids]

    def _dispatch(self) -> None:
        """Hand pending jobs to the idle workers that are ready."""
        for index, slot in enumerate(self.slots):
            if slot.ready and slot.job is None and self.pending:
                job_id = self.pending.popleft()
                slot.job, slot.since = job_id, time.monotonic()
                try:
                    slot.conn.send((job_id, *self.jobs[job_id]))
                except OSError:  # the worker died while idle: its job goes elsewhere
                    self._replace(index, "its pipe is broken")

    def _poll(self) -> None:
        handles = [s.conn for s in self.slots] + [s.proc.sentinel for s in self.slots]
        wait(handles, timeout=POLL_SECONDS)
        now = time.monotonic()
        for index, slot in enumerate(self.slots):
            if slot.conn.poll():
                try:
                    message = slot.conn.recv()
                except (EOFError, OSError):
                    self._replace(index, "its pipe closed")
                    continue
                self._handle(index, message)
            elif not slot.proc.is_alive():
                self._replace(index, f"it exited with code {slot.proc.exitcode}")
            elif slot.job is not None and now - slot.since > self.timeout:
                self._replace(index,
                              f"it was silent for more than es.timeout = {self.timeout:g} s")
            elif not slot.ready and now - slot.since > self.startup_timeout:
                self._replace(index, f"it did not start within {self.startup_timeout:g} s")

    def _handle(self, index: int, message: tuple) -> None:
        slot = self.slots[index]
        kind = message[0]
        if kind == "ready":
            slot.ready = True
        elif kind == "fatal":
            self.close()
            raise WmlabError(f"a worker could not start: {message[1]}")
        elif kind == "done":
            self.completed[message[1]] = message[2]
            slot.job = None
        elif kind == "error":
            job_id = message[1]
            slot.job = None
            self.attempts[job_id] += 1
            if self.attempts[job_id] >= self.max_attempts:
                self.close()
                raise WmlabError(f"job {job_id} failed {self.attempts[job_id]} times; "
                                 f"last error: {message[2]}")
            self.pending.appendleft(job_id)

    def _replace(self, index: int, why: str) -> None:
        slot = self.slots[index]
        job = slot.job
        if not slot.ready:
            # Workers that die before they are ready would be replaced forever: give up.
            self.startup_failures += 1
            if self.startup_failures >= self.max_attempts:
                self.close()
                raise WmlabError(f"workers keep failing to start ({why}); run with the "
                                 "serial engine (es.engine = serial, or collect.workers = 1) "
                                 "to see the error in this process")
        warn(f"worker pid {slot.proc.pid} lost ({why}); "
             + (f"retrying its job {job} on another worker" if job is not None else
                "starting a new one"))
        _kill(slot)
        if job is not None:
            self.attempts[job] += 1
            self.retries += 1
            if self.attempts[job] >= self.max_attempts:
                self.close()
                raise WmlabError(f"job {job} was lost {self.attempts[job]} times (last: "
                                 f"{why}); check memory and the timeout")
            self.pending.appendleft(job)
        self.slots[index] = self._start()

    def close(self) -> None:
        for slot in self.slots:
            with contextlib.suppress(OSError, BrokenPipeError):
                slot.conn.send(None)
        deadline = time.monotonic() + 5.0
        for slot in self.slots:
            slot.proc.join(max(0.0, deadline - time.monotonic()))
            _kill(slot)
        self.slots = []


def _kill(slot: _Slot) -> None:
    if slot.proc.is_alive():
        slot.proc.kill()
        slot.proc.join(5.0)
    kill_process_group(slot.proc.pid)  # e.g. ViZDoom games of a worker killed mid-episode
    with contextlib.suppress(OSError):
        slot.conn.close()


# ---------------------------------------------------------------------------------------------
# Ray


@dataclass(frozen=True)
class JobRecord:
    """Where one job of the last ``map`` ran: the Ray node (its id, as ``ray.nodes()``
    gives it) and the actor's pid."""

    job: int
    node_id: str
    pid: int


class _RayWorker:
    """The body of a Ray actor: the runner built once, jobs run on request."""

    def __init__(self, workload: Workload, threads: int) -> None:
        import ray

        torch.set_num_threads(max(1, threads))
        self.where = (ray.get_runtime_context().get_node_id(), os.getpid())
        self.runner = workload.build()

    def pid(self) -> int:
        return os.getpid()

    def run(self, *job: Any) -> tuple[str, int, Any]:
        """(node id, pid, result): the result says where it was computed."""
        return (*self.where, _result(self.runner.run(*job)))


class RayEngine:
    def __init__(self, workload: Workload, workers: int, timeout: float, address: str = "",
                 threads: int = 1, max_attempts: int = 3) -> None:
        self.ray = import_ray()
        self.workload, self.timeout, self.threads = workload, timeout, threads
        self.max_attempts = max_attempts
        self.retries = 0
        self.last_jobs: list[JobRecord] = []  # where the last map's jobs ran
        self.own_ray = not self.ray.is_initialized()
        if self.own_ray:
            connect(address, workers)
        self.actor_class = self.ray.remote(num_cpus=1, max_restarts=0)(_RayWorker)
        self.actors = [self._start() for _ in range(max(1, workers))]

    def _start(self) -> Any:
        return self.actor_class.remote(self.workload, self.threads)

    def worker_pids(self) -> list[int]:
        return self.ray.get([actor.pid.remote() for actor in self.actors])

    def wait_ready(self) -> None:
        self.worker_pids()

    def map(self, jobs: Sequence[Job]) -> list[np.ndarray]:
        ray = self.ray
        results: dict[int, np.ndarray] = {}
        pending = deque(range(len(jobs)))
        attempts = [0] * len(jobs)
        running: dict[Any, tuple[int, int, float]] = {}  # ref -> (actor index, job, started)
        records: dict[int, JobRecord] = {}
        while len(results) < len(jobs):
            busy = {index for index, _, _ in running.values()}
            for index in range(len(self.actors)):
                if index not in busy and pending:
                    job_id = pending.popleft()
                    ref = self.actors[index].run.remote(*jobs[job_id])
                    running[ref] = (index, job_id, time.monotonic())
            ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                index, job_id, _ = running.pop(ref)
                try:
                    node_id, pid, results[job_id] = ray.get(ref)
                    records[job_id] = JobRecord(job_id, node_id, pid)
                except ray.exceptions.RayActorError as exc:
                    self._retry(index, job_id, pending, attempts, f"its actor died ({exc})")
                except ray.exceptions.RayTaskError as exc:
                    attempts[job_id] += 1
                    if attempts[job_id] >= self.max_attempts:
                        raise WmlabError(f"rollout job {job_id} failed {attempts[job_id]} "
                                         f"times; last error: {exc}") from None
                    pending.appendleft(job_id)
            now = time.monotonic()
            for ref, (index, job_id, started) in list(running.items()):
                if now - started > self.timeout:
                    running.pop(ref)
                    ray.kill(self.actors[index], no_restart=True)
                    self._retry(index, job_id, pending, attempts,
                                f"silent for more than es.timeout = {self.timeout:g} s")
        self.last_jobs = [records[i] for i in range(len(jobs))]
        return [results[i] for i in range(len(jobs))]

    def _retry(self, index: int, job_id: int, pending: deque, attempts: list[int],
               why: str) -> None:
        warn(f"Ray evaluator actor {index} lost ({why}); retrying job {job_id} elsewhere")
        attempts[job_id] += 1
        self.retries += 1
        if attempts[job_id] >= self.max_attempts:
            raise WmlabError(f"rollout job {job_id} was lost {attempts[job_id]} times (last: "
                             f"{why}); check the cluster and es.timeout")
        pending.appendleft(job_id)
        self.actors[index] = self._start()

    def close(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor, no_restart=True)
        self.actors = []
        if self.own_ray:
            self.ray.shutdown()


# ---------------------------------------------------------------------------------------------
# The interface


class Evaluator(Closing):
    """Rollout returns for (params, seeds) on any engine; ``evaluate`` is the ES fitness."""

    def __init__(self, workload: Workload, engine: str = "process", workers: int = 0,
                 timeout: float = 600.0, members_per_job: int = 8, ray_address: str = "",
                 max_attempts: int = 3) -> None:
        if engine not in ENGINES:
            raise WmlabError(f"es.engine '{engine}' is not one of {', '.join(ENGINES)}")
        workers = workers or (os.cpu_count() or 1)
        self.members_per_job = members_per_job
        # (P, R) env or dream steps of the last run, where the runner counts them
        self.last_steps: np.ndarray | None = None
        if engine == "serial":
            self.engine: Any = SerialEngine(workload, threads=1)
        elif engine == "process":
            self.engine = ProcessEngine(workload, workers, timeout, max_attempts=max_attempts)
        else:
            self.engine = RayEngine(workload, workers, timeout, ray_address,
                                    max_attempts=max_attempts)

    @classmethod
    def of_config(cls, workload: Workload, es: Any, members_per_job: int | None = None
                  ) -> Evaluator:
        """The engine a run's ``es`` settings name (es.engine, workers, timeout, Ray address),
        jobs of ``members_per_job`` members (default es.job_members)."""
        return cls(workload, es.engine, es.workers, es.timeout,
                   es.job_members if members_per_job is None else members_per_job,
                   es.ray_address)

    @property
    def retries(self) -> int:
        return self.engine.retries

    def worker_pids(self) -> list[int]:
        return self.engine.worker_pids()

    @property
    def job_records(self) -> list[JobRecord]:
        """Where each job of the last run ran (Ray: node id and pid; other engines: none)."""
        return list(getattr(self.engine, "last_jobs", []))

    def wait_ready(self) -> None:
        if hasattr(self.engine, "wait_ready"):
            self.engine.wait_ready()

    def run(self, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """params (P, n), seeds (P, R) -> every rollout's return (P, R)."""
        params = np.asarray(params, dtype=np.float32)
        seeds = np.asarray(seeds, dtype=np.int64)
        if params.ndim != 2 or seeds.ndim != 2 or len(params) != len(seeds):
            raise WmlabError(f"evaluator needs params (P, n) and seeds (P, R), got "
                             f"{params.shape} and {seeds.shape}")
        outputs = self.engine.map(split_jobs(params, seeds, self.members_per_job))
        if outputs and all(isinstance(out, Rollouts) for out in outputs):
            self.last_steps = np.concatenate([out.steps for out in outputs], axis=0)
            return np.concatenate([out.returns for out in outputs], axis=0)
        self.last_steps = None
        return np.concatenate(outputs, axis=0) if outputs else np.zeros(seeds.shape)

    def evaluate(self, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """Fitness of each member: the mean return over its rollouts, (P,)."""
        return self.run(params, seeds).mean(axis=1)

    def close(self) -> None:
        self.engine.close()
