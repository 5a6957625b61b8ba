"""Frame metrics of video prediction: PSNR and SSIM per frame, and the best of N sampled futures.

Frames are uint8 or float tensors (..., C, H, W) on the 0..255 scale. SSIM follows Wang et al. (2004) with an 11 x 11
Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, computed per channel on the valid region and averaged, as
``skimage.metrics.structural_similarity(..., gaussian_weights=True, use_sample_covariance=False)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["psnr", "ssim", "best_of_n"]


def psnr(pred: Tensor, target: Tensor, data_range: float = 255.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per frame: (..., C, H, W) -> (...); identical frames give +inf."""
    mse = (pred.double() - target.double()).square().flatten(-3).mean(-1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64) -> Tensor:
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(pred: Tensor, target: Tensor, data_range: float = 255.0) -> Tensor:
    """Structural similarity per frame: (..., C, H, W) -> (...), in [-1, 1] (1 for identical frames)."""
    shape = pred.shape[:-3]
    c, h, w = pred.shape[-3:]
    x = pred.double().reshape(-1, 1, h, w)
    y = target.double().reshape(-1, 1, h, w)
    win = _gaussian_window(dtype=x.dtype).to(x.device)[None, None]
    if h < win.shape[-1] or w < win.shape[-1]:
        raise ValueError(f"ssim: frames of {h} x {w} are smaller than the 11 x 11 window")
    mu_x, mu_y = F.conv2d(x, win), F.conv2d(y, win)
    sxx = F.conv2d(x * x, win) - mu_x**2
    syy = F.conv2d(y * y, win) - mu_y**2
    sxy = F.conv2d(x * y, win) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).reshape(*shape, c).mean(-1)


def best_of_n(samples: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Best-of-N scores of sampled futures (N, B, T, C, H, W) against the truth (B, T, C, H, W), as VideoFlow and
    SAVP report them: per video the sample with the highest mean-over-time metric, chosen for PSNR and SSIM
    separately. Returns per-video (B,) ``psnr``/``ssim`` and per-time-step (T,) ``psnr_t``/``ssim_t`` curves."""
    p = psnr(samples, target[None].expand_as(samples)).clamp(max=100.0)  # (N, B, T); identical frames count 100 dB
    s = ssim(samples, target[None].expand_as(samples))
    out = {}
    for name, m in (("psnr", p), ("ssim", s)):
        best = m.mean(-1).argmax(0)  # (B,)
        per_step = m.gather(0, best[None, :, None].expand(1, *m.shape[1:]))[0]  # (B, T)
        out[name], out[f"{name}_t"] = per_step.mean(-1), per_step.mean(0)
    return out
