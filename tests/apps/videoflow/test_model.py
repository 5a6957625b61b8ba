"""VideoFlow model: causality of the prior, the sequential step against the parallel pass, quantisation and bits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from apps.videoflow.metrics import best_of_n, psnr, ssim
from apps.videoflow.model import (
    LightTemporalGaussian,
    TemporalGaussian,
    TemporalResNet3d,
    VideoFlowModel,
    _pad_with_indicator,
    dilation_rates,
    from_nbit,
    to_nbit,
)
from apps.videoflow.module import VideoFlowModule
from core.metrics import nats_to_bits_per_dim

PRIORS = ["conv3d", "light"]


def _perturbed(module: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    with torch.no_grad():  # leave the zero-initialised start so that the prior really depends on its inputs
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def _lp(model: VideoFlowModel, x: torch.Tensor, frames: bool = True) -> torch.Tensor:
    torch.manual_seed(1)  # the same dequantisation noise for every call on the same shape
    with torch.no_grad():
        return model.frame_log_prob(x) if frames else model.log_prob(x)


def _model(**kw) -> VideoFlowModel:
    args = dict(channels=1, size=16, bits=5, levels=2, steps=1, hidden=8, prior_hidden=8, prior_blocks=2,
                context_frames=2, num_cond=2)  # fmt: skip
    args.update(kw)
    m = VideoFlowModel(**args).double()
    m.train()
    m.frame_log_prob(torch.randint(0, 256, (4, 5, 1, 16, 16), dtype=torch.uint8))  # ActNorm initialisation
    return _perturbed(m).eval()


@pytest.mark.parametrize("prior", PRIORS)
def test_prior_is_causal_in_time(prior):
    model = _model(prior=prior)
    x = torch.randint(0, 256, (2, 6, 1, 16, 16), dtype=torch.uint8)
    y = x.clone()
    y[:, 4:] = torch.randint(0, 256, (2, 2, 1, 16, 16), dtype=torch.uint8)  # change the last two frames only
    lx, ly = _lp(model, x), _lp(model, y)
    torch.testing.assert_close(lx[:, :4], ly[:, :4], rtol=0, atol=1e-9)  # the past does not see the future
    assert (lx[:, 4:] - ly[:, 4:]).abs().min() > 1e-3  # ... while the changed frames' likelihood does change
    z = x.clone()
    z[:, 1] = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)  # change a past frame
    lz = _lp(model, z)
    torch.testing.assert_close(lz[:, 0], lx[:, 0], rtol=0, atol=1e-9)
    assert (lz[:, 2] - lx[:, 2]).abs().min() > 1e-3  # the next frame's prior depends on it
    assert (lz[:, 3] - lx[:, 3]).abs().min() > 1e-3  # ... and so does the one after (K = 2)


def _prior(prior: str, channels: int = 2, context: int = 0, k: int = 2, scale: float = 0.3):
    cls = TemporalGaussian if prior == "conv3d" else LightTemporalGaussian
    return _perturbed(cls(channels, context_channels=context, num_cond=k, hidden=8, blocks=2).double(), scale)


@pytest.mark.parametrize("prior", PRIORS)
def test_prior_window_is_num_cond_frames(prior):
    prior = _prior(prior)
    z = torch.randn(1, 6, 2, 3, 3, dtype=torch.float64)
    mean, _ = prior.params(z)
    z2 = z.clone()
    z2[:, 1] += 1.0  # frame 1 is read by the priors of frames 2 and 3 only (K = 2)
    mean2, _ = prior.params(z2)
    diff = (mean2 - mean).abs().flatten(2).amax(-1)[0]
    assert diff[4:].max() == 0 and diff[:2].max() == 0 and diff[2:4].min() > 1e-6


@pytest.mark.parametrize("prior", PRIORS)
def test_sequential_step_equals_parallel_pass(prior):
    prior = _prior(prior, channels=3, context=2, k=3)
    z, ctx = torch.randn(2, 5, 3, 4, 4, dtype=torch.float64), torch.randn(2, 5, 2, 4, 4, dtype=torch.float64)
    mean, log_sigma = prior.params(z, ctx)
    for t in range(5):
        m, s = prior.step(z[:, :t], ctx[:, t])
        torch.testing.assert_close(m, mean[:, t])
        torch.testing.assert_close(s, log_sigma[:, t])


def test_conv3d_prior_has_the_reference_structure():
    """BAIR at 64 x 64, L = 3: level latents (6, 32, 32), (12, 16, 16), (48, 8, 8); 5 blocks of causal (2, 3, 3)
    convolutions, parallel stacks with dilations 1, 2, 4 where they fit (1, 2 at 8 x 8), gated activations;
    the K = 3 frames keep their time axis through every block and the top has no coarser-level input."""
    model = VideoFlowModel(3, 64, levels=3, steps=1, hidden=8, num_cond=3, prior_hidden=4, prior_blocks=5)
    priors = model.transform.priors
    assert [len(p.net.blocks) for p in priors] == [5, 5, 5]
    assert [[s.conv_in.dilation for s in p.net.blocks[0]] for p in priors] == [[1, 2, 4], [1, 2, 4], [1, 2]]
    stack = priors[0].net.blocks[0][0]
    assert stack.conv_in.conv.kernel_size == (2, 3, 3) and stack.activation == "gatu" and len(stack.conv_mid) == 2
    assert stack.conv_in.conv.in_channels == 6 + 6 + 1  # latents, level-prior mean, padding indicator
    assert priors[2].net.blocks[0][0].conv_in.conv.in_channels == 48 + 1
    assert dilation_rates([1, 3], 8) == [1, 2] and dilation_rates([1, 3], 9) == [1, 2, 4]
    shapes = []
    net = priors[1].net
    hooks = [
        s.register_forward_hook(lambda m, i, o: shapes.append((i[0].shape, o.shape))) for b in net.blocks for s in b
    ]
    mean, raw = net(torch.randn(2, 24, 3, 16, 16))
    for h in hooks:
        h.remove()
    assert len(shapes) == 15 and all(i == o == (2, 24, 3, 16, 16) for i, o in shapes)
    assert mean.shape == raw.shape == (2, 12, 16, 16)


def test_conv3d_prior_starts_at_the_latent_skip():
    """Zero-initialised output layers: frames t >= K start at mean z_{t-1} (the latent skip), scale 1; the first K
    frames at the unconditional prior N(0, 1); without latent_skip every mean starts at 0."""
    z, ctx = torch.randn(2, 5, 3, 4, 4, dtype=torch.float64), torch.randn(2, 5, 3, 4, 4, dtype=torch.float64)
    prior = TemporalGaussian(3, context_channels=3, num_cond=2, hidden=4, blocks=2, size=4).double()
    mean, log_sigma = prior.params(z, ctx)
    torch.testing.assert_close(mean[:, 2:], z[:, 1:-1])
    assert mean[:, :2].abs().max() == 0 and log_sigma.abs().max() == 0
    prior = TemporalGaussian(3, context_channels=3, num_cond=2, hidden=4, blocks=2, latent_skip=False).double()
    assert prior.params(z, ctx)[0].abs().max() == 0


def test_time_padding_indicator_on_known_values():
    x = torch.full((1, 1, 2, 2, 2), 7.0)  # (N, C, T, H, W)
    y = _pad_with_indicator(x, 1, 1)
    assert y.shape == (1, 2, 3, 4, 4)
    ind, val = y[0, 0], y[0, 1]
    assert ind[0].eq(1).all() and val[0].eq(0).all()  # the padded past frame
    assert ind[1:, 1:3, 1:3].eq(0).all() and val[1:, 1:3, 1:3].eq(7).all()  # real values
    assert ind[1:, 0].eq(1).all() and ind[1:, :, 3].eq(1).all() and val[1:, 0].eq(0).all()  # spatial border


def test_resnet_collapses_time_only_at_the_end():
    net = _perturbed(TemporalResNet3d(2, 2, hidden=4, depth=2, frames=3).double(), 0.3)
    x = torch.randn(1, 2, 3, 5, 5, dtype=torch.float64)
    mean, _ = net(x)
    for t in range(3):  # every one of the K frames reaches the output
        x2 = x.clone()
        x2[:, :, t] += 1.0
        assert (net(x2)[0] - mean).abs().max() > 1e-6


def test_conv3d_prior_refuses_more_cond_frames_than_context():
    with pytest.raises(ValueError, match="num_cond=3 > context_frames=1"):
        VideoFlowModel(1, 16, levels=2, steps=1, hidden=8, context_frames=1, num_cond=3)
    VideoFlowModel(1, 16, levels=2, steps=1, hidden=8, context_frames=1, num_cond=3, prior="light")  # zero-padded


def test_quantisation_on_known_values():
    x = torch.tensor([0, 7, 8, 100, 255], dtype=torch.uint8)
    assert to_nbit(x, 5).tolist() == [0, 0, 1, 12, 31]
    assert from_nbit(to_nbit(x, 5), 5).tolist() == [4, 4, 12, 100, 252]
    assert to_nbit(x, 8).tolist() == x.tolist() and from_nbit(x, 8).tolist() == x.tolist()


@pytest.mark.parametrize("bits", [5, 8])
def test_dequantisation_logdet_and_bits_per_pixel(bits):
    model = _model(bits=bits)
    x = torch.randint(0, 256, (2, 3, 1, 16, 16), dtype=torch.uint8)
    y, logdet = model.preprocess(x, noise=False)
    d = 16 * 16
    torch.testing.assert_close(logdet, torch.full((2, 3), -d * bits * math.log(2), dtype=torch.float64))
    assert y.min() >= -0.5 and y.max() < 0.5
    # bin centres (to encode context frames): quantising them back gives the n-bit values
    torch.testing.assert_close(((y + 0.5) * 2**bits - 0.5).round(), to_nbit(x, bits).double())
    # a uniform distribution over 2^bits levels costs exactly `bits` bits per pixel
    assert nats_to_bits_per_dim(d * bits * math.log(2), d) == pytest.approx(bits)
    assert nats_to_bits_per_dim(-logdet[0, 0].item(), d) == pytest.approx(bits)
    # likelihoods use noise inside each bin even in eval mode (a bound), and never leave the bin
    y2, logdet2 = model.preprocess(x)
    torch.testing.assert_close(logdet2, logdet)
    assert not torch.equal(y2, y) and ((y2 + 0.5) * 2**bits).floor().equal(to_nbit(x, bits).double())


@pytest.mark.parametrize("prior", PRIORS)
def test_bits_per_pixel_on_known_values_at_8_bits(prior):
    """At initialisation (no ActNorm start) the flow is orthogonal (squeezes, 1x1 convolutions from a QR, zero
    additive couplings) and every prior is N(0, 1) (zero output layers; the latent skip adds z_{t-1}): mid-grey
    frames (y = u / 256, |y| < 1/256) cost the 8 bits of the bin width plus log2(sqrt(2 pi)) for the density at ~0."""
    model = VideoFlowModel(3, 16, bits=8, levels=2, steps=2, hidden=8, context_frames=2, num_cond=2, prior=prior,
                           prior_hidden=4, prior_blocks=2, coupling="additive").double().eval()  # fmt: skip
    module = VideoFlowModule(model, optimizer=torch.optim.Adam)
    x = torch.full((2, 5, 3, 16, 16), 128, dtype=torch.uint8)
    bpd = nats_to_bits_per_dim(-model.log_prob(x).detach(), module.num_dims(x))
    assert module.num_dims(x) == 3 * 3 * 16 * 16  # three target frames after two context frames
    expected = 8 + 0.5 * math.log2(2 * math.pi)  # 9.3257...
    torch.testing.assert_close(bpd, torch.full_like(bpd, expected), atol=2e-5, rtol=0)
    # a uniform 8-bit model (the dequantisation alone) costs exactly 8 bits per pixel
    _, logdet = model.preprocess(x)
    assert nats_to_bits_per_dim(-logdet.sum(1), 5 * 3 * 16 * 16).tolist() == pytest.approx([8.0, 8.0], abs=1e-12)


def test_log_prob_counts_target_frames_only():
    model = _model()
    x = torch.randint(0, 256, (2, 5, 1, 16, 16), dtype=torch.uint8)
    torch.testing.assert_close(_lp(model, x, frames=False), _lp(model, x)[:, 2:].sum(1))


def test_predict_shapes_and_temperature_zero_is_deterministic():
    model = _model()
    ctx = torch.randint(0, 256, (3, 2, 1, 16, 16), dtype=torch.uint8)
    a, b = model.predict(ctx, 4, temperature=0.0), model.predict(ctx, 4, temperature=0.0)
    assert a.shape == (3, 4, 1, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    c = model.predict(ctx, 4, temperature=1.0)
    assert not torch.equal(a, c)


def test_bad_video_shape_is_named():
    model = _model()
    with pytest.raises(ValueError, match=r"\(B, T, 1, 16, 16\)"):
        model.log_prob(torch.zeros(2, 3, 3, 16, 16, dtype=torch.uint8))


def test_psnr_and_ssim_on_known_values():
    a = torch.full((2, 1, 16, 16), 100, dtype=torch.uint8)
    b = a.clone()
    b[..., ::2, :] += 1  # half the pixels off by one: mse 0.5
    assert psnr(a, b).tolist() == pytest.approx([10 * math.log10(255**2 / 0.5)] * 2)
    skimage = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 24, 24), dtype=np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-30, 30, x.shape), 0, 255).astype(np.uint8)
    ref = skimage.structural_similarity(
        x.transpose(1, 2, 0), y.transpose(1, 2, 0), channel_axis=2, data_range=255, gaussian_weights=True,
        sigma=1.5, use_sample_covariance=False,
    )  # fmt: skip
    assert ssim(torch.from_numpy(x), torch.from_numpy(y)).item() == pytest.approx(ref, abs=1e-6)


def test_best_of_n_picks_the_matching_sample():
    truth = torch.randint(0, 256, (2, 3, 1, 16, 16), dtype=torch.uint8)
    samples = torch.randint(0, 256, (4, 2, 3, 1, 16, 16), dtype=torch.uint8)
    samples[2, 0] = truth[0]
    out = best_of_n(samples, truth)
    assert out["psnr"][0] == 100.0 and out["ssim"][0] == pytest.approx(1.0)
    assert out["psnr"][1] < 20 and out["psnr_t"].shape == (3,)
