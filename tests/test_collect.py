"""Collection end to end on real environments: round trip, resume, filters, bad input."""

import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest

from agent_fixtures import live_processes
from wmlab import envs
from wmlab.cli import main
from wmlab.collect import collect, episode_seeds
from wmlab.config import load_config
from wmlab.data import EpisodeStore
from wmlab.errors import WmlabError


def _doom_cfg(tmp_path, episodes, *extra):
    return load_config("doom", "quick", [
        f"run.root={tmp_path}", f"collect.episodes={episodes}", "collect.workers=1",
        "collect.min_length=0", "env.max_steps=60", *extra])


def test_collected_episodes_round_trip_exactly(tmp_path):
    cfg = _doom_cfg(tmp_path, 3)
    summary = collect(cfg, progress=False)
    assert summary.new_episodes == 3 and summary.kept_now == 3
    store = EpisodeStore.open(cfg.store_url())
    spec = envs.get_spec("doom")
    for episode_id in store.episode_ids():
        episode = store.load(episode_id)
        meta = episode.meta
        steps = meta["length"]
        assert episode.frames.shape == (steps + 1, 64, 64, 3)
        assert episode.frames.dtype == np.uint8
        assert episode.actions.shape == (steps, spec.action_dim)
        assert set(np.unique(episode.actions)) <= {-1.0, 0.0, 1.0}
        assert meta["env"] == "doom" and meta["policy"] == "held"
        assert meta["return"] == pytest.approx(float(episode.rewards.sum()))
        # The recorded seeds replay the same episode: same frames, same rewards.
        env_seed, policy_seed = episode_seeds((cfg.run.seed, cfg.collect.seed), meta["index"])
        assert (meta["seed"], meta["policy_seed"]) == (env_seed, policy_seed)
    replay = _doom_cfg(tmp_path / "again", 3)
    collect(replay, progress=False)
    other = EpisodeStore.open(replay.store_url())
    for episode_id in store.episode_ids():
        np.testing.assert_array_equal(store.load(episode_id).frames,
                                      other.load(episode_id).frames)


def test_rerun_continues_to_n_without_duplicates(tmp_path):
    collect(_doom_cfg(tmp_path, 2), progress=False)
    store_url = _doom_cfg(tmp_path, 2).store_url()
    first = EpisodeStore.open(store_url).episode_ids()
    again = collect(_doom_cfg(tmp_path, 2), progress=False)
    assert again.new_episodes == 0
    more = collect(_doom_cfg(tmp_path, 5), progress=False)
    assert more.new_episodes == 3
    ids = EpisodeStore.open(store_url).episode_ids()
    assert len(ids) == len(set(ids)) == 5 and set(first) <= set(ids)


def test_length_filter_drops_short_episodes_and_still_reaches_n(tmp_path):
    cfg = load_config("doom", "quick", [
        f"run.root={tmp_path}", "collect.episodes=3", "collect.workers=1",
        "collect.min_length=380", "env.max_steps=900"])
    summary = collect(cfg, progress=False)
    store = EpisodeStore.open(cfg.store_url())
    lengths = [m["length"] for m in store.metas()]
    assert len(lengths) == 3 and min(lengths) >= 380
    assert summary.rejected > 0  # random play dies before tic 380 often enough


def test_parallel_workers_give_the_same_episodes_as_one(tmp_path):
    one = _doom_cfg(tmp_path / "one", 4)
    two = _doom_cfg(tmp_path / "two", 4, "collect.workers=2")
    collect(one, progress=False)
    collect(two, progress=False)
    a, b = EpisodeStore.open(one.store_url()), EpisodeStore.open(two.store_url())
    assert a.episode_ids() == b.episode_ids()
    for episode_id in a.episode_ids():
        np.testing.assert_array_equal(a.load(episode_id).frames, b.load(episode_id).frames)


def _collect_forever(root: str) -> None:
    os.environ["SDL_VIDEODRIVER"] = "dummy"
    cfg = load_config("doom", "quick", [f"run.root={root}", "collect.episodes=1000",
                                        "collect.workers=2", "collect.min_length=0",
                                        "env.max_steps=40"])
    collect(cfg, progress=False)


def test_kill_9_mid_collection_then_resume_gives_exactly_n_distinct(tmp_path):
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_collect_forever, args=(str(tmp_path),))
    proc.start()
    store_dir = tmp_path / "doom-quick" / "data" / "episodes"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if store_dir.exists() and len(list(store_dir.glob("*.wmep"))) >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    killed_with = len(list(store_dir.glob("*.wmep")))
    assert killed_with >= 3
    target = killed_with + 4
    cfg = _doom_cfg(tmp_path, target, "env.max_steps=40", "collect.workers=2")
    summary = collect(cfg, progress=False)
    store = EpisodeStore.open(cfg.store_url())
    ids = store.episode_ids()
    assert len(ids) == len(set(ids)) == target
    assert summary.new_episodes == target - killed_with
    assert store.verify(progress=False).ok
    assert not list((tmp_path / "doom-quick" / "data" / "tmp").glob("*"))


def test_envpool_collection_records_its_backend(tmp_path):
    pytest.importorskip("envpool")
    cfg = load_config("carracing", "quick", [
        f"run.root={tmp_path}", "collect.episodes=2", "collect.workers=1",
        "collect.envs_per_worker=2", "env.backend=envpool", "env.max_steps=30"])
    collect(cfg, progress=False)
    store = EpisodeStore.open(cfg.store_url())
    metas = store.metas()
    assert {m["backend"] for m in metas} == {"envpool"}
    assert all(m["length"] == 30 for m in metas)
    episode = store.load(store.episode_ids()[0])
    assert episode.actions.shape == (30, 3)
    assert episode.actions[:, 1].min() >= 0 and episode.actions[:, 2].min() >= 0
    mixed = load_config("carracing", "quick", [
        f"run.root={tmp_path}", "collect.episodes=3", "collect.workers=1",
        "env.backend=gymnasium", "env.max_steps=5"])
    with pytest.raises(WmlabError, match="backend"):
        collect(mixed, progress=False)
    assert len(EpisodeStore.open(cfg.store_url()).episode_ids()) == 2


def test_cli_bad_input_gives_one_line_and_touches_nothing(tmp_path, capsys):
    root = f"run.root={tmp_path}"
    cases = [
        (["collect", "--preset", "pong", "--set", root], "unknown preset 'pong'"),
        (["collect", "--preset", "doom", "--episodes", "-3", "--set", root],
         "collect.episodes: -3 is below the minimum"),
        (["collect", "--preset", "doom", "--env", "NoSuchEnv-v9", "--set", root,
          "--episodes", "1"], "NoSuchEnv-v9"),
        (["collect", "--preset", "doom", "--set", "vae.epoch=3"], "unknown config key"),
        (["data", "info", str(tmp_path / "nothing-here")], "no episode store"),
    ]
    for argv, fragment in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], (argv, err)
    assert not (tmp_path / "doom-quick" / "data").exists()


def test_cli_collect_info_and_verify(tmp_path, capsys):
    argv = ["collect", "--preset", "doom", "--profile", "quick", "--episodes", "2",
            "--workers", "1", "--no-progress", "--set", f"run.root={tmp_path}",
            "--set", "env.max_steps=30", "--set", "collect.min_length=0", "--info"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2/2 episodes" in out
    store_dir = tmp_path / "doom-quick" / "data"
    assert (tmp_path / "doom-quick" / "config.toml").exists()
    assert main(["data", "verify", str(store_dir), "--no-progress"]) == 0
    victim = sorted((store_dir / "episodes").glob("*.wmep"))[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    capsys.readouterr()
    assert main(["data", "verify", str(store_dir), "--no-progress"]) == 1
    assert victim.name in capsys.readouterr().out


def test_cli_collect_fills_the_profiles_shares_unless_a_policy_is_named(tmp_path, capsys):
    base = ["collect", "--preset", "doom", "--profile", "quick", "--workers", "1",
            "--no-progress", "--set", "env.max_steps=30", "--set", "collect.min_length=0"]
    # the quick profile collects a fifth of its episodes with the fixed behaviours
    assert main([*base, "--episodes", "5", "--set", f"run.root={tmp_path}/a"]) == 0
    out = capsys.readouterr().out
    assert "collection 'fixed' now holds 1/1" in out and "'held' now holds 4/4" in out
    assert main([*base, "--episodes", "3", "--policy", "held",
                 "--set", f"run.root={tmp_path}/b"]) == 0
    out = capsys.readouterr().out
    assert "'held' now holds 3/3" in out and "fixed" not in out


def _members_of_group(pgid: int) -> list[int]:
    """Pids of live processes in process group ``pgid`` (from /proc; Linux only)."""
    return [pid for pid, fields in live_processes().items() if int(fields[2]) == pgid]


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process groups from /proc")
def test_stopping_workers_leaves_no_env_processes_behind(tmp_path):
    """ViZDoom's game processes ignore SIGTERM; a stopped worker must not orphan them."""
    from wmlab.collect import CollectJob, _engine
    from wmlab.policies import PolicyConfig

    job = CollectJob(env="doom", backend="vizdoom", max_steps=2000, envs_per_worker=1,
                     store_url=str(tmp_path / "store"), collection="held",
                     policy=PolicyConfig(name="held"), seed_prefix=(0, 0))
    EpisodeStore.create_or_open(job.store_url, env="doom", backend="vizdoom", action_dim=1)
    engine = _engine(job, workers=2)
    engine.wait_ready()
    engine.submit(([0],))
    engine.submit(([1],))
    deadline = time.monotonic() + 60
    groups = engine.worker_pids()
    # wait until both workers run a game (worker + its vizdoom child in one group)
    while time.monotonic() < deadline and not all(len(_members_of_group(g)) >= 2
                                                  for g in groups):
        time.sleep(0.1)
    assert all(len(_members_of_group(g)) >= 2 for g in groups)
    os.kill(groups[0], signal.SIGKILL)  # one dies hard, the other is stopped
    engine.close()
    time.sleep(0.5)
    assert [_members_of_group(g) for g in groups] == [[], []]


def test_collection_workers_share_the_cores_instead_of_each_taking_all():
    from wmlab.collect import worker_threads

    assert worker_threads(2, cpus=2) == 1
    assert worker_threads(2, cpus=8) == 4
    assert worker_threads(3, cpus=8) == 2
    assert worker_threads(16, cpus=2) == 1  # more workers than cores: still one each
