"""M's dream behind the Gymnasium vector-env API."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from wmlab.controller.model import controller_features, feature_size
from wmlab.dream.batched import BatchedDream, DreamStart
from wmlab.dream.calibration import dream_settings
from wmlab.dream.settings import DreamSettings
from wmlab.errors import WmlabError
from wmlab.memory.model import MDNRNN, load_initial_z, load_mdrnn
from wmlab.runs import RunLayout
from wmlab.shipped import agent_config


def _vector_env_base() -> type:
    import gymnasium

    return gymnasium.vector.VectorEnv


class DreamEnv(_vector_env_base()):  # type: ignore[misc]
    """Dreams behind the Gymnasium vector-env API (autoreset mode NEXT_STEP).

    Observations are what a controller sees (``features``: z, [z, h] or [z, c, h]) as float32
    numpy arrays; actions are M's action vectors (B, A). A dream that ended is restarted by
    the next ``step`` call, which ignores its action and returns its first observation with
    reward 0, as Gymnasium's vector envs do. Dream i's k-th episode uses a seed derived from
    (its reset seed, k), so a run is reproducible from the seeds given to ``reset``.
    Terminations come from the done head; truncations from the step cap.

    >>> import numpy as np
    >>> from wmlab import DreamEnv
    >>> env = DreamEnv.load("doom", num_envs=8)  # a shipped agent's M, or a run directory
    >>> obs, _ = env.reset(seed=0)  # (8, 32 + 512 + 512) for Doom's [z, c, h]
    >>> obs, reward, terminated, truncated, _ = env.step(np.zeros((8, 1), np.float32))
    """

    @classmethod
    def load(cls, source: str, num_envs: int = 1, runs_root: str | None = None,
             device: torch.device | str = "cpu") -> DreamEnv:
        """The dream of a run directory's M (or a shipped agent's), with the run's dream
        settings (the ones its C was trained in) and the features its C reads."""
        cfg = agent_config(source, runs_root)
        folder = RunLayout.of(cfg).memory
        model, _ = load_mdrnn(folder, device)
        return cls(model, load_initial_z(folder), dream_settings(cfg, missing_ok=True),
                   num_envs, cfg.controller.inputs, device)

    def __init__(self, model: MDNRNN, start: DreamStart, settings: DreamSettings,
                 num_envs: int, features: str = "zh", device: torch.device | str = "cpu"
                 ) -> None:
        import gymnasium
        from gymnasium.vector.utils import batch_space

        if num_envs < 1:
            raise WmlabError(f"num_envs must be at least 1, got {num_envs}")
        self.dream = BatchedDream(model, start, settings, device)
        self.features_kind = features
        s = model.shape
        size = feature_size(features, s.z_dim, s.hidden)  # refuses an unknown kind
        self.num_envs = num_envs
        self.single_observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (size,),
                                                             np.float32)
        self.single_action_space = gymnasium.spaces.Box(-1.0, 1.0, (s.action_dim,), np.float32)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.metadata = {"autoreset_mode": gymnasium.vector.AutoresetMode.NEXT_STEP}
        self._base = np.zeros(num_envs, dtype=np.int64)
        self._episode = np.zeros(num_envs, dtype=np.int64)
        self._pending = np.zeros(num_envs, dtype=bool)

    def _obs(self) -> np.ndarray:
        d = self.dream
        return controller_features(self.features_kind, d.z, d.h, d.c).cpu().numpy().astype(
            np.float32)

    def _seed_of(self, slot: int) -> int:
        if self._episode[slot] == 0:
            return int(self._base[slot])
        state = np.random.SeedSequence([int(self._base[slot]), int(self._episode[slot])])
        return int(state.generate_state(1, np.uint32)[0])

    def reset(self, *, seed: int | list[int] | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1, np.uint32)[0])
        if isinstance(seed, (int, np.integer)):
            self._base = int(seed) + np.arange(self.num_envs, dtype=np.int64)
        else:
            if len(seed) != self.num_envs:
                raise WmlabError(f"reset got {len(seed)} seeds for {self.num_envs} dreams")
            self._base = np.asarray(seed, dtype=np.int64)
        self._episode[:] = 0
        self._pending[:] = False
        self.dream.reset(self._base)
        return self._obs(), {}

    def step(self, actions: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        restarting = np.flatnonzero(self._pending)
        if len(restarting):
            self._episode[restarting] += 1
            self.dream.reset_rows(restarting, [self._seed_of(i) for i in restarting])
        active = ~self._pending
        _, reward, done = self.dream.step(actions, active=active)
        done_np = done.cpu().numpy() & active
        terminated = self.dream.terminated.cpu().numpy() & done_np
        truncated = done_np & ~terminated
        self._pending = done_np
        rewards = np.where(active, reward.cpu().numpy(), 0.0).astype(np.float32)
        return self._obs(), rewards, terminated, truncated, {}
