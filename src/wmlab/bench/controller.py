"""C's throughput: the full agent in real envs, the dream for a whole generation, engines.

Every model is randomly initialised at the paper's size (CarRacing: V z=32, M 256 units;
Doom: V z=64, M 512 units with restart input and done head), so the figures are about
compute, not about what a trained agent does. Cases:

- full agent (V encode + C + M step + env step) on CarRacing/EnvPool, the envs of a job
  batched through V, M and C, against one env at a time (batch 1: what the PyTorch
  reference did, ~270 steps/s in SPEC section 8);
- a Doom dream generation through the process pool (2 workers), float32 and bfloat16
  matmuls (``dream.precision``), and bfloat16 with an ensemble of 3 Ms (``mdrnn.ensemble``):
  the whole population's rollouts batched per job; the paper-size case (64 x 16 = 1,024
  rollouts, up to 2,100 steps) runs in the full benchmark only. M's done logit is biased
  negative so every dream runs to the cap: the worst case, about twice the steps of the
  paper's dreams (mean ~900-1,100 at tau 1.15);
- one job's dream with lengths spread as a trained population's are, stepping only the
  running dreams (what C trains with) against stepping every row to the last end;
- the same small generation through Ray actors and through the local pool, after warm-up:
  Ray's per-generation overhead.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np
import torch

from wmlab.checkpoint import save_checkpoint


def _save_memory(folder: str, model: Any) -> None:
    """M's final weights and shape where ``load_mdrnn`` looks."""
    from wmlab.memory.model import FINAL_WEIGHTS

    save_checkpoint(folder, FINAL_WEIGHTS, 1, model.state_dict(), None,
                    {"shape": dict(model.shape.__dict__)})


def _save_models(folder: str, env: str, seed: int = 0) -> tuple[str, str]:
    """Random paper-size V and M (and first-frame latents) saved where loaders look."""
    from wmlab.memory.model import INITIAL_Z, MDNRNN, MdrnnShape
    from wmlab.vision.model import FINAL_WEIGHTS as V_WEIGHTS
    from wmlab.vision.model import ConvVAE

    torch.manual_seed(seed)
    doom = env == "doom"
    z_dim = 64 if doom else 32
    shape = MdrnnShape(z_dim=z_dim, action_dim=1 if doom else 3, hidden=512 if doom else 256,
                       gaussians=5, done_head=doom, restart_input=doom)
    vision, memory = f"{folder}/vision", f"{folder}/memory"
    save_checkpoint(vision, V_WEIGHTS, 1, ConvVAE(z_dim).state_dict(), None,
                    {"z_dim": z_dim, "kind": "vae"})
    model = MDNRNN(shape)
    if doom:
        with torch.no_grad():  # a done logit that fires now and then, like a trained M's
            model.head.bias[-1] = -2.0
    _save_memory(memory, model)
    gen = torch.Generator().manual_seed(seed)
    save_checkpoint(memory, INITIAL_Z, 100, {"mu": torch.randn(100, z_dim, generator=gen),
                                             "logvar": torch.full((100, z_dim), -2.0)},
                    None, {"episodes": 100})
    return vision, memory


def _save_members(memory: str, count: int) -> tuple[str, ...]:
    """``count`` more random Ms of the same shape as the one in ``memory``: an ensemble."""
    from wmlab.memory.model import MDNRNN, load_mdrnn
    from wmlab.runs import ensemble_member

    first, _ = load_mdrnn(memory)
    folders = tuple(ensemble_member(memory, k) for k in range(1, count + 1))
    for k, folder in enumerate(folders, start=1):
        torch.manual_seed(k)
        model = MDNRNN(first.shape)
        with torch.no_grad():
            model.head.bias[-1] = first.head.bias[-1]  # the same hazard as the first M's
        _save_memory(folder, model)
    return folders


def _workload(folder: str, env: str, kind: str, max_steps: int, backend: str | None = None,
              precision: str = "float32", ensemble: int = 1):
    from wmlab.agent import RolloutWorkload
    from wmlab.dream import DreamSettings

    vision, memory = _save_models(folder, env)
    others = _save_members(memory, ensemble - 1) if ensemble > 1 else ()
    doom = env == "doom"
    dream = DreamSettings(tau=1.15, max_steps=max_steps, precision=precision) \
        if kind == "dream" else None
    return RolloutWorkload(kind=kind, vision_folder=vision, memory_folder=memory, env=env,
                           backend=backend, features="zch" if doom else "zh", bias=not doom,
                           max_steps=0 if dream else max_steps, dream=dream,
                           ensemble=others)


class CountingBatch:
    """An env batch that counts the env steps taken (running envs only)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.steps = inner, 0
        self.num_envs, self.spec, self.backend = inner.num_envs, inner.spec, inner.backend

    @property
    def masks(self):
        return self.inner.masks

    @property
    def running(self):
        return self.inner.running

    def reset(self, seeds):
        return self.inner.reset(seeds)

    def step(self, actions):
        self.steps += int(self.inner.running.sum())
        return self.inner.step(actions)

    def end(self, ids):
        self.inner.end(ids)


class RecordingBatch(CountingBatch):
    """A counting env batch that also keeps every episode's seeds and the actions of each
    of its steps, to replay them on the bare env."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.episodes: list[tuple[list[int], list[np.ndarray]]] = []

    def reset(self, seeds):
        self.episodes.append(([int(s) for s in seeds], []))
        return super().reset(seeds)

    def step(self, actions):
        self.episodes[-1][1].append(np.array(actions, dtype=np.float32))
        return super().step(actions)


def replay(batch: Any, episodes: list[tuple[list[int], list[np.ndarray]]]) -> None:
    """Step ``batch`` through recorded episodes: each reset with its seeds, then its actions
    while any env runs (the same trajectories: an EnvPool episode depends on its seed and its
    actions alone)."""
    for seeds, actions in episodes:
        batch.reset(seeds)
        for step in actions:
            if not batch.inner.running.any():
                break
            batch.step(step)


def _params(num_params: int, members: int, scale: float = 0.1) -> np.ndarray:
    return np.random.default_rng(0).normal(0, scale, (members, num_params)).astype(np.float32)


def _real_agent_rows(quick: bool, folder: str) -> list[dict[str, Any]]:
    from wmlab.agent import run_real
    from wmlab.envs import make_batch

    torch.set_num_threads(1)
    steps = 100 if quick else 300
    envs = 16
    workload = _workload(folder, "carracing", "real", steps, "envpool")
    models = workload.load()
    params = _params(models.shape.num_params, 1)
    seeds = np.arange(envs)[None]
    rows = []

    batch = CountingBatch(make_batch("carracing", envs, "envpool", max_steps=steps))
    began = time.perf_counter()
    run_real(models, batch, params, seeds)
    seconds = time.perf_counter() - began
    rows.append({"case": f"full agent, CarRacing envpool, {envs} envs batched (1 core)",
                 "steps": batch.steps, "seconds": seconds, "per_second": batch.steps / seconds})
    single = CountingBatch(make_batch("carracing", 1, "envpool", max_steps=steps))
    count = 2 if quick else 4
    began = time.perf_counter()
    for i in range(count):
        run_real(models, single, params, seeds[:, i:i + 1])
    seconds = time.perf_counter() - began
    rows.append({"case": "full agent, CarRacing envpool, one env at a time (1 core)",
                 "steps": single.steps, "seconds": seconds,
                 "per_second": single.steps / seconds})
    per_core = rows[0]["per_second"]
    gen_steps = 64 * 16 * 1000
    rows.append({"case": "CarRacing paper generation 64x16x1000 on 2 cores (estimated from "
                 "the batched rate)", "steps": gen_steps, "seconds": gen_steps / (2 * per_core),
                 "per_second": 2 * per_core})
    return rows


# ---------------------------------------------------------------------------------------------
# Real rollouts against EnvPool's own rate, side by side on the same cores


def _stepping_rate(kind: str, folder: str, envs: int, cap: int, seconds: float,
                   encoder: str, repeat: int = 1) -> tuple[int, float]:
    """One worker (one core): env steps taken in about ``seconds`` and the time they took,
    stepping ``envs`` EnvPool envs with random actions (``kind='random'``) or with the full
    agent (V bf16 where native, M, C; V's ``encoder`` "plain", "packed" or "int8"; each
    action held for ``repeat`` env steps, all of them counted), episode after episode, as a
    C stage's worker does."""
    import dataclasses

    from wmlab.agent import run_real
    from wmlab.envs import get_spec, make_batch
    from wmlab.envs.repeat import RepeatedBatch

    torch.set_num_threads(1)
    spec = get_spec("carracing")
    rng = np.random.default_rng(0)
    if kind == "raw":
        return _raw_envpool_rate(spec, envs, cap, seconds, rng)
    counted = CountingBatch(make_batch("carracing", envs, "envpool", max_steps=cap))
    batch = RepeatedBatch(counted, repeat) if repeat > 1 else counted
    models = params = None
    if kind == "agent":
        workload = dataclasses.replace(_workload(folder, "carracing", "real", cap, "envpool"),
                                       vae_bf16=True, packed_encoder=encoder == "packed",
                                       int8_encoder=encoder == "int8", action_repeat=repeat)
        models = workload.load()
        params = _params(models.shape.num_params, envs)
    episode, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        seeds = np.arange(episode * envs, (episode + 1) * envs)
        if models is not None:
            run_real(models, batch, params, seeds[:, None])
        else:
            batch.reset(seeds.tolist())
            while batch.running.any():
                batch.step(spec.to_env_action(rng.uniform(-1, 1, (envs, 3)).astype(np.float32)))
        episode += 1
    return counted.steps, time.perf_counter() - began


def _raw_envpool_rate(spec: Any, envs: int, cap: int, seconds: float,
                      rng: np.random.Generator) -> tuple[int, float]:
    """EnvPool's own rate, as its users see it: ``envpool.make`` and ``step`` with random
    actions, its 96x96 frames as they come (no crop, no resize, no wmlab batch around it),
    its envs resetting themselves."""
    from wmlab.envs.batch import import_envpool

    pool = import_envpool().make(spec.gym_id, env_type="gymnasium", num_envs=envs,
                                 batch_size=envs, num_threads=1, max_episode_steps=cap,
                                 seed=0)
    pool.reset()
    steps, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        pool.step(spec.to_env_action(rng.uniform(-1, 1, (envs, 3)).astype(np.float32)))
        steps += envs
    took = time.perf_counter() - began
    pool.close()
    return steps, took


def _shipped_rate(workload: Any, params: np.ndarray, envs: int, cap: int, seconds: float
                  ) -> tuple[int, float, list]:
    """One worker: the shipped agent driving ``envs`` EnvPool envs for about ``seconds``
    (episode after episode, as a C stage's worker); its env steps, their time and the
    episodes' seeds and actions."""
    from wmlab.agent import run_real
    from wmlab.envs import make_batch

    torch.set_num_threads(1)
    models = workload.load()
    batch = RecordingBatch(make_batch("carracing", envs, "envpool", max_steps=cap))
    rows = np.repeat(params[None].astype(np.float32), envs, axis=0)
    episode, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        seeds = np.arange(episode * envs, (episode + 1) * envs) + 7_000_000
        run_real(models, batch, rows, seeds[:, None])
        episode += 1
    return batch.steps, time.perf_counter() - began, batch.episodes


def _replay_rate(envs: int, cap: int, episodes: list) -> tuple[int, float, list]:
    """One worker: EnvPool alone, stepping the recorded episodes with their own actions."""
    from wmlab.envs import make_batch

    batch = CountingBatch(make_batch("carracing", envs, "envpool", max_steps=cap))
    began = time.perf_counter()
    replay(batch, episodes)
    return batch.steps, time.perf_counter() - began, []


def _job(args: tuple) -> tuple:
    kind, *rest = args
    if kind == "shipped":
        return _shipped_rate(*rest)
    return _replay_rate(*rest) if kind == "replay" else _stepping_rate(*rest)


def _pooled(ctx: Any, workers: int, jobs: list) -> list:
    """``jobs`` run side by side, one worker process each (fresh processes every time)."""
    with ctx.Pool(workers) as pool:
        return pool.map(_job, jobs)


def _rate(out: list) -> float:
    """Env steps a second of workers that ran side by side: their steps over the longest."""
    return sum(o[0] for o in out) / max(o[1] for o in out)


def _ratios(outs: list[list], against: list[list]) -> list[float]:
    """Each round's rate over the same round's rate of the case it is compared with."""
    return [_rate(out) / _rate(ref) for out, ref in zip(outs, against, strict=True)]


def _ratio_text(ratios: list[float], against: str) -> str:
    """The median of per-round ratios, and their range when there were several rounds."""
    median = float(np.median(ratios))
    if len(ratios) == 1:
        return f"{median:.2f}x {against}"
    return (f"{median:.2f}x {against} (median of {len(ratios)} rounds, "
            f"{min(ratios):.2f}-{max(ratios):.2f})")


def _summed(outs: list[list]) -> dict[str, float]:
    """One row's figures from its rounds: all steps, the time they took, steps a second."""
    steps = sum(sum(o[0] for o in out) for out in outs)
    took = sum(max(o[1] for o in out) for out in outs)
    return {"steps": steps, "seconds": took, "per_second": steps / took}


def _shipped_side_by_side_rows(quick: bool, folder: str, rounds: int
                               ) -> list[dict[str, Any]]:
    """The shipped CarRacing agent (trained V, M and C: a car that drives the track) as C's
    real rollouts run, 2 workers x 8 envs, against EnvPool alone replaying the very same
    episodes (seeds and actions): the agent's own share of a rollout, where random actions
    (a car that hardly moves) make the env itself cheaper than a driving car's. Each round
    measures EnvPool's own rate, then each encoder's drive and its replay, so every ratio
    compares minutes next to each other (a shared host's own rate drifts by ~15% a minute)."""
    import dataclasses
    import multiprocessing as mp

    from wmlab.agent import workload_from_config
    from wmlab.controller.cmaes import load_controller_params
    from wmlab.runs import RunLayout
    from wmlab.shipped import agent_config, available

    if "carracing" not in available():
        return [{"case": "shipped CarRacing agent: not installed", "steps": 0,
                 "seconds": 0.0, "per_second": 0.0}]
    workers, envs = 2, 8
    cap, seconds = (200, 20.0) if quick else (1000, 60.0)
    share = seconds / rounds
    cfg = agent_config("carracing", folder)
    shipped = workload_from_config(cfg, "real", "envpool")
    params, _ = load_controller_params(RunLayout.of(cfg).controller)
    encoders = ((shipped, "its V's encoder packed"),
                (dataclasses.replace(shipped, int8_encoder=True),
                 "its V's encoder in int8 (controller.int8_encoder)"))
    ctx = mp.get_context("spawn")
    raw: list[list] = []
    same = True
    driven: list[list[list]] = [[] for _ in encoders]
    replayed: list[list[list]] = [[] for _ in encoders]
    for _ in range(rounds):
        raw.append(_pooled(ctx, workers, [("rate", "raw", f"{folder}/raw-{w}", envs, cap,
                                           share, "plain") for w in range(workers)]))
        for k, (workload, _how) in enumerate(encoders):
            drive = _pooled(ctx, workers, [("shipped", workload, params, envs, cap, share)] *
                            workers)
            # each agent's own episodes replayed: int8 drives slightly other laps than float
            replay = _pooled(ctx, workers, [("replay", envs, cap, out[2]) for out in drive])
            same &= [o[0] for o in drive] == [o[0] for o in replay]
            driven[k].append(drive)
            replayed[k].append(replay)
    rows = [{"case": f"CarRacing envpool, {workers} workers x {envs} envs: EnvPool's own rate "
                     "(envpool.make, random actions), measured in each round",
             **_summed(raw)}]
    for k, (_workload, how) in enumerate(encoders):
        to_replay = _ratios(driven[k], replayed[k])
        to_raw = _ratios(driven[k], raw)
        against_raw = _ratio_text(to_raw, "EnvPool's own rate (random actions)")
        rows += [
            {"case": f"CarRacing envpool, {workers} workers x {envs} envs: EnvPool alone "
                     f"replaying the episodes of the shipped agent, {how}"
                     + ("" if same else " (steps differ!)"),
             **_summed(replayed[k])},
            {"case": f"CarRacing envpool, {workers} workers x {envs} envs: the shipped agent "
                     f"driving, {how} = {_ratio_text(to_replay, 'EnvPool on its actions')}, "
                     f"{against_raw}",
             **_summed(driven[k])}]
    return rows


def _side_by_side_rows(quick: bool, folder: str, rounds: int) -> list[dict[str, Any]]:
    """EnvPool alone with random actions (as it comes, and with our frames) against C's real
    rollouts, all as 2 worker processes x 8 envs (EnvPool's best layout on 2 cores), each for
    the same time, the cases in turn within each of ``rounds`` rounds: a ratio is the median
    of its rounds', each against EnvPool's rate of the same round."""
    import multiprocessing as mp

    workers, envs = 2, 8
    cap, seconds = (200, 20.0) if quick else (1000, 60.0)
    cases = [("raw", "plain", 1, "EnvPool's own rate (envpool.make, random actions, 96x96)"),
             ("random", "plain", 1, "EnvPool alone, random actions, our 64x64 frames"),
             ("agent", "plain", 1,
              "full agent (V's convolutions in bf16 where native + M + C)"),
             ("agent", "packed", 1,
              "full agent, V's encoder packed (controller.packed_encoder)"),
             ("agent", "int8", 1, "full agent, V's encoder in int8 (controller.int8_encoder)"),
             ("agent", "int8", 2, "full agent, V's encoder in int8, each action held 2 env "
              "steps (env.action_repeat=2; every env step counted)")]
    ctx = mp.get_context("spawn")
    outs: list[list[list]] = [[] for _ in cases]
    for r in range(rounds):
        for k, (kind, encoder, repeat, _what) in enumerate(cases):
            jobs = [("rate", kind, f"{folder}/{kind}-{encoder}-{repeat}-{r}-{w}", envs, cap,
                     seconds / rounds, encoder, repeat) for w in range(workers)]
            outs[k].append(_pooled(ctx, workers, jobs))
    rows = []
    for k, (_kind, _encoder, _repeat, what) in enumerate(cases):
        case = f"CarRacing envpool, {workers} workers x {envs} envs: {what}"
        if k:
            case += " = " + _ratio_text(_ratios(outs[k], outs[0]), "EnvPool's own rate")
        if k > 1:
            case += ", " + _ratio_text(_ratios(outs[k], outs[1]), "with our frames")
        rows.append({"case": case, **_summed(outs[k])})
    return rows


def _dream_generation(workload, engine: str, members: int, rollouts: int, workers: int = 2,
                      warm: bool = True) -> dict[str, Any]:
    from wmlab.evaluators import Evaluator

    models = workload.load()
    params = _params(models.shape.num_params, members)
    seeds = np.arange(members * rollouts).reshape(members, rollouts)
    with Evaluator(workload, engine, workers=workers, timeout=3600, members_per_job=8) as ev:
        if warm:
            ev.wait_ready()
        began = time.perf_counter()
        returns = ev.run(params, seeds)
        seconds = time.perf_counter() - began
    steps = float(returns.sum())  # +1 per dream step: the return is the dream's length
    return {"steps": steps, "seconds": seconds, "per_second": steps / seconds}


def _dream_rows(quick: bool, folder: str) -> list[dict[str, Any]]:
    rows = []
    steps = 300 if quick else 2100
    members, rollouts = (16, 4) if quick else (64, 16)
    for precision, ensemble in (("float32", 1), ("bfloat16", 1), ("bfloat16", 3)):
        workload = _workload(f"{folder}/{precision}-{ensemble}", "doom", "dream", steps,
                             precision=precision, ensemble=ensemble)
        out = _dream_generation(workload, "process", members, rollouts)
        ms = "" if ensemble == 1 else f", an ensemble of {ensemble} Ms (mdrnn.ensemble)"
        rows.append({"case": f"Doom dream generation {members}x{rollouts} (cap {steps}), "
                     f"process pool, 2 workers, {precision}{ms}", **out})
    return rows


def _compaction_rows(quick: bool, folder: str) -> list[dict[str, Any]]:
    """One job's dream, stepping only the running dreams against stepping every row.

    M's death is drawn (dream.done "sample") with a hazard of about 2.5 / cap per step, so
    the lengths spread from a few steps to the cap, as a trained population's do.
    """
    import dataclasses
    import math

    from wmlab.agent import run_dream

    torch.set_num_threads(2)
    steps = 600 if quick else 2100
    members, rollouts = (16, 4) if quick else (32, 8)
    workload = _workload(folder, "doom", "dream", steps)
    # the bench M's done logit sits near -2 (see _save_models): move it to log(2.5 / cap)
    workload = dataclasses.replace(workload, dream=dataclasses.replace(
        workload.dream, max_steps=steps, done_mode="sample",
        done_bias=math.log(2.5 / steps) + 2.0))
    models = workload.load()
    params = _params(models.shape.num_params, members)
    seeds = np.arange(members * rollouts).reshape(members, rollouts)
    rows = []
    for compact in (True, False):
        began = time.perf_counter()
        returns = run_dream(models, params, seeds, workload.dream, compact=compact)
        seconds = time.perf_counter() - began
        way = "running dreams only" if compact else "every row to the last end (naive)"
        total = float(returns.sum())
        rows.append({"case": f"Doom dream {members}x{rollouts} (cap {steps}, lengths "
                     f"{returns.mean():.0f} +- {returns.std():.0f}), 2 threads, {way}",
                     "steps": total, "seconds": seconds, "per_second": total / seconds})
    return rows


def _ray_rows(quick: bool, folder: str) -> list[dict[str, Any]]:
    try:
        import ray  # noqa: F401
    except ImportError:
        return [{"case": "Ray overhead: ray not installed", "steps": 0, "seconds": 0.0,
                 "per_second": 0.0}]
    workload = _workload(folder, "doom", "dream", 100)
    rows = []
    for engine in ("process", "ray"):
        out = _dream_generation(workload, engine, 16, 4)
        rows.append({"case": f"Doom dream generation 16x4 (cap 100), {engine}, 2 workers",
                     **out})
    rows.append({"case": "Ray overhead per generation (ray - process)", "steps": 0,
                 "seconds": rows[1]["seconds"] - rows[0]["seconds"], "per_second": 0.0})
    return rows


def run(quick: bool = True) -> list[dict[str, Any]]:
    rounds = 1 if quick else 3  # the side-by-side cases in turn, so ratios pair minutes
    with tempfile.TemporaryDirectory() as folder:
        rows = _side_by_side_rows(quick, f"{folder}/side", rounds)
        rows += _shipped_side_by_side_rows(quick, f"{folder}/shipped", rounds)
        rows += _real_agent_rows(quick, f"{folder}/car")
        rows += _dream_rows(quick, f"{folder}/doom")
        rows += _compaction_rows(quick, f"{folder}/compact")
        rows += _ray_rows(quick, f"{folder}/ray")
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'case':<92} {'steps':>10} {'seconds':>9} {'steps/s':>10}"]
    for row in rows:
        rate = f"{row['per_second']:10.0f}" if row["per_second"] else f"{'':>10}"
        lines.append(f"{row['case']:<92} {row['steps']:>10.0f} {row['seconds']:>9.2f} {rate}")
    return "\n".join(lines)
