"""The C kernels (wmlab.native): built once per machine, the same function as the PyTorch
reference code they replace, and a clean fallback to that code wherever they cannot be
built."""

import math
import shutil

import numpy as np
import pytest
import torch

import wmlab.dream.batched as dream_module
import wmlab.memory.model as model_module
import wmlab.memory.scan as scan_module
from wmlab.dream import DreamSettings
from wmlab.memory.model import MDNRNN, MdrnnShape, mixture_nll, mixture_nll_reference
from wmlab.memory.scan import lstm_kernels, lstm_scan
from wmlab.native import load_library, native_enabled

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """load_library with an empty cache directory and no remembered result."""
    monkeypatch.setenv("WMLAB_CACHE_DIR", str(tmp_path / "cache"))
    load_library.cache_clear()
    yield tmp_path / "cache" / "kernels"
    load_library.cache_clear()


def needs_kernels():
    if lstm_kernels() is None or model_module.mixture_kernel() is None:
        pytest.skip("no C compiler here: the PyTorch path is the only one")


def test_kernels_build_wherever_gcc_is_installed():
    if shutil.which("gcc") is None or not native_enabled():
        pytest.skip("no gcc here")
    assert lstm_kernels() is not None and model_module.mixture_kernel() is not None


def test_kernels_are_built_once_into_the_cache(fresh_loader):
    needs_kernels()  # a compiler exists (checked through the normal cache)
    first = load_library("wmlab.memory", "lstm_steps.c")
    assert first is not None
    everything = sorted(p.name for p in fresh_loader.iterdir())
    built = [name for name in everything if name.startswith("lstm_steps-")]
    assert len(built) == 1 and built[0].endswith(".so")
    load_library.cache_clear()
    mtime = (fresh_loader / built[0]).stat().st_mtime_ns
    assert load_library("wmlab.memory", "lstm_steps.c") is not None
    assert (fresh_loader / built[0]).stat().st_mtime_ns == mtime  # reused, not rebuilt
    # only the two libraries: no temporaries left behind
    assert sorted(p.name for p in fresh_loader.iterdir()) == everything
    assert {name.split("-")[0] for name in everything} == {"lstm_steps", "mixture_nll"}


def test_without_a_compiler_or_when_turned_off_the_kernels_are_absent(fresh_loader,
                                                                      monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("PATH", "/nonexistent")  # and no cc, gcc or clang to fall back on
    assert load_library("wmlab.memory", "lstm_steps.c") is None
    assert not fresh_loader.exists() or not any(fresh_loader.iterdir())
    load_library.cache_clear()
    monkeypatch.setenv("WMLAB_NATIVE", "0")
    assert load_library("wmlab.memory", "mixture_nll.c") is None


def _scan_results(low: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batch, steps, hidden, inputs = 5, 30, 64, 7
    x = torch.randn(batch, steps, inputs, generator=g)
    w_ih = (0.3 * torch.randn(4 * hidden, inputs, generator=g)).requires_grad_()
    w_hh = (0.2 * torch.randn(4 * hidden, hidden, generator=g)).requires_grad_()
    bias = (0.1 * torch.randn(4 * hidden, generator=g)).requires_grad_()
    h0 = torch.randn(batch, hidden, generator=g).requires_grad_()
    c0 = torch.randn(batch, hidden, generator=g).requires_grad_()
    keep = torch.ones(batch, steps)
    keep[0, 0] = keep[1, 7] = keep[1, 8] = keep[3, 29] = keep[4, 15] = 0.0  # restarts
    out, h, c = lstm_scan(x, w_ih, w_hh, bias, h0, c0, keep, low)
    weights = torch.randn(out.shape, generator=g)
    loss = (out * weights).sum() + 0.7 * h.sum() + 0.3 * (c * c).sum()
    grads = torch.autograd.grad(loss, [w_ih, w_hh, bias, h0, c0])
    return [out, h, c, *grads]


@pytest.mark.parametrize("low", [torch.float32, torch.bfloat16])
def test_scan_kernels_compute_the_reference_scan(low, monkeypatch):
    """Outputs, final state and all five gradients, with restarts at the first step, mid
    sequence, twice in a row and at the last step: float32 to float rounding; bf16 within
    bf16 rounding of the reference's own bf16 products."""
    needs_kernels()
    native = _scan_results(low)
    monkeypatch.setattr(scan_module, "lstm_kernels", lambda: None)
    reference = _scan_results(low)
    for mine, theirs in zip(native, reference, strict=True):
        scale = theirs.abs().max()
        tolerance = 2e-5 if low == torch.float32 else 2e-2
        assert (mine - theirs).abs().max() <= tolerance * scale
    # the reference itself is far from float32 in bf16: the comparison above is not loose
    if low == torch.bfloat16:
        full = _scan_results(torch.float32)
        assert (reference[0] - full[0]).abs().max() > 1e-4


def _head_output(seed: int, batch=3, steps=4, z=6, k=5, done=True):
    shape = MdrnnShape(z_dim=z, action_dim=1, hidden=8, gaussians=k, done_head=done)
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(batch, steps, shape.output_size, generator=g).requires_grad_()
    return raw, MDNRNN(shape).split_output(raw)


@pytest.mark.parametrize("masked", [False, True])
def test_fused_mixture_loss_is_the_density_formula_and_its_gradient(masked):
    needs_kernels()
    raw, out = _head_output(seed=1)
    target = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(5))
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]) \
        if masked else None
    assert model_module._fused_applies(out, target, mask)
    fused = mixture_nll(out, target, mask)
    # the density written out, in float64
    direct = np.zeros((3, 4, 6))
    for idx in np.ndindex(3, 4, 6):
        logits = out.logits[idx].double()
        w = torch.softmax(logits, 0)
        mu, sigma = out.means[idx].double(), torch.exp(out.log_sigmas[idx].double())
        y = float(target[idx])
        density = (w * torch.exp(-0.5 * ((y - mu) / sigma) ** 2)
                   / (sigma * math.sqrt(2 * math.pi))).sum()
        direct[idx] = -math.log(float(density.detach()))
    expected = direct[mask.numpy() > 0].mean() if masked else direct.mean()
    assert float(fused.detach()) == pytest.approx(expected, rel=1e-5)
    (g_fused,) = torch.autograd.grad(3.0 * fused, raw)  # the backward scales by d_loss
    (g_ref,) = torch.autograd.grad(3.0 * mixture_nll_reference(out, target, mask), raw)
    assert torch.allclose(g_fused, g_ref, atol=1e-6, rtol=1e-4)
    assert torch.all(g_fused[..., -1] == 0)  # the done column belongs to another loss
    if masked:
        assert torch.all(g_fused[1, :3] == 0)  # masked steps get no gradient


def test_fused_loss_is_used_only_for_views_of_the_head():
    needs_kernels()
    raw, out = _head_output(seed=2)
    target = torch.randn(3, 4, 6)
    assert model_module._fused_applies(out, target, None)
    out.logits = out.logits / 1.5  # rescaled after the split: the head no longer says it
    assert not model_module._fused_applies(out, target, None)
    assert float(mixture_nll(out, target).detach()) == \
        float(mixture_nll_reference(out, target).detach())
    _, plain = _head_output(seed=3)
    plain.head = None
    assert not model_module._fused_applies(plain, target, None)


def test_mdrnn_training_step_is_the_same_with_and_without_kernels(monkeypatch):
    """One Doom-shaped forward and backward (resets mid-chunk, done head, bf16 autocast):
    the loss agrees to float rounding and every gradient points the same way."""
    needs_kernels()
    shape = MdrnnShape(z_dim=8, action_dim=1, hidden=32, gaussians=5, done_head=True,
                       restart_input=True)
    torch.manual_seed(0)
    model = MDNRNN(shape)
    z, actions = torch.randn(4, 20, 8), torch.randn(4, 20, 1)
    restart = torch.zeros(4, 20)
    restart[:, 0], restart[2, 9] = 1.0, 1.0
    target = torch.randn(4, 20, 8)

    def step():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _, _ = model(z, actions, restart)
        loss = mixture_nll(out, target)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters()]

    loss_native, grads_native = step()
    monkeypatch.setattr(scan_module, "lstm_kernels", lambda: None)
    monkeypatch.setattr(model_module, "mixture_kernel", lambda: None)
    loss_ref, grads_ref = step()
    assert loss_native == pytest.approx(loss_ref, rel=1e-3)
    for mine, theirs in zip(grads_native, grads_ref, strict=True):
        assert torch.nn.functional.cosine_similarity(mine.flatten(), theirs.flatten(),
                                                     dim=0) > 0.999


def _dream_pair(monkeypatch, dtype: str, done_mode: str, tau: float = 1.15, tweak=None,
                dropout: float = 0.0):
    """Two BatchedDreams on the same M and starts: with the C kernels and without.
    ``tweak(model)`` changes M's weights first; ``dropout``: M's dropout kept on."""
    torch.manual_seed(3)
    model = MDNRNN(MdrnnShape(z_dim=6, action_dim=1, hidden=32, gaussians=5, done_head=True,
                              restart_input=True)).eval()
    with torch.no_grad():  # a done logit spread around -1: ends some dreams, not all at once
        model.head.weight[3 * 6 * 5] *= 8.0
        model.head.bias[3 * 6 * 5] = -1.0
        if tweak is not None:
            tweak(model)
    start = dream_module.DreamStart(torch.randn(7, 6), torch.full((7, 6), -2.0))

    def make():
        return dream_module.BatchedDream(model, start,
                                         DreamSettings(tau, 50, precision=dtype, done_mode=done_mode,
                                                       done_weight=4.0, dropout=dropout))

    native = make()
    monkeypatch.setattr(dream_module, "lstm_kernels", lambda: None)
    reference = make()
    monkeypatch.undo()
    assert native._kernels is not None and reference._kernels is None
    return native, reference


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("done_mode", ["threshold", "sample"])
def test_dream_kernels_draw_what_the_pytorch_dream_draws(monkeypatch, done_mode, dropout):
    """Float32: every step's z', rewards and ends agree (to float rounding) over 12 steps of
    20 dreams, including the compacted steps after some dreams end; with M's dropout kept
    on, both apply each dream's mask before the head."""
    needs_kernels()
    native, reference = _dream_pair(monkeypatch, "float32", done_mode, dropout=dropout)
    seeds = np.arange(20)
    native.reset(seeds)
    reference.reset(seeds)
    actions = torch.linspace(-1, 1, 20).unsqueeze(1)
    ended_somewhere = False
    for _ in range(12):
        z_a, r_a, d_a = native.step(actions)
        z_b, r_b, d_b = reference.step(actions)
        assert torch.allclose(z_a, z_b, atol=1e-5)
        assert torch.equal(d_a, d_b) and torch.equal(r_a, r_b)
        assert torch.allclose(native.h, reference.h, atol=1e-6)
        ended_somewhere |= bool(d_a.any()) and not bool(d_a.all())
    assert ended_somewhere  # the partial (compacted) steps were exercised


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dream_kernels_in_bf16_stay_within_bf16_rounding(monkeypatch, dropout):
    needs_kernels()
    if not dream_module.bf16_is_native(torch.device("cpu")):
        pytest.skip("bf16 dreams run in float32 on this CPU")
    native, reference = _dream_pair(monkeypatch, "bfloat16", "threshold", dropout=dropout)
    native.reset([1, 2, 3])
    reference.reset([1, 2, 3])
    z_a, _, _ = native.step(torch.zeros(3, 1))
    z_b, _, _ = reference.step(torch.zeros(3, 1))
    assert torch.allclose(z_a, z_b, atol=0.05)


def test_dream_kernels_stay_finite_where_the_cell_state_grows_large(monkeypatch):
    """A forget gate held open and an input gate driving the cell down: after a few steps
    tanh(c) saturates at -1. Under -ffast-math an overflowing exp turned that into NaN (a
    CarRacing dream's cell state reached -60 in about a hundred steps); the kernels clamp
    where float32 has saturated already, and agree with the reference."""
    needs_kernels()
    hidden = 32

    def saturate(model):
        lstm = model.lstm
        lstm.bias_ih_l0[:hidden] = 30.0  # input gate open
        lstm.bias_ih_l0[hidden:2 * hidden] = 30.0  # forget gate open: c accumulates
        lstm.bias_ih_l0[2 * hidden:3 * hidden] = -30.0  # g = -1: c falls by 1 a step
        model.head.weight[3 * 6 * 5] = 0.0
        model.head.bias[3 * 6 * 5] = -5.0  # no dream ends before the cap

    native, reference = _dream_pair(monkeypatch, "float32", "threshold", tweak=saturate)
    native.reset(np.arange(4))
    reference.reset(np.arange(4))
    for _ in range(50):
        native.step(torch.zeros(4, 1))
        reference.step(torch.zeros(4, 1))
    assert float(native.c.min()) < -40  # deep in the saturated range
    assert torch.isfinite(native.h).all() and torch.isfinite(native.z).all()
    assert torch.allclose(native.h, reference.h, atol=1e-6)


def test_freed_memory_is_kept_for_reuse_on_glibc():
    import platform

    from wmlab.native import keep_freed_memory
    keep_freed_memory.cache_clear()
    kept = keep_freed_memory()
    assert kept == (platform.libc_ver()[0] == "glibc")
    assert keep_freed_memory() == kept  # once per process; asking again changes nothing
    assert keep_freed_memory("cuda") is False  # a GPU's tensors are not in glibc's heap


def test_a_cache_that_cannot_be_written_falls_back_to_pytorch(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("WMLAB_CACHE_DIR", str(blocker))  # kernels/ cannot be made under it
    load_library.cache_clear()
    try:
        assert load_library("wmlab.memory", "lstm_steps.c") is None
        x = torch.randn(2, 5, 3)
        out, h, c = lstm_scan(x, torch.randn(8, 3), torch.randn(8, 2), torch.zeros(8),
                              torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2, 5))
        assert out.shape == (2, 5, 2) and torch.equal(out[:, -1], h)
    finally:
        load_library.cache_clear()
