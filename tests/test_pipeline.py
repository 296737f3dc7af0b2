"""The pipeline's bookkeeping: skip what is done, resume what was cut, rerun what changed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from wmlab.config import load_config
from wmlab.errors import WmlabError
from wmlab.pipeline import Pipeline, Stage, config_slice, default_stages
from wmlab.runs import STAGES


class Recorder:
    """Fake stages writing one file each; the output fingerprint is the file's content."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[str] = []
        self.fail_in: str | None = None

    def stage(self, name: str, sections: tuple[str, ...]) -> Stage:
        def run(cfg, progress):
            self.calls.append(name)
            if self.fail_in == name:
                raise KeyboardInterrupt  # as a kill would stop it
            folder = self.root / cfg.run_dir() / name
            folder.mkdir(parents=True, exist_ok=True)
            upstream = sorted(p.name for p in (self.root / cfg.run_dir()).iterdir())
            value = json.dumps({"cfg": config_slice(cfg, sections), "seen": upstream})
            (folder / "out.txt").write_text(value)
            return {"wrote": name}

        def output(cfg):
            path = self.root / cfg.run_dir() / name / "out.txt"
            return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None

        return Stage(name, sections, name, run, output, f"fake {name}")

    def pipeline(self, cfg) -> Pipeline:
        stages = [self.stage("a", ("collect",)), self.stage("b", ("vae",)),
                  self.stage("c", ("mdrnn",))]
        return Pipeline(cfg, stages=stages, progress=False, log=lambda _: None)


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rec = Recorder(tmp_path)

    def cfg(*overrides: str):
        return load_config("doom", "quick", ["run.root=\"runs\"", *overrides])

    return rec, cfg


def test_the_default_stages_run_in_the_order_the_run_directory_names(setup):
    """``wmlab.runs.STAGES`` is the one list of the stages (the report reads it too)."""
    _, cfg = setup
    for config in (cfg(), cfg("collect.out=\"elsewhere\"")):
        assert [stage.name for stage in default_stages(config)] == list(STAGES)
    assert [stage.name for stage in Pipeline(cfg(), progress=False).stages] == list(STAGES)


def test_second_run_skips_every_finished_stage(setup):
    rec, cfg = setup
    results = rec.pipeline(cfg()).run()
    assert [r.status for r in results] == ["ran", "ran", "ran"]
    results = rec.pipeline(cfg()).run()
    assert [r.status for r in results] == ["skipped"] * 3
    assert rec.calls == ["a", "b", "c"]


def test_a_config_change_reruns_that_stage_and_later_ones_only(setup, tmp_path):
    rec, cfg = setup
    rec.pipeline(cfg()).run()
    rec.calls.clear()
    results = rec.pipeline(cfg("vae.epochs=7")).run()
    assert [r.status for r in results] == ["skipped", "rerun", "rerun"]
    assert rec.calls == ["b", "c"]
    # the old outputs were moved aside, not deleted
    assert any(p.name.startswith("b-") for p in (tmp_path / "runs/doom-quick/trash").iterdir())


def test_neutral_keys_rerun_nothing(setup):
    rec, cfg = setup
    rec.pipeline(cfg()).run()
    rec.calls.clear()
    results = rec.pipeline(cfg("collect.workers=7", "vae.checkpoint_every=3")).run()
    assert [r.status for r in results] == ["skipped"] * 3
    assert rec.calls == []


def test_an_interrupted_stage_resumes_and_finished_ones_are_kept(setup):
    rec, cfg = setup
    rec.fail_in = "b"
    with pytest.raises(KeyboardInterrupt):
        rec.pipeline(cfg()).run()
    rec.fail_in = None
    results = rec.pipeline(cfg()).run()
    assert [r.status for r in results] == ["skipped", "resumed", "ran"]
    assert rec.calls == ["a", "b", "b", "c"]


def test_outputs_deleted_by_hand_are_repaired(setup, tmp_path):
    rec, cfg = setup
    rec.pipeline(cfg()).run()
    (tmp_path / "runs/doom-quick/b/out.txt").unlink()
    results = rec.pipeline(cfg()).run()
    assert [r.status for r in results][:2] == ["skipped", "repaired"]


def test_until_stops_after_the_named_stage_and_unknown_names_are_refused(setup):
    rec, cfg = setup
    results = rec.pipeline(cfg()).run(until="a")
    assert [r.name for r in results] == ["a"]
    with pytest.raises(WmlabError, match="no stage 'nope'"):
        rec.pipeline(cfg()).run(until="nope")


def test_status_reports_done_and_stale(setup):
    rec, cfg = setup
    rec.pipeline(cfg()).run()
    assert [row["status"] for row in rec.pipeline(cfg()).status()] == ["done"] * 3
    assert [row["status"] for row in rec.pipeline(cfg("mdrnn.steps=3")).status()] == [
        "done", "done", "stale"]


def test_a_run_directory_of_another_preset_is_refused(setup):
    rec, cfg = setup
    rec.pipeline(cfg("run.name=\"shared\"")).run()
    other = load_config("carracing", "quick", ["run.root=\"runs\"", "run.name=\"shared\""])
    with pytest.raises(WmlabError, match="belongs to preset 'doom'"):
        rec.pipeline(other).run()


def test_run_refuses_an_unreachable_ray_cluster_before_any_stage(tmp_path, capsys):
    from wmlab.cli import main

    code = main(["run", "--preset", "doom", "--profile", "quick", "--set",
                 f"run.root=\"{tmp_path}\"", "--ray-address", "127.0.0.1:9", "--no-progress"])
    assert code == 2
    assert "does not answer" in capsys.readouterr().err
    assert not (tmp_path / "doom-quick").exists()


def test_training_further_continues_a_stage_and_training_less_starts_it_again(setup, tmp_path):
    rec, cfg = setup
    rec.pipeline(cfg("mdrnn.steps=10")).run()
    rec.calls.clear()
    pipeline = rec.pipeline(cfg("mdrnn.steps=20"))
    assert [row["status"] for row in pipeline.status()] == ["done", "done", "extend"]
    results = pipeline.run()
    assert [r.status for r in results] == ["skipped", "skipped", "extended"]
    assert rec.calls == ["c"]
    assert not (tmp_path / "runs/doom-quick/trash").exists()  # continued, not restarted
    assert json.loads(Path("runs/doom-quick/stages/c.json").read_text())["extent"] == {
        "mdrnn.steps": 20}
    # fewer steps than were trained: a different result, so the stage starts again
    results = rec.pipeline(cfg("mdrnn.steps=5")).run()
    assert [r.status for r in results] == ["skipped", "skipped", "rerun"]
    assert any(p.name.startswith("c-") for p in (tmp_path / "runs/doom-quick/trash").iterdir())


def test_records_written_before_extents_were_kept_still_match(setup):
    rec, cfg = setup
    pipeline = rec.pipeline(cfg())
    pipeline.run()
    # rewrite every record the old way: the fingerprint over the whole config slice
    upstream = None
    for stage in pipeline.stages:
        path = Path(f"runs/doom-quick/stages/{stage.name}.json")
        record = json.loads(path.read_text())
        del record["extent"]
        record["input"] = hashlib.sha256(json.dumps(
            {"config": config_slice(pipeline.cfg, stage.sections), "upstream": upstream},
            sort_keys=True, default=str).encode()).hexdigest()[:16]
        path.write_text(json.dumps(record))
        upstream = hashlib.sha256(json.dumps([upstream, record["output"]], sort_keys=True,
                                             default=str).encode()).hexdigest()[:16]
    rec.calls.clear()
    assert [r.status for r in rec.pipeline(cfg()).run()] == ["skipped"] * 3
    assert rec.calls == []


def test_keys_added_later_at_their_old_behaviour_leave_fingerprints_alone(setup):
    _, cfg = setup
    assert "es.dream_generations" not in config_slice(cfg(), ("es",))
    assert config_slice(cfg("es.dream_generations=3"), ("es",))["es.dream_generations"] == 3
    # V's width came after runs whose V is the paper's (32 channels): those keep their
    # fingerprints, and a narrower V is a different V
    assert "vae.width" not in config_slice(cfg("vae.width=32"), ("vae",))
    assert config_slice(cfg("vae.width=16"), ("vae",))["vae.width"] == 16
    # dropout came later too: off, M's and the dream's stages keep their fingerprints
    assert "mdrnn.dropout" not in config_slice(cfg(), ("mdrnn",))
    assert "dream.dropout" not in config_slice(cfg(), ("dream",))
    both = cfg("mdrnn.dropout=0.1", "dream.dropout=true")
    assert config_slice(both, ("mdrnn", "dream"))["mdrnn.dropout"] == 0.1
    assert config_slice(both, ("mdrnn", "dream"))["dream.dropout"] is True


def test_a_stage_counts_its_compute_over_its_own_attempts(setup, tmp_path, monkeypatch):
    """A stage cut short and resumed adds its attempts (never the pause between them), with
    the CPU it ran on; one started again from scratch counts from zero."""
    import time

    import wmlab.pipeline.engine as pipeline_module

    rec, cfg = setup
    monkeypatch.setattr(pipeline_module, "HEARTBEAT_SECONDS", 0.05)
    slow = rec.stage("b", ("vae",))

    def run_slowly(config, progress):
        time.sleep(0.3)  # long enough for a few heartbeats
        return slow.run(config, progress)

    def pipeline():
        stages = [rec.stage("a", ("collect",)), Stage("b", ("vae",), "b", run_slowly,
                                                       slow.output, "fake b")]
        return Pipeline(cfg(), stages=stages, progress=False, log=lambda _: None)

    rec.fail_in = "b"
    with pytest.raises(KeyboardInterrupt):
        pipeline().run()
    record = json.loads((tmp_path / "runs/doom-quick/stages/b.json").read_text())
    assert record["status"] == "running" and record["compute_seconds"] >= 0.2  # the beats
    time.sleep(0.5)  # a pause between sessions: not counted
    rec.fail_in = None
    results = pipeline().run()
    assert [r.status for r in results] == ["skipped", "resumed"]
    record = json.loads((tmp_path / "runs/doom-quick/stages/b.json").read_text())
    assert len(record["attempts"]) == 2
    total = sum(a["seconds"] for a in record["attempts"])
    assert record["compute_seconds"] == pytest.approx(total, abs=0.01)
    # two attempts of ~0.3 s (the first counted to its last beat), not the 0.5 s pause
    assert 0.45 < total < 0.95
    assert record["cpu"]["cores"] >= 1 and record["cpu"]["model"]
    assert record["attempts"][0]["cpu"] == record["cpu"]
    # changed inputs: the stage starts again, and so does its count
    stages = [rec.stage("a", ("collect",)), Stage("b", ("vae",), "b", run_slowly,
                                                   slow.output, "fake b")]
    Pipeline(cfg("vae.epochs=7"), stages=stages, progress=False, log=lambda _: None).run()
    record = json.loads((tmp_path / "runs/doom-quick/stages/b.json").read_text())
    assert len(record["attempts"]) == 1 and record["compute_seconds"] < 0.5
    # ...but the compute spent on the outputs now in trash/ stays in the run's budget
    assert len(record["discarded_attempts"]) == 2
    assert record["discarded_seconds"] == pytest.approx(total, abs=0.01)
    from wmlab.runs import spent_seconds

    assert spent_seconds(record) == pytest.approx(total + record["compute_seconds"])
    # ...and a later resume of the new version keeps them
    rec.fail_in = None
    Pipeline(cfg("vae.epochs=8"), stages=stages, progress=False, log=lambda _: None).run()
    record = json.loads((tmp_path / "runs/doom-quick/stages/b.json").read_text())
    assert len(record["discarded_attempts"]) == 3


def test_measurements_added_to_the_eval_folder_later_leave_the_evaluation_done(setup):
    """`wmlab stall-effect` writes into eval/ after the evaluate stage finished: that must not
    make the evaluation look changed by hand (it would run the whole evaluation again)."""
    from wmlab.pipeline.stages import _eval_output
    from wmlab.runs import RunLayout

    _, cfg = setup
    config = cfg()
    layout = RunLayout.of(config)
    Path(layout.eval).mkdir(parents=True)
    Path(layout.scores("eval", "gymnasium")).write_text('{"mean": 1.0}')
    before = _eval_output(config)
    Path(layout.stall_effect).write_text('{"rank_correlation": 0.9}')
    assert _eval_output(config) == before
    Path(layout.scores("eval", "gymnasium")).write_text('{"mean": 2.0}')
    assert _eval_output(config) != before


def test_a_measurement_rewritten_by_a_command_keeps_its_stage_finished(setup, tmp_path):
    """`wmlab fidelity` rewrites a file the evaluate stage wrote: the stage adopts its outputs
    as they are, so the next run skips it and runs only what comes after it."""
    rec, cfg = setup
    config = cfg()
    rec.pipeline(config).run()
    (tmp_path / "runs/doom-quick/b/out.txt").write_text("measured again")
    pipeline = rec.pipeline(config)
    assert pipeline.adopt_outputs("b")
    rec.calls.clear()
    results = rec.pipeline(config).run()
    assert [r.status for r in results] == ["skipped", "skipped", "rerun"]
    assert rec.calls == ["c"]
    # a stage not finished from its present inputs adopts nothing
    assert not rec.pipeline(cfg("vae.lr=0.5")).adopt_outputs("b")
    with pytest.raises(WmlabError, match="no stage 'z'"):
        pipeline.adopt_outputs("z")


def test_a_run_moved_elsewhere_keeps_its_finished_stages(setup, tmp_path):
    """Paths into the run's own directory (a later iteration's collect.agent_run,
    vae.init_from...) count relative to it: a run moved or copied to another folder is still
    done there; a path outside it still counts as it is; records written with absolute paths
    before still match where the run has not moved."""
    import shutil

    rec, cfg = setup

    def at(name: str, agent_run: str):
        return cfg(f'run.name="{name}"', f'collect.agent_run="runs/{agent_run}"')

    rec.pipeline(at("first", "first/iterations/1")).run()
    shutil.copytree(tmp_path / "runs/first", tmp_path / "runs/moved")
    rec.calls.clear()
    assert [r.status for r in rec.pipeline(at("moved", "moved/iterations/1")).run()] == \
        ["skipped"] * 3
    assert rec.calls == []
    # the same path outside the run: another input, the stage and those after it run again
    results = rec.pipeline(at("moved", "first/iterations/1")).run()
    assert [r.status for r in results] == ["rerun", "rerun", "rerun"]
    # a record from before (absolute paths in its fingerprint) still matches in place
    old = rec.pipeline(at("first", "first/iterations/1"))
    stage = old.stages[0]
    record = old.record(stage.name)
    record["input"] = old.input_fingerprint(stage, None, absolute=True)
    assert record["input"] != old.input_fingerprint(stage, None)
    old._write_record(stage.name, record)
    assert [row["status"] for row in old.status()] == ["done"] * 3


def test_a_later_iteration_starts_again_where_the_earlier_one_changed(setup, tmp_path):
    """A later iteration's stages are made from the earlier one's V, M and C, through paths
    that stay the same when what they hold changes: the engine's prior stands for them, so
    a changed prior starts every stage again (where it used to extend or resume results made
    from the old M); records from before priors were kept stand where they were made after
    the prior was finished."""
    from wmlab.pipeline import Engine, Prior
    from wmlab.pipeline.engine import _chain

    rec, cfg = setup

    def engine(prior):
        return Engine(cfg(), rec.pipeline(cfg()).stages, progress=False, log=lambda _: None,
                      prior=prior)

    first = Prior("m-before", "2026-01-01T00:00:00+00:00")
    assert [r.status for r in engine(first).run()] == ["ran"] * 3
    assert engine(first).record("c")["prior"] == "m-before"
    assert [r.status for r in engine(first).run()] == ["skipped"] * 3
    changed = Prior("m-after", "2026-01-02T00:00:00+00:00")
    assert [r.status for r in engine(changed).run()] == ["rerun"] * 3
    # records without a prior (written before they were kept), made after the prior: done
    old, upstream = engine(changed), None
    for stage in old.stages:
        record = old.record(stage.name)
        del record["prior"]
        record["input"] = old.input_fingerprint(stage, upstream, legacy=True)
        old._write_record(stage.name, record)
        upstream = _chain(upstream, record["output"])
    assert [row["status"] for row in old.status()] == ["done"] * 3
    # ...and stale where the prior was finished after it was made
    later = Prior("m-after", "2999-01-01T00:00:00+00:00")
    assert [row["status"] for row in engine(later).status()] == ["stale"] * 3


def test_the_prior_of_a_later_iteration_is_the_earlier_controller_record(setup, tmp_path):
    """iteration_prior reads iteration k-1's controller record: its fingerprint moves with
    that C's inputs or outputs; none before that C is finished."""
    from wmlab.pipeline.stages import iteration_prior

    _, cfg = setup
    config = cfg()
    assert iteration_prior(config, 2) is None
    stages = tmp_path / config.run_dir() / "stages"
    stages.mkdir(parents=True)
    record = {"status": "done", "input": "i", "output": "o",
              "finished": "2026-12-02T14:00:00+00:00"}
    (stages / "controller.json").write_text(json.dumps(record))
    prior = iteration_prior(config, 2)
    assert prior is not None and prior.finished == record["finished"]
    (stages / "controller.json").write_text(json.dumps({**record, "output": "o2"}))
    assert iteration_prior(config, 2).fingerprint != prior.fingerprint
    (stages / "controller.json").write_text(json.dumps({**record, "status": "running"}))
    assert iteration_prior(config, 2) is None
