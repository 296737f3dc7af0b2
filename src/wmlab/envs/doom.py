"""DoomTakeCover on ViZDoom directly (its own Gymnasium wrapper adds buffers we never use).

160x120 renders about twice as fast as the default 320x240; the whole screen is resized to
64x64 (this scenario has no HUD). One action per tic (frame skip 1); +1 reward per tic
survived; the episode ends on death (terminated) or at the 2,100-tic cap (truncated).
"""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np

from wmlab.envs.frames import resize_frame
from wmlab.envs.spec import EnvSpec
from wmlab.errors import WmlabError

MAX_STEPS = 2100
# Discrete(3) as ViZDoom's own wrapper numbers it: no-op, left, right. The cfg's buttons are
# MOVE_LEFT, MOVE_RIGHT.
_BUTTONS = ([0, 0], [1, 0], [0, 1])
_RESOLUTIONS = ("160X120", "320X240", "640X480")


def doom_spec() -> EnvSpec:
    return EnvSpec(name="doom", gym_id="VizdoomTakeCover-v1",
                   description="ViZDoom TakeCover at 160x120, 64x64 frames, 2100-tic cap",
                   backends=("vizdoom",), default_backend="vizdoom", reference_backend="vizdoom",
                   max_steps=MAX_STEPS, action_kind="doom", action_dim=1, controller_outputs=1)


class TakeCoverEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, max_steps: int = MAX_STEPS, resolution: str = "160X120",
                 render_mode: str | None = None) -> None:
        import vizdoom as vzd

        if resolution not in _RESOLUTIONS:
            raise WmlabError(f"doom resolution '{resolution}' is not one of "
                             f"{', '.join(_RESOLUTIONS)}")
        game = vzd.DoomGame()
        game.load_config(os.path.join(vzd.scenarios_path, "take_cover.cfg"))
        game.set_screen_resolution(getattr(vzd.ScreenResolution, f"RES_{resolution}"))
        game.set_screen_format(vzd.ScreenFormat.RGB24)
        game.set_window_visible(False)
        game.set_sound_enabled(False)
        game.set_episode_timeout(max_steps)
        game.set_mode(vzd.Mode.PLAYER)
        game.init()
        self.game = game
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(3)
        self.last_screen: np.ndarray | None = None

    def _observe(self) -> np.ndarray:
        state = self.game.get_state()
        if state is not None:  # None once the episode has ended: keep the last screen
            self.last_screen = state.screen_buffer
        return resize_frame(self.last_screen)

    def reset(self, *, seed: int | None = None, options=None):
        super().reset(seed=seed)
        if seed is None:
            seed = int(self.np_random.integers(2**31))
        self.game.set_seed(int(seed) % 2**31)
        self.game.new_episode()
        return self._observe(), {}

    def step(self, action):
        reward = self.game.make_action(_BUTTONS[int(action)], 1)
        finished = self.game.is_episode_finished()
        terminated = finished and self.game.is_player_dead()
        return self._observe(), float(reward), terminated, finished and not terminated, {}

    def render(self):
        return self.last_screen

    def close(self) -> None:
        self.game.close()
