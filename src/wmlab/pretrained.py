"""Using shipped agents (``wmlab.shipped``): score and record them, and watch one play.

``evaluate_and_record`` scores a shipped agent's weights through a materialized run and
writes the score into its metadata; ``AgentSession`` is the agent in the ``play`` window
(real frame | V's reconstruction | M's prediction or C's actions).
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wmlab.config import Config
from wmlab.play import RealtimeSession
from wmlab.runs import RunLayout
from wmlab.shipped import (
    _run_config,
    machine_key,
    materialize,
    read_metadata,
    record_score,
    same_protocol,
)


def compare_float32(source: Config, shipped: Any, scratch: str) -> dict[str, Any]:
    """The source run's (float32) returns on the seeds ``shipped`` was scored on, beside
    the shipped (float16) ones. Reuses the run's own evaluation when it used those seeds
    with this controller, else evaluates it (its JSON goes to ``scratch``, not the run)."""

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
    """One line comparing ``result`` with the agent's recorded score: exactly where this CPU
    has a record, otherwise by the paired difference over the same episodes."""
    score = read_metadata(name, root).get("score")
    if not score:
        return (f"no score recorded for '{name}' yet: `wmlab export RUN --name {name} "
                "--evaluate 100` measures and records one")
    recorded = f"recorded score: {score['mean']:.1f} +- {score['std']:.1f}"
    if not same_protocol(score, result):
        return (f"{recorded} over {score['episodes']} episodes (seeds {score['first_seed']}.."
                f"{score['last_seed']}, {score['backend']}); this evaluation used other "
                "episodes")
    here = machine_key()
    mine = next((r for r in [score, *score.get("other_machines", [])]
                 if r.get("machine") == here), None)
    if mine is not None:
        verdict = "reproduced exactly" if result.returns == mine["returns"] else \
            f"differs by {result.mean - mine['mean']:+.3f}"
        return f"recorded score on this CPU: {mine['mean']:.1f} +- {mine['std']:.1f}: {verdict}"
    return f"{recorded} on {_cpu_name(score)}; {_paired_verdict(score['returns'], result)}"


def _cpu_name(score: dict[str, Any]) -> str:
    machine = score.get("machine")
    if not machine:
        return "a CPU it does not name"
    return f"{machine['model']} ({'/'.join(machine['flags']) or 'no AVX2'})"


def _paired_verdict(recorded: Sequence[float], result: Any) -> str:
    """This CPU has no record: its episodes may differ from the recorded ones (the last bits
    of V and M differ between CPUs, and a car's physics turns them into another drive), so
    the score must agree within the noise of the paired difference, not bit for bit."""
    diff = np.asarray(result.returns, dtype=float) - np.asarray(recorded, dtype=float)
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    within = abs(float(diff.mean())) <= 2 * se
    same = int((diff == 0).sum())
    return (f"this CPU ({machine_key()['model']}) has no record: paired difference "
            f"{diff.mean():+.1f} +- {se:.1f} over the same episodes ({same} identical), "
            f"{'within' if within else 'BEYOND'} 2 standard errors; "
            "`--record-machine` records this CPU's returns")


# ---------------------------------------------------------------------------------------------
# Watching an agent play (``wmlab play ENV --pretrained``)

PANEL_SCALE = 3  # 64x64 frames are too small to see
LABEL_H = 16


@dataclass
class AgentSession(RealtimeSession):
    """A real-time session whose actions come from C rather than the keys held.

    It steps one real env with the ``Agent`` every rollout uses (z sampled from V with the
    episode seed's noise stream, C on [z, h] or [z, c, h], then M), so an episode here has
    the return the evaluation gives that seed. The picture shows the real frame, V's
    reconstruction of z and either the frame M predicted one step earlier (the mean of each
    dimension's most likely component, decoded by V) or C's actions as bars. ``recording``
    keeps every picture for a GIF.
    """

    agent: Any = None  # an Agent of one env (wmlab.agent.Agent)
    show_prediction: bool = True
    recording: bool = False
    pictures: list[np.ndarray] = field(default_factory=list)

    @property
    def models(self) -> Any:
        return self.agent.models

    def restart(self) -> None:
        seed, self.seed = self.seed, self.seed + 1
        self.obs = self.env.reset([seed])
        self.agent.reset(seed)
        self.predicted: np.ndarray | None = None
        self.raw = np.zeros(self.models.spec.controller_outputs, np.float32)
        self.mask: np.ndarray | None = None  # the valid actions C chose among (BinPacking)
        self.score, self.steps, self.done = 0.0, 0, False
        self._observe()

    @torch.no_grad()
    def _observe(self) -> None:
        self.z = self.agent.observe(self.obs)
        self._picture = self._compose()
        if self.recording:
            self.pictures.append(self._picture)

    @torch.no_grad()
    def tick(self, pressed: Any) -> None:
        """One agent step (the keys are ignored); a finished episode starts the next."""
        if self.done:
            self.restart()
            return
        # a copy: the env batch updates its masks in place at the step
        mask = None if self.env.masks is None else self.env.masks.copy()
        env_actions = self.agent.decide(mask)
        self.raw, self.mask = self.agent.raw[0], mask
        obs, rewards, terminated, truncated = self.env.step(env_actions)
        self.score += float(rewards[0])
        self.steps += 1
        if self.show_prediction:
            self.predicted = self._predict(self.models.mdrnn.read_out(self.agent.h))
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
    from wmlab.agent import Agent
    from wmlab.envs import env_options, make_batch
    from wmlab.evaluate import scored_env

    _, backend = scored_env(cfg)
    agent = Agent.of_run(cfg, 1, backend)
    env = make_batch(cfg.env.name, 1, backend or None,
                     **env_options(cfg.env.max_steps, cfg.env.action_repeat))
    # An agent trained in M's dream (Doom) lives by M's predictions: show them. One trained
    # in the real env (CarRacing) never used them: show what it does, its actions.
    return AgentSession(env=env, kind=cfg.env.name,
                        seed=cfg.eval.seed if seed is None else seed, agent=agent,
                        show_prediction=cfg.es.fitness == "dream", recording=recording)


def write_pictures_gif(path: str, pictures: list[np.ndarray], fps: int = 20) -> None:
    from wmlab.dream.pictures import write_gif

    write_gif(path, pictures, fps=fps)
