"""Agents shipped with the package: export a run's V, M and C, and turn a shipped agent back
into a run directory.

A shipped agent is a folder ``<root>/<name>/`` holding

- ``vision.safetensors``, ``memory.safetensors``, ``initial_z.safetensors``: V, M and the
  dream starts, in float16 (half the bytes; the test and ``wmlab export --evaluate`` show
  the score does not move);
- ``controller.safetensors``: C's flat parameter vector in float32 (it is tiny, and its
  weights multiply M's unnormalised hidden state, where float16's 3 digits would show);
- ``config.toml``: the run's resolved config;
- ``metadata.json``: what it is (preset, profile, env, seeds, the data it learned from, the
  parameter counts, the source run's stage times), every file's sha256 and size, and the
  measured ``score`` (null until measured).

``root`` is the package folder ``wmlab/pretrained_agents/`` unless ``WMLAB_PRETRAINED_PATH``
names another. Nothing reads the shipped files directly: ``materialize`` turns an agent into
an ordinary run directory (``<run.root>/pretrained-<name>/``, weights back in float32), so
``wmlab evaluate``, ``play`` and ``dream`` go through exactly the code of any other run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from wmlab.config import Config, load_config_file, to_toml
from wmlab.errors import WmlabError
from wmlab.fsio import atomic_write_bytes
from wmlab.machine import cpu_description
from wmlab.runs import RunLayout, spent_seconds

ENV_VAR = "WMLAB_PRETRAINED_PATH"
PACKAGE_FOLDER = "pretrained_agents"
METADATA = "metadata.json"
CONFIG = "config.toml"
FLOAT16_MAX = 65504.0  # beyond this a float16 is inf: such tensors stay float32
DTYPES = {"float16": torch.float16, "float32": torch.float32}
SIDECAR_KEYS_DROPPED = ("weights", "state", "fingerprint")  # rewritten by save_checkpoint
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Part:
    """One shipped weights file and the run checkpoint it stands for."""

    key: str  # vision, memory, initial_z, controller
    file: str  # in the shipped folder
    folder: str  # run subfolder
    checkpoint: str  # checkpoint name in that folder
    compact: bool  # stored in the export dtype (else always float32)


def _parts() -> tuple[Part, ...]:
    from wmlab.controller.cmaes import BEST_WEIGHTS
    from wmlab.memory.model import FINAL_WEIGHTS as M_WEIGHTS
    from wmlab.memory.model import INITIAL_Z
    from wmlab.vision.model import FINAL_WEIGHTS as V_WEIGHTS

    return (Part("vision", "vision.safetensors", "vision", V_WEIGHTS, True),
            Part("memory", "memory.safetensors", "memory", M_WEIGHTS, True),
            Part("initial_z", "initial_z.safetensors", "memory", INITIAL_Z, True),
            Part("controller", "controller.safetensors", "controller", BEST_WEIGHTS, False))


# ---------------------------------------------------------------------------------------------
# Where shipped agents live


def pretrained_root() -> Path:
    """The folder of shipped agents: $WMLAB_PRETRAINED_PATH, else the package's own."""
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override)
    return Path(str(resources.files("wmlab") / PACKAGE_FOLDER))


def available(root: str | Path | None = None) -> list[str]:
    """Names of the agents in ``root`` (default ``pretrained_root()``)."""
    folder = Path(root) if root is not None else pretrained_root()
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / METADATA).is_file())


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise WmlabError(f"pretrained agent name {name!r} must be letters, digits, '-', '_' "
                         "or '.', e.g. doom")
    return name


def agent_folder(name: str, root: str | Path | None = None) -> Path:
    """The folder of shipped agent ``name``, or a message listing those there are."""
    _check_name(name)
    base = Path(root) if root is not None else pretrained_root()
    folder = base / name
    if not (folder / METADATA).is_file():
        names = available(base)
        there = f"available: {', '.join(names)}" if names else "none is installed"
        raise WmlabError(f"no pretrained agent '{name}' in {base} ({there}); export one from a "
                         f"finished run with `wmlab export RUN --name {name}` (or point "
                         f"{ENV_VAR} at a folder of agents)")
    return folder


def read_metadata(name: str, root: str | Path | None = None) -> dict[str, Any]:
    path = agent_folder(name, root) / METADATA
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise WmlabError(f"{path} is damaged: export the agent again with `wmlab export "
                         f"RUN --name {name}`") from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Export


def _run_config(run: str | Path | Config, overrides: Sequence[str] = ()) -> Config:
    """A run's config (with ``overrides``), pointing at the run directory it was read from."""
    if isinstance(run, Config):
        return run
    folder = Path(run).expanduser().resolve()
    if not (folder / CONFIG).is_file():
        raise WmlabError(f"{run} is not a run directory (no {CONFIG}): give the folder of a "
                         "finished run, e.g. runs/doom-paper")
    cfg = load_config_file(folder / CONFIG, overrides)
    cfg.run.name = str(folder)  # an absolute name is the run directory itself
    return cfg


def agent_config(source: str, runs_root: str | None = None) -> Config:
    """The config of a shipped agent (materialized as a run under ``runs_root``) or of a run
    directory (pointing at that directory, wherever the run was made from)."""
    if source in available():
        return materialize(source, runs_root)
    if not (Path(source).expanduser() / CONFIG).is_file():
        raise WmlabError(f"{source} is neither a shipped agent ({', '.join(available())}) "
                         "nor a run directory (no config.toml)")
    return _run_config(source)


def _check_finished(cfg: Config, allow_unfinished: bool) -> dict[str, Any]:
    """Refuse a run without a trained V, M or C; returns C's sidecar."""
    from wmlab.checkpoint import checkpoint_exists, read_info
    from wmlab.controller.cmaes import BEST_WEIGHTS, MEAN_WEIGHTS
    from wmlab.memory.model import FINAL_WEIGHTS as M_WEIGHTS
    from wmlab.memory.model import INITIAL_Z
    from wmlab.vision.model import FINAL_WEIGHTS as V_WEIGHTS

    run = cfg.run_dir()
    needs = [(RunLayout.of(cfg).vision, V_WEIGHTS, "trained V", "wmlab train-vae"),
             (RunLayout.of(cfg).memory, M_WEIGHTS, "trained M", "wmlab train-mdrnn"),
             (RunLayout.of(cfg).memory, INITIAL_Z, "dream starts of M", "wmlab train-mdrnn"),
             (RunLayout.of(cfg).controller, BEST_WEIGHTS, "scored controller",
              "wmlab train-controller")]
    for folder, name, what, command in needs:
        if not checkpoint_exists(folder, name):
            raise WmlabError(f"run {run} has no {what} ({folder}/{name}.json): finish it with "
                             f"`{command}` (or `wmlab run`) before exporting")
    mean = read_info(RunLayout.of(cfg).controller, MEAN_WEIGHTS) if checkpoint_exists(
        RunLayout.of(cfg).controller, MEAN_WEIGHTS) else {}
    generation = int(mean.get("generation", 0))
    if generation < cfg.es.generations and not allow_unfinished:
        raise WmlabError(f"run {run}: C is at generation {generation} of {cfg.es.generations}"
                         ": finish `wmlab train-controller` (or `wmlab run`), or pass "
                         "--allow-unfinished to ship its best scored mean so far")
    return read_info(RunLayout.of(cfg).controller, BEST_WEIGHTS)


def _compact(weights: dict[str, torch.Tensor], dtype: torch.dtype
             ) -> tuple[dict[str, torch.Tensor], list[str], float]:
    """Floating tensors cast to ``dtype`` (those float16 cannot hold stay float32);
    returns (tensors, names kept in float32, largest absolute rounding error)."""
    out, kept, error = {}, [], 0.0
    for key, value in weights.items():
        value = value.detach().cpu().contiguous()
        if not value.is_floating_point():
            out[key] = value
            continue
        value = value.float()
        if dtype == torch.float16 and value.numel() and float(value.abs().max()) > FLOAT16_MAX:
            out[key] = value
            kept.append(key)
            continue
        cast = value.to(dtype)
        if value.numel():
            error = max(error, float((cast.float() - value).abs().max()))
        out[key] = cast
    return out, kept, error


def _data_summary(cfg: Config) -> dict[str, Any] | None:
    from wmlab.data import EpisodeStore

    try:
        info = EpisodeStore.open(cfg.store_url()).info()
    except WmlabError:
        return None
    return {key: info[key] for key in ("episodes", "frames", "steps", "policies", "backends",
                                       "collections") if key in info}


def _read_stage_records(folder: str) -> dict[str, dict[str, Any]]:
    """The readable stage records in ``folder`` (``<run>/stages``), by stage name."""
    records: dict[str, dict[str, Any]] = {}
    path = Path(folder)
    for file in sorted(path.glob("*.json")) if path.is_dir() else []:
        try:
            records[file.stem] = json.loads(file.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
    return records


def _stage_records(cfg: Config) -> dict[str, Any]:
    return {name: {k: record.get(k) for k in ("status", "started", "finished", "seconds",
                                               "summary")}
            for name, record in _read_stage_records(RunLayout.of(cfg).stages).items()}


def _profile_compute(cfg: Config) -> dict[str, Any] | None:
    """The compute of every stage of every iteration up to this one (own attempts plus
    those discarded since), in seconds, and the CPUs it ran on: what the profile cost."""
    layout = RunLayout.of(cfg)
    iterations: dict[str, dict[str, float]] = {}
    cpus: set[str] = set()
    for k in range(1, layout.iteration_number + 1):
        records = _read_stage_records(layout.iteration(k).stages)
        for record in records.values():
            if isinstance(record.get("cpu"), dict) and record["cpu"].get("model"):
                cpus.add(str(record["cpu"]["model"]))
        if records:
            iterations[str(k)] = {name: round(spent_seconds(record), 1)
                                  for name, record in records.items()}
    if not iterations:
        return None
    total = sum(sum(stages.values()) for stages in iterations.values())
    return {"seconds": round(total, 1), "hours": round(total / 3600, 2),
            "iterations": iterations, "cpus": sorted(cpus)}


def _count(weights: dict[str, torch.Tensor]) -> int:
    return int(sum(v.numel() for v in weights.values() if v.is_floating_point()))


def export_agent(run: str | Path | Config, name: str, dest: str | Path | None = None,
                 dtype: str = "float16", allow_unfinished: bool = False) -> dict[str, Any]:
    """Write run ``run``'s V, M (and dream starts), C, config and metadata to
    ``dest/<name>/`` (default: ``pretrained_root()``); returns the metadata.

    Every file is written under a temporary name and renamed; metadata.json, which holds
    the other files' sha256, goes last, so a killed export is refused on loading rather than
    used half-written.
    """
    from safetensors.torch import save as save_safetensors

    from wmlab.checkpoint import load_checkpoint
    from wmlab.envs import get_spec
    from wmlab.version import __version__

    _check_name(name)
    if dtype not in DTYPES:
        raise WmlabError(f"dtype must be float16 or float32, got {dtype!r}")
    cfg = _run_config(run)
    controller_info = _check_finished(cfg, allow_unfinished)
    target = (Path(dest) if dest is not None else pretrained_root()) / name
    folders = {"vision": RunLayout.of(cfg).vision, "memory": RunLayout.of(cfg).memory,
               "controller": RunLayout.of(cfg).controller}
    files, sidecars, params, kept32, errors, dtypes = {}, {}, {}, {}, {}, {}
    blobs: dict[str, bytes] = {}
    for part in _parts():
        ckpt = load_checkpoint(folders[part.folder], part.checkpoint, with_state=False)
        wanted = DTYPES[dtype] if part.compact else torch.float32
        tensors, kept, error = _compact(ckpt.weights, wanted)
        blob = save_safetensors(tensors)
        blobs[part.file] = blob
        files[part.file] = {"sha256": _sha256(blob), "bytes": len(blob)}
        sidecars[part.key] = {k: v for k, v in ckpt.info.items()
                              if k not in SIDECAR_KEYS_DROPPED}
        params[part.key] = _count(ckpt.weights)
        dtypes[part.key] = str(wanted).replace("torch.", "")
        kept32[part.key], errors[part.key] = kept, error
    spec = get_spec(cfg.env.name)
    stages = _stage_records(cfg)
    shipped = to_toml(cfg).encode()
    files[CONFIG] = {"sha256": _sha256(shipped), "bytes": len(shipped)}
    metadata: dict[str, Any] = {
        "name": name, "wmlab_version": __version__,
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_run": cfg.run_dir(), "preset": cfg.preset, "profile": cfg.profile,
        "env": spec.name, "backend": cfg.env.backend or spec.reference_backend or
        spec.default_backend,
        "seeds": {"run": cfg.run.seed, "collect": cfg.collect.seed, "eval": cfg.eval.seed},
        "data": _data_summary(cfg),
        "parameters": {"vision": params["vision"], "memory": params["memory"],
                       "controller": params["controller"]},
        "dream_starts": sidecars["initial_z"].get("episodes"),
        "dtype": dtypes,
        "float16_rounding": {"max_abs_error": errors, "kept_float32": kept32},
        "controller": {"generation": controller_info.get("generation"),
                       "eval_mean": controller_info.get("eval_mean"),
                       "eval_rollouts": controller_info.get("eval_rollouts"),
                       "generations": cfg.es.generations, "fitness": cfg.es.fitness,
                       "finished": _controller_done(cfg)},
        "stages": stages,
        "wall_clock_seconds": round(sum(float(r.get("seconds") or 0) for r in stages.values()),
                                    1) if stages else None,
        "compute": _profile_compute(cfg),
        "sidecars": sidecars, "files": files, "score": None,
    }
    metadata["size_bytes"] = sum(f["bytes"] for f in files.values())
    for file, blob in blobs.items():
        atomic_write_bytes(str(target / file), blob)
    atomic_write_bytes(str(target / CONFIG), shipped)
    _write_metadata(target, metadata)
    return metadata


def _controller_done(cfg: Config) -> bool:
    from wmlab.checkpoint import checkpoint_exists, read_info
    from wmlab.controller.cmaes import MEAN_WEIGHTS

    if not checkpoint_exists(RunLayout.of(cfg).controller, MEAN_WEIGHTS):
        return False
    info = read_info(RunLayout.of(cfg).controller, MEAN_WEIGHTS)
    return int(info.get("generation", 0)) >= cfg.es.generations


def _write_metadata(folder: Path, metadata: dict[str, Any]) -> None:
    atomic_write_bytes(str(folder / METADATA), (json.dumps(metadata, indent=2) + "\n").encode())


# ---------------------------------------------------------------------------------------------
# Materialize: a shipped agent as an ordinary run directory


def _verified_files(name: str, folder: Path, metadata: dict[str, Any]) -> dict[str, bytes]:
    """The shipped files' bytes, each checked against its recorded sha256."""
    out = {}
    for file, entry in metadata.get("files", {}).items():
        path = folder / file
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise WmlabError(f"pretrained agent '{name}' lacks {path}: reinstall wmlab or "
                             f"export it again (`wmlab export RUN --name {name}`)") from None
        if _sha256(data) != entry.get("sha256"):
            raise WmlabError(f"pretrained agent '{name}': {path} does not match the sha256 "
                             f"in its {METADATA} (damaged or replaced): reinstall wmlab or "
                             f"export it again")
        out[file] = data
    return out


def materialize(name: str, runs_root: str | None = None,
                overrides: Sequence[str] = (), root: str | Path | None = None,
                recorded_protocol: bool = True) -> Config:
    """The run directory of shipped agent ``name`` (made, or reused when its weights have
    the shipped sha256), and its config.

    The run is ``<runs_root>/pretrained-<name>`` (runs_root defaults to ``runs``), unless
    ``overrides`` set ``run.name``/``run.root``. The evaluation defaults to the recorded
    score's episodes, first seed and backend (``recorded_protocol``), so evaluating
    reproduces it.
    """
    from safetensors.torch import load as load_safetensors

    from wmlab.checkpoint import checkpoint_exists, read_info, save_checkpoint
    from wmlab.runs import prepare_run_dir

    folder = agent_folder(name, root)
    metadata = read_metadata(name, root)
    blobs = _verified_files(name, folder, metadata)
    # the agent as a run of its own: no paths into the machine it was trained on, and one
    # iteration (an agent exported from iteration 2 carries the profile's iterations and
    # es.init_from, which name that machine's previous iteration)
    base = [f'run.root="{runs_root or "runs"}"', f'run.name="pretrained-{name}"',
            'collect.out=""', 'collect.agent_run=""', 'vae.init_from=""',
            'mdrnn.init_from=""', 'es.init_from=""', "run.iterations=1", "run.later=[]"]
    score = metadata.get("score") or {}
    if recorded_protocol and score.get("episodes"):
        base += [f"eval.episodes={int(score['episodes'])}",
                 f"eval.seed={int(score['first_seed'])}",
                 f'eval.backend="{score.get("backend", "")}"']
    cfg = load_config_file(folder / CONFIG, [*base, *overrides])
    folders = {"vision": RunLayout.of(cfg).vision, "memory": RunLayout.of(cfg).memory,
               "controller": RunLayout.of(cfg).controller}
    for part in _parts():  # V before M: M's sidecar names the V it reads
        sha = metadata["files"][part.file]["sha256"]
        target = folders[part.folder]
        info = {**metadata["sidecars"][part.key], "pretrained": name, "pretrained_sha256": sha}
        if part.key == "memory":
            info["series"] = read_info(folders["vision"], _part("vision").checkpoint
                                       )["fingerprint"]
        if checkpoint_exists(target, part.checkpoint):
            current = read_info(target, part.checkpoint)
            if current.get("pretrained_sha256") == sha and \
                    current.get("series") == info.get("series"):
                continue
        tensors = load_safetensors(blobs[part.file])
        weights = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
        save_checkpoint(target, part.checkpoint, int(info.get("step", 0)), weights, None, info)
    prepare_run_dir(cfg)
    return cfg


def _part(key: str) -> Part:
    return next(p for p in _parts() if p.key == key)


# ---------------------------------------------------------------------------------------------
# Scores


def record_score(name: str, result: Any, root: str | Path | None = None,
                 float32: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write an evaluation (``EvalResult``) of the shipped weights into its metadata."""
    folder = agent_folder(name, root)
    metadata = read_metadata(name, root)
    score = {"mean": result.mean, "std": result.std, "episodes": result.episodes,
             "first_seed": result.seeds[0], "last_seed": result.seeds[-1],
             "env": result.env, "backend": result.backend, "where": result.where,
             "max_steps": result.extra.get("max_steps"), "weights": metadata["dtype"],
             "returns": result.returns, "machine": machine_key(),
             "evaluated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if float32 is not None:
        score["float32"] = float32
    metadata["score"] = score
    _write_metadata(folder, metadata)
    return metadata


def machine_key() -> dict[str, Any]:
    """What an episode's exact returns depend on besides the weights and the seeds: the CPU
    model and its vector instruction sets (they pick the kernels, hence the last bits of
    every activation, and CarRacing's physics amplifies those into other episodes)."""
    cpu = cpu_description()
    return {"model": cpu["model"], "flags": list(cpu["flags"])}


def same_protocol(score: dict[str, Any], result: Any) -> bool:
    """Whether ``result`` played the recorded score's episodes (seeds and backend)."""
    return (score["episodes"] == result.episodes and score["first_seed"] == result.seeds[0]
            and score["backend"] == result.backend)


def record_machine_score(name: str, result: Any, root: str | Path | None = None
                         ) -> dict[str, Any]:
    """Add this machine's returns on the recorded episodes to the metadata (replacing an
    earlier record of the same machine), so that here they reproduce exactly too."""
    folder = agent_folder(name, root)
    metadata = read_metadata(name, root)
    score = metadata.get("score")
    if not score or not same_protocol(score, result):
        raise WmlabError(f"'{name}': a machine's returns are recorded on the episodes of its "
                         "recorded score only: evaluate without --episodes/--eval-backend")
    here = machine_key()
    others = [m for m in score.get("other_machines", []) if m["machine"] != here]
    if score.get("machine") != here:
        others.append({"machine": here, "mean": result.mean, "std": result.std,
                       "returns": result.returns,
                       "evaluated": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    score["other_machines"] = others
    _write_metadata(folder, metadata)
    return metadata


def describe(metadata: dict[str, Any]) -> str:
    """One line per shipped agent for ``wmlab pretrained``."""
    score = metadata.get("score")
    shown = (f"{score['mean']:.1f} +- {score['std']:.1f} over {score['episodes']} episodes"
             if score else "score not measured")
    size = metadata.get("size_bytes", 0) / 1e6
    return (f"{metadata['name']:<12} {metadata['env']:<10} {metadata['preset']}/"
            f"{metadata['profile']:<8} {size:5.1f} MB  {shown}")


