"""Playing by hand in a pygame window: an environment (``wmlab play
binpacking|carracing|doom``) or M's dream (``wmlab dream --play``).

Keys -> actions and the game bookkeeping live in plain classes (``BinPackingSession``,
``RealtimeSession``, ``DreamSession``) that take key *names* (pygame's ``pygame.key.name``
strings such as "left", "3", "return"), so they are tested without a display. ``run_window``
only turns pygame events into those names and draws what the session shows.

Keys. Bin packing: with C <= 10 a digit plays that level at once; with more levels, type the
number and press Enter. 0 or N opens a new bag; Left/Right move a cursor and Space plays it;
B and S play the best-fit and sum-of-squares moves; R restarts; Esc quits. CarRacing: arrows
steer, accelerate (Up) and brake (Down). Doom: Left/Right move, nothing pressed stands still.
The dream: the arrows act through M's action vector (``keyboard_mapping``); R starts the next
dream, Esc quits.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from wmlab.envs.spec import DOOM_LEFT, DOOM_NOOP, DOOM_RIGHT
from wmlab.errors import WmlabError

if TYPE_CHECKING:  # the dream needs torch, loaded only where a dream is played
    from wmlab.dream.batched import BatchedDream
    from wmlab.dream.gallery import DreamModels

CARRACING_BRAKE = 0.8  # Gymnasium's own keyboard play brakes at 0.8, not 1
QUIT_KEYS = ("escape", "q")
CAPTION = "wmlab play"
DREAM_CAPTION = "wmlab: inside the dream (arrows act, R restarts, Esc quits)"
DREAM_FPS = 30
DREAM_SCALE = 6  # 64x64 frames shown at 384x384


def carracing_action(pressed: Collection[str]) -> np.ndarray:
    """[steer, gas, brake] from the arrow keys held down."""
    steer = float("right" in pressed) - float("left" in pressed)
    gas = 1.0 if "up" in pressed else 0.0
    brake = CARRACING_BRAKE if "down" in pressed else 0.0
    return np.array([steer, gas, brake], dtype=np.float32)


def doom_action(pressed: Collection[str]) -> int:
    """ViZDoom's Discrete(3): left, right, or no-op (also when both are held)."""
    left, right = "left" in pressed, "right" in pressed
    if left == right:
        return DOOM_NOOP
    return DOOM_LEFT if left else DOOM_RIGHT


def keyboard_mapping(env_name: str, action_dim: int
                     ) -> Callable[[Collection[str]], np.ndarray]:
    """Arrow keys held -> M's action vector (what its dream steps with): Doom left/right;
    CarRacing steer, gas (up), brake (down); otherwise left/right on the first action value."""
    def act(pressed: Collection[str]) -> np.ndarray:
        action = np.zeros(action_dim, np.float32)
        action[0] = float("right" in pressed) - float("left" in pressed)
        if env_name == "carracing" and action_dim >= 3:
            action[1] = float("up" in pressed)
            action[2] = CARRACING_BRAKE * float("down" in pressed)
        return action
    return act


# ---------------------------------------------------------------------------------------------
# Bin packing: one key press, one decision


@dataclass
class BinPackingKeys:
    """Key names -> bin packing actions (levels 0..C-1), with a typed buffer and a cursor."""

    capacity: int
    buffer: str = ""
    cursor: int = 0

    def press(self, key: str, counts: np.ndarray, item: int) -> int | None:
        """The action a key asks for now, or None (the key only edits the buffer/cursor)."""
        from wmlab.baselines import best_fit, sum_of_squares

        C = self.capacity
        digit = key[1:-1] if key.startswith("[") and key.endswith("]") else key  # keypad
        if digit.isdigit() and len(digit) == 1:
            if C <= 10:
                return self._checked(int(digit))
            self.buffer = (self.buffer + digit)[-len(str(C - 1)):]
            return None
        if key == "backspace":
            self.buffer = self.buffer[:-1]
            return None
        if key in ("return", "enter"):
            if not self.buffer:
                return self.cursor
            typed, self.buffer = int(self.buffer), ""
            return self._checked(typed)
        if key == "n":
            return 0
        if key == "space":
            return self.cursor
        if key == "left":
            self.cursor = (self.cursor - 1) % C
        elif key == "right":
            self.cursor = (self.cursor + 1) % C
        elif key == "b":
            return best_fit(counts, item, C)
        elif key == "s":
            return sum_of_squares(counts, item, C)
        return None

    def _checked(self, level: int) -> int | None:
        return level if level < self.capacity else None


@dataclass
class BinPackingSession:
    """A bin packing game driven by key names: the env, the keys and the last message."""

    env: Any  # BinPackingEnv
    seed: int = 0
    keys: BinPackingKeys = field(init=False)
    message: str = ""
    done: bool = False
    episodes: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.keys = BinPackingKeys(self.env.problem.capacity)
        self.restart()

    def restart(self) -> None:
        self.env.reset(seed=self.seed)
        self.seed += 1
        self.done = False
        self.message = self._prompt()

    def _prompt(self) -> str:
        buffer = f"  typed: {self.keys.buffer}" if self.keys.buffer else ""
        return f"choose a level (cursor {self.keys.cursor}){buffer}"

    def key(self, name: str) -> bool:
        """Handle one key; False once the player asked to quit."""
        if name in QUIT_KEYS:
            return False
        if name == "r":
            self.restart()
            return True
        if self.done:
            self.message = "episode over: R plays again, Esc quits"
            return True
        env = self.env
        action = self.keys.press(name, env.counts, env.item)
        if action is None:
            self.message = self._prompt()
            return True
        _, reward, terminated, truncated, info = env.step(action)
        note = f"played {info['action']}"
        if info["invalid"]:
            note = f"level {action} is invalid" + (
                f", played {info['action']} instead" if info["action"] != action else "")
        self.message = f"{note}: reward {reward:+g}"
        if terminated or truncated:
            self.done = True
            self.episodes.append(env.score)
            self.message += f"; episode over, return {env.score:g}: R plays again"
        return True

    def picture(self) -> np.ndarray:
        return self.env.human_picture(self.message)


# ---------------------------------------------------------------------------------------------
# Real-time games: the keys held down are read every frame


@dataclass
class RealtimeSession:
    """CarRacing or Doom stepped once per frame with the action of the keys held down."""

    env: Any
    kind: str  # "carracing" or "doom"
    seed: int = 0
    score: float = 0.0
    steps: int = 0
    done: bool = False
    episodes: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.env.reset(seed=self.seed)
        self.seed += 1
        self.score, self.steps, self.done = 0.0, 0, False

    def action(self, pressed: Collection[str]) -> Any:
        return carracing_action(pressed) if self.kind == "carracing" else doom_action(pressed)

    def tick(self, pressed: Collection[str]) -> None:
        """One env step with the keys held now; a finished episode waits for R."""
        if self.done:
            return
        _, reward, terminated, truncated, _ = self.env.step(self.action(pressed))
        self.score += float(reward)
        self.steps += 1
        if terminated or truncated:
            self.done = True
            self.episodes.append(self.score)

    def status(self) -> str:
        end = "  episode over: R again, Esc quits" if self.done else ""
        return f"step {self.steps}  score {self.score:.1f}{end}"

    def picture(self) -> np.ndarray:
        return self.env.render()


# ---------------------------------------------------------------------------------------------
# Inside M's dream: the keys held act, V shows what M imagines


@dataclass
class DreamSession:
    """M's dream (a ``BatchedDream`` of batch 1) stepped once per frame with the action of
    the keys held (``action``: key names -> M's action vector); the picture is V's decoding
    of M's z. A dream that ends is followed by the next seed's, as R does at once."""

    dream: BatchedDream
    vae: Any  # V (ConvVAE): decodes M's z into the picture
    action: Callable[[Collection[str]], np.ndarray]
    seed: int = 0
    score: float = 0.0
    steps: int = 0
    episodes: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.restart()

    @property
    def done(self) -> bool:
        return bool(self.dream.done[0])

    def restart(self) -> None:
        self.dream.reset([self.seed])
        self.seed += 1
        self.score, self.steps = 0.0, 0
        self._picture = self._decode()

    def tick(self, pressed: Collection[str]) -> None:
        """One dream step with the keys held now; a finished dream gives way to the next."""
        if self.done:
            self.restart()
            return
        _, reward, _ = self.dream.step(self.action(pressed)[None])
        self.score += float(reward[0])
        self.steps += 1
        if self.done:
            self.episodes.append(self.score)
        self._picture = self._decode()

    def _decode(self) -> np.ndarray:
        from wmlab.dream.pictures import decode_latents  # torch: only where a dream is played

        return decode_latents(self.vae, self.dream.z)[0]

    def status(self) -> str:
        end = "  the dream ended" if self.done else ""
        return f"dream step {self.steps}  return {self.score:.1f}{end}"

    def picture(self) -> np.ndarray:
        return self._picture


def dream_session(models: DreamModels, env_name: str, seed: int = 0) -> DreamSession:
    """The dream of a run's V and M (``wmlab.dream.gallery.load_dream_models``) to play
    with the arrow keys, starting at ``seed``."""
    from wmlab.dream.batched import BatchedDream  # torch: only where a dream is played

    dream = BatchedDream(models.mdrnn, models.start, models.settings)
    return DreamSession(dream, models.vae,
                        keyboard_mapping(env_name, models.mdrnn.shape.action_dim), seed)


def make_session(env_name: str, seed: int = 0) -> BinPackingSession | RealtimeSession:
    """The session for ``binpacking[:...]``, ``carracing`` or ``doom``."""
    from wmlab import envs

    if env_name.split(":", 1)[0].strip() == "binpacking":
        from wmlab.envs.binpacking import BinPackingEnv, problem_from_name

        return BinPackingSession(BinPackingEnv(problem=problem_from_name(env_name)), seed)
    if env_name in ("carracing", "doom"):
        return RealtimeSession(envs.make(env_name), env_name, seed)
    raise WmlabError(f"cannot play '{env_name}' by hand: choose binpacking (or "
                     f"binpacking:key=value,...), carracing or doom")


# ---------------------------------------------------------------------------------------------
# The window


def run_window(session: BinPackingSession | RealtimeSession | DreamSession, *, fps: int = 50,
               scale: int = 0, max_frames: int = 0, scripted: Iterable[Any] | None = None,
               caption: str = CAPTION) -> list[float]:
    """Show ``session`` in a pygame window until Esc (or ``max_frames`` frames if > 0).

    ``scripted`` replaces the keyboard (for tests and demos): for bin packing an iterable
    of key names, for real-time games and the dream an iterable of sets of keys held, one
    per frame. Returns the returns of the episodes finished.
    """
    import pygame

    pygame.init()
    try:
        return _loop(pygame, session, fps, scale, max_frames, scripted, caption)
    finally:
        pygame.quit()


def play_dream(models: DreamModels, env_name: str, seed: int = 0, *, max_frames: int = 0,
               scripted: Iterable[Collection[str]] | None = None) -> list[float]:
    """Play inside the dream of ``models`` in a window (``wmlab dream --play``); the
    returns of the dreams that ended."""
    return run_window(dream_session(models, env_name, seed), fps=DREAM_FPS, scale=DREAM_SCALE,
                      max_frames=max_frames, scripted=scripted, caption=DREAM_CAPTION)


def _loop(pygame: Any, session: Any, fps: int, scale: int, max_frames: int,
          scripted: Iterable[Any] | None, caption: str) -> list[float]:
    # every session but bin packing's is stepped once a frame with the keys held
    realtime = not isinstance(session, BinPackingSession)
    picture = session.picture()
    zoom = scale or (1 if not realtime else max(1, 600 // max(picture.shape[:2])))
    height, width = picture.shape[0] * zoom, picture.shape[1] * zoom
    status_h = 28 if realtime else 0
    screen = pygame.display.set_mode((width, height + status_h))
    pygame.display.set_caption(caption)
    font = pygame.font.Font(None, 24)
    clock = pygame.time.Clock()
    script = iter(scripted) if scripted is not None else None
    frames, running = 0, True
    while running and (max_frames <= 0 or frames < max_frames):
        events = pygame.event.get()
        if any(event.type == pygame.QUIT for event in events):
            break
        names = [pygame.key.name(event.key) for event in events
                 if event.type == pygame.KEYDOWN]
        if realtime:
            if script is not None:
                held = next(script, None)
                if held is None:
                    break
            else:
                keys = pygame.key.get_pressed()
                held = {name for name, code in (("left", pygame.K_LEFT),
                                                ("right", pygame.K_RIGHT),
                                                ("up", pygame.K_UP), ("down", pygame.K_DOWN))
                        if keys[code]}
            if any(name in QUIT_KEYS for name in names):
                break
            if "r" in names:
                session.restart()
            session.tick(held)
        else:
            if script is not None:
                name = next(script, None)
                if name is None:
                    break
                names.append(name)
            for name in names:
                running = running and session.key(name)
        _draw(pygame, screen, font, session.picture(), zoom, realtime and session.status())
        clock.tick(fps if realtime else 30)
        frames += 1
    return list(session.episodes)


def _draw(pygame: Any, screen: Any, font: Any, picture: np.ndarray, zoom: int,
          status: str | bool) -> None:
    surface = pygame.surfarray.make_surface(np.ascontiguousarray(picture.transpose(1, 0, 2)))
    if zoom != 1:
        surface = pygame.transform.scale(surface, (surface.get_width() * zoom,
                                                   surface.get_height() * zoom))
    screen.fill((0, 0, 0))
    screen.blit(surface, (0, 0))
    if status:
        screen.blit(font.render(status, True, (255, 255, 255)),
                    (6, surface.get_height() + 6))
    pygame.display.flip()
