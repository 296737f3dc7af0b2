"""V's encoder in int8 for acting (``controller.int8_encoder``).

A real rollout encodes every frame with V, and on CPUs without bf16 hardware V's encoder in
float32 is most of an agent step (on a 2-core AVX2 EPYC ~800 us a frame against ~1,600 us
for the CarRacing env step itself). Its four convolutions run here as PyTorch's quantized
int8 kernels: ~2x faster alone there (1.6x inside a rollout, where the env step between two
encodings evicts V's weights from the caches), mu moved by ~2% of V's own posterior noise
(``docs/benchmarks.md``), the noise the agent samples z with anyway.

- Pixels: uint8 frames are already 8-bit numbers; the first layer reads them at scale 1/255.
- Weights: per output channel, 7 bits (|q| <= 63). CPUs without VNNI multiply unsigned by
  signed bytes and add pairs of products in int16 (``vpmaddubsw``): 2 x 255 x 63 stays below
  32,767, where 8-bit weights (2 x 255 x 127) can saturate and corrupt a sum silently.
- Activations: each convolution's ReLU output in unsigned 8 bits, its scale 1.5x the largest
  value seen over calibration frames. Calibration needs no data: V's decoder draws the
  frames from V's prior (a fixed seed), so a shipped agent calibrates itself the same way
  on every machine, and the int8 sums are exact: every engine gives the same z.
- The mu / logvar heads stay float32 (one small matmul).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from wmlab.errors import WmlabError
from wmlab.vision.model import channels_last_heads, frames_to_tensor

WEIGHT_LEVELS = 63  # 7-bit weights: no int16 saturation on CPUs without VNNI (above)
PIXEL_SCALE = 1.0 / 255.0
CALIBRATION_FRAMES = 256
CALIBRATION_SEED = 0
# Real frames are sharper than the prior's decoded ones: on CarRacing the first layer's
# largest output on 3,200 driving frames is 1.7x the prior frames' (the later layers' 1.0-1.1x),
# so each scale gets this headroom; a clipped activation moved mu by up to 3.4 sigma there,
# and with the headroom by at most 0.6 sigma (a lost bit costs little: mean 0.021 sigma)
HEADROOM = 1.5


def quantized_engine() -> str | None:
    """The int8 CPU engine to pack for: oneDNN where PyTorch has it (the fastest measured on
    V's convolutions at a batch of 8), else fbgemm; None where neither is built in."""
    engines = torch.backends.quantized.supported_engines
    for engine in ("onednn", "fbgemm", "x86"):
        if engine in engines:
            return engine
    return None


@contextlib.contextmanager
def _quantized_tensors() -> Iterator[None]:
    """PyTorch 2.13 warns that its quantized tensors are deprecated; they are its only fast
    int8 convolutions on CPU (``torch._int_mm`` is ~30x slower than float32 there). Where a
    later PyTorch drops them, ``int8_available`` says so and building the encoder stops with
    a one-line error."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor.*deprecated")
        yield


def int8_available() -> bool:
    """Whether this PyTorch can run V's encoder in int8 (an engine and the quantized
    convolution ops)."""
    return quantized_engine() is not None and hasattr(torch.ops.quantized, "conv2d_relu")


@contextlib.contextmanager
def _engine(name: str) -> Iterator[None]:
    """PyTorch's quantized engine set to ``name`` while weights are packed, then restored:
    the packed weights keep their engine, so nothing else in the process is changed."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def prior_frames(decoder: nn.Module, z_dim: int, count: int = CALIBRATION_FRAMES,
                 seed: int = CALIBRATION_SEED) -> torch.Tensor:
    """``count`` frames V's decoder draws from its prior N(0, I): (count, 64, 64, 3) uint8."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pixels = decoder(torch.randn(count, z_dim, generator=generator)).float()
    return pixels.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, k, k) float -> per-output-channel qint8 with |q| <= WEIGHT_LEVELS."""
    scales = weight.abs().amax(dim=(1, 2, 3)).clamp_min(1e-12) / WEIGHT_LEVELS
    zeros = torch.zeros(len(weight), dtype=torch.long)
    return torch.quantize_per_channel(weight.float(), scales.double(), zeros, 0, torch.qint8)


class Int8Encoder:
    """V's encoder as int8 convolutions: (N, 64, 64, 3) uint8 frames -> (mu, logvar)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module,
                 calibration: torch.Tensor | None = None, engine: str | None = None) -> None:
        if not int8_available():
            raise WmlabError("this PyTorch has no int8 convolutions on CPU (fbgemm or "
                             "onednn): set controller.int8_encoder = false")
        engine = engine or quantized_engine()
        convs = [m for m in encoder.convs if isinstance(m, nn.Conv2d)]
        self.z_dim = encoder.mu.out_features
        frames = prior_frames(decoder, self.z_dim) if calibration is None else calibration
        scales = _activation_scales(convs, frames)
        with _engine(engine), _quantized_tensors(), torch.no_grad():
            self.layers = [(torch.ops.quantized.conv2d_prepack(
                _quantize_weight(c.weight.detach()), c.bias.detach().float(),
                list(c.stride), list(c.padding), list(c.dilation), c.groups), scale)
                for c, scale in zip(convs, scales, strict=True)]
        # the last int8 activations are channels-last: the heads read them as a view
        self.heads = channels_last_heads(encoder, torch.float32)

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 64, 64, 3) uint8 frames -> (mu, logvar), each (N, z) float32."""
        with _quantized_tensors():
            x = pixels_as_quint8(frames)
            for packed, scale in self.layers:
                x = torch.ops.quantized.conv2d_relu(x, packed, scale, 0)
            # (N, C, H, W) in channels-last memory: (N, H, W, C) is a view, flattened free
            features = x.dequantize().permute(0, 2, 3, 1).reshape(len(x), -1)
        out = torch.addmm(self.heads[1], features, self.heads[0])
        return out[:, :self.z_dim], out[:, self.z_dim:]


def pixels_as_quint8(frames: torch.Tensor) -> torch.Tensor:
    """(N, 64, 64, 3) uint8 frames -> (N, 3, 64, 64) quint8 at scale 1/255, channels-last.

    Every byte is already its own level of the 1/255 scale, so the frames' memory is taken
    as the quantized tensor's as it is: no float pixels made and quantized back (~10% of the
    int8 encoder's time at a batch of 8), the same levels (tested)."""
    return torch._make_per_tensor_quantized_tensor(
        frames.contiguous().permute(0, 3, 1, 2), PIXEL_SCALE, 0)


def _activation_scales(convs: list[nn.Conv2d], frames: torch.Tensor) -> list[float]:
    """Each convolution's output scale: HEADROOM x its largest ReLU output over ``frames``
    / 255, the float convolutions run on the pixels as the int8 ones will read them."""
    x = frames_to_tensor(frames, channels_last=True)
    scales = []
    with torch.no_grad():
        for conv in convs:
            x = torch.relu(F.conv2d(x, conv.weight.float(), conv.bias.float(), conv.stride,
                                    conv.padding, conv.dilation, conv.groups))
            scales.append(HEADROOM * max(float(x.max()), 1e-6) / 255.0)
    return scales
