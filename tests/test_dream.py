"""The batched dream: done threshold, step cap, rewards, seeds, independent resets, the
Gymnasium vector-env face, calibration, and the pictures."""

import numpy as np
import pytest
import torch

import wmlab.dream.batched as dream_module
from wmlab.dream import (
    BatchedDream,
    DreamEnv,
    DreamSettings,
    DreamStart,
    dream_calibration,
    reference_policy,
)
from wmlab.errors import WmlabError
from wmlab.memory.model import MDNRNN, MdrnnShape

pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed=0, z_dim=4, hidden=16, done_head=True, reward_head=False,
               restart_input=True, action_dim=1) -> MDNRNN:
    torch.manual_seed(seed)
    return MDNRNN(MdrnnShape(z_dim=z_dim, action_dim=action_dim, hidden=hidden,
                             done_head=done_head, reward_head=reward_head,
                             restart_input=restart_input)).eval()


def constant_heads(model: MDNRNN, done: float | None = None, reward: float | None = None
                   ) -> MDNRNN:
    """Make the done logit / reward a constant: zero weights in those rows, the bias set."""
    s = model.shape
    row = 3 * s.z_dim * s.gaussians
    with torch.no_grad():
        if done is not None:
            model.head.weight[row] = 0.0
            model.head.bias[row] = done
            row += 1
        if reward is not None:
            model.head.weight[row] = 0.0
            model.head.bias[row] = reward
    return model


def starts(z_dim=4, count=5, seed=0) -> DreamStart:
    g = torch.Generator().manual_seed(seed)
    return DreamStart(torch.randn(count, z_dim, generator=g), torch.full((count, z_dim), -2.0))


def run(dream: BatchedDream, seeds, steps, action=0.3):
    dream.reset(seeds)
    zs = [dream.z.clone()]
    for _ in range(steps):
        z, _, _ = dream.step(torch.full((dream.batch, 1), action))
        zs.append(z.clone())
    return torch.stack(zs, 1)


def test_done_threshold_is_a_positive_logit():
    # logit just above 0: every dream ends after its first step, counted as a termination
    dream = BatchedDream(constant_heads(make_model(), done=0.01), starts(), DreamSettings(1.15, 50))
    returns, lengths = dream.rollout(lambda d: torch.zeros(d.batch, 1), np.arange(6))
    assert np.all(lengths == 1) and np.all(returns == 1.0)
    assert bool(dream.terminated.all())
    # just below 0: never dies, runs to the cap exactly, +1 per step, not a termination
    dream = BatchedDream(constant_heads(make_model(), done=-0.01), starts(),
                         DreamSettings(1.15, 37))
    returns, lengths = dream.rollout(lambda d: torch.zeros(d.batch, 1), np.arange(6))
    assert np.all(lengths == 37) and np.all(returns == 37.0)
    assert not bool(dream.terminated.any()) and bool(dream.done.all())


def test_sampled_done_has_the_unweighted_probability_of_the_head():
    """done "sample": with a constant logit l trained under positive weight w, each step
    ends a dream with probability sigmoid(l - log w), so lengths are geometric."""
    weight, probability = 10.0, 0.05
    logit = float(np.log(weight * probability / (1 - probability)))
    dream = BatchedDream(constant_heads(make_model(), done=logit), starts(),
                         DreamSettings(1.15, 10_000, done_mode="sample", done_weight=weight))
    _, lengths = dream.rollout(lambda d: torch.zeros(d.batch, 1), np.arange(2000))
    assert abs(lengths.mean() - 1 / probability) < 1.5  # geometric mean 20, sd ~0.43
    assert bool(dream.terminated.all())
    # the threshold rule on the same head never ends a dream (logit < 0) ...
    never = BatchedDream(constant_heads(make_model(), done=logit), starts(),
                         DreamSettings(1.15, 50))
    assert np.all(never.rollout(lambda d: torch.zeros(d.batch, 1), np.arange(4))[1] == 50)
    # ... and sampled dreams are still a function of their seed alone
    again = BatchedDream(constant_heads(make_model(), done=logit), starts(),
                         DreamSettings(1.15, 10_000, done_mode="sample", done_weight=weight))
    assert np.array_equal(again.rollout(lambda d: torch.zeros(d.batch, 1),
                                        np.arange(1000, 1010))[1],
                          dream.rollout(lambda d: torch.zeros(d.batch, 1),
                                        np.arange(1000, 1010))[1])
    with pytest.raises(WmlabError, match="done mode"):
        BatchedDream(make_model(), starts(), DreamSettings(1.15, 5, done_mode="coin"))


def test_done_bias_shifts_the_logit_in_both_modes():
    """dream.done_bias is added to the done logit: with p = sigmoid(l - log w + b) the
    sampled lengths are geometric with that p, and the threshold rule fires when l + b > 0."""
    weight, bias = 10.0, float(np.log(4.0))
    logit = float(np.log(weight * 0.05 / 0.95))  # p = 0.05 without the bias
    dream = BatchedDream(constant_heads(make_model(), done=logit), starts(),
                         DreamSettings(1.15, 10_000, done_mode="sample", done_weight=weight,
                                       done_bias=bias))
    _, lengths = dream.rollout(lambda d: torch.zeros(d.batch, 1), np.arange(2000))
    odds = 4.0 * 0.05 / 0.95
    assert abs(lengths.mean() - (1 + odds) / odds) < 0.5  # p ~ 0.174: mean ~5.75
    below = BatchedDream(constant_heads(make_model(), done=-0.5), starts(),
                         DreamSettings(1.15, 30, done_bias=0.6))
    assert np.all(below.rollout(lambda d: torch.zeros(d.batch, 1), np.arange(4))[1] == 1)


def test_finished_dreams_are_frozen_and_later_steps_give_no_reward():
    dream = BatchedDream(constant_heads(make_model(), done=-5.0), starts(), DreamSettings(1.0, 3))
    dream.reset([1, 2])
    for _ in range(3):
        dream.step(torch.zeros(2, 1))
    z, h = dream.z.clone(), dream.hidden.clone()
    _, reward, done = dream.step(torch.ones(2, 1))
    assert bool(done.all()) and float(reward.abs().sum()) == 0.0
    assert torch.equal(z, dream.z) and torch.equal(h, dream.hidden)
    assert list(dream.t) == [3, 3]


@pytest.mark.parametrize("done_mode", ["threshold", "sample"])
def test_stepping_only_running_dreams_changes_nothing_but_the_work(done_mode):
    model = make_model(seed=8)
    row = 3 * model.shape.z_dim * model.shape.gaussians
    with torch.no_grad():  # deaths that depend on the state, so lengths spread
        model.head.weight[row] *= 30.0
        model.head.bias[row] = -3.0
    seeds = np.arange(40)

    def play(compact):
        dream = BatchedDream(model, starts(), DreamSettings(1.15, 300, done_mode=done_mode))
        dream.compact = compact
        dream.reset(seeds)
        zs, rewards, widths = [], [], []
        real_gates = dream._gates
        dream._gates = lambda x: (widths.append(len(x)), real_gates(x))[1]
        while not bool(dream.done.all()):
            actions = torch.tanh(dream.z[:, :1] + dream.hidden[:, :1])  # depends on the state
            z, reward, _ = dream.step(actions)
            zs.append(z.clone())
            rewards.append(reward.clone())
        return torch.stack(zs), torch.stack(rewards), dream.t.copy(), widths

    zs, rewards, lengths, widths = play(True)
    full_zs, full_rewards, full_lengths, full_widths = play(False)
    assert len(set(lengths.tolist())) > 5, "dreams should end at many different steps"
    assert np.array_equal(lengths, full_lengths)
    assert torch.allclose(zs, full_zs, atol=1e-5) and torch.equal(rewards, full_rewards)
    # the full-width way computes all 40 rows every step; compacting, the running ones
    # rounded up to a multiple of COMPACT_ROUND
    assert set(full_widths) == {40}
    running = [int((lengths > t).sum()) for t in range(len(widths))]
    round_up = dream_module.COMPACT_ROUND
    assert widths == [min(40, -(-n // round_up) * round_up) for n in running]
    assert sum(widths) < 0.8 * sum(full_widths)


def test_predicted_reward_is_the_dream_reward():
    model = constant_heads(make_model(reward_head=True), done=-5.0, reward=0.25)
    dream = BatchedDream(model, starts(), DreamSettings(1.0, 8))
    returns, lengths = dream.rollout(lambda d: torch.zeros(d.batch, 1), np.arange(3))
    assert np.all(lengths == 8) and np.allclose(returns, 8 * 0.25)


def test_same_seed_same_dream_wherever_it_runs():
    model = make_model(seed=3)
    a = run(BatchedDream(model, starts(), DreamSettings(1.15, 100)), [5, 7, 9], 70)
    b = run(BatchedDream(model, starts(), DreamSettings(1.15, 100)), [9, 11, 5, 7, 5], 70)
    # same batch size and kernels: bit for bit; duplicates inside a batch agree exactly
    assert torch.equal(b[2], b[4])
    for i, j in ((0, 2), (1, 3), (2, 0)):
        assert torch.allclose(a[i], b[j], atol=1e-5), (i, j)
    # a different seed gives a different dream
    assert not torch.allclose(b[0], b[1], atol=1e-2)
    # and a dream alone (batch of one) follows the same path
    alone = run(BatchedDream(model, starts(), DreamSettings(1.15, 100)), [7], 70)
    assert torch.allclose(alone[0], a[1], atol=1e-5)


def test_tau_changes_the_dream_and_must_be_positive():
    model = make_model(seed=4)
    cold = run(BatchedDream(model, starts(), DreamSettings(0.2, 100)), [1, 2, 3, 4] * 8, 30)
    hot = run(BatchedDream(model, starts(), DreamSettings(2.0, 100)), [1, 2, 3, 4] * 8, 30)
    # noise is scaled by sqrt(tau): step-to-step changes are larger when hot
    assert (hot.diff(dim=1).std() > 1.5 * cold.diff(dim=1).std())
    for tau in (0.0, -0.5):
        with pytest.raises(WmlabError, match="tau"):
            BatchedDream(model, starts(), DreamSettings(tau, 10))


def test_reset_of_some_dreams_leaves_the_others_untouched():
    model = constant_heads(make_model(seed=5), done=-5.0)
    reference = run(BatchedDream(model, starts(), DreamSettings(1.1, 100)), [10, 11, 12], 20)
    dream = BatchedDream(model, starts(), DreamSettings(1.1, 100))
    dream.reset([10, 11, 12])
    zs = [dream.z.clone()]
    for t in range(20):
        if t == 8:
            dream.reset_rows(np.array([1]), np.array([99]))
        dream.step(torch.full((3, 1), 0.3))
        zs.append(dream.z.clone())
    zs = torch.stack(zs, 1)
    assert torch.allclose(zs[0], reference[0], atol=1e-6)
    assert torch.allclose(zs[2], reference[2], atol=1e-6)
    # the restarted dream follows seed 99's own dream from its start
    alone = run(BatchedDream(model, starts(), DreamSettings(1.1, 100)), [99], 12)
    assert torch.allclose(zs[1, 9:], alone[0, 1:13], atol=1e-5)
    assert int(dream.t[1]) == 12 and int(dream.t[0]) == 20


def test_vector_env_resets_finished_dreams_independently():
    model = make_model(seed=6)
    # a done logit that varies strongly with h, and a bias so that ~3% of steps end a dream:
    # dreams then end at varied times (z is sampled differently per seed)
    s = model.shape
    row = 3 * s.z_dim * s.gaussians
    logits = []
    with torch.no_grad():
        model.head.weight[row] *= 40.0
        model.head.bias[row] = -1000.0  # the probe must not die
        probe = BatchedDream(model, starts(), DreamSettings(1.15, 200))
        probe.reset(np.arange(16))
        for _ in range(40):
            probe.step(torch.zeros(16, 1))
            logits.append(probe.hidden @ model.head.weight[row])
        model.head.bias[row] = -float(torch.quantile(torch.stack(logits).flatten(), 0.97))
    env = DreamEnv(model, starts(), DreamSettings(1.15, 60), num_envs=8, features="zch")
    assert env.observation_space.shape == (8, 4 + 2 * 16)
    assert env.single_action_space.shape == (1,)
    obs, info = env.reset(seed=100)
    assert obs.shape == (8, 36) and obs.dtype == np.float32
    # what a C reading [z, c, h] reads, in that order (the agent's features)
    env.step(np.zeros((8, 1), np.float32))
    obs, *_ = env.step(np.zeros((8, 1), np.float32))
    d = env.dream
    assert np.array_equal(obs, torch.cat([d.z, d.c, d.h], 1).numpy())
    assert np.abs(obs[:, 4:20]).sum() > 0  # c has moved from zero: the order is tested
    obs, info = env.reset(seed=100)
    ended_at: dict[int, int] = {}
    restarted = []
    pending = np.zeros(8, bool)
    for t in range(150):
        obs, reward, terminated, truncated, _ = env.step(np.zeros((8, 1), np.float32))
        for slot in np.flatnonzero(pending):
            restarted.append(slot)
            assert reward[slot] == 0.0 and not terminated[slot] and not truncated[slot]
            # the restart observation: fresh state (h = c = 0) at the new episode's start
            assert np.all(obs[slot, 4:] == 0.0)
        running = ~pending
        assert np.all(reward[running] == 1.0)
        for slot in np.flatnonzero(terminated | truncated):
            ended_at.setdefault(int(slot), t)
        pending = terminated | truncated
    assert len(set(ended_at.values())) > 1, "dreams should end at different steps"
    assert restarted and env._episode.sum() == len(restarted)
    # seeds: the same reset seed replays the same episodes
    env2 = DreamEnv(model, starts(), DreamSettings(1.15, 60), num_envs=8, features="zch")
    first, _ = env2.reset(seed=100)
    again, _ = env.reset(seed=100)
    assert np.array_equal(first, again)


def test_calibration_reports_survival_per_reference_policy():
    dying = constant_heads(make_model(seed=7), done=3.0)
    report = dream_calibration(dying, starts(), DreamSettings(1.15, 30), episodes=8)
    assert set(report["policies"]) == {"random", "noop", "left"}
    for row in report["policies"].values():
        assert row["survival_mean"] == 1.0 and row["survival_std"] == 0.0
    immortal = constant_heads(make_model(seed=7), done=-3.0)
    report = dream_calibration(immortal, starts(), DreamSettings(1.15, 30), episodes=8)
    for row in report["policies"].values():
        assert row["survival_mean"] == 30 and row["capped_fraction"] == 1.0
    # Doom's mapping: raw -1 is "left" (-1 in M's action), noop 0, random in {-1, 0, 1}
    from wmlab.dream import action_converter

    to_vector, raw_dim = action_converter("doom")
    dream = BatchedDream(immortal, starts(), DreamSettings(1.0, 5))
    dream.reset(np.arange(64))
    assert torch.equal(reference_policy("left", raw_dim, 0, to_vector)(dream),
                       -torch.ones(64, 1))
    assert torch.equal(reference_policy("noop", raw_dim, 0, to_vector)(dream),
                       torch.zeros(64, 1))
    assert set(reference_policy("random", raw_dim, 0, to_vector)(dream).flatten().tolist()) \
        == {-1.0, 0.0, 1.0}
    # the sweep runs on each dream's own clock, as the real-game policy does
    from wmlab.config import SWEEP_FIRST, SWEEP_PERIOD
    from wmlab.policies import sweep_output

    sweep = reference_policy("sweep", raw_dim, 0, to_vector)
    dream = BatchedDream(immortal, starts(), DreamSettings(1.0, 400))
    dream.reset(np.arange(4))
    firsts = []
    for _ in range(350):
        actions = sweep(dream)
        assert bool((actions == actions[0]).all())
        firsts.append(actions[0, 0].item())
        dream.step(actions)
    assert firsts == sweep_output(np.arange(350), SWEEP_FIRST, SWEEP_PERIOD).tolist()


def test_bfloat16_dream_stays_close_to_float32(monkeypatch):
    model = constant_heads(make_model(seed=8, hidden=32), done=-5.0)
    a = run(BatchedDream(model, starts(), DreamSettings(1e-3, 100)), [1, 2], 5)
    bf16 = BatchedDream(model, starts(), DreamSettings(1e-3, 100, precision="bfloat16"))
    b = run(bf16, [1, 2], 5)
    assert torch.allclose(a, b, atol=0.1)
    # bf16 only where the hardware has it: emulated bf16 would be slower than float32
    assert bf16.dtype == (torch.bfloat16 if dream_module.bf16_is_native(bf16.device)
                          else torch.float32)
    monkeypatch.setattr(dream_module, "bf16_is_native", lambda device: False)
    assert BatchedDream(model, starts(),
                        DreamSettings(1e-3, 100, precision="bfloat16")).dtype == torch.float32
    with pytest.raises(WmlabError, match="precision"):
        BatchedDream(model, starts(), DreamSettings(1.0, 10, precision="float16"))


def test_dream_and_comparison_gifs(tmp_path):
    import imageio.v3 as iio

    from wmlab.dream.pictures import compare_gif, dream_gif, random_policy
    from wmlab.vision.model import ConvVAE

    torch.manual_seed(0)
    vae = ConvVAE(4).eval()
    model = constant_heads(make_model(seed=9), done=-5.0)
    trace = dream_gif(str(tmp_path / "dream.gif"), model, vae, starts(),
                      DreamSettings(1.15, 12), 12, 3,
                      random_policy(1, 3))
    frames = iio.imread(tmp_path / "dream.gif")
    assert frames.shape[0] == 13 and frames.shape[1:3] == (192, 192)
    assert trace.done_at is None and len(trace.rewards) == 12
    rng = np.random.default_rng(0)
    real = rng.integers(0, 255, (11, 64, 64, 3), dtype=np.uint8)
    mu = rng.normal(size=(11, 4)).astype(np.float32)
    count = compare_gif(str(tmp_path / "compare.gif"), model, vae, real, mu,
                        np.full_like(mu, -3.0), rng.uniform(-1, 1, (10, 1)),
                        DreamSettings(1.15, 2100), 0)
    panels = iio.imread(tmp_path / "compare.gif")
    assert count == 11 and panels.shape[1:3] == (192, 3 * 192)


def test_pipeline_encode_train_mdrnn_and_dream_cli(tmp_path, capsys):
    """Episodes -> a (tiny, untrained) V -> encode -> train-mdrnn -> dream GIFs, via the CLI;
    then a V that changes under M is refused."""
    import json

    import imageio.v3 as iio

    from wmlab.checkpoint import save_checkpoint
    from wmlab.cli import main
    from wmlab.config import load_config
    from wmlab.data import EpisodeStore
    from wmlab.data.episode_file import Episode
    from wmlab.vision.encode import encode_store
    from wmlab.vision.model import ConvVAE

    sets = ["run.root=" + json.dumps(str(tmp_path)), "run.device=\"cpu\"", "vae.z_dim=4",
            "mdrnn.hidden=8", "mdrnn.batch_size=4", "mdrnn.seq_len=10",
            "mdrnn.calibration_episodes=4", "dream.max_steps=15"]
    common = ["--preset", "doom", "--profile", "quick", "--run", "e2e"]
    for item in sets:
        common += ["--set", item]
    cfg = load_config("doom", "quick", sets + ["run.name=\"e2e\""])
    store = EpisodeStore.create_or_open(cfg.store_url(), env="doom", backend="vizdoom",
                                        action_dim=1)
    rng = np.random.default_rng(0)
    for i in range(10):
        steps = int(rng.integers(20, 35))
        dones = np.zeros(steps, bool)
        dones[-1] = True
        store.append(Episode(frames=rng.integers(0, 255, (steps + 1, 64, 64, 3), np.uint8),
                             actions=rng.choice([-1.0, 0.0, 1.0], (steps, 1)).astype(np.float32),
                             rewards=np.ones(steps, np.float32), dones=dones,
                             meta={"collection": "random", "index": i}))
    torch.manual_seed(0)
    vae = ConvVAE(4)
    save_checkpoint(f"{cfg.run_dir()}/vision", "vae", 1, vae.state_dict(), None,
                    {"z_dim": 4, "kind": "vae"})
    encode_store(cfg, progress=False)
    assert main(["train-mdrnn", *common, "--steps", "4", "--no-progress"]) == 0
    assert main(["dream", *common, "--steps", "12"]) == 0
    out = capsys.readouterr().out
    memory = tmp_path / "e2e" / "memory"
    assert "dream.gif" in out and "dream-compare.gif" in out
    dream = iio.imread(memory / "dream.gif")
    assert 2 <= dream.shape[0] <= 13 and dream.shape[1:3] == (192, 192)
    compare = iio.imread(memory / "dream-compare.gif")
    assert compare.shape[1:3] == (192, 3 * 192)
    # a controller drives it: [z, c, h] of 4 + 8 + 8 -> 1, no bias (the Doom preset's C)
    from safetensors.torch import save_file

    save_file({"params": torch.full((1, 20), 0.1)}, str(tmp_path / "c.safetensors"))
    assert main(["dream", *common, "--steps", "5", "--no-compare", "--controller",
                 str(tmp_path / "c.safetensors")]) == 0
    assert '"driver": "controller"' in capsys.readouterr().out
    save_file({"params": torch.zeros(7)}, str(tmp_path / "bad.safetensors"))
    assert main(["dream", *common, "--controller", str(tmp_path / "bad.safetensors")]) == 2
    assert "needs 20" in capsys.readouterr().err
    # retrain V (new weights, new fingerprint): M's latents no longer fit it
    save_checkpoint(f"{cfg.run_dir()}/vision", "vae", 2, ConvVAE(4).state_dict(), None,
                    {"z_dim": 4, "kind": "vae"})
    before = sorted(p.name for p in memory.iterdir())
    assert main(["dream", *common, "--steps", "12"]) == 2
    assert "encode" in capsys.readouterr().err
    assert main(["train-mdrnn", *common, "--steps", "8", "--no-progress"]) == 2
    assert "wmlab encode" in capsys.readouterr().err
    assert sorted(p.name for p in memory.iterdir()) == before


# ---------------------------------------------------------------------------------------------
# M's dropout kept on in the dream (dream.dropout)


def _first_steps(settings: DreamSettings, seeds, steps: int = 1):
    """The dream of ``settings`` after ``steps`` steps: (z trajectory, h, the dream)."""
    dream = BatchedDream(constant_heads(make_model(seed=9, hidden=32), done=-5.0), starts(),
                         settings)
    zs = run(dream, seeds, steps)
    return zs, dream.h.clone(), dream


def test_a_dream_without_dropout_draws_no_masks_and_is_the_default_dream():
    """dropout 0 is the dream from before: the same trajectory bit for bit, and each dream's
    generator left where the noise alone leaves it (no mask drawn)."""
    default, _, plain = _first_steps(DreamSettings(1.15, 100), [3, 4, 5], 70)
    off, _, dream = _first_steps(DreamSettings(1.15, 100, dropout=0.0), [3, 4, 5], 70)
    assert torch.equal(default, off) and dream._keep is None
    z_dim = dream.shape.z_dim
    for row, seed in enumerate([3, 4, 5]):
        rng = dream_module._row_rng(seed)
        rng.integers(5)
        rng.standard_normal(z_dim)
        for _ in range(2):  # the blocks of noise of 70 steps: two of 64
            rng.random((64, z_dim), dtype=np.float32)
            rng.standard_normal((64, z_dim), dtype=np.float32)
        assert rng.random() == dream._rngs[row].random() == plain._rngs[row].random()


def test_dream_dropout_is_reproducible_and_changes_only_the_heads_input():
    seeds = [3, 4, 5, 6]
    on = DreamSettings(1.15, 100, dropout=0.3)
    a, _, dream = _first_steps(on, seeds, 70)
    b, _, _ = _first_steps(on, seeds, 70)
    assert torch.equal(a, b)  # the same seeds: the same masks, the same dream
    off, _, plain = _first_steps(DreamSettings(1.15, 100), seeds, 70)
    assert not torch.allclose(a[:, 1:], off[:, 1:], atol=1e-3)  # the masks change the dream
    # ...and nothing else: each dream's noise is the noise it has without dropout
    assert torch.equal(dream._uniform, plain._uniform)
    assert torch.equal(dream._normal, plain._normal)
    # about p of the units dropped, a fresh mask per step and per dream
    keep = dream._keep.float()
    assert abs(float(keep.mean()) - 0.7) < 0.02
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    # the first step: the same start (the masks have a stream of their own) and the same state
    # (dropout acts on the head's input, never on h), yet another z'
    z_on, h_on, _ = _first_steps(on, seeds)
    z_off, h_off, _ = _first_steps(DreamSettings(1.15, 100), seeds)
    assert torch.equal(z_on[:, 0], z_off[:, 0]) and torch.equal(h_on, h_off)
    assert not torch.allclose(z_on[:, 1], z_off[:, 1], atol=1e-4)


def test_a_dropout_dream_is_the_same_wherever_it_runs():
    on = DreamSettings(1.15, 100, dropout=0.25)
    a, _, _ = _first_steps(on, [5, 7, 9], 70)
    b, _, _ = _first_steps(on, [9, 11, 5, 7, 5], 70)
    assert torch.equal(b[2], b[4])
    for i, j in ((0, 2), (1, 3), (2, 0)):
        assert torch.allclose(a[i], b[j], atol=1e-5), (i, j)
    alone, _, _ = _first_steps(on, [7], 70)
    assert torch.allclose(alone[0], a[1], atol=1e-5)


def test_dropout_dreams_in_bfloat16_and_compacted_steps():
    """The mask is applied before the head's bf16 matmul (reproducibly), and the compacted
    steps of a batch whose dreams end at different times draw each dream's own mask."""
    on = DreamSettings(1.15, 100, dropout=0.3, precision="bfloat16")
    a, _, dream = _first_steps(on, [1, 2, 3], 20)
    b, _, _ = _first_steps(on, [1, 2, 3], 20)
    assert torch.equal(a, b) and dream._keep is not None
    model = make_model(seed=8)
    row = 3 * model.shape.z_dim * model.shape.gaussians
    with torch.no_grad():  # deaths that depend on the state, so lengths spread
        model.head.weight[row] *= 30.0
        model.head.bias[row] = -3.0
    settings = DreamSettings(1.15, 300, dropout=0.2)
    compact, full = BatchedDream(model, starts(), settings), BatchedDream(model, starts(),
                                                                         settings)
    full.compact = False
    for dream in (compact, full):
        dream.reset(np.arange(40))
        while not bool(dream.done.all()):
            dream.step(torch.tanh(dream.z[:, :1] + dream.hidden[:, :1]))
    assert len(set(compact.t.tolist())) > 5  # dreams of many lengths
    assert np.array_equal(compact.t, full.t)
    assert torch.allclose(compact.z, full.z, atol=1e-5)


def test_dream_dropout_must_be_a_probability_and_stamps_the_calibration(monkeypatch):
    import wmlab.dream.calibration as calibration
    from wmlab.config import load_config

    for p in (-0.1, 1.0):
        with pytest.raises(WmlabError, match="dropout"):
            DreamSettings(1.0, 10, dropout=p)
    # the calibration's stamp of a dream without dropout is the one from before the key
    assert "dropout" not in DreamSettings(1.0, 10).identity()
    assert DreamSettings(1.0, 10, dropout=0.1).identity()["dropout"] == 0.1
    # and a dream with it is another dream: its calibration is measured again
    monkeypatch.setattr(calibration, "read_info", lambda folder, name: {"fingerprint": "m"})
    off = load_config("doom", "quick", ["mdrnn.dropout=0.2"])
    on = load_config("doom", "quick", ["mdrnn.dropout=0.2", "dream.dropout=true"])
    assert calibration.calibration_fingerprint(off) != calibration.calibration_fingerprint(on)


def test_dream_env_refuses_features_a_controller_cannot_read():
    with pytest.raises(WmlabError, match="'zc' is not one of z, zh, zch"):
        DreamEnv(make_model(seed=7), starts(), DreamSettings(1.15, 60), num_envs=2,
                 features="zc")
