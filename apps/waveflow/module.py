"""The WaveFlow FlowModule: NLL in nats per clip as the loss, log-likelihood per audio sample (the paper's
number) beside it, and a resynthesised validation clip (wav + mel plot) after validation."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from apps.waveflow.audio import MelSpectrogram, save_wav
from apps.waveflow.plots import plot_mels
from core.training import FlowModule
from core.training.media import log_audio, log_image

__all__ = ["WaveFlowModule"]


class WaveFlowModule(FlowModule):
    """Maximum likelihood of audio segments given their mel frames.

    Batches are ``{"x": audio (B, L), "context": mel (B, n_mels, L // hop + 1)}``. ``nll`` is nats per segment, so
    ``bpd`` is bits per audio sample; ``ll_per_sample`` = -nll / L in nats is the number of the paper's tables.
    ``sigma`` is the sampling temperature of the logged samples; ``sample_seconds`` caps their length.
    """

    def __init__(
        self, model: nn.Module, sigma: float = 1.0, sample_seconds: float = 1.0, sample_rate: int = 22050, **kwargs: Any
    ) -> None:
        super().__init__(model, **kwargs)  # optimizer, scheduler, ema_decay, ... as FlowModule takes them
        self.sigma, self.sample_seconds, self.sample_rate = sigma, sample_seconds, sample_rate

    def num_dims(self, x: Tensor) -> int:
        return x.shape[-1]

    def extra_metrics(self, batch: Any, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"ll_per_sample": -terms["nll"].detach() / batch["x"].shape[-1]}

    @torch.no_grad()
    def log_samples(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        val = getattr(dm, "sets", {}).get("val") if dm is not None else None
        if val is None or not len(val):
            return
        model = self.eval_model
        hop = model.hop
        model.check_hop(val.mel_config.hop_length)
        audio = torch.from_numpy(val.audio(0))
        n = min(len(audio), int(self.sample_seconds * self.sample_rate)) // (hop * model.height) * hop * model.height
        if n == 0:
            return
        melspec = MelSpectrogram(val.mel_config).to(self.device)
        mel = melspec(audio[:n].to(self.device))[None]  # (1, n_mels, n // hop + 1)
        gen = model.synthesize(mel, sigma=self.sigma, length=n)[0].float()
        stem = f"epoch{self.current_epoch:03d}"
        wav = save_wav(self.output_dir / "media" / f"sample_{stem}.wav", gen.cpu(), self.sample_rate)
        log_audio(self.trainer, "samples/resynthesis", wav, self.sample_rate)
        png = plot_mels(
            [mel[0].cpu().numpy(), melspec(gen).cpu().numpy()],
            ["ground truth (val clip 0)", f"WaveFlow resynthesis, sigma={self.sigma}, step {self.global_step}"],
            self.output_dir / "media" / f"mel_{stem}.png",
        )
        log_image(self.trainer, "samples/mel", png)
