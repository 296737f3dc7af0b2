"""The agent: V + M + C stepping a batch of real environments, or C stepping M's dream.

Real env, per step and for the whole batch at once: one V encode of every running env's
frame, z *sampled* from V's posterior (SPEC 5), one batched C forward over [z, h] / [z, c, h]
for all population members, the env step, one M step on [z, a(, restart)]. The restart
flag is 1 on the first step when M has that input, as in M's training data. A look-ahead
C (``controller.lookahead``) first steps M once for every action of every row (B x A rows,
``MDNRNN.advance_each``) and scores the actions on M's states after them; the chosen
action's state is then M's step, not computed again.

Determinism: the noise that samples z for an env comes from a generator keyed by that env's
seed alone, so an episode's return depends only on (seed, controller) and the size of the
batch it runs in (float32 products round differently at other sizes), never on its slot, job
or worker. Together with jobs that are split the same way on every evaluation engine, that
makes the serial, process and Ray engines agree exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from wmlab.controller.model import (
    ControllerShape,
    clock_features,
    controller_features,
    controller_shape,
    lookahead_features,
    lookahead_forward,
    population_forward,
)
from wmlab.device import resolve_bf16
from wmlab.dream import BatchedDream, DreamSettings, DreamStart, EnsembleDream
from wmlab.dream.calibration import dream_settings
from wmlab.dream.shield import Shield, ShieldSettings
from wmlab.envs import env_options
from wmlab.envs.repeat import agent_steps
from wmlab.envs.spec import EnvSpec
from wmlab.errors import WmlabError
from wmlab.evaluators import Rollouts
from wmlab.memory.model import MDNRNN
from wmlab.runs import RunLayout
from wmlab.shipped import agent_config
from wmlab.vision.int8 import Int8Encoder
from wmlab.vision.model import ConvVAE, PackedEncoder, frames_to_tensor

NOISE_BLOCK = 64  # steps of z-noise drawn at once per env (a numpy call per block, not step)


@dataclass
class AgentModels:
    """What a rollout needs: M always, V for real envs, starts for dreams."""

    spec: EnvSpec
    mdrnn: MDNRNN
    features: str  # z, zh or zch
    shape: ControllerShape
    vae: ConvVAE | None = None
    start: DreamStart | None = None
    vae_bf16: bool = False  # encode real frames in bf16, as the run's series were (vae.bf16)
    # V's encoder for acting: packed (controller.packed_encoder) or int8 (int8_encoder);
    # None: V's own convolutions
    acting_encoder: PackedEncoder | Int8Encoder | None = None
    # a look-ahead C (controller.lookahead): the action vectors of the A actions it scores
    # (row a: action a); None for a C that reads [z, h] itself
    candidates: torch.Tensor | None = None
    # the ensemble's other Ms (mdrnn.ensemble), stepped beside ``mdrnn`` in the dream
    ensemble: tuple[MDNRNN, ...] = ()
    # M's look-ahead overruling C in real envs (the [shield] section); None: C acts alone
    shield: ShieldSettings | None = None
    # the scale of V's posterior noise in z (controller.z_noise): 1 samples z as the paper,
    # 0 acts on V's mean
    z_noise: float = 1.0


def build_models(spec: EnvSpec, mdrnn: MDNRNN, vae: ConvVAE | None, features: str,
                 hidden: int, bias: bool, start: DreamStart | None = None,
                 vae_bf16: bool = False, packed_encoder: bool = False,
                 lookahead: bool = False, int8_encoder: bool = False,
                 clock: tuple[int, ...] = (), shield: ShieldSettings | None = None,
                 z_noise: float = 1.0) -> AgentModels:
    """Check that V, M and the env fit together and derive C's shape from them
    (``lookahead``: the look-ahead C of ``controller.lookahead``; ``clock``: the periods of
    controller.clock; ``shield``: M's look-ahead overruling C, the [shield] section;
    ``z_noise``: controller.z_noise)."""
    m = mdrnn.shape
    if vae is not None and vae.z_dim != m.z_dim:
        raise WmlabError(f"V has z_dim {vae.z_dim} but M was trained on z_dim {m.z_dim}: "
                         "retrain M on this V's encodings (wmlab encode, wmlab train-mdrnn)")
    if m.action_dim != spec.action_dim:
        raise WmlabError(f"M takes actions of size {m.action_dim} but env '{spec.name}' has "
                         f"{spec.action_dim}: M was trained for another environment")
    shape = controller_shape(features, m.z_dim, m.hidden, spec.controller_outputs, hidden,
                             bias, lookahead, m.reward_head, clock)
    candidates = _candidates(spec) if lookahead else None
    if shield is not None:
        _check_shield(spec, mdrnn, lookahead)
    if vae is not None:
        # Channels-last convolutions: ~1.3-1.8x faster encoding on CPU (frames arrive as
        # HWC uint8, which is already that layout).
        vae = vae.eval().to(memory_format=torch.channels_last)
    bf16 = vae_bf16 and vae is not None
    acting: PackedEncoder | Int8Encoder | None = None
    if vae is not None and int8_encoder:
        acting = Int8Encoder(vae.encoder, vae.decoder)
    elif vae is not None and packed_encoder:
        acting = PackedEncoder(vae.encoder, torch.bfloat16 if bf16 else torch.float32)
    return AgentModels(spec=spec, mdrnn=mdrnn.eval(), features=features, shape=shape, vae=vae,
                       start=start, vae_bf16=bf16, acting_encoder=acting,
                       candidates=candidates, shield=shield, z_noise=z_noise)


def _check_shield(spec: EnvSpec, mdrnn: MDNRNN, lookahead: bool) -> None:
    """The shield holds each of the env's moves in turn: it needs a list of moves, an M
    that predicts ends, and a C that proposes one move (a look-ahead C already steps M)."""
    if spec.action_kind not in ("doom", "discrete"):
        raise WmlabError(f"shield.window: the shield tries each of an env's moves, and env "
                         f"'{spec.name}' has {spec.action_kind} actions: set shield.window = 0")
    if not mdrnn.shape.done_head:
        raise WmlabError("shield.window: M has no done head, so its dream cannot say what "
                         "ends an episode: set shield.window = 0 (or train M with "
                         "mdrnn.done_head = true)")
    if lookahead:
        raise WmlabError("shield.window and controller.lookahead both step M before each "
                         "move: use one of them")


def _env_moves(spec: EnvSpec) -> np.ndarray:
    """Every env action of a discrete env, or Doom's three moves."""
    return np.arange(3 if spec.action_kind == "doom" else spec.controller_outputs)


def _candidates(spec: EnvSpec) -> torch.Tensor:
    """The (A, action_dim) action vectors a look-ahead C scores: every action of a discrete
    env, each as M reads it. Other envs have no list of actions to try (a Box is a
    continuum, Doom's C emits one value that thresholds pick the action from)."""
    if spec.action_kind != "discrete":
        raise WmlabError(f"controller.lookahead scores each of a discrete env's actions, but "
                         f"env '{spec.name}' has {spec.action_kind} actions: set "
                         "controller.lookahead = false")
    actions = np.arange(spec.controller_outputs)
    return torch.from_numpy(spec.action_vector(actions)).float()


class EnvNoise:
    """Standard normal noise for sampling z: each env its own stream, seeded by its episode's
    seed, drawn NOISE_BLOCK steps at a time (one numpy call per block, not per step)."""

    def __init__(self, num_envs: int, z_dim: int) -> None:
        self.z_dim = z_dim
        self.rngs = [np.random.default_rng([0, 4101]) for _ in range(num_envs)]
        self.blocks = np.zeros((num_envs, NOISE_BLOCK, z_dim), np.float32)
        self.offsets = np.full(num_envs, NOISE_BLOCK)

    def reset(self, env: int, seed: int) -> None:
        """Start env ``env``'s stream for the episode of ``seed``."""
        self.rngs[env] = np.random.default_rng([int(seed), 4101])
        self.offsets[env] = NOISE_BLOCK

    def next(self) -> np.ndarray:
        """(B, z) noise for the next step of every env."""
        for env in np.flatnonzero(self.offsets >= NOISE_BLOCK):
            self.blocks[env] = self.rngs[env].standard_normal((NOISE_BLOCK, self.z_dim),
                                                              dtype=np.float32)
            self.offsets[env] = 0
        out = self.blocks[np.arange(len(self.rngs)), self.offsets]
        self.offsets += 1
        return out


def _member_params(params: np.ndarray | torch.Tensor, shape: ControllerShape) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(params, dtype=np.float32))
    if tensor.ndim != 2 or tensor.shape[1] != shape.num_params:
        raise WmlabError(f"controller parameters must be (members, {shape.num_params}), got "
                         f"{tuple(tensor.shape)}: the controller was made for another V, M "
                         "or controller config")
    return tensor


class Acted(NamedTuple):
    """C's step for a batch: raw outputs, env actions, M's action vectors, and M's next
    (h, c) where the look-ahead has already computed them (None: step M on the actions)."""

    raw: np.ndarray
    env_actions: np.ndarray
    vectors: np.ndarray
    next_state: tuple[torch.Tensor, torch.Tensor] | None = None


def _act(models: AgentModels, params: torch.Tensor, z: torch.Tensor, h: torch.Tensor,
         c: torch.Tensor, restart: torch.Tensor, members: int,
         mask: np.ndarray | None = None, steps: torch.Tensor | None = None) -> Acted:
    """One batched C forward for all members, for the B = members x rollouts rows of ``z``
    (rows grouped by member) in M's state (h, c, ``restart``: 1 on an episode's first step);
    ``steps``: each row's steps since its episode began, which a C with a clock reads."""
    if models.candidates is not None:
        return _act_ahead(models, params, z, h, c, restart, members, mask)
    clock = None
    if models.shape.clock:
        if steps is None:
            raise WmlabError("this controller reads a clock (controller.clock): its rollouts "
                             "must count each episode's steps")
        clock = clock_features(steps, models.shape.clock)
    feats = controller_features(models.features, z, h, c, clock)
    raw = population_forward(models.shape, params, feats.reshape(members, -1, feats.shape[-1]))
    raw_np = raw.reshape(len(z), -1).numpy()
    env_actions = models.spec.to_env_action(raw_np, mask)
    return Acted(raw_np, env_actions, models.spec.action_vector(env_actions))


def _act_ahead(models: AgentModels, params: torch.Tensor, z: torch.Tensor, h: torch.Tensor,
               c: torch.Tensor, restart: torch.Tensor, members: int,
               mask: np.ndarray | None) -> Acted:
    """The look-ahead C: M stepped from each row's state once per action (B x A rows), each
    action scored on M's state after it (and the reward M predicts for it), the scores
    masked and argmaxed as any discrete C's logits. The chosen action's (h', c') is M's
    next state: the step on that action is the one already taken here."""
    m = models.mdrnn
    h_next, c_next = m.advance_each(z, models.candidates, restart, h, c)
    feats = lookahead_features(models.features, h_next, c_next, m.predicted_reward(h_next))
    scores = lookahead_forward(models.shape, params,
                               feats.reshape(members, -1, *feats.shape[1:]))
    raw = scores.reshape(len(z), -1).numpy()
    env_actions = models.spec.to_env_action(raw, mask)
    rows, chosen = torch.arange(len(z)), torch.from_numpy(env_actions)
    return Acted(raw, env_actions, models.spec.action_vector(env_actions),
                 (h_next[rows, chosen], c_next[rows, chosen]))


def _sample_z(models: AgentModels, frames: np.ndarray, eps: np.ndarray) -> torch.Tensor:
    """z sampled from V's posterior for (B, 64, 64, 3) frames, with the given noise; V runs
    in bf16 under vae.bf16 (as the encode stage did), packed under controller.packed_encoder,
    in int8 under controller.int8_encoder; the noise scaled by controller.z_noise."""
    if models.acting_encoder is not None:
        mu, logvar = models.acting_encoder(torch.from_numpy(frames))
    else:
        pixels = frames_to_tensor(torch.from_numpy(frames), channels_last=True)
        with torch.autocast(pixels.device.type, dtype=torch.bfloat16,
                            enabled=models.vae_bf16):
            mu, logvar = models.vae.encode(pixels)
        mu, logvar = mu.float(), logvar.float()
    # x * 1.0 is exact: at the default the sample is bit for bit the paper's
    return mu + torch.exp(0.5 * logvar) * (models.z_noise * torch.from_numpy(eps))


def _memory_step(m: MDNRNN, z: torch.Tensor, vectors: np.ndarray, h: torch.Tensor,
                 c: torch.Tensor, restart: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M advanced one step on [z, a(, restart)] from (h, c): the new (h, c), each (B, H)."""
    return m.advance(z, torch.from_numpy(vectors).float(), restart, h, c)


class Agent:
    """V + M + C acting in B envs at once: the one step loop of every real rollout, of
    collection by a trained agent, of the evaluation and of the play window.

    Each step encodes the envs' frames with V, samples z from V's posterior (each env's
    noise from its episode seed, so an episode depends on its seed alone), lets C act on
    [z, h] (z alone, or [z, c, h], per ``controller.inputs``; then the clock's inputs, from
    each env's steps since its reset, under ``controller.clock``) and advances M on (z, the
    action). ``params`` is one controller (n,), or P of them (P, n) acting in B = P x R envs
    grouped by member (CMA-ES's population).

    >>> from wmlab import Agent, make_env
    >>> agent = Agent.load("carracing")  # a shipped agent's name, or a run directory
    >>> env = make_env("carracing")
    >>> frame, _ = env.reset(seed=7)
    >>> agent.reset(seed=7)
    >>> action = agent.act(frame)  # (64, 64, 3) uint8 -> the env's action

    An agent trained with ``env.action_repeat`` k acts every k frames: make its env with
    ``make_env(name, action_repeat=agent.action_repeat)``.
    """

    def __init__(self, models: AgentModels, params: np.ndarray, num_envs: int = 1,
                 action_repeat: int = 1) -> None:
        if models.vae is None:
            raise WmlabError("an agent acting in real envs needs V: load the run's vision "
                             "model")
        params = np.asarray(params, dtype=np.float32)
        self.theta = _member_params(params if params.ndim == 2 else params[None], models.shape)
        self.members = len(self.theta)
        if num_envs < 1 or num_envs % self.members:
            raise WmlabError(f"{num_envs} envs cannot be shared by {self.members} controllers: "
                             "give each the same number of envs")
        self.models, self.num_envs = models, num_envs
        self.action_repeat = action_repeat  # env frames per action (its run's env.action_repeat)
        m = models.mdrnn.shape
        self.noise = EnvNoise(num_envs, m.z_dim)
        self.z = torch.zeros(num_envs, m.z_dim)
        self.h = torch.zeros(num_envs, m.hidden)
        self.c = torch.zeros(num_envs, m.hidden)
        self.restart = torch.ones(num_envs, 1)
        self.steps = torch.zeros(num_envs, dtype=torch.int64)  # each episode's, for a clock
        self.raw = np.zeros((num_envs, models.spec.controller_outputs), np.float32)
        self.shield: Shield | None = None
        if models.shield is not None:
            moves = _env_moves(models.spec)
            self.shield = Shield(models.mdrnn, models.shield,
                                 torch.from_numpy(models.spec.action_vector(moves)), moves,
                                 num_envs)

    @classmethod
    def load(cls, source: str, num_envs: int = 1, runs_root: str | None = None) -> Agent:
        """The trained agent of a run directory, or of a shipped agent (``wmlab
        pretrained`` lists them; it is materialized as a run under ``runs_root``)."""
        return cls.of_run(agent_config(source, runs_root), num_envs)

    @classmethod
    def of_run(cls, cfg: Any, num_envs: int = 1, backend: str | None = None) -> Agent:
        """The trained agent of the run ``cfg`` describes: its V, M and best scored C."""
        from wmlab.controller.cmaes import load_controller_params
        from wmlab.controller.model import check_shape

        models = workload_from_config(cfg, "real", backend).load()
        params, info = load_controller_params(RunLayout.of(cfg).controller)
        check_shape(info, models.shape, cfg.controller.inputs, info["source"])
        return cls(models, params, num_envs, cfg.env.action_repeat)

    def reset(self, seed: int | Sequence[int] = 0, envs: Sequence[int] | None = None) -> None:
        """Start new episodes in ``envs`` (default: all), their z-noise from ``seed`` (one
        per env, or one for a single env): pass the seeds the envs were reset with."""
        envs = range(self.num_envs) if envs is None else envs
        seeds = [seed] if np.isscalar(seed) else list(seed)
        if len(seeds) != len(envs):
            raise WmlabError(f"{len(seeds)} seeds for {len(envs)} envs: give one seed per env")
        for env, one in zip(envs, seeds, strict=True):
            self.noise.reset(env, int(one))
            self.h[env], self.c[env], self.restart[env] = 0.0, 0.0, 1.0
            self.steps[env] = 0
            if self.shield is not None:
                self.shield.reset(env, int(one))

    @torch.no_grad()
    def observe(self, frames: np.ndarray, running: np.ndarray | None = None) -> torch.Tensor:
        """Sample z for the envs' (B, 64, 64, 3) frames; only ``running`` envs (a (B,)
        mask, default all) are encoded, the others keep their last z. Returns z (B, z)."""
        every = running is None or bool(running.all())
        rows = slice(None) if every else np.flatnonzero(running)
        noise = self.noise.next()
        self.z[rows] = _sample_z(self.models, frames if every else frames[rows], noise[rows])
        return self.z

    @torch.no_grad()
    def decide(self, mask: np.ndarray | None = None, running: np.ndarray | None = None,
               replace: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """C's actions for the last observed z (``mask``: the valid actions of discrete
        envs), then M advanced on them for the ``running`` envs. Returns the env actions.
        ``replace`` (B, outputs) raw -> raw: other moves taken in place of C's (a collection
        that explores), M advanced on those, as on any action the env took."""
        acted = _act(self.models, self.theta, self.z, self.h, self.c, self.restart,
                     self.members, mask, self.steps)
        if self.shield is not None:
            acted = self._shielded(acted, mask, running)
        if replace is not None:
            raw = replace(acted.raw)
            env_actions = self.models.spec.to_env_action(raw, mask)
            acted = Acted(raw, env_actions, self.models.spec.action_vector(env_actions))
        self.raw = acted.raw
        m = self.models.mdrnn
        every = running is None or bool(running.all())
        rows = slice(None) if every else np.flatnonzero(running)
        if acted.next_state is not None:  # the look-ahead has stepped M on these actions
            h, c = acted.next_state if every else (acted.next_state[0][rows],
                                                   acted.next_state[1][rows])
        else:
            h, c = _memory_step(m, self.z[rows], acted.vectors[rows], self.h[rows],
                                self.c[rows], self.restart[rows])
        if every:  # new tensors, not written in place: callers may hold the last h
            self.h, self.c = h, c
        else:
            self.h[rows], self.c[rows] = h, c
        self.steps[rows] += 1
        self.restart.zero_()
        return acted.env_actions

    def _shielded(self, acted: Acted, mask: np.ndarray | None, running: np.ndarray | None
                  ) -> Acted:
        """C's moves where M's look-ahead does not overrule them, its safest hold where it
        does; the raw outputs of overruled envs are those of the hold (what collection
        records and the env maps back to the same move)."""
        if mask is not None:
            raise WmlabError("shield.window: this env reports valid actions, and the shield "
                             "would hold moves regardless of them: set shield.window = 0")
        per_member = self.num_envs // self.members

        def c_moves(z: torch.Tensor, h: torch.Tensor, c: torch.Tensor, restart: torch.Tensor,
                    envs: np.ndarray, t: int) -> torch.Tensor:
            rows = torch.as_tensor(envs)
            inner = _act(self.models, self.theta.index_select(0, rows // per_member), z, h, c,
                         restart, len(envs), None, self.steps.index_select(0, rows) + t)
            return torch.from_numpy(inner.vectors)

        spec = self.models.spec
        actions = self.shield.guard(acted.env_actions, c_moves, self.z, self.h, self.c,
                                    self.restart, running)
        changed = actions != acted.env_actions
        if not changed.any():
            return acted
        raw = acted.raw.copy()
        raw[changed] = spec.action_vector(actions[changed])
        return Acted(raw, actions, spec.action_vector(actions))

    def act_batch(self, frames: np.ndarray, mask: np.ndarray | None = None,
                  running: np.ndarray | None = None) -> np.ndarray:
        """One step of all B envs: (B, 64, 64, 3) frames -> their actions."""
        self.observe(frames, running)
        return self.decide(mask, running)

    def act(self, frame: np.ndarray, mask: np.ndarray | None = None) -> Any:
        """One step of a single env (``num_envs`` = 1): a (64, 64, 3) frame -> its action."""
        if self.num_envs != 1:
            raise WmlabError(f"act() steps one env; this agent has {self.num_envs}: use "
                             "act_batch")
        actions = self.act_batch(np.asarray(frame)[None],
                                 None if mask is None else np.asarray(mask)[None])
        return actions[0]


Recorder = Callable[[dict[str, Any]], None]


@torch.no_grad()
def run_real(models: AgentModels, env_batch: Any, params: np.ndarray, seeds: np.ndarray,
             record: Recorder | None = None, stall_steps: int = 0, cap: int = 0,
             steps: np.ndarray | None = None) -> np.ndarray:
    """Episodes of real envs: ``params`` (P, n), ``seeds`` (P, R) -> returns (P, R).

    ``env_batch`` must hold P * R envs. ``record`` (for videos) is called every step with
    the first env's frame, z and V's reconstruction. ``stall_steps`` > 0 ends an episode
    after that many steps in a row without a positive reward (CarRacing: no new tile) and
    charges the steps it had left, up to ``cap``, at its mean reward over the stall (on
    CarRacing's grass the -0.1 of every frame, so the return is the one the whole episode
    would have had if the car never found the road again); 0 leaves episodes as they are.
    ``steps``, if given, a (P, R) array, receives each episode's env steps.
    """
    seeds = np.asarray(seeds, dtype=np.int64)
    members, per_member = seeds.shape
    batch = members * per_member
    if env_batch.num_envs != batch:
        raise WmlabError(f"env batch has {env_batch.num_envs} envs for {batch} rollouts")
    agent = Agent(models, params, batch)
    obs = env_batch.reset([int(s) for s in seeds.ravel()])
    agent.reset(seeds.ravel())
    returns = np.zeros(batch, dtype=np.float64)
    running = np.ones(batch, dtype=bool)
    stall = _Stall(batch, stall_steps, cap) if stall_steps > 0 else None
    lengths = np.zeros(batch, dtype=np.int64)
    while running.any():
        lengths += running
        # only running envs are encoded and advanced: finished ones keep their last state
        agent.observe(obs, running)
        if record is not None and running[0]:
            record({"frame": obs[0], "z": agent.z[0].clone(), "vae": models.vae})
        obs, rewards, terminated, truncated = env_batch.step(
            agent.decide(env_batch.masks, running))
        returns += np.where(running, rewards, 0.0)
        running = running & ~(terminated | truncated)
        if stall is not None:
            stalled = stall.update(rewards, running)
            if stalled.size:
                returns[stalled] += stall.charge(stalled, lengths[stalled])
                env_batch.end(stalled)
                running[stalled] = False
    if steps is not None:
        steps[...] = lengths.reshape(members, per_member)
    return returns.reshape(members, per_member)


class _Stall:
    """Per env: steps since its last positive reward, and what those steps paid."""

    def __init__(self, batch: int, limit: int, cap: int) -> None:
        self.limit, self.cap = limit, cap
        self.since = np.zeros(batch, dtype=np.int64)
        self.paid = np.zeros(batch, dtype=np.float64)  # rewards summed since then

    def update(self, rewards: np.ndarray, running: np.ndarray) -> np.ndarray:
        """Count one step of the envs still running (those that just ended no longer
        count); the ids that have now stalled."""
        progress = rewards > 0
        self.since = np.where(progress, 0, self.since + running)
        self.paid = np.where(progress, 0.0, self.paid + np.where(running, rewards, 0.0))
        return np.flatnonzero(running & (self.since >= self.limit))

    def charge(self, ids: np.ndarray, taken: np.ndarray) -> np.ndarray:
        """The reward of the steps ``ids`` had left after ``taken``, at their mean over
        the stall."""
        left = np.maximum(self.cap - taken, 0)
        return self.paid[ids] / self.since[ids] * left


@torch.no_grad()
def run_dream(models: AgentModels, params: np.ndarray, seeds: np.ndarray,
              settings: DreamSettings, compact: bool = True,
              steps: np.ndarray | None = None) -> np.ndarray:
    """Dream episodes, all members' rollouts as one batched dream: (P, n), (P, R) -> (P, R).

    ``compact=False`` steps every row to the last dream's end (the naive way, for benchmarks).
    ``steps``, if given, a (P, R) array, receives each dream's length.
    """
    if models.start is None:
        raise WmlabError("dream rollouts need M's first-frame latents (memory/initial_z): "
                         "train M with `wmlab train-mdrnn`")
    seeds = np.asarray(seeds, dtype=np.int64)
    members, per_member = seeds.shape
    theta = _member_params(params, models.shape)
    dream = EnsembleDream((models.mdrnn, *models.ensemble), models.start, settings) \
        if models.ensemble else BatchedDream(models.mdrnn, models.start, settings)
    dream.compact = compact
    z = dream.reset(seeds.ravel())
    returns = torch.zeros(len(z), dtype=torch.float64)
    done = torch.zeros(len(z), dtype=torch.bool)
    lengths = torch.zeros(len(z), dtype=torch.int64)
    while not bool(done.all()):
        # a look-ahead C steps M from the dream's state for its choice (float32, whatever
        # dream.precision); the dream then steps on that choice by its own rules
        acted = _act(models, theta, z, dream.hidden, dream.cell, dream.restart, members,
                     steps=lengths)
        lengths += ~done
        z, reward, done = dream.step(torch.from_numpy(acted.vectors))
        returns += reward.double()
    if steps is not None:
        steps[...] = lengths.numpy().reshape(members, per_member)
    return returns.numpy().reshape(members, per_member)


# ---------------------------------------------------------------------------------------------
# Workloads: what evaluator workers build once (V and M loaded, env batches kept)


@dataclass(frozen=True)
class RolloutWorkload:
    """A picklable description of rollouts: real envs (``kind='real'``) or M's dream."""

    kind: str  # real or dream
    vision_folder: str
    memory_folder: str
    env: str
    backend: str | None
    features: str
    hidden: int = 0
    bias: bool = True
    max_steps: int = 0  # real episodes' cap in env frames (0 = the env's own)
    action_repeat: int = 1  # env.action_repeat: env frames per step of the agent
    dream: DreamSettings | None = None  # the dream's rules (kind "dream")
    vae_bf16: bool = False  # vae.bf16 where the hardware runs it: V as in the encode stage
    packed_encoder: bool = False  # controller.packed_encoder: V's encoder packed for acting
    int8_encoder: bool = False  # controller.int8_encoder: V's encoder in int8 for acting
    stall_steps: int = 0  # es.stall_steps: end real episodes that stopped scoring; 0 = off
    real_envs: int = 0  # es.real_envs: a job's real rollouts in groups of this many; 0 = all
    lookahead: bool = False  # controller.lookahead: C scores M's state after each action
    ensemble: tuple[str, ...] = ()  # the folders of the dream's other Ms (mdrnn.ensemble)
    clock: tuple[int, ...] = ()  # controller.clock: the periods of the clock C reads
    shield: ShieldSettings | None = None  # [shield]: M's look-ahead in real envs; None: off
    z_noise: float = 1.0  # controller.z_noise: V's posterior noise in z (0: V's mean)

    def load(self) -> AgentModels:
        from wmlab.checkpoint import load_checkpoint
        from wmlab.envs import get_spec
        from wmlab.memory.model import INITIAL_Z, load_mdrnn
        from wmlab.vision.model import load_vae

        mdrnn, _ = load_mdrnn(self.memory_folder)
        vae = load_vae(self.vision_folder)[0] if self.kind == "real" else None
        start = None
        if self.kind == "dream":
            ckpt = load_checkpoint(self.memory_folder, INITIAL_Z, with_state=False)
            start = DreamStart(ckpt.weights["mu"].float(), ckpt.weights["logvar"].float())
        # silent: every worker builds this, and the encode stage has said it once already
        bf16 = resolve_bf16(self.vae_bf16, torch.device("cpu"), log=lambda message: None)
        models = build_models(get_spec(self.env), mdrnn, vae, self.features, self.hidden,
                              self.bias, start, bf16, self.packed_encoder, self.lookahead,
                              self.int8_encoder, self.clock,
                              self.shield if self.kind == "real" else None, self.z_noise)
        others = tuple(load_mdrnn(folder)[0].eval() for folder in self.ensemble)
        return dataclasses.replace(models, ensemble=others) if others else models

    def build(self) -> RolloutRunner:
        return RolloutRunner(self, self.load())

    def env_options(self) -> dict[str, int]:
        """The options of the real envs these rollouts run in."""
        return env_options(self.max_steps, self.action_repeat)


class RolloutRunner:
    """A worker's rollout machine; real-env batches are kept and reused by size."""

    def __init__(self, workload: RolloutWorkload, models: AgentModels) -> None:
        self.workload, self.models = workload, models
        self.env_batches: dict[int, Any] = {}

    def env_batch(self, size: int) -> Any:
        if size not in self.env_batches:
            from wmlab.envs import make_batch

            self.env_batches[size] = make_batch(self.workload.env, size, self.workload.backend,
                                                **self.workload.env_options())
        return self.env_batches[size]

    def run(self, params: np.ndarray, seeds: np.ndarray) -> Rollouts:
        seeds = np.asarray(seeds)
        steps = np.zeros(seeds.shape, dtype=np.int64)
        if self.workload.kind == "dream":
            returns = run_dream(self.models, params, seeds, self.workload.dream, steps=steps)
        else:
            returns = self._run_real_groups(np.asarray(params), seeds, steps)
        return Rollouts(returns, steps)

    def _run_real_groups(self, params: np.ndarray, seeds: np.ndarray,
                         steps: np.ndarray) -> np.ndarray:
        """The job's real rollouts in groups of ``real_envs`` envs, one group after another
        (all at once where it is 0 or at least the job's size). Each rollout keeps its
        member's controller and its own seed, so the grouping changes only which envs share
        a batch: a pool of few envs steps each faster (its envs stay in the core's cache)."""
        cap = agent_steps(self.workload.max_steps or self.models.spec.max_steps,
                          self.workload.action_repeat)
        group = self.workload.real_envs
        if group <= 0 or group >= seeds.size:
            return run_real(self.models, self.env_batch(seeds.size), params, seeds,
                            stall_steps=self.workload.stall_steps, cap=cap, steps=steps)
        row_params = np.repeat(params, seeds.shape[1], axis=0)  # (P, n) -> one row a rollout
        row_seeds = seeds.reshape(-1, 1)
        returns = np.empty(seeds.size, dtype=np.float64)
        lengths = np.zeros((seeds.size, 1), dtype=np.int64)
        for start in range(0, seeds.size, group):
            part = slice(start, min(start + group, seeds.size))
            envs = part.stop - part.start
            returns[part] = run_real(self.models, self.env_batch(envs), row_params[part],
                                     row_seeds[part], stall_steps=self.workload.stall_steps,
                                     cap=cap, steps=lengths[part]).ravel()
        steps[...] = lengths.reshape(seeds.shape)
        return returns.reshape(seeds.shape)

    def close(self) -> None:
        for batch in self.env_batches.values():
            batch.close()
        self.env_batches.clear()


def workload_from_config(cfg: Any, kind: str | None = None, backend: str | None = None
                         ) -> RolloutWorkload:
    """The rollouts a run's config describes (``kind`` defaults to es.fitness)."""
    kind = kind or cfg.es.fitness
    dream = kind == "dream"
    return RolloutWorkload(
        kind=kind, vision_folder=RunLayout.of(cfg).vision, memory_folder=RunLayout.of(cfg).memory,
        env=cfg.env.name, backend=(backend if backend is not None else cfg.env.backend) or None,
        features=cfg.controller.inputs, hidden=cfg.controller.hidden,
        bias=cfg.controller.bias,
        max_steps=0 if dream else cfg.env.max_steps, action_repeat=cfg.env.action_repeat,
        dream=dream_settings(cfg) if dream else None,
        vae_bf16=cfg.vae.bf16, packed_encoder=cfg.controller.packed_encoder,
        int8_encoder=cfg.controller.int8_encoder,
        stall_steps=cfg.es.stall_steps if kind == "real" else 0,
        real_envs=cfg.es.real_envs,
        lookahead=cfg.controller.lookahead, clock=tuple(cfg.controller.clock),
        ensemble=RunLayout.of(cfg).memory_members(cfg.mdrnn.ensemble)[1:] if dream else (),
        shield=ShieldSettings.from_config(cfg) if not dream else None,
        z_noise=cfg.controller.z_noise)


@dataclass(frozen=True)
class Exploration:
    """Moves of the collecting agent's own: at each step where none is held, with probability
    ``rate`` a uniform draw of the ``outputs`` named (the others stay C's, per step) is held
    ``hold`` steps, then C acts again. CarRacing's throttle varied under C's steering shows
    M what speed does on the roads C drives, which the agent's own episodes (one pace) and
    brown noise (no driving) do not."""

    rate: float = 0.0
    hold: int = 1
    outputs: tuple[int, ...] = ()  # empty: all

    @classmethod
    def of(cls, config: Any, outputs: int) -> Exploration:
        """A PolicyConfig's exploration, its outputs checked against the env's ``outputs``."""
        named = tuple(int(o) for o in config.explore_outputs)
        wrong = [o for o in named if not 0 <= o < outputs]
        if wrong:
            raise WmlabError(f"collect.explore_outputs {list(named)}: C has {outputs} outputs, "
                             f"numbered 0..{outputs - 1}: name those an exploring move replaces")
        return cls(float(config.explore), int(config.explore_hold), named)


class AgentPolicy:
    """A trained agent (V + M + C of a finished run) as a collection policy.

    Collecting with it gives the data of the next iteration (SPEC section 1): the states a
    trained controller visits, which random policies rarely reach. It has the interface of
    ``wmlab.policies.BatchPolicy``: ``reset(slot, seed)`` starts an episode whose z-noise
    (and exploring moves, ``Exploration``) come from ``seed`` alone, ``act(frames)`` returns
    raw outputs for the whole batch.
    """

    def __init__(self, agent: Agent, explore: Exploration = Exploration()) -> None:
        outputs = agent.models.spec.controller_outputs
        self.agent, self.num_envs, self.outputs = agent, agent.num_envs, outputs
        self.explore = explore
        self.columns = list(explore.outputs) if explore.outputs else list(range(outputs))
        self.rngs = [np.random.default_rng([0, 6311]) for _ in range(agent.num_envs)]
        self.held = np.zeros((agent.num_envs, len(self.columns)), np.float32)
        self.left = np.zeros(agent.num_envs, np.int64)  # steps the held move still lasts

    @classmethod
    def from_run(cls, num_envs: int, outputs: int, run_dir: str,
                 explore: Exploration = Exploration()) -> AgentPolicy:
        """The agent of the finished run ``run_dir`` in ``num_envs`` envs of ``outputs``."""
        from wmlab.config import load_config_file

        try:
            cfg = load_config_file(RunLayout(run_dir.rstrip("/")).config)
        except WmlabError:
            raise WmlabError(f"collect.agent_run: {run_dir} is not a run directory (no "
                             "config.toml): give the run whose controller should act") from None
        agent = Agent.of_run(cfg, num_envs)
        if outputs != agent.models.spec.controller_outputs:
            raise WmlabError(f"the agent of {run_dir} emits "
                             f"{agent.models.spec.controller_outputs} outputs but this env "
                             f"takes {outputs}: it was trained on another environment")
        return cls(agent, explore)

    def reset(self, slot: int, seed: int) -> None:
        self.agent.reset(seed, envs=[slot])
        self.rngs[slot] = np.random.default_rng([int(seed), 6311])
        self.left[slot] = 0

    def act(self, frames: np.ndarray) -> np.ndarray:
        self.agent.observe(frames)
        self.agent.decide(replace=self._explored if self.explore.rate > 0 else None)
        return self.agent.raw.astype(np.float32)

    def _explored(self, raw: np.ndarray) -> np.ndarray:
        """C's raw outputs with the held exploring moves in place."""
        for slot in np.flatnonzero(self.left == 0):
            rng = self.rngs[slot]
            if rng.random() < self.explore.rate:
                self.held[slot] = rng.uniform(-1.0, 1.0, len(self.columns))
                self.left[slot] = self.explore.hold
        out = raw.copy()
        exploring = np.flatnonzero(self.left > 0)
        out[np.ix_(exploring, self.columns)] = self.held[exploring]
        self.left[exploring] -= 1
        return out
