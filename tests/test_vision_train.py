"""Training V from the episode store, resuming it, encoding the store, and their CLI."""

from __future__ import annotations

import csv
import json
import math
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from wmlab.cli import main
from wmlab.config import load_config
from wmlab.data import Episode, EpisodeStore
from wmlab.data.series import SeriesStore
from wmlab.device import bf16_is_native
from wmlab.errors import WmlabError
from wmlab.runs import RunLayout
from wmlab.vision.encode import encode_frames, encode_store
from wmlab.vision.model import frames_to_tensor, load_vae
from wmlab.vision.train import FRAME_BYTES, MB, loader_pool_chunks, train_vae


def moving_square_episode(index: int, steps: int, noise: bool = False) -> Episode:
    """A coloured square drifting over a dark background: learnable in a few dozen steps."""
    rng = np.random.default_rng(index)
    frames = np.full((steps + 1, 64, 64, 3), 30, dtype=np.uint8)
    colour = rng.integers(0, 256, 3, dtype=np.uint8)
    for t in range(steps + 1):
        y, x = (7 * t + 5 * index) % 48, (3 * t + 11 * index) % 48
        frames[t, y:y + 16, x:x + 16] = colour
    if noise:
        frames[:] = rng.integers(0, 256, frames.shape, dtype=np.uint8)
    return Episode(frames=frames,
                   actions=rng.uniform(-1, 1, (steps, 3)).astype(np.float32),
                   rewards=rng.normal(size=steps).astype(np.float32),
                   dones=np.arange(steps) == steps - 1,
                   meta={"collection": "random", "index": index, "env": "doom",
                         "backend": "vizdoom", "policy": "held", "seed": index,
                         "policy_seed": index, "truncated": False})


def make_store(url: str | Path, episodes: int = 4, steps: int = 40, **kwargs) -> EpisodeStore:
    store = EpisodeStore.create_or_open(str(url), env="doom", backend="vizdoom", action_dim=3)
    for i in range(episodes):
        store.append(moving_square_episode(i, steps, **kwargs))
    return store


def tiny_overrides(root: Path, **extra) -> list[str]:
    values = {"run.root": str(root), "collect.out": str(root / "store"), "vae.z_dim": 8,
              "vae.batch_size": 16, "vae.epochs": 2, "vae.lr": 1e-3, "vae.loader_mb": 16,
              "vae.val_fraction": 0.25, "vae.checkpoint_every": 3, **extra}
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def tiny_config(root: Path, name: str = "a", **extra):
    return load_config("doom", "quick", [*tiny_overrides(root, **extra), f'run.name="{name}"'])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vision")
    make_store(folder / "store")
    return folder


def metric_rows(folder: str) -> list[dict[str, str]]:
    with open(f"{folder}/metrics.csv") as handle:
        return [{k: v for k, v in row.items() if k != "train/frames_per_s"}
                for row in csv.DictReader(handle)]


def weights(folder: str, name: str = "vae") -> dict[str, np.ndarray]:
    info = json.loads(Path(f"{folder}/{name}.json").read_text())
    return load_file(f"{folder}/{info['weights']}")


def assert_same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# -- learning ----------------------------------------------------------------------------------


def test_loss_falls_within_a_few_dozen_steps(root):
    cfg = tiny_config(root, "falls", **{"vae.epochs": 5})
    losses = []
    result = train_vae(cfg, progress=False, on_step=lambda step, logs: losses.append(logs))
    assert result.finished and result.steps == len(losses) == 30
    first = np.mean([r["reconstruction"] for r in losses[:5]])
    last = np.mean([r["reconstruction"] for r in losses[-5:]])
    assert last < 0.7 * first
    assert all(r["kl"] >= 0.5 * 8 - 1e-4 for r in losses)  # never below the floor
    # a validation row per epoch, the picture of each epoch, and the exported V
    assert [h["epoch"] for h in result.history] == [0, 1, 2, 3, 4]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    last_epoch = result.history[-1]
    assert 0 < last_epoch["salient_share"] < 1  # the frames move: some pixels are salient
    assert last_epoch["salient_mse"] > 0 and math.isfinite(last_epoch["background_mse"])
    folder = RunLayout.of(cfg).vision
    assert os.path.exists(f"{folder}/recon-vae-epoch005.png")
    assert any(name.startswith("events.") for name in os.listdir(f"{folder}/tb"))
    model, info = load_vae(folder)
    assert model.z_dim == 8 and info["step"] == 30 and info["kind"] == "vae"
    assert model.width == 32 and info["width"] == 32


def test_a_narrow_v_trains_saves_and_loads_at_its_width(root):
    cfg = tiny_config(root, "narrow", **{"vae.width": 8, "vae.epochs": 1})
    train_vae(cfg, progress=False)
    model, info = load_vae(RunLayout.of(cfg).vision)
    assert model.width == info["width"] == 8
    assert model.encoder.convs[0].out_channels == 8
    # starting the next iteration's V from it needs the same width
    with pytest.raises(WmlabError, match="width 8, this run asks for 8 and 32"):
        train_vae(tiny_config(root, "wider", **{"vae.init_from": RunLayout.of(cfg).vision}),
                  progress=False)


def test_kill_and_resume_equals_an_uninterrupted_run(root):
    straight = tiny_config(root, "straight")
    train_vae(straight, progress=False)

    stopped = tiny_config(root, "stopped")
    first = train_vae(stopped, progress=False, stop_after_steps=5)
    assert not first.finished and first.steps == 5
    assert not os.path.exists(f"{RunLayout.of(stopped).vision}/vae.json")
    second = train_vae(stopped, progress=False)
    assert second.finished and second.resumed_from == 5

    # a hard kill inside step 5: the last checkpoint is step 3, steps 4-5 are redone
    killed = tiny_config(root, "killed")

    def kill(step, logs):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_vae(killed, progress=False, on_step=kill)
    assert json.loads(Path(f"{RunLayout.of(killed).vision}/train.json").read_text())["step"] == 3
    assert train_vae(killed, progress=False).resumed_from == 3

    reference = weights(RunLayout.of(straight).vision)
    for cfg in (stopped, killed):
        assert_same_weights(weights(RunLayout.of(cfg).vision), reference)
        assert_same_weights(weights(RunLayout.of(cfg).vision, "train"),
                            weights(RunLayout.of(straight).vision, "train"))
        assert metric_rows(RunLayout.of(cfg).vision) == metric_rows(RunLayout.of(straight).vision)


def test_salient_weight_moves_the_loss_onto_the_changing_pixels():
    from wmlab.vision.evaluation import salient_mask
    from wmlab.vision.model import vae_loss

    x = torch.zeros(2, 3, 4, 4)
    x[:, :, 0, 0] = 1.0  # one pixel of each frame differs from the mean frame (zeros)
    recon = torch.full_like(x, 0.5)
    mu, logvar = torch.zeros(2, 2), torch.zeros(2, 2)
    mask = salient_mask(x, torch.zeros(3, 4, 4))
    assert mask.shape == (2, 1, 4, 4) and int(mask.sum()) == 2
    plain = vae_loss(x, recon, mu, logvar, 0.0)
    weighted = vae_loss(x, recon, mu, logvar, 0.0, 1.0 + 9.0 * mask.float())
    # per frame: 48 pixel-channels of error 0.25, 3 of them salient and weighted 10
    assert float(plain.total) == pytest.approx(48 * 0.25)
    assert float(weighted.total) == pytest.approx(48 * 0.25 + 9 * 3 * 0.25)
    assert float(weighted.reconstruction) == float(plain.reconstruction)  # logged plainly


def test_salient_weight_trains_resumes_exactly_and_lowers_the_salient_error(root):
    extra = {"vae.epochs": 3, "vae.salient_weight": 20.0}
    plain = train_vae(tiny_config(root, "plain-3", **{"vae.epochs": 3}), progress=False)
    straight = tiny_config(root, "salient", **extra)
    weighted = train_vae(straight, progress=False)
    # the same steps, the loss spent on the moving square: its pixels come out better
    assert weighted.history[-1]["salient_mse"] < plain.history[-1]["salient_mse"]
    stopped = tiny_config(root, "salient-stopped", **extra)
    train_vae(stopped, progress=False, stop_after_steps=7)
    assert train_vae(stopped, progress=False).resumed_from == 7
    assert_same_weights(weights(RunLayout.of(stopped).vision),
                        weights(RunLayout.of(straight).vision))


def test_vae_gan_trains_without_nan(root):
    cfg = tiny_config(root, "gan", **{"vae.kind": "vae-gan", "vae.epochs": 1})
    seen = []
    result = train_vae(cfg, progress=False, on_step=lambda step, logs: seen.append(logs))
    assert result.finished and len(seen) == result.steps == 6
    assert all(math.isfinite(v) for logs in seen for v in logs.values())
    assert {"generator", "critic"} <= seen[0].keys()
    trained = weights(RunLayout.of(cfg).vision, "train")
    assert any(k.startswith("disc.") for k in trained)
    assert all(np.isfinite(v).all() for v in trained.values())
    assert os.path.exists(f"{RunLayout.of(cfg).vision}/recon-vae-gan-epoch001.png")
    # the exported V is a plain ConvVAE that encode and M load like any other
    model, info = load_vae(RunLayout.of(cfg).vision)
    assert info["kind"] == "vae-gan" and model.z_dim == 8


# -- encoding ----------------------------------------------------------------------------------


def test_encode_matches_the_model_and_resumes_only_missing_episodes(root):
    cfg = tiny_config(root, "enc", **{"vae.epochs": 1, "vae.max_frames": 32})
    train_vae(cfg, progress=False)
    summary = encode_store(cfg, progress=False)
    store = EpisodeStore.open(cfg.store_url())
    assert summary.encoded == summary.episodes == 4 and summary.frames == 4 * 41
    model, info = load_vae(RunLayout.of(cfg).vision)
    series = SeriesStore.current(cfg.store_url())
    assert series.fingerprint == info["fingerprint"] == summary.fingerprint
    assert series.info()["z_dim"] == 8 and series.info()["vae_step"] == info["step"]
    for episode_id in store.episode_ids():
        episode, encoded = store.load(episode_id), series.load(episode_id)
        with torch.no_grad():
            mu, logvar = model.encode(frames_to_tensor(torch.from_numpy(episode.frames)))
        assert encoded.mu.dtype == np.float16 and encoded.mu.shape == (41, 8)
        np.testing.assert_allclose(encoded.mu, mu.numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(encoded.logvar, logvar.numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_array_equal(encoded.actions, episode.actions)
        np.testing.assert_array_equal(encoded.dones, episode.dones)

    files = {i: Path(f"{series.url}/{i}.npz") for i in series.ids()}
    stamps = {i: f.stat().st_mtime_ns for i, f in files.items()}
    missing = sorted(files)[1]
    files[missing].unlink()
    again = encode_store(cfg, progress=False)
    assert again.encoded == 1 and again.frames == 41
    assert all(files[i].stat().st_mtime_ns == stamps[i] for i in files if i != missing)
    assert encode_store(cfg, progress=False).encoded == 0
    with pytest.raises(WmlabError, match="z_dim 8, the config asks for 16"):
        encode_store(tiny_config(root, "enc", **{"vae.z_dim": 16}), progress=False)


@pytest.mark.skipif(not bf16_is_native(torch.device("cpu")),
                    reason="bf16 is emulated on this CPU; encoding stays float32 there")
def test_bf16_encoding_stays_within_the_posterior_noise(root):
    cfg = tiny_config(root, "enc16", **{"vae.epochs": 1, "vae.max_frames": 32})
    train_vae(cfg, progress=False)
    model, _ = load_vae(RunLayout.of(cfg).vision)
    store = EpisodeStore.open(cfg.store_url())
    frames = store.load(store.episode_ids()[0]).frames
    mu, logvar = encode_frames(model, frames, torch.device("cpu"))
    mu16, logvar16 = encode_frames(model, frames, torch.device("cpu"), bf16=True)
    assert not np.array_equal(mu, mu16)  # bf16 did run
    assert np.quantile(np.abs(mu - mu16) / np.exp(0.5 * logvar), 0.99) < 0.25
    assert np.abs(logvar - logvar16).max() < 0.1


# -- bad input ---------------------------------------------------------------------------------


def test_empty_store_and_wrong_frames_are_refused(tmp_path):
    EpisodeStore.create_or_open(str(tmp_path / "store"), env="doom", backend="vizdoom",
                                action_dim=3)
    cfg = tiny_config(tmp_path)
    with pytest.raises(WmlabError, match="no episodes.*wmlab collect"):
        train_vae(cfg, progress=False)
    make_store(tmp_path / "store", episodes=1, steps=3)
    manifest = tmp_path / "store" / "store.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "frame_shape": [96, 96, 3]}))
    with pytest.raises(WmlabError, match=r"shape \(96, 96, 3\)"):
        train_vae(cfg, progress=False)
    assert not os.path.exists(RunLayout.of(cfg).vision)


def test_resume_with_another_model_or_data_order_is_refused_without_damage(root):
    cfg = tiny_config(root, "changed")
    train_vae(cfg, progress=False, stop_after_steps=4)
    sidecar = Path(f"{RunLayout.of(cfg).vision}/train.json")
    before = sidecar.read_bytes()
    for change, message in [({"vae.z_dim": 16}, "vae.z_dim was 8, now 16"),
                            ({"vae.width": 16}, "vae.width was 32, now 16"),
                            ({"vae.kind": "vae-gan"}, "vae.kind was 'vae', now 'vae-gan'"),
                            ({"vae.batch_size": 8}, "batch_size was 16, now 8")]:
        with pytest.raises(WmlabError, match=message):
            train_vae(tiny_config(root, "changed", **change), progress=False)
    assert sidecar.read_bytes() == before
    # the unchanged config resumes
    assert train_vae(cfg, progress=False, stop_after_steps=5).resumed_from == 4


def test_encode_without_a_trained_v_says_what_to_run(root):
    with pytest.raises(WmlabError, match="no trained V.*wmlab train-vae"):
        encode_store(tiny_config(root, "never-trained"), progress=False)


# -- bounded memory ----------------------------------------------------------------------------


def test_loader_stays_within_its_allowance_on_a_store_ten_times_larger(tmp_path):
    allowance = 8 * MB
    store = make_store(tmp_path / "big", episodes=10, steps=700)  # 7,010 frames, 86 MB raw
    assert store.num_frames() * FRAME_BYTES > 10 * allowance
    pool_chunks = loader_pool_chunks(allowance, 16, 64, num_chunks=120)
    seen = 0
    tracemalloc.start()
    try:
        for batch in store.frame_batches(16, seed=0, pool_chunks=pool_chunks):
            seen += len(batch)
            del batch
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == store.num_frames()
    assert peak < allowance
    with pytest.raises(WmlabError, match="vae.loader_mb"):
        loader_pool_chunks(2 * MB, 16, 64)


# -- the CLI -------------------------------------------------------------------------------------


def test_cli_trains_and_encodes_end_to_end(tmp_path, capsys):
    make_store(tmp_path / "store", episodes=2, steps=20)
    sets = [arg for item in tiny_overrides(tmp_path, **{"vae.epochs": 1})
            for arg in ("--set", item)]
    assert main(["train-vae", "--preset", "doom", "--profile", "quick", "--run", "cli",
                 "--no-progress", *sets]) == 0
    out = capsys.readouterr().out
    assert "V trained: 1 epochs, 2 steps" in out and "validation loss" in out
    assert main(["encode", "--preset", "doom", "--profile", "quick", "--run", "cli",
                 "--no-progress", *sets]) == 0
    assert "encoded 2 episodes (42 frames)" in capsys.readouterr().out
    saved = (tmp_path / "cli" / "config.toml").read_text()
    for command in ("encode", "train-vae"):
        assert main([command, "--preset", "doom", "--profile", "quick", "--run", "cli",
                     "--no-progress", *sets, "--set", "vae.z_dim=4"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("wmlab: error:") and "z_dim" in err and "\n" not in err
    assert (tmp_path / "cli" / "config.toml").read_text() == saved  # refused: nothing changed


def test_benchmark_measures_a_peak_and_formats_its_rows():
    from wmlab.bench.vision import format_rows, peak_gflops

    assert peak_gflops("float32", size=128, seconds=0.05) > 0
    rows = [{"what": "train", "label": "plain", "frames_per_s": 400.0, "speedup": 1.0,
             "gflops": 92.0, "of_peak_fp32": 0.5, "peak_mb": 600.0, "val_loss": 150.0,
             "val_vs_fp32": 0.0, "steps": 10},
            {"what": "encode", "label": "encode", "frames": 100, "frames_per_s": 3000.0,
             "peak_mb": 500.0},
            {"what": "memory", "store_mb": 240.0, "allowance_mb": 24.0,
             "loader_peak_mb": 20.0, "peak_mb": 700.0, "frames_per_s": 300.0},
            {"what": "peak", "fp32_gflops": 184.0, "bf16_gflops": 400.0, "threads": 2,
             "load": 1.0}]
    text = format_rows(rows)
    assert "plain" in text and "3000" in text and "allowance 24 MB" in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_benchmark_peak_on_a_gpu_waits_for_the_gpu():
    from wmlab.bench.vision import peak_gflops

    # an 8192^3 fp32 product takes milliseconds on any GPU: a rate above 10^6 GFLOP/s would
    # mean the clock stopped before the GPU finished
    assert 0 < peak_gflops("float32", seconds=0.2, device="cuda") < 1e6


def test_benchmark_counts_the_arithmetic_of_each_width():
    from wmlab.bench.vision import GFLOP_PER_FRAME, training_gflop_per_frame

    assert training_gflop_per_frame(32) == pytest.approx(GFLOP_PER_FRAME, rel=0.02)
    # halving every layer's channels quarters the convolutions' arithmetic
    assert 0.25 < training_gflop_per_frame(16) / training_gflop_per_frame(32) < 0.3


def test_bf16_falls_back_to_fp32_where_the_cpu_would_emulate_it(root, monkeypatch):
    """bf16 autocast on a CPU without native bf16 ran a V step 6.6x slower than fp32 (AVX2
    EPYC): the trainer then trains in fp32 and says why, and keeps bf16 where it is native."""
    from wmlab.vision import train as vision_train

    messages: list[str] = []
    cfg = tiny_config(root, "bf16", **{"vae.bf16": True})
    monkeypatch.setattr("wmlab.device.bf16_is_native", lambda device: False)
    trainer = vision_train.build_trainer(cfg, torch.device("cpu"), log=messages.append)
    assert trainer.bf16 is False
    assert len(messages) == 1 and "fp32" in messages[0] and "bf16" in messages[0]
    monkeypatch.setattr("wmlab.device.bf16_is_native", lambda device: True)
    messages.clear()
    assert vision_train.build_trainer(cfg, torch.device("cpu"), log=messages.append).bf16
    assert not messages
    # fp32 asked: nothing to say whatever the hardware
    plain = tiny_config(root, "fp32", **{"vae.bf16": False})
    assert not vision_train.build_trainer(plain, torch.device("cpu"), log=messages.append).bf16
    assert not messages


def test_batched_encoder_cuts_full_batches_across_episodes():
    """Every batch but the last is full, whatever the episode lengths, and each episode gets
    back exactly its own frames' codes, in order."""
    from types import SimpleNamespace

    from wmlab.vision.encode import BatchedEncoder

    sizes: list[int] = []

    def encode(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sizes.append(len(frames))
        values = frames.reshape(len(frames), -1)[:, :2].astype(np.float32)
        return values, -values

    lengths = [5, 1, 17, 8, 8, 3, 31]  # 73 frames: nine full batches and one
    episodes = []
    for i, length in enumerate(lengths):
        frames = np.zeros((length, 64, 64, 3), np.uint8)
        frames[:, 0, 0, 0] = i  # which episode
        frames[:, 0, 0, 1] = np.arange(length)  # which frame
        episodes.append(SimpleNamespace(frames=frames))
    encoder = BatchedEncoder(encode, batch=8)
    returned = []
    for i, episode in enumerate(episodes):
        returned += encoder.add(f"ep{i}", episode)
        encoded = sum(lengths[:i + 1]) // 8 * 8  # frames in full batches so far
        assert sum(len(e.frames) for _, e, _, _ in returned) <= encoded
        assert len(returned) == sum(1 for n in np.cumsum(lengths[:i + 1]) if n <= encoded)
    returned += encoder.flush()
    assert [key for key, _, _, _ in returned] == [f"ep{i}" for i in range(len(lengths))]
    assert sizes == [8] * 9 + [1]
    for i, (_, _, mu, logvar) in enumerate(returned):
        assert mu.shape == (lengths[i], 2) and np.array_equal(logvar, -mu)
        assert (mu[:, 0] == i).all() and np.array_equal(mu[:, 1], np.arange(lengths[i]))


def test_salient_error_counts_only_what_differs_from_the_mean_frame():
    """A V that draws the mean frame (walls and floor) has no background error but all of the
    salient error, one that copies the frame has neither."""
    from wmlab.vision.evaluation import salient_error_sums

    mean_frame = torch.full((3, 8, 8), 0.5)
    x = mean_frame.expand(4, 3, 8, 8).clone()
    x[:, :, 2:4, 2:4] = 1.0  # a monster: 4 pixels of 64 in every frame
    x[:, :, 6, 6] = 0.55  # a shade within the threshold: not salient
    drawn_walls = mean_frame.expand(4, 3, 8, 8)
    sums = salient_error_sums(x, drawn_walls, mean_frame)
    assert sums["salient"] == 4 * 3 * 4 and sums["background"] == 4 * 3 * 60
    assert sums["salient_error"] == pytest.approx(4 * 3 * 4 * 0.25)
    assert sums["background_error"] == pytest.approx(4 * 3 * 0.05 ** 2)
    copied = salient_error_sums(x, x, mean_frame)
    assert copied["salient_error"] == 0.0 and copied["background_error"] == 0.0
