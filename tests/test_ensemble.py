"""M's ensemble (``mdrnn.ensemble``): its Ms trained from their own seeds in their own
folders, and the dream they step together (ends when any says so, z from each in turn)."""

import copy

import numpy as np
import pytest
import torch

from test_dream import constant_heads, make_model, starts
from test_memory import make_series, tiny_config
from wmlab.agent import AgentModels, run_dream, workload_from_config
from wmlab.checkpoint import checkpoint_exists, load_checkpoint
from wmlab.controller.model import controller_shape
from wmlab.dream import BatchedDream, DreamSettings, EnsembleDream, dream_calibration
from wmlab.envs import get_spec
from wmlab.errors import WmlabError
from wmlab.memory.model import FINAL_WEIGHTS, INITIAL_Z
from wmlab.memory.train import SeriesSet, train_ensemble, train_mdrnn
from wmlab.runs import RunLayout

pytestmark = pytest.mark.usefixtures("one_thread")


def _steps(dream, seeds, steps, action=0.3):
    """z after each step, the rewards summed, and the steps each dream ran."""
    z = dream.reset(seeds)
    zs, total = [z.clone()], torch.zeros(len(seeds))
    lengths = np.zeros(len(seeds), dtype=int)
    for _ in range(steps):
        lengths += (~dream.done).numpy()
        z, reward, _ = dream.step(torch.full((len(seeds), 1), action))
        zs.append(z.clone())
        total += reward
    return torch.stack(zs, 1), total, lengths


@pytest.mark.parametrize("done_mode", ["threshold", "sample"])
def test_an_ensemble_of_one_m_copied_is_that_ms_dream(done_mode):
    model = make_model(seed=3)
    with torch.no_grad():  # a done logit that crosses 0 now and then: dreams of any length
        row = 3 * model.shape.z_dim * model.shape.gaussians
        model.head.weight[row] *= 5.0
        model.head.bias[row] = -0.5
    settings = DreamSettings(1.15, 30, done_mode=done_mode)
    seeds = [4, 9, 11, 12, 13, 14]
    alone = _steps(BatchedDream(model, starts(), settings), seeds, 30)
    together = _steps(EnsembleDream([model, copy.deepcopy(model)], starts(), settings),
                      seeds, 30)
    assert torch.equal(alone[0], together[0]) and torch.equal(alone[1], together[1])
    assert list(alone[2]) == list(together[2])
    assert len(set(alone[2])) > 1  # dreams of several lengths: the ends were compared too


def test_the_dream_ends_when_any_m_says_so_and_pays_their_mean_reward():
    lasting = constant_heads(make_model(seed=1, reward_head=True), done=-9.0, reward=1.0)
    ending = constant_heads(make_model(seed=2, reward_head=True), done=9.0, reward=3.0)
    settings = DreamSettings(1.0, 50)
    for models in ([lasting, ending], [ending, lasting]):
        _, total, lengths = _steps(EnsembleDream(models, starts(), settings), [1, 2, 3], 5)
        assert list(lengths) == [1, 1, 1]
        assert torch.allclose(total, torch.full((3,), 2.0))
    _, total, lengths = _steps(EnsembleDream([lasting, copy.deepcopy(lasting)], starts(),
                                             settings), [1, 2, 3], 5)
    assert list(lengths) == [5, 5, 5] and torch.allclose(total, torch.full((3,), 5.0))


def test_a_pessimistic_ensemble_pays_the_least_reward_of_its_ms():
    """dream.ensemble_reward = "min": a step pays the least of the Ms' rewards, so the
    reward only an optimistic M predicts is not paid; "mean" stays the default."""
    low = constant_heads(make_model(seed=1, reward_head=True), done=-9.0, reward=1.0)
    high = constant_heads(make_model(seed=2, reward_head=True), done=-9.0, reward=3.0)
    pessimistic = DreamSettings(1.0, 50, ensemble_reward="min")
    for models in ([low, high], [high, low]):
        _, total, lengths = _steps(EnsembleDream(models, starts(), pessimistic), [1, 2], 4)
        assert list(lengths) == [4, 4] and torch.allclose(total, torch.full((2,), 4.0))
        returns, _ = EnsembleDream(models, starts(), pessimistic).rollout(
            lambda dream: torch.zeros(dream.batch, 1), np.array([1, 2]))
        assert np.allclose(returns, 50.0)  # 50 steps at the least reward, 1
    _, total, _ = _steps(EnsembleDream([low, high], starts(), DreamSettings(1.0, 50)),
                         [1, 2], 4)
    assert torch.allclose(total, torch.full((2,), 8.0))  # the mean, 2 a step
    with pytest.raises(WmlabError, match="mean or min"):
        DreamSettings(1.0, 50, ensemble_reward="max")
    assert "ensemble_reward" not in DreamSettings(1.0, 50).identity()  # old fingerprints


def test_the_next_z_comes_from_each_m_in_turn():
    near = constant_heads(make_model(seed=5), done=-9.0)
    far = constant_heads(make_model(seed=6), done=-9.0)
    s = far.shape
    mixture = 3 * s.z_dim * s.gaussians
    with torch.no_grad():  # every mixture mean of `far` at +50, whatever its input
        far.head.weight[:mixture].view(s.z_dim, 3, s.gaussians, -1)[:, 1] = 0.0
        far.head.bias[:mixture].view(s.z_dim, 3, s.gaussians)[:, 1] = 50.0
    settings = DreamSettings(0.01, 10)
    zs, _, _ = _steps(EnsembleDream([near, far], starts(), settings), [1, 2], 4)
    far_steps = [bool((zs[:, t].abs() > 40).all()) for t in range(1, 5)]
    assert far_steps == [False, True, False, True]


def test_ensemble_members_must_fit_together():
    with pytest.raises(WmlabError, match="same z"):
        EnsembleDream([make_model(z_dim=4), make_model(z_dim=6)], starts(), DreamSettings(1.0, 10))
    with pytest.raises(WmlabError, match="at least one"):
        EnsembleDream([], starts(), DreamSettings(1.0, 10))


def test_rollouts_dream_in_the_ensemble_and_c_reads_the_first_ms_state():
    spec = get_spec("doom")
    first = constant_heads(make_model(z_dim=4, hidden=8), done=-9.0)
    ending = constant_heads(make_model(seed=4, z_dim=4, hidden=8), done=9.0)
    shape = controller_shape("zch", 4, 8, spec.controller_outputs, 0, False, False, False)
    params = np.random.default_rng(0).normal(0, 0.3, (2, shape.num_params))
    seeds = np.arange(6).reshape(2, 3)
    settings = DreamSettings(1.15, 40)
    models = AgentModels(spec=spec, mdrnn=first, features="zch", shape=shape, start=starts())
    alone = run_dream(models, params, seeds, settings)
    assert (alone == 40).all()
    copied = AgentModels(spec=spec, mdrnn=first, features="zch", shape=shape, start=starts(),
                         ensemble=(copy.deepcopy(first),))
    assert np.array_equal(run_dream(copied, params, seeds, settings), alone)
    ended = AgentModels(spec=spec, mdrnn=first, features="zch", shape=shape, start=starts(),
                        ensemble=(ending,))
    assert (run_dream(ended, params, seeds, settings) == 1).all()


def test_members_train_from_their_own_seeds_in_their_own_folders(tmp_path):
    series = make_series(10, 25)
    data = SeriesSet(series[:8], series[8:])
    cfg = tiny_config(tmp_path, ensemble=3)
    layout = RunLayout.of(cfg)
    train_mdrnn(cfg, progress=False, series=data)
    assert not checkpoint_exists(layout.memory_member(1), FINAL_WEIGHTS)
    result = train_mdrnn(cfg, progress=False, series=data, member=1)
    assert result.finished and layout.memory_member(1) == f"{layout.memory}/ensemble/1"
    first = load_checkpoint(layout.memory, FINAL_WEIGHTS, with_state=False).weights
    other = load_checkpoint(layout.memory_member(1), FINAL_WEIGHTS, with_state=False).weights
    assert first.keys() == other.keys()
    assert not torch.equal(first["head.weight"], other["head.weight"])
    assert not checkpoint_exists(layout.memory_member(1), INITIAL_Z)  # one start store
    with pytest.raises(WmlabError, match="no member 3"):
        train_mdrnn(cfg, progress=False, series=data, member=3)


def test_the_dream_workload_names_the_other_ms_and_the_real_one_none(tmp_path):
    cfg = tiny_config(tmp_path, ensemble=3)
    layout = RunLayout.of(cfg)
    dream = workload_from_config(cfg, "dream")
    assert dream.ensemble == (layout.memory_member(1), layout.memory_member(2))
    assert workload_from_config(cfg, "real").ensemble == ()
    assert workload_from_config(tiny_config(tmp_path), "dream").ensemble == ()


def test_the_whole_ensemble_trains_and_a_second_call_resumes_finished(tmp_path):
    series = make_series(10, 25)
    data = SeriesSet(series[:8], series[8:])
    cfg = tiny_config(tmp_path, ensemble=2)
    results = train_ensemble(cfg, progress=False, series=data)
    assert [r.finished for r in results] == [True, True]
    assert [r.folder for r in results] == [RunLayout.of(cfg).memory,
                                           RunLayout.of(cfg).memory_member(1)]
    again = train_ensemble(cfg, progress=False, series=data)
    assert [r.resumed_from for r in again] == [cfg.mdrnn.steps] * 2


def test_the_calibration_dreams_in_the_ensemble_too():
    lasting = constant_heads(make_model(seed=1), done=-9.0)
    ending = constant_heads(make_model(seed=2), done=9.0)
    settings = DreamSettings(1.0, 12)
    alone = dream_calibration(lasting, starts(), settings, episodes=4)
    both = dream_calibration(lasting, starts(), settings, episodes=4, ensemble=(ending,))
    assert "ensemble" not in alone and both["ensemble"] == 2
    for name, row in both["policies"].items():
        assert alone["policies"][name]["survival_mean"] == 12
        assert row["survival_mean"] == 1 and row["return_mean"] == 1
