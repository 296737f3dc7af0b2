"""V: the convolutional VAE of World Models, and the discriminator of its VAE-GAN variant.

Shapes follow the released code (SPEC.md section 3): 64x64x3 in [0, 1]; four stride-2
convolutions to 256x2x2 = 1024 features; linear heads to mu and logvar; a linear layer back
to 1024 viewed as 1024x1x1 and four stride-2 transposed convolutions to 64x64x3.

``width`` is the first convolution's channel count (32 in the paper); every layer scales
with it, so width 16 is a V of a quarter of the arithmetic, for machines that cannot afford
the paper's (the Doom quick profile).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wmlab.checkpoint import checkpoint_exists, load_checkpoint, load_weights_into, read_info
from wmlab.device import bf16_is_native
from wmlab.errors import WmlabError

PAPER_WIDTH = 32  # channels of the first convolution; then 64, 128, 256


def _encoder_channels(width: int) -> tuple[int, int, int, int]:
    return width, 2 * width, 4 * width, 8 * width


def _features(width: int) -> int:
    return 8 * width * 2 * 2  # the last convolution's channels x 2 x 2 (1024 in the paper)


class Encoder(nn.Module):
    def __init__(self, z_dim: int, width: int = PAPER_WIDTH) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for out_channels in _encoder_channels(width):
            # in place: a convolution's backward needs its input, never its output
            layers += [nn.Conv2d(in_channels, out_channels, 4, stride=2), nn.ReLU(inplace=True)]
            in_channels = out_channels
        self.convs = nn.Sequential(*layers)
        self.mu = nn.Linear(_features(width), z_dim)
        self.logvar = nn.Linear(_features(width), z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.convs(x).flatten(1)
        return self.mu(h), self.logvar(h)


class Decoder(nn.Module):
    def __init__(self, z_dim: int, width: int = PAPER_WIDTH) -> None:
        super().__init__()
        self.features = _features(width)
        self.fc = nn.Linear(z_dim, self.features)
        self.deconvs = nn.Sequential(
            nn.ConvTranspose2d(self.features, 4 * width, 5, stride=2), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(4 * width, 2 * width, 5, stride=2), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * width, width, 6, stride=2), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(width, 3, 6, stride=2), nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # The first transposed convolution sees a 1x1 input, so it is a matmul of the
        # features with its weight viewed (features, out * k * k): the same result (up to
        # float rounding), computed that way because oneDNN's transposed convolution took
        # over 10x its arithmetic's time on that shape (a third of V's training step on CPU).
        first = self.deconvs[0]
        out_channels, k = first.out_channels, first.kernel_size[0]
        features = self.fc(z)
        weight = first.weight
        if weight.is_contiguous(memory_format=torch.channels_last):
            # read the weight in its stored order (features, k, k, out): a view, where
            # flattening it (features, out * k * k) copied 13 MB three times per step (a
            # sixth of the step); the product is then the channels-last grid, also a view
            grid = torch.matmul(features, weight.permute(0, 2, 3, 1).flatten(1)
                                .to(features.dtype))
            grid = grid.view(-1, k, k, out_channels).permute(0, 3, 1, 2)
        else:
            grid = torch.matmul(features, weight.flatten(1).to(features.dtype))
            grid = grid.view(-1, out_channels, k, k)
        grid = grid + first.bias.view(1, -1, 1, 1).to(grid.dtype)
        return self.deconvs[1:](grid)


class ConvVAE(nn.Module):
    """Frames (N, 3, 64, 64) in [0, 1] -> reconstruction, mu, logvar."""

    def __init__(self, z_dim: int = 32, width: int = PAPER_WIDTH) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.width = width
        self.encoder = Encoder(z_dim, width)
        self.decoder = Decoder(z_dim, width)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x)
        z = sample_latent(mu, logvar, generator)
        return self.decoder(z), mu, logvar


class PackedEncoder:
    """V's encoder for acting (no gradients), its weights cast and laid out once.

    A rollout encodes a few frames per env step (8-16 in a worker), where the encoder is
    most of the agent's cost. At those batch sizes oneDNN's convolutions on the small late
    feature maps (14x14 and 6x6) spend far more than their arithmetic, and autocast casts
    every weight again on every call. Here the weights are cast once to ``dtype``; the two
    first convolutions stay convolutions, the last two run as one matmul each over their
    4x4 patches (a strided view of the channels-last activations, copied once into rows),
    and the mu / logvar heads are one matmul whose columns are permuted once to read those
    rows' (height, width, channel) order. In float32 the result equals ``Encoder`` up to the
    order of float sums; in bfloat16 up to bf16 rounding, as ``Encoder`` under autocast.
    """

    def __init__(self, encoder: Encoder, dtype: torch.dtype = torch.bfloat16) -> None:
        convs = [m for m in encoder.convs if isinstance(m, nn.Conv2d)]
        self.dtype = dtype
        with torch.no_grad():
            self.convs = [(c.weight.detach().to(dtype).contiguous(
                memory_format=torch.channels_last), c.bias.detach().to(dtype))
                for c in convs[:2]]
            # (out, in, k, k) -> (k * k * in, out): a patch row's (row, column, channel) order
            self.patches = [(c.weight.detach().permute(2, 3, 1, 0).reshape(
                -1, c.out_channels).to(dtype).contiguous(), c.bias.detach().to(dtype))
                for c in convs[2:]]
            self.heads = channels_last_heads(encoder, dtype)
        self.z_dim = encoder.mu.out_features

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 64, 64, 3) uint8 frames -> (mu, logvar), each (N, z) float32."""
        x = self.pixels(frames)
        for weight, bias in self.convs:
            x = conv_relu(x, weight, bias, stride=2)
        x = x.permute(0, 2, 3, 1)  # (N, H, W, C): the channels-last memory, as a view
        for weight, bias in self.patches:
            x = _patch_matmul(x, weight, bias).relu_()
        out = torch.addmm(self.heads[1], x.reshape(len(x), -1), self.heads[0]).float()
        return out[:, :self.z_dim], out[:, self.z_dim:]

    def pixels(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 64, 64, 3) uint8 -> (N, 3, 64, 64) in [0, 1], ``dtype``, channels-last.

        Cast first, then divided: bf16's division rounds float32's quotient once, the
        values float32's pixels cast to bf16 had (tested), one pass over the frames fewer.
        Contiguous (N, H, W, C) frames are channels-last already: no copy then."""
        x = frames.permute(0, 3, 1, 2).to(self.dtype).div_(255.0)
        return x.contiguous(memory_format=torch.channels_last)


def channels_last_heads(encoder: Encoder, dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """V's mu and logvar heads as one matmul that reads the last convolution's output laid
    out (row, column, channel), as channels-last memory holds it: (weight (features, 2 z),
    bias (2 z)) in ``dtype``. Encoder flattens (channel, row, column); the heads' columns are
    permuted once so that an acting encoder flattens its activations as a view, not a copy."""
    last = [m for m in encoder.convs if isinstance(m, nn.Conv2d)][-1].out_channels
    with torch.no_grad():
        heads = torch.cat([encoder.mu.weight, encoder.logvar.weight]).detach()
        heads = heads.view(len(heads), last, -1).transpose(1, 2).reshape(len(heads), -1)
        return (heads.t().to(dtype).contiguous(),
                torch.cat([encoder.mu.bias, encoder.logvar.bias]).detach().to(dtype))


def conv_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              stride: int) -> torch.Tensor:
    """relu(conv2d(x)) in one oneDNN call where PyTorch has its fused CPU kernel (the ReLU
    as the convolution's post-op: one pass fewer over the largest activations, ~40% of the
    first layer's time at a batch of 8), else as two ops. The same values bit for bit:
    rounding keeps signs, so the ReLU commutes with the cast of the sums."""
    fused = _fused_conv()
    if fused is None or x.device.type != "cpu" or \
            (x.dtype == torch.bfloat16 and not _fused_runs_bf16()):
        return F.conv2d(x, weight, bias, stride=stride).relu_()
    return fused(x, weight, bias, [0, 0], [stride, stride], [1, 1], 1, "relu", [], "")


@functools.cache  # looked up once, not on each of the agent's two convolutions a step
def _fused_conv() -> Any | None:
    """PyTorch's fused convolution + pointwise CPU op (the one its compiler emits), or None
    in builds without oneDNN."""
    try:
        return torch.ops.mkldnn._convolution_pointwise
    except (AttributeError, RuntimeError):
        return None


@functools.cache
def _fused_runs_bf16() -> bool:
    """Whether oneDNN's fused op takes bfloat16 here: it refuses on CPUs without AVX-512 (or
    AVX-NE-CONVERT), where plain ``conv2d`` still runs bf16 (emulated, slowly)."""
    return bf16_is_native(torch.device("cpu"))


def _patch_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kernel: int = 4,
                  stride: int = 2) -> torch.Tensor:
    """A stride-``stride`` convolution of (N, H, W, C) as a matmul over its patches."""
    count, height, width, channels = x.shape
    rows, cols = (height - kernel) // stride + 1, (width - kernel) // stride + 1
    n, h, w, c = x.stride()
    patches = x.as_strided((count, rows, cols, kernel, kernel, channels),
                           (n, h * stride, w * stride, h, w, c))
    out = torch.addmm(bias, patches.reshape(count * rows * cols, -1), weight)
    return out.view(count, rows, cols, -1)


def sample_latent(mu: torch.Tensor, logvar: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mu + sigma * eps: the reparameterised sample C and M see (not the mean)."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


def frames_to_tensor(frames: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """(N, 64, 64, 3) uint8 -> (N, 3, 64, 64) float in [0, 1] (channels-last memory if asked).

    uint8 HWC is already the channels-last layout, so the permute costs no copy when the
    model runs channels-last: only the conversion to float touches the data.
    """
    x = frames.permute(0, 3, 1, 2)
    if channels_last:
        return x.float().div_(255.0).contiguous(memory_format=torch.channels_last)
    return x.contiguous().float().div_(255.0)


@dataclass
class VaeLoss:
    total: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor


def vae_loss(x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             kl_tolerance: float, pixel_weight: torch.Tensor | None = None) -> VaeLoss:
    """Summed squared error per frame plus the KL floored at kl_tolerance * z, batch means.

    The floor is applied per frame before averaging, as the released code does: it stops
    the KL term from pulling latents below that much information (the "free bits" idea).
    ``pixel_weight`` (broadcast to x) weighs each pixel's squared error in the total; the
    ``reconstruction`` part stays the plain error, so runs with and without compare.
    """
    error = (recon.float() - x.float()).pow(2)
    reconstruction = error.flatten(1).sum(1).mean()
    weighted = reconstruction if pixel_weight is None else \
        (error * pixel_weight).flatten(1).sum(1).mean()
    mu, logvar = mu.float(), logvar.float()
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
    kl = kl.clamp(min=kl_tolerance * mu.shape[1]).mean()
    return VaeLoss(total=weighted + kl, reconstruction=reconstruction, kl=kl)


class Discriminator(nn.Module):
    """VAE-GAN critic: the encoder's convolution stack and a linear real/fake logit.

    ``features`` returns the last convolution's activations, used for the feature-matching
    loss that makes the VAE's reconstructions agree with real frames in the critic's eyes.
    """

    def __init__(self, width: int = PAPER_WIDTH) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for out_channels in _encoder_channels(width):
            layers += [nn.Conv2d(in_channels, out_channels, 4, stride=2),
                       nn.LeakyReLU(0.2, inplace=True)]
            in_channels = out_channels
        self.convs = nn.Sequential(*layers)
        self.logit = nn.Linear(_features(width), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.convs(x)
        return self.logit(features.flatten(1)).squeeze(1), features


def critic_loss(discriminator: Discriminator, real: torch.Tensor, fake: torch.Tensor
                ) -> torch.Tensor:
    """Binary cross-entropy of the critic telling real frames from (detached) reconstructions."""
    real_logit, _ = discriminator(real)
    fake_logit, _ = discriminator(fake.detach())
    return (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
            + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit)))


def generator_loss(discriminator: Discriminator, real: torch.Tensor, fake: torch.Tensor
                   ) -> torch.Tensor:
    """Non-saturating adversarial loss plus feature matching, both pushing the VAE's output."""
    with torch.no_grad():
        _, real_features = discriminator(real)
    fake_logit, fake_features = discriminator(fake)
    adversarial = F.binary_cross_entropy_with_logits(fake_logit, torch.ones_like(fake_logit))
    matching = (fake_features - real_features).pow(2).mean()
    return adversarial + matching


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Loading a trained V (the V stage's checkpoints)

FINAL_WEIGHTS = "vae"  # the trained V that later stages load


def recorded_size(info: dict[str, Any]) -> tuple[int, int]:
    """(z_dim, width) of a saved V; sidecars written before width existed are the paper's."""
    return int(info.get("z_dim", -1)), int(info.get("width", PAPER_WIDTH))


def load_vae(folder: str, device: torch.device | str = "cpu", z_dim: int | None = None
             ) -> tuple[ConvVAE, dict]:
    """The trained V of a run's vision folder and its sidecar (with its fingerprint).

    ``z_dim``, when given, is what the caller's config expects: a V of another size is
    refused by name rather than producing series M cannot read.
    """
    recorded, width = recorded_size(read_vae_info(folder))
    if z_dim is not None and recorded != z_dim:
        raise WmlabError(f"the V in {folder} has z_dim {recorded}, the config asks for "
                         f"{z_dim}: set vae.z_dim={recorded} or train V again in another run")
    ckpt = load_checkpoint(folder, FINAL_WEIGHTS, with_state=False)
    model = ConvVAE(recorded, width)
    load_weights_into(model, ckpt.weights, f"{folder}/{FINAL_WEIGHTS}")
    return model.to(device).eval(), ckpt.info


def read_vae_info(folder: str) -> dict[str, Any]:
    """The sidecar of the trained V in ``folder`` (z_dim, kind, step, fingerprint)."""
    if not checkpoint_exists(folder, FINAL_WEIGHTS):
        raise WmlabError(f"no trained V in {folder}: run `wmlab train-vae` with the same "
                         "--preset, --profile and --run first")
    return read_info(folder, FINAL_WEIGHTS)
