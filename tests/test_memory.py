"""M: the MDN-RNN, its losses, tau sampling, the training regimes, resume and bad input."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch

from wmlab.checkpoint import load_checkpoint, save_checkpoint
from wmlab.config import load_config
from wmlab.data.series import Series, SeriesStore
from wmlab.device import bf16_is_native
from wmlab.errors import WmlabError
from wmlab.memory.data import episode_batch, locate_chunk, plan_streams, stream_batch
from wmlab.memory.evaluation import return_tracking
from wmlab.memory.model import (
    FINAL_WEIGHTS,
    MDNRNN,
    MdrnnOutput,
    MdrnnShape,
    count_parameters,
    done_loss,
    load_initial_z,
    load_mdrnn,
    mixture_nll,
    sample_next_z,
)
from wmlab.memory.scan import lstm_scan
from wmlab.memory.train import SeriesSet, train_mdrnn
from wmlab.runs import RunLayout

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Synthetic series: latents that follow the actions, so M has something to learn


def make_series(count: int, length: int | list[int], z_dim: int = 4, action_dim: int = 1,
                seed: int = 0, done_at_end: bool = True) -> list[Series]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        n = length[i] if isinstance(length, list) else length
        actions = rng.uniform(-1, 1, (n, action_dim)).astype(np.float32)
        mu = np.zeros((n + 1, z_dim), np.float32)
        mu[0] = rng.normal(size=z_dim)
        for t in range(n):
            mu[t + 1] = 0.8 * mu[t] + 0.5 * actions[t, 0]
        logvar = np.full((n + 1, z_dim), -4.0, np.float32)
        dones = np.zeros(n, bool)
        dones[-1:] = done_at_end
        rewards = actions[:, 0].copy()  # reward readable from the action: learnable
        out.append(Series(f"ep{i:04d}", mu.astype(np.float16), logvar.astype(np.float16),
                          actions, rewards, dones))
    return out


def tiny_config(tmp_path, preset: str = "doom", **mdrnn):
    overrides = [f"run.root={json.dumps(str(tmp_path))}", "run.name=\"t\"", "run.device=\"cpu\"",
                 "vae.z_dim=4", "mdrnn.hidden=8", "mdrnn.batch_size=4", "mdrnn.seq_len=10",
                 "mdrnn.steps=6", "mdrnn.checkpoint_every=2", "mdrnn.calibration_episodes=4",
                 "dream.max_steps=20"]
    overrides += [f"mdrnn.{k}={json.dumps(v)}" for k, v in mdrnn.items()]
    return load_config(preset, "quick", overrides)


def random_output(shape=(2, 3), z=4, k=5, seed=0) -> MdrnnOutput:
    g = torch.Generator().manual_seed(seed)
    return MdrnnOutput(logits=torch.randn(*shape, z, k, generator=g),
                       means=torch.randn(*shape, z, k, generator=g),
                       log_sigmas=0.5 * torch.randn(*shape, z, k, generator=g),
                       done_logit=None, reward=None)


# ---------------------------------------------------------------------------------------------
# The model


def test_parameter_counts_match_the_paper():
    carracing = MDNRNN(MdrnnShape(z_dim=32, action_dim=3, hidden=256))
    doom = MDNRNN(MdrnnShape(z_dim=64, action_dim=1, hidden=512, done_head=True,
                             restart_input=True))
    # PyTorch's two LSTM bias vectors; the original's single-bias form has 4H fewer
    assert count_parameters(carracing) == 423_392
    assert count_parameters(carracing) - 4 * 256 == 422_368
    assert count_parameters(doom) == 1_680_833
    assert count_parameters(doom) - 4 * 512 == 1_678_785
    assert doom.shape.output_size == 961


def test_mixture_nll_equals_the_density_formula():
    for seed in range(3):
        out = random_output(seed=seed)
        target = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(100 + seed))
        direct = []
        for idx in np.ndindex(2, 3, 4):
            logits = out.logits[idx].double()
            w = torch.exp(logits) / torch.exp(logits).sum()
            mu, sigma = out.means[idx].double(), torch.exp(out.log_sigmas[idx].double())
            y = float(target[idx])
            density = (w * torch.exp(-0.5 * ((y - mu) / sigma) ** 2)
                       / (sigma * math.sqrt(2 * math.pi))).sum()
            direct.append(-math.log(float(density)))
        assert float(mixture_nll(out, target)) == pytest.approx(np.mean(direct), rel=1e-5)
        mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
        masked = np.asarray(direct).reshape(2, 3, 4)[mask.numpy() > 0].mean()
        assert float(mixture_nll(out, target, mask)) == pytest.approx(masked, rel=1e-5)


def _one_dim_mixture(logits, means, sigmas) -> MdrnnOutput:
    n = 1
    def rep(v):
        return torch.tensor(v, dtype=torch.float32).expand(n, 1, len(v)).clone()
    return MdrnnOutput(rep(logits), rep(means), torch.log(rep(sigmas)), None, None)


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_samples_match_the_tempered_mixture(tau):
    logits, means, sigmas = [0.0, 1.0, -0.5], [-2.0, 1.0, 4.0], [0.5, 0.3, 1.0]
    out = _one_dim_mixture(logits, means, sigmas)
    count = 200_000
    big = MdrnnOutput(*(v.expand(count, 1, 3) for v in (out.logits, out.means,
                                                         out.log_sigmas)), None, None)
    samples = sample_next_z(big, tau, torch.Generator().manual_seed(1)).double().numpy()[:, 0]
    # the spec: logits / tau for the component, noise scaled by sqrt(tau)
    w = np.exp(np.array(logits) / tau)
    w /= w.sum()
    mu, var = np.array(means), np.array(sigmas) ** 2 * tau
    mean = (w * mu).sum()
    variance = (w * (var + mu ** 2)).sum() - mean ** 2
    assert samples.mean() == pytest.approx(mean, abs=4 * math.sqrt(variance / count))
    assert samples.var() == pytest.approx(variance, rel=0.02)
    # the whole distribution: empirical CDF against the tempered mixture's CDF
    for x in (-2.5, -1.0, 0.5, 1.2, 3.0, 5.0):
        cdf = sum(wk * 0.5 * (1 + math.erf((x - mk) / math.sqrt(2 * vk)))
                  for wk, mk, vk in zip(w, mu, var, strict=True))
        assert (samples < x).mean() == pytest.approx(cdf, abs=0.005)


def test_sampling_refuses_a_non_positive_tau():
    out = random_output()
    for tau in (0.0, -1.0, float("nan")):
        with pytest.raises(WmlabError, match="tau"):
            sample_next_z(out, tau)


def test_restart_flag_zeroes_the_state():
    torch.manual_seed(0)
    model = MDNRNN(MdrnnShape(z_dim=3, action_dim=2, hidden=6, done_head=True,
                              restart_input=True))
    z, a = torch.randn(2, 9, 3), torch.randn(2, 9, 2)
    restart = torch.zeros(2, 9)
    restart[0, 5] = 1.0
    _, hidden, _ = model(z, a, restart=restart)
    # the steps from the restart on equal a fresh run of the suffix from a zero state
    fresh_restart = torch.zeros(1, 4)
    fresh_restart[0, 0] = 1.0
    _, fresh, _ = model(z[:1, 5:], a[:1, 5:], restart=fresh_restart)
    assert torch.allclose(hidden[0, 5:], fresh[0], atol=1e-6)
    # a random non-zero carried state is wiped by the flag too
    state = (torch.randn(1, 1, 6), torch.randn(1, 1, 6))
    _, wiped, _ = model(z[:1, 5:], a[:1, 5:], restart=fresh_restart, state=state)
    assert torch.allclose(wiped, fresh, atol=1e-6)
    # the other row, without a restart, does not match its own fresh suffix
    _, other, _ = model(z[1:, 5:], a[1:, 5:], restart=fresh_restart)
    assert not torch.allclose(hidden[1, 5:], other[0], atol=1e-3)


def test_weighted_done_loss():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    target = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    p = torch.sigmoid(logits)
    manual = -(10 * target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    assert float(done_loss(logits, target, 10.0)) == pytest.approx(float(manual), rel=1e-6)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    manual_masked = -(10 * torch.log(p[0, 0]) + torch.log(1 - p[0, 1])) / 2
    assert float(done_loss(logits, target, 10.0, mask)) == pytest.approx(
        float(manual_masked), rel=1e-6)
    # the weight makes a missed death cost 10x a false alarm of the same confidence
    miss = done_loss(torch.tensor([-2.0]), torch.tensor([1.0]), 10.0)
    alarm = done_loss(torch.tensor([2.0]), torch.tensor([0.0]), 10.0)
    assert float(miss) == pytest.approx(10 * float(alarm), rel=1e-6)


def test_carried_state_across_chunks_equals_one_long_unroll():
    torch.manual_seed(1)
    model = MDNRNN(MdrnnShape(z_dim=3, action_dim=1, hidden=5, done_head=True,
                              restart_input=True))
    z, a = torch.randn(2, 12, 3), torch.randn(2, 12, 1)
    restart = torch.zeros(2, 12)
    restart[:, 0], restart[1, 7] = 1.0, 1.0
    whole, hidden_whole, _ = model(z, a, restart=restart)
    state, pieces = None, []
    for lo in range(0, 12, 4):
        _, hidden, state = model(z[:, lo:lo + 4], a[:, lo:lo + 4], restart=restart[:, lo:lo + 4],
                                 state=state)
        pieces.append(hidden)
    assert torch.allclose(torch.cat(pieces, 1), hidden_whole, atol=1e-6)


def test_one_step_at_a_time_equals_the_unroll():
    """Single steps (how an agent in an env advances M) run in the LSTM cell, not the fused
    LSTM: the same states, restarts honoured, gradients through it."""
    torch.manual_seed(2)
    model = MDNRNN(MdrnnShape(z_dim=3, action_dim=1, hidden=5, done_head=True,
                              restart_input=True))
    z, a = torch.randn(3, 9, 3), torch.randn(3, 9, 1)
    restart = torch.zeros(3, 9)
    restart[:, 0], restart[1, 4], restart[2, 8] = 1.0, 1.0, 1.0
    whole, hidden_whole, (h_end, c_end) = model(z, a, restart=restart)
    state, steps = (torch.randn(1, 3, 5), torch.randn(1, 3, 5)), []  # wiped by the restart
    for t in range(9):
        out, hidden, state = model(z[:, t:t + 1], a[:, t:t + 1], restart=restart[:, t:t + 1],
                                   state=state)
        steps.append(hidden)
        assert torch.allclose(out.means, whole.means[:, t:t + 1], atol=1e-6)
    assert torch.allclose(torch.cat(steps, 1), hidden_whole, atol=1e-6)
    assert torch.allclose(state[0], h_end, atol=1e-6) and torch.allclose(state[1], c_end,
                                                                         atol=1e-6)
    state[1].sum().backward()
    assert model.lstm.weight_hh_l0.grad.abs().sum() > 0


def _lstm_loop(lstm: torch.nn.LSTM, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
               keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LSTM as a plain autograd loop that zeroes the state where ``keep`` is 0: the
    reference for the recurrence with resets."""
    bias = lstm.bias_ih_l0 + lstm.bias_hh_l0
    hs = []
    for t in range(x.shape[1]):
        h, c = h * keep[:, t:t + 1], c * keep[:, t:t + 1]
        gates = x[:, t] @ lstm.weight_ih_l0.T + h @ lstm.weight_hh_l0.T + bias
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        hs.append(h)
    return torch.stack(hs, 1), h, c


def test_scan_gradients_match_pytorch_lstm_and_a_reference_loop():
    torch.manual_seed(2)
    lstm = torch.nn.LSTM(3, 4, batch_first=True).double()
    x = torch.randn(2, 6, 3, dtype=torch.double, requires_grad=True)
    h0 = torch.randn(2, 4, dtype=torch.double)
    c0 = torch.randn(2, 4, dtype=torch.double)
    bias = lstm.bias_ih_l0 + lstm.bias_hh_l0
    out, h, c = lstm_scan(x, lstm.weight_ih_l0, lstm.weight_hh_l0, bias, h0, c0,
                          torch.ones(2, 6, dtype=torch.double))
    ref, (hr, cr) = lstm(x, (h0[None], c0[None]))
    assert torch.allclose(out, ref) and torch.allclose(h, hr[0]) and torch.allclose(c, cr[0])
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum() + h.sum() + 2 * c.sum(),
                                [x, lstm.weight_hh_l0, lstm.weight_ih_l0])
    grads_ref = torch.autograd.grad((ref * weights).sum() + hr.sum() + 2 * cr.sum(),
                                    [x, lstm.weight_hh_l0, lstm.weight_ih_l0])
    for mine, theirs in zip(grads, grads_ref, strict=True):
        assert torch.allclose(mine, theirs, atol=1e-10)
    # with resets: gradients agree with a plain autograd loop that zeroes the state
    keep = torch.ones(2, 6, dtype=torch.double)
    keep[0, 2], keep[1, 4] = 0.0, 0.0

    out2, h2, c2 = lstm_scan(x, lstm.weight_ih_l0, lstm.weight_hh_l0, bias, h0, c0, keep)
    out3, h3, c3 = _lstm_loop(lstm, x, h0, c0, keep)
    assert torch.allclose(out2, out3)
    g2 = torch.autograd.grad((out2 * weights).sum() + c2.sum(), [x, lstm.weight_hh_l0])
    g3 = torch.autograd.grad((out3 * weights).sum() + c3.sum(), [x, lstm.weight_hh_l0])
    for mine, theirs in zip(g2, g3, strict=True):
        assert torch.allclose(mine, theirs, atol=1e-10)


def _reset_batch(device: str = "cpu", dtype: torch.dtype = torch.double):
    """A Doom-shaped M and a batch with resets at the start, mid-row, twice in one row, at
    the last step and on two steps in a row, from a carried (non-zero) state; drawn on the
    CPU (the same numbers for every device), then moved to ``device``."""
    torch.manual_seed(3)
    shape = MdrnnShape(z_dim=6, action_dim=1, hidden=16, done_head=True, restart_input=True)
    model = MDNRNN(shape).to(device, dtype)
    z, actions = torch.randn(5, 23, 6), torch.randn(5, 23, 1)
    restart = torch.zeros(5, 23)
    for row, step in [(0, 0), (1, 7), (1, 15), (2, 22), (3, 0), (3, 1)]:
        restart[row, step] = 1.0
    state = (torch.randn(1, 5, 16), torch.randn(1, 5, 16))
    z, actions, restart, *state = (t.to(device, dtype) for t in (z, actions, restart, *state))
    return model, z, actions, restart, tuple(state)


def test_the_packed_pieces_lstm_equals_a_loop_that_zeroes_the_state():
    """``segments_lstm`` (a GPU's path for batches with resets: cuDNN over the pieces
    between resets) computes the recurrence with its resets, gradients included, as a plain
    autograd loop does, and what ``lstm_scan`` (whose tanh is approximated) computes."""
    model, z, actions, restart, state = _reset_batch()
    x = torch.cat([z, actions, restart.unsqueeze(-1)], -1).requires_grad_()
    keep = 1.0 - restart
    lstm = model.lstm
    bias = lstm.bias_ih_l0 + lstm.bias_hh_l0
    pieces, (h_p, c_p) = model.segments_lstm(x, keep, state)
    ref, h_r, c_r = _lstm_loop(lstm, x, state[0][0], state[1][0], keep)
    assert torch.allclose(pieces, ref, atol=1e-12) and torch.allclose(h_p[0], h_r, atol=1e-12)
    assert torch.allclose(c_p[0], c_r, atol=1e-12)
    weights = torch.randn_like(ref)
    wanted = [x, lstm.weight_hh_l0, lstm.weight_ih_l0, lstm.bias_hh_l0]
    mine = torch.autograd.grad((pieces * weights).sum() + h_p.sum() + 2 * c_p.sum(), wanted)
    theirs = torch.autograd.grad((ref * weights).sum() + h_r.sum() + 2 * c_r.sum(), wanted)
    for a, b in zip(mine, theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-10)
    scan, _, _ = lstm_scan(x, lstm.weight_ih_l0, lstm.weight_hh_l0, bias, state[0][0],
                           state[1][0], keep)
    assert torch.allclose(pieces, scan, atol=1e-6)
    # a carried state reaches only the rows that do not restart at their first step
    zeros = tuple(torch.zeros_like(t) for t in state)
    from_zeros = model.segments_lstm(x, keep, zeros)[0]
    assert not torch.allclose(pieces[1, 0], from_zeros[1, 0])
    assert torch.equal(pieces[0], from_zeros[0]) and torch.equal(pieces[3], from_zeros[3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_m_on_a_gpu_takes_the_packed_pieces_and_agrees_with_the_cpu():
    model, z, actions, restart, state = _reset_batch(dtype=torch.float32)
    out_cpu, hidden_cpu, (h_cpu, _) = model(z, actions, restart=restart, state=state)
    model, z, actions, restart, state = _reset_batch("cuda", torch.float32)
    out_gpu, hidden_gpu, (h_gpu, _) = model(z, actions, restart=restart, state=state)
    # cuDNN's LSTM multiplies in TF32 (PyTorch's default for cuDNN): ~1e-4 here
    assert torch.allclose(hidden_gpu.cpu(), hidden_cpu, atol=1e-3)
    assert torch.allclose(h_gpu.cpu(), h_cpu, atol=1e-3)
    assert torch.allclose(out_gpu.head.cpu(), out_cpu.head, atol=1e-3)
    # and exactly the CPU's arithmetic with TF32 off
    torch.backends.cudnn.allow_tf32 = False
    try:
        hidden_exact = model(z, actions, restart=restart, state=state)[1]
    finally:
        torch.backends.cudnn.allow_tf32 = True
    assert torch.allclose(hidden_exact.cpu(), hidden_cpu, atol=1e-5)


def test_scan_in_bf16_rounds_only_the_recurrent_products():
    """matmul_dtype=bfloat16 (mdrnn.bf16) changes the result by bf16 rounding, no more, in
    the outputs and in every gradient, with resets mid-sequence."""
    torch.manual_seed(4)
    lstm = torch.nn.LSTM(66, 512, batch_first=True)
    x = torch.randn(8, 40, 66, requires_grad=True)
    h0, c0 = torch.randn(8, 512) * 0.1, torch.randn(8, 512) * 0.1
    keep = torch.ones(8, 40)
    keep[torch.arange(8), torch.randint(1, 40, (8,))] = 0.0
    bias = lstm.bias_ih_l0 + lstm.bias_hh_l0
    weights = torch.randn(8, 40, 512)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        out, h, c = lstm_scan(x, lstm.weight_ih_l0, lstm.weight_hh_l0, bias, h0, c0, keep,
                              dtype)
        assert out.dtype == h.dtype == c.dtype == torch.float32
        grads = torch.autograd.grad((out * weights).sum() + c.sum(),
                                    [x, lstm.weight_hh_l0, lstm.weight_ih_l0])
        results.append((out, grads))
    (out32, g32), (out16, g16) = results
    difference = (out16 - out32).abs().max()
    assert 0 < difference < 0.05  # the products were rounded, and only by bf16's precision
    for mine, full in zip(g16, g32, strict=True):
        assert torch.nn.functional.cosine_similarity(mine.flatten(), full.flatten(), dim=0) > 0.99


# ---------------------------------------------------------------------------------------------
# The regimes


def test_stream_chunks_concatenate_to_the_streams():
    series = make_series(7, [13, 9, 21, 8, 15, 11, 10])
    plan = plan_streams(series, batch_size=2, seq_len=5, seed=0, epoch=0)
    chunks = [stream_batch(series, plan, k, 5) for k in range(plan.chunks)]
    assert chunks[0].new_streams and not any(c.new_streams for c in chunks[1:])
    for row, episodes in enumerate(plan.order):
        actions = np.concatenate([series[i].actions for i in episodes])
        joined = torch.cat([c.actions[row] for c in chunks]).numpy()
        assert np.array_equal(joined, actions[:len(joined)])
        # restart flags exactly at each episode's first step; targets never cross episodes
        starts = np.cumsum([0] + [series[i].length for i in episodes])[:-1]
        flags = torch.cat([c.restart[row] for c in chunks]).numpy()
        assert set(np.flatnonzero(flags)) == {s for s in starts if s < len(flags)}
        first = series[episodes[0]]
        mu = torch.cat([c.mu[row] for c in chunks])
        assert np.allclose(mu[first.length - 1, 1].numpy(), first.mu[first.length])
    # epochs re-plan; a resumed walk finds the same chunk
    plan5, chunk5 = locate_chunk(series, 2, 5, 0, step=plan.chunks + 1)
    assert plan5.epoch == 1 and chunk5 == 1


def test_episode_batches_are_a_function_of_seed_and_step():
    series = make_series(5, [30, 12, 25, 40, 8])
    a = episode_batch(series, 4, 20, seed=3, step=7)
    b = episode_batch(series, 4, 20, seed=3, step=7)
    c = episode_batch(series, 4, 20, seed=3, step=8)
    assert torch.equal(a.mu, b.mu) and not torch.equal(a.mu, c.mu)
    assert a.mu.shape[:2] == (4, 20) and float(a.restart[:, 0].min()) == 1.0


# ---------------------------------------------------------------------------------------------
# Training: resume, learning, bad input, the CLI


def _weights(cfg) -> dict[str, torch.Tensor]:
    return load_checkpoint(RunLayout.of(cfg).memory, FINAL_WEIGHTS, with_state=False).weights


@pytest.mark.parametrize("regime", ["streams", "episodes"])
def test_resume_equals_an_uninterrupted_run(tmp_path, regime):
    series = make_series(10, [23, 31, 17, 40, 26, 19, 35, 22, 28, 30])
    data = SeriesSet(series[:8], series[8:])
    straight = tiny_config(tmp_path / "a", regime=regime)
    train_mdrnn(straight, progress=False, series=data)
    broken = tiny_config(tmp_path / "b", regime=regime)
    first = train_mdrnn(broken, progress=False, series=data, stop_after_steps=3)
    assert not first.finished and first.steps == 3
    second = train_mdrnn(broken, progress=False, series=data)
    assert second.resumed_from == 3 and second.finished
    a, b = _weights(straight), _weights(broken)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_learns_and_the_reward_head_tracks_returns(tmp_path):
    series = make_series(40, 30, seed=5)
    cfg = tiny_config(tmp_path, preset="carracing", regime="episodes", seq_len=29, steps=300,
                      batch_size=8, hidden=16, lr=0.003, reward_head=True, done_head=True,
                      calibration_episodes=0)
    losses = []
    result = train_mdrnn(cfg, progress=False, series=SeriesSet(series[:32], series[32:]),
                         on_step=lambda step, parts: losses.append(parts["z_nll"]))
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    model, _ = load_mdrnn(RunLayout.of(cfg).memory)
    tracking = return_tracking(model, series[32:])
    assert tracking["return_correlation"] > 0.8
    assert "return_correlation" in result.history[-1]
    assert result.history[-1]["done_recall"] >= 0.0


@pytest.mark.skipif(not bf16_is_native(torch.device("cpu")),
                    reason="oneDNN runs no bf16 LSTM on this CPU (no AVX-512); mdrnn.bf16 falls "
                    "back to float32 here")
def test_bf16_step_matches_float32_and_bf16_training_learns(tmp_path, monkeypatch):
    """mdrnn.bf16: the LSTM and head under bf16 autocast give the float32 loss and
    gradients to bf16 rounding (with and without resets mid-sequence), and train as well."""
    from wmlab.memory.data import SeriesBatch
    from wmlab.memory.evaluation import batch_losses

    # Doom's sizes: at these, oneDNN's linear (the scan's input projection) runs in bf16
    # under autocast, which the scan's float32 backward must not see
    model = MDNRNN(MdrnnShape(z_dim=64, action_dim=1, hidden=512, done_head=True,
                              restart_input=True))
    for resets in (False, True):
        batch = episode_batch(make_series(6, 30, z_dim=64, seed=3), 4, 20, seed=1, step=0)
        if resets:  # a restart after the first step takes the scan path
            restart = batch.restart.clone()
            restart[1, 7] = 1.0
            batch = SeriesBatch(**{**batch.__dict__, "restart": restart})
        z_in, z_next = batch.sample_z(torch.Generator().manual_seed(0))
        if resets:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, hidden, _ = model(z_in, batch.actions, restart=batch.restart)
            assert hidden.dtype == torch.float32  # bf16 products, float32 states
        results = []
        for bf16 in (False, True):
            model.zero_grad()
            loss, _, state = batch_losses(model, batch, z_in, z_next, 10.0, None, bf16)
            loss.backward()
            assert state[0].dtype == torch.float32  # the carried state stays float32
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])
            results.append((float(loss.detach()), grads))
        (loss32, g32), (loss16, g16) = results
        assert loss16 == pytest.approx(loss32, rel=0.02)
        assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.98
    series = make_series(40, 30, seed=5)
    cfg = tiny_config(tmp_path, regime="episodes", seq_len=29, steps=200, batch_size=8,
                      hidden=16, lr=0.003, calibration_episodes=0, bf16=True)
    monkeypatch.setattr("wmlab.memory.train.resolve_bf16", lambda requested, device: requested)
    losses = []
    train_mdrnn(cfg, progress=False, series=SeriesSet(series[:32], series[32:]),
                on_step=lambda step, parts: losses.append(parts["z_nll"]))
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])


@pytest.mark.parametrize("parts", [2, 3])
def test_a_batch_split_over_threads_has_the_whole_batchs_gradient(parts):
    """mdrnn.batch_parts: row groups run in parallel threads; each group's loss weighted by
    its share of the real (unpadded) steps, their gradients sum to the single pass's, and
    the loss parts and the carried state are the single pass's too."""
    from wmlab.memory.data import SeriesBatch
    from wmlab.memory.train import BatchBackward

    torch.manual_seed(0)
    model = MDNRNN(MdrnnShape(z_dim=4, action_dim=1, hidden=16, done_head=True,
                              reward_head=True, restart_input=True))
    # episodes of unequal length: the groups hold different numbers of real steps
    series = make_series(7, [9, 30, 14, 25, 6, 30, 18], seed=2)
    batch = episode_batch(series, 7, 24, seed=0, step=0)
    restart = batch.restart.clone()
    restart[2, 5] = 1.0  # a reset mid-sequence in one group only: the scan path there
    batch = SeriesBatch(**{**batch.__dict__, "restart": restart})
    assert float(batch.mask.sum()) < batch.mask.numel()
    z_in, z_next = batch.sample_z(torch.Generator().manual_seed(1))
    state = (torch.randn(1, 7, 16), torch.randn(1, 7, 16))
    results = []
    for backward in (BatchBackward(1), BatchBackward(parts, threads=parts)):
        model.zero_grad(set_to_none=True)
        loss_parts, state_out = backward(model, batch, z_in, z_next, 10.0, state)
        backward.close()
        results.append((loss_parts, state_out,
                        torch.cat([p.grad.flatten() for p in model.parameters()])))
    (one, state1, g1), (split, state2, g2) = results
    assert one.keys() == split.keys()
    for key in one:
        assert split[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    assert torch.allclose(state1[0], state2[0], atol=1e-6)
    assert torch.allclose(state1[1], state2[1], atol=1e-6)
    assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-6)
    # a weighting error (e.g. a plain mean of the group losses) would move the gradient
    # by far more than float rounding
    assert float((g1 - g2).abs().max()) < 1e-3 * float(g1.abs().max())


def test_batches_split_automatically_only_where_it_pays():
    from wmlab.memory.train import batch_parts

    cpu = torch.device("cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert batch_parts(0, cpu, 32, "streams") == 2  # the scan's small products
        assert batch_parts(0, cpu, 32, "episodes") == 1  # oneDNN's fused LSTM: not split
        assert batch_parts(0, cpu, 1, "streams") == 1
        assert batch_parts(3, cpu, 32, "episodes") == 3  # asked for: done as asked
        assert batch_parts(0, torch.device("cuda"), 32, "streams") == 1
        torch.set_num_threads(1)
        assert batch_parts(0, cpu, 32, "streams") == 1
    finally:
        torch.set_num_threads(before)


def test_training_with_split_batches_follows_the_single_pass(tmp_path):
    series = make_series(10, [23, 31, 17, 40, 26, 19, 35, 22, 28, 30])
    data = SeriesSet(series[:8], series[8:])
    weights, losses = [], []
    for parts in (1, 2):
        cfg = tiny_config(tmp_path / f"p{parts}", regime="streams", batch_parts=parts)
        curve: list[float] = []
        train_mdrnn(cfg, progress=False, series=data,
                    on_step=lambda step, parts, curve=curve: curve.append(parts["loss"]))
        weights.append(_weights(cfg))
        losses.append(curve)
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    a, b = weights
    # Adam divides by the gradient's running size, so float rounding in near-zero gradient
    # entries moves a weight by up to ~1e-4 over these six steps of lr 1e-3
    assert all(torch.allclose(a[k], b[k], atol=2e-4) for k in a)


def test_bad_series_are_refused_before_anything_is_written(tmp_path):
    cfg = tiny_config(tmp_path, regime="episodes", seq_len=50)
    with pytest.raises(WmlabError, match="shorter than mdrnn.seq_len"):
        train_mdrnn(cfg, progress=False, series=SeriesSet(make_series(4, 20), []))
    cfg = tiny_config(tmp_path, regime="streams", seq_len=10, batch_size=4)
    with pytest.raises(WmlabError, match="streams"):
        train_mdrnn(cfg, progress=False, series=SeriesSet(make_series(3, 12), []))
    empty = make_series(3, [20, 0, 20])
    with pytest.raises(WmlabError, match="no steps"):
        train_mdrnn(cfg, progress=False, series=SeriesSet(empty, []))
    with pytest.raises(WmlabError, match="z of size 6"):
        train_mdrnn(cfg, progress=False, series=SeriesSet(make_series(8, 30, z_dim=6), []))
    with pytest.raises(WmlabError, match="no encoded series"):
        train_mdrnn(cfg, progress=False, series=SeriesSet([], []))
    zero_tau = load_config("doom", "quick", [f"run.root={json.dumps(str(tmp_path))}",
                                              "run.name=\"t\"", "vae.z_dim=4", "dream.tau=0",
                                              "mdrnn.seq_len=10", "mdrnn.batch_size=4"])
    with pytest.raises(WmlabError, match="tau"):  # refused now, not after training
        train_mdrnn(zero_tau, progress=False, series=SeriesSet(make_series(8, 30), []))
    assert not os.path.exists(tmp_path / "t")


def test_series_of_another_v_are_refused(tmp_path):
    cfg = tiny_config(tmp_path)
    save_checkpoint(f"{cfg.run_dir()}/vision", "vae", 1, {"w": torch.zeros(2)}, None,
                    {"z_dim": 4})
    before = sorted(os.listdir(cfg.run_dir()))
    data = SeriesSet(make_series(8, 30), [], fingerprint="0123456789abcdef")
    with pytest.raises(WmlabError, match="encoded by V 0123456789abcdef"):
        train_mdrnn(cfg, progress=False, series=data)
    assert sorted(os.listdir(cfg.run_dir())) == before


def test_later_iterations_train_on_earlier_data_only_where_asked(tmp_path):
    """mdrnn.earlier_data: iteration 3's M also reads iterations 1 and 2's series, each store
    split as its own; off, only its own; latents of another V are refused, naming the fix."""
    from wmlab.memory.train import load_series
    from wmlab.runs import prepare_run_dir

    def iteration(k: int, fingerprint: str = "feedfacecafebeef", **mdrnn):
        name = "t" if k == 1 else f"t/iterations/{k}"
        cfg = tiny_config(tmp_path, **mdrnn)
        cfg.run.name = name
        prepare_run_dir(cfg)
        store = SeriesStore(cfg.store_url(), fingerprint)
        for s in make_series(10, 12, seed=k):
            store.write(dataclasses.replace(s, episode_id=f"it{k}-{s.episode_id}"))
        store.mark_current({"z_dim": 4})
        return cfg

    first = iteration(1)
    iteration(2)
    third = iteration(3, earlier_data=True)

    def ids(data):
        return sorted(s.episode_id for s in data.train + data.val)

    assert ids(load_series(third)) == sorted(f"it{k}-ep{i:04d}" for k in (1, 2, 3)
                                             for i in range(10))
    first_val = {s.episode_id for s in load_series(first).val}
    assert first_val and first_val <= {s.episode_id for s in load_series(third).val}
    third.mdrnn.earlier_data = False
    assert ids(load_series(third)) == [f"it3-ep{i:04d}" for i in range(10)]
    iteration(2, fingerprint="0123456789abcdef")  # iteration 2 re-encoded by another V
    third.mdrnn.earlier_data = True
    with pytest.raises(WmlabError, match="encoded by V 0123456789abcdef.*vae.epochs = 0"):
        load_series(third)


def test_missing_initial_z_store_is_explained(tmp_path):
    with pytest.raises(WmlabError, match="initial-z"):
        load_initial_z(str(tmp_path / "memory"))


def test_train_mdrnn_cli_end_to_end(tmp_path, capsys):
    from wmlab.cli import main

    cfg = tiny_config(tmp_path)
    store = SeriesStore(cfg.store_url(), "feedfacecafebeef")
    for s in make_series(12, [25, 33, 18, 40, 22, 30, 27, 35, 20, 31, 26, 29]):
        store.write(s)
    store.mark_current({"z_dim": 4})
    args = ["train-mdrnn", "--preset", "doom", "--profile", "quick", "--run", "t",
            "--no-progress", "--steps", "6"]
    for item in ["run.root=" + json.dumps(str(tmp_path)), "run.device=\"cpu\"", "vae.z_dim=4",
                 "mdrnn.hidden=8", "mdrnn.batch_size=4", "mdrnn.seq_len=10",
                 "mdrnn.calibration_episodes=4", "dream.max_steps=20",
                 "mdrnn.calibration_real_episodes=2", "env.max_steps=30"]:
        args += ["--set", item]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "M trained to step 6" in out and "dream calibration" in out
    folder = tmp_path / "t" / "memory"
    for name in ("mdrnn.json", "initial_z.json", "metrics.csv", "calibration.json"):
        assert (folder / name).exists(), name
    report = json.loads((folder / "calibration.json").read_text())
    assert set(report["policies"]) == {"random", "noop", "left", "sweep"}
    assert all(1 <= p["survival_mean"] <= 20 for p in report["policies"].values())
    # the same reference policies ran in the real game (capped at env.max_steps)
    assert report["real_episodes"] == 2 and report["real_backend"] == "vizdoom"
    for row in report["policies"].values():
        assert 1 <= row["real_survival_mean"] <= 30
        assert row["survival_ratio"] == pytest.approx(row["survival_mean"]
                                                      / row["real_survival_mean"])
    assert len(load_initial_z(str(folder)).mu) > 0
    # a second run resumes at the end and changes nothing
    assert main(args) == 0
    assert "from 6" in capsys.readouterr().out
    # bad tau in the dream command: one line, exit 2
    assert main(["dream", "--preset", "doom", "--profile", "quick", "--run", "t", "--set",
                 "run.root=" + json.dumps(str(tmp_path)), "--tau", "0"]) == 2
    assert "tau" in capsys.readouterr().err


def test_resume_with_other_batching_is_refused(tmp_path):
    series = make_series(10, 30)
    data = SeriesSet(series[:8], series[8:])
    cfg = tiny_config(tmp_path)
    train_mdrnn(cfg, progress=False, series=data, stop_after_steps=2)
    other = tiny_config(tmp_path, seq_len=12)
    with pytest.raises(WmlabError, match="seq_len = 10, now 12"):
        train_mdrnn(other, progress=False, series=data)


def test_benchmark_cases_run_and_format():
    from wmlab.bench import memory as bench
    from wmlab.dream import DreamStart

    rows = bench._train_case("doom", batch=2, steps=4, repeats=1)
    bf16 = ["wmlab M, bf16 (mdrnn.bf16)"] if bench.bf16_is_native(
        torch.device("cpu")) else []  # timed only where bf16 is not emulated
    assert [r["case"] for r in rows] == ["plain nn.LSTM + Linear (naive)", "wmlab M", *bf16]
    assert all(r["steps_per_s"] > 0 and r["gflops"] > 0 for r in rows)
    for r in rows:
        r.update(vs_plain=1.0, peak_fraction=0.5, threads=1)
    # with two threads the training loop's split step is timed too
    two = bench._with_threads(2, lambda: bench._train_case("doom", batch=4, steps=3,
                                                           repeats=1))
    split = [r for r in two if "rows split over 2 threads" in r["case"]]
    assert split and all(r["steps_per_s"] > 0 for r in split)
    if bench.lstm_kernels() is not None:  # and the same step without the C kernels
        assert split[-1]["case"].endswith("PyTorch ops only (WMLAB_NATIVE=0)")
    model = MDNRNN(bench.SIZES["doom"]).eval()
    start = DreamStart(torch.zeros(2, 64), torch.zeros(2, 64))
    assert bench._dream_rate(model, start, 4, 2) > 0
    assert bench._single_loop_rate(model, start, 2, 2) > 0
    rows += [{"bench": "peak", "gflops": 100.0, "threads": 1},
             {"bench": "dream", "size": "doom", "case": "BatchedDream float32", "batch": 1024,
              "steps_per_s": 30000.0, "speedup": 30.0, "threads": 1}]
    text = bench.format_rows(rows)
    assert "wmlab M" in text and "30,000" in text and "100 GFLOP/s" in text
    assert bench.training_flops(bench.SIZES["carracing"], 1, 1) == 3 * 2 * (
        (35 + 256) * 1024 + 256 * 480)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_benchmark_cases_run_on_a_gpu():
    """`wmlab bench memory --device cuda`: the training cases (cuDNN's LSTM as the plain
    peer, no CPU-thread split) and the batched dream run on the GPU."""
    from wmlab.bench import memory as bench
    from wmlab.dream import DreamStart

    gpu = torch.device("cuda")
    rows = bench._train_case("carracing", batch=4, steps=8, repeats=1, device=gpu)
    assert rows[0]["case"] == "plain nn.LSTM + Linear (cuDNN)"
    assert not any("threads" in r["case"] for r in rows)
    assert all(r["steps_per_s"] > 0 for r in rows)
    model = MDNRNN(bench.SIZES["doom"]).to(gpu).eval()
    start = DreamStart(torch.zeros(2, 64), torch.zeros(2, 64))
    assert bench._dream_rate(model, start, 8, 2, device=gpu) > 0
    assert bench._dream_rate(model, start, 64, 2, "bfloat16", device=gpu) > 0
    assert bench.matmul_peak(device=gpu, repeats=1) > 0


def test_benchmark_device_is_refused_where_the_stage_runs_on_the_cpu(capsys):
    from wmlab.cli import main

    assert main(["bench", "collect", "--device", "cuda"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--device cuda applies to vision and memory only" in err and "\n" not in err


# ---------------------------------------------------------------------------------------------
# Dropout on h before M's head (mdrnn.dropout)


def test_dropout_acts_in_training_mode_only_and_never_on_the_state():
    shape = MdrnnShape(z_dim=4, action_dim=1, hidden=16, done_head=True, restart_input=True)
    torch.manual_seed(0)
    model = MDNRNN(shape, dropout=0.5)
    plain = MDNRNN(shape)
    plain.load_state_dict(model.state_dict())  # no parameters of its own: the same shapes
    z, actions = torch.randn(3, 12, 4), torch.randn(3, 12, 1)
    with torch.no_grad():
        (a, h_a, _), (b, h_b, _) = model(z, actions), model(z, actions)
        reference, h_ref, _ = plain(z, actions)
        # training mode: another mask each call, on the head's input only
        assert not torch.allclose(a.head, b.head, atol=1e-4)
        assert torch.equal(h_a, h_b) and torch.equal(h_a, h_ref)
        # a given mask: kept units scaled by 1/(1-p), the rest zeroed
        every = torch.ones(3, 12, 16, dtype=torch.bool)
        kept, _, _ = model(z, actions, dropout_mask=every)
        assert torch.allclose(kept.head, plain.read_out(2.0 * h_ref).head, atol=1e-5)
        none, _, _ = model(z, actions, dropout_mask=torch.zeros_like(every))
        assert torch.allclose(none.head, plain.head.bias.expand_as(none.head))
        model.eval()  # evaluation: no dropout, mask or not
        for out in (model(z, actions)[0], model(z, actions, dropout_mask=~every)[0]):
            assert torch.equal(out.head, reference.head)
    for p in (1.0, -0.1):
        with pytest.raises(WmlabError, match="dropout"):
            MDNRNN(shape, dropout=p)


def test_validation_losses_are_without_dropout(tmp_path):
    from wmlab.memory.evaluation import validate

    cfg = tiny_config(tmp_path, hidden=16)
    shape = MdrnnShape(z_dim=4, action_dim=1, hidden=16, done_head=True, restart_input=True)
    torch.manual_seed(0)
    model = MDNRNN(shape, dropout=0.5)
    plain = MDNRNN(shape)
    plain.load_state_dict(model.state_dict())
    val = make_series(6, 25, seed=4)
    first = validate(model, val, cfg, torch.device("cpu"))
    assert validate(model, val, cfg, torch.device("cpu")) == first
    assert validate(plain, val, cfg, torch.device("cpu")) == first
    assert model.training  # back to training, where dropout acts


def test_dropout_training_resumes_exactly_and_is_recorded(tmp_path):
    """The masks are functions of (seed, step): a killed run resumes bit for bit, a batch
    split over threads cuts the same mask, and M's checkpoint says its dropout."""
    series = make_series(10, [23, 31, 17, 40, 26, 19, 35, 22, 28, 30])
    data = SeriesSet(series[:8], series[8:])
    curves: dict[str, list[float]] = {}

    def train(name: str, stop: int | None = None, **mdrnn):
        cfg = tiny_config(tmp_path / name, regime="streams", **mdrnn)
        curve = curves.setdefault(name, [])
        train_mdrnn(cfg, progress=False, series=data, stop_after_steps=stop,
                    on_step=lambda step, parts: curve.append(parts["loss"]))
        return cfg

    straight = train("straight", dropout=0.3, batch_parts=1)
    broken = train("broken", stop=3, dropout=0.3, batch_parts=1)
    train("broken", dropout=0.3, batch_parts=1)
    a, b = _weights(straight), _weights(broken)
    assert all(torch.equal(a[k], b[k]) for k in a)
    train("split", dropout=0.3, batch_parts=2)
    assert curves["split"] == pytest.approx(curves["straight"], rel=1e-4)
    plain = train("plain", batch_parts=1)
    assert curves["plain"][1:] != pytest.approx(curves["straight"][1:], rel=1e-3)
    assert load_checkpoint(RunLayout.of(straight).memory, FINAL_WEIGHTS,
                           with_state=False).info["dropout"] == 0.3
    assert load_mdrnn(RunLayout.of(straight).memory)[0].dropout == 0.3
    assert load_mdrnn(RunLayout.of(plain).memory)[0].dropout == 0.0
    # another rate does not continue the same run
    train("changed", stop=2, dropout=0.3)
    with pytest.raises(WmlabError, match="dropout = 0.3, now 0.0"):
        train("changed")


def test_over_predicted_rewards_weigh_more_in_the_loss_only():
    """mdrnn.reward_over_weight: the squared reward error of steps where M predicts more
    than the env paid counts that many times; under-prediction and reward_mse as before."""
    from wmlab.memory.evaluation import batch_losses

    torch.manual_seed(0)
    model = MDNRNN(MdrnnShape(z_dim=4, action_dim=1, hidden=16, reward_head=True))
    batch = episode_batch(make_series(4, 20, seed=1), 4, 20, seed=0, step=0)
    z_in, z_next = batch.sample_z(torch.Generator().manual_seed(0))
    out, _, _ = model(z_in, batch.actions, restart=batch.restart)
    error = (out.reward - batch.rewards).detach()
    over = float(((error > 0) * error.pow(2) * batch.mask).sum() / batch.mask.sum())
    assert 0 < over < float((error.pow(2) * batch.mask).sum() / batch.mask.sum())
    plain, plain_parts, _ = batch_losses(model, batch, z_in, z_next, 10.0)
    heavy, heavy_parts, _ = batch_losses(model, batch, z_in, z_next, 10.0,
                                         reward_over_weight=5.0)
    assert float((heavy - plain).detach()) == pytest.approx(4 * over, rel=1e-4)
    assert heavy_parts["reward_mse"] == pytest.approx(plain_parts["reward_mse"])


def test_an_m_trained_against_over_prediction_predicts_lower_rewards(tmp_path):
    """On rewards with noise M cannot foresee, the asymmetric loss pulls M's predictions
    below the mean (towards a low expectile), where the plain loss predicts the mean."""
    from wmlab.config import ConfigError

    rng = np.random.default_rng(7)
    series = make_series(40, 30, seed=5)
    for s in series:  # a coin flip of +-1 on top of the learnable part
        s.rewards[:] = s.actions[:, 0] + rng.choice([-1.0, 1.0], size=len(s.rewards))
    bias = {}
    for weight in (1.0, 5.0):
        cfg = tiny_config(tmp_path / str(weight), regime="episodes", seq_len=29, steps=150,
                          batch_size=8, hidden=16, lr=0.01, calibration_episodes=0,
                          reward_head=True, done_head=False, reward_over_weight=weight)
        train_mdrnn(cfg, progress=False, series=SeriesSet(series[:32], series[32:]))
        model, _ = load_mdrnn(RunLayout.of(cfg).memory)
        batch = episode_batch(series[32:], 8, 29, seed=0, step=0)
        z_in, _ = batch.sample_z(torch.Generator().manual_seed(0))
        with torch.no_grad():
            out, _, _ = model(z_in, batch.actions, restart=batch.restart)
        learnable = batch.actions[..., 0]
        bias[weight] = float(((out.reward - learnable) * batch.mask).sum() / batch.mask.sum())
    assert abs(bias[1.0]) < 0.25 and bias[5.0] < -0.4, bias
    with pytest.raises(ConfigError, match="mdrnn.reward_over_weight .* M has none"):
        tiny_config(tmp_path, reward_head=False, reward_over_weight=5.0)
