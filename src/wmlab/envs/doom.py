"""DoomTakeCover on ViZDoom's DoomGame directly (its Gymnasium wrapper is slower).

160x120 renders about twice as fast as the default 320x240, and the whole screen is resized
to 64x64 (this scenario has no HUD). One action per tic (frame skip 1); +1 reward per tic
survived; the episode ends on death (terminated) or at the tic cap (truncated).
"""

from __future__ import annotations

import os
from typing import Any

import gymnasium as gym
import numpy as np

from wmlab.envs.batch import GymnasiumBatch
from wmlab.envs.entry import EnvEntry
from wmlab.envs.frames import FRAME_SHAPE, resize_frame
from wmlab.envs.spec import EnvSpec, check_max_steps
from wmlab.errors import WmlabError

MAX_STEPS = 2100
RESOLUTIONS = ("160X120", "320X240", "640X480")
VIZDOOM_SEED_RANGE = 2**32  # DoomGame.set_seed takes an unsigned 32-bit int
# Button states for Discrete(3), as ViZDoom's own wrapper numbers the actions; the buttons
# are set to [MOVE_LEFT, MOVE_RIGHT] explicitly so the cfg's order cannot change this.
_BUTTONS = ([0.0, 0.0], [1.0, 0.0], [0.0, 1.0])  # no-op, left, right


def doom_spec() -> EnvSpec:
    return EnvSpec(name="doom", gym_id="VizdoomTakeCover-v1",
                   description="ViZDoom TakeCover at 160x120, 64x64 frames, 2100-tic cap",
                   backends=("vizdoom",), default_backend="vizdoom",
                   reference_backend="vizdoom", max_steps=MAX_STEPS, action_kind="doom",
                   action_dim=1, controller_outputs=1, survival_reward=True)


def _new_game(max_steps: int, resolution: str) -> Any:
    import vizdoom as vzd

    # ViZDoom creates ./_vizdoom/ at init and dies ("File exists") when another worker made
    # it in between: on a machine's first run, one of a pool's workers started together
    os.makedirs("_vizdoom", exist_ok=True)
    game = vzd.DoomGame()
    game.load_config(os.path.join(vzd.scenarios_path, "take_cover.cfg"))
    game.set_available_buttons([vzd.Button.MOVE_LEFT, vzd.Button.MOVE_RIGHT])
    game.set_living_reward(1.0)
    game.set_screen_resolution(getattr(vzd.ScreenResolution, f"RES_{resolution}"))
    game.set_screen_format(vzd.ScreenFormat.RGB24)
    game.set_window_visible(False)
    game.set_sound_enabled(False)
    game.set_episode_timeout(max_steps)
    game.set_mode(vzd.Mode.PLAYER)
    game.init()
    return game


class TakeCoverEnv(gym.Env):
    """TakeCover with 64x64 observations and Discrete(3) actions (no-op, left, right).

    ``reset(seed=s)`` makes the episode a function of ``s`` (reduced modulo 2**32) and the
    actions alone. ``render()`` returns the last full screen (120x160 at the default
    resolution). Once the player is dead ViZDoom has no screen, so the final observation
    repeats the last frame seen.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 35}

    def __init__(self, max_steps: int | None = None, resolution: str = "160X120",
                 render_mode: str | None = "rgb_array") -> None:
        if resolution not in RESOLUTIONS:
            raise WmlabError(f"doom resolution '{resolution}' is not one of "
                             f"{', '.join(RESOLUTIONS)}")
        if render_mode not in (None, "rgb_array"):
            raise WmlabError(f"doom render_mode must be 'rgb_array' or None, got "
                             f"{render_mode!r}")
        self.max_steps = check_max_steps(max_steps, MAX_STEPS)
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(0, 255, FRAME_SHAPE, np.uint8)
        self.action_space = gym.spaces.Discrete(3)
        self._game = _new_game(self.max_steps, resolution)
        self._screen: np.ndarray | None = None
        self._closed = False

    def _observe(self) -> np.ndarray:
        state = self._game.get_state()
        if state is not None:
            self._screen = state.screen_buffer
        return resize_frame(self._screen)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is None:
            seed = int(self.np_random.integers(VIZDOOM_SEED_RANGE))
        self._game.set_seed(int(seed) % VIZDOOM_SEED_RANGE)
        self._game.new_episode()
        return self._observe(), {}

    def step(self, action):
        game = self._game
        reward = game.make_action(_BUTTONS[action], 1)
        obs = self._observe()
        if not game.is_episode_finished():
            return obs, reward, False, False, {}
        dead = game.is_player_dead()
        return obs, reward, dead, not dead, {}

    def render(self) -> np.ndarray | None:
        if self.render_mode is None or self._screen is None:
            return None
        return self._screen.copy()

    def close(self) -> None:
        if not self._closed:
            self._game.close()
            self._closed = True


def _make(backend: str, **options: Any) -> gym.Env:
    return TakeCoverEnv(**options)


def _make_batch(backend: str, num_envs: int, **options: Any) -> GymnasiumBatch:
    return GymnasiumBatch.build(doom_spec(), backend, num_envs,
                                lambda: TakeCoverEnv(**options))


def entry() -> EnvEntry:
    return EnvEntry(spec=doom_spec(), make=_make, make_batch=_make_batch,
                    options={"vizdoom": ("max_steps", "resolution")})
