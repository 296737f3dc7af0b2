import pytest
import torch

from wmlab.vision.model import (
    ConvVAE,
    Discriminator,
    count_parameters,
    critic_loss,
    frames_to_tensor,
    generator_loss,
    vae_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("z_dim, expected", [(32, 4_348_547), (64, 4_446_915)])
def test_parameter_counts_match_the_paper(z_dim, expected):
    assert count_parameters(ConvVAE(z_dim)) == expected


def test_a_narrower_v_keeps_every_shape_and_has_a_quarter_of_the_weights():
    paper, narrow = ConvVAE(64), ConvVAE(64, width=16)
    x = torch.rand(3, 3, 64, 64)
    recon, mu, _ = narrow(x)
    assert recon.shape == x.shape and mu.shape == (3, 64)
    assert narrow.encoder.convs(x).flatten(1).shape == (3, 512)  # 128 channels x 2 x 2
    # every convolution has half the channels on both sides: about a quarter of the weights
    assert 0.2 < count_parameters(narrow) / count_parameters(paper) < 0.3
    assert count_parameters(Discriminator(16)) < count_parameters(Discriminator()) / 3


def test_shapes_through_encoder_and_decoder():
    model = ConvVAE(32)
    x = torch.rand(5, 3, 64, 64)
    recon, mu, logvar = model(x)
    assert recon.shape == x.shape and mu.shape == logvar.shape == (5, 32)
    assert recon.min() >= 0 and recon.max() <= 1


@pytest.mark.parametrize("z_dim", [32, 64])
def test_encoder_and_decoder_shapes_follow_the_spec(z_dim):
    model = ConvVAE(z_dim)
    sizes = []
    h = torch.rand(2, 3, 64, 64)
    for layer in model.encoder.convs:
        h = layer(h)
        sizes.append(h.shape[-1])
    assert sizes[::2] == [31, 14, 6, 2] and h.flatten(1).shape == (2, 1024)
    mu, logvar = model.encode(torch.rand(2, 3, 64, 64))
    assert mu.shape == logvar.shape == (2, z_dim)
    h = model.decoder.fc(mu).view(-1, 1024, 1, 1)
    sizes = []
    for layer in model.decoder.deconvs:
        h = layer(h)
        sizes.append(h.shape[-1])
    assert sizes[::2] == [5, 13, 30, 64] and h.shape == (2, 3, 64, 64)
    assert model.decode(mu).shape == (2, 3, 64, 64)


def test_frames_to_tensor_scales_and_keeps_values_in_both_layouts():
    frames = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    plain = frames_to_tensor(frames)
    fast = frames_to_tensor(frames, channels_last=True)
    assert plain.shape == fast.shape == (3, 3, 64, 64)
    assert fast.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(plain, fast)
    assert float(plain[1, 2, 5, 7]) == pytest.approx(int(frames[1, 5, 7, 2]) / 255)


def test_kl_is_floored_per_frame_at_tolerance_times_z():
    x = torch.rand(4, 3, 64, 64)
    mu = torch.zeros(4, 8)
    logvar = torch.zeros(4, 8)  # KL exactly 0 -> floored to 0.5 * 8
    parts = vae_loss(x, x, mu, logvar, kl_tolerance=0.5)
    assert float(parts.kl) == pytest.approx(4.0)
    assert float(parts.reconstruction) == 0.0
    big = vae_loss(x, x, torch.full((4, 8), 3.0), logvar, kl_tolerance=0.5)
    assert float(big.kl) == pytest.approx(0.5 * 8 * 9.0)  # 0.5 * sum(mu^2) above the floor


def test_kl_floor_is_per_sample_not_per_batch():
    x = torch.rand(2, 3, 64, 64)
    logvar = torch.zeros(2, 4)
    mu = torch.tensor([[0.0] * 4, [2.0] * 4])  # KL 0 and 0.5 * 4 * 4 = 8
    parts = vae_loss(x, x, mu, logvar, kl_tolerance=0.5)  # floor 2 per sample
    # per sample: mean(max(0, 2), max(8, 2)) = 5; floored after averaging it would be 4
    assert float(parts.kl) == pytest.approx(5.0)
    assert float(parts.total) == pytest.approx(5.0)


def test_reconstruction_is_summed_over_pixels_and_averaged_over_batch():
    x = torch.zeros(2, 3, 64, 64)
    recon = torch.full_like(x, 0.5)
    parts = vae_loss(x, recon, torch.zeros(2, 4), torch.zeros(2, 4), 0.0)
    assert float(parts.reconstruction) == pytest.approx(0.25 * 3 * 64 * 64)


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = ConvVAE(8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(8, 3, 1, 1).expand(8, 3, 64, 64).contiguous()  # flat colours: learnable
    losses = []
    for _ in range(30):
        recon, mu, logvar = model(x)
        loss = vae_loss(x, recon, mu, logvar, 0.5).total
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_gan_losses_train_their_own_parameters():
    torch.manual_seed(0)
    disc = Discriminator()
    real, fake = torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64, requires_grad=True)
    critic_loss(disc, real, fake).backward()
    assert fake.grad is None  # the critic never pushes the generator
    assert all(p.grad is not None for p in disc.parameters())
    disc.zero_grad()
    generator_loss(disc, real, fake).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_decoder_first_layer_as_matmul_equals_the_transposed_convolution():
    """The decoder computes its first transposed convolution (1x1 input) as a matmul: the
    same frames and the same gradients as the layer run as a convolution, in both layouts."""
    torch.manual_seed(0)
    for channels_last in (False, True):
        model = ConvVAE(8, width=8)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        z = torch.randn(5, 8)
        decoder = model.decoder
        reference = decoder.deconvs(decoder.fc(z).view(-1, decoder.features, 1, 1))
        reference_grad = torch.autograd.grad(reference.pow(2).sum(),
                                             decoder.deconvs[0].weight)[0]
        frames = decoder(z)
        grad = torch.autograd.grad(frames.pow(2).sum(), decoder.deconvs[0].weight)[0]
        assert frames.shape == (5, 3, 64, 64)
        assert torch.allclose(frames, reference, atol=1e-6)
        assert torch.allclose(grad, reference_grad, atol=1e-5)
