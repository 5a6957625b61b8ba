"""Vocoder metrics between a resynthesis and its ground truth, both as log-mels from :mod:`apps.waveflow.audio`.

* mel L1: mean absolute difference of the natural-log mel magnitudes over aligned frames and bands.
* MCD (mel-cepstral distortion, dB): cepstra are the orthonormal DCT-II of the log-mel over the bands; per frame
  ``MCD = (10 / ln 10) sqrt(2 sum_{d=1..K} (c_d - c'_d)^2)`` (c0, the energy, left out), averaged over frames.
  Frames are aligned one to one (a resynthesis has the ground truth's length), so no DTW. This is the MFCC-based
  variant; numbers are comparable between models scored here, not to SPTK mel-cepstrum MCDs in papers.
* real-time factor: synthesis seconds per second of audio; its inverse is "x faster than real time".
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["mel_l1", "mel_cepstra", "mel_cepstral_distortion"]

_MCD_CONST = 10.0 / math.log(10.0)


def _align(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    if a.shape[-2] != b.shape[-2]:
        raise ValueError(f"mel metrics: different numbers of bands {a.shape[-2]} and {b.shape[-2]}")
    n = min(a.shape[-1], b.shape[-1])
    return a[..., :n].double(), b[..., :n].double()


def mel_l1(mel: Tensor, ref: Tensor) -> float:
    """Mean |log-mel - reference log-mel| over the common frames: (n_mels, frames) each."""
    a, b = _align(mel, ref)
    return float((a - b).abs().mean())


def mel_cepstra(log_mel: Tensor) -> Tensor:
    """Orthonormal DCT-II over the mel bands: (n_mels, frames) -> (n_mels, frames)."""
    n = log_mel.shape[-2]
    k = np.arange(n)[:, None]
    basis = np.cos(np.pi * k * (2 * np.arange(n)[None, :] + 1) / (2 * n)) * np.sqrt(2.0 / n)
    basis[0] /= np.sqrt(2.0)
    return torch.as_tensor(basis, dtype=torch.float64) @ log_mel.double()


def mel_cepstral_distortion(mel: Tensor, ref: Tensor, coefficients: int = 24) -> float:
    """Mean per-frame MCD in dB over cepstral coefficients 1..K of two aligned log-mels (n_mels, frames)."""
    a, b = _align(mel, ref)
    if not 1 <= coefficients < a.shape[-2]:
        raise ValueError(f"mcd_coefficients={coefficients}: expected 1..{a.shape[-2] - 1}")
    diff = (mel_cepstra(a) - mel_cepstra(b))[1 : coefficients + 1]
    return float((_MCD_CONST * torch.sqrt(2.0 * diff.square().sum(0))).mean())
