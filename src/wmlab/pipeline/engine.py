"""The stage engine: runs a list of stages over one run directory, with skip / resume /
invalidate bookkeeping. It knows nothing of World Models; ``wmlab.pipeline.stages`` gives it
the stages of a run.

Each stage records, in ``<run>/stages/<stage>.json``, the fingerprint of what it was run
from: the config keys that change its result plus the *output* fingerprint of the stages
before it (the store's episode list, V's weights, M's weights...). Running again then

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

from wmlab.config import Config
from wmlab.errors import WmlabError
from wmlab.fsio import atomic_write_bytes
from wmlab.machine import cpu_description, cpu_seconds
from wmlab.runs import RunLayout, prepare_run_dir

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


@dataclass(frozen=True)
class Prior:
    """What every stage of an engine is made from beyond its own run directory: a later
    iteration's stages build on the earlier iteration's V, M and C (``vae.init_from``,
    ``mdrnn.init_from``, ``collect.agent_run``...), paths that stay the same when what they
    hold changes. ``fingerprint`` stands for those outputs; ``finished`` (UTC, ISO) is when
    they were made, which judges records written before priors were kept."""

    fingerprint: str
    finished: str

    @classmethod
    def of_record(cls, record: dict[str, Any] | None) -> Prior | None:
        """The prior a finished stage's record stands for (its inputs and its outputs), or
        None where the stage is not finished."""
        if not record or record.get("status") != "done" or "output" not in record:
            return None
        return cls(_hash([record.get("input"), record["output"]]), str(record.get("finished", "")))


@dataclass
class StageResult:
    name: str
    status: str  # "skipped", "ran", "resumed", "extended", "repaired", "rerun"
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)


# Keys that only say how far a stage trains. Raising one continues the stage from its own
# checkpoints (more steps of the same M, more generations of the same CMA-ES, more
# candidates for its final choice: each a function of the step or of the run's seed, so the
# result is the one a longer run would have given); lowering one starts the stage again.
EXTENDABLE_KEYS = frozenset({"mdrnn.steps", "es.generations", "es.final_candidates"})


# Keys added after runs already existed, with the value that does what runs did before the
# key existed: at that value they are left out of fingerprints, so upgrading wmlab does not
# make finished stages look changed. A new key that defaults to the old behaviour goes here.
LATER_KEYS: dict[str, Any] = {"es.dream_generations": 0, "es.covariance": "full",
                               "collect.fixed_fraction": 0.0, "vae.width": 32,
                               "dream.done_bias": 0.0, "mdrnn.bf16": False,
                               "dream.fit_done_bias": False, "es.stall_steps": 0,
                               "controller.packed_encoder": False,
                               "eval.fidelity_dreams": 0, "eval.fidelity_taus": [],
                               "es.init_from": "", "es.dream_rollouts": 0,
                               "dream.tau_from_fidelity": False, "mdrnn.dropout": 0.0,
                               "dream.dropout": False, "controller.lookahead": False,
                               "es.common_seeds": False, "es.dream_patience": 0,
                               "es.carry_over": False, "es.max_steps": 0,
                               "vae.salient_weight": 0.0, "collect.explore": 0.0,
                               "collect.explore_hold": 1, "collect.explore_outputs": [],
                               "es.real_envs": 0, "dream.ensemble_reward": "mean",
                               "mdrnn.reward_over_weight": 1.0, "es.mirrored": False,
                               "controller.int8_encoder": False, "controller.clock": [],
                               "controller.z_noise": 1.0, "es.h_components": 0,
                               "es.standardize": False,
                               "eval.validation_episodes": 0,
                               "eval.validation_seed": 1_500_000,
                               "env.action_repeat": 1, "es.final_candidates": 0,
                               "es.final_rollouts": 128}


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _within_run(config: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """``config`` with every path inside ``run_dir`` written relative to it ("<run>/...")."""
    base = run_dir.rstrip("/")

    def relative(value: Any) -> Any:
        if isinstance(value, str) and base and (value == base or value.startswith(base + "/")):
            return "<run>" + value[len(base):]
        return value

    return {key: relative(value) for key, value in config.items()}


def read_record(url: str, log: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """The stage record at ``url``, or None where there is none or it is damaged (said to
    ``log``: the stage is then treated as not run)."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "rb") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        if log is not None:
            name = url.rsplit("/", 1)[-1].removesuffix(".json")
            log(f"stage record {url} is damaged: treating '{name}' as not run")
        return None


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


class Engine:
    """Runs ``stages`` over the run directory of ``cfg``, with skip / resume / invalidate
    bookkeeping: ``run()`` runs every stage that is not done, ``run(until=name)`` stops
    after one, ``status()`` says what is done."""

    def __init__(self, cfg: Config, stages: list[Stage], progress: bool = True,
                 log: Callable[[str], None] = print, prior: Prior | None = None) -> None:
        self.cfg = cfg
        self.stages = stages
        self.prior = prior
        self.progress = progress
        self.log = log
        self.layout = RunLayout.of(cfg)
        self.run_dir = self.layout.root
        self.fs, self.root = fsspec.core.url_to_fs(self.run_dir)

    # -- records ---------------------------------------------------------------------------

    def _record_path(self, name: str) -> str:
        return f"{self.layout.stages}/{name}.json"

    def record(self, name: str) -> dict[str, Any] | None:
        return read_record(self._record_path(name), self.log)

    def _write_record(self, name: str, record: dict[str, Any]) -> None:
        atomic_write_bytes(self._record_path(name), json.dumps(record, indent=2).encode())

    def input_fingerprint(self, stage: Stage, upstream: str | None,
                          absolute: bool = False, legacy: bool = False) -> str:
        """What the stage computes from, except how far it trains (``extent``). Paths into
        the run's own directory (a later iteration's collect.agent_run, vae.init_from,
        mdrnn.init_from...) count relative to it, so a run moved or copied elsewhere (another
        folder, s3://) keeps its finished stages; ``absolute``: as records written before
        that had them. The engine's prior (the earlier iteration's outputs) counts too;
        ``legacy``: as records written before priors were kept left it out."""
        config = config_slice(self.cfg, stage.sections, NEUTRAL_KEYS | EXTENDABLE_KEYS)
        if not absolute:
            config = _within_run(config, self.layout.base.root)
        inputs = {"config": config, "upstream": upstream}
        if self.prior is not None and not legacy:
            inputs["prior"] = self.prior.fingerprint
        return _hash(inputs)

    def _matches(self, record: dict[str, Any], stage: Stage, upstream: str | None) -> bool:
        # a record written before priors were kept stands where it was made after the prior
        legacy = self.prior is not None and "prior" not in record
        if legacy and str(record.get("started", "")) < self.prior.finished:
            return False
        return record.get("input") in (
            self.input_fingerprint(stage, upstream, legacy=legacy),
            self.input_fingerprint(stage, upstream, absolute=True, legacy=legacy))

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
        if not self._matches(record, stage, upstream):
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
        html = self.layout.report_html
        return html if self.fs.exists(fsspec.core.url_to_fs(html)[1]) else None

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

    def adopt_outputs(self, name: str) -> bool:
        """Called by a command that adds a measurement to a finished stage's folder (``wmlab
        fidelity`` rewrites ``eval/fidelity.json``): the stage stays finished, its record
        taking its outputs as they are now, so the next run neither mistakes them for a
        change by hand nor computes the stage again; the stages after it (the report) see
        the new outputs and run. False, changing nothing, unless the stage is finished from
        the inputs it has now."""
        upstream = None
        for stage in self.stages:
            record = self.record(stage.name)
            if stage.name == name:
                if not record or record.get("status") != "done" or \
                        self._compare(stage, upstream, record) != "same":
                    return False
                output = stage.output(self.cfg)
                if output is None:
                    return False
                if output != record.get("output"):
                    self._write_record(name, {**record, "output": output})
                return True
            upstream = _chain(upstream, (record or {}).get("output"))
        raise WmlabError(f"no stage '{name}': the stages are "
                         f"{', '.join(s.name for s in self.stages)}")

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
        if self.prior is not None:
            base["prior"] = self.prior.fingerprint
        discarded = _discarded(record, status)
        if discarded:  # compute spent on outputs now in trash/: still part of the budget
            base["discarded_seconds"] = round(sum(a.get("seconds", 0.0) for a in discarded), 2)
            base["discarded_attempts"] = discarded
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
        trash = fsspec.core.url_to_fs(self.layout.trash)[1]
        target = f"{trash}/{stage.folder.replace('/', '_')}-{stamp}"
        self.fs.makedirs(trash, exist_ok=True)
        self.fs.mv(source, target, recursive=True)


def _discarded(record: dict[str, Any] | None, status: str) -> list[dict[str, Any]]:
    """The attempts of earlier versions of a stage that was started again ("rerun"), and
    those they had discarded: compute the run spent, though on results now in trash/."""
    if not record:
        return []
    earlier = list(record.get("discarded_attempts", []))
    return [*earlier, *_attempts(record)] if status == "rerun" else earlier


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


