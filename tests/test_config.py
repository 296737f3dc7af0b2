import pytest
import tomllib

from wmlab import config as C
from wmlab.errors import ConfigError


def test_every_preset_and_profile_loads():
    presets = C.list_presets()
    assert set(presets) >= {"carracing", "doom", "binpacking"}
    for preset, profiles in presets.items():
        assert {"paper", "quick"} <= set(profiles)
        for profile in profiles:
            cfg = C.load_config(preset, profile)
            assert (cfg.preset, cfg.profile) == (preset, profile)


def test_paper_profiles_hold_the_published_hyperparameters():
    car = C.load_config("carracing", "paper")
    assert (car.vae.z_dim, car.vae.lr, car.vae.batch_size, car.vae.kl_tolerance) == (
        32, 1e-4, 100, 0.5)
    assert (car.mdrnn.hidden, car.mdrnn.gaussians, car.mdrnn.seq_len) == (256, 5, 999)
    assert (car.es.population, car.es.rollouts, car.es.sigma0) == (64, 16, 0.1)
    assert (car.es.eval_every, car.es.eval_rollouts) == (25, 1024)
    doom = C.load_config("doom", "paper")
    assert (doom.vae.z_dim, doom.mdrnn.hidden, doom.mdrnn.seq_len) == (64, 512, 500)
    assert doom.mdrnn.done_head and doom.mdrnn.restart_input and doom.mdrnn.done_weight == 10
    assert (doom.mdrnn.lr_min, doom.mdrnn.lr_decay) == (1e-5, 0.99999)
    assert (doom.controller.inputs, doom.controller.bias) == ("zch", False)
    assert doom.collect.min_length == 101 and doom.collect.policy == "held"
    assert doom.dream.tau == 1.25 and doom.dream.max_steps == 2100


def test_quick_profile_extends_paper():
    paper, quick = C.load_config("doom", "paper"), C.load_config("doom", "quick")
    assert quick.collect.episodes < paper.collect.episodes
    assert quick.vae.z_dim == paper.vae.z_dim  # inherited, not redefined


def test_overrides_apply_and_are_typed():
    cfg = C.load_config("doom", "quick", ["vae.epochs=3", "env.backend=vizdoom",
                                          "vision.kind=vae-gan", "es.sigma0=1"])
    assert cfg.vae.epochs == 3 and cfg.vae.kind == "vae-gan"
    assert cfg.env.backend == "vizdoom"
    assert cfg.es.sigma0 == 1.0 and isinstance(cfg.es.sigma0, float)


@pytest.mark.parametrize("override, fragment", [
    ("vae.epoch=3", "unknown config key 'vae.epoch'"),
    ("nosuch.key=3", "unknown config key 'nosuch'"),
    ("vae.epochs=three", "vae.epochs: expected an integer"),
    ("vae.epochs=1.5", "vae.epochs: expected an integer"),
    ("vae.epochs=-1", "vae.epochs: -1 is below the minimum 0"),
    ("collect.episodes=-5", "collect.episodes: -5 is below the minimum"),
    ("vae.channels_last=1", "vae.channels_last: expected true or false"),
    ("collect.policy=lazy", "collect.policy: 'lazy' is not one of"),
    ("vae.val_fraction=0.9", "vae.val_fraction: 0.9 is above the maximum"),
    ("vae=3", "must be section.key"),
    ("novalue", "not of the form section.key=value"),
    ("collect.hold_min=20", "collect.hold_min (20) must not exceed collect.hold_max"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        C.load_config("doom", "quick", [override])
    assert fragment in str(info.value)


def test_mirrored_pairs_need_an_even_population():
    with pytest.raises(ConfigError, match=r"es.population \(7\) must be even with "
                       r"es.mirrored = true"):
        C.load_config("doom", "quick", ["es.antithetic=false", "es.population=7",
                                        "es.mirrored=true"])
    assert C.load_config("doom", "quick", ["es.population=8", "es.mirrored=true"]).es.mirrored


def test_unknown_preset_and_profile():
    with pytest.raises(ConfigError, match="unknown preset 'pong'"):
        C.load_config("pong")
    with pytest.raises(ConfigError, match="has no profile 'huge'.*paper, quick"):
        C.load_config("doom", "huge")


def test_toml_round_trip(tmp_path):
    cfg = C.load_config("carracing", "quick", ["run.name=x y", 'collect.out="memory://a"'])
    text = C.to_toml(cfg)
    assert C.from_dict(tomllib.loads(text)) == cfg
    path = tmp_path / "config.toml"
    path.write_text(text)
    assert C.load_config_file(path, ["vae.epochs=7"]).vae.epochs == 7


def test_config_file_with_unknown_key_is_refused(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('preset = "doom"\n[vae]\nzdim = 3\n')
    with pytest.raises(ConfigError, match="unknown config key 'vae.zdim'"):
        C.load_config_file(path)


def test_describe_lists_every_key_with_help():
    rows = C.describe()
    keys = {key for key, _, _ in rows}
    assert {"vae.epochs", "collect.episodes", "es.population", "dream.tau"} <= keys
    assert all(help_text for _, _, help_text in rows)


def test_dream_dropout_keeps_ms_training_rate_and_needs_one():
    from wmlab.dream import DreamSettings

    with pytest.raises(ConfigError, match="mdrnn.dropout is 0: set mdrnn.dropout"):
        C.load_config("doom", "quick", ["dream.dropout=true"])
    cfg = C.load_config("doom", "quick", ["mdrnn.dropout=0.2", "dream.dropout=true"])
    assert DreamSettings.from_config(cfg).dropout == 0.2
    # trained with dropout, dreamt without it (the default): the dream is the usual one
    cfg = C.load_config("doom", "quick", ["mdrnn.dropout=0.2"])
    assert DreamSettings.from_config(cfg).dropout == 0.0
    cfg.dream.dropout, cfg.mdrnn.dropout = True, 0.0  # set by code, past the loader's check
    with pytest.raises(ConfigError, match="dream.dropout"):
        DreamSettings.from_config(cfg)
    with pytest.raises(ConfigError, match="mdrnn.dropout"):
        C.load_config("doom", "quick", ["mdrnn.dropout=1.0"])


def test_eval_references_are_named_behaviours():
    from wmlab.config import load_config, with_overrides

    assert load_config("doom", "budget").eval.references == ["sweep"]
    with pytest.raises(ConfigError, match="eval.references: unknown 'zigzag'"):
        with_overrides(load_config("doom", "quick"), ['eval.references=["zigzag"]'])
