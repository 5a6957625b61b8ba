"""Audio front end: wav I/O at 22,050 Hz mono and the log-mel spectrogram shared by training and synthesis.

The mel settings are the field's standard ones (Tacotron 2, WaveGlow, WaveFlow, HiFi-GAN): 1024-point FFT,
hop 256, Hann window of 1024, 80 mel bands over 0-8,000 Hz (librosa's Slaney filter bank), magnitude (not
power) spectrogram, natural log with a floor of 1e-5. Frames are centred (``center=True``, reflect padding), so
``T`` samples give ``T // hop + 1`` frames and frame ``k`` is centred on sample ``k * hop``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["AudioError", "MelConfig", "MelSpectrogram", "load_wav", "save_wav", "num_frames"]

log = logging.getLogger(__name__)


class AudioError(ValueError):
    """An audio file that cannot be used (unreadable, empty, wrong sample rate); the message names the file."""


@dataclass(frozen=True)
class MelConfig:
    """Log-mel settings; the defaults are the standard 22.05 kHz vocoder front end."""

    sample_rate: int = 22050
    n_fft: int = 1024
    hop_length: int = 256
    win_length: int = 1024
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float = 8000.0
    log_floor: float = 1e-5


def num_frames(num_samples: int, hop_length: int = 256) -> int:
    """Frames of a centred STFT of ``num_samples`` samples."""
    return num_samples // hop_length + 1


class MelSpectrogram(nn.Module):
    """Log-mel spectrogram: (B, T) or (T,) audio in [-1, 1] -> (B, n_mels, T // hop + 1) (or unbatched).

    ``torch.stft`` (centred, reflect padding, Hann window) plus ``librosa.filters.mel`` (Slaney norm), so it runs
    on any device, in a batch, and is the same function in the data pipeline and at synthesis.
    """

    def __init__(self, config: MelConfig | None = None, **overrides: float) -> None:
        super().__init__()
        import librosa

        cfg = config or MelConfig()
        if overrides:
            cfg = MelConfig(**{**cfg.__dict__, **overrides})
        self.config = cfg
        basis = librosa.filters.mel(
            sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax
        )  # (n_mels, n_fft // 2 + 1)
        self.register_buffer("mel_basis", torch.as_tensor(basis, dtype=torch.float32), persistent=False)
        self.register_buffer("window", torch.hann_window(cfg.win_length), persistent=False)

    def forward(self, audio: Tensor) -> Tensor:
        squeeze = audio.dim() == 1
        x = audio[None] if squeeze else audio  # (B, T)
        if x.dim() != 2:
            raise ValueError(f"MelSpectrogram: expected audio of shape (T,) or (B, T), got {tuple(audio.shape)}")
        cfg = self.config
        pad = cfg.n_fft // 2
        if x.shape[1] <= pad:  # reflect padding needs more samples than the pad: zero-pad very short clips first
            x = torch.nn.functional.pad(x, (0, pad + 1 - x.shape[1]))
        spec = torch.stft(
            x.float(),
            cfg.n_fft,
            hop_length=cfg.hop_length,
            win_length=cfg.win_length,
            window=self.window.to(x.device),
            center=True,
            pad_mode="reflect",
            return_complex=True,
        ).abs()  # (B, n_fft // 2 + 1, frames)
        mel = torch.matmul(self.mel_basis.to(x.device), spec)  # (B, n_mels, frames)
        mel = torch.log(torch.clamp(mel, min=cfg.log_floor))
        return mel[0] if squeeze else mel


def load_wav(path: str | Path, sample_rate: int = 22050, resample: bool = True) -> np.ndarray:
    """A wav (or any libsndfile format) as float32 mono in [-1, 1] at ``sample_rate``: (T,).

    Several channels are averaged. Another sample rate is resampled with soxr (logged) or, with
    ``resample=False``, refused. Unreadable or empty files raise :class:`AudioError` naming the file.
    """
    import soundfile as sf

    path = Path(path)
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (T, channels)
    except Exception as e:  # libsndfile raises its own error types; name the file whatever they are
        raise AudioError(f"{path}: cannot read audio ({type(e).__name__}: {e})") from e
    if data.shape[0] == 0:
        raise AudioError(f"{path}: empty audio file (0 samples)")
    audio = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sr != sample_rate:
        if not resample:
            raise AudioError(
                f"{path}: sample rate {sr} Hz, expected {sample_rate} Hz (resampling is off: data.resample=false)"
            )
        import soxr

        log.info("%s: resampling %d Hz -> %d Hz", path, sr, sample_rate)
        audio = soxr.resample(audio, sr, sample_rate).astype(np.float32)
    if not np.isfinite(audio).all():
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    return np.ascontiguousarray(audio, dtype=np.float32)


def save_wav(path: str | Path, audio: np.ndarray | Tensor, sample_rate: int = 22050) -> Path:
    """Write (T,) float audio as 16-bit PCM, clipping to [-1, 1]."""
    import soundfile as sf

    if isinstance(audio, Tensor):
        audio = audio.detach().float().cpu().numpy()
    audio = np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, sample_rate, subtype="PCM_16")
    return path
