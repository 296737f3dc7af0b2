"""es.h_components: CMA-ES searching a linear C's weights on h only along h's principal
directions, the controllers it scores and saves whole."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from wmlab.checkpoint import load_checkpoint
from wmlab.config import EsConfig
from wmlab.controller.cmaes import load_controller_params, load_snapshots, run_es
from wmlab.controller.model import ControllerShape
from wmlab.controller.subspace import (
    SPREAD_FLOOR,
    HSubspace,
    ScaledInputs,
    check_h_subspace,
    check_scaled_inputs,
    input_spread,
    principal_directions,
)
from wmlab.errors import WmlabError

Z, H, A, K = 4, 8, 2, 3


def _space(clock: int = 0) -> HSubspace:
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(H, K)))[0].T  # (K, H), orthonormal rows
    return HSubspace(ControllerShape(inputs=Z + H + clock, outputs=A), Z, basis,
                     rng.normal(size=H))


def _h_weights(space: HSubspace, params: np.ndarray) -> np.ndarray:
    w = params[:A * space.shape.inputs].reshape(A, space.shape.inputs)
    return w[:, Z:Z + H]


def _off_span(space: HSubspace, params: np.ndarray) -> float:
    """How far C's weights on h reach outside the basis's span."""
    w_h = _h_weights(space, params)
    return float(np.abs(w_h - w_h @ space.basis.T @ space.basis).max())


def test_searched_parameters_map_to_whole_controllers_and_back():
    space = _space(clock=2)
    assert space.size == A * (Z + K + 2) + A < space.shape.num_params
    theta = np.random.default_rng(1).normal(size=(5, space.size))
    full = space.full(theta)
    assert full.shape == (5, space.shape.num_params)
    assert max(_off_span(space, row) for row in full) < 1e-12
    for row, point in zip(full, theta, strict=True):  # a controller in the span: exact
        np.testing.assert_allclose(space.coordinates(row), point, atol=1e-12)
    # weights on z and on the clock, and the biases, are searched as they are
    w = full[0, :A * space.shape.inputs].reshape(A, -1)
    others = theta[0, :A * (Z + 2)].reshape(A, Z + 2)  # per output: z's, then the clock's
    np.testing.assert_array_equal(w[:, :Z], others[:, :Z])
    np.testing.assert_array_equal(w[:, Z + H:], others[:, Z:])
    np.testing.assert_array_equal(full[0, -A:], theta[0, -A:])


def test_a_start_outside_the_span_acts_the_same_where_h_is_at_its_mean():
    space = _space()
    params = np.random.default_rng(2).normal(size=space.shape.num_params)
    projected = space.full(space.coordinates(params))[0]
    assert _off_span(space, params) > 0.1 and _off_span(space, projected) < 1e-12

    def pre_activation(p: np.ndarray, h: np.ndarray) -> np.ndarray:
        w, b = p[:A * (Z + H)].reshape(A, Z + H), p[A * (Z + H):]
        return w @ np.concatenate([np.ones(Z), h]) + b

    np.testing.assert_allclose(pre_activation(projected, space.mean),
                               pre_activation(params, space.mean), atol=1e-12)
    # an h that moves only along the basis from its mean: still the same acts
    along = space.mean + space.basis.T @ np.array([0.5, -1.0, 2.0])
    np.testing.assert_allclose(pre_activation(projected, along),
                               pre_activation(params, along), atol=1e-12)


def test_principal_directions_find_the_plane_the_states_move_in():
    rng = np.random.default_rng(3)
    plane = np.linalg.qr(rng.normal(size=(H, 2)))[0]  # (H, 2)
    centre = rng.normal(size=H)
    turn = np.linspace(0, 2 * np.pi, 500, endpoint=False)  # uncorrelated, variances 9 / 1
    along = np.stack([3.0 * np.cos(turn), np.sin(turn)], axis=1)
    states = centre + along @ plane.T + 1e-3 * rng.normal(size=(500, H))
    basis, mean = principal_directions(states, 2)
    np.testing.assert_allclose(mean, centre, atol=0.2)
    np.testing.assert_allclose(basis @ basis.T, np.eye(2), atol=1e-9)
    np.testing.assert_allclose(np.abs(basis @ plane), np.eye(2), atol=1e-3)  # in order


class Recorded:
    """Fitness -|w - target|^2, recording every controller it is given."""

    def __init__(self, target: np.ndarray) -> None:
        self.target, self.seen = target, []

    def evaluate(self, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        self.seen.append(np.array(params))
        return -np.sum((params - self.target) ** 2, axis=1)


ES = EsConfig(population=8, rollouts=1, generations=12, eval_every=3, eval_rollouts=2,
              sigma0=0.2, l2=0.0)


def test_cma_es_in_the_subspace_scores_and_saves_whole_controllers(tmp_path):
    space = _space()
    target = space.full(np.random.default_rng(4).normal(size=space.size))[0]
    fitness = Recorded(target)
    start = np.zeros(space.shape.num_params)
    result = run_es(fitness, space.shape.num_params, ES, str(tmp_path), progress=False,
                    start=start, space=space)
    assert all(batch.shape[1] == space.shape.num_params for batch in fitness.seen)
    assert max(_off_span(space, row) for batch in fitness.seen for row in batch) < 1e-6  # float32
    first = -np.sum(target ** 2)
    assert result.best_score > 0.5 * first  # it moves towards a target in the span
    params, _ = load_controller_params(str(tmp_path))
    assert params.shape == (space.shape.num_params,)
    assert all(len(s.params) == space.shape.num_params for s in load_snapshots(str(tmp_path)))
    # without the subspace CMA-ES moves every weight: the h-weights leave the span
    free = Recorded(target)
    run_es(free, space.shape.num_params, ES, str(tmp_path / "free"), progress=False,
           start=start)
    assert max(_off_span(space, row) for row in free.seen[0]) > 0.01


def test_a_search_in_the_subspace_resumes_exactly(tmp_path):
    space = _space()
    target = space.full(np.full(space.size, 0.3))[0]
    start = np.random.default_rng(5).normal(size=space.shape.num_params)
    whole = run_es(Recorded(target), space.shape.num_params, ES, str(tmp_path / "a"),
                   progress=False, start=start, space=space)
    run_es(Recorded(target), space.shape.num_params, ES, str(tmp_path / "b"), progress=False,
           start=start, space=space, stop_after_generations=5)
    resumed = run_es(Recorded(target), space.shape.num_params, ES, str(tmp_path / "b"),
                     progress=False, space=space)
    assert resumed.resumed_from == 5
    np.testing.assert_array_equal(whole.mean, resumed.mean)
    assert whole.best_score == resumed.best_score
    # the whole search's size is checked on resume: the same folder without the subspace
    with pytest.raises(WmlabError, match="parameters"):
        run_es(Recorded(target), space.shape.num_params, ES, str(tmp_path / "b"),
               progress=False)


def test_h_components_refuses_what_it_cannot_search():
    linear = ControllerShape(inputs=Z + H, outputs=A)
    check_h_subspace(linear, "zh", K, H)
    with pytest.raises(WmlabError, match="es.h_components.*hidden layer"):
        check_h_subspace(ControllerShape(inputs=Z + H, outputs=A, hidden=4), "zh", K, H)
    with pytest.raises(WmlabError, match="on zch"):
        check_h_subspace(ControllerShape(inputs=Z + 2 * H, outputs=A), "zch", K, H)
    with pytest.raises(WmlabError, match="at most 8"):
        check_h_subspace(linear, "zh", H + 1, H)


def _one_c_generation(tmp_path: Path, option: str) -> tuple[Any, str, Any]:
    """A tiny CarRacing run with recorded random episodes, its C stage stopped after one
    generation under ``option``: (config, controller folder, the stage's result)."""
    from agent_fixtures import make_run, record_car_episodes
    from test_carracing_budget import TINY_CAR, carracing_mdrnn
    from wmlab.pipeline.controller_stage import train_controller
    from wmlab.runs import RunLayout

    tiny = tuple(o for o in TINY_CAR if not o.startswith("es.dream_generations"))
    m = carracing_mdrnn(True)
    cfg = make_run(tmp_path / "run", "carracing", (*tiny, option), mdrnn=m)
    record_car_episodes(cfg, m.shape.z_dim, "random")
    result = train_controller(cfg, progress=False, stop_after_generations=1)
    return cfg, RunLayout.of(cfg).controller, result


def test_the_c_stage_searches_the_subspace_of_the_runs_episodes(tmp_path, one_thread):
    """es.h_components through train_controller: the basis fitted on the run's recorded
    episodes (M run over them), kept in the controller folder, every controller the game
    scores inside its span, and a resumed stage reads the same basis back."""
    from wmlab.pipeline.controller_stage import train_controller

    cfg, folder, result = _one_c_generation(tmp_path, "es.h_components=3")
    saved = load_checkpoint(folder, "h-basis", with_state=False)
    basis = saved.weights["basis"].double().numpy()
    assert basis.shape == (3, 16) and saved.info["components"] == 3  # M's 16 units
    space = HSubspace(ControllerShape(inputs=8 + 16, outputs=3), 8, basis,
                      saved.weights["mean"].double().numpy())
    scored = load_snapshots(folder)
    assert scored and max(_off_span_of(space, s.params) for s in scored) < 1e-6
    resumed = train_controller(cfg, progress=False)
    assert resumed.resumed_from == result.generation == 1
    again = load_checkpoint(folder, "h-basis", with_state=False).weights["basis"]
    torch.testing.assert_close(again, saved.weights["basis"])
    params, _ = load_controller_params(folder)
    assert params.shape == (3 * (8 + 16) + 3,) and _off_span_of(space, params) < 1e-6
    assert json.loads(Path(folder, "h-basis.json").read_text())["components"] == 3


def _off_span_of(space: HSubspace, params: np.ndarray) -> float:
    z = space.h_start
    hidden = space.basis.shape[1]
    w = np.asarray(params, dtype=np.float64)[:3 * (z + hidden)].reshape(3, -1)[:, z:z + hidden]
    return float(np.abs(w - w @ space.basis.T @ space.basis).max())


# es.standardize: the same linear C searched in units of each input's spread

def _scaled(inputs: int = Z + H) -> ScaledInputs:
    rng = np.random.default_rng(6)
    return ScaledInputs(ControllerShape(inputs=inputs, outputs=A), rng.normal(size=inputs),
                        np.exp(rng.normal(size=inputs)))


def test_standardised_points_map_to_the_linear_c_on_standardised_inputs_and_back():
    space = _scaled()
    theta = np.random.default_rng(7).normal(size=(4, space.size))
    full = space.full(theta)
    assert space.size == space.shape.num_params and full.shape == theta.shape
    x = np.random.default_rng(8).normal(size=space.shape.inputs)
    for row, point in zip(full, theta, strict=True):
        w, b = row[:-A].reshape(A, -1), row[-A:]
        a_w, a_b = point[:-A].reshape(A, -1), point[-A:]
        np.testing.assert_allclose(w @ x + b, a_w @ ((x - space.mean) / space.scale) + a_b,
                                   atol=1e-12)
        np.testing.assert_allclose(space.coordinates(row), point, atol=1e-12)
        np.testing.assert_allclose(w @ space.mean + b, a_b, atol=1e-12)  # the bias: at the mean
    np.testing.assert_array_equal(space.full(np.zeros(space.size)), np.zeros((1, space.size)))


def test_the_spread_counts_the_agents_z_noise_and_floors_inputs_that_barely_move():
    rng = np.random.default_rng(9)
    spreads = np.array([0.01, 0.5, 1.0, 2.0, 1.0, 1.0])  # 2 z inputs, then 4 others
    features = rng.normal(size=(20_000, 6)) * spreads + 3.0
    mean, scale = input_spread(features, np.zeros((20_000, 2)))
    np.testing.assert_allclose(mean, 3.0, atol=0.05)
    floored = np.array([SPREAD_FLOOR * 1.0, *spreads[1:]])  # the median spread is 1
    rms = np.sqrt(np.mean(floored ** 2))
    np.testing.assert_allclose(scale, floored / rms, rtol=0.03)
    assert np.mean(scale ** 2) == pytest.approx(1.0)  # sigma0 keeps its overall size
    # sampled z (controller.z_noise > 0): V's posterior noise adds its variance
    _, noisy = input_spread(features, np.full((20_000, 2), 0.75))
    with_noise = np.array([*np.sqrt(spreads[:2] ** 2 + 0.75), *spreads[2:]])
    np.testing.assert_allclose(noisy, with_noise / np.sqrt(np.mean(with_noise ** 2)),
                               rtol=0.03)


def test_cma_es_on_standardised_inputs_moves_each_inputs_response_alike(tmp_path):
    """Without es.standardize an isotropic step moves every weight alike, so C's response
    to a wide input moves 100x more than to a narrow one; with it, every response alike."""
    shape = ControllerShape(inputs=2, outputs=1)
    space = ScaledInputs(shape, np.zeros(2), np.array([0.01, 1.0]))
    es = dataclasses.replace(ES, population=64, generations=1)

    def response_spread(searched_space: ScaledInputs | None, folder: str) -> np.ndarray:
        fitness = Recorded(np.zeros(shape.num_params))
        run_es(fitness, shape.num_params, es, str(tmp_path / folder), progress=False,
               space=searched_space)
        w = fitness.seen[0][:, :2]  # the first generation's members
        return (w * space.scale).std(axis=0)  # how far each input moves the output

    plain = response_spread(None, "plain")
    scaled = response_spread(space, "scaled")
    assert plain[1] / plain[0] > 30
    assert 0.5 < scaled[1] / scaled[0] < 2


def test_standardize_refuses_what_it_cannot_search():
    check_scaled_inputs(ControllerShape(inputs=Z + H, outputs=A), 0)
    with pytest.raises(WmlabError, match="es.standardize.*hidden layer"):
        check_scaled_inputs(ControllerShape(inputs=Z + H, outputs=A, hidden=4), 0)
    with pytest.raises(WmlabError, match="without a bias"):
        check_scaled_inputs(ControllerShape(inputs=Z + H, outputs=A, bias=False), 0)
    with pytest.raises(WmlabError, match="set one of them"):
        check_scaled_inputs(ControllerShape(inputs=Z + H, outputs=A), K)


def test_the_c_stage_standardises_on_the_runs_episodes_and_resumes_so(tmp_path, one_thread):
    """es.standardize through train_controller: the inputs' mean and scale measured on the
    run's episodes (M run over them, z as the agent draws it), kept in the controller
    folder, read back on resuming; a folder searched one way does not resume the other."""
    from wmlab.pipeline.controller_stage import train_controller

    cfg, folder, result = _one_c_generation(tmp_path, "es.standardize=true")
    saved = load_checkpoint(folder, "input-scale", with_state=False).weights
    mean, scale = saved["mean"].double().numpy(), saved["scale"].double().numpy()
    assert mean.shape == scale.shape == (8 + 16,) and (scale > 0).all()
    assert np.mean(scale ** 2) == pytest.approx(1.0)
    assert scale[:8].min() > scale[8:].max()  # z sampled (z_noise = 1): its noise is in it
    resumed = train_controller(cfg, progress=False)
    assert resumed.resumed_from == result.generation == 1
    again = load_checkpoint(folder, "input-scale", with_state=False).weights["scale"]
    torch.testing.assert_close(again, saved["scale"])
    plain = dataclasses.replace(cfg.es, standardize=False)
    with pytest.raises(WmlabError, match="es.standardize = true"):
        run_es(Recorded(np.zeros(3 * 24 + 3)), 3 * 24 + 3, plain, folder, progress=False)
