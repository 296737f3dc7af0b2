"""Pretrained agents shipped with the package: export a run's V, M and C, use them anywhere.

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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wmlab.config import Config, load_config_file, to_toml
from wmlab.errors import WmlabError
from wmlab.fsio import atomic_write_bytes
from wmlab.play import RealtimeSession
from wmlab.runs import RunLayout

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
    from wmlab.memory.train import FINAL_WEIGHTS as M_WEIGHTS
    from wmlab.memory.train import INITIAL_Z
    from wmlab.vision.train import FINAL_WEIGHTS as V_WEIGHTS

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


def _check_finished(cfg: Config, allow_unfinished: bool) -> dict[str, Any]:
    """Refuse a run without a trained V, M or C; returns C's sidecar."""
    from wmlab.checkpoint import checkpoint_exists, read_info
    from wmlab.controller.cmaes import BEST_WEIGHTS, MEAN_WEIGHTS
    from wmlab.memory.train import FINAL_WEIGHTS as M_WEIGHTS
    from wmlab.memory.train import INITIAL_Z
    from wmlab.vision.train import FINAL_WEIGHTS as V_WEIGHTS

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


def _stage_records(cfg: Config) -> dict[str, Any]:
    folder = Path(RunLayout.of(cfg).stages)
    records: dict[str, Any] = {}
    if not folder.is_dir():
        return records
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        records[path.stem] = {k: record.get(k) for k in ("status", "started", "finished",
                                                          "seconds", "summary")}
    return records


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

    from wmlab import __version__
    from wmlab.checkpoint import load_checkpoint
    from wmlab.envs import get_spec

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
    base = [f'run.root="{runs_root or "runs"}"', f'run.name="pretrained-{name}"',
            'collect.out=""', 'collect.agent_run=""', 'vae.init_from=""',
            'mdrnn.init_from=""']
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
             "returns": result.returns,
             "evaluated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if float32 is not None:
        score["float32"] = float32
    metadata["score"] = score
    _write_metadata(folder, metadata)
    return metadata


def compare_float32(source: Config, shipped: Any, scratch: str) -> dict[str, Any]:
    """The source run's (float32) returns on the seeds ``shipped`` was scored on, beside
    the shipped (float16) ones. Reuses the run's own evaluation when it used those seeds
    with this controller, else evaluates it (its JSON goes to ``scratch``, not the run)."""
    import copy

    from wmlab.checkpoint import read_info
    from wmlab.controller.cmaes import BEST_WEIGHTS
    from wmlab.evaluate import evaluate_controller

    returns: list[float] | None = None
    path = Path(RunLayout.of(source).scores("eval", shipped.backend))
    fingerprint = read_info(RunLayout.of(source).controller, BEST_WEIGHTS).get("fingerprint")
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            previous = {}
        if previous.get("seeds") == shipped.seeds and \
                previous.get("controller_fingerprint") == fingerprint and \
                previous.get("extra", {}).get("max_steps") == shipped.extra.get("max_steps"):
            returns = [float(r) for r in previous["returns"]]
    reused = returns is not None
    if returns is None:
        cfg = copy.deepcopy(source)
        cfg.eval.seed, cfg.eval.backend = shipped.seeds[0], shipped.backend
        result = evaluate_controller(cfg, episodes=shipped.episodes,
                                     out=f"{scratch}/float32.json")
        returns = result.returns
    ours = np.asarray(shipped.returns, np.float64)
    theirs = np.asarray(returns, np.float64)
    return {"mean": float(theirs.mean()), "std": float(theirs.std()),
            "difference": float(ours.mean() - theirs.mean()),
            "identical_episodes": int(np.sum(ours == theirs)), "episodes": len(theirs),
            "max_episode_difference": float(np.abs(ours - theirs).max()),
            "from_run_evaluation": reused}


def evaluate_and_record(name: str, episodes: int, source: str | Path | Config | None = None,
                        root: str | Path | None = None, overrides: Sequence[str] = ()
                        ) -> dict[str, Any]:
    """Score the shipped weights on ``episodes`` real episodes through a materialized run
    (in a temporary folder) and record the score; with ``source`` (the run it was exported
    from) also the float32 weights' returns on the same seeds. Returns the metadata."""
    import tempfile

    from wmlab.evaluate import evaluate_controller

    with tempfile.TemporaryDirectory(prefix="wmlab-pretrained-") as scratch:
        # the config's own protocol (eval.seed...), not an earlier score's
        cfg = materialize(name, scratch, overrides, root, recorded_protocol=False)
        result = evaluate_controller(cfg, episodes=episodes)
        float32 = None
        if source is not None:  # the same engine and worker settings
            float32 = compare_float32(_run_config(source, overrides), result, scratch)
        return record_score(name, result, root, float32)


def reproduce(name: str, result: Any, root: str | Path | None = None) -> str:
    """One line comparing ``result`` with the agent's recorded score."""
    score = read_metadata(name, root).get("score")
    if not score:
        return (f"no score recorded for '{name}' yet: `wmlab export RUN --name {name} "
                "--evaluate 100` measures and records one")
    same = (score["episodes"] == result.episodes and score["first_seed"] == result.seeds[0]
            and score["backend"] == result.backend)
    if not same:
        return (f"recorded score: {score['mean']:.1f} +- {score['std']:.1f} over "
                f"{score['episodes']} episodes (seeds {score['first_seed']}.."
                f"{score['last_seed']}, {score['backend']}); this evaluation used other "
                "episodes")
    verdict = "reproduced exactly" if result.returns == score["returns"] else \
        f"differs by {result.mean - score['mean']:+.3f}"
    return f"recorded score: {score['mean']:.1f} +- {score['std']:.1f}: {verdict}"


# ---------------------------------------------------------------------------------------------
# Watching an agent play (``wmlab play ENV --pretrained``)

PANEL_SCALE = 3  # 64x64 frames are too small to see
LABEL_H = 16


@dataclass
class AgentSession(RealtimeSession):
    """A real-time session whose actions come from C rather than the keys held.

    It steps one real env exactly as ``agent.run_real`` does (z sampled from V with the
    episode seed's noise stream, C on [z, h] or [z, c, h], then M), so an episode here has
    the return the evaluation gives that seed. The picture shows the real frame, V's
    reconstruction of z and either the frame M predicted one step earlier (the mean of each
    dimension's most likely component, decoded by V) or C's actions as bars. ``recording``
    keeps every picture for a GIF.
    """

    models: Any = None  # AgentModels with V
    params: Any = None  # (n,) controller parameters
    show_prediction: bool = True
    recording: bool = False
    pictures: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        from wmlab.agent import _member_params

        self.theta = _member_params(np.asarray(self.params)[None], self.models.shape)
        super().__post_init__()

    def restart(self) -> None:
        from wmlab.agent import SeedNoise

        m = self.models.mdrnn.shape
        seed, self.seed = self.seed, self.seed + 1
        self.obs = self.env.reset([seed])
        self.noise = SeedNoise(np.array([seed]), m.z_dim)
        self.h, self.c = torch.zeros(1, m.hidden), torch.zeros(1, m.hidden)
        self.flag = torch.ones(1, 1)
        self.predicted: np.ndarray | None = None
        self.raw = np.zeros(self.models.spec.controller_outputs, np.float32)
        self.mask: np.ndarray | None = None  # the valid actions C chose among (BinPacking)
        self.score, self.steps, self.done = 0.0, 0, False
        self._observe()

    @torch.no_grad()
    def _observe(self) -> None:
        from wmlab.agent import _sample_z

        self.z = _sample_z(self.models, self.obs, self.noise.next())
        self._picture = self._compose()
        if self.recording:
            self.pictures.append(self._picture)

    @torch.no_grad()
    def tick(self, pressed: Any) -> None:
        """One agent step (the keys are ignored); a finished episode starts the next."""
        from wmlab.agent import _act, _memory_step

        if self.done:
            self.restart()
            return
        # a copy: the env batch updates its masks in place at the step
        mask = None if self.env.masks is None else self.env.masks.copy()
        raw, env_actions, vectors = _act(self.models, self.theta, self.z, self.h, self.c, 1,
                                         mask)
        self.raw, self.mask = raw[0], mask
        obs, rewards, terminated, truncated = self.env.step(env_actions)
        self.score += float(rewards[0])
        self.steps += 1
        m = self.models.mdrnn
        self.h, self.c = _memory_step(m, self.z, vectors, self.h, self.c, self.flag)
        self.flag.zero_()
        if self.show_prediction:
            self.predicted = self._predict(m.read_out(self.h))
        if bool(terminated[0] or truncated[0]):
            self.done = True
            self.episodes.append(self.score)
            return
        self.obs = obs
        self._observe()

    def _predict(self, out: Any) -> np.ndarray:
        """V's decoding of the mean of each dimension's most likely mixture component."""
        from wmlab.dream.pictures import decode_latents

        component = out.logits.argmax(-1, keepdim=True)
        z = out.means.gather(-1, component).squeeze(-1).reshape(1, -1)
        return decode_latents(self.models.vae, z)[0]

    def _compose(self) -> np.ndarray:
        from wmlab.dream.pictures import decode_latents

        recon = decode_latents(self.models.vae, self.z)[0]
        panels = [("real frame", self.obs[0]), ("V: reconstruction", recon)]
        if self.show_prediction:
            blank = np.full_like(recon, 40)  # nothing predicted before the first step
            panels.append(("M: predicted frame", self.predicted if self.predicted is not None
                           else blank))
        else:
            panels.append(("C: actions", _action_bars(self.raw, self.mask, self.models.spec)))
        return _side_by_side(panels)

    def picture(self) -> np.ndarray:
        return self._picture

    def status(self) -> str:
        end = "  episode over" if self.done else ""
        return f"agent  step {self.steps}  score {self.score:.1f}{end}"


def _side_by_side(panels: list[tuple[str, np.ndarray]]) -> np.ndarray:
    from PIL import Image, ImageDraw

    size = 64 * PANEL_SCALE
    gap = 4
    width = len(panels) * size + (len(panels) - 1) * gap
    canvas = Image.new("RGB", (width, size + LABEL_H), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (label, frame) in enumerate(panels):
        x = i * (size + gap)
        big = np.asarray(frame, np.uint8).repeat(PANEL_SCALE, 0).repeat(PANEL_SCALE, 1)
        canvas.paste(Image.fromarray(big), (x, LABEL_H))
        draw.text((x + 3, 2), label, fill=(255, 255, 255))
    return np.asarray(canvas)


def _action_bars(raw: np.ndarray, mask: np.ndarray | None, spec: Any) -> np.ndarray:
    """A 64x64 panel with one bar per value of the action C took (CarRacing: steer, gas,
    brake), chosen among the valid actions of ``mask`` as the step did."""
    panel = np.full((64, 64, 3), 20, np.uint8)
    values = np.asarray(spec.action_vector(spec.to_env_action(raw[None], mask)),
                        np.float32)[0]
    count = max(1, len(values))
    width = 64 // count
    for i, value in enumerate(values):
        value = float(np.clip(value, -1.0, 1.0))
        x0, x1 = i * width + 3, (i + 1) * width - 3
        top, bottom = (32 - int(30 * value), 32) if value >= 0 else (32, 32 - int(30 * value))
        panel[top:bottom + 1, x0:x1] = (80, 200, 80) if value >= 0 else (220, 80, 80)
        panel[32, :] = 120
    return panel


def agent_session(cfg: Config, seed: int | None = None, recording: bool = False
                  ) -> AgentSession:
    """A session of the run ``cfg``'s agent on its real env (one env, the eval backend)."""
    from wmlab.agent import workload_from_config
    from wmlab.controller.cmaes import load_controller_params
    from wmlab.controller.model import check_shape
    from wmlab.envs import make_batch
    from wmlab.evaluate import scored_env

    _, backend = scored_env(cfg)
    workload = workload_from_config(cfg, "real", backend)
    models = workload.load()
    params, info = load_controller_params(RunLayout.of(cfg).controller)
    check_shape(info, models.shape, cfg.controller.inputs, info["source"])
    options = {"max_steps": workload.max_steps} if workload.max_steps else {}
    env = make_batch(workload.env, 1, workload.backend, **options)
    # An agent trained in M's dream (Doom) lives by M's predictions: show them. One trained
    # in the real env (CarRacing) never used them: show what it does, its actions.
    return AgentSession(env=env, kind=cfg.env.name,
                        seed=cfg.eval.seed if seed is None else seed, models=models,
                        params=params, show_prediction=cfg.es.fitness == "dream",
                        recording=recording)


def write_pictures_gif(path: str, pictures: list[np.ndarray], fps: int = 20) -> None:
    from wmlab.dream.pictures import write_gif

    write_gif(path, pictures, fps=fps)


def describe(metadata: dict[str, Any]) -> str:
    """One line per shipped agent for ``wmlab pretrained``."""
    score = metadata.get("score")
    shown = (f"{score['mean']:.1f} +- {score['std']:.1f} over {score['episodes']} episodes"
             if score else "score not measured")
    size = metadata.get("size_bytes", 0) / 1e6
    return (f"{metadata['name']:<12} {metadata['env']:<10} {metadata['preset']}/"
            f"{metadata['profile']:<8} {size:5.1f} MB  {shown}")


