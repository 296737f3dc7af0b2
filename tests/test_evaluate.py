"""`wmlab evaluate` and `train-controller`: the protocol on the real game, and bad input."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from agent_fixtures import Z_DIM, make_run
from wmlab.checkpoint import save_checkpoint
from wmlab.cli import main
from wmlab.controller import controller_shape, shape_info
from wmlab.controller.cmaes import BEST_WEIGHTS, MEAN_WEIGHTS
from wmlab.errors import WmlabError
from wmlab.evaluate import episode_rows, evaluate_controller
from wmlab.runs import RunLayout

EVAL = ("env.max_steps=12", "eval.episodes=3", "eval.seed=500")


def _save_controller(cfg, params: np.ndarray, z_dim: int = Z_DIM, hidden: int = 16) -> None:
    shape = controller_shape("zch", z_dim, hidden, 1, bias=False)
    save_checkpoint(RunLayout.of(cfg).controller, BEST_WEIGHTS, 1,
                    {"params": torch.as_tensor(params, dtype=torch.float32)}, None,
                    {**shape_info(shape, "zch"), "generation": 1})


def test_evaluate_real_doom_writes_every_episode(tmp_path):
    cfg = make_run(tmp_path, overrides=EVAL)
    params = np.random.default_rng(0).normal(0, 1.0, Z_DIM + 32)
    _save_controller(cfg, params)
    video = tmp_path / "episode.gif"
    result = evaluate_controller(cfg, video=str(video))
    assert result.episodes == 3 and result.seeds == [500, 501, 502]
    assert result.backend == "vizdoom" and result.where == "real"
    path = f"{RunLayout.of(cfg).eval}/eval-vizdoom.json"
    saved = json.loads(Path(path).read_text())
    assert saved["returns"] == result.returns and len(saved["returns"]) == 3
    assert all(1 <= r <= 12 for r in saved["returns"])
    # Doom pays +1 a step survived: each episode's recorded length is its return
    assert saved["extra"]["lengths"] == [int(r) for r in saved["returns"]]
    assert saved["mean"] == pytest.approx(np.mean(saved["returns"]))
    assert saved["std"] == pytest.approx(np.std(saved["returns"]))
    assert video.read_bytes()[:6] in (b"GIF89a", b"GIF87a")
    from PIL import Image
    with Image.open(video) as gif:  # every 2nd step of the first episode: frame | V's view
        assert gif.size == (2 * (64 + 2 + 64), 2 * 64)
        assert gif.n_frames == math.ceil(result.returns[0] / 2)
    # Same seeds, same controller: the same returns (fixed, recorded protocol).
    again = evaluate_controller(cfg, out=str(tmp_path / "again.json"))
    assert again.returns == result.returns


def test_a_resumed_evaluation_keeps_what_it_finished(tmp_path):
    """With ``reuse`` (the evaluate stage's), an evaluation already written for the same
    controller and episodes is read back, not played again; another controller, other
    episodes or another policy are played."""
    from wmlab.evaluate import evaluate_random_policy

    cfg = make_run(tmp_path, overrides=EVAL)
    _save_controller(cfg, np.random.default_rng(0).normal(0, 1.0, Z_DIM + 32))
    first = evaluate_controller(cfg, reuse=True)
    path = Path(RunLayout.of(cfg).eval, "eval-vizdoom.json")
    marked = {**json.loads(path.read_text()), "returns": [-1.0] * 3}  # no game returns -1
    path.write_text(json.dumps(marked))
    video = tmp_path / "episode.gif"  # asked for, not there yet: recorded, the JSON kept
    assert evaluate_controller(cfg, reuse=True, video=str(video)).returns == [-1.0] * 3
    assert video.read_bytes()[:6] in (b"GIF89a", b"GIF87a")
    assert evaluate_controller(cfg).returns == first.returns  # without reuse: played
    path.write_text(json.dumps(marked))
    assert evaluate_controller(cfg, episodes=2, reuse=True).returns == first.returns[:2]
    path.write_text(json.dumps(marked))
    _save_controller(cfg, np.random.default_rng(1).normal(0, 1.0, Z_DIM + 32))
    assert -1.0 not in evaluate_controller(cfg, reuse=True).returns
    floor = evaluate_random_policy(cfg, reuse=True)
    random_path = Path(RunLayout.of(cfg).eval, "random-vizdoom.json")
    random_path.write_text(json.dumps({**json.loads(random_path.read_text()),
                                       "returns": [-1.0] * 3}))
    assert evaluate_random_policy(cfg, reuse=True).returns == [-1.0] * 3
    assert evaluate_random_policy(cfg, policy="noop", reuse=True).returns != [-1.0] * 3
    assert evaluate_random_policy(cfg).returns == floor.returns
    random_path.write_text("{not json")
    assert evaluate_random_policy(cfg, reuse=True).returns == floor.returns


def test_a_later_iteration_copies_the_random_policy_of_iteration_1(tmp_path):
    """The random policy plays the same episodes in every iteration: iteration 2's evaluate
    reads iteration 1's (copied into its own folder), not played again; other episodes are
    played."""
    import copy

    from wmlab.evaluate import evaluate_random_policy

    cfg = make_run(tmp_path, overrides=EVAL)
    first = evaluate_random_policy(cfg, reuse=True)
    first_path = Path(RunLayout.of(cfg).eval, "random-vizdoom.json")
    first_path.write_text(json.dumps({**json.loads(first_path.read_text()),
                                      "returns": [-1.0] * 3}))  # no game returns -1
    later = copy.deepcopy(cfg)
    later.run.name = f"{cfg.run.name}/iterations/2"
    assert RunLayout.of(later).base.root == RunLayout.of(cfg).root
    assert evaluate_random_policy(later, reuse=True).returns == [-1.0] * 3
    copied = Path(RunLayout.of(later).eval, "random-vizdoom.json")
    assert json.loads(copied.read_text())["returns"] == [-1.0] * 3
    assert evaluate_random_policy(later).returns == first.returns  # without reuse: played
    assert -1.0 not in evaluate_random_policy(later, episodes=2, reuse=True).returns


def test_evaluate_in_the_dream_and_through_the_cli(tmp_path, capsys):
    cfg = make_run(tmp_path, overrides=EVAL)
    params = np.zeros(Z_DIM + 32)
    params[:Z_DIM], params[Z_DIM:] = 1.0, 2.0  # keeps moving right: survives the dream
    _save_controller(cfg, params)
    code = main(["evaluate", "--preset", "doom", "--profile", "quick", "--run", "r",
                 "--set", f"run.root={tmp_path}", "--set", "es.engine=serial",
                 "--set", "dream.max_steps=20", "--set", "dream.done=threshold",
                 "--episodes", "4", "--dream"])
    assert code == 0
    assert "20.0 +- 0.0 over 4 episodes" in capsys.readouterr().out
    saved = json.loads(Path(RunLayout.of(cfg).eval, "eval-dream.json").read_text())
    assert saved["returns"] == [20.0] * 4 and saved["tau"] == cfg.dream.tau


def test_controller_of_another_shape_is_refused(tmp_path):
    cfg = make_run(tmp_path, overrides=EVAL)
    _save_controller(cfg, np.zeros(64 + 1024), z_dim=64, hidden=512)
    with pytest.raises(WmlabError, match="does not fit this run's V, M"):
        evaluate_controller(cfg)
    assert not os.path.exists(RunLayout.of(cfg).eval)


def test_bad_episode_counts_and_ray_address_are_refused(tmp_path, capsys):
    cfg = make_run(tmp_path, overrides=EVAL)
    _save_controller(cfg, np.zeros(Z_DIM + 32))
    for bad in (0, -3):
        with pytest.raises(WmlabError, match="positive integer"):
            evaluate_controller(cfg, episodes=bad)
    assert not os.path.exists(RunLayout.of(cfg).eval)
    base = ["--preset", "doom", "--profile", "quick", "--run", "r", "--set",
            f"run.root={tmp_path}"]
    assert main(["evaluate", *base, "--episodes", "0"]) == 2
    assert "--episodes must be at least 1" in capsys.readouterr().err
    pytest.importorskip("ray")
    assert main(["train-controller", *base, "--ray-address", "127.0.0.1:1",
                 "--no-progress"]) == 2
    assert "does not answer" in capsys.readouterr().err
    assert not os.path.exists(f"{RunLayout.of(cfg).controller}/es-state.pkl")
    assert not os.path.exists(f"{tmp_path}/r/config.toml")


def test_train_controller_cli_runs_and_resumes(tmp_path, capsys):
    base = ["train-controller", "--preset", "doom", "--profile", "quick", "--run", "r",
            "--set", f"run.root={tmp_path}", "--set", "es.engine=serial",
            "--set", "es.population=4", "--set", "es.rollouts=1", "--set", "es.eval_every=2",
            "--set", "es.eval_rollouts=2", "--set", "dream.max_steps=10", "--no-progress"]
    make_run(tmp_path)
    assert main([*base, "--generations", "2"]) == 0
    assert main([*base, "--generations", "3"]) == 0
    out = capsys.readouterr().out
    assert "3 generations (resumed at 2)" in out
    assert os.path.exists(f"{tmp_path}/r/controller/progress.png")


def test_episode_rows_keep_every_seed_once():
    rows = episode_rows(10, 100)
    assert rows.shape == (4, 25) and rows.ravel().tolist() == list(range(10, 110))
    assert episode_rows(0, 7).shape == (1, 7)


def _eval_json(returns, seeds=None, backend="vizdoom") -> dict:
    return {"backend": backend, "returns": list(returns),
            "seeds": list(seeds if seeds is not None else range(len(returns)))}


def test_versus_random_pairs_episodes_and_asks_for_two_standard_errors():
    from wmlab.evaluate import versus_random

    rng = np.random.default_rng(0)
    floor = rng.uniform(100, 500, size=50)  # the episodes differ far more than C does
    better = versus_random(_eval_json(floor + 40 + rng.normal(0, 20, 50)), _eval_json(floor))
    assert better.clearly_better and better.wins >= 45 and better.episodes == 50
    assert better.difference == pytest.approx(40, abs=8)
    # a C that plays like random wins about half and is not called better, though its mean
    # can come out above the random policy's
    same = versus_random(_eval_json(floor + rng.normal(5, 60, 50)), _eval_json(floor))
    assert not same.clearly_better and 15 < same.wins < 35
    assert "higher on" in same.line() and "+- " in same.line()
    # not the same episodes: nothing to pair
    assert versus_random(_eval_json(floor, seeds=range(1, 51)), _eval_json(floor)) is None
    assert versus_random(_eval_json(floor, backend="envpool"), _eval_json(floor)) is None
    assert versus_random(_eval_json(floor[:1]), _eval_json(floor[:1])) is None


def test_a_c_no_better_than_random_is_told_the_next_step(tmp_path):
    from wmlab.config import load_config
    from wmlab.pipeline.stages import not_learned_hint

    def config(preset: str, name: str):
        return load_config(preset, "quick", [f'run.root="{tmp_path}"', f'run.name="{name}"'])

    # a dream-trained C: the next iteration, numbered from the run it is told about
    assert "--preset doom --profile quick --iteration 2" in not_learned_hint(config("doom", "r"))
    assert "--iteration 3" in not_learned_hint(config("doom", "r/iterations/2"))
    # a C trained in the real env has not been misled by a dream: more generations
    assert "es.generations" in not_learned_hint(config("carracing", "r"))


def test_real_rollouts_encode_frames_as_the_encode_stage(tmp_path):
    """Under vae.bf16 an agent's V runs in bf16, as it did when M's series were encoded."""
    from wmlab.agent import _sample_z, workload_from_config
    from wmlab.device import bf16_is_native
    from wmlab.vision.model import ConvVAE

    torch.manual_seed(0)
    vae = ConvVAE(Z_DIM).eval().to(memory_format=torch.channels_last)
    frames = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    eps = np.random.default_rng(1).standard_normal((4, Z_DIM)).astype(np.float32)
    from types import SimpleNamespace

    def models(bf16: bool) -> SimpleNamespace:  # what _sample_z reads of AgentModels
        return SimpleNamespace(vae=vae, vae_bf16=bf16, acting_encoder=None, z_noise=1.0)

    with torch.no_grad():
        full, low = _sample_z(models(False), frames, eps), _sample_z(models(True), frames, eps)
    assert full.dtype == low.dtype == torch.float32
    assert torch.allclose(full, low, atol=0.05)
    if bf16_is_native(torch.device("cpu")):
        assert not torch.equal(full, low)  # the convolutions did run in bf16
    for bf16 in (True, False):
        cfg = make_run(tmp_path / str(bf16), overrides=(*EVAL, f"vae.bf16={str(bf16).lower()}"))
        assert workload_from_config(cfg, "real").vae_bf16 is bf16


def test_evaluate_scores_a_later_iteration_as_it_was_trained_and_warns_of_drift(
        tmp_path, capsys):
    """`wmlab evaluate --iteration K` applies run.later (a shield set there is on) with --set
    still winning; an evaluation whose settings differ from the run's config.toml says so."""
    import dataclasses

    from wmlab.cli import build_parser
    from wmlab.cli.controller import _evaluated_config
    from wmlab.config import to_toml

    later = '["shield.window=25", "shield.margin=0.05"]'
    cfg = make_run(tmp_path, overrides=EVAL)
    shape = controller_shape("zch", Z_DIM, 16, 1, bias=False)
    save_checkpoint(RunLayout.of(cfg).controller, MEAN_WEIGHTS, 1,  # iteration 2 may start
                    {"params": torch.zeros(shape.num_params)}, None, shape_info(shape, "zch"))
    base = ["evaluate", "--preset", "doom", "--profile", "quick", "--run", "r",
            "--set", f"run.root={tmp_path}", "--set", f"run.later={later}"]
    parse = build_parser().parse_args
    second = _evaluated_config(parse([*base, "--iteration", "2",
                                      "--set", "shield.margin=0.2"]), {})
    assert second.run.name == "r/iterations/2"
    assert (second.shield.window, second.shield.margin) == (25, 0.2)
    assert _evaluated_config(parse(base), {}).shield.window == 0  # iteration 1: no shield
    assert capsys.readouterr().err == ""  # no config.toml recorded: nothing to differ from
    recorded = dataclasses.replace(cfg, shield=dataclasses.replace(cfg.shield, window=25))
    Path(RunLayout.of(cfg).config).write_text(to_toml(recorded))
    _evaluated_config(parse(base), {})
    assert "shield.window: run 25, evaluate 0" in capsys.readouterr().err
    # the command line undoing a run.later setting is checked once, after both: scoring
    # iteration 2 on its validation seeds is not refused for the overlap between them
    validating = '["eval.validation_episodes=100", "eval.validation_seed=1500000"]'
    on_validation = _evaluated_config(parse(
        [*base[:-1], f"run.later={validating}", "--iteration", "2",
         "--set", "eval.seed=1500000", "--set", "eval.validation_episodes=0"]), {})
    assert (on_validation.eval.seed, on_validation.eval.validation_episodes) == (1500000, 0)
    assert on_validation.run.later == ["eval.validation_episodes=100",
                                       "eval.validation_seed=1500000"]
    # a run.later that relies on a --set the run was trained with is scored as it was trained
    relying = _evaluated_config(parse(
        [*base[:-1], 'run.later=["mdrnn.reward_over_weight=5"]', "--iteration", "2",
         "--set", "mdrnn.reward_head=true"]), {})
    assert (relying.mdrnn.reward_head, relying.mdrnn.reward_over_weight) == (True, 5.0)
    with pytest.raises(WmlabError, match="overlap the evaluation's"):  # not undone: refused
        _evaluated_config(parse([*base[:-1], f"run.later={validating}", "--iteration", "2",
                                 "--set", "eval.seed=1500000"]), {})
    with pytest.raises(WmlabError, match="--iteration must be 1 or more, got 0"):
        _evaluated_config(parse([*base, "--iteration", "0"]), {})
    with pytest.raises(WmlabError, match="--iteration does not apply to --pretrained"):
        _evaluated_config(parse(["evaluate", "--pretrained", "doom", "--iteration", "2"]), {})


def test_choose_iteration_takes_the_best_validation_mean_on_the_same_episodes():
    from wmlab.evaluate import choose_iteration

    def scored(mean: float, first: int = 900) -> dict:
        return {"mean": mean, "seeds": [first, first + 1]}

    choice = choose_iteration({1: scored(800.0), 2: scored(1027.7), 3: scored(922.3)})
    assert choice.iteration == 2 and choice.means == {1: 800.0, 2: 1027.7, 3: 922.3}
    assert "iteration 2, the best validation mean over 2 episodes (seeds 900..901)" \
        in choice.line()
    assert choose_iteration({2: scored(5.0), 3: scored(5.0)}).iteration == 2  # ties: earlier
    # an iteration validated on other episodes than the latest one's is not compared
    other = choose_iteration({2: scored(9999.0, first=5), 3: scored(1.0)})
    assert other.iteration == 3 and other.means == {3: 1.0}
    assert choose_iteration({}) is None


def test_validation_seeds_may_not_overlap_the_evaluation_seeds(tmp_path):
    from wmlab.config import load_config
    from wmlab.errors import ConfigError

    def config(*overrides: str):
        return load_config("doom", "quick", [f'run.root="{tmp_path}"', "eval.episodes=100",
                                             *overrides])

    with pytest.raises(ConfigError, match=r"validation seeds 1000050\.\.1000149 overlap the "
                                          r"evaluation's 1000000\.\.1000099"):
        config("eval.validation_episodes=100", "eval.validation_seed=1000050")
    assert config("eval.validation_episodes=100").eval.validation_seed == 1_500_000
    config("eval.validation_seed=1000050")  # no validation episodes: nothing to overlap


def test_validation_keys_leave_finished_evaluations_as_they_were(tmp_path):
    """At their defaults (no validation) the new keys are out of the evaluate stage's
    fingerprint, so upgrading wmlab does not make finished evaluations look changed."""
    from wmlab.config import load_config
    from wmlab.pipeline.engine import config_slice

    def evaluate_slice(*overrides: str) -> dict:
        cfg = load_config("doom", "budget", [f'run.root="{tmp_path}"', *overrides])
        return config_slice(cfg, ("eval",))

    assert not any(key.startswith("eval.validation") for key in evaluate_slice())
    assert evaluate_slice("eval.validation_episodes=100")["eval.validation_episodes"] == 100


def test_the_evaluate_stage_validates_each_iteration_and_names_the_runs_agent(tmp_path):
    """eval.validation_episodes: each iteration's evaluate stage also scores its C on the
    validation seeds, and from the second on names the iteration with the best validation
    mean; the report says which, and the evaluation seeds are never read to choose."""
    from wmlab.evaluate import choose_iteration, read_validations
    from wmlab.pipeline.stages import _run_evaluate
    from wmlab.report import write_report
    from wmlab.runs import prepare_run_dir

    settings = (*EVAL, "dream.max_steps=12", "eval.validation_episodes=2",
                "eval.validation_seed=900")
    first = make_run(tmp_path, overrides=settings)
    prepare_run_dir(first)  # config.toml: the report reads the backend from it
    _save_controller(first, np.random.default_rng(0).normal(0, 1.0, Z_DIM + 32))
    summary = _run_evaluate(first, False)
    saved = json.loads(Path(RunLayout.of(first).scores("validation", "vizdoom")).read_text())
    assert saved["seeds"] == [900, 901] and summary["validation"].endswith("(seeds 900..901)")
    assert "chosen" not in summary  # one iteration: nothing to choose among
    second = make_run(tmp_path, overrides=(*settings, 'run.name="r/iterations/2"'))
    _save_controller(second, np.random.default_rng(1).normal(0, 1.0, Z_DIM + 32))
    summary = _run_evaluate(second, False)
    found = read_validations(first.run_dir(), "vizdoom")
    assert sorted(found) == [1, 2]
    choice = choose_iteration(found)
    assert summary["chosen"] == choice.line()
    assert choice.iteration == max((1, 2), key=lambda k: (found[k]["mean"], -k))
    write_report(first.run_dir())
    report = Path(first.run_dir(), "report.md").read_text()
    assert f"The run's agent: iteration {choice.iteration}, the best validation" in report
