"""The whole pipeline of a run: collect -> V -> encode -> M -> C -> evaluate -> report.

Each stage records, in ``<run>/stages/<stage>.json``, the fingerprint of what it was run
from: the config keys that change its result plus the *output* fingerprint of the stage
before it (the store's episode list, V's weights, M's weights...). Running the pipeline
again then

- skips a stage that finished from the same inputs and whose outputs are still there;
- resumes a stage that was interrupted (its own checkpoints carry it on);
- reruns a stage whose inputs changed, after moving its old outputs to ``<run>/trash/``
  (nothing is deleted), and so, through the changed output fingerprint, the stages after it,
  and only those;
- repairs a finished stage whose outputs were deleted by hand, saying so.

Keys that do not change a result (worker counts, checkpoint intervals, the evaluation
engine...) are left out of the fingerprints, so changing them reruns nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import fsspec

from wmlab.config import Config, with_overrides
from wmlab.errors import WmlabError
from wmlab.fsio import atomic_write_bytes
from wmlab.machine import cpu_description, cpu_seconds
from wmlab.runs import prepare_run_dir

# How often a running stage writes its compute so far into its record: a stage killed
# between two beats loses at most this much of its count.
HEARTBEAT_SECONDS = 30.0

# Keys that change how fast or where a stage runs, never what it produces.
NEUTRAL_KEYS = frozenset({
    "collect.workers", "collect.envs_per_worker", "collect.episodes",
    "vae.checkpoint_every", "mdrnn.checkpoint_every", "mdrnn.batch_parts",
    "es.engine", "es.workers", "es.ray_address", "es.timeout",
    # the dream's calibration gate and its real-game column decide whether C may train,
    # not what any stage computes
    "dream.calibration_tolerance", "mdrnn.calibration_real_episodes",
})


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline.

    ``sections`` are the config sections (or ``section.key``) whose values change the
    stage's result; ``folder`` (relative to the run directory) is moved to trash when the
    stage must start again; ``run`` does the work (resuming its own checkpoints) and
    returns a JSON-able summary; ``output`` returns the stage's output fingerprint, or None
    when its outputs are missing.
    """

    name: str
    sections: tuple[str, ...]
    folder: str | None
    run: Callable[[Config, bool], dict[str, Any]]
    output: Callable[[Config], str | None]
    description: str = ""


@dataclass
class StageResult:
    name: str
    status: str  # "skipped", "ran", "resumed", "extended", "repaired", "rerun"
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)


# Keys that only say how far a stage trains. Raising one continues the stage from its own
# checkpoints (more steps of the same M, more generations of the same CMA-ES: both are
# functions of the step, so the result is the one a longer run would have given); lowering
# one starts the stage again.
EXTENDABLE_KEYS = frozenset({"mdrnn.steps", "es.generations"})


# Keys added after runs already existed, with the value that does what runs did before the
# key existed: at that value they are left out of fingerprints, so upgrading wmlab does not
# make finished stages look changed. A new key that defaults to the old behaviour goes here.
LATER_KEYS: dict[str, Any] = {"es.dream_generations": 0, "es.covariance": "full",
                               "collect.fixed_fraction": 0.0, "vae.width": 32,
                               "dream.done_bias": 0.0, "mdrnn.bf16": False,
                               "dream.fit_done_bias": False, "es.stall_steps": 0,
                               "controller.packed_encoder": False,
                               "eval.fidelity_dreams": 0, "eval.fidelity_taus": [],
                               "es.init_from": "", "es.dream_rollouts": 0}


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _chain(upstream: str | None, output: str | None) -> str:
    """What a stage depends on: every earlier stage's output, not only the last one's
    (the report shows C's learning curve even when the evaluation came out the same)."""
    return _hash([upstream, output])


def config_slice(cfg: Config, sections: tuple[str, ...],
                 leave_out: frozenset[str] = NEUTRAL_KEYS) -> dict[str, Any]:
    """The values of ``sections`` (``section`` or ``section.key``) minus ``leave_out``."""
    data = dataclasses.asdict(cfg)
    out: dict[str, Any] = {}
    for item in sections:
        section, _, key = item.partition(".")
        values = data[section] if not key else {key: data[section][key]}
        if not isinstance(values, dict):
            out[section] = values
            continue
        for name, value in values.items():
            key = f"{section}.{name}"
            if key in LATER_KEYS and value == LATER_KEYS[key]:
                continue
            if key not in leave_out:
                out[key] = value
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Pipeline:
    """The stages of one run, with skip / resume / invalidate bookkeeping.

    ``Pipeline(cfg).run()`` runs everything that is not done; ``run(until="memory")``
    stops after a stage; ``status()`` says what is done. Each stage is also a method
    (``collect()``, ``train_vision()``...) for notebooks.
    """

    def __init__(self, cfg: Config, stages: list[Stage] | None = None,
                 progress: bool = True, log: Callable[[str], None] = print,
                 iteration: int = 1) -> None:
        if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 1:
            raise WmlabError(f"--iteration must be 1 or more, got {iteration!r}")
        if iteration > 1:
            cfg = iteration_config(cfg, iteration)
        self.iteration = iteration
        self.cfg = cfg
        self.stages = stages if stages is not None else default_stages(cfg)
        self.progress = progress
        self.log = log
        self.run_dir = cfg.run_dir()
        self.fs, self.root = fsspec.core.url_to_fs(self.run_dir)

    # -- records ---------------------------------------------------------------------------

    def _record_path(self, name: str) -> str:
        return f"{self.run_dir}/stages/{name}.json"

    def record(self, name: str) -> dict[str, Any] | None:
        fs, path = fsspec.core.url_to_fs(self._record_path(name))
        try:
            with fs.open(path, "rb") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            self.log(f"stage record {self._record_path(name)} is damaged: treating "
                     f"'{name}' as not run")
            return None

    def _write_record(self, name: str, record: dict[str, Any]) -> None:
        atomic_write_bytes(self._record_path(name), json.dumps(record, indent=2).encode())

    def input_fingerprint(self, stage: Stage, upstream: str | None) -> str:
        """What the stage computes from, except how far it trains (``extent``)."""
        config = config_slice(self.cfg, stage.sections, NEUTRAL_KEYS | EXTENDABLE_KEYS)
        return _hash({"config": config, "upstream": upstream})

    def extent(self, stage: Stage) -> dict[str, Any]:
        """How far the stage trains: its extendable keys (e.g. es.generations)."""
        every = config_slice(self.cfg, stage.sections)
        return {key: value for key, value in every.items() if key in EXTENDABLE_KEYS}

    def _compare(self, stage: Stage, upstream: str | None, record: dict[str, Any] | None
                 ) -> str:
        """"new" (no record), "same", "longer" (train further), "shorter" or "changed"."""
        if not record:
            return "new"
        extent = self.extent(stage)
        if "extent" not in record:
            # a record written before extents were kept: its fingerprint includes them
            old = _hash({"config": config_slice(self.cfg, stage.sections),
                         "upstream": upstream})
            return "same" if record.get("input") == old else "changed"
        if record.get("input") != self.input_fingerprint(stage, upstream):
            return "changed"
        had = record["extent"]
        if any(extent.get(k, 0) < had.get(k, 0) for k in had):
            return "shorter"
        if any(extent[k] > had.get(k, 0) for k in extent):
            return "longer"
        return "same"

    # -- running ---------------------------------------------------------------------------

    def report_path(self) -> str | None:
        """The run's report, once the report stage has written it."""
        path = f"{self.root}/report.html"
        return f"{self.run_dir}/report.html" if self.fs.exists(path) else None

    def status(self) -> list[dict[str, Any]]:
        """Per stage: its record's status and whether its inputs still match."""
        rows, upstream = [], None
        for stage in self.stages:
            record = self.record(stage.name) or {}
            comparison = self._compare(stage, upstream, record)
            current = comparison in ("same", "longer")
            state = {"same": record.get("status", "not run"), "longer": "extend",
                     "new": "not run"}.get(comparison, "stale")
            rows.append({"stage": stage.name, "status": state,
                         "finished": record.get("finished", "")})
            upstream = _chain(upstream, record.get("output") if current else None)
        return rows

    def run(self, until: str | None = None) -> list[StageResult]:
        names = [s.name for s in self.stages]
        if until is not None and until not in names:
            raise WmlabError(f"no stage '{until}': the stages are {', '.join(names)}")
        prepare_run_dir(self.cfg)
        results, upstream = [], None
        for stage in self.stages:
            results.append(self._run_stage(stage, upstream))
            upstream = _chain(upstream, (self.record(stage.name) or {}).get("output"))
            if stage.name == until:
                break
        return results

    def _run_stage(self, stage: Stage, upstream: str | None) -> StageResult:
        expected = self.input_fingerprint(stage, upstream)
        extent = self.extent(stage)
        record = self.record(stage.name)
        comparison = self._compare(stage, upstream, record)
        if record and comparison == "same" and record.get("status") == "done":
            output = stage.output(self.cfg)
            if output is not None and output == record.get("output"):
                self.log(f"[{stage.name}] done already: skipped")
                return StageResult(stage.name, "skipped", summary=record.get("summary", {}))
            status = "repaired"
            self.log(f"[{stage.name}] its outputs are missing or were changed by hand: "
                     "running it again")
        elif record and comparison == "longer":
            status = "extended"
            wanted = ", ".join(f"{k} = {v}" for k, v in extent.items())
            self.log(f"[{stage.name}] continuing from its checkpoints to {wanted}")
        elif record and comparison == "same":
            status = "resumed"
            self.log(f"[{stage.name}] interrupted before: resuming")
        elif record:
            status = "rerun"
            self.log(f"[{stage.name}] its config or inputs changed: starting it again "
                     "(old outputs moved to trash/)")
            self._trash(stage)
        else:
            status = "ran"
        self.log(f"[{stage.name}] {stage.description}")
        started_at = _now()
        # Compute is counted over the stage's own attempts (a resumed or extended stage
        # adds to what it had; one started again begins at zero), never across pauses.
        earlier = _attempts(record) if record and status in (
            "resumed", "extended", "repaired") else []
        base = {"stage": stage.name, "input": expected, "extent": extent}
        clock = _StageClock(started_at, earlier, lambda compute: self._write_record(
            stage.name, {**base, "status": "running", "started": started_at, **compute}))
        with clock:
            summary = stage.run(self.cfg, self.progress)
        seconds = clock.seconds
        output = stage.output(self.cfg)
        if output is None:
            raise WmlabError(f"stage '{stage.name}' finished without its outputs: see the "
                             "messages above")
        self._write_record(stage.name, {**base, "status": "done", "output": output,
                                        "started": started_at, "finished": _now(),
                                        "seconds": round(seconds, 2), **clock.compute(),
                                        "summary": summary})
        return StageResult(stage.name, status, seconds, summary)

    def _trash(self, stage: Stage) -> None:
        """Move a stage's outputs aside (never deleted) so it starts from nothing."""
        if stage.folder is None:
            return
        source = f"{self.root}/{stage.folder}"
        if not self.fs.exists(source):
            return
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        target = f"{self.root}/trash/{stage.folder.replace('/', '_')}-{stamp}"
        self.fs.makedirs(f"{self.root}/trash", exist_ok=True)
        self.fs.mv(source, target, recursive=True)


def _attempts(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The attempts a stage record counts (a record from before attempts were kept: its
    one timed invocation)."""
    if "attempts" in record:
        return list(record["attempts"])
    return [{"seconds": record["seconds"]}] if "seconds" in record else []


class _StageClock:
    """Times one attempt of a stage (wall-clock and CPU seconds) and, while it runs, has
    ``write`` record the compute so far every HEARTBEAT_SECONDS, so a killed attempt still
    counts up to its last beat."""

    def __init__(self, started: str, earlier: list[dict[str, Any]],
                 write: Callable[[dict[str, Any]], None]) -> None:
        self.started, self.earlier, self.write = started, earlier, write
        self._began = self._cpu_began = 0.0  # set when the attempt starts (__enter__)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self.seconds = 0.0

    def __enter__(self) -> _StageClock:
        self._began, self._cpu_began = time.monotonic(), cpu_seconds()
        self.write(self.compute())
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.seconds = time.monotonic() - self._began
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self.write(self.compute())

    def compute(self) -> dict[str, Any]:
        """{"compute_seconds", "cpu_seconds", "cpu", "attempts"} with this attempt so far."""
        seconds = self.seconds or time.monotonic() - self._began
        attempt = {"started": self.started, "seconds": round(seconds, 2),
                   "cpu_seconds": round(cpu_seconds() - self._cpu_began, 2),
                   "cpu": cpu_description()}
        attempts = [*self.earlier, attempt]
        return {"compute_seconds": round(sum(a.get("seconds", 0.0) for a in attempts), 2),
                "cpu_seconds": round(sum(a.get("cpu_seconds", 0.0) for a in attempts), 2),
                "cpu": cpu_description(), "attempts": attempts}


# ---------------------------------------------------------------------------------------------
# Iterations


def iteration_config(cfg: Config, iteration: int) -> Config:
    """The config of iteration ``iteration`` (2+) of ``cfg``'s run.

    It lives in ``<run>/iterations/<k>/``; it collects new episodes, a fraction with the
    previous iteration's agent and the rest with the random policy (other seeds than
    before), and trains V and M starting from the previous iteration's weights; C is trained
    afresh. Evaluation uses the same seeds, so iterations compare episode for episode.
    """
    from wmlab.checkpoint import checkpoint_exists
    from wmlab.es import MEAN_WEIGHTS

    base = cfg.run_dir()
    previous = base if iteration == 2 else f"{base}/iterations/{iteration - 1}"
    if not checkpoint_exists(f"{previous}/controller", MEAN_WEIGHTS):
        raise WmlabError(f"iteration {iteration} starts from iteration {iteration - 1}'s "
                         f"trained agent, and {previous} has none: run `wmlab run` with "
                         f"--iteration {iteration - 1} first")
    new = copy.deepcopy(cfg)
    if cfg.run.later:
        new = with_overrides(new, cfg.run.later)
    name = cfg.run.name or f"{cfg.preset}-{cfg.profile}"
    new.run.name = f"{name}/iterations/{iteration}"
    new.collect.out = ""
    new.collect.seed = cfg.collect.seed + 1000 * (iteration - 1)
    new.collect.agent_run = previous
    new.vae.init_from = f"{previous}/vision"
    new.mdrnn.init_from = f"{previous}/memory"
    if new.es.init_from == "previous":
        new.es.init_from = f"{previous}/controller"
    return new


def base_run_dir(cfg: Config) -> str:
    """The run directory of iteration 1 (for an iteration's config, its parent run)."""
    return cfg.run_dir().split("/iterations/")[0]


# ---------------------------------------------------------------------------------------------
# The stages


def _store_fingerprint(cfg: Config) -> str | None:
    from wmlab.data import EpisodeStore

    try:
        store = EpisodeStore.open(cfg.store_url())
        ids = store.episode_ids()
    except WmlabError:
        return None
    if len(ids) < cfg.collect.episodes:
        return None
    return _hash(ids)


def _run_collect(cfg: Config, progress: bool) -> dict[str, Any]:
    from wmlab.collect import collect_shares

    summaries = collect_shares(cfg, progress=progress)
    if len(summaries) == 1 and summaries[0][0] == cfg.collect.policy:
        summary = summaries[0][1]
        return {"line": summary.line(), "episodes": summary.kept_now, "steps": summary.steps}
    return {policy: {"line": summary.line(), "episodes": summary.kept_now}
            for policy, summary in summaries}


def _sidecar_fingerprint(folder: str, name: str) -> str | None:
    from wmlab.checkpoint import read_info

    try:
        return str(read_info(folder, name)["fingerprint"])
    except (WmlabError, KeyError):
        return None


def _run_vision(cfg: Config, progress: bool) -> dict[str, Any]:
    from wmlab.vision.train import train_vae

    result = train_vae(cfg, progress=progress)
    last = result.history[-1] if result.history else {}
    return {"steps": result.steps, "epochs": result.epochs,
            "frames_per_second": round(result.frames_per_second, 1),
            **{f"val_{k}": v for k, v in last.items() if isinstance(v, (int, float))}}


def _vision_output(cfg: Config) -> str | None:
    from wmlab.vision.train import FINAL_WEIGHTS, vision_dir

    return _sidecar_fingerprint(vision_dir(cfg), FINAL_WEIGHTS)


def _run_encode(cfg: Config, progress: bool) -> dict[str, Any]:
    from wmlab.vision.encode import encode_store

    summary = encode_store(cfg, progress=progress)
    return {"line": summary.line(), "episodes": summary.episodes}


def _encode_output(cfg: Config) -> str | None:
    from wmlab.data import EpisodeStore
    from wmlab.data.series import SeriesStore

    vae = _vision_output(cfg)
    try:
        series = SeriesStore.current(cfg.store_url())
        ids = EpisodeStore.open(cfg.store_url()).episode_ids()
    except WmlabError:
        return None
    if vae is None or series.fingerprint != vae or set(ids) - set(series.ids()):
        return None
    return _hash([vae, ids])


def _run_memory(cfg: Config, progress: bool) -> dict[str, Any]:
    from wmlab.memory.train import train_mdrnn

    result = train_mdrnn(cfg, progress=progress)
    last = result.history[-1] if result.history else {}
    return {"steps": result.steps,
            "sequences_per_second": round(result.sequences_per_second, 1),
            **{f"val_{k}": v for k, v in last.items() if isinstance(v, (int, float))}}


def _memory_output(cfg: Config) -> str | None:
    from wmlab.memory.train import FINAL_WEIGHTS, INITIAL_Z, memory_dir

    weights = _sidecar_fingerprint(memory_dir(cfg), FINAL_WEIGHTS)
    start = _sidecar_fingerprint(memory_dir(cfg), INITIAL_Z)
    return None if weights is None or start is None else _hash([weights, start])


def _run_controller(cfg: Config, progress: bool) -> dict[str, Any]:
    from wmlab.es import train_controller

    result = train_controller(cfg, progress=progress)
    summary = {"generations": result.generation, "best_score": result.best_score,
               "best_generation": result.best_generation, "fitness": cfg.es.fitness}
    if cfg.es.fitness == "dream" and cfg.dream.fit_done_bias:
        from wmlab.memory.calibration import dream_done_bias

        summary["dream_done_bias"] = dream_done_bias(cfg)
    return summary


def _controller_output(cfg: Config) -> str | None:
    from wmlab.es import BEST_WEIGHTS, MEAN_WEIGHTS, controller_dir

    folder = controller_dir(cfg)
    found = [_sidecar_fingerprint(folder, name) for name in (BEST_WEIGHTS, MEAN_WEIGHTS)]
    return None if found[1] is None else _hash(found)


def _run_evaluate(cfg: Config, progress: bool) -> dict[str, Any]:
    from wmlab.evaluate import (
        backend_gap,
        eval_dir,
        evaluate_controller,
        evaluate_random_policy,
        same_episodes,
        training_backend,
        versus_random,
    )

    summary: dict[str, Any] = {}
    real = evaluate_controller(cfg, video=f"{eval_dir(cfg)}/episode.gif")
    summary["controller"] = real.line()
    print(f"  controller: {real.line()}")
    trained_on = training_backend(cfg)
    if trained_on != real.backend:  # e.g. trained on EnvPool, reported on Gymnasium
        there = evaluate_controller(cfg, backend=trained_on)
        summary[f"controller-{trained_on}"] = there.line()
        print(f"  controller on its training backend: {there.line()}")
        if there.episodes > 1:
            paired = same_episodes(cfg.env.name, trained_on, real.backend)
            gap = backend_gap(there.returns, real.returns, trained_on, real.backend, paired)
            summary["transfer"] = gap.line()
            print(f"  {gap.line()}")
    floor = evaluate_random_policy(cfg)
    summary["random"] = floor.line()
    print(f"  random policy, same seeds: {floor.line()}")
    paired = versus_random(dataclasses.asdict(real), dataclasses.asdict(floor))
    if paired is not None:
        summary["versus_random"] = paired.line()
        print(f"  {paired.line()}")
        if not paired.clearly_better:
            summary["hint"] = not_learned_hint(cfg)
            print(f"  {summary['hint']}")
    if cfg.eval.fidelity_dreams and cfg.es.fitness == "real":
        from wmlab.fidelity import measure_fidelity

        for fidelity in measure_fidelity(cfg, cfg.eval.fidelity_dreams,
                                         taus=cfg.eval.fidelity_taus):
            summary[f"fidelity tau {fidelity.tau:g}"] = fidelity.line()
            print(f"  {fidelity.line()}")
    if cfg.es.fitness == "dream":
        dream = evaluate_controller(cfg, where="dream")
        summary["dream"] = dream.line()
        print(f"  in the dream: {dream.line()}")
    if cfg.env.name.partition(":")[0] == "binpacking":
        from wmlab.baselines import evaluate_on_eval_seeds

        for row in evaluate_on_eval_seeds(cfg):
            summary[row.controller] = row.line()
            print(f"  {row.controller}, same seeds: {row.line()}")
    return summary


def not_learned_hint(cfg: Config) -> str:
    """What to try when C is not clearly better than the random policy."""
    if cfg.es.fitness != "dream":
        return ("C is not clearly better than the random policy yet: train it longer "
                "(a larger es.generations continues from its checkpoint)")
    parts = cfg.run_dir().split("/iterations/")
    iteration = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 1
    return ("C is not clearly better than the random policy: its dream rewards something "
            "the game does not (the report's calibration section compares them). The "
            "paper's remedy is the next iteration, which collects episodes with this C so "
            f"that M learns where it leads: `wmlab run --preset {cfg.preset} --profile "
            f"{cfg.profile} --iteration {iteration + 1}` with this run's --run, --seed and "
            "--set (docs/results/doom-quick.md: it rescued a quick Doom run)")


def _eval_output(cfg: Config) -> str | None:
    from wmlab.evaluate import eval_dir

    fs, path = fsspec.core.url_to_fs(eval_dir(cfg))
    if not fs.exists(path):
        return None
    names = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".json"))
    if not names:
        return None
    return _hash([fs.cat_file(name).decode() for name in names])


def _dream_pictures(cfg: Config) -> dict[str, Any]:
    """The dream GIFs the report shows: C (or random actions) driving M's dream, and real
    frames | V's reconstruction | M's imagined continuation from the same start."""
    from wmlab.checkpoint import checkpoint_exists
    from wmlab.es import BEST_WEIGHTS, controller_dir
    from wmlab.memory.dreaming import DreamRequest, make_dream_pictures

    if not cfg.mdrnn.done_head and not cfg.mdrnn.reward_head and cfg.es.fitness == "real":
        steps = 150  # a dream without an end: a short one shows what M imagines
    else:
        steps = min(300, cfg.dream.max_steps)
    best = BEST_WEIGHTS if checkpoint_exists(controller_dir(cfg), BEST_WEIGHTS) else None
    try:
        return make_dream_pictures(cfg, DreamRequest(steps=steps, seed=cfg.run.seed,
                                                     controller=best))
    except WmlabError as exc:  # the report says what is missing; it never stops here
        return {"dream_error": str(exc)}


def _run_report(cfg: Config, progress: bool) -> dict[str, Any]:
    from wmlab.report import write_report

    dream = _dream_pictures(cfg)
    paths = write_report(cfg.run_dir())
    if base_run_dir(cfg) != cfg.run_dir():  # an iteration: the first run's report lists all
        write_report(base_run_dir(cfg))
    return {"markdown": str(paths.markdown), "html": str(paths.html),
            "dream": {k: v for k, v in dream.items() if isinstance(v, (str, int, float))}}


def _report_output(cfg: Config) -> str | None:
    fs, path = fsspec.core.url_to_fs(f"{cfg.run_dir()}/report.md")
    return _hash(fs.cat_file(path).decode()) if fs.exists(path) else None


def default_stages(cfg: Config) -> list[Stage]:
    """The stages of a World Models run, in order."""
    store_in_run = not cfg.collect.out
    return [
        Stage("collect", ("env", "collect", "run.seed"), "data" if store_in_run else None,
              _run_collect, _store_fingerprint,
              f"collecting {cfg.collect.episodes} {cfg.collect.policy}-policy episodes"),
        Stage("vision", ("vae", "run.seed"), "vision", _run_vision, _vision_output,
              f"training V ({cfg.vae.kind}, z={cfg.vae.z_dim}, {cfg.vae.epochs} epochs)"),
        Stage("encode", (), None, _run_encode, _encode_output,
              "encoding every frame to (mu, logvar)"),
        Stage("memory", ("mdrnn", "run.seed"), "memory", _run_memory, _memory_output,
              f"training M (LSTM {cfg.mdrnn.hidden}, {cfg.mdrnn.steps} steps)"),
        Stage("controller", ("env", "controller", "es", "dream", "run.seed"), "controller",
              _run_controller, _controller_output,
              f"training C by CMA-ES in the {cfg.es.fitness} env (population "
              f"{cfg.es.population} x {cfg.es.rollouts} rollouts, {cfg.es.generations} "
              "generations)"),
        Stage("evaluate", ("eval", "env.max_steps", "dream"), "eval", _run_evaluate,
              _eval_output, f"scoring C on {cfg.eval.episodes} real episodes with fixed "
              "seeds, and the random policy on the same seeds"),
        Stage("report", (), None, _run_report, _report_output, "writing the report"),
    ]


def describe_results(results: list[StageResult]) -> str:
    lines = []
    for r in results:
        took = f" in {r.seconds:.1f} s" if r.status != "skipped" else ""
        lines.append(f"  {r.name:<11} {r.status}{took}")
    return "\n".join(lines)

