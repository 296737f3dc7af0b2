"""The reported evaluation: a controller with its V and M over N episodes (100 by default).

Seeds are fixed and recorded (``eval.seed``, ``eval.seed + 1``, ...), the backend is the
env's reference backend unless ``eval.backend`` says otherwise (EnvPool's CarRacing is a
port whose tracks differ), and the result is mean +- std with every episode's return in a
JSON file. ``video`` writes a GIF of the first episode: the real frame beside the agent's
view (V's reconstruction of the z that C and M see).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from wmlab.config import Config
from wmlab.errors import WmlabError
from wmlab.fsio import atomic_write_bytes, exists
from wmlab.plots import gif_bytes
from wmlab.runs import RunLayout

# Episodes one evaluator row runs as a batch (one job). Rows of 25 split the 50 or 100
# episodes of an evaluation evenly over 2 or 4 workers; rows of 10 put 3 of Doom's 5 rows
# on one of 2 workers (docs/benchmarks.md: evaluation).
EPISODES_PER_ROW = 25
# A policy that does not look runs every row in this process: rows of 10 there, since 25
# games at once took longer to start than they saved (5.2 s against 9.1 s for 50 episodes).
POLICY_EPISODES_PER_ROW = 10
# Dreams batch far better than real envs (one M step for 64 dreams costs little more than
# for 8): 256 scored dreams at Doom size took 34 s in rows of 64, 130 s in rows of 8
# (2 shared cores, same returns to the last bit).
DREAM_EPISODES_PER_ROW = 64
# the evaluation of the validation seeds: <run>/eval/validation-<backend>.json
VALIDATION = "validation"


@dataclass
class EvalResult:
    env: str
    backend: str
    where: str  # real or dream
    episodes: int
    mean: float
    std: float
    seeds: list[int]
    returns: list[float]
    controller: str
    controller_fingerprint: str
    tau: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        where = f"{self.env} ({self.backend})" if self.where == "real" else \
            f"{self.env} dream (tau {self.tau})"
        return (f"{where}: {self.mean:.1f} +- {self.std:.1f} over {self.episodes} episodes "
                f"(seeds {self.seeds[0]}..{self.seeds[-1]})")


def episode_rows(first_seed: int, episodes: int, max_per_row: int = EPISODES_PER_ROW
                 ) -> np.ndarray:
    """Seeds first_seed .. first_seed + N - 1 as equal rows (one batch of envs each)."""
    per_row = max(d for d in range(1, max_per_row + 1) if episodes % d == 0)
    return (first_seed + np.arange(episodes, dtype=np.int64)).reshape(-1, per_row)


def _episodes(cfg: Config, episodes: int | None) -> int:
    episodes = cfg.eval.episodes if episodes is None else episodes
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes <= 0:
        raise WmlabError(f"episodes must be a positive integer, got {episodes!r} (the "
                         "reported protocol uses 100)")
    return episodes


def scored_env(cfg: Config, backend: str | None = None) -> tuple[Any, str]:
    """The env's spec and the backend reported scores come from (the reference one unless
    ``backend`` or eval.backend says otherwise)."""
    from wmlab.envs import get_spec

    spec = get_spec(cfg.env.name)
    backend = backend or cfg.eval.backend or spec.reference_backend or spec.default_backend
    spec.check_backend(backend)
    return spec, backend


def evaluate_controller(cfg: Config, *, episodes: int | None = None, where: str = "real",
                        out: str | None = None, video: str | None = None,
                        controller_folder: str | None = None,
                        backend: str | None = None, reuse: bool = False,
                        first_seed: int | None = None) -> EvalResult:
    """Score the run's controller (its best scored mean) and write the JSON (and GIF).

    ``backend`` scores on another backend than the reported one (the backend transfer:
    the training backend, on the same seeds; ``first_seed``, other seeds than eval.seed on:
    the validation's). ``reuse`` returns the JSON already written
    where this one would go when it scored the same controller on the same episodes (the
    evaluate stage, resumed after a kill, keeps what its last attempt finished)."""
    from wmlab.agent import workload_from_config
    from wmlab.controller.cmaes import load_controller_params
    from wmlab.controller.model import check_shape
    from wmlab.evaluators import Evaluator

    episodes = _episodes(cfg, episodes)
    if where not in ("real", "dream"):
        raise WmlabError(f"evaluate where must be real or dream, got {where!r}")
    if video and where != "real":
        raise WmlabError("--video records a real episode: drop --dream or --video")
    spec, backend = scored_env(cfg, backend)
    workload = workload_from_config(cfg, where, backend)
    models = workload.load()
    params, info = load_controller_params(controller_folder or RunLayout.of(cfg).controller)
    check_shape(info, models.shape, cfg.controller.inputs, info["source"])
    seeds = episode_rows(cfg.eval.seed if first_seed is None else first_seed, episodes,
                         DREAM_EPISODES_PER_ROW if where == "dream" else EPISODES_PER_ROW)
    suffix = "dream" if where == "dream" else backend
    path = out or RunLayout.of(cfg).scores("eval", suffix)
    if reuse:
        saved = saved_result(path, env=spec.name, backend=backend, where=where,
                             seeds=[int(s) for s in seeds.ravel()],
                             controller_fingerprint=str(info.get("fingerprint", "")),
                             tau=cfg.dream.tau if where == "dream" else None)
        if saved is not None and saved.extra.get("max_steps") == (cfg.env.max_steps
                                                                   or spec.max_steps) \
                and saved.extra.get("shield") == _shield_record(workload) \
                and _same_repeat(saved, cfg):
            if video and not exists(video):  # killed between the JSON and the GIF
                atomic_write_bytes(video, record_video(models, workload, params,
                                                       saved.seeds[0]))
            return saved
    rows = np.repeat(params[None].astype(np.float32), len(seeds), axis=0)
    # One row (<= 10 episodes, one env batch; <= 64 dreams) per job: jobs spread evenly over
    # the workers, and the cut is the same on every engine.
    with Evaluator.of_config(workload, cfg.es, members_per_job=1) as evaluator:
        returns = evaluator.run(rows, seeds).ravel()
        lengths = evaluator.last_steps
    # each episode's steps: how it ended (CarRacing: a lap finished before the cap, or not)
    length_extra = {} if lengths is None else {"lengths": [int(n) for n in lengths.ravel()]}
    result = EvalResult(env=spec.name, backend=backend, where=where, episodes=episodes,
                        mean=float(returns.mean()), std=float(returns.std()),
                        seeds=[int(s) for s in seeds.ravel()],
                        returns=[float(r) for r in returns], controller=info["source"],
                        controller_fingerprint=str(info.get("fingerprint", "")),
                        tau=cfg.dream.tau if where == "dream" else None,
                        extra={"generation": info.get("generation"),
                               "max_steps": cfg.env.max_steps or spec.max_steps,
                               "shield": _shield_record(workload), **length_extra,
                               **_repeat_record(cfg)})
    gif = record_video(models, workload, params, int(seeds.ravel()[0])) if video else None
    atomic_write_bytes(path, json.dumps(asdict(result), indent=2).encode())
    if gif is not None:
        atomic_write_bytes(video, gif)
    return result


def validate_controller(cfg: Config, *, reuse: bool = False) -> EvalResult:
    """The run's controller on the validation seeds (eval.validation_episodes from
    eval.validation_seed), as the evaluation scores it (the same backend and shield)."""
    if not cfg.eval.validation_episodes:
        raise WmlabError("no validation episodes: set eval.validation_episodes (e.g. 100)")
    _, backend = scored_env(cfg)
    return evaluate_controller(cfg, episodes=cfg.eval.validation_episodes,
                               first_seed=cfg.eval.validation_seed, backend=backend,
                               out=RunLayout.of(cfg).scores(VALIDATION, backend), reuse=reuse)


@dataclass(frozen=True)
class IterationChoice:
    """The iteration a run names as its agent: the best validation mean among those scored
    on the same validation episodes (the evaluation seeds play no part)."""

    iteration: int
    means: dict[int, float]  # validation mean of each candidate iteration
    episodes: int
    first_seed: int

    def line(self) -> str:
        scored = ", ".join(f"iteration {k} {m:.1f}" for k, m in sorted(self.means.items()))
        return (f"the run's agent: iteration {self.iteration}, the best validation mean over "
                f"{self.episodes} episodes (seeds {self.first_seed}.."
                f"{self.first_seed + self.episodes - 1}): {scored}")


def choose_iteration(validations: dict[int, dict[str, Any]]) -> IterationChoice | None:
    """From each iteration's validation JSON (as written by ``validate_controller``): the
    iteration with the highest mean among those scored on the latest iteration's episodes
    (the first of equals: the earlier iteration); None where none has a validation."""
    if not validations:
        return None
    seeds = validations[max(validations)]["seeds"]
    means = {k: float(v["mean"]) for k, v in sorted(validations.items())
             if v["seeds"] == seeds}
    best = max(means, key=lambda k: (means[k], -k))
    return IterationChoice(iteration=best, means=means, episodes=len(seeds),
                           first_seed=int(seeds[0]))


def read_validations(run_dir: str, backend: str) -> dict[int, dict[str, Any]]:
    """The validation JSON of each iteration of the run at ``run_dir`` (iteration 1 is the
    run itself) that has one on ``backend``, by iteration number."""
    import fsspec

    base = RunLayout(run_dir.rstrip("/"))
    found: dict[int, dict[str, Any]] = {}
    k = 1
    while k == 1 or exists(base.iteration(k).root):
        path = base.iteration(k).scores(VALIDATION, backend)
        if exists(path):
            with fsspec.open(path, "r") as handle:
                found[k] = json.load(handle)
        k += 1
    return found


def _shield_record(workload: Any) -> dict[str, Any] | None:
    """The shield's settings as an evaluation records them (None: C acted alone), so that a
    score with the shield is never taken for one without it, or the reverse."""
    return None if workload.shield is None else asdict(workload.shield)


def _repeat_record(cfg: Config) -> dict[str, int]:
    """The action repeat as an evaluation records it: only where it is not 1, so the JSON
    of an agent that acts on every frame reads as before."""
    return {"action_repeat": cfg.env.action_repeat} if cfg.env.action_repeat != 1 else {}


def _same_repeat(saved: EvalResult, cfg: Config) -> bool:
    return saved.extra.get("action_repeat", 1) == cfg.env.action_repeat


def saved_result(path: str, **expected: Any) -> EvalResult | None:
    """The evaluation JSON at ``path`` if every field in ``expected`` has that value (the
    same env, backend, episodes, controller...), else None (missing, unreadable, or
    another evaluation)."""
    import fsspec

    try:
        with fsspec.open(path, "r") as handle:
            data = json.load(handle)
        result = EvalResult(**data)
    except (FileNotFoundError, ValueError, TypeError):
        return None
    seeds = expected.get("seeds")
    if seeds is not None and (result.episodes != len(seeds) or len(result.returns) != len(seeds)):
        return None
    return result if all(data.get(key) == value for key, value in expected.items()) else None


def training_backend(cfg: Config) -> str:
    """The backend C was trained on (env.backend, or the env's default)."""
    from wmlab.envs import get_spec

    return cfg.env.backend or get_spec(cfg.env.name).default_backend


def reported_backend(cfg: Config) -> str:
    """The backend the run's reported score comes from (eval.backend or the reference)."""
    return scored_env(cfg)[1]


def same_episodes(env: str, backend_a: str, backend_b: str) -> bool:
    """Whether two backends of ``env`` play the same episode from the same seed.

    Only a backend with itself, so far: EnvPool's CarRacing draws its tracks with its own
    generator. Measured on seeds 1000000..1000003, 7 and 42 (one step's reward reveals
    1000 / tiles): Gymnasium's tracks had 301, 310, 311, 306, 319 and 283 tiles, EnvPool's
    278, 298, 261, 271, 269 and 301 -- six different tracks for six seeds.
    """
    return backend_a == backend_b


@dataclass(frozen=True)
class BackendGap:
    """The same controller scored on its training backend and on the reference one."""

    train_backend: str
    reference_backend: str
    train_mean: float
    train_std: float
    reference_mean: float
    reference_std: float
    gap: float  # reference mean - training mean
    stderr: float  # standard error of the gap
    train_episodes: int
    reference_episodes: int
    paired: bool  # the same episodes on both backends (differences per seed)

    def line(self) -> str:
        counts = (str(self.train_episodes) if self.train_episodes == self.reference_episodes
                  else f"{self.train_episodes} and {self.reference_episodes}")
        how = ("paired over the same seeds: mean difference +- standard error" if self.paired
               else f"two different sets of {counts} episodes, since the backends draw "
                    "different tracks from a seed: difference of means +- its standard error")
        return (f"backend transfer: {self.train_backend} {self.train_mean:.1f} +- "
                f"{self.train_std:.1f}, {self.reference_backend} {self.reference_mean:.1f} +- "
                f"{self.reference_std:.1f}, gap {self.reference_backend} - "
                f"{self.train_backend} {self.gap:+.1f} +- {self.stderr:.1f} ({how})")


def backend_gap(train_returns: Any, reference_returns: Any, train_backend: str,
                reference_backend: str, paired: bool) -> BackendGap:
    """Reference mean minus training mean, with its standard error.

    ``paired`` (the same episodes on both backends, in the same order): the standard error
    of the per-episode differences. Otherwise the two sets of returns are independent
    samples and the standard error is sqrt(s_a^2 / n_a + s_b^2 / n_b) (sample variances).
    """
    a = np.asarray(train_returns, dtype=np.float64)
    b = np.asarray(reference_returns, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        raise WmlabError("the backend gap needs at least 2 episodes on each backend "
                         f"(got {a.size} and {b.size}): raise eval.episodes")
    if paired and a.shape != b.shape:
        raise WmlabError(f"paired returns must be as many on both backends, got {a.size} "
                         f"and {b.size}")
    if paired:
        diff = b - a
        stderr = float(diff.std(ddof=1) / np.sqrt(diff.size))
    else:
        stderr = float(np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size))
    return BackendGap(train_backend=train_backend, reference_backend=reference_backend,
                      train_mean=float(a.mean()), train_std=float(a.std()),
                      reference_mean=float(b.mean()), reference_std=float(b.std()),
                      gap=float(b.mean() - a.mean()), stderr=stderr,
                      train_episodes=int(a.size), reference_episodes=int(b.size),
                      paired=paired)


@dataclass
class VersusRandom:
    """C against the random policy on the same episodes (same seeds, same backend)."""

    difference: float  # mean over episodes of C's return minus the random policy's
    stderr: float  # standard error of that mean
    wins: int  # episodes where C's return is higher
    episodes: int
    against: str = "random"  # the other policy: random, or one of eval.references

    @property
    def clearly_better(self) -> bool:
        """Two standard errors above zero: what "C learned" should mean on a few dozen
        episodes, where a C no better than random still wins about half of them."""
        return self.difference - 2 * self.stderr > 0

    def line(self) -> str:
        return (f"C against the {self.against} policy on the same {self.episodes} episodes: "
                f"{self.difference:+.1f} +- {self.stderr:.1f} (mean difference +- standard "
                f"error), higher on {self.wins} of {self.episodes}")


def versus_random(controller: dict[str, Any], random: dict[str, Any],
                  against: str = "random") -> VersusRandom | None:
    """The paired comparison of two evaluation JSONs (``asdict(EvalResult)``), or None when
    they did not play the same episodes (other seeds or backend, or fewer than 2); ``against``
    names the second policy (random, or one of eval.references)."""
    seeds, returns = controller.get("seeds"), controller.get("returns")
    if (not isinstance(seeds, list) or len(seeds) < 2 or seeds != random.get("seeds")
            or controller.get("backend") != random.get("backend")
            or not isinstance(returns, list) or not isinstance(random.get("returns"), list)
            or len(returns) != len(seeds) or len(random["returns"]) != len(seeds)):
        return None
    diff = np.asarray(returns, np.float64) - np.asarray(random["returns"], np.float64)
    return VersusRandom(difference=float(diff.mean()),
                        stderr=float(diff.std(ddof=1) / np.sqrt(diff.size)),
                        wins=int((diff > 0).sum()), episodes=int(diff.size),
                        against=against)


def gap_from_evals(env: str, train: dict[str, Any], reference: dict[str, Any]) -> BackendGap:
    """The backend gap of two evaluation JSONs (as ``evaluate_controller`` writes them);
    paired only when both backends play the same episodes and the seeds match."""
    paired = (same_episodes(env, str(train.get("backend")), str(reference.get("backend")))
              and train.get("seeds") == reference.get("seeds"))
    return backend_gap(train.get("returns") or [], reference.get("returns") or [],
                       str(train.get("backend")), str(reference.get("backend")), paired)


@torch.no_grad()
def record_video(models: Any, workload: Any, params: np.ndarray, seed: int,
                 scale: int = 2, every: int = 2, fps: float = 30.0) -> bytes:
    """A GIF of one real episode: the frame V sees, beside V's reconstruction of z.

    Every ``every``-th step, played back at ``fps`` steps per second: a Doom episode that
    survives the full 2,100 steps is a minute of video (every frame at 3x made a 30 MB GIF
    whose recording took half as long as the 50 episodes it illustrates)."""
    from wmlab.agent import run_real
    from wmlab.envs import make_batch

    seen: list[np.ndarray] = []
    latents: list[torch.Tensor] = []
    steps = 0

    def record(step: dict[str, Any]) -> None:
        nonlocal steps
        steps += 1
        if (steps - 1) % every:
            return
        seen.append(step["frame"])
        latents.append(step["z"])

    with make_batch(workload.env, 1, workload.backend, **workload.env_options()) as env:
        run_real(models, env, params[None].astype(np.float32), np.array([[seed]]), record)
    frames = []
    for start in range(0, len(seen), 256):  # V's reconstructions in batches, not one by one
        recon = models.vae.decode(torch.stack(latents[start:start + 256])).float().clamp(0, 1)
        views = (recon.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
        for frame, view in zip(seen[start:start + 256], views, strict=True):
            pair = np.concatenate([frame, np.full((64, 2, 3), 255, np.uint8), view], axis=1)
            frames.append(pair.repeat(scale, axis=0).repeat(scale, axis=1))
    return gif_bytes(frames, duration_ms=1000 * every / fps)


def evaluate_random_policy(cfg: Config, *, episodes: int | None = None,
                           policy: str = "uniform", out: str | None = None,
                           first_seed: int | None = None, reuse: bool = False) -> EvalResult:
    """A policy that does not look (random, or a fixed reference behaviour such as "noop"
    or "left") on the seeds the controller is scored on: the floor to beat.

    Each env is reset with the same seed as in ``evaluate_controller``, so the two
    evaluations face the same episodes (same tracks, same monster spawns). ``first_seed``
    moves the episodes elsewhere (the dream calibration uses its own seeds). ``reuse`` as
    in ``evaluate_controller``: the JSON already written for the same policy and episodes.
    """
    from wmlab.collect import run_episodes
    from wmlab.envs import env_options, make_batch
    from wmlab.envs.repeat import agent_steps
    from wmlab.policies import PolicyConfig, make_policy

    episodes = _episodes(cfg, episodes)
    spec, backend = scored_env(cfg)
    options = env_options(cfg.env.max_steps, cfg.env.action_repeat)
    returns: list[float] = []
    lengths: list[int] = []
    seeds = episode_rows(cfg.eval.seed if first_seed is None else first_seed, episodes,
                         POLICY_EPISODES_PER_ROW)
    name = "random" if policy == "uniform" else policy
    path = out or RunLayout.of(cfg).scores(name, backend)
    if reuse:
        # this iteration's own, else iteration 1's: a policy that does not look plays the
        # same episodes whatever the iteration trained, so a later one copies it
        earlier = RunLayout.of(cfg).base.scores(name, backend) if out is None else path
        for candidate in dict.fromkeys([path, earlier]):
            saved = saved_result(candidate, env=spec.name, backend=backend,
                                 seeds=[int(s) for s in seeds.ravel()],
                                 controller=f"{name} ({policy})")
            if saved is not None and saved.extra.get("max_steps") == cfg.env.max_steps \
                    and _same_repeat(saved, cfg):
                if candidate != path:
                    atomic_write_bytes(path, json.dumps(asdict(saved), indent=2).encode())
                return saved
    chosen = make_policy(PolicyConfig(name=policy), seeds.shape[1], spec.controller_outputs)
    with make_batch(spec.name, seeds.shape[1], backend, **options) as env_batch:
        for row in seeds:
            # the policy's own stream is keyed by the episode seed too (reset per slot)
            pairs = [(int(s), int(s) + 1) for s in row]
            by_slot = {slot: ep for slot, ep in run_episodes(
                env_batch, chosen, pairs, agent_steps(cfg.env.max_steps, cfg.env.action_repeat))}
            returns.extend(float(by_slot[slot].rewards.sum()) for slot in range(len(row)))
            lengths.extend(len(by_slot[slot].rewards) for slot in range(len(row)))
    values = np.asarray(returns, dtype=np.float64)
    steps = np.asarray(lengths, dtype=np.float64)
    result = EvalResult(env=spec.name, backend=backend, where="real", episodes=episodes,
                        mean=float(values.mean()), std=float(values.std()),
                        seeds=[int(s) for s in seeds.ravel()],
                        returns=[float(r) for r in values], controller=f"{name} ({policy})",
                        controller_fingerprint="",
                        extra={"policy": policy, "max_steps": cfg.env.max_steps,
                               **_repeat_record(cfg), "lengths": lengths,
                               "length_mean": float(steps.mean()),
                               "length_std": float(steps.std())})
    atomic_write_bytes(path, json.dumps(asdict(result), indent=2).encode())
    return result
