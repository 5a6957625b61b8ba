"""VideoFlow model: causality of the prior, the sequential step against the parallel pass, quantisation and bits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from apps.videoflow.metrics import best_of_n, psnr, ssim
from apps.videoflow.model import TemporalGaussian, VideoFlowModel, from_nbit, to_nbit
from core.metrics import nats_to_bits_per_dim


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
    args = dict(channels=1, size=16, bits=5, levels=2, steps=1, hidden=8, prior_hidden=8, context_frames=2, num_cond=2)
    args.update(kw)
    m = VideoFlowModel(**args).double()
    m.train()
    m.frame_log_prob(torch.randint(0, 256, (4, 5, 1, 16, 16), dtype=torch.uint8))  # ActNorm initialisation
    return _perturbed(m).eval()


def test_prior_is_causal_in_time():
    model = _model()
    x = torch.randint(0, 256, (2, 6, 1, 16, 16), dtype=torch.uint8)
    y = x.clone()
    y[:, 4:] = torch.randint(0, 256, (2, 2, 1, 16, 16), dtype=torch.uint8)  # change the last two frames only
    lx, ly = _lp(model, x), _lp(model, y)
    torch.testing.assert_close(lx[:, :4], ly[:, :4], rtol=0, atol=1e-9)  # the past does not see the future
    assert (lx[:, 4:] - ly[:, 4:]).abs().min() > 1e-3  # ... while the changed frames' likelihood does change
    z = x.clone()
    z[:, 1] = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)  # change a past frame
    lz = _lp(model, z)
    assert (lz[:, 2] - lx[:, 2]).abs().min() > 1e-3  # the next frame's prior depends on it


def test_prior_window_is_num_cond_frames():
    prior = _perturbed(TemporalGaussian(2, num_cond=2, hidden=8, blocks=1).double(), 0.3)
    z = torch.randn(1, 6, 2, 3, 3, dtype=torch.float64)
    mean, _ = prior.params(z)
    z2 = z.clone()
    z2[:, 1] += 1.0  # frame 1 is read by the priors of frames 2 and 3 only (K = 2)
    mean2, _ = prior.params(z2)
    diff = (mean2 - mean).abs().flatten(2).amax(-1)[0]
    assert diff[4:].max() == 0 and diff[:2].max() == 0 and diff[2:4].min() > 1e-6


def test_sequential_step_equals_parallel_pass():
    prior = _perturbed(TemporalGaussian(3, context_channels=2, num_cond=3, hidden=8, blocks=1).double(), 0.3)
    z, ctx = torch.randn(2, 5, 3, 4, 4, dtype=torch.float64), torch.randn(2, 5, 2, 4, 4, dtype=torch.float64)
    mean, log_sigma = prior.params(z, ctx)
    for t in range(5):
        m, s = prior.step(z[:, :t], ctx[:, t])
        torch.testing.assert_close(m, mean[:, t])
        torch.testing.assert_close(s, log_sigma[:, t])


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
