"""The report of a run, on a run directory made by hand: a real config, a small real episode
store, metrics written by the real MetricsLogger, an evaluation JSON and tiny pictures."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from wmlab.cli import main
from wmlab.config import load_config
from wmlab.data import Episode, EpisodeStore
from wmlab.errors import WmlabError
from wmlab.metrics import MetricsLogger
from wmlab.published import PUBLISHED
from wmlab.report import write_report
from wmlab.report.reading import RunFiles, compute_curve, compute_curves, env_key, parse_eval
from wmlab.runs import prepare_run_dir

SECTIONS = ("## Config", "## Data", "## V: the vision model", "## M: the memory model",
            "## C: the controller", "## Evaluation", "## Real, reconstructed and imagined")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def new_run(root: Path, name: str = "doom-test") -> str:
    cfg = load_config("doom", "quick", [f'run.root="{root}"', f'run.name="{name}"'])
    return prepare_run_dir(cfg)


def episode(index: int, steps: int) -> Episode:
    rng = np.random.default_rng(index)
    frames = np.full((steps + 1, 64, 64, 3), 40 * index, dtype=np.uint8)
    return Episode(frames=frames, actions=rng.uniform(-1, 1, (steps, 3)).astype(np.float32),
                   rewards=np.ones(steps, np.float32), dones=np.arange(steps) == steps - 1,
                   meta={"collection": "random", "index": index, "env": "doom",
                         "backend": "vizdoom", "policy": "held", "seed": index})


def png(color: int, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    iio.imwrite(buffer, np.full((size, size, 3), color, np.uint8), extension=".png")
    return buffer.getvalue()


def gif(frames: int = 3) -> bytes:
    buffer = io.BytesIO()
    stack = np.stack([np.full((16, 48, 3), 50 * i, np.uint8) for i in range(frames)])
    iio.imwrite(buffer, stack, extension=".gif", duration=50, loop=0)
    return buffer.getvalue()


def fill_run(run: str, eval_returns: list[float] = (100.0, 200.0, 300.0)) -> None:
    store = EpisodeStore.create_or_open(f"{run}/data", env="doom", backend="vizdoom",
                                        action_dim=3)
    for i, steps in enumerate((20, 30, 40)):  # lengths 30 +- 8.2, returns = lengths
        store.append(episode(i, steps))

    vision = MetricsLogger(f"{run}/vision", tensorboard=False)
    for step in range(10, 60, 10):
        vision.log(step, {"train/loss": 100.0 - step, "train/reconstruction": 90.0 - step,
                          "train/kl": 10.0, "train/frames_per_s": 500.0, "epoch": 0})
        if step % 20 == 0:
            vision.log(step, {"val/loss": 95.0 - step, "val/reconstruction": 85.0 - step,
                              "val/kl": 10.0, "epoch": 0})
    vision.close()
    Path(f"{run}/vision/recon-vae-epoch001.png").write_bytes(png(10))
    Path(f"{run}/vision/recon-vae-epoch003.png").write_bytes(png(200))

    memory = MetricsLogger(f"{run}/memory", tensorboard=False)
    for step in (10, 20, 30):
        memory.log(step, {"train/z_nll": 1.5 - step / 100, "train/done_loss": 0.4,
                          "train/done_precision": 0.5, "train/done_recall": 0.75,
                          "train/loss": 1.9, "lr": 1e-3})
    memory.log(30, {"val/z_nll": 1.3, "val/done_loss": 0.5, "val/done_precision": 0.4,
                    "val/done_recall": 0.6, "val/loss": 1.8})
    memory.close()
    calibration = {"tau": 1.25, "max_steps": 2100, "episodes": 8, "policies": {
        name: {"survival_mean": mean, "survival_std": 5.0, "survival_min": 90,
               "survival_max": 120, "capped_fraction": 0.0, "return_mean": mean,
               "return_std": 5.0} for name, mean in (("random", 101.0), ("noop", 333.0))}}
    Path(f"{run}/memory/calibration.json").write_text(json.dumps(calibration))
    Path(f"{run}/memory/dream.gif").write_bytes(gif())
    Path(f"{run}/memory/dream-compare.gif").write_bytes(gif(4))

    controller = MetricsLogger(f"{run}/controller", tensorboard=False)
    for generation in range(1, 21):
        row = {"best": 300.0 + generation, "mean": 200.0 + generation,
               "worst": 100.0 + generation, "sigma": 0.1}
        if generation % 5 == 0:
            row["eval_mean"] = 250.0 if generation == 10 else 150.0 + generation
        controller.log(generation, row)
    controller.close()

    Path(f"{run}/stages").mkdir()
    Path(f"{run}/stages/vision.json").write_text(json.dumps(
        {"stage": "vision", "status": "done", "seconds": 12.34, "finished": "then"}))

    Path(f"{run}/eval").mkdir()
    Path(f"{run}/eval/eval-vizdoom-3.json").write_text(json.dumps(
        {"backend": "vizdoom", "returns": list(eval_returns), "seeds": [1, 2, 3]}))


def embedded(page: str, mime: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(rf"data:{mime};base64,([A-Za-z0-9+/=]+)",
                                                    page)]


def test_report_of_a_finished_run_has_every_section_and_picture(tmp_path):
    run = new_run(tmp_path)
    fill_run(run)
    paths = write_report(run)

    assert paths.missing == []
    md = Path(paths.markdown).read_text()
    page = Path(paths.html).read_text()
    for title in SECTIONS:
        assert title in md
        assert f"<h2>{title[3:]}" in page.replace("&#x27;", "'")
    assert "not run yet" not in md
    # config collapsed in the HTML, with the run's own values
    assert "<details><summary>resolved config (config.toml)</summary>" in page
    assert 'preset = "doom"' in md
    # data statistics from the real store
    assert "| episodes | 3 (random: 3) |" in md
    assert "| length | 30.0 +- 8.2 (min 20, max 40) |" in md
    # V: latest values, the newest reconstruction picture
    assert "| reconstruction | 40 | 45 |" in md
    assert "![V's reconstructions](vision/recon-vae-epoch003.png)" in md
    assert "epoch001" not in md
    # M: losses with precision / recall, calibration table
    assert "| done_precision | 0.5 | 0.4 |" in md
    assert "| noop | 333.0 +- 5.0 | 90..120 | 0% | 333.00 +- 5.00 |" in md
    # C: the best scored mean and where it was found
    assert "| best scored mean | 250 (generation 10) |" in md
    assert "| generations | 20 |" in md
    assert "| vision | done | 12.3 s | - | - | then |" in md  # the pipeline's stage records
    # evaluation: this run's score beside every published Doom number
    assert "| eval-vizdoom-3 | 200 +- 81.65 | 3 | vizdoom |" in md
    for score in PUBLISHED["doom"]:
        assert score.score() in md
    assert "1092 +- 556" in md and "210 +- 108" in md and "973 +- 540" in md
    assert "906 +- 21" not in md  # CarRacing's numbers stay out of a Doom report

    # figures written as PNGs and every picture inline in the page
    names = {Path(p).name for p in paths.figures}
    assert names == {"data.png", "vision-losses.png", "memory-losses.png",
                     "controller-progress.png", "compute-curve.png"}
    for figure in paths.figures:
        assert Path(figure).read_bytes().startswith(PNG_MAGIC)
    pngs = embedded(page, "image/png")
    assert len(pngs) == 6 and all(p.startswith(PNG_MAGIC) for p in pngs)
    assert png(200) in pngs  # the newest reconstruction, byte for byte
    gifs = embedded(page, "image/gif")
    assert sorted(len(iio.imread(g, index=None)) for g in gifs) == [3, 4]
    assert "src='report/" not in page and "src='vision/" not in page  # nothing external


def test_report_of_a_run_with_only_its_config_names_the_missing_stages(tmp_path, capsys):
    run = new_run(tmp_path)
    paths = write_report(run)

    assert set(paths.missing) == {"collect", "vision", "memory", "controller", "evaluate",
                                  "dream"}
    md = Path(paths.markdown).read_text()
    for title in SECTIONS:
        assert title in md
    for command in ("wmlab collect", "wmlab train-vae", "wmlab train-mdrnn",
                    "wmlab train-controller", "wmlab evaluate"):
        assert f"`{command}`" in md
    assert "1092 +- 556" in md  # what to aim for is shown before anything ran
    assert paths.figures == []
    assert "<code>wmlab train-vae</code>" in Path(paths.html).read_text()

    # the same through the CLI
    assert main(["report", run]) == 0
    out = capsys.readouterr().out
    assert "not run yet: collect" in out and f"{run}/report.html" in out


def test_partial_and_damaged_outputs_do_not_stop_the_report(tmp_path):
    run = new_run(tmp_path)
    fill_run(run)
    Path(f"{run}/memory/metrics.csv").unlink()
    Path(f"{run}/memory/calibration.json").write_text("{not json")
    Path(f"{run}/eval/broken.json").write_text("[[[")
    for name in ("dream.gif", "dream-compare.gif"):
        Path(f"{run}/memory/{name}").unlink()

    paths = write_report(run)
    md = Path(paths.markdown).read_text()
    assert set(paths.missing) == {"memory", "dream"}
    assert "no memory/metrics.csv: the memory stage has not run yet" in md
    assert "memory/calibration.json is damaged" in md
    assert "eval/broken.json is not valid JSON" in md
    assert "| eval-vizdoom-3 | 200 +- 81.65 |" in md

    Path(f"{run}/config.toml").write_text('preset = "doom"\n[vae]\nz_dimm = 3\n')
    md = Path(write_report(run).markdown).read_text()
    assert "config.toml does not validate" in md and "z_dimm" in md
    assert "| length | 30.0 +- 8.2 (min 20, max 40) |" in md  # the rest is still reported


def test_iterations_and_compared_runs_each_get_a_row(tmp_path, capsys):
    run = new_run(tmp_path, "main")
    fill_run(run)
    second = f"{run}/iterations/2"
    Path(f"{second}/eval").mkdir(parents=True)
    Path(f"{second}/eval/eval-vizdoom-2.json").write_text(json.dumps(
        {"backend": "vizdoom", "mean": 512.0, "std": 12.5, "episodes": 100, "tau": 1.15}))
    other = new_run(tmp_path, "other")  # configured, never evaluated

    paths = write_report(run, compare=[other])
    md = Path(paths.markdown).read_text()
    assert "| main | eval-vizdoom-3 | 200 +- 81.65 | 3 | vizdoom |" in md
    assert "| iteration 2 | tau 1.15 | 512 +- 12.5 | 100 | vizdoom |" in md
    assert "| other | not evaluated yet | - | - | - |" in md
    assert "compare-controller.png" in md

    # iteration 2's own report counts the run before it: its rows, compute and curve
    third = f"{run}/iterations/3"
    Path(f"{third}/eval").mkdir(parents=True)
    md = Path(write_report(second).markdown).read_text()
    assert "| main | eval-vizdoom-3 | 200 +- 81.65 | 3 | vizdoom |" in md
    assert "| iteration 2 | tau 1.15 | 512 +- 12.5 | 100 | vizdoom |" in md
    assert "iteration 3" not in md  # what comes after it is not its history
    assert main(["report", run, "--compare", other]) == 0
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wmlab: error: no run directory at") and err.count("\n") == 1
    with pytest.raises(WmlabError, match="given to compare"):
        write_report(run, compare=[str(tmp_path / "missing")])


@pytest.mark.parametrize("data, mean, std, episodes", [
    ({"mean": 5.0, "std": 1.0, "episodes": 100}, 5.0, 1.0, 100),
    ({"returns": [1.0, 3.0]}, 2.0, 1.0, 2),
    ({"episodes": [{"return": 4.0}, {"return": 8.0}]}, 6.0, 2.0, 2),
    ({"summary": {"return_mean": 7.0, "return_std": 0.5}, "returns": [6.5, 7.5]}, 7.0, 0.5, 2),
    ({"backend": "x"}, None, None, None),
])
def test_evaluation_files_are_read_leniently(data, mean, std, episodes):
    result = parse_eval(data, "run", "eval")
    assert (result.mean, result.std, result.episodes) == (mean, std, episodes)


@pytest.mark.parametrize("preset, profile, key, number", [
    ("carracing", "quick", "carracing", "906 +- 21"),
    ("doom", "paper", "doom", "1092 +- 556"),
    ("binpacking", "wm30", "binpacking", "-104.5"),
])
def test_each_env_is_compared_with_its_own_published_numbers(preset, profile, key, number):
    assert env_key(load_config(preset, profile)) == key
    assert number in [score.score() for score in PUBLISHED[key]]


def test_gif_bytes_keeps_every_frame_and_its_colours():
    from PIL import Image

    from wmlab.plots import gif_bytes
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 255, (12, 3), dtype=np.uint8)
    frames = [colours[rng.integers(0, 12, (16, 20))] for _ in range(7)]
    with Image.open(io.BytesIO(gif_bytes(frames, duration_ms=50))) as gif:
        assert gif.n_frames == 7 and gif.size == (20, 16)
        for index, frame in enumerate(frames):  # 12 colours: the shared palette is exact
            gif.seek(index)
            assert np.array_equal(np.asarray(gif.convert("RGB")), frame)


def test_stages_in_pipeline_order_with_their_compute_and_the_curve_per_hour(tmp_path):
    run = new_run(tmp_path)
    fill_run(run)
    stages = Path(run) / "stages"
    cpu = {"model": "Some CPU", "cores": 2, "flags": ["avx2"]}
    for name, seconds in (("memory", 1800.0), ("collect", 600.0)):
        (stages / f"{name}.json").write_text(json.dumps(
            {"stage": name, "status": "done", "seconds": 60.0, "compute_seconds": seconds,
             "cpu": cpu, "attempts": [{"seconds": seconds / 2}, {"seconds": seconds / 2}],
             "finished": "now"}))
    (stages / "evaluate.json").write_text(json.dumps(
        {"stage": "evaluate", "status": "done", "seconds": 360.0}))
    metrics = Path(run) / "controller" / "metrics.csv"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0] + ",seconds"] + [f"{x},360" for x in lines[1:]]))
    # a second iteration: its own data and M, then its own C
    second = Path(run) / "iterations" / "2"
    (second / "stages").mkdir(parents=True)
    (second / "controller").mkdir()
    (second / "stages" / "memory.json").write_text(json.dumps(
        {"stage": "memory", "status": "done", "compute_seconds": 3600.0}))
    (second / "controller" / "metrics.csv").write_text("step,eval_mean,seconds\n1,400,1800\n")
    # its C stage spent 700 s before its first generation and 300 s on an attempt whose
    # outputs went to trash/: both come before that generation's point
    (second / "stages" / "controller.json").write_text(json.dumps(
        {"stage": "controller", "status": "done", "compute_seconds": 2500.0,
         "discarded_seconds": 300.0}))
    md = Path(write_report(run).markdown).read_text()
    order = [md.index(f"| {name} | done") for name in ("collect", "vision", "memory",
                                                       "evaluate")]
    assert order == sorted(order)
    assert "| memory | done | 30.0 min | 2 | Some CPU | now |" in md
    assert "in all" in md and "compute-curve.png" in md
    curves = compute_curve([("first", RunFiles(run)), ("second", RunFiles(str(second)))])
    (label, hours, scores), (label2, hours2, scores2) = curves
    # C's 5th generation comes after collect, V and M (2,412 s) and five of its own
    assert hours[0] == pytest.approx((600 + 12.34 + 1800 + 5 * 360) / 3600)
    assert scores == [155.0, 250.0, 165.0, 170.0]
    # iteration 2 starts where iteration 1 ended: its C, its evaluation, its own M
    end_of_first = 600 + 12.34 + 1800 + 20 * 360 + 360
    assert hours2 == [pytest.approx((end_of_first + 3600 + 700 + 300 + 1800) / 3600)]
    assert scores2 == [400.0] and label2 == "second"


def test_a_compared_run_is_counted_from_its_own_start(tmp_path):
    from wmlab.report.write import _histories_to_report

    def staged(name: str, memory_seconds: float, generation_seconds: float) -> str:
        run = new_run(tmp_path, name)
        Path(f"{run}/stages").mkdir(exist_ok=True)
        Path(f"{run}/controller").mkdir(exist_ok=True)
        Path(f"{run}/stages/memory.json").write_text(json.dumps(
            {"stage": "memory", "status": "done", "compute_seconds": memory_seconds}))
        Path(f"{run}/controller/metrics.csv").write_text(
            f"step,eval_mean,seconds\n1,300,{generation_seconds}\n")
        return run

    main_run, other = staged("main", 3600.0, 3600.0), staged("other", 1800.0, 1800.0)
    later = Path(other) / "iterations" / "2" / "controller"
    later.mkdir(parents=True)
    (later / "metrics.csv").write_text("step,eval_mean,seconds\n1,500,3600\n")
    histories = _histories_to_report(RunFiles(main_run), [other])
    assert [[label for label, _ in history] for history in histories] == [
        ["main"], ["other", "other, iteration 2"]]
    curves = compute_curves(histories)
    # the compared run starts at hour 0, not where the reported run ended; its iteration 2
    # goes on from its own iteration 1
    assert [(label, hours) for label, hours, _ in curves] == [
        ("main", [2.0]), ("other", [1.0]), ("other, iteration 2", [2.0])]
    md = Path(write_report(main_run, compare=[other]).markdown).read_text()
    assert "Compute: 60.0 min" in md and "other, iteration 2" in md


def test_the_dream_fidelity_table_sits_beside_the_calibration(tmp_path):
    from wmlab.fidelity import compare, dump

    run = new_run(tmp_path)
    fill_run(run)
    real = {"generation 5": 300.0, "zero": -80.0, "random": -50.0}
    fidelity = [compare(real, {"generation 5": 250.0, "zero": -90.0, "random": -95.0},
                        tau=1.25, real_episodes=32, dream_episodes=64),
                compare(real, {"generation 5": 25.0, "zero": -9.0, "random": -5.0},
                        tau=0.5, real_episodes=32, dream_episodes=64)]
    Path(f"{run}/eval/fidelity.json").write_text(dump(fidelity))
    paths = write_report(run)
    md = Path(paths.markdown).read_text()
    assert "| 1.25 | +0.50 | 2.62 |" in md and "| 0.5 | +1.00 | 15.45 |" in md
    assert "At tau 1.25: rank correlation **+0.50**" in md  # the run's own tau in detail
    assert "| generation 5 | 300.0 | 250.0 | 1.20 |" in md
    assert md.index("Dream calibration") < md.index("Dream fidelity") < md.index("## C:")
    assert "dream-fidelity.png" in {Path(p).name for p in paths.figures}


def test_the_report_opens_with_the_result(tmp_path):
    run = new_run(tmp_path)
    fill_run(run)
    for name, returns in (("eval", [300.0, 500.0, 700.0]), ("random", [100.0, 300.0, 200.0])):
        Path(f"{run}/eval/{name}-vizdoom.json").write_text(json.dumps(
            {"backend": "vizdoom", "returns": returns, "seeds": [1, 2, 3]}))
    md = Path(write_report(run).markdown).read_text()
    assert md.index("## Summary") < md.index("## Config")
    summary = md[md.index("## Summary"):md.index("## Config")]
    assert "500 +- 163.3 over 3 episodes (vizdoom)" in summary
    assert "| 200 +- 81.65 |" in summary  # the random policy on the same seeds
    assert "+300" in summary  # the paired difference
    assert "Published: World Models, C trained in the dream, tau 1.15, 1092 +- 556" in summary


def test_the_share_of_cs_steps_taken_in_the_dream(tmp_path):
    run = new_run(tmp_path)
    fill_run(run)
    metrics = Path(run) / "controller" / "metrics.csv"
    rows = ["step,best,mean,worst,in_dream,env_steps"]
    rows += [f"{g},1,1,1,{1 if g <= 3 else 0},{9000 if g <= 3 else 1000}" for g in range(1, 6)]
    metrics.write_text("\n".join(rows) + "\n")
    md = Path(write_report(run).markdown).read_text()
    assert "| members' steps: real env / dream | 2,000 / 27,000 (93% in the dream) |" in md


def test_the_evaluation_says_how_its_episodes_ended(tmp_path):
    run = new_run(tmp_path)
    fill_run(run)
    eval_json = Path(f"{run}/eval/eval-vizdoom.json")
    eval_json.write_text(json.dumps({"backend": "vizdoom", "returns": [300.0, 2100.0, 700.0],
                                     "seeds": [1, 2, 3]}))
    assert "episode lengths: median" not in Path(write_report(run).markdown).read_text()  # older
    eval_json.write_text(json.dumps(
        {"backend": "vizdoom", "returns": [300.0, 2100.0, 700.0], "seeds": [1, 2, 3],
         "extra": {"max_steps": 2100, "lengths": [300, 2100, 700]}}))
    md = Path(write_report(run).markdown).read_text()
    assert "episode lengths: median 700 steps; 2 of 3 ended before the cap of 2100 steps" in md
