"""Environments: 64x64 frames, action maps, batched stepping, seeding, and errors."""

import os
import pickle
import sys

import cv2
import gymnasium as gym
import numpy as np
import pytest

from wmlab import envs
from wmlab.errors import UnknownEnvError, WmlabError

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # CarRacing and CartPole draw with pygame


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
FULL_SCREENS = {"carracing": (96, 96, 3), "doom": (120, 160, 3)}


def _is_frame(obs) -> bool:
    return obs.shape == (64, 64, 3) and obs.dtype == np.uint8


# --- frames ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(120, 160, 3), (96, 96, 3), (210, 160, 3), (128, 128, 3),
                                   (48, 80, 3), (64, 64, 3)])
def test_resizing_is_exactly_opencv_area(shape):
    frames = np.random.default_rng(0).integers(0, 256, (3, *shape), dtype=np.uint8)
    expected = np.stack([cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA)
                         for f in frames])
    np.testing.assert_array_equal(np.stack([envs.resize_frame(f) for f in frames]), expected)
    np.testing.assert_array_equal(envs.resize_batch(frames), expected)


@pytest.mark.parametrize("shape", [(120, 160), (84, 96), (96, 96), (240, 320), (70, 64)])
def test_the_c_area_kernel_gives_opencvs_bytes(shape, monkeypatch):
    """Where the kernel is used (odd box-average denominators), its bytes are OpenCV's, on
    noise, on two-level frames (the most sums near a half) and on a crop read in place."""
    from wmlab.envs import frames as frame_module

    assert frame_module._native_is_exact(*shape)
    if frame_module.area_kernel() is None:
        pytest.skip("no C compiler here: OpenCV resizes")
    rng = np.random.default_rng(2)
    noise = rng.integers(0, 256, (24, *shape, 3), dtype=np.uint8)
    levels = (rng.integers(0, 2, (24, *shape, 3)) * 255).astype(np.uint8)
    tall = rng.integers(0, 256, (6, shape[0] + 12, shape[1], 3), dtype=np.uint8)
    cases = [noise, levels, tall[:, :shape[0]]]
    expected = [np.stack([cv2.resize(np.ascontiguousarray(f), (64, 64),
                                     interpolation=cv2.INTER_AREA) for f in x]) for x in cases]

    def refuse(*args, **kwargs):
        raise AssertionError("OpenCV was called where the C kernel resizes")

    monkeypatch.setattr(frame_module.cv2, "resize", refuse)
    for x, want in zip(cases, expected, strict=True):
        np.testing.assert_array_equal(envs.resize_batch(x), want)


def test_even_or_large_denominators_stay_on_opencv():
    from wmlab.envs.frames import _native_is_exact

    # 128 / 64 = 2 (even: halves occur), 100 / 64 = 25 / 16 (625: too fine), 48 < 64
    assert not any(_native_is_exact(*s) for s in [(128, 128), (100, 100), (48, 80),
                                                 (64, 64), (210, 160)])


def test_carracing_frames_drop_the_dashboard():
    obs = np.random.default_rng(1).integers(0, 256, (4, 96, 96, 3), dtype=np.uint8)
    expected = np.stack([cv2.resize(o[:84], (64, 64), interpolation=cv2.INTER_AREA)
                         for o in obs])
    np.testing.assert_array_equal(np.stack([envs.preprocess_carracing(o) for o in obs]),
                                  expected)
    np.testing.assert_array_equal(envs.preprocess_carracing_batch(obs), expected)
    obs[:, 84:] = 0  # the dashboard rows do not reach the frame
    np.testing.assert_array_equal(envs.preprocess_carracing_batch(obs), expected)


# --- single envs ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, backend", BACKENDS)
def test_single_env_frames_are_64x64x3_uint8(name, backend):
    env = envs.make(name, backend, max_steps=20)
    try:
        obs, _ = env.reset(seed=3)
        assert _is_frame(obs) and env.observation_space.contains(obs)
        spec = envs.get_spec(name)
        raw = np.zeros((1, spec.controller_outputs), np.float32)
        obs, reward, terminated, truncated, _ = env.step(spec.to_env_action(raw)[0])
        assert _is_frame(obs) and isinstance(reward, float)
        assert env.render().shape == FULL_SCREENS[name]
    finally:
        env.close()


def test_generic_env_with_image_observations():
    env = envs.make("CarRacing-v3", max_steps=5)  # the whole 96x96 frame, no crop
    try:
        obs, _ = env.reset(seed=0)
        assert _is_frame(obs)
        np.testing.assert_array_equal(obs, envs.resize_frame(env.render()))
    finally:
        env.close()


def test_generic_env_through_its_renderer_and_discrete_argmax():
    spec = envs.get_spec("CartPole-v1")
    assert spec.action_kind == "discrete" and spec.controller_outputs == spec.action_dim == 2
    assert spec.to_env_action(np.array([[0.1, 0.9], [0.7, -0.2]])).tolist() == [1, 0]
    np.testing.assert_array_equal(spec.action_vector(np.array([1, 0])), [[0, 1], [1, 0]])
    with envs.make_batch("CartPole-v1", 2) as batch:
        obs = batch.reset([0, 1])
        assert obs.shape == (2, 64, 64, 3) and obs.dtype == np.uint8 and obs.std() > 0
        obs, rewards, _, _ = batch.step(np.array([0, 1]))
        assert rewards.tolist() == [1.0, 1.0] and batch.spec == spec


def test_generic_box_actions_scale_to_bounds():
    spec = envs.get_spec("MountainCarContinuous-v0")
    assert spec.action_kind == "box" and spec.action_dim == spec.controller_outputs == 1
    np.testing.assert_allclose(spec.to_env_action(np.array([[-1.0], [0.0], [1.0]])).ravel(),
                               [-1.0, 0.0, 1.0])
    skewed = envs.EnvSpec(name="x", gym_id="x", description="", backends=("gymnasium",),
                          default_backend="gymnasium", max_steps=10, action_kind="box",
                          action_dim=4, controller_outputs=4, action_low=(0, 0, -2, 10),
                          action_high=(1, 4, 2, 20), action_shape=(2, 2))
    actions = skewed.to_env_action(np.array([[-1.0, 0.0, 0.5, 1.0]]))
    assert actions.shape == (1, 2, 2) and actions.dtype == np.float32
    np.testing.assert_allclose(actions.ravel(), [0.0, 2.0, 1.0, 20.0])
    np.testing.assert_allclose(skewed.action_vector(actions), [[0.0, 2.0, 1.0, 20.0]])


def test_doom_rewards_one_per_tic_and_ends_on_death():
    env = envs.make("doom")
    try:
        env.reset(seed=5)
        total, steps, terminated, truncated = 0.0, 0, False, False
        while not (terminated or truncated):
            obs, reward, terminated, truncated, _ = env.step(0)
            total += reward
            steps += 1
        assert terminated and not truncated  # standing still in TakeCover gets you killed
        assert total == steps and 50 < steps < 2100
        assert _is_frame(obs)  # ViZDoom has no screen after death: the last one is kept
    finally:
        env.close()


# --- action maps ----------------------------------------------------------------------------


def test_carracing_action_transform():
    spec = envs.get_spec("carracing")
    raw = np.array([[-1.0, -1.0, -1.0], [0.5, 0.0, 0.5], [1.0, 1.0, 1.0], [-0.3, 0.5, -0.2]],
                   np.float32)
    actions = spec.to_env_action(raw)
    assert actions.dtype == np.float32 and actions.shape == (4, 3)
    # steer as is, gas (a + 1) / 2, brake clip(a, 0, 1)
    np.testing.assert_allclose(actions, [[-1, 0, 0], [0.5, 0.5, 0.5], [1, 1, 1],
                                         [-0.3, 0.75, 0]])
    np.testing.assert_allclose(spec.action_vector(actions), actions)


def test_doom_thresholds_and_action_vector():
    spec = envs.get_spec("doom")
    raw = np.array([[-1.0], [-0.5], [-1 / 3], [-0.2], [0.0], [0.2], [1 / 3], [0.5], [1.0]])
    actions = spec.to_env_action(raw)
    # no-op 0, left 1, right 2; exactly +-1/3 stays no-op (strict inequalities)
    assert actions.dtype == np.int64 and actions.tolist() == [1, 1, 0, 0, 0, 0, 0, 2, 2]
    vectors = spec.action_vector(actions)
    assert vectors.shape == (9, 1) and vectors.dtype == np.float32
    assert vectors.ravel().tolist() == [-1, -1, 0, 0, 0, 0, 0, 1, 1]


def test_discrete_actions_take_the_best_valid_output():
    spec = envs.EnvSpec(name="x", gym_id="x", description="", backends=("gymnasium",),
                        default_backend="gymnasium", max_steps=10, action_kind="discrete",
                        action_dim=3, controller_outputs=3)
    logits = np.array([[0.9, 0.5, -0.2], [0.1, 0.2, 0.3], [0.4, 0.4, 0.4]], np.float32)
    mask = np.array([[False, True, True], [True, True, False], [False, True, True]])
    unmasked = spec.to_env_action(logits)
    assert unmasked.dtype == np.int64 and unmasked.tolist() == [0, 2, 0]
    # an invalid output never wins, however large; of equal valid ones the first does
    masked = spec.to_env_action(logits, mask)
    assert masked.dtype == np.int64 and masked.tolist() == [1, 1, 1]
    # masks as envs report them (BinPacking's int8 action_mask) mean the same
    assert spec.to_env_action(logits, mask.astype(np.int8)).tolist() == [1, 1, 1]
    # only discrete actions have something to mask
    car = envs.get_spec("carracing")
    np.testing.assert_array_equal(car.to_env_action(logits, np.zeros((3, 3), bool)),
                                  car.to_env_action(logits))


def test_action_maps_refuse_the_wrong_width():
    spec = envs.get_spec("carracing")
    with pytest.raises(WmlabError, match="3 values each"):
        spec.to_env_action(np.zeros((2, 2)))
    with pytest.raises(WmlabError, match="0..2"):
        envs.get_spec("doom").action_vector(np.array([3]))


def test_specs_pickle_for_spawned_workers():
    for spec in [*envs.list_envs(), envs.get_spec("MountainCarContinuous-v0")]:
        assert pickle.loads(pickle.dumps(spec)) == spec


# --- batches --------------------------------------------------------------------------------


@pytest.mark.parametrize("name, backend, steps", [
    ("carracing", "gymnasium", 30),  # slow (~150 steps/s): few steps
    pytest.param("carracing", "envpool", 50, marks=needs_envpool),
    ("doom", "vizdoom", 80),  # Doom's first fireballs (the seeded part) come after ~50 tics
])
def test_same_seed_same_episode_whatever_the_batch_slot(name, backend, steps):
    spec = envs.get_spec(name)
    actions = np.random.default_rng(0).uniform(-1, 1, (steps, spec.controller_outputs))

    def episode(batch, seeds, slot):
        frames = [batch.reset(seeds)[slot]]
        for t in range(steps):
            raw = np.repeat(actions[t][None], batch.num_envs, axis=0)
            obs, _, _, _ = batch.step(spec.to_env_action(raw))
            frames.append(obs[slot])
        return np.stack(frames)

    with envs.make_batch(name, 1, backend, max_steps=200) as batch:
        alone = episode(batch, [1234], 0)
        other = episode(batch, [4321], 0)
    with envs.make_batch(name, 3, backend, max_steps=200) as batch:
        episode(batch, [7, 8, 9], 0)  # an earlier episode must not leak into the next
        in_batch = episode(batch, [99, 100, 1234], 2)
    np.testing.assert_array_equal(alone, in_batch)
    assert not np.array_equal(alone, other)


def test_finished_envs_freeze_and_keep_their_flags():
    with envs.make_batch("doom", 2, max_steps=5) as batch:
        batch.reset([1, 2])
        for _ in range(5):
            obs, reward, terminated, truncated = batch.step(np.array([0, 0]))
        assert truncated.all() and not terminated.any() and (reward == 1).all()
        obs2, reward2, terminated2, truncated2 = batch.step(np.array([1, 2]))
        np.testing.assert_array_equal(obs, obs2)
        assert (reward2 == 0).all() and truncated2.all() and not terminated2.any()


def test_a_dead_doom_player_waits_while_the_others_play():
    with envs.make_batch("doom", 3, max_steps=600) as batch:
        batch.reset([5, 6, 7])
        ends, frozen = {}, {}
        for t in range(600):
            obs, reward, terminated, truncated = batch.step(np.zeros(3, np.int64))
            for i in np.flatnonzero(terminated | truncated):
                if i in ends:  # finished earlier: same frame, no reward, same flags
                    np.testing.assert_array_equal(obs[i], frozen[i])
                    assert reward[i] == 0 and terminated[i] and not truncated[i]
                else:
                    ends[i], frozen[i] = t, obs[i].copy()
            if len(ends) == 3:
                break
        assert len(ends) == 3 and len(set(ends.values())) > 1  # they died at different tics


@needs_envpool
def test_envpool_steps_only_running_envs():
    spec = envs.get_spec("carracing")
    gas = spec.to_env_action(np.array([[0.0, 0.0, -1.0]] * 3))
    with envs.make_batch("carracing", 1, "envpool") as solo:
        solo.reset([11])
        expected = [solo.step(gas[:1])[0][0] for _ in range(6)]
    with envs.make_batch("carracing", 3, "envpool", max_steps=4) as batch:
        first = batch.reset([12, 11, 13])
        # As if envs 0 and 2 had already ended: only env 1 may be stepped (env_id subset).
        batch._truncated[[0, 2]] = True
        for t in range(6):
            obs, reward, terminated, truncated = batch.step(gas)
            if t < 4:
                np.testing.assert_array_equal(obs[1], expected[t])
                assert reward[0] == reward[2] == 0
        np.testing.assert_array_equal(obs[[0, 2]], first[[0, 2]])
        # Env 1 was truncated at its 4th step and frozen there.
        assert truncated.all() and not terminated.any() and (reward == 0).all()
        np.testing.assert_array_equal(obs[1], expected[3])


# --- listing and errors ---------------------------------------------------------------------


def test_list_envs_names_the_builtins():
    specs = {spec.name: spec for spec in envs.list_envs()}
    assert set(specs) >= {"carracing", "doom"}
    assert specs["carracing"].backends == ("gymnasium", "envpool")
    assert specs["carracing"].default_backend == "gymnasium"
    assert (specs["carracing"].max_steps, specs["doom"].max_steps) == (1000, 2100)
    assert specs["doom"].backends == ("vizdoom",)
    assert (specs["doom"].action_dim, specs["doom"].controller_outputs) == (1, 1)


def test_bad_names_and_backends_explain_themselves():
    with pytest.raises(UnknownEnvError, match="unknown environment 'NoSuchEnv-v0'.*carracing"):
        envs.get_spec("NoSuchEnv-v0")
    with pytest.raises(UnknownEnvError, match="CarRacing-v3"):  # gymnasium's hint survives
        envs.make("CarRacing-v2")
    with pytest.raises(WmlabError, match="has no backend 'atari'.*gymnasium, envpool"):
        envs.make("carracing", backend="atari")
    with pytest.raises(WmlabError, match="has no backend 'envpool'.*vizdoom"):
        envs.make_batch("doom", 2, backend="envpool")
    with pytest.raises(WmlabError, match="no option 'num_threads'.*max_steps"):
        envs.make("carracing", num_threads=2)


def test_out_of_range_arguments_are_refused():
    with pytest.raises(WmlabError, match="at least 1"):
        envs.make_batch("doom", 0)
    with pytest.raises(WmlabError, match="max_steps"):
        envs.make("doom", max_steps=-5)
    with pytest.raises(WmlabError, match="resolution"):
        envs.make("doom", resolution="1X1")
    with envs.make_batch("doom", 2, max_steps=5) as batch:
        with pytest.raises(WmlabError, match="reset"):
            batch.step(np.array([0, 0]))
        with pytest.raises(WmlabError, match="one seed per env"):
            batch.reset([1])
        with pytest.raises(WmlabError, match="non-negative"):
            batch.reset([1, -2])


def test_missing_envpool_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "envpool", None)  # makes `import envpool` fail
    with pytest.raises(WmlabError, match=r"pip install 'wmlab\[envpool\]'"):
        envs.make_batch("carracing", 2, backend="envpool")


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
