"""Issue 26, iteration 2: C carried over to a retrained M, and a dream that ends once it stops
teaching C what the game rewards (es.dream_patience)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from wmlab.config import EsConfig
from wmlab.controller import carry_over as carry_over_module
from wmlab.controller.carry_over import (
    AS_IT_WAS,
    carry_over,
    first_layer,
    lookahead_memory_features,
    memory_features,
    memory_features_of,
    refit,
)
from wmlab.controller.cmaes import run_es
from wmlab.controller.model import ControllerShape, clock_features
from wmlab.data.series import Series
from wmlab.errors import WmlabError
from wmlab.memory.model import MDNRNN, MdrnnShape

Z, A, H = 4, 2, 8


def _m(seed: int) -> MDNRNN:
    torch.manual_seed(seed)
    return MDNRNN(MdrnnShape(z_dim=Z, action_dim=A, hidden=H, gaussians=2)).eval()


def _episodes(count: int = 6, length: int = 60) -> list[Series]:
    rng = np.random.default_rng(0)
    out = []
    for k in range(count):
        mu = rng.normal(size=(length + 1, Z)).astype(np.float16)
        out.append(Series(f"agent-{k}", mu, np.zeros_like(mu),
                          rng.uniform(-1, 1, (length, A)).astype(np.float32),
                          np.zeros(length, np.float32), np.zeros(length, bool)))
    return out


SHAPE = ControllerShape(inputs=Z + H, outputs=A)


def _pre_activations(params: np.ndarray, features: list[np.ndarray]) -> np.ndarray:
    w, b = first_layer(SHAPE, params)
    return np.concatenate(features) @ w.T + b


def test_memory_features_are_what_the_agent_reads():
    m, series = _m(1), _episodes(1, 5)[0]
    features = memory_features(m, series, "zh")
    z = torch.from_numpy(series.mu[:-1].astype(np.float32))
    h, c = m.initial_state(1)[0][0], m.initial_state(1)[1][0]
    with torch.no_grad():
        for t in range(5):  # the agent: C reads [z_t, h_{t-1}], then M advances
            np.testing.assert_allclose(features[t], torch.cat([z[t], h[0]]).numpy(), atol=1e-6)
            restart = torch.ones(1, 1) if t == 0 else torch.zeros(1, 1)
            h, c = m.advance(z[t:t + 1], torch.from_numpy(series.actions[t:t + 1]), restart,
                             h, c)
    assert memory_features(m, series, "zch").shape == (5, Z + 2 * H)
    # a C with a clock (controller.clock) reads its inputs last, counted from the first step
    timed = memory_features(m, series, "zh", (4, 10))
    np.testing.assert_array_equal(timed[:, :Z + H], features)
    np.testing.assert_allclose(timed[:, Z + H:],
                               clock_features(torch.arange(5), (4, 10)).numpy())
    np.testing.assert_allclose(timed[1, Z + H:], [1, np.sin(0.2 * np.pi), 0,
                                                 np.cos(0.2 * np.pi)], atol=1e-7)


def test_many_episodes_at_once_read_what_each_alone_does():
    """memory_features_of: episodes of one length through M together, in batches; each
    episode's features those memory_features gives it alone."""
    m = _m(2)
    episodes = [*_episodes(5, 20), *_episodes(2, 7)]  # two lengths, interleaved below
    episodes = [episodes[i] for i in (0, 5, 1, 2, 6, 3, 4)]
    for inputs, clock in (("zh", ()), ("zh", (4,)), ("zch", ())):
        together = memory_features_of(m, episodes, inputs, clock, batch=2)
        for series, features in zip(episodes, together, strict=True):
            np.testing.assert_allclose(features, memory_features(m, series, inputs, clock),
                                       atol=1e-5)


def test_the_refit_reads_the_episodes_in_chunks_as_each_alone(monkeypatch):
    """carry_over's (old, new) features: streamed in chunks of EPISODE_CHUNK episodes, each
    chunk through each M together, in the episodes' order, the same as each episode alone;
    the episodes are read as the fit goes, never all at once."""
    monkeypatch.setattr(carry_over_module, "EPISODE_CHUNK", 2)
    old_m, new_m = _m(1), _m(2)
    episodes = [*_episodes(3, 20), *_episodes(2, 7)]
    read = []

    def stream():
        for series in episodes:
            read.append(series)
            yield series

    pairs = carry_over_module._features(old_m, new_m, stream(), "zh")
    first = next(pairs)
    assert len(read) == 2  # one chunk read, not the whole stream
    for series, (old, new) in zip(episodes, [first, *pairs], strict=True):
        np.testing.assert_allclose(old, memory_features(old_m, series, "zh"), atol=1e-5)
        np.testing.assert_allclose(new, memory_features(new_m, series, "zh"), atol=1e-5)
    with pytest.raises(WmlabError, match="no recorded episodes"):
        next(carry_over_module._features(old_m, new_m, iter([]), "zh"))


def _drifted(episodes: list[Series], shift: float) -> list[Series]:
    """The same episodes as a retrained V sees them: every z moved (the same actions)."""
    return [Series(s.episode_id, (s.mu.astype(np.float32) + shift).astype(np.float16),
                   s.logvar, s.actions, s.rewards, s.dones) for s in episodes]


def test_the_old_features_read_the_old_vs_series_where_v_was_retrained():
    old_m, new_m = _m(1), _m(2)
    before = _episodes(3, 20)
    after = _drifted(before, 0.7)
    pairs = list(carry_over_module._features(old_m, new_m, after, "zh", old_episodes=before))
    for old_series, new_series, (old, new) in zip(before, after, pairs, strict=True):
        np.testing.assert_allclose(old, memory_features(old_m, old_series, "zh"), atol=1e-5)
        np.testing.assert_allclose(new, memory_features(new_m, new_series, "zh"), atol=1e-5)
    with pytest.raises(WmlabError, match="encode the same episodes with both Vs"):
        list(carry_over_module._features(old_m, new_m, after, "zh",
                                         old_episodes=before[::-1]))


def test_carry_over_across_a_retrained_v_matches_the_old_controller():
    """V retrained (every z moved), M the same: reading the old controller's inputs off the
    new V's z leaves it as it was; read off the old V's z, the refit follows the change."""
    m = _m(1)
    before = _episodes()
    after = _drifted(before, 0.7)
    params = np.random.default_rng(1).normal(0, 0.5, SHAPE.num_params)
    target = _pre_activations(params, [memory_features(m, s, "zh") for s in before])
    new = [memory_features(m, s, "zh") for s in after]
    path = "memory://carry-over-v.json"

    def error(candidate: np.ndarray) -> float:  # the game, here: the old controller's acts
        return float(np.mean((_pre_activations(candidate, new) - target) ** 2))

    def fitted(old_episodes):
        chosen, _ = carry_over(SHAPE, "zh", params, m, m, after, lambda c: -error(c), path,
                               old_episodes=old_episodes)
        fsspec.filesystem("memory").rm(path)
        return error(chosen)

    blind = error(params)
    assert fitted(before) < 0.2 * blind
    assert fitted(None) > 0.5 * blind  # the old z never seen: nothing to translate


def test_refit_to_the_same_m_keeps_the_controller():
    m, episodes = _m(1), _episodes()
    params = np.random.default_rng(1).normal(0, 0.5, SHAPE.num_params)
    features = [memory_features(m, s, "zh") for s in episodes]
    fits, rows = refit(SHAPE, params, zip(features, features, strict=True), ridges=(1e-6,))
    fitted, r2 = fits[1e-6]
    assert rows == 6 * 60
    assert r2 > 0.999999
    np.testing.assert_allclose(_pre_activations(fitted, features),
                               _pre_activations(params, features), atol=1e-3)


def test_refit_to_another_m_matches_the_old_controller_better_than_as_it_was():
    old_m, new_m, episodes = _m(1), _m(2), _episodes()
    params = np.random.default_rng(1).normal(0, 0.5, SHAPE.num_params)
    old = [memory_features(old_m, s, "zh") for s in episodes]
    new = [memory_features(new_m, s, "zh") for s in episodes]
    target = _pre_activations(params, old)
    fitted, _ = refit(SHAPE, params, zip(old, new, strict=True), ridges=(1e-3,))[0][1e-3]
    as_it_was = np.mean((_pre_activations(params, new) - target) ** 2)
    carried = np.mean((_pre_activations(fitted, new) - target) ** 2)
    assert carried < 0.5 * as_it_was


def test_carry_over_keeps_the_best_scored_candidate_and_reads_it_back(tmp_path):
    old_m, new_m, episodes = _m(1), _m(2), _episodes()
    params = np.random.default_rng(1).normal(0, 0.5, SHAPE.num_params)
    calls = []

    def score(candidate: np.ndarray) -> float:  # the game, here: closeness to the start
        calls.append(candidate)
        return -float(np.sum((candidate - params) ** 2))

    path = str(tmp_path / "carry-over.json")
    chosen, choice = carry_over(SHAPE, "zh", params, old_m, new_m, episodes, score, path)
    assert choice.chosen == AS_IT_WAS and len(calls) == 5  # 4 ridge strengths and as it was
    np.testing.assert_array_equal(chosen, params)
    recorded = json.loads(Path(path).read_text())
    assert recorded["chosen"] == AS_IT_WAS and recorded["steps"] == 6 * 60

    def far(candidate: np.ndarray) -> float:  # prefers any refit to the controller as it was
        return float(np.sum((candidate - params) ** 2))

    path2 = str(tmp_path / "b.json")
    chosen2, choice2 = carry_over(SHAPE, "zh", params, old_m, new_m, episodes, far, path2)
    assert choice2.chosen != AS_IT_WAS and not np.array_equal(chosen2, params)
    # resumed: the recorded choice, not scored again
    again, _ = carry_over(SHAPE, "zh", params, old_m, new_m, episodes,
                          lambda c: pytest.fail("scored again"), path2)
    np.testing.assert_array_equal(again, chosen2)


def test_carry_over_refuses_what_it_cannot_translate():
    with pytest.raises(WmlabError, match="controller.inputs"):
        carry_over(ControllerShape(inputs=Z, outputs=A), "z", np.zeros(Z * A + A),
                   _m(1), _m(2), _episodes(), lambda c: 0.0, "/nowhere.json")
    with pytest.raises(WmlabError, match="look-ahead"):
        carry_over(ControllerShape(inputs=H, outputs=A, lookahead=True), "zh",
                   np.zeros(H + A), _m(1), _m(2), _episodes(), lambda c: 0.0, "/nowhere.json")
    with pytest.raises(WmlabError, match="no recorded episodes"):
        carry_over(SHAPE, "zh", np.zeros(SHAPE.num_params), _m(1), _m(2), [],
                   lambda c: 0.0, "/nowhere.json")


def test_a_hidden_layer_is_refitted_and_what_follows_it_kept():
    shape = ControllerShape(inputs=Z + H, outputs=A, hidden=5)
    old_m, new_m, episodes = _m(1), _m(2), _episodes()
    params = np.random.default_rng(2).normal(0, 0.5, shape.num_params)
    old = [memory_features(old_m, s, "zh") for s in episodes]
    new = [memory_features(new_m, s, "zh") for s in episodes]
    (same, r2), = refit(shape, params, zip(old, old, strict=True), ridges=(1e-6,))[0].values()
    assert r2 > 0.999999
    np.testing.assert_allclose(same, params, atol=1e-3)
    fitted, _ = refit(shape, params, zip(old, new, strict=True), ridges=(1e-3,))[0][1e-3]
    first = (Z + H + 1) * 5
    np.testing.assert_array_equal(fitted[first:], params[first:])  # C's second layer

    def hidden_units(p: np.ndarray, features: list[np.ndarray]) -> np.ndarray:
        w, b = first_layer(shape, p)
        return np.tanh(np.concatenate(features) @ w.T + b)

    target = hidden_units(params, old)
    assert np.mean((hidden_units(fitted, new) - target) ** 2) < \
        0.5 * np.mean((hidden_units(params, new) - target) ** 2)


# a look-ahead C over M's state after each of 3 actions (their vectors, as M reads them)
CANDIDATES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])


def test_lookahead_features_are_what_the_agent_scores():
    """At every step, M's state after each candidate from the state the agent is in, then M
    advanced on the recorded action (the chosen candidate's state, as the agent keeps it)."""
    m, series = _m(1), _episodes(1, 6)[0]
    features = lookahead_memory_features(m, series, "zh", CANDIDATES)
    assert features.shape == (6, 3, H)
    z = torch.from_numpy(series.mu[:-1].astype(np.float32))
    h, c = (s[0] for s in m.initial_state(1))
    with torch.no_grad():
        for t in range(6):
            restart = torch.full((1, 1), 1.0 if t == 0 else 0.0)
            for a in range(3):
                h_a, _ = m.advance(z[t:t + 1], CANDIDATES[a:a + 1], restart, h, c)
                np.testing.assert_allclose(features[t, a], h_a[0].numpy(), atol=1e-5)
            h, c = m.advance(z[t:t + 1], torch.from_numpy(series.actions[t:t + 1]), restart,
                             h, c)
    assert lookahead_memory_features(m, series, "zh", CANDIDATES, steps=4).shape == (4, 3, H)


@pytest.mark.parametrize("hidden", [0, 4])
def test_a_lookahead_controller_is_carried_over(tmp_path, hidden):
    """The refit matches the old controller's scores of the actions (up to a constant the
    actions share, which cannot change the choice) better than the controller as it was;
    its own biases b_a are kept; the choice records steps, not (step, action) rows."""
    shape = ControllerShape(inputs=H, outputs=3, hidden=hidden, lookahead=True)
    old_m, new_m, episodes = _m(1), _m(2), _episodes()
    params = np.random.default_rng(3).normal(0, 0.5, shape.num_params)
    old = [lookahead_memory_features(old_m, s, "zh", CANDIDATES) for s in episodes]
    new = [lookahead_memory_features(new_m, s, "zh", CANDIDATES) for s in episodes]
    from wmlab.controller.model import lookahead_forward

    def centred_scores(p: np.ndarray, features: list[np.ndarray]) -> np.ndarray:
        x = torch.from_numpy(np.concatenate(features)).float()[None]
        scores = lookahead_forward(shape, torch.from_numpy(p).float()[None], x)[0].numpy()
        return scores - scores.mean(axis=1, keepdims=True)

    fitted, _ = refit(shape, params, zip(old, new, strict=True), ridges=(1e-3,))[0][1e-3]
    np.testing.assert_array_equal(fitted[-3:], params[-3:])  # b_a
    target = centred_scores(params, old)
    assert np.mean((centred_scores(fitted, new) - target) ** 2) < \
        0.5 * np.mean((centred_scores(params, new) - target) ** 2)

    def far(candidate: np.ndarray) -> float:
        return float(np.sum((candidate - params) ** 2))

    path = str(tmp_path / "carry-over.json")
    chosen, choice = carry_over(shape, "zh", params, old_m, new_m, episodes, far, path,
                                candidates=CANDIDATES)
    assert choice.chosen != AS_IT_WAS and choice.steps == 6 * 60
    again, _ = carry_over(shape, "zh", params, old_m, new_m, episodes,
                          lambda c: pytest.fail("scored again"), path, candidates=CANDIDATES)
    np.testing.assert_allclose(again, chosen)


# --- a dream that ends when it stops paying ------------------------------------------------


class Pull:
    """Fitness -|w - target|^2 (the game, or a dream that pulls elsewhere)."""

    def __init__(self, target: float) -> None:
        self.target, self.calls = target, 0

    def evaluate(self, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        self.calls += 1
        return -np.sum((params - self.target) ** 2, axis=1)


def _es(**changes) -> EsConfig:
    es = EsConfig(population=8, rollouts=2, generations=12, eval_every=1, eval_rollouts=2,
                  sigma0=0.2, l2=0.0, dream_generations=10, dream_patience=2)
    for key, value in changes.items():
        setattr(es, key, value)
    return es


def _in_dream(folder: Path) -> list[str]:
    return [r["in_dream"] for r in csv.DictReader((folder / "metrics.csv").open())]


def test_an_exploited_dream_ends_and_the_game_restarts_from_the_best(tmp_path):
    start = np.full(5, 0.5)  # the game's optimum: every dream step pulls away from it
    result = run_es(Pull(0.5), 5, _es(), str(tmp_path / "a"), progress=False,
                    dream_fitness=Pull(-3.0), start=start, start_score=0.0)
    # scored at 1 and 2, neither beats the start's 0: the dream ends after generation 2
    assert _in_dream(tmp_path / "a") == ["1.0"] * 2 + ["0.0"] * 10
    assert result.best_generation == 0 and result.best_score == 0.0
    np.testing.assert_array_equal(result.best_params, start)
    # the game's generations started from the best, not from where the dream had led
    assert np.linalg.norm(result.mean - start) < 0.3
    # without patience the dream runs its 10 generations and leads the mean away
    away = run_es(Pull(0.5), 5, _es(dream_patience=0), str(tmp_path / "b"), progress=False,
                  dream_fitness=Pull(-3.0), start=start, start_score=0.0)
    assert _in_dream(tmp_path / "b") == ["1.0"] * 10 + ["0.0"] * 2
    assert np.linalg.norm(away.mean - start) > 1.0


def test_a_dream_that_pays_goes_on_and_the_switch_resumes_exactly(tmp_path):
    es = _es(dream_patience=1)
    helpful = run_es(Pull(0.5), 5, es, str(tmp_path / "a"), progress=False,
                     dream_fitness=Pull(0.5), start=np.zeros(5), start_score=-1.25)
    assert _in_dream(tmp_path / "a").count("1.0") >= 3  # it ended only once it stopped paying
    whole = run_es(Pull(0.5), 5, es, str(tmp_path / "b"), progress=False,
                   dream_fitness=Pull(-3.0), start=np.full(5, 0.5), start_score=0.0)
    first = run_es(Pull(0.5), 5, es, str(tmp_path / "c"), progress=False,
                   dream_fitness=Pull(-3.0), start=np.full(5, 0.5), start_score=0.0,
                   stop_after_generations=3)
    assert not first.finished
    resumed = run_es(Pull(0.5), 5, es, str(tmp_path / "c"), progress=False,
                     dream_fitness=Pull(-3.0))
    np.testing.assert_array_equal(whole.mean, resumed.mean)
    assert _in_dream(tmp_path / "b") == _in_dream(tmp_path / "c")
    assert helpful.best_score > -1.25


def test_dream_patience_needs_dream_generations(tmp_path):
    with pytest.raises(WmlabError, match="es.dream_patience"):
        run_es(Pull(0.0), 5, _es(dream_generations=0), str(tmp_path), progress=False)


# --- through the C stage --------------------------------------------------------------------


def test_the_c_stage_starts_from_the_carried_over_controller(tmp_path, one_thread):
    """es.carry_over in train_controller: the previous run's C refitted to this M on this
    run's agent episodes, every candidate scored on the fixed seeds, the best kept as the
    first scored mean (generation 0), the choice read back on resume."""
    from agent_fixtures import make_run, record_car_episodes
    from test_carracing_budget import TINY_CAR, carracing_mdrnn
    from wmlab.pipeline.controller_stage import train_controller
    from wmlab.runs import RunLayout

    tiny = tuple(o for o in TINY_CAR if not o.startswith("es.dream_generations"))
    first = make_run(tmp_path / "first", "carracing", tiny, mdrnn=carracing_mdrnn(True))
    train_controller(first, progress=False)
    torch.manual_seed(7)
    new_m = MDNRNN(carracing_mdrnn(True).shape)  # "retrained": other weights, same shape
    overrides = (*tiny, f'es.init_from="{RunLayout.of(first).controller}"',
                 f'mdrnn.init_from="{RunLayout.of(first).memory}"', "es.carry_over=true")
    cfg = make_run(tmp_path / "second", "carracing", overrides, mdrnn=new_m)
    record_car_episodes(cfg, new_m.shape.z_dim, "agent")
    result = train_controller(cfg, progress=False, stop_after_generations=1)
    choice = json.loads((Path(RunLayout.of(cfg).controller) / "carry-over.json").read_text())
    assert set(choice["scores"]) == {"10", "100", "1000", "10000", AS_IT_WAS}
    assert choice["steps"] == 3 * 12
    best = max(choice["scores"].values())
    assert choice["score"] == best
    # the start is the first scored mean: a later one must beat it to become the best
    assert result.best_generation == 0 and result.best_score == best or \
        result.best_score > best
    # resumed: the choice is not scored again (the state exists: the start no longer matters)
    again = train_controller(cfg, progress=False)
    assert again.generation == cfg.es.generations
    # without the M the controller was made for, one line naming the setting
    bare = make_run(tmp_path / "bare", "carracing",
                    (*tiny, f'es.init_from="{RunLayout.of(first).controller}"',
                     "es.carry_over=true"), mdrnn=new_m)
    with pytest.raises(WmlabError, match="mdrnn.init_from"):
        train_controller(bare, progress=False)


def test_the_c_stage_reads_the_episodes_as_the_previous_v_encoded_them(tmp_path, one_thread):
    """A later iteration that retrained V (vae.epochs > 0): carry-over's old features come
    from the recorded episodes encoded by vae.init_from's V, written once beside the run's
    own series (which stay current); with V kept, or no V named, the run's own series."""
    from agent_fixtures import make_run, record_car_episodes
    from test_carracing_budget import TINY_CAR, carracing_mdrnn
    from wmlab.checkpoint import save_checkpoint
    from wmlab.data import EpisodeStore
    from wmlab.data.series import SeriesStore
    from wmlab.device import resolve_bf16
    from wmlab.pipeline.controller_stage import episodes_as_started
    from wmlab.runs import RunLayout
    from wmlab.vision.encode import encode_frames, encode_store
    from wmlab.vision.model import FINAL_WEIGHTS, ConvVAE, load_vae, read_vae_info

    torch.manual_seed(5)
    previous = tmp_path / "previous-vision"
    save_checkpoint(str(previous), FINAL_WEIGHTS, 1, ConvVAE(8).state_dict(), None,
                    {"z_dim": 8, "kind": "vae"})
    cfg = make_run(tmp_path / "run", "carracing",
                   (*TINY_CAR, f'vae.init_from="{previous}"', "vae.z_dim=8"),
                   mdrnn=carracing_mdrnn(True))
    record_car_episodes(cfg, 8, "agent")
    encode_store(cfg, progress=False)  # the run's own V: its series current
    own = SeriesStore.current(cfg.store_url())
    assert own.fingerprint == read_vae_info(RunLayout.of(cfg).vision)["fingerprint"]

    old = list(episodes_as_started(cfg))
    assert [s.episode_id for s in old] == [f"agent-{k:07d}" for k in range(3)]
    store = EpisodeStore.open(cfg.store_url())
    before, _ = load_vae(str(previous))
    cpu = torch.device("cpu")
    mu, _ = encode_frames(before, store.load(old[0].episode_id).frames, cpu,
                          bf16=resolve_bf16(cfg.vae.bf16, cpu))
    np.testing.assert_allclose(old[0].mu.astype(np.float32), mu, atol=2e-2)
    assert not np.allclose(old[0].mu, own.load(old[0].episode_id).mu, atol=1e-2)
    assert SeriesStore.current(cfg.store_url()).fingerprint == own.fingerprint
    # V kept (vae.init_from is this run's V), or no V named: the run's own series
    kept = make_run(tmp_path / "run", "carracing",
                    (*TINY_CAR, f'vae.init_from="{RunLayout.of(cfg).vision}"',
                     "vae.z_dim=8"), mdrnn=carracing_mdrnn(True))
    assert episodes_as_started(kept) is None
    assert episodes_as_started(make_run(tmp_path / "run", "carracing",
                                        (*TINY_CAR, "vae.z_dim=8"),
                                        mdrnn=carracing_mdrnn(True))) is None
