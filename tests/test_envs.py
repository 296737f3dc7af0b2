import gymnasium as gym
import numpy as np
import pytest

from wmlab import envs
from wmlab.errors import UnknownEnvError, WmlabError


def _has_envpool() -> bool:
    try:
        import envpool  # noqa: F401
    except ImportError:
        return False
    return True


needs_envpool = pytest.mark.skipif(not _has_envpool(), reason="envpool not installed")

BACKENDS = [("carracing", "gymnasium"),
            pytest.param("carracing", "envpool", marks=needs_envpool),
            ("doom", "vizdoom")]


@pytest.mark.parametrize("name, backend", BACKENDS)
def test_single_env_frames_are_64x64x3_uint8(name, backend):
    env = envs.make(name, backend, max_steps=20)
    try:
        obs, _ = env.reset(seed=3)
        assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
        assert env.observation_space.contains(obs)
        spec = envs.get_spec(name)
        raw = np.zeros((1, spec.controller_outputs), np.float32)
        obs, reward, terminated, truncated, _ = env.step(spec.to_env_action(raw)[0])
        assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
        assert isinstance(reward, float)
    finally:
        env.close()


@pytest.mark.parametrize("name, backend", BACKENDS)
def test_same_seed_same_episode_whatever_the_batch_slot(name, backend):
    spec = envs.get_spec(name)
    steps = 80  # Doom's first fireballs (the seeded part) come after ~50 tics
    actions = np.random.default_rng(0).uniform(-1, 1, (steps, spec.controller_outputs))

    def run(batch_size, slot, seed=1234):
        batch = envs.make_batch(name, batch_size, backend, max_steps=200)
        try:
            seeds = [99 + i for i in range(batch_size)]
            seeds[slot] = seed
            frames = [batch.reset(seeds)[slot]]
            for t in range(steps):
                raw = np.repeat(actions[t][None], batch_size, axis=0)
                obs, _, _, _ = batch.step(spec.to_env_action(raw))
                frames.append(obs[slot])
            return np.stack(frames)
        finally:
            batch.close()

    alone = run(1, 0)
    in_batch = run(3, 2)
    np.testing.assert_array_equal(alone, in_batch)
    assert not np.array_equal(alone, run(1, 0, seed=4321))


def test_finished_envs_freeze_and_keep_their_flags():
    batch = envs.make_batch("doom", 2, max_steps=5)
    try:
        batch.reset([1, 2])
        for _ in range(5):
            obs, reward, terminated, truncated = batch.step(np.array([0, 0]))
        assert truncated.all() and not terminated.any()
        obs2, reward2, terminated2, truncated2 = batch.step(np.array([1, 2]))
        np.testing.assert_array_equal(obs, obs2)
        assert (reward2 == 0).all() and truncated2.all()
    finally:
        batch.close()


def test_doom_rewards_one_per_tic_and_ends_on_death():
    env = envs.make("doom")
    try:
        env.reset(seed=5)
        total, steps, terminated, truncated = 0.0, 0, False, False
        while not (terminated or truncated):
            _, reward, terminated, truncated, _ = env.step(0)
            total += reward
            steps += 1
        assert terminated and not truncated  # standing still in TakeCover gets you killed
        assert total == steps and 50 < steps < 2100
    finally:
        env.close()


def test_carracing_action_transform():
    spec = envs.get_spec("carracing")
    raw = np.array([[-1.0, -1.0, -1.0], [0.5, 0.0, 0.5], [1.0, 1.0, 1.0]], np.float32)
    actions = spec.to_env_action(raw)
    np.testing.assert_allclose(actions, [[-1, 0, 0], [0.5, 0.5, 0.5], [1, 1, 1]])
    np.testing.assert_allclose(spec.action_vector(actions), actions)


def test_doom_thresholds_and_action_vector():
    spec = envs.get_spec("doom")
    raw = np.array([[-1.0], [-0.5], [-1 / 3], [-0.2], [0.0], [0.2], [1 / 3], [0.5], [1.0]])
    actions = spec.to_env_action(raw)
    # no-op 0, left 1, right 2; exactly +-1/3 stays no-op (strict inequalities)
    assert actions.tolist() == [1, 1, 0, 0, 0, 0, 0, 2, 2]
    assert spec.action_vector(actions).ravel().tolist() == [-1, -1, 0, 0, 0, 0, 0, 1, 1]


def test_generic_env_through_its_renderer_and_discrete_argmax():
    spec = envs.get_spec("CartPole-v1")
    assert spec.action_kind == "discrete" and spec.controller_outputs == 2
    assert spec.to_env_action(np.array([[0.1, 0.9], [0.7, -0.2]])).tolist() == [1, 0]
    np.testing.assert_array_equal(spec.action_vector(np.array([1, 0])), [[0, 1], [1, 0]])
    env = envs.make("CartPole-v1")
    try:
        obs, _ = env.reset(seed=0)
        assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8 and obs.std() > 0
    finally:
        env.close()


def test_generic_box_actions_scale_to_bounds():
    spec = envs.get_spec("MountainCarContinuous-v0")
    assert spec.action_kind == "box"
    np.testing.assert_allclose(spec.to_env_action(np.array([[-1.0], [0.0], [1.0]])).ravel(),
                               [-1.0, 0.0, 1.0])


def test_list_envs_names_the_builtins():
    specs = {spec.name: spec for spec in envs.list_envs()}
    assert set(specs) >= {"carracing", "doom"}
    assert specs["carracing"].backends == ("gymnasium", "envpool")
    assert specs["carracing"].default_backend == "gymnasium"


def test_bad_names_and_backends_explain_themselves():
    with pytest.raises(UnknownEnvError, match="unknown environment 'NoSuchEnv-v0'"):
        envs.get_spec("NoSuchEnv-v0")
    with pytest.raises(WmlabError, match="has no backend 'atari'.*gymnasium, envpool"):
        envs.make("carracing", backend="atari")
    with pytest.raises(WmlabError, match="at least 1"):
        envs.make_batch("doom", 0)


class _NoPixels(gym.Env):
    observation_space = gym.spaces.Discrete(4)
    action_space = gym.spaces.Discrete(2)
    metadata = {"render_modes": []}

    def reset(self, *, seed=None, options=None):
        return 0, {}

    def step(self, action):
        return 0, 0.0, True, False, {}


def test_envs_without_pixels_are_refused():
    if "wmlab-test/NoPixels-v0" not in gym.registry:
        gym.register("wmlab-test/NoPixels-v0", entry_point=_NoPixels)
    with pytest.raises(WmlabError, match="needs pixels"):
        envs.get_spec("wmlab-test/NoPixels-v0")
