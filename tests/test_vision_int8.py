"""V's encoder in int8 for acting (controller.int8_encoder): close to float32, exact integer
sums (the same z on every engine), 7-bit weights, calibrated without data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wmlab.agent import build_models, run_real
from wmlab.envs import get_spec
from wmlab.memory.model import MDNRNN, MdrnnShape
from wmlab.vision.int8 import (
    PIXEL_SCALE,
    WEIGHT_LEVELS,
    Int8Encoder,
    int8_available,
    pixels_as_quint8,
    prior_frames,
)
from wmlab.vision.model import ConvVAE, frames_to_tensor

pytestmark = pytest.mark.skipif(not int8_available(), reason="no int8 CPU engine here")


@pytest.fixture(scope="module")
def vae() -> ConvVAE:
    torch.manual_seed(0)
    return ConvVAE(32).eval()


def _frames(vae: ConvVAE, count: int = 24) -> torch.Tensor:
    """Frames V's decoder draws from its prior with another seed than the calibration's."""
    return prior_frames(vae.decoder, 32, count, seed=5)


def test_int8_encoder_is_close_to_float32(vae):
    frames = _frames(vae)
    with torch.no_grad():
        mu, logvar = vae.encode(frames_to_tensor(frames))
    q_mu, q_logvar = Int8Encoder(vae.encoder, vae.decoder)(frames)
    assert q_mu.dtype == torch.float32 and q_mu.shape == mu.shape
    spread = float(mu.std())
    error = (q_mu - mu).abs()
    assert float(error.mean()) < 0.05 * spread
    assert float(error.max()) < 0.3 * spread
    assert float(error.max()) > 0  # it did run in int8
    assert float((q_logvar - logvar).abs().mean()) < 0.05 * float(logvar.std())


def test_frames_are_taken_as_int8_pixels_at_the_same_levels(vae):
    frames = _frames(vae, 4)
    quantized = torch.quantize_per_tensor(frames_to_tensor(frames, channels_last=True),
                                          PIXEL_SCALE, 0, torch.quint8)
    taken = pixels_as_quint8(frames)
    assert taken.shape == (4, 3, 64, 64) and taken.q_scale() == PIXEL_SCALE
    assert taken.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(taken.int_repr(), quantized.int_repr())
    # frames that are a strided view (every other one) give the same levels
    strided = torch.cat([frames, frames]).view(2, 4, 64, 64, 3).transpose(0, 1)[:, 0]
    assert torch.equal(pixels_as_quint8(strided).int_repr(), quantized.int_repr())


def test_int8_weights_keep_seven_bits(vae):
    encoder = Int8Encoder(vae.encoder, vae.decoder)
    for packed, scale in encoder.layers:
        weight, _ = torch.ops.quantized.conv2d_unpack(packed)
        levels = weight.int_repr().abs().max()
        # 2 x 255 x 63 < 32,767: no int16 saturation on CPUs without VNNI
        assert levels == WEIGHT_LEVELS
        assert scale > 0


def test_int8_calibration_needs_no_data_and_is_repeatable(vae):
    frames = _frames(vae)
    first = Int8Encoder(vae.encoder, vae.decoder)
    second = Int8Encoder(vae.encoder, vae.decoder)
    assert [s for _, s in first.layers] == [s for _, s in second.layers]
    assert torch.equal(first(frames)[0], second(frames)[0])
    # calibrating on other frames gives other scales
    other = Int8Encoder(vae.encoder, vae.decoder, calibration=frames[:4].contiguous())
    assert [s for _, s in other.layers] != [s for _, s in first.layers]


def test_int8_encoder_gives_the_same_z_on_every_engine(vae):
    engines = [e for e in ("onednn", "fbgemm") if e in torch.backends.quantized.supported_engines]
    if len(engines) < 2:
        pytest.skip("one int8 engine only")
    frames = _frames(vae)
    before = torch.backends.quantized.engine
    results = [Int8Encoder(vae.encoder, vae.decoder, engine=e)(frames)[0] for e in engines]
    assert torch.equal(results[0], results[1])  # integer sums: exact
    assert torch.backends.quantized.engine == before  # the process's engine is left as it was


def test_real_rollouts_with_the_int8_encoder(vae):
    pytest.importorskip("envpool")
    from wmlab.envs import make_batch

    torch.manual_seed(3)
    mdrnn = MDNRNN(MdrnnShape(z_dim=32, action_dim=3, hidden=32, gaussians=2,
                              reward_head=True, done_head=True))
    spec = get_spec("carracing")
    plain = build_models(spec, mdrnn, vae, "zh", 0, True, packed_encoder=True)
    int8 = build_models(spec, mdrnn, vae, "zh", 0, True, int8_encoder=True)
    assert isinstance(int8.acting_encoder, Int8Encoder)
    params = np.random.default_rng(0).normal(0, 0.1, (2, plain.shape.num_params))
    seeds = np.array([[11, 12], [11, 12]])
    with make_batch("carracing", 4, "envpool", max_steps=60) as batch:
        float_returns = run_real(plain, batch, params, seeds)
        int8_returns = run_real(int8, batch, params, seeds)
    np.testing.assert_allclose(int8_returns, float_returns, atol=1.0)
